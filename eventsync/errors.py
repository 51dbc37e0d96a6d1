"""One exception hierarchy for everything eventsync raises on purpose."""

from __future__ import annotations


class EventsyncError(Exception):
    """An eventsync error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(EventsyncError):
    """A setting is missing or invalid."""


class UnstorableEvent(EventsyncError):
    """The database refused one event of a group commit (a value it cannot store); the rest
    of the group is committed without it. `index` is its place in the group."""

    def __init__(self, message: str | None = None, *, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


class RetryLater(EventsyncError):
    """A transient failure: try again after `delay` seconds."""

    def __init__(self, message: str | None = None, *, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class BookStackError(EventsyncError):
    """BookStack answered with an error."""

    def __init__(
        self, message: str | None = None, *, status: int | None = None, path: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.path = path
        self.sent_at: float | None = None  # when the request that failed was sent


class AuthError(BookStackError):
    """BookStack does not accept the API token: revoked, rotated or expired (401, or the 403
    of an expired token or of a user who may not use the API). Nothing can succeed until it
    works again; the client holds every request meanwhile (see `bookstack/token.py`)."""


class PermanentError(BookStackError):
    """BookStack refused this request for good: sending it again cannot succeed."""


class ForbiddenError(PermanentError):
    """The API token's user lacks a permission this call needs (403)."""


class NotFound(PermanentError):
    """The item does not exist, or the sync user cannot see it (404)."""


class UnknownRoute(PermanentError):
    """BookStack has no such API route (an HTML 404, not its JSON one): a base URL that is
    not BookStack's, or a BookStack older than the endpoint (the audit log came in v23.08).
    Deliberately not a NotFound: it says nothing about whether any item is gone."""


class InvalidRequest(PermanentError):
    """BookStack refused the request as invalid (400, 422 or another 4xx)."""


class Unavailable(BookStackError, RetryLater):
    """BookStack stayed unreachable or kept failing (5xx, timeouts) after every retry."""

    def __init__(
        self, message: str | None = None, *, status: int | None = None, path: str = ""
    ) -> None:
        BookStackError.__init__(self, message, status=status, path=path)
        self.delay = 30.0


class IncompleteListing(BookStackError):
    """A listing came back shorter than its `total` said: nothing may be removed from it."""


class UsageError(ConfigError):
    """An argument is invalid (a command stops with one line and exit code 2, as for a bad
    setting)."""


class AddressRefused(EventsyncError):
    """A subscription URL's host is, or resolves to, an address eventsync will not send to
    (loopback, private, link-local and the like, unless EVENTSYNC_SUBSCRIPTIONS_ALLOW_PRIVATE
    is true)."""


class SignatureError(EventsyncError):
    """The webhook's Standard Webhooks signature does not verify."""


class FeedError(EventsyncError):
    """The change feed refused the request (a 4xx: a bad parameter, a missing token)."""

    def __init__(self, message: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
