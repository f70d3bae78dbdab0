"""Who sees which field of a consultation (rooms/visibility.py), and who may add whom to a team
(rooms/policy.py may_add_to_team), through the real server: GET one, the list, the record,
write responses, the live room's `joined` snapshot; each team change in the audit log."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from api_helpers import (
    ADMIN,
    COORDINATOR,
    COUNTY,
    OUTSIDER,
    SPECIALIST,
    TOWNSHIP,
    TOWNSHIP_COORDINATOR,
    VILLAGE,
    Api,
    Identity,
    assert_problem,
    consultation_body,
    member_body,
    one,
)
from signaling_fixtures import SignalingServer
from test_openapi import Checker

from rooms.model import Consultation, ConsultationKind, UserId
from rooms.roles import ROLE_PERMISSIONS, Permission, Role
from rooms.visibility import (
    ALWAYS,
    EVERY_FIELD,
    VISIBLE_FIELDS,
    Audience,
    ConsultationField,
    audience_of,
)
from server.app import STORE

pytest_plugins = ["signaling_fixtures"]

# --- the table, written out here on its own so that a change to rooms/visibility.py shows ---

# Columns: care team, patient, scheduling (coordinator), trainee, trainee after teaching-use
# consent, operator (admin). "x" = sees the field.
_GRID = """
field                  care patient sched trainee consented operator
id                     x    x       x     x       x         x
kind                   x    x       x     x       x         x
status                 x    x       x     x       x         x
created_at             x    x       x     x       x         x
updated_at             x    x       x     x       x         x
specialty              x    x       x     x       x         -
requested_specialty    x    x       x     x       x         -
requested_title        x    x       x     x       x         -
scheduled_time         x    x       x     x       x         -
preferred_time         x    x       x     -       -         -
status_reason          x    x       x     -       -         -
inviting_institution   x    x       x     -       -         -
inviting_clinician     x    x       x     -       -         -
team                   x    x       x     -       -         -
resident.pseudonym     x    x       x     -       -         -
resident.display_name  x    x       x     -       -         -
resident.age           x    x       -     -       x         -
resident.sex           x    x       -     -       x         -
reason                 x    x       -     -       x         -
purpose                x    x       -     -       x         -
case_summary           x    x       -     -       x         -
"""
_COLUMNS = [
    Audience.CARE_TEAM,
    Audience.PATIENT,
    Audience.SCHEDULING,
    Audience.TRAINEE,
    Audience.TRAINEE_CONSENTED,
    Audience.OPERATOR,
]


def _expected() -> dict[tuple[Audience, ConsultationField], bool]:
    rows = [line.split() for line in _GRID.strip().splitlines()[1:]]
    return {
        (audience, ConsultationField(row[0])): mark == "x"
        for row in rows
        for audience, mark in zip(_COLUMNS, row[1:], strict=True)
    }


EXPECTED = _expected()


def test_the_grid_names_every_field_once() -> None:
    assert {f for _, f in EXPECTED} == EVERY_FIELD
    assert len(EXPECTED) == len(EVERY_FIELD) * len(_COLUMNS)


@pytest.mark.parametrize(("audience", "field"), sorted(EXPECTED))
def test_visible_fields_table(audience: Audience, field: ConsultationField) -> None:
    assert (field in VISIBLE_FIELDS[audience]) is EXPECTED[(audience, field)]


@pytest.mark.parametrize(
    ("role", "teaching_consent", "audience"),
    [
        (Role.VILLAGE_DOCTOR, False, Audience.CARE_TEAM),
        (Role.TOWNSHIP_DOCTOR, False, Audience.CARE_TEAM),
        (Role.COUNTY_PHYSICIAN, False, Audience.CARE_TEAM),
        (Role.PROVINCIAL_SPECIALIST, False, Audience.CARE_TEAM),
        (Role.RESIDENT, False, Audience.PATIENT),
        (Role.GUARDIAN, False, Audience.PATIENT),
        (Role.COORDINATOR, False, Audience.SCHEDULING),
        (Role.COORDINATOR, True, Audience.SCHEDULING),  # consent to teaching is not to staff
        (Role.TRAINEE, False, Audience.TRAINEE),
        (Role.TRAINEE, True, Audience.TRAINEE_CONSENTED),
        (Role.ADMIN, False, Audience.OPERATOR),
    ],
)
def test_each_role_reads_as_one_audience(
    role: Role, teaching_consent: bool, audience: Audience
) -> None:
    assert audience_of(role, teaching_consent) is audience


@pytest.mark.parametrize("audience", list(Audience))
def test_every_audience_sees_what_the_consultation_is(audience: Audience) -> None:
    assert VISIBLE_FIELDS[audience] >= ALWAYS


@pytest.mark.parametrize(
    "role",
    [r for r in Role if ROLE_PERMISSIONS[r] & {Permission.VIEW_RECORD, Permission.EXPORT_RECORD}],
)
def test_who_reads_the_record_or_exports_it_sees_every_field(role: Role) -> None:
    # Why the record and the FHIR export (export_record) need no redaction of their own.
    assert VISIBLE_FIELDS[audience_of(role, teaching_consent=False)] == EVERY_FIELD


# --- over the real server --------------------------------------------------------------------

TRAINEE_NAME = "学员甲"


@dataclass
class Case:
    consultation: Consultation
    tokens: dict[str, str]  # reader label -> bearer token


async def http(
    server: SignalingServer, method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"{server.url}{path}",
            headers={"Authorization": f"Bearer {token}"},
            json=body,
        ) as resp,
    ):
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw else None


async def teaching_case(server: SignalingServer, consent: list[bool]) -> Case:
    """A scheduled teaching consultation and a token per reader; `consent` is the resident's
    teaching-use consents, given in the live room in this order (none: the room is not opened)."""
    c = await server.scheduled(kind=ConsultationKind.TEACHING)
    resident_token, _ = await server.invite(c.id, Role.RESIDENT)
    if consent:
        village = await server.seated(VILLAGE, c.id)
        resident = await server.admitted(resident_token, c.id, village)
        for granted in consent:
            # Acknowledged once it is in the record.
            await resident.ok("consent", {"kind": "teaching", "granted": granted})
    guardian_token, _ = await server.invite(c.id, Role.GUARDIAN, "刘奶奶的女儿")
    trainee_token, _ = await server.invite(c.id, Role.TRAINEE, TRAINEE_NAME)
    tokens = {
        who.role.value: server.token(who)
        for who in (VILLAGE, TOWNSHIP, COUNTY, SPECIALIST, COORDINATOR, ADMIN)
    }
    tokens |= {"resident": resident_token, "guardian": guardian_token, "trainee": trainee_token}
    async with server.app[STORE].reading() as tx:
        stored = await tx.get_consultation(c.id)
    assert stored is not None
    return Case(stored, tokens)


def entity_value(c: Consultation, field: ConsultationField) -> Any:
    """What a reader who sees `field` must read, in the API's JSON terms."""
    r = c.resident
    by_path: dict[ConsultationField, Any] = {
        ConsultationField.ID: c.id,
        ConsultationField.KIND: c.kind.value,
        ConsultationField.STATUS: c.status.value,
        ConsultationField.CREATED_AT: c.created_at,
        ConsultationField.UPDATED_AT: c.updated_at,
        ConsultationField.SPECIALTY: c.specialty,
        ConsultationField.REQUESTED_SPECIALTY: c.requested_specialty,
        ConsultationField.REQUESTED_TITLE: c.requested_title,
        ConsultationField.SCHEDULED_TIME: c.scheduled_time,
        ConsultationField.PREFERRED_TIME: c.preferred_time,
        ConsultationField.STATUS_REASON: c.status_reason,
        ConsultationField.INVITING_INSTITUTION: c.inviting_institution,
        ConsultationField.INVITING_CLINICIAN: c.inviting_clinician,
        ConsultationField.TEAM: [m.user_id for m in c.team],
        ConsultationField.RESIDENT_PSEUDONYM: r.pseudonym,
        ConsultationField.RESIDENT_DISPLAY_NAME: r.display_name,
        ConsultationField.RESIDENT_AGE: r.age,
        ConsultationField.RESIDENT_SEX: r.sex.value,
        ConsultationField.REASON: c.reason,
        ConsultationField.PURPOSE: c.purpose,
        ConsultationField.CASE_SUMMARY: c.case_summary,
    }
    return by_path[field]


def read(body: dict[str, Any], field: ConsultationField) -> Any:
    value: Any = body
    for key in field.value.split("."):
        value = value[key]
    return value


def assert_view(body: dict[str, Any], c: Consultation, audience: Audience) -> None:
    """Every field: shown as stored if `audience` sees it, else null and named in `hidden`."""
    wrong: list[str] = []
    for field in ConsultationField:
        value, visible = read(body, field), EXPECTED[(audience, field)]
        if not visible:
            if value is not None or field.value not in body["hidden"]:
                wrong.append(f"{field.value} should be hidden, reads {value!r}")
            continue
        if field.value in body["hidden"]:
            wrong.append(f"{field.value} should be visible, is listed hidden")
        expected = entity_value(c, field)
        if isinstance(expected, datetime):
            value = datetime.fromisoformat(value)
        if field is ConsultationField.TEAM:
            value = [m["user_id"] for m in value]
        if value != expected:
            wrong.append(f"{field.value} reads {value!r}, not {expected!r}")
    assert sorted(body["hidden"]) == body["hidden"]
    assert set(body["hidden"]) == {f.value for f in EVERY_FIELD - VISIBLE_FIELDS[audience]}
    assert wrong == []


# Each reader of the teaching case, and the audience they read as without teaching consent.
READERS = {
    "village_doctor": Audience.CARE_TEAM,
    "township_doctor": Audience.CARE_TEAM,
    "county_physician": Audience.CARE_TEAM,
    "provincial_specialist": Audience.CARE_TEAM,
    "resident": Audience.PATIENT,
    "guardian": Audience.PATIENT,
    "coordinator": Audience.SCHEDULING,
    "trainee": Audience.TRAINEE,
}


@pytest.mark.parametrize("reader", sorted(READERS))
async def test_get_one_consultation_per_reader(sig_server: SignalingServer, reader: str) -> None:
    case = await teaching_case(sig_server, consent=[])
    status, body = await http(sig_server, "GET", one(case.consultation.id), case.tokens[reader])
    assert status == 200, body
    assert_view(body, case.consultation, READERS[reader])


@pytest.mark.parametrize(
    ("consents", "audience"),
    [
        ([True], Audience.TRAINEE_CONSENTED),
        ([False], Audience.TRAINEE),
        ([True, False], Audience.TRAINEE),  # withdrawn: the case is hidden again
        ([False, True], Audience.TRAINEE_CONSENTED),
    ],
)
async def test_a_trainee_sees_the_case_only_with_teaching_consent(
    sig_server: SignalingServer, consents: list[bool], audience: Audience
) -> None:
    case = await teaching_case(sig_server, consent=consents)
    status, body = await http(sig_server, "GET", one(case.consultation.id), case.tokens["trainee"])
    assert status == 200, body
    assert_view(body, case.consultation, audience)
    # Never who it is, whatever was consented to.
    assert body["resident"]["display_name"] is None and body["resident"]["pseudonym"] is None
    # Teaching-use consent is about trainees: the coordinator still reads no clinical field.
    status, body = await http(
        sig_server, "GET", one(case.consultation.id), case.tokens["coordinator"]
    )
    assert status == 200, body
    assert_view(body, case.consultation, Audience.SCHEDULING)


@pytest.mark.parametrize("reader", sorted(READERS))
async def test_the_list_per_reader(sig_server: SignalingServer, reader: str) -> None:
    case = await teaching_case(sig_server, consent=[])
    status, body = await http(
        sig_server, "GET", "/api/v1/consultations?limit=500", case.tokens[reader]
    )
    assert status == 200, body
    found = [c for c in body["items"] if c["id"] == case.consultation.id]
    if reader == "trainee":
        # Trainees are not on the team: their invite reaches the one consultation, not a list.
        assert found == []
        return
    assert len(found) == 1
    assert_view(found[0], case.consultation, READERS[reader])


@pytest.mark.parametrize("reader", sorted(READERS))
async def test_the_record_per_reader(sig_server: SignalingServer, reader: str) -> None:
    case = await teaching_case(sig_server, consent=[])
    path = one(case.consultation.id, "/record")
    status, body = await http(sig_server, "GET", path, case.tokens[reader])
    if reader in {"coordinator", "trainee"}:
        assert (status, body["code"]) == (403, "forbidden"), body
        assert f"role {reader} may not view_record" in body["detail"]
        return
    assert status == 200, body
    assert_view(body["consultation"], case.consultation, READERS[reader])


async def test_the_operator_reads_no_consultation(sig_server: SignalingServer) -> None:
    case = await teaching_case(sig_server, consent=[])
    for tail in ("", "/record", "/fhir"):
        status, body = await http(
            sig_server, "GET", one(case.consultation.id, tail), case.tokens["admin"]
        )
        assert status == 403, body


async def test_write_responses_are_projected_too(sig_server: SignalingServer) -> None:
    # A coordinator's own actions answer with the coordinator's view, not the stored one.
    case = await teaching_case(sig_server, consent=[])
    cid, token = case.consultation.id, case.tokens["coordinator"]
    status, body = await http(
        sig_server, "POST", one(cid, "/schedule"), token, {"scheduled_time": "2031-03-02T10:00:00Z"}
    )
    assert status == 200, body
    assert (body["reason"], body["case_summary"], body["resident"]["age"]) == (None, None, None)
    colleague = {
        "user_id": "coordinator-2",
        "name": "孙协调员",
        "role": "coordinator",
        "institution": COORDINATOR.org,
    }
    status, body = await http(sig_server, "POST", one(cid, "/team"), token, colleague)
    assert status == 201, body
    assert body["reason"] is None and "reason" in body["hidden"]
    assert body["team"][-1]["user_id"] == "coordinator-2"


async def test_joined_snapshot_carries_no_hidden_field(sig_server: SignalingServer) -> None:
    server = sig_server
    c = await server.scheduled(kind=ConsultationKind.TEACHING)
    village = await server.seated(VILLAGE, c.id)
    trainee_token, _ = await server.invite(c.id, Role.TRAINEE, TRAINEE_NAME)
    trainee = await server.admitted(trainee_token, c.id, village)
    coordinator = await server.seated(COORDINATOR, c.id)
    hidden_from_all = [c.reason, c.purpose, c.case_summary]
    for peer, hidden in (
        (trainee, [*hidden_from_all, c.resident.display_name, c.resident.pseudonym]),
        (coordinator, hidden_from_all),
    ):
        snapshot = peer.snapshot
        assert (snapshot["consultation_id"], snapshot["kind"]) == (c.id, "teaching")
        text = json.dumps(snapshot, ensure_ascii=False)
        assert [value for value in hidden if value in text] == []


# --- who may add whom to the team -------------------------------------------------------------

OTHER_COUNTY_HOSPITAL = OUTSIDER.org


def someone(role: str, institution: str, user_id: str = "new-member") -> dict[str, str]:
    return {"user_id": user_id, "name": "新成员", "role": role, "institution": institution}


# (adder, added, expected status, expected code). The consultation is the village clinic's
# (VILLAGE, COORDINATOR at 莲花村卫生室) with TOWNSHIP, COUNTY and SPECIALIST invited.
TEAM_RULES: list[tuple[str, Identity, dict[str, str], int, str | None]] = [
    ("inviting clinician adds an outside county physician",
     VILLAGE, someone("county_physician", OTHER_COUNTY_HOSPITAL), 201, None),
    ("inviting clinician adds a provincial specialist",
     VILLAGE, someone("provincial_specialist", "省肿瘤医院"), 201, None),
    ("inviting clinician adds a coordinator of the clinic",
     VILLAGE, someone("coordinator", VILLAGE.org), 201, None),
    ("inviting clinician adds a coordinator of another institution",
     VILLAGE, someone("coordinator", COUNTY.org), 403, "team_institution_mismatch"),
    ("coordinator adds a county physician",
     COORDINATOR, someone("county_physician", OTHER_COUNTY_HOSPITAL), 403,
     "team_clinician_needs_clinician"),
    ("coordinator adds a village doctor of the clinic",
     COORDINATOR, someone("village_doctor", VILLAGE.org), 403, "team_clinician_needs_clinician"),
    ("coordinator adds a coordinator of the clinic",
     COORDINATOR, someone("coordinator", VILLAGE.org), 201, None),
    ("coordinator adds a coordinator of another institution",
     COORDINATOR, someone("coordinator", COUNTY.org), 403, "team_institution_mismatch"),
    ("invited county physician adds a county colleague",
     COUNTY, someone("county_physician", COUNTY.org), 201, None),
    ("invited county physician adds a township doctor of the hospital",
     COUNTY, someone("township_doctor", COUNTY.org), 201, None),
    ("invited county physician adds a provincial specialist of the hospital",
     COUNTY, someone("provincial_specialist", COUNTY.org), 403, "team_level_above_adder"),
    ("invited county physician adds a physician of another hospital",
     COUNTY, someone("county_physician", OTHER_COUNTY_HOSPITAL), 403,
     "team_institution_mismatch"),
    ("invited county physician adds a coordinator",
     COUNTY, someone("coordinator", COUNTY.org), 403, "team_coordinator_by_inviting_side"),
    ("invited specialist adds a specialist colleague",
     SPECIALIST, someone("provincial_specialist", SPECIALIST.org), 201, None),
    ("invited township doctor adds a county physician of the centre",
     TOWNSHIP, someone("county_physician", TOWNSHIP.org), 403, "team_level_above_adder"),
    ("invited township doctor adds a township colleague",
     TOWNSHIP, someone("township_doctor", TOWNSHIP.org), 201, None),
    ("clinician on no team",
     OUTSIDER, someone("county_physician", OUTSIDER.org), 403, "forbidden"),
    ("coordinator of another institution",
     TOWNSHIP_COORDINATOR, someone("coordinator", TOWNSHIP.org), 403, "forbidden"),
    ("operator",
     ADMIN, someone("coordinator", VILLAGE.org), 403, "forbidden"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("adder", "added", "status", "code"),
    [rule[1:] for rule in TEAM_RULES],
    ids=[rule[0] for rule in TEAM_RULES],
)
async def test_who_may_add_whom(
    api: Api, adder: Identity, added: dict[str, str], status: int, code: str | None
) -> None:
    cid = await api.create()

    async def trail() -> list[dict[str, Any]]:
        # The admin's own reads of the log are in it too; they are not what this is about.
        return [e for e in await api.audit(consultation=cid) if e["action"] != "view_audit"]

    before = await trail()
    reply = await api.post(one(cid, "/team"), adder, added)
    after = await trail()
    team_entries = [e for e in after if e["action"] == "add_team_member"]
    if code is not None:
        problem = assert_problem(reply, status)
        assert problem["code"] == code
        # A refused change changes nothing and is not a team change in the audit log.
        assert team_entries == [] and len(after) == len(before)
        ids = [m["user_id"] for m in (await api.get(one(cid), VILLAGE)).body["team"]]
        assert added["user_id"] not in ids
        return
    assert reply.status == status, reply
    assert reply.body["team"][-1]["user_id"] == added["user_id"]
    assert [(e["actor"], e["actor_role"], e["target"], e["detail"]) for e in team_entries] == [
        (
            adder.user_id,
            adder.role.value,
            added["user_id"],
            {
                "user": added["user_id"],
                "role": added["role"],
                "institution": added["institution"],
                "via": "team",
            },
        )
    ]


async def test_a_resident_does_not_change_the_team(api: Api) -> None:
    cid = await api.create()
    invite = await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})
    assert invite.status == 201, invite
    reply = await api.post(
        one(cid, "/team"), invite.body["token"], someone("county_physician", OUTSIDER.org)
    )
    problem = assert_problem(reply, 403, "role resident may not manage_consultation")
    assert problem["code"] == "forbidden"


async def test_the_added_member_reads_the_refused_one_does_not(api: Api) -> None:
    cid = await api.create()
    refused = await api.post(one(cid, "/team"), COORDINATOR, member_body(OUTSIDER))
    assert refused.status == 403, refused
    assert (await api.get(one(cid), OUTSIDER)).status == 403
    added = await api.post(one(cid, "/team"), VILLAGE, member_body(OUTSIDER))
    assert added.status == 201, added
    assert (await api.get(one(cid, "/record"), OUTSIDER)).status == 200


# (issuer, invited role, status, code) on the village clinic's teaching consultation: an invite
# grants no more than its issuer holds (the issuer holds the token too).
INVITE_RULES: list[tuple[Identity, str, int, str | None]] = [
    (VILLAGE, "resident", 201, None),
    (VILLAGE, "guardian", 201, None),
    (VILLAGE, "trainee", 201, None),
    (TOWNSHIP, "resident", 403, "invite_by_inviting_clinician"),
    (TOWNSHIP, "trainee", 201, None),
    (COUNTY, "guardian", 403, "invite_by_inviting_clinician"),
    (COUNTY, "trainee", 201, None),
    (SPECIALIST, "resident", 403, "invite_by_inviting_clinician"),
    (SPECIALIST, "trainee", 201, None),
    (COORDINATOR, "resident", 403, "forbidden"),
    (COORDINATOR, "guardian", 403, "forbidden"),
    (COORDINATOR, "trainee", 403, "forbidden"),
]


@pytest.mark.parametrize(
    ("issuer", "role", "status", "code"),
    INVITE_RULES,
    ids=[f"{issuer.role.value}-invites-{role}" for issuer, role, _, _ in INVITE_RULES],
)
async def test_who_may_invite_whom(
    api: Api, issuer: Identity, role: str, status: int, code: str | None
) -> None:
    cid = await api.create(kind="teaching")
    body = {"role": role} | ({} if role == "resident" else {"name": "女儿"})
    reply = await api.post(one(cid, "/invites"), issuer, body)
    entries = [e for e in await api.audit(consultation=cid) if e["action"] == "add_team_member"]
    if code is not None:
        assert assert_problem(reply, status)["code"] == code
        assert entries == []
        assert not [e for e in await api.audit(consultation=cid) if e["action"] == "issue_invite"]
        return
    assert reply.status == status, reply
    if role != "guardian":
        assert entries == []
        return
    # A guardian joins the team by their invite: a team change, audited as one.
    assert [(e["actor"], e["actor_role"], e["target"], e["detail"]) for e in entries] == [
        (
            issuer.user_id,
            issuer.role.value,
            reply.body["user_id"],
            {
                "user": reply.body["user_id"],
                "role": "guardian",
                "institution": VILLAGE.org,
                "via": "invite",
            },
        )
    ]


async def test_a_coordinator_still_revokes_invites(api: Api) -> None:
    cid = await api.create()
    invite = await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})
    assert invite.status == 201, invite
    revoked = await api.delete(one(cid, f"/invites/{invite.body['jti']}"), COORDINATOR)
    assert revoked.status == 204, revoked
    assert_problem(await api.get(one(cid), invite.body["token"]), 401)


async def test_a_coordinator_reads_no_clinical_field_through_an_invite(api: Api) -> None:
    # The way round the table that the invite rule closes: mint the resident's link, use it.
    cid = await api.create()
    refused = await api.post(one(cid, "/invites"), COORDINATOR, {"role": "resident"})
    assert assert_problem(refused, 403, "role coordinator may not invite")["code"] == "forbidden"
    assert "token" not in refused.body


async def test_the_initial_team_follows_the_same_rules_and_is_audited(api: Api) -> None:
    outside_coordinator = Identity(
        UserId("county-desk"), "县医院协调员", Role.COORDINATOR, COUNTY.org
    )
    refused = await api.post(
        "/api/v1/consultations", VILLAGE, consultation_body((COUNTY, outside_coordinator))
    )
    assert assert_problem(refused, 403)["code"] == "team_institution_mismatch"

    # A county physician asking a province is the inviting side of their own request.
    created = await api.post("/api/v1/consultations", COUNTY, consultation_body((SPECIALIST,)))
    assert created.status == 201, created
    cid = created.body["id"]
    [entry] = [e for e in await api.audit(consultation=cid) if e["action"] == "create_consultation"]
    assert (entry["actor"], entry["actor_role"]) == (COUNTY.user_id, "county_physician")
    assert entry["detail"]["team"] == [
        {"user": COUNTY.user_id, "role": "county_physician", "institution": COUNTY.org},
        {
            "user": SPECIALIST.user_id,
            "role": "provincial_specialist",
            "institution": SPECIALIST.org,
        },
        {"user": "res-0001", "role": "resident", "institution": COUNTY.org},
    ]


async def test_redacted_views_match_the_openapi_document(api: Api) -> None:
    doc = (await api.get("/api/v1/openapi.json", None)).body
    checker = Checker(doc)
    cid = await api.create(kind="teaching")
    trainee = await api.post(one(cid, "/invites"), VILLAGE, {"role": "trainee", "name": "学员"})
    assert trainee.status == 201, trainee
    for who in (COORDINATOR, trainee.body["token"], VILLAGE):
        reply = checker.check("GET", one(cid), await api.get(one(cid), who))
        assert reply.status == 200
    listed = await api.get("/api/v1/consultations", COORDINATOR)
    assert checker.check("GET", "/api/v1/consultations", listed).status == 200
    # Hideable fields are nullable in the document; `hidden` is always there.
    schema = doc["components"]["schemas"]["ConsultationOut"]
    assert "hidden" in schema["required"]
    for field in EVERY_FIELD - ALWAYS:
        name = field.value.split(".")[0]
        if name == "resident":
            resident = doc["components"]["schemas"]["ResidentOut"]["properties"]
            prop = resident[field.value.split(".")[1]]
        else:
            prop = schema["properties"][name]
        assert {"type": "null"} in prop.get("anyOf", []), field
