"""The live room over real socket.io connections (docs/protocol.md): the four-party
consultation from its opening to its record, one user on two devices and their removal, who may
join when, the waiting room's denial, the teaching session's trainee chat, an abort while live,
and a follow-up session."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from signaling_fixtures import (
    COORDINATOR,
    COUNTY,
    SPECIALIST,
    TOWNSHIP,
    VILLAGE,
    Peer,
    SignalingServer,
    http_record,
)

from rooms.consultations import RequestContext
from rooms.lifecycle import Action
from rooms.model import (
    CloseReason,
    ConsultationId,
    ConsultationKind,
    ConsultationStatus,
    EventKind,
)
from rooms.roles import Role

pytest_plugins = ["signaling_fixtures"]


def waiting_as(pid: str) -> Callable[[Any], bool]:
    """Matches the `waiting` announcement of participant `pid`."""
    return lambda w: bool(w["participant"]["participant_id"] == pid)


def parse(at: str) -> datetime:
    return datetime.fromisoformat(at)


async def test_four_party_consultation_from_opening_to_record(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    consultation = await server.scheduled()
    cid = consultation.id

    # The village doctor opens the session: the consultation goes live.
    village = await server.connect(VILLAGE, label="village")
    assert await village.call("join", {"consultation_id": cid, "device": "clinic-pc"}) == {
        "ok": True
    }
    opened = await village.wait_for("joined")
    assert opened["consultation_id"] == cid
    assert opened["kind"] == "consultation"
    assert opened["you"]["role"] == "village_doctor"
    assert opened["you"]["name"] == VILLAGE.name
    assert opened["you"]["device"] == "clinic-pc"
    assert opened["you"]["state"] == "admitted"
    assert [p["participant_id"] for p in opened["participants"]] == [village.participant_id]
    assert opened["waiting"] == []
    assert opened["chat"] == []
    assert opened["consents"] == []
    assert opened["trainee_chat"] is False
    assert await server.status(cid) is ConsultationStatus.LIVE
    session_id = opened["session_id"]

    # The resident comes through the waiting room.
    resident_token, invite = await server.invite(cid, Role.RESIDENT)
    resident = await server.connect(resident_token, label="resident")
    await resident.join(cid, "phone")
    told = await resident.wait_for("waiting")
    waiting_seen = await village.wait_for("waiting")
    assert told == waiting_seen
    assert told["session_id"] == session_id
    resident_pid = told["participant"]["participant_id"]
    assert told["participant"]["user_id"] == consultation.resident.pseudonym == invite.user_id
    assert told["participant"]["role"] == "resident"
    assert told["participant"]["device"] == "phone"
    assert told["participant"]["state"] == "waiting"
    assert "joined" not in resident.names()
    # While waiting, the resident is not in the room.
    assert (await resident.refused("chat", {"text": "有人吗"}))["code"] == "not_in_room"

    assert await village.ok("chat", {"text": "请稍等，马上开始"}) == {"ok": True}
    await village.wait_for("chat_message")
    assert await village.call("admit", {"participant": resident_pid}) == {"ok": True}

    admitted_snapshot = await resident.wait_for("joined")
    assert admitted_snapshot["you"]["participant_id"] == resident_pid
    assert admitted_snapshot["you"]["state"] == "admitted"
    assert [p["participant_id"] for p in admitted_snapshot["participants"]] == [
        village.participant_id,
        resident_pid,
    ]
    assert admitted_snapshot["waiting"] == []  # a resident does not run the waiting room
    assert [(m["text"], m["name"], m["role"]) for m in admitted_snapshot["chat"]] == [
        ("请稍等，马上开始", VILLAGE.name, "village_doctor")
    ]
    assert admitted_snapshot["consents"] == []
    joined_seen = await village.wait_for("participant_joined")
    assert joined_seen["participant_id"] == resident_pid
    assert joined_seen["state"] == "admitted"
    assert await village.wait_for("admitted") == {
        "participant": resident_pid,
        "by": village.participant_id,
    }
    assert village.names()[-2:] == ["participant_joined", "admitted"]

    # The county physician and the provincial specialist join by video: no waiting room.
    county = await server.seated(COUNTY, cid, device="county-laptop", label="county")
    specialist = await server.seated(SPECIALIST, cid, device="province-pc", label="specialist")
    assert "waiting" not in county.names() + specialist.names()
    assert [p["role"] for p in specialist.snapshot["participants"]] == [
        "village_doctor",
        "resident",
        "county_physician",
        "provincial_specialist",
    ]
    for peer in (village, resident):
        await peer.wait_for(
            "participant_joined", lambda p: p["participant_id"] == county.participant_id
        )
        await peer.wait_for(
            "participant_joined", lambda p: p["participant_id"] == specialist.participant_id
        )
    await county.wait_for(
        "participant_joined", lambda p: p["participant_id"] == specialist.participant_id
    )
    room = (village, resident, county, specialist)

    # Chat reaches all four, the sender included.
    await county.ok("chat", {"text": "胸片显示双肺纹理增粗"})
    # What an accepted event announces reaches its sender before the acknowledgement.
    assert [m["text"] for m in county.events("chat_message")] == ["胸片显示双肺纹理增粗"]
    for peer in room:
        message = await peer.wait_for("chat_message", lambda m: m["role"] == "county_physician")
        assert message["text"] == "胸片显示双肺纹理增粗"
        assert message["name"] == COUNTY.name
        assert message["participant"] == county.participant_id
        assert message["user_id"] == COUNTY.user_id
        assert isinstance(message["seq"], int)
    seqs = [m["seq"] for m in village.events("chat_message")]
    assert seqs == sorted(seqs) and len(set(seqs)) == 2

    # Hands.
    await resident.ok("raise_hand")
    await resident.ok("lower_hand")
    for peer in room:
        assert await peer.wait_for("hand_raised") == {"participant": resident_pid}
        assert await peer.wait_for("hand_lowered") == {"participant": resident_pid}

    # Consent to recording, given by the resident, reaches everyone.
    await resident.ok("consent", {"kind": "recording", "granted": True})
    for peer in room:
        consent = await peer.wait_for("consent_recorded")
        assert consent["kind"] == "recording"
        assert consent["granted"] is True
        assert consent["given_by"] == consultation.resident.pseudonym
        assert consent["on_behalf_of"] == consultation.resident.pseudonym
        assert consent["participant"] == resident_pid

    # A late joiner's snapshot lists the consent and the chat so far.
    township = await server.seated(TOWNSHIP, cid, label="township")
    late = township.snapshot
    assert [(c["kind"], c["granted"], c["given_by"]) for c in late["consents"]] == [
        ("recording", True, consultation.resident.pseudonym)
    ]
    assert [m["text"] for m in late["chat"]] == ["请稍等，马上开始", "胸片显示双肺纹理增粗"]
    assert len(late["participants"]) == 5

    # The specialist draws on the resident's camera.
    stroke = {
        "target_track": "resident-camera",
        "points": [[0.1, 0.2], [0.15, 0.25], [0.2, 0.3]],
        "colour": "#FF3300",
        "width": 4.0,
        "media_time": 12.5,
    }
    await specialist.ok("annotate", stroke)
    for peer in (*room, township):
        drawn = await peer.wait_for("annotation")
        assert drawn["participant"] == specialist.participant_id
        assert drawn["target_track"] == "resident-camera"
        assert drawn["points"] == [[0.1, 0.2], [0.15, 0.25], [0.2, 0.3]]
        assert drawn["colour"] == "#ff3300"
        assert drawn["width"] == 4.0
        assert drawn["clear"] is False
        assert drawn["media_time"] == 12.5
        assert isinstance(drawn["seq"], int)

    # The pointer reaches the others but not its sender, and is not recorded.
    await specialist.ok("pointer", {"target_track": "resident-camera", "x": 0.4, "y": 0.6})
    for peer in (village, resident, county, township):
        assert await peer.wait_for("pointer") == {
            "participant": specialist.participant_id,
            "target_track": "resident-camera",
            "x": 0.4,
            "y": 0.6,
        }

    # Mute by the specialist.
    await specialist.ok("mute", {"participant": resident_pid, "kind": "audio"})
    for peer in (*room, township):
        assert await peer.wait_for("muted") == {
            "participant": resident_pid,
            "kind": "audio",
            "by": specialist.participant_id,
        }
    # The specialist saw its own events in order: no pointer came back to it.
    assert "pointer" not in specialist.names()

    # Removal of the township doctor. (Someone waiting is turned away with `deny` instead.)
    township_pid = township.participant_id
    tablet, waiting_pid = await server.waiting(resident_token, cid, device="tablet", label="tab")
    for event, payload in [
        ("remove", {"participant": waiting_pid, "reason": "x"}),
        ("mute", {"participant": waiting_pid, "kind": "video"}),
    ]:
        assert (await specialist.refused(event, payload))["code"] == "no_such_participant"
    await specialist.ok("remove", {"participant": township_pid, "reason": "误入会诊"})
    removed = {"participant": township_pid, "by": specialist.participant_id, "reason": "误入会诊"}
    assert await township.wait_for("removed") == removed
    await township.wait_disconnected()
    for peer in room:
        assert await peer.wait_for("removed") == removed
        assert await peer.wait_for("participant_left") == {
            "participant": township_pid,
            "reason": "kicked",
        }
    assert township.events("removed") == [removed]  # once, not again as a room member
    back = await server.connect(TOWNSHIP, label="township again")
    refusal = await back.refused("join", {"consultation_id": cid})
    assert refusal["code"] == "removed"

    # The village doctor ends the session: the room and the waiting room are told.
    await village.ok("end_session")
    for peer in (*room, tablet):
        assert await peer.wait_for("session_ended") == {"session_id": session_id, "reason": "ended"}
    for peer in (*room, tablet):
        await peer.wait_disconnected()
    assert await server.status(cid) is ConsultationStatus.OPINION_PENDING

    # The record, over HTTP as the inviting clinician.
    record = await http_record(server, cid, server.token(VILLAGE))
    events = record["events"]
    assert [(e["kind"], e["participant_id"]) for e in events] == [
        ("session_started", None),
        ("joined", village.participant_id),
        ("waiting", resident_pid),
        ("chat", village.participant_id),
        ("admitted", village.participant_id),
        ("joined", resident_pid),
        ("joined", county.participant_id),
        ("joined", specialist.participant_id),
        ("chat", county.participant_id),
        ("hand_raised", resident_pid),
        ("hand_lowered", resident_pid),
        ("consent", resident_pid),
        ("joined", township_pid),
        ("annotation", specialist.participant_id),
        ("muted", specialist.participant_id),
        ("waiting", waiting_pid),
        ("removed", specialist.participant_id),
        ("left", township_pid),
        ("session_ended", None),
    ]
    seqs = [e["seq"] for e in events]
    assert all(a < b for a, b in itertools.pairwise(seqs)), seqs
    times = [parse(e["at"]) for e in events]
    assert times == sorted(times)
    assert {e["session_id"] for e in events} == {session_id}
    by_kind = {e["kind"]: e for e in events}
    assert by_kind["session_started"]["actor"] == VILLAGE.user_id
    assert by_kind["session_started"]["data"] == {"number": 1}
    assert by_kind["admitted"]["actor"] == VILLAGE.user_id
    assert by_kind["admitted"]["data"] == {
        "participant_id": resident_pid,
        "user_id": consultation.resident.pseudonym,
    }
    chats = [e["data"] for e in events if e["kind"] == "chat"]
    assert chats == [
        {"text": "请稍等，马上开始", "name": VILLAGE.name, "role": "village_doctor"},
        {"text": "胸片显示双肺纹理增粗", "name": COUNTY.name, "role": "county_physician"},
    ]
    assert by_kind["consent"]["data"] == {
        "kind": "recording",
        "granted": True,
        "on_behalf_of": consultation.resident.pseudonym,
    }
    assert by_kind["annotation"]["data"] == {
        "target_track": "resident-camera",
        "points": [[0.1, 0.2], [0.15, 0.25], [0.2, 0.3]],
        "colour": "#ff3300",
        "width": 4.0,
        "clear": False,
        "media_time": 12.5,
    }
    assert by_kind["muted"]["data"] == {"participant_id": resident_pid, "kind": "audio"}
    assert by_kind["removed"]["actor"] == SPECIALIST.user_id
    assert by_kind["removed"]["data"] == {
        "participant_id": township_pid,
        "user_id": TOWNSHIP.user_id,
        "reason": "误入会诊",
    }
    assert by_kind["left"]["actor"] == TOWNSHIP.user_id
    assert by_kind["left"]["data"] == {"reason": "kicked", "moderator_reason": "误入会诊"}
    assert by_kind["session_ended"]["actor"] == VILLAGE.user_id
    assert by_kind["session_ended"]["data"] == {"reason": "ended"}

    participations = {p["participant_id"]: p for p in record["participations"]}
    assert {
        pid: (p["role"], p["device"], p["close_reason"]) for pid, p in participations.items()
    } == {
        village.participant_id: ("village_doctor", "clinic-pc", "session_ended"),
        resident_pid: ("resident", "phone", "session_ended"),
        county.participant_id: ("county_physician", "county-laptop", "session_ended"),
        specialist.participant_id: ("provincial_specialist", "province-pc", "session_ended"),
        township_pid: ("township_doctor", "default", "kicked"),
    }
    for p in participations.values():
        assert p["session_id"] == session_id
        assert parse(p["joined_at"]) <= parse(p["left_at"])
    assert parse(participations[township_pid]["left_at"]) < parse(
        participations[village.participant_id]["left_at"]
    )
    assert [(c["kind"], c["granted"], c["given_by"]) for c in record["consents"]] == [
        ("recording", True, consultation.resident.pseudonym)
    ]
    [session] = record["sessions"]
    assert session["id"] == session_id
    assert session["ended_at"] is not None
    assert record["consultation"]["status"] == "opinion_pending"


async def test_same_user_on_two_devices_is_two_participants(sig_server: SignalingServer) -> None:
    """Telementoring: the county surgeon streams a room camera and a surgical-field camera."""
    server = sig_server
    consultation = await server.scheduled(
        kind=ConsultationKind.TELEMENTORING, inviter=COUNTY, team=(SPECIALIST,)
    )
    cid = consultation.id
    mentor = await server.seated(SPECIALIST, cid, device="province-pc", label="mentor")
    room_cam = await server.seated(COUNTY, cid, device="room-cam", label="room-cam")
    field_cam = await server.seated(COUNTY, cid, device="field-cam", label="field-cam")

    assert room_cam.participant_id != field_cam.participant_id
    assert room_cam.snapshot["you"]["user_id"] == field_cam.snapshot["you"]["user_id"]
    assert [(p["user_id"], p["device"]) for p in field_cam.snapshot["participants"]] == [
        (SPECIALIST.user_id, "province-pc"),
        (COUNTY.user_id, "room-cam"),
        (COUNTY.user_id, "field-cam"),
    ]
    await mentor.wait_for("participant_joined", lambda p: p["device"] == "field-cam")
    assert [(p["participant_id"], p["device"]) for p in mentor.events("participant_joined")] == [
        (room_cam.participant_id, "room-cam"),
        (field_cam.participant_id, "field-cam"),
    ]
    # One device's events reach the other device like any other participant's.
    await room_cam.ok("chat", {"text": "准备切开"})
    assert (await field_cam.wait_for("chat_message"))["participant"] == room_cam.participant_id
    record = await server.record(cid, COUNTY)  # the inviting clinician here
    assert sorted(p.device for p in record.participations if p.user_id == COUNTY.user_id) == [
        "field-cam",
        "room-cam",
    ]


async def test_removing_a_person_removes_every_device_of_theirs(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    cid = (
        await server.scheduled(
            kind=ConsultationKind.TELEMENTORING, inviter=COUNTY, team=(SPECIALIST, TOWNSHIP)
        )
    ).id
    mentor = await server.seated(SPECIALIST, cid, device="province-pc", label="mentor")
    mentor_tablet = await server.seated(SPECIALIST, cid, device="tablet", label="mentor tablet")
    room_cam = await server.seated(COUNTY, cid, device="room-cam", label="room-cam")
    field_cam = await server.seated(COUNTY, cid, device="field-cam", label="field-cam")
    township = await server.seated(TOWNSHIP, cid, label="township")

    # Not one of your own devices: that is `leave`.
    own = await mentor.refused(
        "remove", {"participant": mentor_tablet.participant_id, "reason": "多余"}
    )
    assert own["code"] == "invalid_target"

    await mentor.ok("remove", {"participant": field_cam.participant_id, "reason": "无关人员"})
    for cam in (room_cam, field_cam):
        removed = await cam.wait_for("removed")
        assert removed == {
            "participant": cam.participant_id,
            "by": mentor.participant_id,
            "reason": "无关人员",
        }
        await cam.wait_disconnected()
    gone = {room_cam.participant_id, field_cam.participant_id}
    for peer in (mentor, township):
        await peer.wait_for("removed", lambda r: r["participant"] == room_cam.participant_id)
        await peer.wait_for("removed", lambda r: r["participant"] == field_cam.participant_id)
        left = peer.events("participant_left")
        assert {p["participant"] for p in left} == gone
        assert {p["reason"] for p in left} == {"kicked"}
    assert township.connected and mentor_tablet.connected
    again = await server.connect(COUNTY, label="county again")
    refusal = await again.refused("join", {"consultation_id": cid, "device": "new-cam"})
    assert refusal["code"] == "removed"

    record = await server.record(cid, COUNTY)
    assert sorted(
        (p.device, p.close_reason) for p in record.participations if p.user_id == COUNTY.user_id
    ) == [("field-cam", CloseReason.KICKED), ("room-cam", CloseReason.KICKED)]
    [removal] = [e for e in record.events if e.kind is EventKind.REMOVED]
    assert removal.data == {
        "participant_id": field_cam.participant_id,
        "user_id": COUNTY.user_id,
        "reason": "无关人员",
    }
    lefts = [e for e in record.events if e.kind is EventKind.LEFT]
    assert {e.participant_id for e in lefts} == gone
    assert all(e.data == {"reason": "kicked", "moderator_reason": "无关人员"} for e in lefts)


async def test_aborting_a_live_consultation_closes_the_room(sig_server: SignalingServer) -> None:
    server = sig_server
    consultation = await server.scheduled()
    cid = consultation.id
    await server.seated(VILLAGE, cid, label="village")
    county = await server.seated(COUNTY, cid, label="county")
    await server.service.transition(
        RequestContext(VILLAGE.actor()), ConsultationId(cid), Action.ABORT, reason="网络中断"
    )
    assert await server.status(cid) is ConsultationStatus.ABORTED
    error = await county.refused("chat", {"text": "还在吗"})
    assert error["code"] == "not_live"
    assert "aborted" in error["message"]
    latecomer = await server.connect(SPECIALIST, label="specialist")
    assert (await latecomer.refused("join", {"consultation_id": cid}))["code"] == "not_joinable"
    record = await server.record(cid)
    [session] = record.sessions
    assert session.ended_at is not None
    assert record.events[-1].kind is EventKind.SESSION_ENDED
    assert record.events[-1].data == {"reason": "aborted: 网络中断"}
    assert {p.close_reason for p in record.participations} == {CloseReason.SESSION_ENDED}


async def test_only_scheduled_or_live_consultations_can_be_joined(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    village_ctx = RequestContext(VILLAGE.actor())
    county_ctx = RequestContext(COUNTY.actor())
    service = server.service

    requested = (await server.requested()).id
    accepted = (await server.requested()).id
    await service.transition(county_ctx, ConsultationId(accepted), Action.ACCEPT)
    declined = (await server.requested()).id
    await service.transition(
        county_ctx, ConsultationId(declined), Action.DECLINE, reason="非本专科"
    )
    cancelled = (await server.scheduled()).id
    await service.transition(
        village_ctx, ConsultationId(cancelled), Action.CANCEL, reason="患者已转院"
    )
    aborted = (await server.scheduled()).id
    await service.transition(village_ctx, ConsultationId(aborted), Action.ABORT, reason="停电")
    pending = (await server.scheduled()).id
    session = await service.start_session(village_ctx, ConsultationId(pending))
    await service.end_session(village_ctx, ConsultationId(pending), session.id)
    cases = {
        requested: "requested",
        accepted: "accepted",
        declined: "declined",
        cancelled: "cancelled",
        aborted: "aborted",
        pending: "opinion_pending",
    }

    village = await server.connect(VILLAGE, label="village")
    for cid, status in cases.items():
        error = await village.refused("join", {"consultation_id": cid})
        assert error["code"] == "not_joinable", (status, error)
        assert f"the consultation is {status}" in error["message"]
        assert (await server.status(cid)).value == status
    # A refused join leaves the connection free to join a joinable one.
    open_one = (await server.scheduled()).id
    await village.join(open_one)
    assert (await village.wait_for("joined"))["consultation_id"] == open_one


async def test_only_a_clinician_opens_the_session(sig_server: SignalingServer) -> None:
    server = sig_server
    cid = (await server.scheduled()).id
    resident_token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.connect(resident_token, label="resident")
    coordinator = await server.connect(COORDINATOR, label="coordinator")
    for peer in (resident, coordinator):
        error = await peer.refused("join", {"consultation_id": cid})
        assert error["code"] == "session_not_started"
        assert "a clinician opens it" in error["message"]
    assert await server.status(cid) is ConsultationStatus.SCHEDULED
    assert (await server.record(cid)).sessions == []

    village = await server.seated(VILLAGE, cid, label="village")
    # The same connections may now join: the resident waits, the coordinator runs the room.
    await resident.join(cid)
    waiting = await resident.wait_for("waiting")
    assert waiting["session_id"] == village.snapshot["session_id"]
    await coordinator.join(cid)
    assert (await coordinator.wait_for("joined"))["you"]["role"] == "coordinator"


async def test_denied_resident_is_told_disconnected_and_recorded(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    consultation = await server.scheduled()
    cid = consultation.id
    village = await server.seated(VILLAGE, cid, label="village")
    county = await server.seated(COUNTY, cid, label="county")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident, resident_pid = await server.waiting(token, cid, label="resident")
    await county.wait_for("waiting")

    await village.ok("deny", {"participant": resident_pid, "reason": "请先到卫生室面诊"})
    denied = {
        "participant": resident_pid,
        "by": village.participant_id,
        "reason": "请先到卫生室面诊",
    }
    assert await resident.wait_for("denied") == denied
    await resident.wait_disconnected()
    assert await village.wait_for("denied") == denied
    assert await county.wait_for("denied") == denied
    assert "joined" not in resident.names()

    room = await server.presence(cid)
    assert room is not None
    assert sorted(p.role.value for p in room.participants.values()) == [
        "county_physician",
        "village_doctor",
    ]
    record = await server.record(cid)
    [entry] = [e for e in record.events if e.kind is EventKind.DENIED]
    assert entry.actor == VILLAGE.user_id
    assert entry.participant_id == village.participant_id
    assert entry.data == {
        "participant_id": resident_pid,
        "user_id": consultation.resident.pseudonym,
        "reason": "请先到卫生室面诊",
    }
    assert resident_pid not in {p.participant_id for p in record.participations}
    # Denying again is refused: nobody is waiting under that id any more.
    assert (await village.refused("deny", {"participant": resident_pid}))[
        "code"
    ] == "no_such_participant"


async def test_teaching_session_trainees_wait_and_chat_only_when_allowed(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    cid = (await server.scheduled(kind=ConsultationKind.TEACHING)).id
    presenter = await server.seated(SPECIALIST, cid, label="presenter")
    assert presenter.snapshot["kind"] == "teaching"
    assert presenter.snapshot["trainee_chat"] is False

    trainees: list[Peer] = []
    for name in ("学员甲", "学员乙"):
        token, invite = await server.invite(cid, Role.TRAINEE, name)
        assert invite.role is Role.TRAINEE
        peer, pid = await server.waiting(token, cid, label=name)
        seen = await presenter.wait_for("waiting", waiting_as(pid))
        assert (seen["participant"]["role"], seen["participant"]["name"]) == ("trainee", name)
        await presenter.ok("admit", {"participant": pid})
        assert (await peer.wait_for("joined"))["trainee_chat"] is False
        trainees.append(peer)
    first, second = trainees

    closed = await first.refused("chat", {"text": "老师好"})
    assert closed["code"] == "chat_closed"
    await presenter.ok("chat", {"text": "今天讲慢阻肺的影像"})
    await first.wait_for("chat_message")

    await presenter.ok("set_trainee_chat", {"open": True})
    for peer in (presenter, *trainees):
        assert await peer.wait_for("trainee_chat_set") == {
            "open": True,
            "by": presenter.participant_id,
        }
    await first.ok("chat", {"text": "老师好"})
    for peer in (presenter, second):
        message = await peer.wait_for("chat_message", lambda m: m["role"] == "trainee")
        assert (message["name"], message["text"]) == ("学员甲", "老师好")

    await presenter.ok("set_trainee_chat", {"open": False})
    await second.wait_for("trainee_chat_set", lambda s: s["open"] is False)
    assert (await second.refused("chat", {"text": "还有问题"}))["code"] == "chat_closed"

    events = await server.events(cid)
    assert [e.data for e in events if e.kind is EventKind.CHAT_SETTINGS] == [
        {"trainee_chat": True},
        {"trainee_chat": False},
    ]
    assert [e.data["text"] for e in events if e.kind is EventKind.CHAT] == [
        "今天讲慢阻肺的影像",
        "老师好",
    ]


async def test_a_follow_up_call_is_a_second_session_of_the_same_consultation(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    consultation = await server.scheduled()
    cid = consultation.id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, label="resident")
    await resident.ok("consent", {"kind": "consultation", "granted": True})
    await village.ok("chat", {"text": "两周后复诊"})
    await village.ok("end_session")
    await resident.wait_disconnected()
    assert await server.status(cid) is ConsultationStatus.OPINION_PENDING

    await server.service.transition(
        RequestContext(COUNTY.actor()),
        ConsultationId(cid),
        Action.SCHEDULE,
        scheduled_time=datetime.now(UTC) + timedelta(days=14),
    )
    again = await server.seated(VILLAGE, cid, label="village, follow-up")
    second = again.snapshot
    assert second["session_id"] != village.snapshot["session_id"]
    assert second["chat"] == []  # chat history is the session's
    assert [(c["kind"], c["granted"]) for c in second["consents"]] == [("consultation", True)]
    assert await server.status(cid) is ConsultationStatus.LIVE

    record = await server.record(cid)
    assert [(s.number, s.ended_at is None) for s in record.sessions] == [(1, False), (2, True)]
    first_id, second_id = (s.id for s in record.sessions)
    assert [(e.session_id, e.kind.value) for e in record.events][-3:] == [
        (first_id, "session_ended"),
        (second_id, "session_started"),
        (second_id, "joined"),
    ]
