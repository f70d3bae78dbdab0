"""The REST API's flows through the real server (pytest-aiohttp on an ephemeral port)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from api_helpers import (
    ADMIN,
    COORDINATOR,
    COUNTY,
    OTHER_VILLAGE,
    OUTSIDER,
    SPECIALIST,
    TOWNSHIP,
    TOWNSHIP_COORDINATOR,
    VILLAGE,
    Api,
    Identity,
    assert_problem,
    consultation_body,
    error_paths,
    member_body,
    one,
    opinion_body,
    parse_time,
)

from server.app import CONFIG, STORE

CST = timezone(timedelta(hours=8))
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


# Someone who holds the right for each life-cycle action (the checks below are about states).
ACTOR_FOR = {
    "accept": COUNTY,
    "decline": COUNTY,
    "schedule": COUNTY,
    "cancel": VILLAGE,
    "abort": VILLAGE,
    "archive": VILLAGE,
}


def ids(reply_body: dict[str, Any]) -> list[str]:
    return [c["id"] for c in reply_body["items"]]


# --- the main flow, on SQLite and (when configured) PostgreSQL --------------------------------


async def test_consultation_from_request_to_audited_record(backend_api: Api) -> None:
    api = backend_api
    created = await api.post("/api/v1/consultations", VILLAGE, consultation_body())
    assert created.status == 201, created
    c = created.body
    cid = c["id"]
    assert c["status"] == "requested"
    assert c["inviting_clinician"] == VILLAGE.user_id
    assert c["inviting_institution"] == VILLAGE.org
    assert [(m["user_id"], m["role"]) for m in c["team"]] == [
        (VILLAGE.user_id, "village_doctor"),
        (TOWNSHIP.user_id, "township_doctor"),
        (COUNTY.user_id, "county_physician"),
        (SPECIALIST.user_id, "provincial_specialist"),
        ("res-0001", "resident"),
    ]
    assert parse_time(c["preferred_time"]) == datetime(2025, 3, 1, 9, tzinfo=CST)

    accepted = await api.post(one(cid, "/accept"), COUNTY, {})
    assert (accepted.status, accepted.body["status"]) == (200, "accepted")
    scheduled = await api.post(
        one(cid, "/schedule"), COUNTY, {"scheduled_time": "2025-03-02T10:00:00+08:00"}
    )
    assert (scheduled.status, scheduled.body["status"]) == (200, "scheduled")
    assert parse_time(scheduled.body["scheduled_time"]) == datetime(2025, 3, 2, 10, tzinfo=CST)

    session = await api.start_session(cid)
    assert (await api.get(one(cid), VILLAGE)).body["status"] == "live"

    written = await api.post(one(cid, "/opinions"), COUNTY, opinion_body())
    assert written.status == 201, written
    v1 = written.body
    assert (v1["version"], v1["author"], v1["locked"], v1["signatures"]) == (
        1,
        COUNTY.user_id,
        False,
        [],
    )
    assert SHA256_HEX.match(v1["content_hash"])

    for signer in (COUNTY, SPECIALIST):
        signed = await api.post(one(cid, "/opinions/sign"), signer, {"version": 1})
        assert signed.status == 200, signed
        # Signed during the call: the consultation stays live until the session ends.
        assert signed.body["consultation_status"] == "live"
        assert signed.body["opinion"]["signatures"][-1]["signer"] == signer.user_id
        assert signed.body["opinion"]["signatures"][-1]["content_hash"] == v1["content_hash"]
        assert signed.body["opinion"]["locked"] is True

    ended = await api.end_session(cid, session)
    assert ended.status.value == "signed"
    assert (await api.get(one(cid), VILLAGE)).body["status"] == "signed"

    decision = await api.post(one(cid, "/decision"), VILLAGE, {"decision": "按会诊意见调整用药"})
    assert decision.status == 201, decision
    assert decision.body["decided_by"] == VILLAGE.user_id

    unexplained = await api.post(one(cid, "/opinions"), COUNTY, opinion_body(findings="补充"))
    assert_problem(unexplained, 409, "version 1 is signed and locked", "amendment_reason")
    amended = await api.post(
        one(cid, "/opinions"),
        COUNTY,
        opinion_body(findings="补充：胸片示肺气肿", amendment_reason="补充影像结果"),
    )
    assert amended.status == 201, amended
    assert (amended.body["version"], amended.body["amendment_reason"]) == (2, "补充影像结果")
    assert amended.body["content_hash"] != v1["content_hash"]

    record = await api.get(one(cid, "/record"), VILLAGE)
    assert record.status == 200, record
    r = record.body
    assert r["consultation"]["id"] == cid
    assert r["consultation"]["status"] == "signed"
    assert len(r["consultation"]["team"]) == 5
    assert [(s["id"], s["number"]) for s in r["sessions"]] == [(session.id, 1)]
    assert r["sessions"][0]["ended_at"] is not None
    assert [(e["kind"], e["actor"]) for e in r["events"]] == [
        ("session_started", VILLAGE.user_id),
        ("session_ended", VILLAGE.user_id),
    ]
    assert [v["version"] for v in r["opinions"]] == [1, 2]
    first, second = r["opinions"]
    assert {s["signer"]: s["content_hash"] for s in first["signatures"]} == {
        COUNTY.user_id: v1["content_hash"],
        SPECIALIST.user_id: v1["content_hash"],
    }
    assert {s["signer_role"] for s in first["signatures"]} == {
        "county_physician",
        "provincial_specialist",
    }
    assert (second["locked"], second["signatures"]) == (False, [])
    assert [(d["decided_by"], d["decision"]) for d in r["decisions"]] == [
        (VILLAGE.user_id, "按会诊意见调整用药")
    ]
    # The inviting clinician sees who accessed the record, this very read included.
    assert r["audit"][-1]["action"] == "view_record"
    assert r["audit"][-1]["actor"] == VILLAGE.user_id

    entries = await api.audit(consultation=cid)
    assert {e["consultation_id"] for e in entries} == {cid}
    # The session was opened and closed in-process (as the live room does), not over HTTP.
    in_process = {"start_session", "end_session"}
    assert all(
        e["remote_addr"] == "127.0.0.1"
        for e in entries
        if e["detail"].get("action") not in in_process
    )
    actions = [(e["action"], e["actor"]) for e in entries]
    assert actions[0] == ("create_consultation", VILLAGE.user_id)
    assert ("view_record", VILLAGE.user_id) in actions
    transitions = [e["detail"] for e in entries if e["action"] == "transition"]
    assert transitions == [
        {"action": "accept", "from": "requested", "to": "accepted"},
        {"action": "schedule", "from": "accepted", "to": "scheduled"},
        {"action": "start_session", "from": "scheduled", "to": "live"},
        {"action": "end_session", "from": "live", "to": "signed"},
    ]
    assert [e["target"] for e in entries if e["action"] == "sign_opinion"] == ["1", "1"]
    assert [e["action"] for e in entries].count("record_decision") == 1

    # Paging: `after` is the last seq seen; pages join up to the whole log.
    first_page = await api.audit(consultation=cid, limit="3")
    second_page = await api.audit(consultation=cid, limit="3", after=str(first_page[-1]["seq"]))
    assert first_page + second_page == entries[:6]
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)

    # Unfiltered, the log also holds the admin's own reads of it.
    everything = await api.audit()
    assert any(e["action"] == "view_audit" and e["actor"] == ADMIN.user_id for e in everything)
    assert {e["seq"] for e in entries} <= {e["seq"] for e in everything}


async def test_every_read_of_the_record_is_audited(api: Api) -> None:
    cid = await api.create()

    async def record_reads() -> list[tuple[str, str]]:
        return [
            (e["actor"], e["actor_role"])
            for e in await api.audit(consultation=cid)
            if e["action"] == "view_record"
        ]

    assert await record_reads() == []
    for reader in (VILLAGE, COUNTY, VILLAGE):
        assert (await api.get(one(cid, "/record"), reader)).status == 200
    assert await record_reads() == [
        (VILLAGE.user_id, "village_doctor"),
        (COUNTY.user_id, "county_physician"),
        (VILLAGE.user_id, "village_doctor"),
    ]
    # Reading the consultation itself is audited as a view too.
    assert (await api.get(one(cid), SPECIALIST)).status == 200
    views = [e for e in await api.audit(consultation=cid) if e["action"] == "view_consultation"]
    assert [e["actor"] for e in views] == [SPECIALIST.user_id]
    # A refused read is not a read: nothing is written.
    assert (await api.get(one(cid, "/record"), OUTSIDER)).status == 403
    assert len(await record_reads()) == 3


async def test_only_the_patient_and_the_inviting_clinician_see_the_record_audit(api: Api) -> None:
    cid = await api.create()
    county = await api.get(one(cid, "/record"), COUNTY)
    assert (county.status, county.body["audit"]) == (200, [])
    village = await api.get(one(cid, "/record"), VILLAGE)
    assert [e["action"] for e in village.body["audit"]] == [
        "create_consultation",
        "view_record",
        "view_record",
    ]


# --- listing ----------------------------------------------------------------------------------


async def test_listing_filters_and_visibility(api: Api) -> None:
    full = await api.create()  # requested; township, county, specialist
    small = await api.create(members=(TOWNSHIP, COUNTY))  # accepted below, no specialist
    await api.act(small, "accept", COUNTY)
    elsewhere = await api.create(OTHER_VILLAGE, members=(COUNTY,))

    async def listed(who: Identity, **params: str) -> list[str]:
        reply = await api.get("/api/v1/consultations", who, params=params)
        assert reply.status == 200, reply
        return ids(reply.body)

    # Newest first; each clinician sees only the consultations whose team they are on.
    assert await listed(VILLAGE) == [small, full]
    assert await listed(COUNTY) == [elsewhere, small, full]
    assert await listed(TOWNSHIP) == [small, full]
    assert await listed(SPECIALIST) == [full]
    assert await listed(OTHER_VILLAGE) == [elsewhere]
    assert await listed(OUTSIDER) == []
    # Coordinators see their institution's consultations, and only those.
    assert await listed(COORDINATOR) == [small, full]
    assert await listed(COORDINATOR, institution=OTHER_VILLAGE.org) == []

    assert await listed(COUNTY, status="accepted") == [small]
    assert await listed(COUNTY, status="requested") == [elsewhere, full]
    assert await listed(COUNTY, status="archived") == []
    assert await listed(COUNTY, role="provincial_specialist") == [full]
    assert await listed(COUNTY, role="township_doctor") == [small, full]
    assert await listed(COUNTY, institution=OTHER_VILLAGE.org) == [elsewhere]
    assert await listed(COUNTY, institution=SPECIALIST.org) == [full]
    assert await listed(COUNTY, status="requested", role="provincial_specialist") == [full]

    assert await listed(COUNTY, limit="2") == [elsewhere, small]
    assert await listed(COUNTY, limit="2", offset="2") == [full]
    assert await listed(COUNTY, offset="3") == []

    # An admin holds no clinical rights: the list is empty, not an error.
    assert await listed(ADMIN) == []


async def test_coordinator_pages_are_not_cut_short_by_hidden_consultations(api: Api) -> None:
    own = await api.create(TOWNSHIP, members=(COUNTY,))  # the township centre's own request
    # Newer, and involves the township centre (a team member's institution), but was requested
    # by the village clinic: not the township coordinator's to see.
    await api.create(VILLAGE, members=(TOWNSHIP, COUNTY))
    everything = await api.get("/api/v1/consultations", TOWNSHIP_COORDINATOR)
    assert ids(everything.body) == [own]
    first_page = await api.get("/api/v1/consultations", TOWNSHIP_COORDINATOR, params={"limit": "1"})
    assert ids(first_page.body) == [own]


# --- the life cycle over HTTP -----------------------------------------------------------------


async def test_accept_schedule_reschedule_then_cancel(api: Api) -> None:
    cid = await api.create()
    assert (await api.act(cid, "accept", COUNTY))["status"] == "accepted"
    first = await api.act(cid, "schedule", COUNTY, {"scheduled_time": "2025-03-02T10:00:00+08:00"})
    assert first["status"] == "scheduled"
    moved = await api.act(cid, "schedule", VILLAGE, {"scheduled_time": "2025-03-03T02:30:00Z"})
    assert (moved["status"], parse_time(moved["scheduled_time"])) == (
        "scheduled",
        datetime(2025, 3, 3, 2, 30, tzinfo=UTC),
    )
    cancelled = await api.act(cid, "cancel", VILLAGE, {"reason": "  患者已转诊  "})
    assert (cancelled["status"], cancelled["status_reason"]) == ("cancelled", "患者已转诊")
    assert (await api.act(cid, "archive", VILLAGE))["status"] == "archived"


async def test_decline_with_reason_then_archive(api: Api) -> None:
    cid = await api.create()
    declined = await api.act(cid, "decline", SPECIALIST, {"reason": "非本专科范围"})
    assert (declined["status"], declined["status_reason"]) == ("declined", "非本专科范围")
    archived = await api.act(cid, "archive", VILLAGE, {})
    assert archived["status"] == "archived"
    assert_problem(
        await api.post(one(cid, "/accept"), COUNTY, {}),
        409,
        "cannot accept a consultation that is archived",
    )


async def test_abort_a_live_consultation(api: Api) -> None:
    cid, _ = await api.live()
    aborted = await api.act(cid, "abort", VILLAGE, {"reason": "网络中断无法继续"})
    assert (aborted["status"], aborted["status_reason"]) == ("aborted", "网络中断无法继续")
    assert (await api.act(cid, "archive", VILLAGE))["status"] == "archived"


async def test_a_follow_up_session_after_the_first(api: Api) -> None:
    cid, first = await api.live()
    assert (await api.end_session(cid, first)).status.value == "opinion_pending"
    follow_up = await api.act(
        cid, "schedule", COUNTY, {"scheduled_time": "2025-03-09T10:00:00+08:00"}
    )
    assert follow_up["status"] == "scheduled"
    second = await api.start_session(cid)
    assert second.number == 2
    record = await api.get(one(cid, "/record"), COUNTY)
    assert [s["number"] for s in record.body["sessions"]] == [1, 2]


@pytest.mark.parametrize(
    ("steps", "action", "body", "current"),
    [
        ([], "schedule", {"scheduled_time": "2025-03-02T10:00:00Z"}, "requested"),
        ([], "archive", {}, "requested"),
        ([], "abort", {"reason": "x"}, "requested"),
        (["accept"], "accept", {}, "accepted"),
        (["accept"], "decline", {"reason": "太晚了"}, "accepted"),
        (["decline"], "cancel", {"reason": "x"}, "declined"),
    ],
)
async def test_an_illegal_transition_is_409_naming_state_and_action(
    api: Api, steps: list[str], action: str, body: dict[str, str], current: str
) -> None:
    cid = await api.create()
    for step in steps:
        await api.act(
            cid, step, ACTOR_FOR[step], {"reason": "非本专科"} if step == "decline" else {}
        )
    reply = await api.post(one(cid, f"/{action}"), ACTOR_FOR[action], body)
    assert_problem(reply, 409, f"cannot {action} a consultation that is {current}")
    # Nothing changed.
    assert (await api.get(one(cid), VILLAGE)).body["status"] == current


@pytest.mark.parametrize("action", ["decline", "cancel", "abort"])
@pytest.mark.parametrize("body", [{}, {"reason": ""}, {"reason": "   "}])
async def test_a_reason_is_required(api: Api, action: str, body: dict[str, str]) -> None:
    cid = await api.create()
    reply = await api.post(one(cid, f"/{action}"), ACTOR_FOR[action], body)
    problem = assert_problem(reply, 400, "reason")
    assert error_paths(reply) == ["reason"], problem
    assert (await api.get(one(cid), VILLAGE)).body["status"] == "requested"


async def test_schedule_needs_a_time(api: Api) -> None:
    cid = await api.create()
    await api.act(cid, "accept", COUNTY)
    reply = await api.post(one(cid, "/schedule"), COUNTY, {})
    assert_problem(reply, 400, "scheduled_time")
    assert error_paths(reply) == ["scheduled_time"]


async def test_the_inviting_side_may_not_accept_its_own_request(api: Api) -> None:
    cid = await api.create()
    assert_problem(
        await api.post(one(cid, "/accept"), VILLAGE, {}),
        403,
        "role village_doctor may not respond_to_request",
    )


# --- the team ---------------------------------------------------------------------------------


async def test_add_a_team_member(api: Api) -> None:
    cid = await api.create()
    assert (await api.get(one(cid), OUTSIDER)).status == 403
    added = await api.post(one(cid, "/team"), VILLAGE, member_body(OUTSIDER))
    assert added.status == 201, added
    assert (added.body["team"][-1]["user_id"], added.body["team"][-1]["role"]) == (
        OUTSIDER.user_id,
        "county_physician",
    )
    assert (await api.get(one(cid), OUTSIDER)).status == 200
    entries = await api.audit(consultation=cid)
    assert [e["target"] for e in entries if e["action"] == "add_team_member"] == [OUTSIDER.user_id]

    duplicate = await api.post(one(cid, "/team"), VILLAGE, member_body(OUTSIDER))
    assert_problem(duplicate, 409, f"{OUTSIDER.user_id} is already on the team")


@pytest.mark.parametrize("role", ["resident", "guardian", "trainee", "admin"])
async def test_who_joins_by_invite_is_not_added_to_the_team(api: Api, role: str) -> None:
    cid = await api.create()
    body = {"user_id": "someone", "name": "某人", "role": role, "institution": VILLAGE.org}
    assert_problem(
        await api.post(one(cid, "/team"), VILLAGE, body), 400, f"a {role} joins through an invite"
    )


async def test_an_invited_physician_does_not_add_outsiders(api: Api) -> None:
    # Who may add whom is tested in full in test_visibility.py.
    cid = await api.create()
    problem = assert_problem(
        await api.post(one(cid, "/team"), COUNTY, member_body(OUTSIDER)),
        403,
        f"an invited clinician's colleagues are of {COUNTY.org}, not {OUTSIDER.org}",
    )
    assert problem["code"] == "team_institution_mismatch"


# --- invites ----------------------------------------------------------------------------------


async def test_a_resident_invite_reaches_the_consultation(api: Api) -> None:
    cid = await api.create()
    before = datetime.now(UTC).replace(microsecond=0)
    invited = await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})
    assert invited.status == 201, invited
    invite = invited.body
    assert (invite["role"], invite["user_id"]) == ("resident", "res-0001")
    assert re.fullmatch(r"[0-9a-f]{32}", invite["jti"])
    expires = parse_time(invite["expires_at"])
    assert before + timedelta(hours=2) <= expires <= datetime.now(UTC) + timedelta(hours=2)

    seen = await api.get(one(cid), invite["token"])
    assert (seen.status, seen.body["id"]) == (200, cid)
    entries = await api.audit(consultation=cid)
    assert [
        (e["actor"], e["actor_role"]) for e in entries if e["action"] == "view_consultation"
    ] == [("res-0001", "resident")]
    assert [e["target"] for e in entries if e["action"] == "issue_invite"] == [invite["jti"]]


async def _signed_opinion_and_a_draft(api: Api) -> str:
    """A live consultation whose version 1 both physicians signed, and an unsigned version 2."""
    cid, _ = await api.live()
    assert (await api.post(one(cid, "/opinions"), COUNTY, opinion_body())).status == 201
    for signer in (COUNTY, SPECIALIST):
        assert (await api.post(one(cid, "/opinions/sign"), signer, {"version": 1})).status == 200
    draft = await api.post(
        one(cid, "/opinions"), COUNTY, opinion_body(amendment_reason="补充影像结果")
    )
    assert draft.status == 201, draft
    return cid


async def test_physicians_see_every_opinion_version_in_the_record(api: Api) -> None:
    cid = await _signed_opinion_and_a_draft(api)
    record = await api.get(one(cid, "/record"), COUNTY)
    assert [(v["version"], v["locked"]) for v in record.body["opinions"]] == [(1, True), (2, False)]


async def test_the_resident_reads_the_record_with_signed_opinions_only(api: Api) -> None:
    cid = await _signed_opinion_and_a_draft(api)
    token = (await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})).body["token"]
    record = await api.get(one(cid, "/record"), token)
    assert record.status == 200, record
    assert [(v["version"], v["locked"]) for v in record.body["opinions"]] == [(1, True)]
    # The patient sees who accessed their record, this read included.
    assert (record.body["audit"][-1]["action"], record.body["audit"][-1]["actor"]) == (
        "view_record",
        "res-0001",
    )


async def test_an_invite_is_capped_at_the_configured_lifetime(api: Api) -> None:
    cid = await api.create()
    short = await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident", "ttl_s": 60})
    assert parse_time(short.body["expires_at"]) <= datetime.now(UTC) + timedelta(seconds=61)
    long = await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident", "ttl_s": 10**9})
    assert long.status == 201, long
    assert parse_time(long.body["expires_at"]) <= datetime.now(UTC) + timedelta(hours=2)


async def test_a_guardian_invite_needs_a_name_and_joins_the_team(api: Api) -> None:
    cid = await api.create()
    assert_problem(
        await api.post(one(cid, "/invites"), VILLAGE, {"role": "guardian"}),
        400,
        "an invite for a guardian needs a name",
    )
    invited = await api.post(one(cid, "/invites"), VILLAGE, {"role": "guardian", "name": "刘女儿"})
    assert invited.status == 201, invited
    guardian_id = invited.body["user_id"]
    assert guardian_id.startswith("g_")
    team = (await api.get(one(cid), VILLAGE)).body["team"]
    assert (team[-1]["user_id"], team[-1]["name"], team[-1]["role"]) == (
        guardian_id,
        "刘女儿",
        "guardian",
    )
    seen = await api.get(one(cid), invited.body["token"])
    assert seen.status == 200, seen


async def test_trainees_are_invited_to_teaching_sessions_only(api: Api) -> None:
    clinical = await api.create()
    assert_problem(
        await api.post(one(clinical, "/invites"), VILLAGE, {"role": "trainee", "name": "学员"}),
        400,
        "trainees are invited to teaching sessions only",
    )
    teaching = await api.create(kind="teaching")
    invited = await api.post(
        one(teaching, "/invites"), VILLAGE, {"role": "trainee", "name": "学员甲"}
    )
    assert invited.status == 201, invited
    trainee = invited.body["token"]
    assert (await api.get(one(teaching), trainee)).status == 200
    # Watch and listen only: no record.
    assert_problem(
        await api.get(one(teaching, "/record"), trainee), 403, "role trainee may not view_record"
    )


async def test_a_revoked_invite_is_refused(api: Api) -> None:
    cid = await api.create()
    invite = (await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})).body
    assert (await api.get(one(cid), invite["token"])).status == 200

    revoked = await api.delete(one(cid, f"/invites/{invite['jti']}"), VILLAGE)
    assert (revoked.status, revoked.raw) == (204, b"")
    refused = await api.get(one(cid), invite["token"])
    assert_problem(refused, 401, "invite has been revoked")
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    # Revoking again is harmless.
    assert (await api.delete(one(cid, f"/invites/{invite['jti']}"), VILLAGE)).status == 204
    entries = await api.audit(consultation=cid)
    assert [e["target"] for e in entries if e["action"] == "revoke_invite"] == [invite["jti"]] * 2


async def test_an_invite_does_not_reach_another_consultation(api: Api) -> None:
    mine = await api.create()
    other = await api.create()
    token = (await api.post(one(mine, "/invites"), VILLAGE, {"role": "resident"})).body["token"]
    # Same resident pseudonym, same team: only the invite's scope stands in the way.
    assert_problem(await api.get(one(other), token), 403, "scoped to another consultation")
    assert_problem(
        await api.post(one(other, "/invites"), token, {"role": "guardian", "name": "x"}),
        403,
        # The role table refuses first; the scope would refuse next.
        "role resident may not invite",
    )


async def test_only_inviters_invite(api: Api) -> None:
    cid = await api.create()
    assert_problem(
        await api.post(one(cid, "/invites"), ADMIN, {"role": "resident"}),
        403,
        "role admin may not invite",
    )
    resident = (await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})).body["token"]
    assert_problem(
        await api.post(one(cid, "/invites"), resident, {"role": "guardian", "name": "x"}),
        403,
        "role resident may not invite",
    )


async def test_an_invite_is_revoked_only_through_its_own_consultation(api: Api) -> None:
    mine = await api.create()
    theirs = await api.create(OTHER_VILLAGE, members=(COUNTY,))
    invite = (await api.post(one(theirs, "/invites"), OTHER_VILLAGE, {"role": "resident"})).body
    reply = await api.delete(one(mine, f"/invites/{invite['jti']}"), VILLAGE)
    assert_problem(reply, 404)
    assert (await api.get(one(theirs), invite["token"])).status == 200


# --- health and request ids -------------------------------------------------------------------


async def test_health_endpoints(api: Api) -> None:
    # /healthz names the node that answered (with workers, which of them did).
    node = api.app[CONFIG].effective_node_id
    for path, body in (("/healthz", {"status": "ok", "node": node}), ("/readyz", {"status": "ok"})):
        reply = await api.get(path, None)
        assert (reply.status, reply.content_type, reply.body) == (200, "application/json", body)


async def test_readyz_reports_an_unreachable_database(api: Api) -> None:
    await api.app[STORE].stop()
    reply = await api.get("/readyz", None)
    assert (reply.status, reply.body["status"]) == (503, "unavailable")
    assert reply.body["detail"].startswith("database: ")
    assert (await api.get("/healthz", None)).status == 200


async def test_request_ids_are_echoed_or_generated(api: Api) -> None:
    echoed = await api.get("/healthz", None, headers={"X-Request-Id": "clinic-42.req-7"})
    assert echoed.headers["X-Request-Id"] == "clinic-42.req-7"
    generated = await api.get("/healthz", None)
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["X-Request-Id"])
    # Also on problems; an unusable incoming id (too long) is replaced.
    problem = await api.get("/api/v1/consultations", None, headers={"X-Request-Id": "x" * 65})
    assert problem.status == 401
    assert re.fullmatch(r"[0-9a-f]{32}", problem.headers["X-Request-Id"])


async def test_unknown_paths_and_methods_are_problems(api: Api) -> None:
    assert_problem(await api.get("/api/v1/nothing-here", VILLAGE), 404)
    assert_problem(await api.request("PUT", "/api/v1/consultations", VILLAGE), 405)
