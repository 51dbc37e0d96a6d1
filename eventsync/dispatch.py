"""The dispatcher: leases due jobs (one per entity at a time) and runs their handlers."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

from eventsync.aio import wait_any
from eventsync.errors import AuthError, BookStackError, EventsyncError, PermanentError, RetryLater
from eventsync.handlers import Handlers, Settle
from eventsync.logging import get_logger
from eventsync.store.base import LEASE_TTL, Job, JobQueue

log = get_logger("eventsync.dispatch")

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
IDLE_WAIT = 1.0  # upper bound on sleeping while jobs may become due
# Renew this worker's leases, and release those of dead workers, this often (LEASE_TTL/4).
MAINTAIN_EVERY = LEASE_TTL / 4
# A transient failure counts towards dead-lettering only if BookStack answered something
# within this many seconds: then this job is failing, not BookStack. During an outage jobs
# wait (at the capped back-off) however long it lasts, and none is dead-lettered for it.
UP_WINDOW = 60.0
# ...but a job failing this long counts its attempts whatever else BookStack does: with no
# other traffic (no audit access, the sweep off) a page BookStack cannot render would
# otherwise be retried forever (guarantee 10 says bounded).
PATIENCE = 3600.0


def backoff(attempt: int) -> float:
    """Exponential back-off with full jitter, capped."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempt)))


class Dispatcher:
    def __init__(
        self,
        queue: JobQueue,
        handlers: Handlers,
        *,
        concurrency: int = 8,
        on_result: Callable[[Job, str, float], None] | None = None,
        last_answer: Callable[[], float] | None = None,
        up_window: float = UP_WINDOW,
    ) -> None:
        self.queue = queue
        self.handlers = handlers
        # When BookStack last answered anything (the client's stats): tells an outage from
        # a job that fails on its own.
        self._last_answer = last_answer or (lambda: handlers.client.stats.last_answer_at)
        # While BookStack rejects the token no job can succeed: none is leased meanwhile.
        self._token = handlers.client.token
        self._up_window = up_window
        self._maintained = time.monotonic()
        self.concurrency = concurrency
        # Told of every job's outcome (serve's metrics; set by whoever counts them).
        self.on_result = on_result
        self._wake = asyncio.Event()
        self._running: dict[asyncio.Task[None], Job] = {}
        self.done = 0
        self.retried = 0
        self.dead = 0
        self.settling = 0

    def wake(self) -> None:
        """New work was committed: look for due jobs now rather than at the next tick."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def run(self, stop: asyncio.Event, grace: float = 10.0) -> None:
        """Work until `stop` is set; then finish in-flight jobs within `grace` seconds and put
        back (unleased, untouched) whatever did not finish."""
        failures = 0
        try:
            while not stop.is_set():
                try:
                    await self._maintain()
                    await self._fill()
                    await self._idle(stop)
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The database (locked past its timeout, disk full): keep the jobs we
                    # hold, back off, try again; one bad moment must not stop the service.
                    failures += 1
                    log.exception("dispatcher loop failed; retrying", failures=failures)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=backoff(failures) + 0.1)
        finally:
            await self._shutdown(grace)

    async def _maintain(self, force: bool = False) -> None:
        """Renew our leases and free those of dead workers (another process's kill -9)."""
        if not force and time.monotonic() - self._maintained < MAINTAIN_EVERY:
            return
        self._maintained = time.monotonic()
        await self.queue.renew(self._running.values())
        released = await self.queue.recover()
        if released:
            log.info("leases of a stopped worker released", jobs=released)
            self._wake.set()

    async def drain(self, timeout: float | None = None) -> bool:
        """Run until no job is pending (for `reconcile` and tests). True if drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            await self._maintain()
            await self._fill()
            if not self._running:
                if self._token.rejected is not None:
                    # Nobody probes the token here (`reconcile` is a one-shot command): say
                    # so rather than wait for ever. The jobs stay queued, attempts unspent.
                    raise AuthError(
                        f"jobs cannot run: BookStack rejects the API token ({self._token.rejected})"
                    )
                if await self.queue.depth() == 0:
                    return True
                due = await self.queue.next_due()
                wait = IDLE_WAIT if due is None else max(0.0, min(IDLE_WAIT, due - time.time()))
                if deadline is not None and time.monotonic() + wait > deadline:
                    return False
                await asyncio.sleep(wait)
                continue
            if deadline is not None and time.monotonic() > deadline:
                await self._shutdown(0)
                return False
            await asyncio.wait(
                list(self._running), return_when=asyncio.FIRST_COMPLETED, timeout=1.0
            )

    async def _fill(self) -> None:
        free = self.concurrency - len(self._running)
        if free <= 0 or self._token.rejected is not None:
            return
        for job in await self.queue.lease(free):
            task = asyncio.create_task(self._process(job), name=f"job {job.key}")
            self._running[task] = job
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._wake.set()

    async def _idle(self, stop: asyncio.Event) -> None:
        if self._token.rejected is not None:
            # Due jobs must wait for the token (the service probes it), not spin the loop;
            # wake up in time to renew the leases of anything still finishing.
            await wait_any(self._token.working, stop, timeout=MAINTAIN_EVERY)
            return
        # Cleared before looking, so a job that ends or an event committed from here on
        # still wakes the wait below.
        self._wake.clear()
        if len(self._running) >= self.concurrency:
            # Every slot is taken: nothing can be leased until one frees, and its end sets
            # _wake. (Waiting on due jobs here would return at once and spin the loop.)
            await wait_any(self._wake, stop, timeout=IDLE_WAIT)
            return
        due = await self.queue.next_due()
        timeout = IDLE_WAIT if due is None else max(0.0, min(IDLE_WAIT, due - time.time()))
        if timeout <= 0:
            return
        await wait_any(self._wake, stop, timeout=timeout)

    async def _process(self, job: Job) -> None:
        started = time.monotonic()
        bound = log.bind(
            entity=job.key,
            # structlog's `event` is the message: the BookStack event type is `activity`.
            activity=job.last_event,
            source=job.sources,
            hints=sorted(job.hints),
            attempt=job.attempts + 1,
        )
        try:
            outcome = await self.handlers.run(job)
        except asyncio.CancelledError:
            raise
        except Settle as exc:
            self.settling += 1
            await self.queue.retry(job, str(exc), exc.delay)
            bound.info("job settling", outcome="settling", reason=str(exc), delay=exc.delay)
            self._report(job, "settling", started)
            return
        except AuthError as exc:
            # Not this job's failure: back in the queue as it was, its attempt not counted,
            # to run once the token works again (the client logged the refusal, once).
            await self._put_back(job, f"{type(exc).__name__}: {exc}", bound)
            bound.info("job waits for the API token", outcome="paused")
            self._report(job, "paused", started)
            return
        except PermanentError as exc:
            # 400, 403, 404 that is not "gone", 422: the same request gets the same answer.
            await self._failed(job, exc, bound, started, transient=False, final=True)
            return
        except (RetryLater, BookStackError, EventsyncError) as exc:
            await self._failed(job, exc, bound, started, transient=True)
            return
        except Exception as exc:  # a bug or an unexpected payload: must not block the queue
            bound.exception("job crashed")
            await self._failed(job, exc, bound, started, transient=False)
            return
        try:
            await self.queue.done(job)
        except Exception:
            # The work is done and written; only its bookkeeping failed. Let go of the job
            # (a later run of it costs a read and changes nothing).
            bound.exception("could not finish the job; it will run again")
            await self._release(job, bound)
            return
        self.done += 1
        bound.info("job done", outcome=outcome, seconds=round(time.monotonic() - started, 3))
        self._report(job, "done", started)

    async def _failed(
        self,
        job: Job,
        exc: BaseException,
        bound: Any,
        started: float,
        *,
        transient: bool,
        final: bool = False,
    ) -> None:
        delay = getattr(exc, "delay", None) if transient else None
        delay = max(delay or 0.0, backoff(job.attempts))
        error = f"{type(exc).__name__}: {exc}"
        # BookStack silent for a while: an outage, not this job's fault; it waits it out.
        now = time.time()
        count = (
            not transient
            or now - self._last_answer() < self._up_window
            or now - job.first_seen > PATIENCE
        )
        try:
            kept = await self.queue.retry(job, error, delay, count=count, final=final)
        except Exception:
            bound.exception("could not record a failed job; it will run again")
            await self._release(job, bound)
            return
        if kept:
            self.retried += 1
            bound.warning(
                "job failed, will retry", outcome="retry", error=error, delay=round(delay, 2)
            )
            self._report(job, "retried", started)
        else:
            self.dead += 1
            bound.error("job dead-lettered", outcome="dead-lettered", error=error)
            self._report(job, "dead_lettered", started)

    async def _put_back(self, job: Job, error: str, bound: Any) -> None:
        try:
            await self.queue.retry(job, error, 0.0, count=False)
        except Exception:
            bound.exception("could not put a job back; it will run again")
            await self._release(job, bound)

    async def _release(self, job: Job, bound: Any) -> None:
        """Last resort after a failed write: unlease the job (or, failing that too, leave it
        to lease recovery) and say so."""
        try:
            await self.queue.release([job])
        except Exception:
            bound.exception("could not release the job; lease recovery will free it")

    def _report(self, job: Job, outcome: str, started: float) -> None:
        if self.on_result is not None:
            self.on_result(job, outcome, time.monotonic() - started)

    async def close(self, grace: float = 0.0) -> None:
        """Put back what is still in flight (a `drain` cut short by an error), before the
        store it would write to closes. Nothing to do after `run` or a finished `drain`."""
        await self._shutdown(grace)

    async def _shutdown(self, grace: float) -> None:
        if not self._running:
            return
        tasks = list(self._running)
        _, pending = await asyncio.wait(tasks, timeout=grace)
        held = {t: self._running[t] for t in pending if t in self._running}
        jobs = list(held.values())
        for task in pending:
            task.cancel()
        for task in pending:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                job = held.get(task)
                log.exception("in-flight job failed while stopping", job=job and job.key)
        if jobs:
            await self.queue.release(jobs)
            log.info("in-flight jobs put back", jobs=len(jobs))
