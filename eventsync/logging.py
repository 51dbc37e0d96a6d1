"""structlog set-up: console lines on a terminal, JSON lines otherwise, secrets redacted."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"
MIN_SECRET = 6

# The level configure_logging() set: hot paths ask `debug_enabled()` before building a debug
# line, since even a filtered call through a lazy module logger costs a bind.
_level = logging.INFO


class _Redactor:
    """Replaces every known secret inside any string field, whatever put it there."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Replacing a very short value would mangle every log line while protecting nothing.
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        return value

    def __call__(
        self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self.secrets:
            return event_dict
        return {k: self._clean(v) for k, v in event_dict.items()}


class _LineWriter:
    """structlog's output: each line written whole, under the lock the stdlib handler uses
    too. (structlog's PrintLogger writes the line and its newline as two writes, so a line
    from another thread, such as aiosqlite's, can land between them.)"""

    def __init__(self, stream: Any, lock: threading.RLock) -> None:
        self._stream = stream
        self._lock = lock

    def msg(self, message: str) -> None:
        with self._lock:
            self._stream.write(message + "\n")
            self._stream.flush()

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def configure_logging(
    fmt: str = "auto", level: str = "info", secrets: Iterable[str] = (), stream: Any = None
) -> None:
    """Configure structlog and the stdlib root logger (aiohttp logs through it)."""
    global _level
    _level = getattr(logging, level.upper())
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    redactor = _Redactor(secrets)
    lock = threading.RLock()
    writer = _LineWriter(stream, lock)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        redactor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            *shared[:3],
            redactor,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *_args: writer,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.lock = lock  # one lock for both writers: whole lines, never interleaved
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name], processor=renderer
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # aiosqlite logs every statement at debug: noise even when debugging eventsync.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))


def debug_enabled() -> bool:
    return _level <= logging.DEBUG


def get_logger(name: str) -> Any:
    """A logger that names its module in every line (`module` field)."""
    # Lazy: bound on first use, so configure_logging() applies to module-level loggers too.
    return structlog.get_logger(module=name)
