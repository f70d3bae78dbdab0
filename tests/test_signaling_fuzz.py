"""Hypothesis-generated payloads for every client event, over a real connection: the server
never fails (`internal`), answers every payload with an acknowledgement — the very code the
documented order of checks predicts for an oversized or invalid one — and the connection and
the room stay usable afterwards.

How hypothesis meets asyncio here: each test is a plain (sync) test that owns an
`asyncio.Runner`, i.e. its own event loop. It starts the server and the clients on that loop,
then calls an inner `@given` function whose body runs one round trip with `runner.run(...)`.
Between examples the loop simply pauses (nothing in the room is on a timer shorter than the
engine.io heartbeat). After hypothesis is done, the same loop checks that the room still works
and shuts everything down. Hypothesis keeps generating and shrinking as usual, the asyncio
state lives across examples, and no thread or function-scoped-fixture workaround is needed.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from signaling_fixtures import (
    SPECIALIST,
    VILLAGE,
    Peer,
    SignalingServer,
    signaling_config,
    start_signaling_server,
)

from rooms.roles import Role
from signaling import events as ev

pytest_plugins = ["signaling_fixtures"]

PAYLOAD_LIMIT = 4096
CHAT_LIMIT = 50
POINTS_LIMIT = 20
CONFIG = {
    "max_payload_bytes": PAYLOAD_LIMIT,
    "chat_max_chars": CHAT_LIMIT,
    "annotation_max_points": POINTS_LIMIT,
    # Examples arrive as fast as the server answers: the rate limit is not under test here.
    "events_per_second": 100_000.0,
    "event_burst": 100_000,
}
FAKE_PARTICIPANT = "p_0123456789ab"
NO_CONSULTATION = "c_0000000000000000"

# The schema of each client event (docs/protocol.md), and a valid payload to mutate.
MODELS: dict[str, type[BaseModel]] = {
    "join": ev.Join,
    "leave": ev.Empty,
    "admit": ev.Admit,
    "deny": ev.Deny,
    "chat": ev.Chat,
    "raise_hand": ev.Empty,
    "lower_hand": ev.Empty,
    "mute": ev.Mute,
    "remove": ev.Remove,
    "consent": ev.GiveConsent,
    "annotate": ev.Annotate,
    "pointer": ev.Pointer,
    "set_trainee_chat": ev.TraineeChat,
    "end_session": ev.Empty,
}
VALID: dict[str, dict[str, Any]] = {
    "join": {"consultation_id": NO_CONSULTATION, "device": "tablet"},
    "leave": {},
    "admit": {"participant": FAKE_PARTICIPANT},
    "deny": {"participant": FAKE_PARTICIPANT, "reason": "不在本次会诊"},
    "chat": {"text": "你好"},
    "raise_hand": {},
    "lower_hand": {},
    "mute": {"participant": FAKE_PARTICIPANT, "kind": "audio"},
    "remove": {"participant": FAKE_PARTICIPANT, "reason": "测试"},
    "consent": {"kind": "recording", "granted": True},
    "annotate": {
        "target_track": "cam-1",
        "points": [[0.1, 0.2], [0.3, 0.4]],
        "colour": "#ff0000",
        "width": 3.0,
        "clear": False,
        "media_time": 1.5,
    },
    "pointer": {"target_track": "cam-1", "x": 0.5, "y": 0.5},
    "set_trainee_chat": {"open": True},
    "end_session": {},
}
# What a payload that passes size and schema may still be told, by whom it is sent: the
# stranger has joined nothing (and the consultation named does not exist), the resident gives
# consent, the specialist sends the rest. Anything else — above all `internal` — is a failure.
DOMAIN_CODES: dict[str, set[str]] = {
    "join": {"not_found"},
    "admit": {"no_such_participant"},
    "deny": {"no_such_participant"},
    "chat": {"chat_too_long"},
    "raise_hand": {"no_change"},
    "lower_hand": {"no_change"},
    "mute": {"no_such_participant"},
    "remove": {"no_such_participant"},
    "consent": {"invalid_consent"},
    "annotate": {"too_many_points"},
}
# A valid `leave` or `end_session` would end the experiment: only invalid ones are sent.
ONLY_INVALID = {"leave", "end_session"}
assert set(MODELS) == set(VALID)

# --- strategies ----------------------------------------------------------------------------

# docs/protocol.md, Limits: nesting, digits of an integer.
MAX_NESTING = 32
MAX_DIGITS = 100
# Integers of thousands of digits too: the server refuses more than 100 (invalid_payload).
INTS = st.integers(min_value=-(10**120), max_value=10**120) | st.sampled_from(
    [10**100 - 1, 10**100, -(10**100), 7 * 10**3000]
)
# Lone surrogates (python-socketio escapes them as `\ud800`), controls, bidi overrides, line
# and paragraph separators, a BOM.
ODD_TEXT = st.text(
    st.sampled_from("\ud800\udfff\x00\x1b\u202e\u200f\u2028\u2029\ufeffa汉"), max_size=6
)
SCALARS = (
    st.none()
    | st.booleans()
    | INTS
    | st.floats()  # NaN and ±Infinity included: python-socketio sends them as bare literals
    | st.just(1e400)  # inf, as a JSON number out of range decodes
    | st.text(max_size=20)
    | ODD_TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def nest(value: Any, depth: int, as_object: bool) -> Any:
    for _ in range(depth):
        value = {"a": value} if as_object else [value]
    return value


# Around the nesting limit, and far beyond it (python-socketio's own encoder stops near 1000).
DEEP = st.builds(nest, JSON, st.sampled_from([29, 30, 31, 32, 33, 40, 500]), st.booleans())
EDGES: st.SearchStrategy[Any] = st.sampled_from(
    [
        "",
        " ",
        "\t\n",
        "\x00",
        "\u202e",
        "p_" + "a" * 62,
        "p_" + "a" * 63,
        "y" * CHAT_LIMIT,
        " " + "y" * CHAT_LIMIT + " ",
        "y" * (CHAT_LIMIT + 1),
        "z" * (PAYLOAD_LIMIT + 1),
        -0.0,
        0,
        1,
        1.0000001,
        -1e-300,
        1e308,
        2**63,
        -(2**63),
        [],
        {},
        [[0.5, 0.5]] * POINTS_LIMIT,
        [[0.5, 0.5]] * (POINTS_LIMIT + 1),
        [[0.5, 0.5, 0.5]],
        [["0.5", "0.5"]],
        "#FFFFFF",
        "#ggg000",
        "audio",
        "video",
        "teaching",
        "true",
        True,
        False,
        None,
    ]
)
FIELD_NAMES = st.sampled_from(
    ["text", "participant", "kind", "reason", "points", "x", "y", "open", "device", "__proto__"]
) | st.text(min_size=1, max_size=12)


@st.composite
def near_valid(draw: st.DrawFn, valid: dict[str, Any]) -> Any:
    """A valid payload with one to three things wrong (or, now and then, nothing)."""
    payload: dict[str, Any] = json.loads(json.dumps(valid))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        keys = sorted(payload)
        mutation = draw(st.sampled_from(["drop", "add", "replace", "edge", "wrap", "case"]))
        if mutation == "drop" and keys:
            del payload[draw(st.sampled_from(keys))]
        elif mutation == "add":
            payload[draw(FIELD_NAMES)] = draw(JSON | EDGES | DEEP)
        elif mutation in ("replace", "edge") and keys:
            payload[draw(st.sampled_from(keys))] = draw(
                JSON | DEEP if mutation == "replace" else EDGES
            )
        elif mutation == "wrap" and keys:
            key = draw(st.sampled_from(keys))
            payload[key] = draw(
                st.sampled_from([[payload[key]], {"value": payload[key]}, str(payload[key])])
            )
        elif mutation == "case" and keys:
            key = draw(st.sampled_from(keys))
            payload[key.upper() if key != key.upper() else key + "_"] = payload.pop(key)
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        # Not an object at all, though close to one.
        return draw(st.sampled_from([[payload], json.dumps(payload), list(payload.items())]))
    return payload


IDS = st.from_regex(r"[A-Za-z0-9_.@:-]{1,64}", fullmatch=True) | st.text(max_size=70)
UNIT = st.floats(min_value=-0.25, max_value=1.25) | st.integers(min_value=-1, max_value=2)
# Values each field plausibly takes, valid or nearly so.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "consultation_id": IDS,
    "device": st.text(max_size=45),
    "participant": IDS,
    "reason": st.text(max_size=30) | st.text(min_size=495, max_size=505),
    "text": st.text(max_size=CHAT_LIMIT + 5) | st.just("w" * PAYLOAD_LIMIT),
    "kind": st.sampled_from(["audio", "video", "consultation", "recording", "teaching", "x"]),
    "granted": st.booleans() | st.sampled_from(["true", 1, 0, None]),
    "on_behalf_of": st.none() | IDS,
    "target_track": IDS,
    "points": st.lists(st.lists(UNIT, min_size=2, max_size=2), max_size=POINTS_LIMIT + 2),
    "colour": st.from_regex(r"#[0-9a-fA-F]{6}", fullmatch=True) | st.text(max_size=8),
    "width": st.floats(min_value=0, max_value=25) | st.integers(min_value=-1, max_value=30),
    "clear": st.booleans(),
    "media_time": st.none() | st.floats(min_value=-1, max_value=1e6),
    "x": UNIT,
    "y": UNIT,
    "open": st.booleans() | st.sampled_from(["false", 0, None]),
}


def plausible(event: str) -> st.SearchStrategy[dict[str, Any]]:
    """The event's own fields (any of them may be missing) with plausible values."""
    return st.fixed_dictionaries({}, optional={k: FIELDS[k] for k in VALID[event]})


def payloads(event: str) -> st.SearchStrategy[Any]:
    """Arbitrary JSON, near-valid mutations of a valid payload, and plausible field values."""
    generated = JSON | DEEP | near_valid(VALID[event])
    return generated if event in ONLY_INVALID else generated | plausible(event)


# --- the oracle ----------------------------------------------------------------------------


def encoded_size(payload: Any) -> int:
    """The size docs/protocol.md limits: the argument as compact UTF-8 JSON."""
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())


def unreadable(payload: Any) -> bool:
    """What docs/protocol.md refuses whatever the event: nesting deeper than 32 levels, an
    integer of more than 100 digits, a number that is not finite, a lone surrogate."""
    stack = [(payload, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list | tuple):  # a tuple is sent as an array
            if level > MAX_NESTING:
                return True
            items = [*value, *value.values()] if isinstance(value, dict) else value
            stack.extend((item, level + 1) for item in items)
        elif isinstance(value, str):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
                return True
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            if len(str(abs(value))) > MAX_DIGITS:
                return True
        elif isinstance(value, float) and not math.isfinite(value):
            return True
    return False


def expected_refusal(event: str, payload: Any) -> str | None:
    """`payload_too_large` or `invalid_payload` where the documented order of checks says so,
    else None (the event's own rules decide)."""
    if unreadable(payload):
        return "invalid_payload"
    wire = json.loads(json.dumps(payload))  # what the server decodes
    if encoded_size(wire) > PAYLOAD_LIMIT:
        return "payload_too_large"
    try:
        MODELS[event].model_validate({} if wire is None else wire)
    except ValidationError:
        return "invalid_payload"
    return None


@dataclass
class FuzzRoom:
    server: SignalingServer
    cid: str
    specialist: Peer
    resident: Peer
    stranger: Peer
    witness: Peer

    @classmethod
    async def start(cls, data_dir: Path) -> FuzzRoom:
        server = await start_signaling_server(signaling_config(data_dir, **CONFIG))
        try:
            cid = (await server.scheduled()).id
            witness = await server.seated(VILLAGE, cid, label="witness")
            specialist = await server.seated(SPECIALIST, cid, label="fuzzer")
            token, _ = await server.invite(cid, Role.RESIDENT)
            resident = await server.admitted(token, cid, witness, label="resident fuzzer")
            stranger = await server.connect(SPECIALIST, label="stranger")
        except BaseException:
            await server.close()
            raise
        return cls(server, cid, specialist, resident, stranger, witness)

    def sender(self, event: str) -> Peer:
        if event == "join":
            return self.stranger
        return self.resident if event == "consent" else self.specialist

    async def check(self, event: str, payload: Any) -> None:
        sender = self.sender(event)
        ack = await sender.call(event, payload)
        assert isinstance(ack, dict) and isinstance(ack.get("ok"), bool), ack
        expected = expected_refusal(event, payload)
        if ack["ok"]:
            assert expected is None, (payload, ack)
            assert set(ack) == {"ok"}
            return
        error = ack["error"]
        assert set(error) == {"code", "message", "event"}, error
        assert error["event"] == event
        assert error["code"] != "internal", (payload, error)
        if expected is not None:
            assert error["code"] == expected, (payload, error)
        else:
            assert error["code"] in DOMAIN_CODES.get(event, set()), (payload, error)
        # Also told as an `error` event, which arrives before the acknowledgement.
        assert sender.events("error")[-1] == error
        assert sender.connected

    async def still_usable(self) -> None:
        for peer in (self.specialist, self.resident, self.stranger, self.witness):
            assert peer.connected, peer
        await self.specialist.ok("chat", {"text": "模糊测试之后"})
        message = await self.witness.wait_for("chat_message", lambda m: m["text"] == "模糊测试之后")
        assert message["participant"] == self.specialist.participant_id
        assert self.server.namespace.connection_count == 4
        room = await self.server.presence(self.cid)
        assert room is not None
        assert {p.participant_id for p in room.admitted()} == {
            self.witness.participant_id,
            self.specialist.participant_id,
            self.resident.participant_id,
        }


FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("event", list(MODELS))
def test_fuzzed_payloads_never_break_the_room(event: str, tmp_path: Path) -> None:
    with asyncio.Runner() as runner:
        room = runner.run(FuzzRoom.start(tmp_path))
        try:

            @FUZZ
            @given(payload=payloads(event))
            def one_payload(payload: Any) -> None:
                if event in ONLY_INVALID:
                    assume(expected_refusal(event, payload) is not None)
                runner.run(room.check(event, payload))

            one_payload()
            runner.run(room.still_usable())
        finally:
            runner.run(room.server.close())
