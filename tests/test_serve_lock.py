"""One `serve` per SQLite file (store/serve_lock.py): the lock in-process and across processes.

The serve processes themselves (refused with one line, a restart after kill -9) are in
test_serve.py; here, the lock on its own, including a holder killed with kill -9."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eventsync.errors import ConfigError
from eventsync.store.serve_lock import Holder, ServeLock, ServeLocked, lock_path, serving

pytestmark = pytest.mark.timeout(30)

# A process that holds the lock until it is killed; it says so on stdout first.
HOLD = """
import sys, time
from pathlib import Path
from eventsync.store.serve_lock import ServeLock
lock = ServeLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_child(db: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_lock_on_the_same_database_is_refused_naming_the_holder(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    with ServeLock(db) as first:
        assert first.holder == serving(db)
        started = time.monotonic()
        with pytest.raises(ServeLocked) as refused:
            ServeLock(db).acquire()
        message = str(refused.value)
        assert isinstance(refused.value, ConfigError)  # exit code 2, one line
        assert "\n" not in message
        assert f"pid {os.getpid()} on host {socket.gethostname()} since " in message
        assert first.holder is not None and first.holder.since in message
        assert str(db) in message
        # It waits out a `status` probe, not a running serve.
        assert time.monotonic() - started < 5
    # Released: the next one takes it at once, and nobody serves meanwhile.
    assert serving(db) is None
    with ServeLock(db):
        assert serving(db) is not None


def test_other_databases_in_the_same_folder_are_not_locked(tmp_path: Path) -> None:
    with ServeLock(tmp_path / "a.db"), ServeLock(tmp_path / "b.db"):
        assert serving(tmp_path / "a.db") != serving(tmp_path / "c.db")


def test_a_holder_killed_with_kill_9_leaves_nothing_that_blocks(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    child = hold_in_child(db)
    try:
        with pytest.raises(ServeLocked, match=f"pid {child.pid} on host "):
            ServeLock(db).acquire()
        held = serving(db)
        assert held is not None and held.pid == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    # The file stays with the dead holder's text, and blocks nobody.
    assert Holder.parse(lock_path(db).read_text()) == held
    assert serving(db) is None
    started = time.monotonic()
    with ServeLock(db) as lock:
        assert time.monotonic() - started < 0.5  # at once: nothing to wait out
        assert lock.holder is not None and lock.holder.pid == os.getpid()
        assert serving(db) == lock.holder


def test_the_lock_file_is_private(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    with ServeLock(db):
        assert lock_path(db).stat().st_mode & 0o777 == 0o600


def test_a_lock_file_that_cannot_be_created_names_the_database(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"cannot open database .*EVENTSYNC_DATABASE"):
        ServeLock(blocker / "mirror.db").acquire()
