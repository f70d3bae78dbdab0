"""The namespace's limits and its answers to malformed or misplaced events: payload size, chat
length, stroke points, the rate limit, a full room, unknown events, invalid payloads, events
before joining — and a misbehaving client never disturbs the others."""

from __future__ import annotations

import time
from typing import Any

import pytest
from signaling_fixtures import (
    COUNTY,
    SPECIALIST,
    TOWNSHIP,
    VILLAGE,
    Peer,
    ServerFactory,
    SignalingServer,
    eventually,
    start_signaling_server,
)

from rooms.model import EventKind
from rooms.roles import Role
from server.config import Config

pytest_plugins = ["signaling_fixtures"]

PAYLOAD_LIMIT = 2048
CHAT_LIMIT = 100
POINTS_LIMIT = 10
SMALL = {
    "max_payload_bytes": PAYLOAD_LIMIT,
    "chat_max_chars": CHAT_LIMIT,
    "annotation_max_points": POINTS_LIMIT,
}
STROKE = {"target_track": "cam-1", "points": [[0.1, 0.1], [0.2, 0.2]]}


async def specialist_room(server: SignalingServer) -> tuple[str, Peer, Peer]:
    """A live room with the provincial specialist (who may do everything) and the village
    doctor (a witness)."""
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    specialist = await server.seated(SPECIALIST, cid, label="specialist")
    return cid, village, specialist


async def test_a_payload_over_the_size_limit_is_refused(start_sig_server: ServerFactory) -> None:
    server = await start_sig_server(**SMALL)
    cid, _, specialist = await specialist_room(server)
    before = await server.event_kinds(cid)

    # Checked before anything about the event's meaning: chat length, points, even joining.
    too_big: list[tuple[str, Any]] = [
        ("chat", {"text": "x" * PAYLOAD_LIMIT}),
        ("chat", {"text": "咳" * 700}),  # 700 characters, 2100 bytes of UTF-8
        ("annotate", {**STROKE, "points": [[0.123456789, 0.987654321]] * 100}),
        ("mute", {"participant": "p_x", "kind": "audio", "padding": "x" * PAYLOAD_LIMIT}),
    ]
    for event, payload in too_big:
        error = await specialist.refused(event, payload)
        assert error["code"] == "payload_too_large", (event, error)
        assert f"the limit is {PAYLOAD_LIMIT}" in error["message"]
    stranger = await server.connect(COUNTY, label="not joined")
    assert (await stranger.refused("chat", {"text": "y" * 3000}))["code"] == "payload_too_large"
    assert await server.event_kinds(cid) == before

    # Just under the limit is fine as far as size goes.
    await specialist.ok("chat", {"text": "z" * CHAT_LIMIT})


async def test_chat_longer_than_the_limit_is_refused(start_sig_server: ServerFactory) -> None:
    server = await start_sig_server(**SMALL)
    cid, village, specialist = await specialist_room(server)
    for text in ("a" * (CHAT_LIMIT + 1), "咳" * (CHAT_LIMIT + 1)):
        error = await specialist.refused("chat", {"text": text})
        assert error["code"] == "chat_too_long"
        assert f"limited to {CHAT_LIMIT} characters" in error["message"]
    # Characters, not bytes, and counted after trimming.
    await specialist.ok("chat", {"text": "咳" * CHAT_LIMIT})
    await specialist.ok("chat", {"text": "  " + "b" * CHAT_LIMIT + "\n"})
    await village.wait_for("chat_message", lambda m: m["text"] == "b" * CHAT_LIMIT)
    chats = [e.data["text"] for e in await server.events(cid) if e.kind is EventKind.CHAT]
    assert chats == ["咳" * CHAT_LIMIT, "b" * CHAT_LIMIT]


async def test_a_stroke_with_too_many_points_is_refused(start_sig_server: ServerFactory) -> None:
    server = await start_sig_server(**SMALL)
    cid, village, specialist = await specialist_room(server)
    many = [[i / 20, i / 20] for i in range(POINTS_LIMIT + 1)]
    error = await specialist.refused("annotate", {**STROKE, "points": many})
    assert error["code"] == "too_many_points"
    assert f"at most {POINTS_LIMIT} points" in error["message"]
    await specialist.ok("annotate", {**STROKE, "points": many[:POINTS_LIMIT]})
    assert len((await village.wait_for("annotation"))["points"]) == POINTS_LIMIT
    strokes = [e for e in await server.events(cid) if e.kind is EventKind.ANNOTATION]
    assert [len(e.data["points"]) for e in strokes] == [POINTS_LIMIT]


async def test_flooding_is_rate_limited_then_recovers(start_sig_server: ServerFactory) -> None:
    rate, burst = 1.0, 6
    server = await start_sig_server(events_per_second=rate, event_burst=burst)
    cid, village, specialist = await specialist_room(server)

    # A fresh connection starts with a full bucket; every event takes a token, unknown ones
    # included, and refill at 1/s adds less than one during this quick burst.
    flooder = await server.connect(TOWNSHIP, label="flooder")
    codes = [(await flooder.call("ping", {}))["error"]["code"] for _ in range(burst + 1)]
    assert codes == ["unknown_event"] * burst + ["rate_limited"]

    # In the room: chat until refused; the refused message is not recorded nor relayed.
    sent: list[str] = []
    for i in range(burst + 2):
        ack = await specialist.call("chat", {"text": f"第{i}条"})
        if not ack["ok"]:
            assert ack["error"]["code"] == "rate_limited"
            assert ack["error"]["message"] == "too many events; slow down"
            assert specialist.events("error")[-1] == ack["error"]
            break
        sent.append(f"第{i}条")
    else:
        pytest.fail("never rate limited")
    assert burst - 2 <= len(sent) <= burst  # `join` took one token; refill may add one

    # The bucket is the connection's: the others are not slowed down.
    await village.ok("chat", {"text": "我这边正常"})

    # The bucket refills at `rate` per second: a token within about a second.
    started = time.monotonic()

    async def accepted() -> bool:
        ack = await specialist.call("chat", {"text": "恢复了"})
        return bool(ack["ok"])

    await eventually(accepted, "the specialist may chat again", within=3.0)
    assert time.monotonic() - started < 1 / rate + 1.0
    await village.wait_for("chat_message", lambda m: m["text"] == "恢复了")
    chats = [e.data["text"] for e in await server.events(cid) if e.kind is EventKind.CHAT]
    assert chats == [*sent, "我这边正常", "恢复了"]


async def test_a_full_room_refuses_the_next_seat(start_sig_server: ServerFactory) -> None:
    server = await start_sig_server(max_participants=3)
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    county = await server.seated(COUNTY, cid, label="county")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident, resident_pid = await server.waiting(token, cid, label="resident")  # waiting counts

    specialist = await server.connect(SPECIALIST, label="specialist")
    error = await specialist.refused("join", {"consultation_id": cid})
    assert error == {
        "code": "room_full",
        "message": "the room is full (3 participants)",
        "event": "join",
    }
    await village.ok("deny", {"participant": resident_pid, "reason": "人数已满"})
    await resident.wait_disconnected()
    await specialist.join(cid)  # a freed seat is free again
    await specialist.wait_for("joined")

    # A seat held for a reconnect counts too; resuming it needs no free seat.
    await county.drop()
    township = await server.connect(TOWNSHIP, label="township")
    assert (await township.refused("join", {"consultation_id": cid}))["code"] == "room_full"
    back = await server.seated(COUNTY, cid, label="county back")
    assert back.participant_id == county.participant_id


@pytest.mark.parametrize(
    "name",
    ["ping", "JOIN", "chat ", "message", "connect", "disconnect", "e" * 100],
    ids=["ping", "upper-case", "trailing-space", "message", "connect", "disconnect", "long"],
)
async def test_unknown_events_are_refused(sig_server: SignalingServer, name: str) -> None:
    server = sig_server
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    county = await server.seated(COUNTY, cid, label="county")
    error = await county.refused(name, {"text": "hi"})
    assert error["code"] == "unknown_event"
    assert error["event"] == name[:64]
    assert error["message"] == f"no event named {name[:64]!r}"
    # Nothing changed: still connected, still seated, still heard.
    await county.ok("chat", {"text": "还在"})
    assert (await village.wait_for("chat_message"))["participant"] == county.participant_id
    assert "participant_left" not in village.names()


# (event, payload, words the message must contain). Everything is sent by the provincial
# specialist, who may do everything, so only the payload can be wrong.
MALFORMED: list[tuple[str, Any, tuple[str, ...]]] = [
    ("chat", {}, ("text", "Field required")),
    ("chat", None, ("text", "Field required")),
    ("chat", {"text": 5}, ("text", "valid string")),
    ("chat", {"text": "   "}, ("text",)),
    ("chat", {"text": "hi", "to": "p_x"}, ("to", "Extra inputs are not permitted")),
    ("chat", "hi", ("payload", "valid dictionary")),
    ("chat", ["hi"], ("payload", "valid dictionary")),
    ("chat", 42, ("payload", "valid dictionary")),
    ("chat", ({"text": "a"}, {"text": "b"}), ("payload", "valid dictionary")),  # two arguments
    ("raise_hand", {"now": True}, ("now", "Extra inputs")),
    ("lower_hand", [], ("payload", "valid dictionary")),
    ("end_session", "now", ("payload", "valid dictionary")),
    ("leave", {"reason": "bye"}, ("reason", "Extra inputs")),
    ("join", {"consultation_id": 42}, ("consultation_id", "valid string")),
    ("join", {"consultation_id": "c 1; drop"}, ("consultation_id", "pattern")),
    ("join", {"consultation_id": "c_1", "device": "d" * 41}, ("device", "at most 40")),
    ("admit", {"participant": ""}, ("participant",)),
    ("admit", {"participant": "p" * 65}, ("participant", "at most 64")),
    ("admit", {}, ("participant", "Field required")),
    ("deny", {"participant": "p_1", "reason": "r" * 501}, ("reason", "at most 500")),
    ("mute", {"participant": "p_1", "kind": "screen"}, ("kind", "'audio' or 'video'")),
    ("mute", {"participant": "p_1"}, ("kind", "Field required")),
    ("remove", {"participant": "p_1"}, ("reason", "Field required")),
    ("remove", {"participant": "p_1", "reason": ""}, ("reason",)),
    ("consent", {"kind": "marketing", "granted": True}, ("kind",)),
    ("consent", {"kind": "recording", "granted": "yes"}, ("granted", "valid boolean")),
    ("consent", {"kind": "recording", "granted": 1}, ("granted", "valid boolean")),
    ("consent", {"kind": "recording", "granted": True, "on_behalf_of": 7}, ("on_behalf_of",)),
    ("annotate", {**STROKE, "points": [[0.5, 1.5]]}, ("points.0.1", "less than or equal to 1")),
    ("annotate", {**STROKE, "points": [[0.5]]}, ("points.0",)),
    ("annotate", {**STROKE, "points": "0.1,0.2"}, ("points",)),
    ("annotate", {**STROKE, "colour": "red"}, ("colour", "#rrggbb")),
    ("annotate", {**STROKE, "width": 100}, ("width", "less than or equal to 20")),
    ("annotate", {**STROKE, "clear": "true"}, ("clear", "valid boolean")),
    ("annotate", {**STROKE, "media_time": -1}, ("media_time", "greater than or equal to 0")),
    ("annotate", {"target_track": "cam-1"}, ("a stroke needs points",)),
    ("annotate", {"points": [[0.1, 0.1]]}, ("target_track", "Field required")),
    ("pointer", {"target_track": "cam-1", "x": "left", "y": 0.5}, ("x",)),
    ("pointer", {"target_track": "cam-1", "x": 0.5}, ("y", "Field required")),
    ("pointer", {"target_track": "cam-1", "x": -0.1, "y": 0.5}, ("x", "greater than or equal")),
    ("set_trainee_chat", {"open": "perhaps"}, ("open", "valid boolean")),
    ("set_trainee_chat", {"open": 1}, ("open", "valid boolean")),
    ("set_trainee_chat", {}, ("open", "Field required")),
]


async def test_malformed_payloads_are_refused_naming_the_field(
    start_sig_server: ServerFactory,
) -> None:
    """One room for the whole table (a test per row would spend its time setting rooms up);
    each row is checked and reported on its own. The table is longer than the default burst."""
    server = await start_sig_server(event_burst=len(MALFORMED) + 10)
    cid, village, specialist = await specialist_room(server)
    before = await server.event_kinds(cid)
    wrong: list[str] = []
    for event, payload, words in MALFORMED:
        ack = await specialist.call(event, payload)
        error = ack.get("error") or {}
        if error.get("code") != "invalid_payload" or not all(
            w in error.get("message", "") for w in words
        ):
            wrong.append(f"{event} {payload!r}: expected invalid_payload naming {words}, got {ack}")
            continue
        assert error["event"] == event
        assert error["message"].startswith("invalid payload: ")
        assert specialist.events("error")[-1] == error
    assert not wrong, "\n".join(wrong)
    assert await server.event_kinds(cid) == before
    assert specialist.connected and village.connected
    await specialist.ok("chat", {"text": "格式都错了，但我还在"})


async def test_binary_attachments_are_refused(sig_server: SignalingServer) -> None:
    server = sig_server
    cid, _, specialist = await specialist_room(server)
    error = await specialist.refused("chat", {"text": b"binary text"})
    assert error["code"] == "invalid_payload"
    assert not any(e.kind is EventKind.CHAT for e in await server.events(cid))


ROOM_EVENTS: list[tuple[str, Any]] = [
    ("leave", None),
    ("admit", {"participant": "p_0123456789ab"}),
    ("deny", {"participant": "p_0123456789ab"}),
    ("chat", {"text": "有人吗"}),
    ("raise_hand", None),
    ("lower_hand", None),
    ("mute", {"participant": "p_0123456789ab", "kind": "audio"}),
    ("remove", {"participant": "p_0123456789ab", "reason": "测试"}),
    ("consent", {"kind": "consultation", "granted": True}),
    ("annotate", STROKE),
    ("pointer", {"target_track": "cam-1", "x": 0.5, "y": 0.5}),
    ("set_trainee_chat", {"open": True}),
    ("end_session", None),
]


async def test_room_events_before_joining_are_not_in_room(sig_server: SignalingServer) -> None:
    server = sig_server
    cid = (await server.scheduled()).id
    specialist = await server.connect(SPECIALIST, label="specialist")
    for event, payload in ROOM_EVENTS:
        error = await specialist.refused(event, payload)
        assert (error["code"], error["message"]) == ("not_in_room", "join a consultation first")
    # Nothing happened anywhere: the consultation was not even opened.
    assert (await server.record(cid)).sessions == []


async def test_room_events_while_waiting_are_not_in_room(sig_server: SignalingServer) -> None:
    server = sig_server
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident, pid = await server.waiting(token, cid, label="resident")
    before = await server.event_kinds(cid)
    for event, payload in ROOM_EVENTS:
        if event == "leave":
            continue  # a waiting participant may leave the waiting room
        error = await resident.refused(event, payload)
        assert error["code"] == "not_in_room", (event, error)
        assert error["message"] == "join the room (and be admitted) first"
    assert await server.event_kinds(cid) == before
    await resident.ok("leave")
    assert await village.wait_for("participant_left") == {"participant": pid, "reason": "left"}


async def test_a_misbehaving_client_never_disconnects_the_others(
    start_sig_server: ServerFactory,
) -> None:
    server = await start_sig_server(events_per_second=5.0, event_burst=10, **SMALL)
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, label="resident")
    rogue = await server.seated(COUNTY, cid, label="rogue")

    junk: list[tuple[str, Any]] = [
        ("chat", {"text": "x" * 5000}),
        ("chat", ["not", "an", "object"]),
        ("annotate", {"target_track": "../../etc", "points": [[2, 2]]}),
        ("no_such_event", {}),
        ("disconnect", {}),
        ("join", {"consultation_id": cid}),  # already joined
        ("mute", {"participant": village.participant_id, "kind": "audio"}),  # not allowed
        ("remove", {"participant": resident.participant_id, "reason": "走"}),  # not allowed
    ] * 3
    codes = {(await rogue.call(event, payload))["error"]["code"] for event, payload in junk}
    assert codes <= {
        "payload_too_large",
        "invalid_payload",
        "unknown_event",
        "already_joined",
        "forbidden",
        "rate_limited",
    }
    assert "rate_limited" in codes

    # A frame over the transport's 1 MiB limit: the rogue's own connection is closed.
    await rogue.sio.emit("chat", {"text": "x" * (1024 * 1024 + 1)}, namespace="/consult")
    await rogue.wait_disconnected()

    for peer in (village, resident):
        assert peer.connected
        assert "error" not in peer.names()
    await resident.ok("chat", {"text": "我们没事"})
    await village.wait_for("chat_message", lambda m: m["text"] == "我们没事")
    await village.ok("chat", {"text": "继续问诊"})
    await resident.wait_for("chat_message", lambda m: m["text"] == "继续问诊")
    assert server.namespace.connection_count == 2


async def test_a_nul_character_is_refused_on_every_backend(backend_config: Config) -> None:
    """U+0000 is valid JSON but never clinical text: refused before it reaches any database
    (conftest's backend_config: SQLite, and PostgreSQL when configured)."""
    server = await start_signaling_server(backend_config)
    try:
        cid = (await server.scheduled()).id
        village = await server.seated(VILLAGE, cid, label="village")
        county = await server.connect(COUNTY, label="county")
        answers = [
            await village.call("chat", {"text": "血氧\x0092%"}),
            await county.call("join", {"consultation_id": cid, "device": "cam\x00"}),
        ]
        for ack in answers:
            assert ack["error"]["code"] == "invalid_payload", ack
            assert "control characters" in ack["error"]["message"]
        stored = [e.data["text"] for e in await server.events(cid) if e.kind is EventKind.CHAT]
        assert stored == []
        await village.ok("chat", {"text": "之后"})
    finally:
        await server.close()
