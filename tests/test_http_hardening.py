"""The HTTP layer under hostile or broken input, against a real server: every request gets a
clear 4xx problem document (never a 500, never silence), and no token, traceback or forged
line reaches the log, in either log format. Raw sockets where the test is about raw bytes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
import socketio
from aiohttp import web
from aiohttp.test_utils import TestClient
from api_helpers import PROBLEM_JSON, VILLAGE, Api, one
from multidict import CIMultiDict
from recording_server_helpers import add_sealed_recording
from signaling_fixtures import SignalingServer, eventually

from server.app import CONFIG
from server.logs import JsonFormatter, TextFormatter, _RequestIdFilter

pytest_plugins = ["signaling_fixtures"]

# How long a raw exchange may take before the test calls it a hang.
ANSWER_WITHIN_S = 15.0


# --- helpers -------------------------------------------------------------------------------

Client = TestClient[web.Request, web.Application]


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def problem(self) -> dict[str, Any]:
        assert self.headers.get("Content-Type", "").startswith(PROBLEM_JSON), self
        data: dict[str, Any] = json.loads(self.body)
        return data


async def raw_request(client: Client, data: bytes) -> RawReply:
    """Sends `data` as it is and reads one response (by its Content-Length: the server may keep
    the connection open a while to drain a body it refused). Returns once the server is done
    with the connection, so whatever it logs about it has been logged."""
    before = open_connections(client)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(client))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(ANSWER_WITHIN_S):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers: CIMultiDict[str] = CIMultiDict()
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers.add(name.strip(), value.strip())
            body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    finally:
        writer.close()
    await closed_since(client, before)
    return RawReply(int(status_line.split()[1]), headers, body)


def open_connections(client: Client) -> set[object]:
    server = client.server.runner.server
    assert server is not None
    return set(server.connections)


async def closed_since(client: Client, before: set[object]) -> None:
    """Waits until the server has closed every connection opened since `before`."""
    await eventually(lambda: open_connections(client) <= before, "the server closed it")


def http_get(path: bytes, *headers: bytes) -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: telemed", b"Connection: close", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def http_post(path: bytes, body: bytes, *headers: bytes, length: int | None = None) -> bytes:
    size = str(len(body) if length is None else length).encode()
    lines = [
        b"POST " + path + b" HTTP/1.1",
        b"Host: telemed",
        b"Connection: close",
        b"Content-Type: application/json",
        b"Content-Length: " + size,
        *headers,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass
class Logs:
    """The server's log output while the test runs, as both formats write it."""

    text: io.StringIO
    json: io.StringIO

    def both(self) -> str:
        return self.text.getvalue() + self.json.getvalue()

    def assert_clean(self, *secrets_: str) -> None:
        """No secret and no traceback in either format; every JSON line parses."""
        output = self.both()
        for secret in secrets_:
            assert secret not in output, output
        assert "Traceback" not in output, output
        for line in self.json.getvalue().splitlines():
            json.loads(line)


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Handlers with the text and the JSON formatter on the root logger, as configure_logging
    sets them up, next to pytest's own."""
    root = logging.getLogger()
    saved_level = root.level
    text, json_out = io.StringIO(), io.StringIO()
    handlers = []
    for stream, formatter in (
        (text, TextFormatter("%(levelname)s %(name)s [%(request_id)s] %(message)s")),
        (json_out, JsonFormatter()),
    ):
        handler = logging.StreamHandler(stream)
        handler.addFilter(_RequestIdFilter())
        handler.setFormatter(formatter)
        root.addHandler(handler)
        handlers.append(handler)
    root.setLevel(logging.INFO)
    try:
        yield Logs(text, json_out)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(saved_level)


def port_of(client: Client) -> int:
    port = client.server.port
    assert port is not None
    return port


def signed(app: web.Application, **claims: Any) -> str:
    """A token signed with the server's own key: genuine, whatever its claims say."""
    jwt_config = app[CONFIG].jwt
    now = int(datetime.now(UTC).timestamp())
    payload: dict[str, Any] = {
        "sub": "village-doctor",
        "name": "n",
        "role": "village_doctor",
        "org": "o",
        "iss": jwt_config.issuer,
        "aud": jwt_config.audience,
        "jti": secrets.token_hex(8),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        **claims,
    }
    return jwt.encode(payload, jwt_config.secret.get_secret_value(), algorithm="HS256")


def signature_of(token: str) -> str:
    return token.rsplit(".", 1)[1]


# --- headers that are not ASCII, or not a token -------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"Bearer \xff\xfe", b"Bearer ey\xe9.x.y", "Bearer é".encode(), b"\xff"],
    ids=["invalid-utf8", "latin1", "utf8", "no-scheme"],
)
async def test_non_ascii_authorization_is_a_401(
    client: TestClient[web.Request, web.Application], logs: Logs, value: bytes
) -> None:
    reply = await raw_request(
        client, http_get(b"/api/v1/consultations", b"Authorization: " + value)
    )

    assert reply.status == 401, reply
    assert reply.problem["code"] == "unauthorized"
    assert reply.problem["detail"] == "authorization header must be printable ASCII"
    logs.assert_clean()


async def test_a_non_ascii_playback_link_token_is_a_401(api: Api, logs: Logs) -> None:
    rec = await recording(api, b"x" * 10)

    for token in ("é.é", "\u2028", "abc\x00.def"):
        reply = await api.get(f"/api/v1/recordings/{rec}/content", None, params={"token": token})
        assert reply.status == 401, (token, reply)
        assert reply.body["code"] == "unauthorized"
        assert reply.body["detail"] == "the playback link is not valid"
    logs.assert_clean()


async def test_a_playback_link_token_stays_out_of_aiohttp_s_access_log(
    api: Api, logs: Logs
) -> None:
    rec = await recording(api, b"x" * 10)
    link = await api.post(f"/api/v1/recordings/{rec}/playback", VILLAGE)
    assert link.status == 200, link
    token = link.body["url"].split("token=", 1)[1]

    reply = await api.get(link.body["url"], None)

    assert reply.status == 200, reply
    # aiohttp writes its access line once the response is out.
    await eventually(
        lambda: "content?token=[redacted] HTTP/1.1" in logs.text.getvalue(), "the access line"
    )
    logs.assert_clean(token, signature_of(token))


# --- genuine tokens with times no datetime holds -------------------------------------------

OUT_OF_RANGE = [
    ({"exp": 10**12}, "token claim 'exp' is out of range"),
    ({"exp": 10**400}, "token claim 'exp' is out of range"),
    ({"exp": 1e300}, "token claim 'exp' is out of range"),
    ({"exp": -(10**12)}, "token expired"),
    ({"exp": float("inf")}, "token is malformed"),
    ({"exp": "99999999999"}, "token claim 'exp' must be a number"),
    ({"exp": True}, "token expired"),
    ({"nbf": 10**12}, "token not yet valid"),
    ({"nbf": 1e300}, "token not yet valid"),
    ({"nbf": "5"}, "token claim 'nbf' must be a number"),
    ({"iat": 1e300}, "token not yet valid"),
    ({"iat": float("nan")}, "token claim 'iat' must be an integer"),
]


@pytest.mark.parametrize(("claims", "detail"), OUT_OF_RANGE, ids=lambda v: str(v)[:30])
async def test_time_claims_out_of_range_are_a_401(
    api: Api, logs: Logs, claims: dict[str, Any], detail: str
) -> None:
    token = signed(api.app, **claims)

    reply = await api.get("/api/v1/consultations", token)

    assert reply.status == 401, reply
    assert reply.body["code"] == "unauthorized"
    assert reply.body["detail"] == detail
    logs.assert_clean(signature_of(token))


async def test_a_socket_connect_with_an_exp_out_of_range_is_refused_with_a_message(
    sig_server: SignalingServer, logs: Logs
) -> None:
    token = signed(sig_server.app, exp=10**12)
    peer = sig_server.peer("far future")

    with pytest.raises(socketio.exceptions.ConnectionError):
        await peer.connect({"token": token})

    assert peer.connect_errors == [{"message": "token claim 'exp' is out of range"}]
    logs.assert_clean(signature_of(token))


# --- bodies that are not what their headers say ---------------------------------------------


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate", b"br", b"zstd", b"GZIP"])
async def test_a_body_not_in_its_content_encoding_is_a_400(
    api: Api, logs: Logs, encoding: bytes
) -> None:
    token = api.token(VILLAGE)
    body = b'{"kind": "consultation"}'
    request = http_post(
        b"/api/v1/consultations",
        body,
        b"Authorization: Bearer " + token.encode(),
        b"Content-Encoding: " + encoding,
    )

    reply = await raw_request(api.client, request)

    assert reply.status == 400, reply
    problem = reply.problem
    assert problem["code"] == "bad_content_encoding", problem
    assert "Content-Encoding" in problem["detail"]
    assert reply.headers["Server"] == "telemed"
    logs.assert_clean(signature_of(token))
    # The server keeps serving.
    assert (await api.get("/healthz", None)).status == 200


@pytest.mark.parametrize("encoding", [b"x-unknown", b"gzip, gzip", b"compress"])
async def test_a_content_encoding_that_is_not_decoded_is_a_415(
    api: Api, logs: Logs, encoding: bytes
) -> None:
    token = api.token(VILLAGE)
    request = http_post(
        b"/api/v1/consultations",
        b"{}",
        b"Authorization: Bearer " + token.encode(),
        b"Content-Encoding: " + encoding,
    )

    reply = await raw_request(api.client, request)

    assert reply.status == 415, reply
    assert reply.problem["code"] == "unsupported_content_encoding"
    assert reply.problem["detail"] == (
        "unsupported Content-Encoding: send gzip, deflate or an unencoded body"
    )
    logs.assert_clean(signature_of(token))


async def test_a_content_length_above_the_limit_is_refused_before_reading(
    api: Api, logs: Logs
) -> None:
    limit = api.app[CONFIG].max_body_bytes
    token = api.token(VILLAGE)
    request = http_post(
        b"/api/v1/consultations",
        b"{}",
        b"Authorization: Bearer " + token.encode(),
        length=limit + 1,
    )

    # Only two bytes of the body are ever sent: the answer cannot wait for the rest.
    reply = await raw_request(api.client, request)

    assert reply.status == 413, reply
    assert reply.problem["code"] == "payload_too_large"
    assert reply.problem["detail"] == (
        f"request body too large: Content-Length {limit + 1}, the limit is {limit}"
    )
    logs.assert_clean(signature_of(token))


async def test_a_client_leaving_before_its_body_is_complete_leaves_no_traceback(
    api: Api, logs: Logs
) -> None:
    token = api.token(VILLAGE)
    request = http_post(
        b"/api/v1/consultations", b"{}", b"Authorization: Bearer " + token.encode(), length=100
    )
    before = open_connections(api.client)
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(api.client))
    writer.write(request)
    await writer.drain()
    # The server is waiting for the other 98 bytes; then the client goes.
    writer.close()
    await writer.wait_closed()
    await closed_since(api.client, before)

    # Still serving, and the abandoned request left nothing but (at most) a line.
    assert (await api.get("/healthz", None)).status == 200
    logs.assert_clean(signature_of(token))


# --- what aiohttp's parser refuses, before any handler ------------------------------------


async def test_a_control_character_after_a_token_does_not_echo_the_token(
    client: TestClient[web.Request, web.Application], api: Api, logs: Logs
) -> None:
    token = api.token(VILLAGE)
    request = http_get(
        b"/api/v1/consultations", b"Authorization: Bearer " + token.encode() + b"\x01"
    )

    reply = await raw_request(client, request)

    assert reply.status == 400, reply
    assert reply.problem == {
        "type": "about:blank",
        "title": "Bad Request",
        "status": 400,
        "detail": "malformed HTTP request: Invalid header value char",
        "code": "malformed_request",
    }
    assert reply.headers["Server"] == "telemed"
    assert signature_of(token).encode() not in reply.body
    logs.assert_clean(token, signature_of(token))
    assert "malformed HTTP request: Invalid header value char" in logs.text.getvalue()


async def test_an_oversized_header_does_not_log_its_start(api: Api, logs: Logs) -> None:
    token = api.token(VILLAGE)
    header = b"Authorization: Bearer " + token.encode() + b"A" * 9000

    reply = await raw_request(api.client, http_get(b"/api/v1/consultations", header))

    assert reply.status == 400, reply
    assert reply.problem["code"] == "malformed_request"
    assert reply.problem["detail"] == (
        "malformed HTTP request: a request line or header is longer than 8190 bytes"
    )
    assert b"eyJ" not in reply.body
    # The start of the token is its header: the signature is far off, so check the head too.
    logs.assert_clean(token[:40], signature_of(token))


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (
            b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
            "malformed HTTP request: Invalid method encountered",
        ),
        (
            b"\x16\x03\x01\x00\x05hello",
            "malformed HTTP request: Received HTTPS traffic on an HTTP port",
        ),
        (
            b"GET /web/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            "malformed HTTP request: a request line or header is longer than 8190 bytes",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
            + b"\r\n",
            "malformed HTTP request: Too many headers received",
        ),
        (
            b"POST /api/v1/consultations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"\r\nzz\r\n{}\r\n0\r\n\r\n",
            "malformed HTTP request: Invalid character in chunk size",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "malformed HTTP request: Duplicate Content-Length",
        ),
    ],
    ids=["method", "tls", "long-line", "many-headers", "bad-chunk", "two-lengths"],
)
async def test_requests_the_parser_refuses_get_a_problem_document(
    client: TestClient[web.Request, web.Application], logs: Logs, data: bytes, detail: str
) -> None:
    reply = await raw_request(client, data)

    assert reply.status == 400, reply
    assert reply.problem["code"] == "malformed_request"
    assert reply.problem["detail"] == detail
    assert reply.headers["Server"] == "telemed"
    logs.assert_clean("aaaaaaaaaaaaaaaaaaaa", "hello")


# --- paths and what the log makes of them ---------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [b"/web/%00", b"/web/a%00.js", b"/web/" + b"a" * 300, b"/web/" + b"a" * 300 + b".js"],
    ids=["nul", "nul-js", "long-name", "long-name-js"],
)
async def test_static_paths_the_file_system_cannot_hold_are_a_404(
    client: TestClient[web.Request, web.Application], logs: Logs, path: bytes
) -> None:
    reply = await raw_request(client, http_get(path))

    assert reply.status == 404, reply
    assert reply.problem["code"] == "not_found"
    assert reply.problem["detail"] == "no such file under /web/"
    logs.assert_clean()


async def test_a_newline_in_the_path_cannot_forge_a_log_line(
    client: TestClient[web.Request, web.Application], logs: Logs
) -> None:
    forged = b"/web/x%0aINFO%20telemed.access%20[-]%20GET%20/admin%20200%E2%80%A8%E2%80%AE%00"

    reply = await raw_request(client, http_get(forged))

    assert reply.status == 404, reply
    text = logs.text.getvalue()
    access = [line for line in text.splitlines() if line.startswith("INFO telemed.access ")]
    # One line for the one request, its controls visible as escapes.
    assert len(access) == 1, text
    assert "/web/x\\x0aINFO telemed.access [-] GET /admin 200\\u2028\\u202e\\x00 404" in access[0]
    assert not {"\x00", "\u2028", "\u202e"} & set(text)
    records = [json.loads(line) for line in logs.json.getvalue().splitlines()]
    (logged,) = [r for r in records if r["logger"] == "telemed.access"]
    assert logged["path"] == "/web/x\nINFO telemed.access [-] GET /admin 200\u2028\u202e\x00"
    assert not {"\u2028", "\u202e"} & set(logs.json.getvalue())
    logs.assert_clean()


# --- headers on every response --------------------------------------------------------------


async def test_every_response_names_no_versions_and_api_responses_are_not_stored(
    api: Api,
) -> None:
    cid = await api.create()
    rec = await recording(api, b"x" * 100)
    reached = {
        "/healthz": await api.get("/healthz", None),
        "/web/": await api.get("/web/", None),
        "/web/app.js": await api.get("/web/app.js", None),
        "/web/missing.js": await api.get("/web/missing.js", None),
        "/api/v1/openapi.json": await api.get("/api/v1/openapi.json", None),
        "record": await api.get(one(cid, "/record"), VILLAGE),
        "fhir": await api.get(one(cid, "/fhir"), VILLAGE),
        "consultation": await api.get(one(cid), VILLAGE),
        "unauthorized": await api.get(one(cid), None),
        "recording": await api.get(f"/api/v1/recordings/{rec}/content", VILLAGE),
        "socket.io": await api.get("/socket.io/?EIO=4&transport=polling", None),
    }

    for name, reply in reached.items():
        assert reply.headers["Server"] == "telemed", name
        api_data = name not in {"/healthz", "/web/", "/web/app.js", "/web/missing.js"}
        if api_data and name not in {"/api/v1/openapi.json", "socket.io"}:
            assert reply.headers["Cache-Control"] == "no-store", name
    assert "no-store" not in reached["/api/v1/openapi.json"].headers.get("Cache-Control", "")
    assert reached["record"].status == 200 and reached["fhir"].status == 200


# --- byte ranges of a recording -------------------------------------------------------------


async def recording(api: Api, data: bytes) -> str:
    """A closed recording of a live session with `data` as its (sealed) file."""
    _, session = await api.live()
    return await add_sealed_recording(api.app, session.id, data)


DATA = bytes(range(256)) * 4  # 1024 bytes


@pytest.mark.parametrize(
    ("header", "status", "expect"),
    [
        ("bytes=0-9", 206, DATA[:10]),
        ("bytes=-10", 206, DATA[-10:]),
        ("bytes=1000-", 206, DATA[1000:]),
        ("bytes=1000-5000", 206, DATA[1000:]),
        ("bytes=-0", 416, None),
        ("bytes=5-2", 416, None),
        ("bytes=999999999-", 416, None),
        ("bytes=1024-", 416, None),
        ("bytes=" + "9" * 5000 + "-", 416, None),
        ("bytes=-", 416, None),
        ("bytes=", 416, None),
        ("bytes=abc", 416, None),
        ("bytes= 0-9", 416, None),
        ("bytes=0-1,5-6", 200, DATA),
        ("items=0-9", 200, DATA),
        ("garbage", 200, DATA),
    ],
    ids=lambda v: v[:20] if isinstance(v, str) else str(v)[:3] if isinstance(v, int) else "",
)
async def test_recording_ranges(
    api: Api, logs: Logs, header: str, status: int, expect: bytes | None
) -> None:
    rec = await recording(api, DATA)

    reply = await api.get(f"/api/v1/recordings/{rec}/content", VILLAGE, headers={"Range": header})

    assert reply.status == status, reply
    if status == 416:
        assert reply.content_type == PROBLEM_JSON
        assert reply.body["code"] == "range_not_satisfiable"
        assert reply.body["detail"] == (
            "the range is not satisfiable: the file has 1024 bytes; ask for one byte range "
            "that overlaps them (see Content-Range)"
        )
        assert reply.headers["Content-Range"] == "bytes */1024"
    else:
        assert reply.content_type == "video/webm"
        assert reply.raw == expect
        assert reply.headers["Accept-Ranges"] == "bytes"
    assert reply.headers["Cache-Control"] == "no-store"
    logs.assert_clean()


async def test_a_range_that_is_not_printable_is_audited_as_such(api: Api) -> None:
    rec = await recording(api, DATA)

    reply = await api.get(
        f"/api/v1/recordings/{rec}/content", VILLAGE, headers={"Range": "bytes=0-1\u00e9"}
    )

    assert reply.status == 416, reply
    audit = await api.audit()
    ranges = [e["detail"]["range"] for e in audit if e["target"] == rec]
    assert ranges == ["(not printable ASCII or too long)"]


@pytest.mark.parametrize(
    ("if_range", "status"),
    [
        ("garbage", 206),
        ("Mon, 01 Jan 2001 00:00:00 GMT", 200),
        ("Fri, 01 Jan 2100 00:00:00 GMT", 206),
    ],
)
async def test_if_range_decides_before_the_range_is_judged(
    api: Api, if_range: str, status: int
) -> None:
    rec = await recording(api, DATA)
    url = f"/api/v1/recordings/{rec}/content"

    # A date older than the file: the range is ignored, even one that could not be served.
    for header, expect in (("bytes=0-9", DATA[:10]), ("bytes=-0", None)):
        reply = await api.get(url, VILLAGE, headers={"Range": header, "If-Range": if_range})
        if status == 200:
            assert reply.status == 200 and reply.raw == DATA, reply
        elif expect is None:
            assert reply.status == 416, reply
        else:
            assert reply.status == 206 and reply.raw == expect, reply
