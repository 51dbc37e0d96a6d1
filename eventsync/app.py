"""The one composition root: the BookStack client, the store, the job queue, the writer
(apply), the reconciler, the handlers and the dispatcher, built from settings here and nowhere
else, and closed in order."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from eventsync.apply import Apply
from eventsync.bookstack.client import BookStackClient
from eventsync.bookstack.ratelimit import RateLimiter, default_burst
from eventsync.config import Settings
from eventsync.dispatch import UP_WINDOW, Dispatcher
from eventsync.handlers import Handlers
from eventsync.leadership import AlwaysLeader, Leadership
from eventsync.reconcile import Progress, Reconciler
from eventsync.store.base import is_postgres_url
from eventsync.store.mirror import Store, StoreError
from eventsync.store.queue import JobQueue


async def open_store(database: str | os.PathLike[str], schema: str = "eventsync") -> Store:
    """The store of EVENTSYNC_DATABASE: every store is opened here, so that the value alone
    can choose the backend. A file the OS refuses us (permissions, an immutable file, a
    parent that is a file) is said in one line naming it, like every other database
    problem."""
    try:
        return await Store.open(os.fspath(database), schema=schema)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path (from a TOML file)
        reason = getattr(exc, "strerror", None) or str(exc)
        raise StoreError(
            f"cannot open database {os.fspath(database)}: {reason} (EVENTSYNC_DATABASE)"
        ) from None


def make_client(settings: Settings, **overrides: Any) -> BookStackClient:
    """The BookStack client of the settings' source; `overrides` are client options (`check`
    gives up sooner than a sync would)."""
    settings.require("bookstack_url", "bookstack_token_id", "bookstack_token_secret")
    assert settings.bookstack_token_secret is not None
    options: dict[str, Any] = {
        "requests_per_minute": settings.requests_per_minute,
        "timeout": settings.http_timeout,
    }
    options.update(overrides)
    return BookStackClient(
        settings.base_url,
        settings.bookstack_token_id or "",
        settings.bookstack_token_secret.get_secret_value(),
        **options,
    )


class Options(TypedDict, total=False):
    """What App.build takes beyond settings: `on_plan`/`on_progress` follow a diff sync (the
    progress bar); `max_attempts`, `last_answer` and `up_window` are for tests that need a
    job to fail sooner or BookStack to seem up."""

    max_attempts: int
    on_plan: Callable[[int], None]
    on_progress: Progress
    last_answer: Callable[[], float]
    up_window: float


@dataclass
class Local:
    """What needs no BookStack: the mirror's store and its job queue (`status`,
    `dead-letters`)."""

    settings: Settings
    store: Store
    queue: JobQueue


@dataclass
class App(Local):
    """The whole graph of one BookStack source and one mirror."""

    client: BookStackClient
    apply: Apply
    reconciler: Reconciler
    handlers: Handlers
    dispatcher: Dispatcher

    @classmethod
    def build(
        cls,
        settings: Settings,
        client: BookStackClient,
        store: Store,
        *,
        max_attempts: int | None = None,
        on_plan: Callable[[int], None] | None = None,
        on_progress: Progress | None = None,
        last_answer: Callable[[], float] | None = None,
        up_window: float = UP_WINDOW,
    ) -> App:
        """Wire the parts over an open client and store (no I/O); the keywords are those of
        Options."""
        if max_attempts is None:
            queue = JobQueue(store)
        else:
            queue = JobQueue(store, max_attempts=max_attempts)
        apply = Apply(
            client,
            store,
            concurrency=settings.fetch_concurrency,
            attachment_content=settings.attachment_content,
        )
        reconciler = Reconciler(
            apply,
            concurrency=settings.fetch_concurrency,
            on_plan=on_plan,
            on_progress=on_progress,
        )
        # The handlers run `diff` jobs through the reconciler without importing it: it sits
        # upstream of them (DESIGN, suggested layout).
        handlers = Handlers(apply, queue, diff=reconciler)
        dispatcher = Dispatcher(
            queue,
            handlers,
            concurrency=settings.fetch_concurrency,
            last_answer=last_answer,
            up_window=up_window,
        )
        return cls(settings, store, queue, client, apply, reconciler, handlers, dispatcher)


@asynccontextmanager
async def open_local(settings: Settings) -> AsyncIterator[Local]:
    """The store and queue of the settings' mirror, for commands that never call BookStack
    (and so need none of its settings)."""
    async with await open_store(settings.database, settings.database_schema) as store:
        yield Local(settings, store, JobQueue(store))


@asynccontextmanager
async def open_app(
    settings: Settings, *, client: BookStackClient | None = None, **options: Unpack[Options]
) -> AsyncIterator[App]:
    """The graph from settings, open for the `async with` block; `client` replaces the one
    the settings describe (tests: a fake BookStack's, with short back-offs), and is closed
    with the rest."""
    async with AsyncExitStack() as stack:
        if client is None and is_postgres_url(settings.database):
            # Every process on one PostgreSQL mirror (replicas, `reconcile` from another host)
            # takes its requests from the one budget of the deployment: BookStack limits per
            # client address. The store first: it migrates the budget's table.
            settings.require("bookstack_url", "bookstack_token_id", "bookstack_token_secret")
            store = await stack.enter_async_context(
                await open_store(settings.database, settings.database_schema)
            )
            budget = await stack.enter_async_context(shared_budget(settings))
            limiter = RateLimiter(settings.requests_per_minute, burst=budget.burst, budget=budget)
            client = await stack.enter_async_context(make_client(settings, limiter=limiter))
        else:
            # The client first: a missing BookStack setting fails before the database file is
            # created. Closed in reverse: jobs still in flight are put back while the store is
            # open, then the store, then the client.
            client = await stack.enter_async_context(client or make_client(settings))
            store = await stack.enter_async_context(
                await open_store(settings.database, settings.database_schema)
            )
        app = App.build(settings, client, store, **options)
        stack.push_async_callback(app.dispatcher.close)
        yield app


@asynccontextmanager
async def shared_budget(settings: Settings) -> AsyncIterator[Any]:
    """The deployment's request budget, kept in the PostgreSQL mirror."""
    from eventsync.store.postgres.coordination import PostgresBudget

    burst = default_burst(settings.requests_per_minute)
    async with PostgresBudget(
        settings.database,
        schema=settings.database_schema,
        per_minute=settings.requests_per_minute,
        burst=burst,
    ) as budget:
        yield budget


@asynccontextmanager
async def open_serve(
    settings: Settings, holder: Any = None
) -> AsyncIterator[tuple[App, Leadership]]:
    """What `serve` runs: the graph and this replica's leadership. On a SQLite file the one
    serve leads (`holder`: the file's serve lock, which cli holds); on PostgreSQL the
    replicas elect one."""
    if not is_postgres_url(settings.database):
        from eventsync.store.serve_lock import Holder

        holder = holder or Holder.this_process()
        async with open_app(settings) as app:
            yield app, AlwaysLeader(holder.replica, holder.since)
        return
    from eventsync.store.postgres.coordination import PostgresLeadership

    async with open_app(settings) as app, PostgresLeadership(
        settings.database, schema=settings.database_schema
    ) as leadership:
        yield app, leadership
