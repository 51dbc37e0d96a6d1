"""Token-bucket rate limiter shared by every task that talks to one BookStack source.

The bucket itself is a `SharedBudget`: `LocalBudget` in this process (SQLite: one serve), or one
row that every replica takes from (PostgreSQL: store/postgres/coordination.py), so that the whole
deployment keeps within EVENTSYNC_REQUESTS_PER_MINUTE: BookStack counts per client address, and a
budget per process would multiply with the replica count.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

log = structlog.get_logger("eventsync.bookstack")

# BookStack's throttle (Laravel's ThrottleRequests) counts hits in a fixed window of this many
# seconds, which starts at the first hit after the previous window expired (FACTS §4).
WINDOW_SECONDS = 60.0

# Tolerance for float rounding: after sleeping exactly the computed deficit the bucket may hold
# 0.9999999 tokens, and we do not want a second, pointless micro-sleep.
_EPSILON = 1e-9


def default_burst(per_minute: float) -> int:
    """A small burst: in any fixed 60 s window we may send `burst + per_minute` requests.

    BookStack counts a fixed window, so a bucket that filled up while we were idle plus a
    minute of steady rate lands in one server window; a burst of at most a tenth of a
    minute's budget (and never more than 10) keeps that sum close to `per_minute`.
    """
    return max(1, min(10, int(per_minute / 6)))


class SharedBudget(Protocol):
    """The token bucket a RateLimiter takes its tokens from.

    Every method is safe to call from several tasks. A budget that cannot reach where it is
    kept answers `take` with a wait, and drops a `pause` or `lower` with a warning: requests
    then wait rather than overshoot, and no request fails because of the budget.
    """

    async def take(self) -> float:
        """Take one request's token: 0.0 when taken. Otherwise take nothing and return the
        seconds to wait before asking again (a pause, or the time until the next token)."""
        ...

    async def pause(self, seconds: float) -> None:
        """Give out no token for `seconds` from now; never shortens a pause."""
        ...

    async def lower(self, per_minute: float, burst: int) -> None:
        """From now on refill at most `per_minute` a minute and save up at most `burst`
        (BookStack's limit is below the configured one); never raises either."""
        ...


class LocalBudget:
    """The bucket in this process: `per_minute` tokens a minute, at most `burst` saved up."""

    def __init__(
        self, per_minute: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_minute = float(per_minute)
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._paused_until = -math.inf

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.per_minute / 60)
        self._updated = now

    async def take(self) -> float:
        now = self.clock()
        self._refill(now)
        if now < self._paused_until:
            return self._paused_until - now
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return 0.0
        return (1.0 - self._tokens) * 60 / self.per_minute

    async def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self.clock() + seconds)

    async def lower(self, per_minute: float, burst: int) -> None:
        # Account the tokens earned at the old rate before switching to the new one.
        self._refill(self.clock())
        self.per_minute = min(self.per_minute, float(per_minute))
        self.burst = min(self.burst, burst)
        self._tokens = min(self._tokens, float(self.burst))


class RateLimiter:
    """Async rate limiter: `per_minute` requests a minute, at most `burst` saved up.

    One instance per BookStack source, shared by every task using it. Waiters are served in
    arrival order: `asyncio.Lock` wakes its waiters FIFO and does not let a newcomer barge
    past them, and the task holding the lock is the only one waiting for a token. The tokens
    come from `budget` (LocalBudget unless given one that replicas share); what the limiter
    learns (a 429's pause, BookStack's lower limit) it applies here at once and passes on to
    the budget with the next `acquire`.
    """

    def __init__(
        self,
        per_minute: float,
        *,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        budget: SharedBudget | None = None,
    ) -> None:
        if not per_minute > 0 or math.isinf(per_minute):
            raise ValueError(f"per_minute must be a positive number, not {per_minute!r}")
        self.burst = default_burst(per_minute) if burst is None else burst
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.clock = clock
        self._sleep = sleep
        self._configured_per_minute = float(per_minute)
        self.per_minute = float(per_minute)
        self.budget: SharedBudget = budget or LocalBudget(self.per_minute, self.burst, clock=clock)
        self._paused_until = -math.inf
        # What the budget has not been told yet: a pause's deadline, a lower rate and burst.
        self._pending_pause: float | None = None
        self._pending_lower: tuple[float, int] | None = None
        # When a response showed the first hit of a server window (remaining == limit - 1);
        # that window resets at most WINDOW_SECONDS later.
        self._window_seen_at: float | None = None
        self._lock = asyncio.Lock()
        self.waits = 0
        self.waited_seconds = 0.0

    @property
    def paused_until(self) -> float:
        """The monotonic time before which nobody may send (-inf when not paused)."""
        return self._paused_until

    async def acquire(self) -> float:
        """Wait for a token (and for any pause to end); return the seconds waited."""
        start = self.clock()
        # Before queuing: the task that got a 429 comes straight back here, and the other
        # replicas must hear of the pause now, not once this task's turn comes.
        await self._tell_budget()
        # Queuing behind a task that is waiting for a token is waiting on the limiter too.
        waited = self._lock.locked()
        async with self._lock:
            while True:
                now = self.clock()
                if now < self._paused_until:
                    # This process knows of the pause already; no need to ask the budget.
                    delay = self._paused_until - now
                else:
                    delay = await self.budget.take()
                    if delay <= 0:
                        break
                waited = True
                await self._sleep(delay)
                await self._tell_budget()
        if not waited:
            return 0.0
        seconds = max(0.0, self.clock() - start)
        self.waits += 1
        self.waited_seconds += seconds
        return seconds

    async def _tell_budget(self) -> None:
        pause, self._pending_pause = self._pending_pause, None
        lower, self._pending_lower = self._pending_lower, None
        if pause is not None and (seconds := pause - self.clock()) > 0:
            await self.budget.pause(seconds)
        if lower is not None:
            await self.budget.lower(*lower)

    def pause_until(self, deadline: float) -> None:
        """Block every `acquire` until the monotonic time `deadline` (never shortens a pause).

        A 429 means the server's window is spent for all of us, not only for the task that
        happened to receive it, so the whole source waits: every task of this process at
        once, the other replicas from the next `acquire` on.
        """
        if deadline > self._paused_until:
            self._paused_until = deadline
            self._pending_pause = deadline

    def update_from_headers(
        self, remaining: int | None, limit: int | None, *, reset_at: float | None = None
    ) -> None:
        """Learn from X-RateLimit-Remaining / X-RateLimit-Limit (and a known reset time).

        - `limit` below our budget: BookStack's API_REQUESTS_PER_MIN is lower than what we
          were configured for, so slow down to fit `burst + per_minute` into its window
          instead of collecting a 429 every minute. Never raises the configured rate.
        - `remaining == 0`: the next request would be refused; pause until the window
          could have reset (`reset_at`, else the end of the window whose first hit we saw,
          else a whole window from now).
        """
        now = self.clock()
        if limit is not None and limit > 0:
            self._fit_limit(limit)
            if remaining is not None and remaining == limit - 1:
                self._window_seen_at = now
        if remaining is None or remaining > 0 or self._paused_until > now:
            return
        if reset_at is None:
            reset_at = now + WINDOW_SECONDS
            seen = self._window_seen_at
            if seen is not None and now - seen < WINDOW_SECONDS:
                reset_at = seen + WINDOW_SECONDS
        log.warning("bookstack.ratelimit_exhausted", wait=round(max(0.0, reset_at - now), 3))
        self.pause_until(reset_at)

    def _fit_limit(self, limit: int) -> None:
        burst = min(self.burst, default_burst(limit))
        per_minute = min(self._configured_per_minute, float(max(1, limit - burst)))
        if per_minute >= self.per_minute and burst >= self.burst:
            return
        log.warning(
            "bookstack.ratelimit_lowered",
            server_limit=limit,
            per_minute=per_minute,
            burst=burst,
        )
        self.per_minute = min(self.per_minute, per_minute)
        self.burst = burst
        self._pending_lower = (self.per_minute, self.burst)
