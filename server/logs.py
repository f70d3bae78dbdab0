"""Structured logs: text or JSON lines, each line of a request carrying its request id.

Log messages hold untrusted values (a request path, a name from a token). A record is always
exactly one line: the text format escapes every character that could end a line, fake one, or
reorder what a reader sees (controls, U+2028/2029, bidi overrides); the JSON format escapes the
same inside its strings."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
access_log = logging.getLogger("telemed.access")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()  # read back by the formatters
        return True


# C0 and C1 controls, DEL, line and paragraph separators, bidi and other invisible format
# characters, lone surrogates (which would also fail the UTF-8 write of the whole line).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff]"
)
# json.dumps already escapes C0 controls; these it writes as they are.
_UNSAFE_IN_JSON = re.compile(
    "[\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff]"
)


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escape_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def escape_untrusted(text: str) -> str:
    """`text` on one line, every unsafe character as a visible \\xNN or \\uNNNN escape."""
    return _UNSAFE.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """The text format: a record's message escaped onto one line; a traceback stays multi-line,
    but indented and escaped within its lines, so that only a record starts a line at column 0
    (an exception message holding a newline cannot pass for a record)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_untrusted(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        return "\n".join("  " + escape_untrusted(line) for line in text.split("\n"))

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("  " + escape_untrusted(line) for line in stack_info.split("\n"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        for key in ("method", "path", "status", "duration_ms", "remote"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        # Escaped inside the JSON strings, where alone these characters can occur.
        return _UNSAFE_IN_JSON.sub(_json_escape_char, json.dumps(line, ensure_ascii=False))


# A playback link carries its grant in the query (a <video> cannot send a header); /join may
# carry an invite code there.
_QUERY_TOKEN = re.compile(r"([?&](?:token|code)=)[^&\s\"]*")


class _QueryTokenRedactor(logging.Filter):
    """aiohttp's access log writes the request line, query included; wherever it is enabled
    (test servers, gunicorn's aiohttp worker) a playback link's token would be in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _QUERY_TOKEN.sub(r"\1[redacted]", record.msg)
        line = getattr(record, "first_request_line", None)
        if isinstance(line, str):
            record.first_request_line = _QUERY_TOKEN.sub(r"\1[redacted]", line)
        return True


def redact_aiohttp_access_log() -> None:
    """Keep link tokens out of aiohttp's own access log (ours logs the path alone). Once per
    process: the logger is aiohttp's, shared by every app."""
    aiohttp_access = logging.getLogger("aiohttp.access")
    if not any(isinstance(f, _QueryTokenRedactor) for f in aiohttp_access.filters):
        aiohttp_access.addFilter(_QueryTokenRedactor())


def configure_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@web.middleware
async def request_id_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Tags the request's log lines and response with an id. Only method and path are logged:
    tokens travel in headers, which are never logged."""
    incoming = request.headers.get("X-Request-Id", "")
    # Echoed in a response header and every log line: printable ASCII, or a new id.
    sane = 0 < len(incoming) <= 64 and incoming.isascii() and incoming.isprintable()
    request_id = incoming if sane else uuid.uuid4().hex
    token = request_id_var.set(request_id)
    started = time.perf_counter()
    try:
        try:
            response = await handler(request)
        except web.HTTPException as raised:  # redirects and the like travel as exceptions
            _tag(request, raised, request_id, started)
            raise
        _tag(request, response, request_id, started)
        return response
    finally:
        request_id_var.reset(token)


def _tag(
    request: web.Request, response: web.StreamResponse, request_id: str, started: float
) -> None:
    response.headers["X-Request-Id"] = request_id
    access_log.info(
        "%s %s %s",
        request.method,
        request.path,
        response.status,
        extra={
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            "remote": request.remote,
        },
    )
