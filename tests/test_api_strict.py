"""Strict input, one row per concrete case of issue 10 (sections 3 and 5): a JSON body is read
as the document says it is written (no coerced type, no duplicate key, no number out of range,
only application/json), clinical times stay in their window, and free text that could spoof a
name or a line of the record is refused naming the code point; REST and socket alike."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest
from api_helpers import (
    ADMIN,
    COUNTY,
    SPECIALIST,
    VILLAGE,
    Api,
    Reply,
    assert_problem,
    consultation_body,
    one,
)
from signaling_fixtures import Peer, ServerFactory

pytest_plugins = ["signaling_fixtures"]

CREATE = "/api/v1/consultations"
JSON = {"Content-Type": "application/json"}


def with_resident(**fields: Any) -> dict[str, Any]:
    body = consultation_body()
    body["resident"] = {**body["resident"], **fields}
    return body


def raw_create(resident_age: str) -> str:
    """A create body whose resident's age is the literal JSON text given."""
    text = json.dumps(with_resident(age=0), ensure_ascii=False)
    return text.replace('"age": 0', f'"age": {resident_age}')


async def assert_nothing_created(api: Api) -> None:
    assert (await api.get(CREATE, VILLAGE)).body["items"] == []


# --- types are not coerced (section 5) --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        (with_resident(age="72"), "resident.age", "valid integer"),
        (with_resident(age=72.0), "resident.age", "valid integer"),
        (with_resident(age=True), "resident.age", "valid integer"),
        (consultation_body(preferred_time=12345), "preferred_time", "RFC 3339 string"),
        (consultation_body(preferred_time="12345"), "preferred_time", "RFC 3339"),
        (consultation_body(preferred_time="2025-03-01"), "preferred_time", "RFC 3339"),
        (consultation_body(preferred_time="2025-03-01 09:00:00+08:00"), "preferred_time", "RFC"),
        (consultation_body(preferred_time="0001-01-01T00:00:00+08:00"), "preferred_time", "1900"),
        (consultation_body(preferred_time="9999-12-31T23:59:59-08:00"), "preferred_time", "2200"),
        (consultation_body(preferred_time="1899-12-31T23:59:59Z"), "preferred_time", "1900"),
        (consultation_body(preferred_time="2201-01-01T00:00:00Z"), "preferred_time", "2200"),
        (consultation_body(specialty=["respiratory"]), "specialty", "valid string"),
        # \w would take any letter; the document's pattern (ECMA) means ASCII.
        (with_resident(pseudonym="刘奶奶"), "resident.pseudonym", "pattern"),
        (with_resident(pseudonym="Ì9"), "resident.pseudonym", "pattern"),
    ],
)
async def test_create_takes_no_coerced_type(
    api: Api, body: dict[str, Any], path: str, message: str
) -> None:
    reply = await api.post(CREATE, VILLAGE, body)
    problem = assert_problem(reply, 400, f"{path}: ")
    assert [e["path"] for e in problem["errors"]] == [path]
    assert message in problem["errors"][0]["message"]
    await assert_nothing_created(api)


@pytest.mark.parametrize(
    "when", ["1900-01-01T00:00:00+14:00", "2200-12-31T23:59:59-12:00", "2025-03-01T01:00:00.5z"]
)
async def test_times_at_the_edges_of_the_window_are_kept(api: Api, when: str) -> None:
    reply = await api.post(CREATE, VILLAGE, consultation_body(preferred_time=when))
    assert reply.status == 201, reply
    got = (await api.get(one(reply.body["id"]), VILLAGE)).body["preferred_time"]
    assert got is not None


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("0001-01-01T00:00:00+08:00", "from 1900 to 2200"),
        ("9999-12-31T23:59:59-08:00", "from 1900 to 2200"),
        (1_740_000_000, "RFC 3339 string"),
        (True, "RFC 3339 string"),
    ],
)
async def test_schedule_refuses_times_out_of_the_window(api: Api, when: Any, message: str) -> None:
    cid = await api.create()
    await api.act(cid, "accept", COUNTY)
    reply = await api.post(one(cid, "/schedule"), COUNTY, {"scheduled_time": when})
    problem = assert_problem(reply, 400, "scheduled_time: ", message)
    assert [e["path"] for e in problem["errors"]] == ["scheduled_time"]
    assert (await api.get(one(cid), COUNTY)).body["status"] == "accepted"


@pytest.mark.parametrize(
    ("tail", "body", "path"),
    [
        ("/opinions/sign", {"version": True}, "version"),
        ("/opinions/sign", {"version": "1"}, "version"),
        ("/opinions/sign", {"version": 1.0}, "version"),
        ("/opinions/sign", {"version": 2**31}, "version"),
        ("/invites", {"role": "resident", "ttl_s": "60"}, "ttl_s"),
        ("/invites", {"role": "resident", "ttl_s": True}, "ttl_s"),
        ("/invites", {"role": "resident", "ttl_s": 60.0}, "ttl_s"),
        ("/decline", {"reason": 42}, "reason"),
    ],
)
async def test_other_bodies_take_no_coerced_type(
    api: Api, tail: str, body: dict[str, Any], path: str
) -> None:
    cid = await api.create()
    who = COUNTY if tail in ("/opinions/sign", "/decline") else VILLAGE
    problem = assert_problem(await api.post(one(cid, tail), who, body), 400, f"{path}: ")
    assert [e["path"] for e in problem["errors"]] == [path]


async def test_an_identifier_in_a_query_is_ascii(api: Api) -> None:
    reply = await api.get("/api/v1/audit", ADMIN, params={"consultation": "Ì9"})
    assert_problem(reply, 400, "consultation")


# --- numbers JSON text can hold but no field can (sections 3 and 5) ---------------------------


@pytest.mark.parametrize(
    ("literal", "fragment"),
    [
        ("1" * 5000, "an integer of 5000 characters"),
        ("-" + "9" * 4301, "an integer of 4302 characters"),
        ("1e-400", "1e-400, which is too small to hold"),
        ("1e400", "1e400, which is out of range"),
        ("-1E+400", "-1E+400, which is out of range"),
        ("0." + "0" * 200 + "1", "a number of 203 characters"),
        ("NaN", "NaN is not a JSON number"),
        ("Infinity", "Infinity is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
    ],
)
async def test_numbers_out_of_range_are_400(api: Api, literal: str, fragment: str) -> None:
    reply = await api.request("POST", CREATE, VILLAGE, data=raw_create(literal), headers=JSON)
    assert_problem(reply, 400, fragment)
    await assert_nothing_created(api)


async def test_a_huge_integer_is_refused_on_every_body(api: Api) -> None:
    cid = await api.create()
    raw = '{"version": ' + "7" * 10_000 + "}"
    reply = await api.request("POST", one(cid, "/opinions/sign"), COUNTY, data=raw, headers=JSON)
    assert_problem(reply, 400, "an integer of 10000 characters")


async def test_zero_is_still_a_number(api: Api) -> None:
    reply = await api.request("POST", CREATE, VILLAGE, data=raw_create("0e-400"), headers=JSON)
    assert reply.status == 400  # an age is an integer; but 0e-400 is no underflow
    assert "too small" not in reply.body["detail"]
    assert "resident.age" in reply.body["detail"]


# --- duplicate keys (section 5) ---------------------------------------------------------------


async def test_a_duplicate_key_does_not_mint_another_invite(api: Api) -> None:
    cid = await api.create()
    raw = '{"role": "guardian", "name": "刘女儿", "role": "resident"}'
    reply = await api.request("POST", one(cid, "/invites"), VILLAGE, data=raw, headers=JSON)
    assert_problem(reply, 400, "gives the key 'role' more than once")
    minted = [a for a in await api.audit(consultation=cid) if a["action"] == "invite"]
    assert minted == []


@pytest.mark.parametrize(
    "raw",
    [
        raw_create("72").replace('"sex": "female"', '"sex": "female", "sex": "male"'),
        raw_create("72").replace('"reason": ', '"reason": "x", "reason": '),
        '{"team": [{"user_id": "a", "user_id": "b"}]}',
    ],
)
async def test_duplicate_keys_at_any_depth_are_400(api: Api, raw: str) -> None:
    reply = await api.request("POST", CREATE, VILLAGE, data=raw, headers=JSON)
    assert_problem(reply, 400, "more than once")
    await assert_nothing_created(api)


# --- what the body is made of ------------------------------------------------------------------


async def test_nesting_deeper_than_any_body_needs_is_400(api: Api) -> None:
    raw = '{"team": ' + "[" * 16 + "]" * 16 + "}"
    reply = await api.request("POST", CREATE, VILLAGE, data=raw, headers=JSON)
    assert_problem(reply, 400, "nested deeper than 16 levels")
    # Brackets inside strings are text, not nesting.
    body = consultation_body(case_summary="[" * 5000 + "{" * 5000)
    assert (await api.post(CREATE, VILLAGE, body)).status == 201


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ('{"reason": "\\ud800"}', "lone surrogate U+D800"),
        ('{"\\udfff": 1}', "lone surrogate U+DFFF"),
        (json.dumps(consultation_body()).encode("utf-16"), "not UTF-8"),
        (b'{"reason": "\xe5\x92"}', "not UTF-8"),
    ],
)
async def test_a_body_that_is_not_text_is_400(api: Api, raw: str | bytes, fragment: str) -> None:
    reply = await api.request("POST", CREATE, VILLAGE, data=raw, headers=JSON)
    assert_problem(reply, 400, fragment)


async def test_a_body_that_is_not_its_content_encoding_is_400(api: Api) -> None:
    body = json.dumps(consultation_body()).encode()
    gzip_headers = {**JSON, "Content-Encoding": "gzip"}
    reply = await api.request("POST", CREATE, VILLAGE, data=body, headers=gzip_headers)
    assert assert_problem(reply, 400, "could not be decoded as its Content-Encoding")["code"] == (
        "bad_content_encoding"
    )
    await assert_nothing_created(api)
    reply = await api.request(
        "POST", CREATE, VILLAGE, data=gzip.compress(body), headers=gzip_headers
    )
    assert reply.status == 201, reply


# --- Content-Type (section 5) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "fragment"),
    [
        ("text/plain", "must be application/json, not 'text/plain'"),
        ("application/x-www-form-urlencoded", "not 'application/x-www-form-urlencoded'"),
        ("application/merge-patch+json", "not 'application/merge-patch+json'"),
        ("application/json; charset=latin-1", "must be UTF-8, not charset 'latin-1'"),
        (None, "needs Content-Type: application/json"),
    ],
)
async def test_a_body_that_is_not_declared_json_is_415(
    api: Api, content_type: str | None, fragment: str
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = json.dumps(consultation_body()).encode()
    # aiohttp's client adds application/octet-stream to bytes; skip_auto_headers cannot be
    # passed through Api, so "no header" is sent with a raw request.
    if content_type is None:
        reply = await raw_post_without_content_type(api, CREATE, body)
    else:
        reply = await api.request("POST", CREATE, VILLAGE, data=body, headers=headers)
    problem = assert_problem(reply, 415, fragment)
    assert problem["code"] == "unsupported_media_type"
    await assert_nothing_created(api)


async def raw_post_without_content_type(api: Api, path: str, body: bytes) -> Reply:
    async with api.client.post(
        path, data=body, headers=api.auth(VILLAGE), skip_auto_headers=["Content-Type"]
    ) as resp:
        raw = await resp.read()
        return Reply(resp.status, resp.headers, raw, json.loads(raw))


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON; charset=UTF-8"],
)
async def test_json_with_or_without_its_charset_is_read(api: Api, content_type: str) -> None:
    body = json.dumps(consultation_body(), ensure_ascii=False).encode()
    headers = {"Content-Type": content_type}
    reply = await api.request("POST", CREATE, VILLAGE, data=body, headers=headers)
    assert reply.status == 201, reply


async def test_an_empty_body_needs_no_content_type(api: Api) -> None:
    cid = await api.create()
    reply = await raw_post_without_content_type(api, one(cid, "/accept"), b"")
    assert reply.status == 403  # the village doctor may not accept: read, then refused


# --- free text that can spoof the record (section 5) ------------------------------------------

SPOOFING = [
    ("\u202e", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("\u202a", "U+202A"),
    ("\u2066", "U+2066"),
    ("\u2069", "U+2069"),
    ("\u200e", "U+200E"),
    ("\u200f", "U+200F"),
    ("\u2028", "U+2028 (LINE SEPARATOR)"),
    ("\u2029", "U+2029"),
    ("\u0085", "U+0085"),
    ("\u009b", "U+009B"),
    ("\u007f", "U+007F"),
    ("\x1b", "U+001B"),
    ("\ufeff", "U+FEFF"),
    ("\u200b", "U+200B"),
]


@pytest.mark.parametrize(("char", "named"), SPOOFING)
@pytest.mark.parametrize(
    ("where", "path"),
    [
        ("display_name", "resident.display_name"),
        ("reason", "reason"),
        ("case_summary", "case_summary"),
        ("institution", "team.0.institution"),
    ],
)
async def test_spoofing_characters_are_refused_in_rest_text(
    api: Api, char: str, named: str, where: str, path: str
) -> None:
    body = consultation_body()
    text = f"刘奶奶{char}gnp.exe"
    if where == "display_name":
        body["resident"]["display_name"] = text
    elif where == "institution":
        body["team"][0]["institution"] = text
    else:
        body[where] = text
    problem = assert_problem(await api.post(CREATE, VILLAGE, body), 400, f"{path}: ", named)
    assert [e["path"] for e in problem["errors"]] == [path]
    await assert_nothing_created(api)


@pytest.mark.parametrize(
    ("tail", "who", "body", "path"),
    [
        ("/decline", COUNTY, {"reason": "忙\u202e"}, "reason"),
        ("/team", VILLAGE, {**{"user_id": "x", "role": "county_physician"}, "name": "王\u2067",
                           "institution": "县医院"}, "name"),
        ("/invites", VILLAGE, {"role": "guardian", "name": "刘\n女儿"}, "name"),
        ("/opinions", COUNTY, {"findings": "a\u2028b", "assessment": "a", "recommendations": "r"},
         "findings"),
    ],
)  # fmt: skip
async def test_spoofing_characters_are_refused_in_every_rest_body(
    api: Api, tail: str, who: Any, body: dict[str, Any], path: str
) -> None:
    cid = await api.create()
    problem = assert_problem(await api.post(one(cid, tail), who, body), 400, f"{path}: ")
    assert [e["path"] for e in problem["errors"]] == [path]


async def test_a_name_is_one_line_but_a_summary_may_have_many(api: Api) -> None:
    reply = await api.post(CREATE, VILLAGE, with_resident(display_name="刘奶奶\n张医生: 已签字"))
    assert_problem(reply, 400, "resident.display_name: ", "U+000A")
    ordinary = consultation_body(
        case_summary="COPD 病史 8 年；\n\t近两月气短加重。\r\n家属: 👨‍👩‍👧 ❤️ 🇨🇳",
        reason="反复咳嗽、气短两个月（夜间加重）",
    )
    ordinary["resident"]["display_name"] = "刘奶奶 👵🏻"
    reply = await api.post(CREATE, VILLAGE, ordinary)
    assert reply.status == 201, reply
    assert reply.body["case_summary"] == ordinary["case_summary"]
    assert reply.body["resident"]["display_name"] == "刘奶奶 👵🏻"


# --- the same rules on the socket (section 5) -------------------------------------------------

STROKE = {"target_track": "cam-1", "points": [[0.1, 0.1], [0.2, 0.2]]}


async def specialist_in_a_room(server_factory: ServerFactory) -> Peer:
    server = await server_factory(event_burst=100)
    cid = (await server.scheduled()).id
    await server.seated(VILLAGE, cid, label="village")
    return await server.seated(SPECIALIST, cid, label="specialist")


SOCKET_REFUSED: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("annotate", {**STROKE, "points": [["0.1", 0.1]]}, ("points.0.0", "valid number")),
    ("annotate", {**STROKE, "points": [[True, 0.1]]}, ("points.0.0", "valid number")),
    ("annotate", {**STROKE, "width": "3"}, ("width", "valid number")),
    ("annotate", {**STROKE, "width": True}, ("width", "valid number")),
    ("annotate", {**STROKE, "media_time": "12.5"}, ("media_time", "valid number")),
    ("pointer", {"target_track": "cam-1", "x": "0.5", "y": 0.5}, ("x", "valid number")),
    ("pointer", {"target_track": "cam-1", "x": 0.5, "y": False}, ("y", "valid number")),
    ("chat", {"text": "血氧 92%\u202e"}, ("text", "U+202E")),
    ("chat", {"text": "好的\u2028张医生: 同意"}, ("text", "U+2028")),
    ("chat", {"text": "a\u0085b"}, ("text", "U+0085")),
    # pydantic itself refuses a lone surrogate in a string.
    ("chat", {"text": "a\ud800b"}, ("text", "lone surrogate")),
    ("deny", {"participant": "p_x", "reason": "\u2066no"}, ("reason", "U+2066")),
    ("remove", {"participant": "p_x", "reason": "bye\ufeff"}, ("reason", "U+FEFF")),
]


async def test_socket_events_take_no_coerced_type_or_spoofing_text(
    start_sig_server: ServerFactory,
) -> None:
    specialist = await specialist_in_a_room(start_sig_server)
    wrong: list[str] = []
    for event, payload, words in SOCKET_REFUSED:
        ack = await specialist.call(event, payload)
        error = ack.get("error") or {}
        if error.get("code") != "invalid_payload" or not all(
            w in error.get("message", "") for w in words
        ):
            wrong.append(f"{event} {payload!r}: expected invalid_payload naming {words}, got {ack}")
    assert not wrong, "\n".join(wrong)
    # Integers are numbers, and a chat line may have line breaks.
    await specialist.ok("annotate", {**STROKE, "points": [[0, 1]], "width": 4, "media_time": 3})
    await specialist.ok("chat", {"text": "第一行\n第二行 👍"})


async def test_a_device_label_is_one_line(start_sig_server: ServerFactory) -> None:
    server = await start_sig_server()
    cid = (await server.scheduled()).id
    county = await server.connect(COUNTY, label="county")
    ack = await county.call("join", {"consultation_id": cid, "device": "cam\n张医生"})
    assert ack["error"]["code"] == "invalid_payload", ack
    assert "U+000A" in ack["error"]["message"]
