"""Bad input never yields a 500: every refusal is a 4xx application/problem+json that names
what was wrong."""

from __future__ import annotations

import json
from typing import Any

import pytest
from api_helpers import (
    ADMIN,
    COUNTY,
    VILLAGE,
    Api,
    assert_problem,
    consultation_body,
    error_paths,
    member_body,
    one,
    opinion_body,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from server.app import create_app
from server.config import Config

CREATE = "/api/v1/consultations"
JSON = {"Content-Type": "application/json"}


def with_resident(**fields: Any) -> dict[str, Any]:
    resident = consultation_body()["resident"]
    resident.update(fields)
    return consultation_body(resident=resident)


def without(*keys: str) -> dict[str, Any]:
    body = consultation_body()
    for key in keys:
        del body[key]
    return body


# --- bodies that are not JSON objects ---------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"specialty": }', b"{'single': 'quotes'}", b"\xff\xfe\x00", b"NaN-ish", b"{}}"],
)
async def test_malformed_json_is_400(api: Api, raw: bytes) -> None:
    reply = await api.request("POST", CREATE, VILLAGE, data=raw, headers=JSON)
    assert_problem(reply, 400, "request body is not valid JSON")


@pytest.mark.parametrize("raw", ["[]", "[{}]", '"text"', "42", "null", "true"])
async def test_a_body_that_is_not_an_object_is_400(api: Api, raw: str) -> None:
    reply = await api.request("POST", CREATE, VILLAGE, data=raw, headers=JSON)
    assert_problem(reply, 400, "request body must be a JSON object")


async def test_deeply_nested_json_is_400(api: Api) -> None:
    raw = "[" * 100_000 + "]" * 100_000  # 200 kB: under the body limit
    reply = await api.request("POST", CREATE, VILLAGE, data=raw, headers=JSON)
    assert_problem(reply, 400, "request body")


async def test_an_empty_body_is_an_empty_object(api: Api) -> None:
    reply = await api.request("POST", CREATE, VILLAGE)
    assert_problem(reply, 400, "invalid body")
    assert set(error_paths(reply)) == {
        "specialty",
        "resident",
        "reason",
        "purpose",
        "requested_specialty",
        "requested_title",
    }
    # Actions that take nothing accept no body at all.
    cid = await api.create()
    accepted = await api.request("POST", one(cid, "/accept"), COUNTY)
    assert (accepted.status, accepted.body["status"]) == (200, "accepted")


# --- fields -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        (with_resident(age="seventy"), "resident.age", "valid integer"),
        (with_resident(age=72.5), "resident.age", "valid integer"),
        (with_resident(age=-1), "resident.age", "greater than or equal to 0"),
        (with_resident(age=10**30), "resident.age", "less than or equal to 130"),
        (with_resident(sex="f"), "resident.sex", "'female', 'male', 'other' or 'unknown'"),
        (with_resident(pseudonym="has space"), "resident.pseudonym", "pattern"),
        (with_resident(pseudonym="x" * 65), "resident.pseudonym", "at most 64"),
        (with_resident(nickname="奶奶"), "resident.nickname", "Extra inputs are not permitted"),
        (consultation_body(colour="red"), "colour", "Extra inputs are not permitted"),
        (consultation_body(kind="surgery"), "kind", "'consultation', 'telementoring'"),
        (consultation_body(specialty=""), "specialty", "at least 1 character"),
        (consultation_body(specialty="   "), "specialty", "at least 1 character"),
        (consultation_body(specialty="x" * 201), "specialty", "at most 200"),
        (consultation_body(reason="理" * 2001), "reason", "at most 2000"),
        # Counted as sent: stripping the leading space must not bring it under the limit.
        (consultation_body(reason="\u00a0" + "理" * 2000), "reason", "at most 2000"),
        (consultation_body(specialty=" " + "x" * 200), "specialty", "at most 200"),
        (consultation_body(case_summary="x" * 20_001), "case_summary", "at most 20000"),
        (consultation_body(specialty=42), "specialty", "valid string"),
        (consultation_body(resident="刘奶奶"), "resident", "valid dictionary"),
        (consultation_body(team={}), "team", "valid list"),
        (
            consultation_body(team=[{k: v for k, v in member_body(COUNTY).items() if k != "name"}]),
            "team.0.name",
            "Field required",
        ),
        (
            consultation_body(team=[{**member_body(COUNTY), "role": "doctor"}]),
            "team.0.role",
            "'resident', 'guardian'",
        ),
        (consultation_body(preferred_time="2025-03-01T09:00:00"), "preferred_time", "timezone"),
        (consultation_body(preferred_time="next tuesday"), "preferred_time", "datetime"),
        (without("resident"), "resident", "Field required"),
        (without("reason"), "reason", "Field required"),
        (with_resident(sex=None), "resident.sex", "'female'"),
    ],
)
async def test_an_invalid_field_is_400_naming_it(
    api: Api, body: dict[str, Any], path: str, message: str
) -> None:
    reply = await api.post(CREATE, VILLAGE, body)
    problem = assert_problem(reply, 400, f"{path}: ", message)
    assert error_paths(reply) == [path]
    assert problem["instance"] == CREATE
    assert message in problem["errors"][0]["message"]
    # Nothing was created.
    assert (await api.get(CREATE, VILLAGE)).body["items"] == []


async def test_a_team_member_listed_twice_is_400(api: Api) -> None:
    body = consultation_body(team=[member_body(COUNTY), member_body(COUNTY)])
    assert_problem(await api.post(CREATE, VILLAGE, body), 400, "listed twice")


@pytest.mark.parametrize("taken", [VILLAGE.user_id, COUNTY.user_id])
async def test_a_resident_pseudonym_that_is_a_team_members_id_is_400(api: Api, taken: str) -> None:
    reply = await api.post(CREATE, VILLAGE, with_resident(pseudonym=taken))
    assert_problem(reply, 400, taken)


async def test_a_missing_nested_field_is_named_by_its_path(api: Api) -> None:
    resident = consultation_body()["resident"]
    del resident["sex"]
    reply = await api.post(CREATE, VILLAGE, consultation_body(resident=resident))
    assert_problem(reply, 400, "resident.sex: Field required")


async def test_every_invalid_field_is_listed(api: Api) -> None:
    body = consultation_body(specialty="", kind="surgery", colour="red")
    reply = await api.post(CREATE, VILLAGE, body)
    assert_problem(reply, 400)
    assert sorted(error_paths(reply)) == ["colour", "kind", "specialty"]


@pytest.mark.parametrize(
    ("action", "body", "path"),
    [
        ("schedule", {"scheduled_time": "2025-03-02T10:00:00"}, "scheduled_time"),
        ("schedule", {"scheduled_time": "tomorrow 10:00"}, "scheduled_time"),
        ("schedule", {"scheduled_time": "2025-03-02T10:00:00Z", "room": "3"}, "room"),
        ("accept", {"note": "ok"}, "note"),
        ("decline", {"reason": ["no"]}, "reason"),
        ("cancel", {"reason": "x" * 2001}, "reason"),
    ],
)
async def test_an_invalid_action_body_is_400(
    api: Api, action: str, body: dict[str, Any], path: str
) -> None:
    cid = await api.create()
    if action == "schedule":
        await api.act(cid, "accept", COUNTY)
    who = COUNTY if action in ("accept", "decline", "schedule") else VILLAGE
    reply = await api.post(one(cid, f"/{action}"), who, body)
    assert_problem(reply, 400, path)
    assert error_paths(reply) == [path]


@pytest.mark.parametrize(
    ("tail", "body", "path"),
    [
        ("/team", {**member_body(COUNTY), "role": "surgeon"}, "role"),
        ("/team", {**member_body(COUNTY), "user_id": "a b"}, "user_id"),
        ("/team", {**member_body(COUNTY), "institution": ""}, "institution"),
        ("/invites", {"role": "coordinator"}, "role"),
        ("/invites", {"role": "resident", "ttl_s": 0}, "ttl_s"),
        ("/invites", {"role": "resident", "ttl_s": "1h"}, "ttl_s"),
        ("/invites", {"role": "guardian", "name": " "}, "name"),
        ("/opinions", {"findings": "x", "recommendations": "y"}, "assessment"),
        ("/opinions", opinion_body(findings="x" * 20_001), "findings"),
        ("/opinions", opinion_body(amendment_reason=""), "amendment_reason"),
        ("/opinions", opinion_body(signature="me"), "signature"),
        ("/opinions/sign", {}, "version"),
        ("/opinions/sign", {"version": 0}, "version"),
        ("/opinions/sign", {"version": "latest"}, "version"),
        ("/decision", {"decision": "   "}, "decision"),
        ("/decision", {}, "decision"),
    ],
)
async def test_invalid_bodies_of_the_other_endpoints_are_400(
    api: Api, tail: str, body: dict[str, Any], path: str
) -> None:
    cid = await api.create()
    who = COUNTY if tail.startswith("/opinions") else VILLAGE
    reply = await api.post(one(cid, tail), who, body)
    assert_problem(reply, 400, path)
    assert error_paths(reply) == [path]


# --- sizes ------------------------------------------------------------------------------------


async def test_an_oversized_body_is_413(api: Api, config: Config) -> None:
    body = json.dumps(consultation_body(case_summary="x" * config.max_body_bytes))
    assert len(body.encode()) > config.max_body_bytes
    reply = await api.request("POST", CREATE, VILLAGE, data=body, headers=JSON)
    assert_problem(reply, 413, "request body too large", str(config.max_body_bytes))
    assert (await api.get(CREATE, VILLAGE)).body["items"] == []


async def test_a_body_of_exactly_the_limit_is_read(api: Api, config: Config) -> None:
    body = json.dumps(consultation_body())
    padded = body + " " * (config.max_body_bytes - len(body.encode()))
    assert len(padded.encode()) == config.max_body_bytes
    reply = await api.request("POST", CREATE, VILLAGE, data=padded, headers=JSON)
    assert reply.status == 201, reply


async def test_the_body_limit_follows_the_config(
    aiohttp_client: AiohttpClient, config: Config
) -> None:
    small = config.model_copy(update={"max_body_bytes": 1024})
    api = Api(await aiohttp_client(create_app(small)))
    reply = await api.post(CREATE, VILLAGE, consultation_body(case_summary="x" * 1024))
    assert_problem(reply, 413, "1024")
    assert (await api.post(CREATE, VILLAGE, consultation_body())).status == 201


# --- query parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=abc", "limit"),
        ("limit=", "limit"),
        ("offset=-1", "offset"),
        ("offset=1.5", "offset"),
        ("status=bogus", "status"),
        ("role=surgeon", "role"),
        ("institution=", "institution"),
        ("sort=newest", "sort"),
        ("status=requested&status=accepted", "'status' is given more than once"),
        ("limit=1&limit=2", "'limit' is given more than once"),
    ],
)
async def test_bad_list_parameters_are_400(api: Api, query: str, fragment: str) -> None:
    reply = await api.get(f"{CREATE}?{query}", VILLAGE)
    assert_problem(reply, 400, fragment)


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("after=-1", "after"),
        ("after=x", "after"),
        ("consultation=not%20an%20id", "consultation"),
        ("consultation=a&consultation=b", "'consultation' is given more than once"),
        ("actor=me", "actor"),
    ],
)
async def test_bad_audit_parameters_are_400(api: Api, query: str, fragment: str) -> None:
    reply = await api.get(f"/api/v1/audit?{query}", ADMIN)
    assert_problem(reply, 400, fragment)


@pytest.mark.parametrize(
    ("path", "who"),
    [
        (f"{CREATE}?offset=99999999999999999999", VILLAGE),
        ("/api/v1/audit?after=99999999999999999999", ADMIN),
    ],
)
async def test_an_out_of_range_number_is_400(api: Api, path: str, who: Any) -> None:
    reply = await api.get(path, who)
    assert_problem(reply, 400)


# --- unknown consultations --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "tail", "body"),
    [
        ("GET", "", None),
        ("GET", "/record", None),
        ("POST", "/accept", {}),
        ("POST", "/decline", {"reason": "x"}),
        ("POST", "/team", member_body(COUNTY)),
        ("POST", "/invites", {"role": "resident"}),
        ("DELETE", "/invites/0123456789abcdef", None),
        ("POST", "/opinions", opinion_body()),
        ("POST", "/opinions/sign", {"version": 1}),
        ("POST", "/decision", {"decision": "x"}),
    ],
)
async def test_an_unknown_consultation_is_404(
    api: Api, method: str, tail: str, body: dict[str, Any] | None
) -> None:
    who = COUNTY if tail in ("/accept", "/decline") or tail.startswith("/opinions") else VILLAGE
    reply = await api.request(
        method,
        one("c_doesnotexist0000", tail),
        who,
        data=None if body is None else json.dumps(body),
        headers=JSON,
    )
    assert_problem(reply, 404, "no consultation c_doesnotexist0000")


# --- text the databases must store ------------------------------------------------------------


async def test_control_characters_in_text_are_refused(backend_api: Api) -> None:
    reply = await backend_api.post(CREATE, VILLAGE, consultation_body(reason="咳嗽\x00气短"))
    assert_problem(reply, 400, "control characters")


# --- random input -----------------------------------------------------------------------------

# Any JSON value (no NaN/Infinity: they are not JSON).
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=16,
)

ALLOWED = {201, 400, 403, 404, 409, 413}


def mutations(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with some fields replaced by random JSON and maybe random extra fields: gets
    past the first missing-field error into the deeper checks."""

    @st.composite
    def mutate(draw: st.DrawFn) -> dict[str, Any]:
        body = dict(valid)
        for key in draw(st.lists(st.sampled_from(sorted(valid)), unique=True, max_size=3)):
            body[key] = draw(JSON_VALUES)
        body.update(draw(st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=2)))
        return body

    return mutate()


def random_bodies(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=6) | mutations(valid)


async def assert_not_a_crash(api: Api, path: str, who: Any, body: dict[str, Any]) -> None:
    reply = await api.post(path, who, body)
    assert reply.status in ALLOWED, (body, reply)
    if reply.status != 201:
        assert_problem(reply, reply.status)


# pytest-asyncio runs an `async def` test decorated with @given by driving each example on the
# test's event loop, so the app, its database and the client (function-scoped fixtures, set up
# once for all examples) are shared by the examples; the health check that warns about exactly
# that sharing is suppressed. No deadline: each example is a real HTTP round trip.
RANDOM = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@RANDOM
@given(body=random_bodies(consultation_body()))
async def test_random_consultation_requests_never_crash(api: Api, body: dict[str, Any]) -> None:
    await assert_not_a_crash(api, CREATE, VILLAGE, body)


@pytest.fixture
async def live_consultation(api: Api) -> str:
    cid, _ = await api.live()
    return cid


@RANDOM
@given(body=random_bodies(opinion_body()))
async def test_random_opinions_never_crash(
    api: Api, live_consultation: str, body: dict[str, Any]
) -> None:
    await assert_not_a_crash(api, one(live_consultation, "/opinions"), COUNTY, body)


async def test_overlong_path_parameters_are_not_500(backend_api: Api) -> None:
    cid = await backend_api.create()
    unknown = await backend_api.get(one("c_" + "x" * 300), VILLAGE)
    assert_problem(unknown, 404, "no consultation")
    reply = await backend_api.delete(one(cid, "/invites/" + "j" * 200), VILLAGE)
    assert_problem(reply, 400, "jti must be")
