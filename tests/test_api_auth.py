"""Token attacks over HTTP: each is refused with the right status and a problem+json that says
why. (HS/RS algorithm confusion is covered by the unit tests in test_auth_tokens.py.)"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from api_helpers import (
    ADMIN,
    COORDINATOR,
    COUNTY,
    OUTSIDER,
    SPECIALIST,
    TOWNSHIP,
    VILLAGE,
    Api,
    Reply,
    assert_problem,
    consultation_body,
    one,
    opinion_body,
)

from rooms.roles import Role
from server.app import TOKENS
from server.auth import TokenService
from server.config import Config, JwtConfig

LIST = "/api/v1/consultations"


def assert_unauthorized(reply: Reply, *detail: str) -> None:
    assert_problem(reply, 401, *detail)
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="telemed"'


def village_token(service: TokenService) -> str:
    return service.mint(
        user_id=VILLAGE.user_id, name=VILLAGE.name, role=VILLAGE.role, org=VILLAGE.org
    )


def b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(part: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    payload: dict[str, Any] = {
        "sub": VILLAGE.user_id,
        "name": VILLAGE.name,
        "role": "village_doctor",
        "org": VILLAGE.org,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "iss": "telemed",
        "aud": "telemed",
        "jti": "f" * 32,
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def signed(config: Config, payload: dict[str, Any]) -> str:
    return jwt.encode(payload, config.jwt.secret.get_secret_value(), algorithm="HS256")


# --- the token itself (401) -------------------------------------------------------------------


async def test_no_authorization_header(api: Api) -> None:
    assert_unauthorized(await api.get(LIST, None), "missing bearer token")


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        ("Basic dXNlcjpwYXNz", "authorization must be a Bearer token"),
        ("Token abc.def.ghi", "authorization must be a Bearer token"),
        ("Bearer", "missing bearer token"),
        ("Bearer    ", "missing bearer token"),
        ("Bearer not-a-jwt", "token is malformed"),
        ("Bearer a.b.c", "token is malformed"),
    ],
)
async def test_a_bad_authorization_header(api: Api, header: str, detail: str) -> None:
    reply = await api.get(LIST, None, headers={"Authorization": header})
    assert_unauthorized(reply, detail)


async def test_the_bearer_scheme_is_case_insensitive(api: Api) -> None:
    token = api.token(VILLAGE)
    assert (await api.get(LIST, None, headers={"Authorization": f"bearer {token}"})).status == 200


async def test_alg_none_is_refused(api: Api) -> None:
    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims(role='admin'))}."
    assert_unauthorized(await api.get("/api/v1/audit", unsigned), "token algorithm is not allowed")


async def test_an_expired_token_is_refused(api: Api, config: Config) -> None:
    # Minted 9 hours ago with the 8-hour access lifetime: expired an hour ago.
    past = TokenService(config.jwt, now=lambda: datetime.now(UTC) - timedelta(hours=9))
    assert_unauthorized(await api.get(LIST, village_token(past)), "token expired")


async def test_a_token_just_past_expiry_is_within_the_leeway(api: Api, config: Config) -> None:
    ttl = config.jwt.access_ttl_s
    shifted = datetime.now(UTC) - timedelta(seconds=ttl + config.jwt.leeway_s // 2)
    recent = TokenService(config.jwt, now=lambda: shifted)
    assert (await api.get(LIST, village_token(recent))).status == 200


async def test_a_token_not_yet_valid_is_refused(api: Api, config: Config) -> None:
    future = TokenService(config.jwt, now=lambda: datetime.now(UTC) + timedelta(hours=1))
    assert_unauthorized(await api.get(LIST, village_token(future)), "token not yet valid")


async def test_a_token_for_another_audience_is_refused(api: Api, config: Config) -> None:
    other = TokenService(config.jwt.model_copy(update={"audience": "his"}))
    assert_unauthorized(await api.get(LIST, village_token(other)), "token audience is wrong")


async def test_a_token_from_another_issuer_is_refused(api: Api, config: Config) -> None:
    other = TokenService(config.jwt.model_copy(update={"issuer": "someone-else"}))
    assert_unauthorized(await api.get(LIST, village_token(other)), "token issuer is wrong")


async def test_a_token_signed_with_another_secret_is_refused(api: Api) -> None:
    other = TokenService(JwtConfig(secret="another-secret-of-at-least-32-characters!"))
    assert_unauthorized(await api.get(LIST, village_token(other)), "token signature is invalid")


async def test_a_tampered_payload_is_refused(api: Api) -> None:
    header, payload, signature = api.token(COUNTY).split(".")
    elevated = {**unb64(payload), "role": "admin"}
    forged = f"{header}.{b64(elevated)}.{signature}"
    assert_unauthorized(await api.get("/api/v1/audit", forged), "token signature is invalid")
    # The untampered token still works (and an admin-only endpoint refuses it).
    assert_problem(
        await api.get("/api/v1/audit", api.token(COUNTY)),
        403,
        "role county_physician may not view_audit",
    )


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (claims(role="superuser"), "unknown role 'superuser'"),
        (claims(sub=None), "token is missing claim 'sub'"),
        (claims(exp=None), "token is missing claim 'exp'"),
        (claims(jti=""), "token claim 'jti' must not be empty"),
        (claims(name=None), "token is missing claim 'name'"),
        (claims(role=7), "token claim 'role' must be a string"),
        (claims(inv=True), "invite token is missing claim 'cid'"),
    ],
)
async def test_a_correctly_signed_token_with_bad_claims_is_refused(
    api: Api, config: Config, payload: dict[str, Any], detail: str
) -> None:
    assert_unauthorized(await api.get(LIST, signed(config, payload)), detail)


async def test_a_hand_made_token_with_good_claims_is_accepted(api: Api, config: Config) -> None:
    # The baseline for the test above: only the named claim made the difference.
    assert (await api.get(LIST, signed(config, claims()))).status == 200


async def test_a_revoked_invite_is_refused(api: Api) -> None:
    cid = await api.create()
    invite = (await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})).body
    assert (await api.delete(one(cid, f"/invites/{invite['jti']}"), VILLAGE)).status == 204
    for path in (one(cid), LIST):
        assert_unauthorized(await api.get(path, invite["token"]), "invite has been revoked")


# --- a genuine token that does not reach (403) ------------------------------------------------


async def test_a_resident_token_on_another_consultation(api: Api) -> None:
    mine = await api.create()
    other = await api.create()
    token = (await api.post(one(mine, "/invites"), VILLAGE, {"role": "resident"})).body["token"]
    assert_problem(await api.get(one(other), token), 403, "scoped to another consultation")


@pytest.mark.parametrize(
    ("tail", "body", "permission"),
    [
        ("/accept", {}, "respond_to_request"),
        ("/decline", {"reason": "不想"}, "respond_to_request"),
        ("/schedule", {"scheduled_time": "2025-03-02T10:00:00+08:00"}, "schedule"),
        ("/cancel", {"reason": "不想"}, "manage_consultation"),
        ("/opinions", opinion_body(), "write_opinion"),
        ("/opinions/sign", {"version": 1}, "sign_opinion"),
        ("/decision", {"decision": "自己决定"}, "record_decision"),
        (
            "/team",
            {"user_id": "x", "name": "x", "role": "county_physician", "institution": "x"},
            "manage_consultation",
        ),
    ],
)
async def test_a_resident_token_may_not_act_for_clinicians(
    api: Api, tail: str, body: dict[str, Any], permission: str
) -> None:
    cid = await api.create()
    token = (await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})).body["token"]
    reply = await api.post(one(cid, tail), token, body)
    assert_problem(reply, 403, f"role resident may not {permission}")
    assert (await api.get(one(cid), VILLAGE)).body["status"] == "requested"


async def test_a_resident_token_may_not_list_or_request(api: Api) -> None:
    cid = await api.create()
    token = (await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})).body["token"]
    listed = await api.get(LIST, token)
    # Listing shows only what the token reaches: its own consultation.
    assert (listed.status, [c["id"] for c in listed.body["items"]]) == (200, [cid])
    assert_problem(
        await api.post(LIST, token, consultation_body()),
        403,
        "role resident may not request_consultation",
    )
    assert_problem(await api.get("/api/v1/audit", token), 403, "role resident may not view_audit")


async def test_a_clinician_not_on_the_team(api: Api) -> None:
    cid = await api.create()
    for path in (one(cid), one(cid, "/record")):
        assert_problem(await api.get(path, OUTSIDER), 403, "not on this consultation's team")
    assert_problem(
        await api.post(one(cid, "/accept"), OUTSIDER, {}), 403, "not on this consultation's team"
    )


async def test_a_team_member_in_another_role(api: Api) -> None:
    cid = await api.create()
    pretender = api.app[TOKENS].mint(
        user_id=SPECIALIST.user_id, name=SPECIALIST.name, role=Role.COUNTY_PHYSICIAN, org="x"
    )
    assert_problem(
        await api.get(one(cid), pretender),
        403,
        "on this team as provincial_specialist, not as county_physician",
    )


async def test_an_admin_may_not_read_clinical_content(api: Api) -> None:
    cid = await api.create()
    assert_problem(await api.get(one(cid, "/record"), ADMIN), 403, "role admin may not view_record")
    assert_problem(await api.get(one(cid), ADMIN), 403, "role admin may not join")


async def test_a_coordinator_may_not_read_the_record(api: Api) -> None:
    cid = await api.create()
    # The coordinator of the inviting clinic runs the consultation...
    assert (await api.get(one(cid), COORDINATOR)).status == 200
    # ...but sees nothing clinical.
    assert_problem(
        await api.get(one(cid, "/record"), COORDINATOR), 403, "role coordinator may not view_record"
    )
    assert_problem(
        await api.post(one(cid, "/opinions"), COORDINATOR, opinion_body()),
        403,
        "role coordinator may not write_opinion",
    )


async def test_only_the_inviting_clinician_records_the_decision(api: Api) -> None:
    cid, _ = await api.live()
    await api.post(one(cid, "/opinions"), COUNTY, opinion_body())
    await api.post(one(cid, "/opinions/sign"), COUNTY, {"version": 1})
    assert_problem(
        await api.post(one(cid, "/decision"), TOWNSHIP, {"decision": "转诊"}),
        403,
        "only the inviting clinician records the final decision",
    )
    assert (await api.post(one(cid, "/decision"), VILLAGE, {"decision": "转诊"})).status == 201


async def test_a_forbidden_request_leaves_no_audit_trace(api: Api) -> None:
    cid = await api.create()
    before = await api.audit(consultation=cid)
    assert (await api.get(one(cid, "/record"), ADMIN)).status == 403
    assert (await api.get(one(cid), OUTSIDER)).status == 403
    after = await api.audit(consultation=cid)
    assert [e["action"] for e in after] == [e["action"] for e in before] + ["view_audit"]
