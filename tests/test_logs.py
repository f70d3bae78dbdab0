"""Structured logs: the JSON formatter, configure_logging, and the request id middleware."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from pytest_aiohttp import AiohttpClient

from server.api.problems import problem_middleware
from server.logs import JsonFormatter, configure_logging, request_id_middleware, request_id_var

HEX_ID = re.compile(r"^[0-9a-f]{32}$")
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJsb2ctdGVzdCJ9.c2lnbmF0dXJlLW5vdC1pbi1sb2dz"
handler_log = logging.getLogger("telemed.test.handler")


# --- helpers -----------------------------------------------------------------------------


def _record(
    msg: str = "hello %s",
    args: tuple[object, ...] = ("world",),
    *,
    level: int = logging.WARNING,
    name: str = "telemed.test",
    extra: dict[str, Any] | None = None,
    exc_info: bool = False,
) -> logging.LogRecord:
    info = sys.exc_info() if exc_info else None
    return logging.getLogger(name).makeRecord(
        name, level, __file__, 1, msg, args, info, extra=extra
    )


@contextmanager
def configured_logging(fmt: str, level: str = "INFO") -> Iterator[io.StringIO]:
    """configure_logging() as the CLI calls it, its output captured; the root logger restored.

    Set up and torn down inside one test phase, so pytest's own handlers come back intact."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buffer = io.StringIO()
    try:
        configure_logging(fmt, level)
        (handler,) = root.handlers
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buffer)
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def _json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def _app(*middlewares: Any) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        handler_log.warning("inside handler for %s", request.path)
        return web.json_response({"request_id": request_id_var.get()})

    async def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound("/hello")

    app = web.Application(middlewares=list(middlewares or [request_id_middleware]))
    app.router.add_get("/hello", hello)
    app.router.add_get("/moved", moved)
    return app


# --- JsonFormatter -----------------------------------------------------------------------


def test_json_formatter_emits_the_base_fields() -> None:
    before = datetime.now(UTC)
    line = JsonFormatter().format(_record())
    after = datetime.now(UTC)

    data = json.loads(line)
    assert set(data) == {"ts", "level", "logger", "msg"}
    assert data["level"] == "warning"
    assert data["logger"] == "telemed.test"
    assert data["msg"] == "hello world"
    ts = datetime.fromisoformat(data["ts"])
    assert ts.utcoffset() == timedelta(0)
    assert before - timedelta(milliseconds=1) <= ts <= after
    assert "\n" not in line


def test_json_formatter_adds_request_id_when_set() -> None:
    record = _record(extra={"request_id": "req-42"})

    data = json.loads(JsonFormatter().format(record))

    assert data["request_id"] == "req-42"


@pytest.mark.parametrize("request_id", [None, ""])
def test_json_formatter_omits_an_unset_request_id(request_id: str | None) -> None:
    data = json.loads(JsonFormatter().format(_record(extra={"request_id": request_id})))

    assert "request_id" not in data


def test_json_formatter_carries_access_fields() -> None:
    extra = {
        "method": "GET",
        "path": "/api/v1/consultations",
        "status": 200,
        "duration_ms": 1.25,
        "remote": "10.0.0.7",
        "unlisted": "not copied",
    }

    data = json.loads(JsonFormatter().format(_record("GET /x 200", (), extra=extra)))

    assert {k: data[k] for k in ("method", "path", "status", "duration_ms", "remote")} == {
        "method": "GET",
        "path": "/api/v1/consultations",
        "status": 200,
        "duration_ms": 1.25,
        "remote": "10.0.0.7",
    }
    assert "unlisted" not in data


def test_json_formatter_keeps_non_ascii_and_escapes_newlines() -> None:
    line = JsonFormatter().format(_record("会诊 %s\n第二行", ("王村医",)))

    assert "王村医" in line
    assert "\n" not in line
    assert json.loads(line)["msg"] == "会诊 王村医\n第二行"


def test_json_formatter_includes_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed", (), level=logging.ERROR, exc_info=True)

    data = json.loads(JsonFormatter().format(record))

    assert data["level"] == "error"
    assert data["msg"] == "failed"
    assert data["exc"].startswith("Traceback (most recent call last):")
    assert data["exc"].endswith("ValueError: boom")


# --- configure_logging -------------------------------------------------------------------


def test_configure_logging_json_tags_lines_with_the_request_id() -> None:
    with configured_logging("json", "debug") as out:
        assert logging.getLogger().level == logging.DEBUG
        handler_log.debug("outside")
        reset = request_id_var.set("rid-1")
        try:
            handler_log.info("inside %d", 7)
        finally:
            request_id_var.reset(reset)

    outside, inside = _json_lines(out)
    assert outside["msg"] == "outside"
    assert outside["level"] == "debug"
    assert "request_id" not in outside
    assert inside["msg"] == "inside 7"
    assert inside["request_id"] == "rid-1"
    assert inside["logger"] == "telemed.test.handler"


def test_configure_logging_text_shows_the_request_id() -> None:
    with configured_logging("text", "info") as out:
        handler_log.debug("filtered out by level")
        reset = request_id_var.set("rid-2")
        try:
            handler_log.warning("plain %s", "text")
        finally:
            request_id_var.reset(reset)

    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" WARNING telemed.test.handler [rid-2] plain text")


# Each can end a line, fake one, hide text or reorder what a reader sees.
UNSAFE = ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\u202e", "\u2066"]


@pytest.mark.parametrize("char", UNSAFE, ids=[f"U+{ord(c):04X}" for c in UNSAFE])
def test_configure_logging_text_escapes_every_unsafe_character(char: str) -> None:
    with configured_logging("text", "info") as out:
        handler_log.warning("path %s", f"/web/{char}2026-01-01 INFO forged")

    (line,) = out.getvalue().splitlines()
    assert char not in out.getvalue().removesuffix("\n")
    code = ord(char)
    escape = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    assert line.endswith(
        f" WARNING telemed.test.handler [None] path /web/{escape}2026-01-01 INFO forged"
    )


def test_configure_logging_text_keeps_readable_text_and_tracebacks() -> None:
    with configured_logging("text", "info") as out:
        try:
            raise ValueError("boom")
        except ValueError:
            handler_log.exception("会诊 %s", "王村医")

    first, *rest = out.getvalue().splitlines()
    assert first.endswith("会诊 王村医")
    assert rest[0] == "  Traceback (most recent call last):"
    assert rest[-1] == "  ValueError: boom"


def test_configure_logging_text_keeps_an_exception_message_from_starting_a_line() -> None:
    with configured_logging("text", "info") as out:
        try:
            raise ValueError("x\n2026-01-01 00:00:00,000 INFO telemed.access [-] GET / 200\u2028")
        except ValueError:
            handler_log.exception("lookup failed")

    first, *rest = out.getvalue().splitlines()
    assert first.endswith(" ERROR telemed.test.handler [None] lookup failed")
    # Every line of the traceback is indented: none can pass for a record of its own.
    assert rest and all(line.startswith("  ") for line in rest), rest
    assert "\u2028" not in out.getvalue()


@pytest.mark.parametrize("char", [*UNSAFE, "\udcff"], ids=lambda c: f"U+{ord(c):04X}")
def test_json_formatter_escapes_what_json_dumps_leaves_raw(char: str) -> None:
    line = JsonFormatter().format(_record("name %s", (f"a{char}b",)))

    assert char not in line
    assert json.loads(line)["msg"] == f"name a{char}b"
    # The whole line can be written as UTF-8 (a lone surrogate could not).
    line.encode()


def test_configure_logging_replaces_previous_handlers() -> None:
    with configured_logging("json"):
        configure_logging("json", "INFO")
        assert len(logging.getLogger().handlers) == 1


# --- request_id_middleware ---------------------------------------------------------------


async def test_response_carries_a_generated_request_id(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(_app())

    first = await client.get("/hello")
    second = await client.get("/hello")

    assert first.status == 200
    first_id = first.headers["X-Request-Id"]
    assert HEX_ID.match(first_id)
    # The handler sees the same id as the response carries.
    assert await first.json() == {"request_id": first_id}
    assert HEX_ID.match(second.headers["X-Request-Id"])
    assert second.headers["X-Request-Id"] != first_id


@pytest.mark.parametrize("incoming", ["req-abc.123", "0f" * 32, "client/42 retry=1"])
async def test_sane_incoming_request_id_is_echoed(
    aiohttp_client: AiohttpClient, incoming: str
) -> None:
    client = await aiohttp_client(_app())

    response = await client.get("/hello", headers={"X-Request-Id": incoming})

    assert response.headers["X-Request-Id"] == incoming
    assert await response.json() == {"request_id": incoming}


@pytest.mark.parametrize(
    "incoming",
    ["x" * 65, "a\tb", ""],
    ids=["overlong", "tab", "empty"],
)
async def test_unusable_incoming_request_id_is_replaced(
    aiohttp_client: AiohttpClient, incoming: str
) -> None:
    client = await aiohttp_client(_app())

    response = await client.get("/hello", headers={"X-Request-Id": incoming})

    replaced = response.headers["X-Request-Id"]
    assert HEX_ID.match(replaced)
    assert replaced != incoming
    assert await response.json() == {"request_id": replaced}


async def test_request_id_is_reset_after_the_request() -> None:
    seen: list[str | None] = []

    async def handler(_: web.Request) -> web.StreamResponse:
        seen.append(request_id_var.get())
        return web.Response(text="ok")

    request = make_mocked_request("GET", "/direct", headers={"X-Request-Id": "direct-1"})
    # Called in this task, so a value left behind by the middleware would be visible here.
    response = await request_id_middleware(request, handler)

    assert seen == ["direct-1"]
    assert response.headers["X-Request-Id"] == "direct-1"
    assert request_id_var.get() is None


async def test_log_lines_of_a_request_carry_its_id(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(_app())

    with configured_logging("json") as out:
        response = await client.get(
            "/hello?page=2", headers={"X-Request-Id": "trace-7", "Authorization": f"Bearer {TOKEN}"}
        )
        other = await client.get("/hello")

    assert response.status == 200
    ours = [line for line in _json_lines(out) if line["logger"].startswith("telemed.")]
    by_logger = [(line["logger"], line["request_id"]) for line in ours]
    other_id = other.headers["X-Request-Id"]
    assert by_logger == [
        ("telemed.test.handler", "trace-7"),
        ("telemed.access", "trace-7"),
        ("telemed.test.handler", other_id),
        ("telemed.access", other_id),
    ]
    assert ours[0]["msg"] == "inside handler for /hello"
    access = ours[1]
    assert access["msg"] == "GET /hello 200"
    assert (access["method"], access["path"], access["status"]) == ("GET", "/hello", 200)
    assert access["remote"] == "127.0.0.1"
    assert isinstance(access["duration_ms"], float)
    assert access["duration_ms"] >= 0
    # Headers (the bearer token) and the query string never reach our lines. (The test
    # server also runs aiohttp's own access log, which `telemed serve` turns off.)
    ours_text = json.dumps(ours, ensure_ascii=False)
    assert TOKEN not in ours_text
    assert "page=2" not in ours_text


async def test_access_record_has_structured_fields(
    aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await aiohttp_client(_app(request_id_middleware, problem_middleware))
    caplog.set_level(logging.INFO, logger="telemed.access")

    response = await client.post("/hello", headers={"X-Request-Id": "post-1"})

    assert response.status == 405
    (record,) = [r for r in caplog.records if r.name == "telemed.access"]
    assert record.getMessage() == "POST /hello 405"
    assert record.__dict__["method"] == "POST"
    assert record.__dict__["path"] == "/hello"
    assert record.__dict__["status"] == 405
    assert response.headers["X-Request-Id"] == "post-1"


async def test_error_turned_into_a_problem_keeps_the_request_id(
    aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    # The order create_app uses: ids outermost, problems inside.
    client = await aiohttp_client(_app(request_id_middleware, problem_middleware))
    caplog.set_level(logging.INFO, logger="telemed.access")

    response = await client.get("/nowhere", headers={"X-Request-Id": "lost-1"})

    assert response.status == 404
    assert response.content_type == "application/problem+json"
    assert response.headers["X-Request-Id"] == "lost-1"
    statuses = [r.__dict__["status"] for r in caplog.records if r.name == "telemed.access"]
    assert statuses == [404]


async def test_raised_http_exception_is_tagged_and_logged(
    aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await aiohttp_client(_app(request_id_middleware, problem_middleware))
    caplog.set_level(logging.INFO, logger="telemed.access")

    response = await client.get(
        "/moved", headers={"X-Request-Id": "moved-1"}, allow_redirects=False
    )

    assert response.status == 302
    assert response.headers.get("X-Request-Id") == "moved-1"
    statuses = [r.__dict__["status"] for r in caplog.records if r.name == "telemed.access"]
    assert statuses == [302]
