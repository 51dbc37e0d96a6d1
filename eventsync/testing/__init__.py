"""A fake BookStack for tests: real HTTP on 127.0.0.1, an in-memory wiki that behaves as
BookStack does (FACTS.md), webhooks, rate limits and injectable faults."""

from __future__ import annotations

from eventsync.testing.mutations import NotFoundError
from eventsync.testing.server import FakeBookStack, Faults, RequestRecord, WebhookDelivery

__all__ = ["FakeBookStack", "Faults", "NotFoundError", "RequestRecord", "WebhookDelivery"]
