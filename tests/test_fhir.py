"""GET /api/v1/consultations/{id}/fhir: a whole consultation exported as an R4B Bundle, checked
with the fhir.resources R4B models, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from api_helpers import (
    ADMIN,
    COORDINATOR,
    COUNTY,
    OUTSIDER,
    SPECIALIST,
    VILLAGE,
    Api,
    assert_problem,
    one,
    opinion_body,
)
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from rooms.model import (
    CloseReason,
    Consent,
    ConsentKind,
    ConsultationId,
    EventKind,
    ParticipantId,
    Participation,
    Recording,
    RecordingId,
    SessionId,
    UserId,
)
from rooms.roles import Role
from server.app import STORE
from server.fhir.export import MAX_UNSIGNED_INT, references

FHIR_JSON = "application/fhir+json"
RESIDENT = UserId("res-0001")
SHA256 = "9f" * 32
BIG = MAX_UNSIGNED_INT + 10


def entries(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type
    ]


def validate(bundle: dict[str, Any]) -> None:
    """Every entry parses with its own R4B model, and so does the whole Bundle."""
    for entry in bundle["entry"]:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    parsed = Bundle.model_validate(bundle)
    assert parsed.type == "collection"
    assert len(parsed.entry or []) == len(bundle["entry"])


def assert_references_resolve(bundle: dict[str, Any]) -> None:
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(full_urls) == len(set(full_urls))
    for url, entry in zip(full_urls, bundle["entry"], strict=True):
        assert url == f"urn:uuid:{entry['resource']['id']}"
    dangling = {ref for ref in references(bundle["entry"]) if ref not in set(full_urls)}
    assert dangling == set()


async def invite(api: Api, cid: str, role: str, name: str | None = None) -> str:
    body: dict[str, Any] = {"role": role} | ({"name": name} if name else {})
    reply = await api.post(one(cid, "/invites"), VILLAGE, body)
    assert reply.status == 201, reply
    token: str = reply.body["token"]
    return token


async def full_consultation(api: Api) -> tuple[str, str, str]:
    """Created, scheduled, one session with joins and leaves, chat, consents, a recording, an
    opinion signed by both invited physicians, an unsigned amendment, a final decision.
    Returns the id and the resident's and the guardian's tokens."""
    cid = await api.scheduled()
    resident = await invite(api, cid, "resident")
    guardian_token = await invite(api, cid, "guardian", "刘家属")
    guardian = next(
        m for m in (await api.get(one(cid), VILLAGE)).body["team"] if m["role"] == "guardian"
    )
    session = await api.start_session(cid)
    sid = SessionId(session.id)
    t0 = session.started_at

    def joined(pid: str, user: str, name: str, role: Role, minutes: float) -> Participation:
        return Participation(
            sid, ParticipantId(pid), UserId(user), name, role, "Chrome 130 / Android",
            t0 + timedelta(minutes=minutes), None, None,
        )  # fmt: skip

    async with api.app[STORE].transaction() as tx:
        await tx.add_participation(joined("p1", VILLAGE.user_id, VILLAGE.name, VILLAGE.role, 0))
        await tx.add_participation(joined("p2", RESIDENT, "刘奶奶", Role.RESIDENT, 1))
        await tx.add_participation(joined("p3", COUNTY.user_id, COUNTY.name, COUNTY.role, 2))
        await tx.add_participation(
            joined("p4", SPECIALIST.user_id, SPECIALIST.name, SPECIALIST.role, 3)
        )
        await tx.close_participation(
            sid, ParticipantId("p3"), t0 + timedelta(minutes=9), CloseReason.NETWORK_LOST
        )
        await tx.add_participation(joined("p5", COUNTY.user_id, COUNTY.name, COUNTY.role, 10))
        for actor, name, text in (
            (COUNTY.user_id, COUNTY.name, "请描述一下咳嗽的情况"),
            (RESIDENT, "刘奶奶", "晚上咳得厉害"),
        ):
            await tx.append_event(
                sid,
                t0 + timedelta(minutes=5),
                EventKind.CHAT,
                actor,
                ParticipantId("p3"),
                {"text": text, "name": name, "role": "county_physician"},
            )
        cid_ = ConsultationId(cid)
        guardian_id = UserId(guardian["user_id"])
        for kind, granted, by, behalf, minutes in (
            (ConsentKind.CONSULTATION, True, RESIDENT, "本人", 1),
            (ConsentKind.RECORDING, True, guardian_id, "刘奶奶 (母亲)", 2),
            (ConsentKind.RECORDING, False, guardian_id, "刘奶奶 (母亲)", 20),
        ):
            await tx.add_consent(
                Consent(cid_, sid, kind, granted, by, behalf, t0 + timedelta(minutes=minutes))
            )
        await tx.add_recording(
            Recording(
                RecordingId("rec_fhir_1"),
                sid,
                "p3-camera",
                "track",
                "video/webm",
                SHA256,
                600.25,
                BIG,
                "complete",
                t0 + timedelta(minutes=2),
                t0 + timedelta(minutes=9),
                participant_id="p3",
                name=COUNTY.name,
                role="county_physician",
                source="camera",
            )
        )
    await api.end_session(cid, session)
    reply = await api.post(one(cid, "/opinions"), COUNTY, opinion_body())
    assert reply.status == 201, reply
    for who in (COUNTY, SPECIALIST):
        reply = await api.post(one(cid, "/opinions/sign"), who, {"version": 1})
        assert reply.status == 200, reply
    assert reply.body["consultation_status"] == "signed"
    reply = await api.post(one(cid, "/decision"), VILLAGE, {"decision": "按意见在村卫生室治疗"})
    assert reply.status == 201, reply
    amendment = opinion_body(
        recommendations="改为两周后复查肺功能", amendment_reason="补充复查项目"
    )
    reply = await api.post(one(cid, "/opinions"), SPECIALIST, amendment)
    assert reply.status == 201, reply
    return cid, resident, guardian_token


async def export(api: Api, cid: str, who: Any) -> dict[str, Any]:
    reply = await api.get(one(cid, "/fhir"), who)
    assert reply.status == 200, reply
    assert reply.content_type == FHIR_JSON
    bundle: dict[str, Any] = reply.body
    return bundle


async def test_a_whole_consultation_exports_as_a_valid_bundle(backend_api: Api) -> None:
    api = backend_api
    cid, _, _ = await full_consultation(api)
    bundle = await export(api, cid, VILLAGE)
    validate(bundle)
    assert_references_resolve(bundle)
    assert bundle["identifier"]["value"] == cid
    counts = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
    assert counts["ServiceRequest"] == counts["Appointment"] == counts["CareTeam"] == 1
    assert counts["Patient"] == counts["Encounter"] == counts["Media"] == 1
    assert counts["Communication"] == 2
    assert counts["Consent"] == 3
    # Village, township, county, specialist; the guardian is a RelatedPerson.
    assert counts["Practitioner"] == counts["PractitionerRole"] == 4
    assert counts["RelatedPerson"] == 1
    # The two opinion versions and the decision; one Provenance per signature.
    assert counts["Composition"] == 3 and counts["Provenance"] == 2
    assert counts["AuditEvent"] >= 10

    (request,) = entries(bundle, "ServiceRequest")
    assert request["reasonCode"][0]["text"] == "反复咳嗽、气短两个月"
    assert request["orderDetail"][0]["text"] == "明确诊断并调整治疗方案"
    assert request["note"][0]["text"].startswith("COPD 病史 8 年")
    assert request["performerType"]["text"] == "主任医师, respiratory"
    assert request["status"] == "completed"
    (appointment,) = entries(bundle, "Appointment")
    assert appointment["status"] == "fulfilled"
    assert appointment["start"] == "2025-03-02T02:00:00Z"

    (patient,) = entries(bundle, "Patient")
    assert "name" not in patient  # the pseudonym only
    assert patient["identifier"][0]["value"] == "res-0001"
    assert "刘奶奶" not in str(patient)

    (encounter,) = entries(bundle, "Encounter")
    assert encounter["class"]["code"] == "VR"
    assert encounter["class"]["system"] == "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    assert encounter["status"] == "finished" and "end" in encounter["period"]
    people = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    periods = [
        (people[p["individual"]["reference"]]["code"][0]["coding"][0]["code"], p["period"])
        for p in encounter["participant"]
    ]
    # County physician twice: dropped by the network, then back; the resident is the subject.
    assert [role for role, _ in periods] == [
        "village_doctor",
        "county_physician",
        "provincial_specialist",
        "county_physician",
    ]
    first_county = periods[1][1]
    assert "end" in first_county and first_county["start"] < first_county["end"]
    lost = encounter["participant"][1]["extension"]
    assert any(x.get("valueCode") == "network_lost" for x in lost)

    (media,) = entries(bundle, "Media")
    content = media["content"]
    assert content["url"].endswith("/api/v1/recordings/rec_fhir_1/content")
    assert "hash" not in content  # Attachment.hash is SHA-1; ours is SHA-256
    assert {"url": content["extension"][0]["url"], "valueString": SHA256} == content["extension"][0]
    assert content["extension"][0]["url"].endswith("/sha256")
    assert "size" not in content  # beyond unsignedInt: in the extension
    assert content["extension"][1]["valueDecimal"] == BIG
    assert media["duration"] == 600.25 and media["status"] == "completed"

    chats = entries(bundle, "Communication")
    assert [c["payload"][0]["contentString"] for c in chats] == [
        "请描述一下咳嗽的情况",
        "晚上咳得厉害",
    ]
    assert chats[1]["sender"]["reference"] == next(
        e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )

    final, amendment, decision = entries(bundle, "Composition")
    assert final["status"] == "final" and len(final["attester"]) == 2
    assert {a["party"]["display"] for a in final["attester"]} == {COUNTY.name, SPECIALIST.name}
    assert amendment["status"] == "preliminary" and "attester" not in amendment
    assert amendment["relatesTo"][0]["code"] == "replaces"
    assert "Amendment reason" in [s["title"] for s in amendment["section"]]
    assert decision["relatesTo"][0]["code"] == "appends"
    assert "按意见在村卫生室治疗" in decision["section"][0]["text"]["div"]
    provenance = entries(bundle, "Provenance")
    composition_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"] is final)
    assert {p["target"][0]["reference"] for p in provenance} == {composition_url}
    hashes = {p["signature"][0]["extension"][0]["valueString"] for p in provenance}
    assert hashes == {final["extension"][0]["valueString"]} and len(hashes.pop()) == 64

    consents = entries(bundle, "Consent")
    assert [(c["status"], c["provision"]["type"]) for c in consents] == [
        ("active", "permit"),
        ("inactive", "permit"),  # the recording consent, later withdrawn
        ("active", "deny"),
    ]
    assert consents[2]["extension"][0]["valueString"] == "刘奶奶 (母亲)"
    assert consents[2]["performer"][0]["reference"] in people
    assert people[consents[2]["performer"][0]["reference"]]["resourceType"] == "RelatedPerson"

    subtypes = [a["subtype"][0]["code"] for a in entries(bundle, "AuditEvent")]
    assert "create_consultation" in subtypes and "sign_opinion" in subtypes
    # This export is audited in the same transaction that read the audit trail.
    assert subtypes[-1] == "export_record"


async def test_full_urls_are_stable_between_exports(api: Api) -> None:
    cid, _, _ = await full_consultation(api)
    first = await export(api, cid, VILLAGE)
    second = await export(api, cid, VILLAGE)
    first_urls = [e["fullUrl"] for e in first["entry"]]
    second_urls = [e["fullUrl"] for e in second["entry"]]
    # The second export also holds the first export's audit entry, and nothing else new.
    assert second_urls[: len(first_urls)] == first_urls
    added = second["entry"][len(first_urls) :]
    assert [e["resource"]["subtype"][0]["code"] for e in added] == ["export_record"]


async def test_the_resident_sees_only_what_the_record_shows_them(api: Api) -> None:
    cid, resident, _ = await full_consultation(api)
    bundle = await export(api, cid, resident)
    validate(bundle)
    assert_references_resolve(bundle)
    # The unsigned amendment is the physicians' draft: not in the resident's export.
    compositions = entries(bundle, "Composition")
    assert [c["status"] for c in compositions] == ["final", "final"]
    assert all("两周后复查肺功能" not in str(c) for c in compositions)
    # The patient sees who accessed their record, including this export.
    audit = entries(bundle, "AuditEvent")
    assert audit and audit[-1]["subtype"][0]["code"] == "export_record"


async def test_an_invited_physician_sees_no_audit_trail(api: Api) -> None:
    cid, _, _ = await full_consultation(api)
    bundle = await export(api, cid, COUNTY)
    validate(bundle)
    assert entries(bundle, "AuditEvent") == []
    assert [c["status"] for c in entries(bundle, "Composition")] == [
        "final",
        "preliminary",
        "final",
    ]


async def test_who_may_not_export(api: Api) -> None:
    cid, resident, _ = await full_consultation(api)
    assert_problem(await api.get(one(cid, "/fhir"), COORDINATOR), 403, "export_record")
    assert_problem(await api.get(one(cid, "/fhir"), ADMIN), 403, "export_record")
    assert_problem(await api.get(one(cid, "/fhir"), OUTSIDER), 403, "not on this consultation")
    assert_problem(await api.get(one(cid, "/fhir"), None), 401)
    assert_problem(await api.get(one("c_missing", "/fhir"), VILLAGE), 404, "c_missing")
    teaching = await api.scheduled(kind="teaching")
    trainee = await invite(api, teaching, "trainee", "学员甲")
    assert_problem(await api.get(one(teaching, "/fhir"), trainee), 403, "trainee")
    # A resident's invite reaches their own consultation only.
    assert_problem(await api.get(one(teaching, "/fhir"), resident), 403, "scoped")


async def test_the_export_is_in_the_audit_log(api: Api) -> None:
    cid, resident, _ = await full_consultation(api)
    before = datetime.now(UTC)
    await export(api, cid, COUNTY)
    await export(api, cid, resident)
    exports = [e for e in await api.audit(consultation=cid) if e["action"] == "export_record"]
    assert [(e["actor"], e["actor_role"]) for e in exports] == [
        (COUNTY.user_id, "county_physician"),
        ("res-0001", "resident"),
    ]
    assert all(datetime.fromisoformat(e["at"]) >= before for e in exports)
    # Refused exports are not exports.
    await api.get(one(cid, "/fhir"), COORDINATOR)
    after = [e for e in await api.audit(consultation=cid) if e["action"] == "export_record"]
    assert len(after) == 2


async def test_an_unfinished_session_exports_as_in_progress(api: Api) -> None:
    cid, session = await api.live()
    async with api.app[STORE].transaction() as tx:
        await tx.add_recording(
            Recording(
                RecordingId("rec_live"),
                SessionId(session.id),
                "mic",
                "track",
                "audio/webm",
                None,
                None,
                None,
                "recording",
                session.started_at,
                None,
            )
        )
    bundle = await export(api, cid, VILLAGE)
    validate(bundle)
    assert_references_resolve(bundle)
    (encounter,) = entries(bundle, "Encounter")
    (media,) = entries(bundle, "Media")
    assert (encounter["status"], media["status"]) == ("in-progress", "in-progress")
    assert "end" not in encounter["period"] and "end" not in media["createdPeriod"]
    assert "hash" not in media["content"] and "extension" not in media["content"]


async def test_the_validation_is_not_vacuous(api: Api) -> None:
    cid, _ = await api.live()
    bundle = await export(api, cid, VILLAGE)
    validate(bundle)
    (encounter,) = entries(bundle, "Encounter")
    del encounter["class"]  # 1..1 in R4B
    with pytest.raises(ValidationError, match="class"):
        validate(bundle)
