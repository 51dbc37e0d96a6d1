"""One `serve` per SQLite file: an OS lock on a file beside the database, gone with its process.

The lock is `flock` on `<database>.serve.lock`. The kernel drops it when the process ends, however
it ends, so a serve killed with kill -9 leaves nothing that blocks the next one: the file itself
stays, with the last holder's pid, host and start time in it, but only a held lock refuses a
start, and the text is read only to name the holder in the refusal. The other commands
(`reconcile`, `export`, `status`, ...) never take it: they are safe beside a running serve.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from eventsync.errors import ConfigError

SUFFIX = ".serve.lock"
# A starting serve tries this long before it refuses: `serving()` (for `status`) holds the lock
# shared for a moment to see whether anyone serves, and must not make a start fail.
CONTENDED_WAIT = 1.0
_RETRY = 0.05
# The holder writes its text right after it takes the lock; a reader that comes in between
# sees an empty file and looks again this long before naming nobody.
_TEXT_WAIT = 0.5


class ServeLocked(ConfigError):
    """Another `eventsync serve` runs on this SQLite database (one serve per SQLite file)."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) the lock: the serve process."""

    pid: int
    host: str
    since: str  # when it took the lock, ISO 8601 UTC

    @property
    def replica(self) -> str:
        """The replica id, as PostgreSQL replicas name themselves: host:pid."""
        return f"{self.host}:{self.pid}"

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.since}"

    def text(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "since": self.since}) + "\n"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["since"]))
        except (ValueError, TypeError, KeyError):
            return None

    @classmethod
    def this_process(cls) -> Holder:
        since = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return cls(os.getpid(), socket.gethostname(), since)


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + SUFFIX)


def _read_holder(fd: int) -> Holder | None:
    deadline = time.monotonic() + _TEXT_WAIT
    while True:
        holder = Holder.parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if holder is not None or time.monotonic() >= deadline:
            return holder
        time.sleep(_RETRY)


class ServeLock:
    """Held by `serve` for as long as it runs on `database`: `with ServeLock(db):`.

    `acquire` raises ServeLocked (a ConfigError: exit code 2, one line) naming the running
    serve when another process holds it.
    """

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = lock_path(database)
        self.holder: Holder | None = None
        self._fd: int | None = None

    def acquire(self) -> Holder:
        if self._fd is not None:
            raise RuntimeError("the serve lock is held already")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # 0600 like the database: the lock's text is harmless, but every file of the
            # mirror is its owner's alone (DESIGN guarantee 12).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot open database {self.database}: cannot create {self.path.name}: "
                f"{exc.strerror or exc} (EVENTSYNC_DATABASE)"
            ) from None
        deadline = time.monotonic() + CONTENDED_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    running = _read_holder(fd)
                    os.close(fd)
                    who = running.describe() if running is not None else "another process"
                    raise ServeLocked(
                        f"database {self.database} is in use by another eventsync serve "
                        f"({who}): one serve per SQLite file; stop that one first, or use "
                        "PostgreSQL to run replicas"
                    ) from None
                time.sleep(_RETRY)
            except OSError as exc:
                os.close(fd)
                raise ConfigError(
                    f"cannot lock database {self.database} ({self.path.name}): "
                    f"{exc.strerror or exc} (EVENTSYNC_DATABASE)"
                ) from None
        holder = Holder.this_process()
        data = holder.text().encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        self.holder = holder
        return holder

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Emptied before the lock goes, so a file without a lock names nobody; the file stays:
        # removing it would let a newcomer lock a new file while a third process locks the
        # old one it had opened.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the lock
        self.holder = None

    def __enter__(self) -> ServeLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def serving(database: Path) -> Holder | None:
    """The serve running on `database` now, or None: for `status`, from any process.

    It takes the lock shared without waiting: refused means a serve holds it. Held shared for
    a moment only; a serve starting meanwhile retries for CONTENDED_WAIT.
    """
    try:
        fd = os.open(lock_path(database), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no serve has ever run on it (or we may not read it)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or Holder(0, "?", "?")
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
