"""Raw Engine.IO / socket.io packets, as a hostile or buggy client writes them, over a raw
websocket and over HTTP long-polling: every connect packet is answered (`CONNECT_ERROR`
naming what was wrong), every event packet is answered (an `error` event, and the ack when one
was asked for), a packet whose framing cannot be read closes only its own connection, nothing
raises in the server (no traceback, no token in the log), and a well-behaved client in the
same room keeps working.

The packets are written by hand: `0{...}` is the Engine.IO handshake, `4` an Engine.IO
message, and inside it `0/consult,{auth}` a socket.io connect, `2/consult,<id>[name, arg]` an
event, `4/consult,{...}` a refused connect, `3/consult,<id>[...]` an ack."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from signaling_fixtures import (
    SPECIALIST,
    VILLAGE,
    Peer,
    SignalingServer,
    eventually,
    signaling_config,
    start_signaling_server,
)

from server.app import SIO

pytest_plugins = ["signaling_fixtures"]

# Every answer arrives well within this; a missing one fails the test.
ANSWER_S = 5.0
CONFIG = {"events_per_second": 100_000.0, "event_burst": 100_000}
NS = "/consult"


def deep(n: int, inner: str = "1") -> str:
    return "[" * n + inner + "]" * n


def deep_objects(n: int) -> str:
    return '{"a":' * n + "1" + "}" * n


# --- raw clients -----------------------------------------------------------------------------


class RawWebSocket:
    """An Engine.IO v4 websocket, written and read frame by frame (pings answered)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.closed = False

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, url: str) -> RawWebSocket:
        ws = await session.ws_connect(
            url.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket"
        )
        raw = cls(ws)
        handshake = await raw.next()
        assert handshake is not None and handshake.startswith('0{"sid":'), handshake
        return raw

    async def send(self, *frames: str | bytes) -> None:
        for frame in frames:
            if isinstance(frame, bytes):
                await self.ws.send_bytes(frame)
            else:
                await self.ws.send_str(frame)

    async def next(self) -> str | None:
        """The next frame that is not a ping; None once the server has closed."""
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), ANSWER_S)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                self.closed = True
                return None
            if msg.data == "2":
                await self.ws.send_str("3")
                continue
            text: str = msg.data
            return text

    async def until(self, found: Callable[[str], bool]) -> str:
        while True:
            frame = await self.next()
            assert frame is not None, "the server closed the connection"
            if found(frame):
                return frame

    async def closes(self) -> None:
        """The server ends the connection (an Engine.IO close, or the websocket closing)."""
        while True:
            frame = await self.next()
            if frame is None or frame == "1":
                return


class RawPolling:
    """An Engine.IO v4 long-polling session: POSTs packets, GETs what the server queued."""

    def __init__(self, session: aiohttp.ClientSession, url: str, sid: str) -> None:
        self.session = session
        self.url = url
        self.sid = sid

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, base: str) -> RawPolling:
        async with session.get(f"{base}/socket.io/?EIO=4&transport=polling") as resp:
            assert resp.status == 200
            handshake = await resp.text()
        assert handshake.startswith("0{"), handshake
        sid = json.loads(handshake[1:])["sid"]
        return cls(session, f"{base}/socket.io/?EIO=4&transport=polling&sid={sid}", sid)

    async def send(self, *packets: str) -> None:
        await self.post("\x1e".join(packets).encode())

    async def post(self, body: bytes) -> None:
        async with self.session.post(self.url, data=body) as resp:
            assert resp.status == 200, await resp.text()

    async def receive(self) -> list[str]:
        timeout = aiohttp.ClientTimeout(total=ANSWER_S)
        async with self.session.get(self.url, timeout=timeout) as resp:
            if resp.status != 200:
                return ["<closed>"]
            return (await resp.text()).split("\x1e")

    async def until(self, found: Callable[[str], bool]) -> str:
        while True:
            for packet in await self.receive():
                if packet == "2":
                    await self.send("3")
                elif found(packet):
                    return packet

    async def closes(self, server: SignalingServer) -> None:
        """The server ends the session (asked of the server: polling the session it closed
        would only draw python-engineio's complaint about an unknown session)."""
        sockets = server.app[SIO].eio.sockets
        await eventually(
            lambda: self.sid not in sockets or sockets[self.sid].closed,
            f"session {self.sid} is closed",
        )


# --- what an answer looks like ---------------------------------------------------------------


def connect_refusal(frame: str) -> dict[str, Any] | None:
    prefix = f"44{NS},"
    if not frame.startswith(prefix):
        return None
    data: dict[str, Any] = json.loads(frame[len(prefix) :])
    return data


def error_event(frame: str) -> dict[str, Any] | None:
    prefix = f'42{NS},["error",'
    if not frame.startswith(prefix):
        return None
    error: dict[str, Any] = json.loads(frame[len(f"42{NS},") :])[1]
    return error


def ack(frame: str, ack_id: int) -> dict[str, Any] | None:
    prefix = f"43{NS},{ack_id}["
    if not frame.startswith(prefix):
        return None
    body: dict[str, Any] = json.loads(frame[len(prefix) - 1 :])[0]
    return body


def assert_error(error: dict[str, Any], code: str, event: str, says: str) -> None:
    assert set(error) == {"code", "message", "event"}, error
    assert (error["code"], error["event"]) == (code, event), error
    assert says in error["message"], error


@dataclass
class Room:
    """A consultation two well-behaved clients are in, to show the server still serves."""

    server: SignalingServer
    cid: str
    village: Peer
    specialist: Peer

    async def still_works(self, text: str) -> None:
        assert self.village.connected and self.specialist.connected
        await self.village.ok("chat", {"text": text})
        message = await self.specialist.wait_for("chat_message", lambda m: m["text"] == text)
        assert message["participant"] == self.village.participant_id


def assert_clean_log(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]
    assert "Traceback" not in caplog.text
    for secret in secrets:
        assert secret not in caplog.text


@pytest.fixture
async def room(
    sig_server: SignalingServer, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Room]:
    caplog.set_level(logging.INFO)
    cid = (await sig_server.scheduled()).id
    village = await sig_server.seated(VILLAGE, cid, label="village")
    specialist = await sig_server.seated(SPECIALIST, cid, label="specialist")
    yield Room(sig_server, cid, village, specialist)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# --- the connect step ------------------------------------------------------------------------

# (auth as sent, what the refusal's message must say)
BAD_AUTH = [
    ("{nope", "the auth payload is unreadable: the payload is not valid JSON"),
    ('{"token": "abc"', "the auth payload is unreadable: the payload is not valid JSON"),
    ("[1]", "missing token in the auth payload"),
    ('"a token"', "missing token in the auth payload"),
    ("12", "missing token in the auth payload"),
    ('{"token": 5}', "missing token in the auth payload"),
    ('{"token": ""}', "missing token in the auth payload"),
    (deep(100_000), "nested more than 32 levels deep"),
    (deep(40), "nested more than 32 levels deep"),
    ('{"token": ' + deep_objects(50) + "}", "nested more than 32 levels deep"),
    ('{"token": "\\ud800"}', "lone surrogate"),
    ('{"token": "x", "consultation_id": "\\udfff"}', "lone surrogate"),
    ('{"\\ud800": "x"}', "lone surrogate"),
    ('{"token": ' + "9" * 2000 + "}", "more than 100 digits"),
    ('{"token": 1e400}', "out of range"),
    ('{"token": NaN}', "NaN is not a JSON number"),
    ('{"token": "not.a.jwt"}', "token is malformed"),
]


@pytest.mark.parametrize(("auth", "says"), BAD_AUTH, ids=[a[:24] for a, _ in BAD_AUTH])
async def test_a_bad_connect_packet_is_refused_over_websocket(
    room: Room,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    auth: str,
    says: str,
) -> None:
    raw = await RawWebSocket.open(session, room.server.url)
    await raw.send(f"40{NS},{auth}")
    refusal = connect_refusal(await raw.until(lambda f: f.startswith(f"44{NS}")))
    assert refusal is not None and says in refusal["message"], refusal
    assert set(refusal) == {"message"}
    # The same connection may still connect properly.
    token = room.server.token(SPECIALIST)
    await raw.send(f"40{NS}," + json.dumps({"token": token}))
    assert (await raw.until(lambda f: f.startswith(f"40{NS},"))).startswith(f'40{NS},{{"sid":')
    await room.still_works(f"after {auth[:12]!r}")
    assert_clean_log(caplog, token)


@pytest.mark.parametrize(("auth", "says"), BAD_AUTH[::2], ids=[a[:24] for a, _ in BAD_AUTH[::2]])
async def test_a_bad_connect_packet_is_refused_over_polling(
    room: Room,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    auth: str,
    says: str,
) -> None:
    polling = await RawPolling.open(session, room.server.url)
    await polling.send(f"40{NS},{auth}")
    refusal = connect_refusal(await polling.until(lambda p: p.startswith(f"44{NS}")))
    assert refusal is not None and says in refusal["message"], refusal
    await room.still_works(f"polling after {auth[:12]!r}")
    assert_clean_log(caplog)


# --- events ----------------------------------------------------------------------------------

# (event packet data as sent after `42/consult,<id>`, code, event named, what the message says)
BAD_EVENTS = [
    ("[5,{}]", "invalid_event", "", "must be a string, not a number"),
    ("[null]", "invalid_event", "", "must be a string, not null"),
    ("[]", "invalid_event", "", "an event is a JSON array"),
    ('[{"a":1}]', "invalid_event", "", "must be a string, not an object"),
    ('[["chat"],{}]', "invalid_event", "", "must be a string, not an array"),
    ("[true]", "invalid_event", "", "must be a string, not a boolean"),
    ('{"a":1}', "invalid_event", "", "an event is a JSON array"),
    ('"chat"', "invalid_event", "", "an event is a JSON array"),
    ("-5", "invalid_event", "", "an event is a JSON array"),
    ("", "invalid_event", "", "an event is a JSON array"),
    ('["chat",' + deep(500) + "]", "invalid_payload", "chat", "nested more than 32 levels"),
    ('["chat",' + deep(5000) + "]", "invalid_payload", "chat", "nested more than 32 levels"),
    ('["chat",' + deep(100_000) + "]", "invalid_payload", "chat", "nested more than 32 levels"),
    ('["chat",' + deep_objects(33) + "]", "invalid_payload", "chat", "nested more than 32"),
    ('["chat",{"text":' + deep(31, '"x"') + "}]", "invalid_payload", "chat", "text"),
    ('["chat",{"text":' + "9" * 2000 + "}]", "invalid_payload", "chat", "more than 100 digits"),
    ('["chat",{"text":-' + "9" * 101 + "}]", "invalid_payload", "chat", "more than 100 digits"),
    ('["chat",{"text":1e400}]', "invalid_payload", "chat", "out of range"),
    ('["pointer",{"x":-1e400}]', "invalid_payload", "pointer", "out of range"),
    ('["chat",{"text":NaN}]', "invalid_payload", "chat", "NaN is not a JSON number"),
    ('["chat",{"text":Infinity}]', "invalid_payload", "chat", "Infinity is not a JSON number"),
    ('["chat",{"text":"\\ud800"}]', "invalid_payload", "chat", "lone surrogate"),
    ('["chat",{"\\udc00":"x"}]', "invalid_payload", "chat", "lone surrogate"),
    ('["chat",{"text":', "invalid_payload", "chat", "not valid JSON"),
    ('["chat",{"text":"x"}', "invalid_payload", "chat", "not valid JSON"),
    ('["chat" {"text":"x"}]', "invalid_payload", "chat", "not valid JSON"),
    ('["\\ud800",{}]', "unknown_event", "\ud800", "no event named"),
    ('["chat\\u0000\\u202e\\u2028",{}]', "unknown_event", "chat\x00\u202e\u2028", "no event"),
    ('["connect",{"token":"x"}]', "unknown_event", "connect", "no event named"),
    ('["chat",{"text":"hi"},{"more":1}]', "invalid_payload", "chat", "invalid payload"),
]


async def connected_raw(room: Room, session: aiohttp.ClientSession) -> RawWebSocket:
    raw = await RawWebSocket.open(session, room.server.url)
    await raw.send(f"40{NS}," + json.dumps({"token": room.server.token(SPECIALIST)}))
    await raw.until(lambda f: f.startswith(f'40{NS},{{"sid":'))
    return raw


@pytest.mark.parametrize(
    ("data", "code", "event", "says"), BAD_EVENTS, ids=[d[:24] for d, *_ in BAD_EVENTS]
)
async def test_a_bad_event_packet_is_answered_over_websocket(
    room: Room,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    data: str,
    code: str,
    event: str,
    says: str,
) -> None:
    raw = await connected_raw(room, session)
    # With an ack id: the error event, then the ack.
    await raw.send(f"42{NS},7{data}")
    error = error_event(await raw.until(lambda f: error_event(f) is not None))
    assert error is not None
    assert_error(error, code, event, says)
    answer = ack(await raw.until(lambda f: ack(f, 7) is not None), 7)
    assert answer == {"ok": False, "error": error}
    # Without one: the error event alone.
    await raw.send(f"42{NS},{data}")
    assert error_event(await raw.until(lambda f: error_event(f) is not None)) == error
    # The connection still serves.
    await raw.send(f'42{NS},8["leave",{{}}]')
    after = ack(await raw.until(lambda f: ack(f, 8) is not None), 8)
    assert after is not None and after["error"]["code"] == "not_in_room"
    await room.still_works(f"after {data[:12]!r}")
    assert_clean_log(caplog)


@pytest.mark.parametrize(
    ("data", "code", "event", "says"), BAD_EVENTS[::3], ids=[d[:24] for d, *_ in BAD_EVENTS[::3]]
)
async def test_a_bad_event_packet_is_answered_over_polling(
    room: Room,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    data: str,
    code: str,
    event: str,
    says: str,
) -> None:
    polling = await RawPolling.open(session, room.server.url)
    await polling.send(f"40{NS}," + json.dumps({"token": room.server.token(SPECIALIST)}))
    await polling.until(lambda p: p.startswith(f'40{NS},{{"sid":'))
    await polling.send(f"42{NS},3{data}")
    answer = ack(await polling.until(lambda p: ack(p, 3) is not None), 3)
    assert answer is not None and answer["ok"] is False
    assert_error(answer["error"], code, event, says)
    await room.still_works(f"polling after {data[:12]!r}")
    assert_clean_log(caplog)


async def test_binary_attachments_that_do_not_fit_are_answered(
    room: Room, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    raw = await connected_raw(room, session)
    # A placeholder naming an attachment that is not there.
    await raw.send(f'451-{NS},4["chat",{{"_placeholder":true,"num":3}}]', b"\x00\x01")
    answer = ack(await raw.until(lambda f: ack(f, 4) is not None), 4)
    assert answer is not None
    assert_error(answer["error"], "invalid_payload", "chat", "names no attachment")
    # An attachment in place of the event's name.
    await raw.send(f'451-{NS},5[{{"_placeholder":true,"num":0}}]', b"name")
    answer = ack(await raw.until(lambda f: ack(f, 5) is not None), 5)
    assert answer is not None
    assert_error(answer["error"], "invalid_event", "", "must be a string, not an object")
    # A fitting attachment is refused as binary.
    await raw.send(f'451-{NS},6["chat",{{"text":{{"_placeholder":true,"num":0}}}}]', b"x")
    answer = ack(await raw.until(lambda f: ack(f, 6) is not None), 6)
    assert answer is not None
    assert_error(answer["error"], "invalid_payload", "chat", "binary data is not accepted")
    # "Binary" with no attachment is an ordinary event, and the next packet is one too.
    await raw.send(f'450-{NS},7["leave",{{}}]', f'42{NS},8["leave",{{}}]')
    for ack_id in (7, 8):
        answer = ack(await raw.until(lambda f, i=ack_id: ack(f, i) is not None), ack_id)
        assert answer is not None and answer["error"]["code"] == "not_in_room"
    await room.still_works("after binary")
    assert_clean_log(caplog)


UNREADABLE_FRAMING = [
    "4x",  # a socket.io packet of no type
    f"49{NS},[]",
    f"44{NS},{{}}",  # CONNECT_ERROR is the server's to send
    "4[[[[[",  # an Engine.IO message that is not socket.io
    f"42{NS},{'1' * 120}[]",  # an ack id of more than 100 digits
    "4" + deep(100_000),  # an Engine.IO message that is JSON, nested deep
    '4{"a":1}',
    "x",  # no Engine.IO packet type
    "9",
    "",
]


@pytest.mark.parametrize("frame", UNREADABLE_FRAMING, ids=[f[:16] for f in UNREADABLE_FRAMING])
async def test_unreadable_framing_closes_only_that_connection(
    room: Room, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, frame: str
) -> None:
    raw = await connected_raw(room, session)
    await raw.send(frame)
    await raw.closes()
    await room.still_works(f"after framing {frame[:12]!r}")
    assert_clean_log(caplog)


UNREADABLE_POLLING = [
    b"x",
    b"4x",
    b"\xff\xfe not UTF-8",
    b"4" + deep(100_000).encode(),
    b"b!!not base64",
    b"\x1e".join([b"6"] * 17),  # more packets than python-engineio decodes at once
    b"6\x1e\x1e6",  # an empty packet
]


@pytest.mark.parametrize("body", UNREADABLE_POLLING, ids=[b[:12].hex() for b in UNREADABLE_POLLING])
async def test_unreadable_polling_payloads_close_only_that_session(
    room: Room, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    polling = await RawPolling.open(session, room.server.url)
    await polling.send(f"40{NS}," + json.dumps({"token": room.server.token(SPECIALIST)}))
    await polling.until(lambda p: p.startswith(f'40{NS},{{"sid":'))
    await polling.post(body)
    await polling.closes(room.server)
    await room.still_works(f"after polling {body[:12]!r}")
    assert_clean_log(caplog)


# --- generated packets -----------------------------------------------------------------------

EVENT_NAMES = [
    "join",
    "leave",
    "admit",
    "deny",
    "chat",
    "raise_hand",
    "mute",
    "remove",
    "consent",
    "annotate",
    "pointer",
    "publish_offer",
    "subscribe_answer",
    "set_layer",
    "restart_subscribe",
    "set_trainee_chat",
    "start_recording",
]
ODD_TEXT = st.sampled_from(
    ["\\ud800", "\\udfff", "\\u0000", "\\u202e", "\\u2028", "\\u200f", "\\ufeff", "\\u001b[31m"]
)


@st.composite
def string_literal(draw: st.DrawFn) -> str:
    """A JSON string literal, now and then holding escapes of odd code points."""
    text = json.dumps(draw(st.text(max_size=12)))
    if draw(st.booleans()):
        text = text[:-1] + draw(ODD_TEXT) + '"'
    return text


NUMBER_LITERALS = (
    st.sampled_from(
        ["1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity", "9" * 101, "-" + "9" * 3000]
    )
    | st.integers().map(str)
    | st.floats(allow_nan=False, allow_infinity=False).map(repr)
)
SCALAR_LITERALS = st.sampled_from(["null", "true", "false"]) | NUMBER_LITERALS | string_literal()


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


JSON_LITERALS = st.recursive(
    SCALAR_LITERALS,
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
        | st.lists(st.tuples(string_literal(), inner), max_size=4).map(_object)
    ),
    max_leaves=10,
)


@st.composite
def nested(draw: st.DrawFn) -> str:
    inner = draw(JSON_LITERALS)
    depth = draw(st.sampled_from([30, 31, 32, 33, 34, 200, 3000]))
    if draw(st.booleans()):
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


ARGUMENTS = JSON_LITERALS | nested()
NAMES = (
    st.sampled_from(EVENT_NAMES).map(json.dumps)
    | string_literal()
    | st.sampled_from(["5", "null", "true", "{}", "[]", '{"a":1}', "1e400", "-0"])
)


@st.composite
def event_packets(draw: st.DrawFn) -> str:
    """An event's data as raw text: usually `[name, argument...]`, now and then not that."""
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        return draw(ARGUMENTS)
    parts = [draw(NAMES), *draw(st.lists(ARGUMENTS, max_size=2))]
    text = "[" + ",".join(parts) + "]"
    if draw(st.integers(min_value=0, max_value=19)) == 0:
        text = text[: draw(st.integers(min_value=0, max_value=len(text)))]  # cut short
    return text


RAW = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def test_generated_event_packets_are_all_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Generated packets over one raw websocket that has joined nothing: each gets its ack
    (an error naming the event it could read, never `internal`) and its `error` event."""
    caplog.set_level(logging.INFO)
    with asyncio.Runner() as runner:
        server = runner.run(start_signaling_server(signaling_config(tmp_path, **CONFIG)))
        session = runner.run(_session())
        try:

            async def setup() -> tuple[Room, RawWebSocket]:
                cid = (await server.scheduled()).id
                village = await server.seated(VILLAGE, cid, label="village")
                specialist = await server.seated(SPECIALIST, cid, label="specialist")
                room = Room(server, cid, village, specialist)
                return room, await connected_raw(room, session)

            room, raw = runner.run(setup())
            ack_ids = iter(range(1, 1_000_000))

            async def one(data: str) -> None:
                number = next(ack_ids)
                await raw.send(f"42{NS},{number}{data}")
                # Digits that open the data run on into the ack id, as socket.io reads it.
                ack_id = int(f"{number}{data[: len(data) - len(data.lstrip('0123456789'))]}")
                errors: list[dict[str, Any]] = []

                def answered(frame: str) -> bool:
                    error = error_event(frame)
                    if error is not None:
                        errors.append(error)
                    return ack(frame, ack_id) is not None

                answer = ack(await raw.until(answered), ack_id)
                assert answer is not None and answer["ok"] is False, (data, answer)
                error = answer["error"]
                assert set(error) == {"code", "message", "event"}, error
                assert error["code"] != "internal", (data, error)
                assert error["message"], error
                assert errors and errors[-1] == error

            @RAW
            @given(data=event_packets())
            @example(data="1e400")  # digits that run on into the ack id
            def one_packet(data: str) -> None:
                runner.run(one(data))

            one_packet()
            runner.run(room.still_works("after the generated packets"))
            assert not raw.closed
        finally:
            runner.run(session.close())
            runner.run(server.close())
    assert_clean_log(caplog)


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()
