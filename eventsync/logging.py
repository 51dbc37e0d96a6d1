"""structlog set-up: console lines on a terminal, JSON lines otherwise, secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import quote, unquote

import structlog

REDACTED = "[redacted]"
MIN_SECRET = 6
# Whatever follows the webhook path is a secret, right or wrong (a near miss of the real one
# says too much), and however it is written: cut off, percent-encoded, with a NUL or a tab
# after it, inside the repr of a request line that aiohttp could not parse. Up to whitespace,
# which no request target contains. The route's own template stays readable.
_WEBHOOK_PATH = re.compile(r"(/webhooks/bookstack/)(\S+)", re.IGNORECASE)
_ROUTE_TEMPLATE = "{secret}"
# A quoted string (or bytes repr) within one line of an exception message.
_QUOTED = re.compile(r"b?'[^\n]*'|b?\"[^\n]*\"")

# The level configure_logging() set: hot paths ask `debug_enabled()` before building a debug
# line, since even a filtered call through a lazy module logger costs a bind.
_level = logging.INFO


def _spellings(secret: str) -> set[str]:
    """A secret as it can appear in text: itself, percent-encoded (either case of hex), and
    escaped as a str or bytes repr shows it (non-ASCII, quotes, backslashes)."""
    encoded = quote(secret, safe="")
    return {
        secret,
        encoded,
        re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), encoded),
        repr(secret)[1:-1],
        repr(secret.encode("utf-8", "surrogatepass"))[2:-1],
    }


def _mask_webhook_path(match: re.Match[str]) -> str:
    if match.group(2) == _ROUTE_TEMPLATE:
        return match.group(0)
    return match.group(1) + REDACTED


class _Redactor:
    """Replaces every known secret inside any string field, whatever put it there, and
    whatever follows the webhook path."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Replacing a very short value would mangle every log line while protecting nothing.
        self.raw = {s for s in secrets if len(s) >= MIN_SECRET}
        spellings = {v for s in self.raw for v in _spellings(s)}
        # Longest first: a secret that contains another is replaced whole.
        self.secrets = sorted(spellings, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        if "%" in value and self.raw:
            # Percent-encoded only in part ("%77hsec-…"): decoded, it shows.
            decoded = unquote(value)
            if any(secret in decoded for secret in self.raw):
                value = self.text(decoded)
        if "/" in value:
            value = _WEBHOOK_PATH.sub(_mask_webhook_path, value)
        return value

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        return value

    def __call__(
        self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        return {k: self._clean(v) for k, v in event_dict.items()}


# The redactor configure_logging() set up, for text that is printed rather than logged (the
# CLI's one-line errors).
_redactor = _Redactor(())


def redact(text: str) -> str:
    """`text` with every configured secret, and anything after the webhook path, redacted."""
    return _redactor.text(text)


class _BadRequestFilter(logging.Filter):
    """aiohttp logs a request it could not parse (or whose body broke off) as an error with
    a traceback, quoting the raw request line. It is the sender's fault, answered 400, and
    the line may hold the secret: one warning line instead, saying what was wrong without
    the bytes (the redactor still sees it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError
        from aiohttp.web_protocol import RequestPayloadError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError | RequestPayloadError):
            return True
        cause = exc.__cause__ if isinstance(exc, RequestPayloadError) else None
        detail = getattr(cause or exc, "message", None) or str(cause or exc)
        # Keep the prose; drop what it quotes of the request (and the caret under it).
        text = _QUOTED.sub("...", str(detail))
        words = [
            line.strip().rstrip(":")
            for line in text.splitlines()
            if line.strip() and not re.fullmatch(r"\s*[\^~]+\s*", line)
        ]
        reason = "; ".join(words) or type(exc).__name__
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        record.msg, record.args = "bad HTTP request from %s: %s", (remote or "unknown", reason)
        record.exc_info = None
        record.exc_text = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


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
    global _level, _redactor
    _level = getattr(logging, level.upper())
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    redactor = _redactor = _Redactor(secrets)
    lock = threading.RLock()
    writer = _LineWriter(stream, lock)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks become text before the redactor runs: an exception's message can quote
    # anything (aiohttp's quote the raw request line), and a renderer that formats the
    # exception itself would do so after redaction.
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            redactor,
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
            foreign_pre_chain=[
                *shared,
                structlog.stdlib.ExtraAdder(),
                structlog.stdlib.add_logger_name,
                structlog.processors.format_exc_info,
                redactor,
            ],
            processor=renderer,
        )
    )
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequestFilter) for f in server.filters):
        server.addFilter(_BadRequestFilter())
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
