"""A throwaway PostgreSQL cluster on 127.0.0.1, for tests and benchmarks.

It drives the server's own programs (initdb, pg_ctl, psql) and needs no driver. As root it runs
them as the `postgres` user, because initdb refuses to run as root. Set
`EVENTSYNC_TEST_POSTGRES` to the URL of a server you already run to use that one instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from eventsync.errors import EventsyncError

USER = "eventsync"


class PostgresUnavailable(EventsyncError):
    """No PostgreSQL server programs on this machine and no EVENTSYNC_TEST_POSTGRES."""


def _bindir() -> Path:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise PostgresUnavailable(
        "PostgreSQL's server programs are not installed (Debian: apt-get install postgresql), "
        "and EVENTSYNC_TEST_POSTGRES does not name a server"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(url: str, name: str) -> str:
    """`url` with its database name replaced by `name`."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(name), parts.query, ""))


class PostgresCluster:
    """A cluster of its own in a temporary folder, on a free port of 127.0.0.1."""

    def __init__(self, *, durable: bool = False) -> None:
        # Tests kill eventsync, never the server: without fsync a committed row still survives
        # any client's death. Benchmarks pass durable=True to measure real commits.
        self.durable = durable
        self.url = ""
        self._root: Path | None = None
        self._bin: Path | None = None
        self._counter = 0
        self._as: list[str] = []

    def start(self) -> str:
        existing = os.environ.get("EVENTSYNC_TEST_POSTGRES")
        if existing:
            self.url = existing
            return self.url
        self._bin = _bindir()
        self._root = Path(tempfile.mkdtemp(prefix="eventsync-pg-"))
        data = self._root / "data"
        password = secrets.token_hex(12)
        pwfile = self._root / "pw"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self._root, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run(
            "initdb",
            "-D",
            str(data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
        )
        port = _free_port()
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={port}",
            f"-c unix_socket_directories={self._root}",
            "-c max_connections=300",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(self._root / "log"),
            "-w",
            "-o",
            " ".join(options),
            "start",
        )
        self.url = f"postgresql://{USER}:{password}@127.0.0.1:{port}/postgres"
        return self.url

    def _run(self, program: str, *args: str) -> str:
        assert self._bin is not None
        done = subprocess.run(
            [*self._as, str(self._bin / program), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"{program} failed ({done.returncode}): {done.stderr.strip() or done.stdout}"
            )
        return done.stdout

    def psql(self, sql: str, database: str = "postgres") -> str:
        psql = (self._bin / "psql") if self._bin else Path(shutil.which("psql") or "psql")
        done = subprocess.run(
            [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql,
             with_database(self.url, database)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise PostgresUnavailable(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; its URL."""
        self._counter += 1
        name = f"{prefix}_{os.getpid()}_{self._counter}_{secrets.token_hex(3)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return with_database(self.url, name)

    def stop(self) -> None:
        if self._root is None:
            return
        if self._bin is not None:
            with contextlib.suppress(PostgresUnavailable):
                self._run("pg_ctl", "-D", str(self._root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self._root, ignore_errors=True)
        self._root = None

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
