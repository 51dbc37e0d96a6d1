"""Whether BookStack accepts the API token: one state per client, shared by every caller."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from eventsync.errors import AuthError

# A rejected token is probed with one cheap request, first PROBE_BASE seconds after the
# refusal, then at doubling intervals up to PROBE_CAP: a revoked token costs a few requests an
# hour instead of the whole budget, and one that works again is noticed within PROBE_CAP.
PROBE_BASE = 5.0
PROBE_CAP = 120.0


class TokenState:
    """`rejected` is BookStack's refusal while it lasts, None while the token works.

    The client sends nothing but probes while it is set, so every task of the source (the
    dispatcher, the poller, the reconciler, the sweep) stops spending requests at once, and
    callers that can wait for `working` do so rather than fail in a loop.
    """

    def __init__(self, probe_base: float = PROBE_BASE, probe_cap: float = PROBE_CAP) -> None:
        if probe_base <= 0 or probe_cap < probe_base:
            raise ValueError("need 0 < probe_base <= probe_cap")
        self.probe_base = probe_base
        self.probe_cap = probe_cap
        self.rejected: AuthError | None = None
        self.since: float | None = None  # wall clock: when the first refused request was sent
        self.probes = 0  # probes sent during the current rejection
        self.held = 0  # requests not sent during the current rejection
        self.working = asyncio.Event()  # set while the token works
        self.failing = asyncio.Event()  # set while it is rejected
        self.working.set()

    def reject(self, error: AuthError, sent_at: float) -> bool:
        """Note a refusal; True when it starts a rejection (the caller logs that, once)."""
        if self.rejected is not None:
            return False
        self.rejected, self.since = error, sent_at
        self.probes = self.held = 0
        self.working.clear()
        self.failing.set()
        return True

    def accept(self, sent_at: float) -> float | None:
        """BookStack authenticated a request sent at `sent_at`. Returns how long the rejection
        lasted when this ends one, else None. An answer to a request sent before the refusal
        says nothing about the token now."""
        if self.rejected is None or self.since is None or sent_at < self.since:
            return None
        lasted = time.time() - self.since
        self.rejected = self.since = None
        self.failing.clear()
        self.working.set()
        return lasted

    def next_probe_delay(self) -> float:
        """Seconds until the next probe: base, then doubling, capped."""
        return min(self.probe_cap, self.probe_base * 2.0 ** min(self.probes, 30))

    def held_error(self, method: str, path: str) -> AuthError:
        """What a request that is not sent raises while the token is rejected."""
        assert self.rejected is not None
        self.held += 1
        return AuthError(
            f"BookStack {method} {path} not sent: the API token is rejected since "
            f"{self.since_iso()} ({self.rejected})",
            status=self.rejected.status,
            path=path,
        )

    def since_iso(self) -> str | None:
        if self.since is None:
            return None
        return datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
