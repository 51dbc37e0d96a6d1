"""sd_notify against a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from eventsync.notify import Notifier, watchdog_interval, watchdog_loop

Listener = Callable[[str], socket.socket]


@pytest.fixture
def listen() -> Iterator[Listener]:
    """Factory: bind a datagram socket at `address` ('\\0…' for abstract) like systemd does."""
    opened: list[socket.socket] = []

    def make(address: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(address)
        sock.settimeout(2)
        opened.append(sock)
        return sock

    yield make
    for sock in opened:
        sock.close()


@pytest.fixture
def systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listen: Listener
) -> Iterator[socket.socket]:
    """A socket bound in tmp_path, named by NOTIFY_SOCKET."""
    # sun_path holds 108 bytes; pytest's tmp_path can be long, so fall back to a short name.
    path = tmp_path / "notify"
    if len(os.fsencode(path)) >= 100:
        path = Path("/tmp") / f"eventsync-notify-{uuid.uuid4().hex[:12]}"
    sock = listen(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(8192))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2)


def test_sends_exact_datagrams(systemd: socket.socket) -> None:
    notifier = Notifier.from_env()
    assert notifier.enabled
    assert notifier.ready()
    assert systemd.recv(4096) == b"READY=1"
    assert notifier.status("syncing: 120/500 pages")
    assert systemd.recv(4096) == b"STATUS=syncing: 120/500 pages"
    assert notifier.watchdog()
    assert systemd.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert systemd.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_combined_fields_and_newlines(systemd: socket.socket) -> None:
    notifier = Notifier.from_env()
    notifier.ready(status="ready")
    assert systemd.recv(4096) == b"READY=1\nSTATUS=ready"
    # A newline inside a value would smuggle in another assignment (e.g. READY=1).
    notifier.status("line one\nREADY=1")
    assert systemd.recv(4096) == b"STATUS=line one READY=1"
    notifier.stopping(status="draining")
    assert systemd.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    notifier.reloading()
    reloading = systemd.recv(4096).split(b"\n")
    assert reloading[0] == b"RELOADING=1"
    assert reloading[1].startswith(b"MONOTONIC_USEC=")
    assert int(reloading[1].partition(b"=")[2]) > 0
    notifier.close()


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch, listen: Listener) -> None:
    name = f"eventsync-test-{uuid.uuid4().hex}"
    sock = listen("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    notifier = Notifier.from_env()
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.close()


def test_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_env()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    notifier.close()


def test_unsupported_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    notifier = Notifier.from_env()
    assert not notifier.enabled
    assert not notifier.ready()


def test_delivery_errors_are_logged_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.enabled
    assert not notifier.ready()  # ENOENT: logged and dropped
    notifier.close()


def test_full_socket_does_not_block(systemd: socket.socket) -> None:
    # systemd not reading: the kernel queue fills and sendto would block; it must not.
    notifier = Notifier.from_env()
    results = [notifier.status("x" * 1000) for _ in range(5000)]
    assert results[0]
    assert not all(results)
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: float | None
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for key, val in env.items():
        monkeypatch.setenv(key, val.format(pid=os.getpid(), other=os.getpid() + 1))
    assert watchdog_interval() == expected
    assert Notifier.from_env().watchdog_timeout == expected


async def test_watchdog_loop_pings_only_while_healthy(systemd: socket.socket) -> None:
    notifier = Notifier.from_env()
    # Healthy twice, then wedged: the pings must stop so systemd restarts us.
    states = iter([True, True, False, False, False])
    done = asyncio.Event()

    def healthy() -> bool:
        state = next(states, None)
        if state is None:
            done.set()
            return False
        return state

    task = asyncio.create_task(watchdog_loop(notifier, healthy, 0.01))
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert drain(systemd) == [b"WATCHDOG=1", b"WATCHDOG=1"]
    notifier.close()


async def test_watchdog_loop_async_check_recovers_and_failures_count_as_unhealthy(
    systemd: socket.socket,
) -> None:
    notifier = Notifier.from_env()
    calls = 0
    done = asyncio.Event()

    async def healthy() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            return True
        if calls == 2:
            raise RuntimeError("database is locked")
        if calls == 3:
            await asyncio.sleep(10)  # hangs: must time out, not stall the loop
        if calls == 4:
            return True
        done.set()
        return False

    task = asyncio.create_task(watchdog_loop(notifier, healthy, 0.05))
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Pings for calls 1 and 4 only.
    assert drain(systemd) == [b"WATCHDOG=1", b"WATCHDOG=1"]
    notifier.close()
