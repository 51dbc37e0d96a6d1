"""systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING) over a unix datagram socket."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Self

import structlog

log = structlog.get_logger("eventsync.notify")

# systemd reads at most this many bytes of one notification (NOTIFY_BUFFER_MAX is 4096 in
# src/core/manager.c; a longer datagram is truncated there, so trim STATUS here instead).
MAX_DATAGRAM = 4096

HealthCheck = Callable[[], Awaitable[bool]] | Callable[[], bool]


def _socket_address(value: str) -> str | None:
    """The address to sendto() for a NOTIFY_SOCKET value, None when we cannot use it."""
    if value.startswith("@"):
        # Linux abstract namespace: systemd writes the leading NUL as '@'.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # Newer systemd also offers "vsock:CID:PORT" for VMs; we only ever run on the host.
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """systemd's watchdog timeout in seconds (WatchdogSec=), or None when it is off or not ours.

    Ping at half of it: systemd kills the service when a whole interval passes without one.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    # WATCHDOG_PID names the process systemd watches; a child that inherited the environment
    # (a subprocess we started) must not think it is the one expected to ping.
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


class Notifier:
    """Sends notifications to systemd; every method is a silent no-op without NOTIFY_SOCKET.

    Sending never raises and never blocks: a notification that cannot be delivered is logged
    and dropped, because losing a STATUS line must never take the service down.
    """

    def __init__(self, address: str | None, *, watchdog_timeout: float | None = None) -> None:
        self.address = address
        self.watchdog_timeout = watchdog_timeout
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (once, at start-up)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("notify socket not supported, notifications disabled", socket=raw)
        return cls(address, watchdog_timeout=watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of `KEY=value` lines; True when it was handed to the socket."""
        if self.address is None or not fields:
            return False
        # A newline would start a new (bogus) assignment in the datagram.
        lines = [f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()]
        data = "\n".join(lines).encode("utf-8", "replace")[:MAX_DATAGRAM]
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(data, self.address)
        except OSError as exc:
            # BlockingIOError (systemd not reading), ENOENT/ECONNREFUSED (socket gone, e.g.
            # the manager re-executing): the next notification simply tries again.
            log.warning("systemd notification failed", fields=sorted(fields), error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up finished: with Type=notify, systemd starts dependants only after this."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """A one-line status that `systemctl status eventsync` shows."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self) -> bool:
        # Type=notify-reload (systemd ≥ 253) needs MONOTONIC_USEC to match reload and READY;
        # older versions ignore the extra field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def _check(healthy: HealthCheck, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            result = healthy()
            if inspect.isawaitable(result):
                result = await result
            return bool(result)
    except TimeoutError:
        log.warning("health check timed out, withholding watchdog ping", timeout=timeout)
        return False
    except Exception:
        log.exception("health check failed, withholding watchdog ping")
        return False


async def watchdog_loop(notifier: Notifier, healthy: HealthCheck, interval: float) -> None:
    """Send WATCHDOG=1 every `interval` seconds while `healthy()` says so; runs until cancelled.

    Pass half of `watchdog_interval()`. When the check fails (a wedged writer, a dead task)
    the pings stop and systemd restarts the service after WatchdogSec: a restart is the
    recovery, so a failing check only logs and skips the ping.
    """
    was_healthy = True
    while True:
        # A check that hangs counts as unhealthy rather than silently stalling this loop.
        ok = await _check(healthy, timeout=interval)
        if ok:
            notifier.watchdog()
            if not was_healthy:
                log.info("healthy again, watchdog pings resumed")
        elif was_healthy:
            log.error("unhealthy, watchdog pings stopped; systemd will restart the service")
        was_healthy = ok
        await asyncio.sleep(interval)
