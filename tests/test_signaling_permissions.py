"""Who may do what in the live room, over real connections: the whole permission matrix of the
client events, written out by hand from the domain (docs/domain.md), and the scope rules that
keep everyone inside their own consultation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import socketio
from signaling_fixtures import (
    COORDINATOR,
    COUNTY,
    OUTSIDER,
    SPECIALIST,
    TOWNSHIP,
    VILLAGE,
    DemoIdentity,
    Peer,
    SignalingServer,
)

from rooms.model import ConsultationKind, ConsultationStatus, UserId
from rooms.roles import Role

pytest_plugins = ["signaling_fixtures"]

R = Role
# The columns of the matrix, in this order.
ROLES = (
    R.RESIDENT,
    R.GUARDIAN,
    R.TRAINEE,
    R.VILLAGE_DOCTOR,
    R.TOWNSHIP_DOCTOR,
    R.COUNTY_PHYSICIAN,
    R.PROVINCIAL_SPECIALIST,
    R.COORDINATOR,
)
OK = "ok"
NO = "forbidden"  # refused with `forbidden`, the message naming the event's permission
CLOSED = "chat_closed"  # a trainee while the presenter keeps trainee chat closed

# The permission each event needs, as a forbidden error names it.
PERMISSION = {
    "admit": "admit",
    "deny": "admit",
    "chat": "chat",
    "raise_hand": "join",
    "lower_hand": "join",
    "mute": "mute_others",
    "remove": "remove_participant",
    "consent": "consent",
    "annotate": "annotate",
    "pointer": "annotate",
    "set_trainee_chat": "admit",
    "end_session": "end_session",
    "restart_subscribe": "subscribe",
}

# fmt: off
# Residents and guardians: join, chat, consent. Trainees: watch, listen, chat if allowed.
# Village doctor: runs the room, annotates, ends. Township: as the village doctor, without
# annotate. County: annotates, admits, ends. Provincial specialist: the county's rights plus
# mute and remove. Coordinator: the waiting room only, no clinical content (no chat).
MATRIX: dict[str, tuple[str, ...]] = {
    #                    resident guardian trainee village township county specialist coordinator
    "admit":            (NO,      NO,      NO,     OK,     OK,      OK,    OK,        OK),
    "deny":             (NO,      NO,      NO,     OK,     OK,      OK,    OK,        OK),
    "chat":             (OK,      OK,      CLOSED, OK,     OK,      OK,    OK,        NO),
    "raise_hand":       (OK,      OK,      OK,     OK,     OK,      OK,    OK,        OK),
    "lower_hand":       (OK,      OK,      OK,     OK,     OK,      OK,    OK,        OK),
    "mute":             (NO,      NO,      NO,     NO,     NO,      NO,    OK,        NO),
    "remove":           (NO,      NO,      NO,     NO,     NO,      NO,    OK,        NO),
    "consent":          (OK,      OK,      NO,     NO,     NO,      NO,    NO,        NO),
    "annotate":         (NO,      NO,      NO,     OK,     NO,      OK,    OK,        NO),
    "pointer":          (NO,      NO,      NO,     OK,     NO,      OK,    OK,        NO),
    "set_trainee_chat": (NO,      NO,      NO,     OK,     OK,      OK,    OK,        OK),
    "end_session":      (NO,      NO,      NO,     OK,     OK,      OK,    OK,        NO),
    "restart_subscribe":(OK,      OK,      OK,     OK,     OK,      OK,    OK,        NO),
}
# fmt: on

CLINICIANS = {
    R.VILLAGE_DOCTOR: VILLAGE,
    R.TOWNSHIP_DOCTOR: TOWNSHIP,
    R.COUNTY_PHYSICIAN: COUNTY,
    R.PROVINCIAL_SPECIALIST: SPECIALIST,
}
STROKE = {"target_track": "resident-camera", "points": [[0.2, 0.2], [0.3, 0.35]]}


def test_the_matrix_covers_every_client_event_but_join_and_leave() -> None:
    assert set(MATRIX) == set(PERMISSION)
    assert all(len(row) == len(ROLES) for row in MATRIX.values())


@dataclass
class Room:
    """The room one role is tried in: `peer` has the role; `spare` is another participant (the
    target of mute and remove, and a witness of what reaches the room); `admitter` let them in.
    Trainees are tried in a teaching session, everyone else in a consultation."""

    server: SignalingServer
    cid: str
    role: Role
    peer: Peer
    spare: Peer
    admitter: Peer
    resident_token: str
    waiting_targets: int = 0

    async def waiting_target(self) -> tuple[Peer, str]:
        """Someone new in the waiting room, to be admitted or denied."""
        self.waiting_targets += 1
        n = self.waiting_targets
        if self.role is R.TRAINEE:
            token, _ = await self.server.invite(self.cid, R.TRAINEE, f"学员{n}")
        else:
            token = self.resident_token
        return await self.server.waiting(token, self.cid, device=f"device-{n}", label=f"wait {n}")


async def room_for(server: SignalingServer, role: Role) -> Room:
    if role is R.TRAINEE:
        cid = (await server.scheduled(kind=ConsultationKind.TEACHING)).id
        presenter = await server.seated(SPECIALIST, cid, label="presenter")
        token, _ = await server.invite(cid, R.TRAINEE, "学员")
        peer = await server.admitted(token, cid, presenter, label="trainee")
        spare_token, _ = await server.invite(cid, R.TRAINEE, "旁听学员")
        spare = await server.admitted(spare_token, cid, presenter, label="spare trainee")
        return Room(server, cid, role, peer, spare, presenter, "")
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    resident_token, _ = await server.invite(cid, R.RESIDENT)
    if role is R.VILLAGE_DOCTOR:
        peer = village
    elif role in CLINICIANS:
        peer = await server.seated(CLINICIANS[role], cid, label=role.value)
    elif role is R.COORDINATOR:
        peer = await server.seated(COORDINATOR, cid, label="coordinator")
    elif role is R.RESIDENT:
        peer = await server.admitted(resident_token, cid, village, device="phone", label="resident")
    else:
        guardian_token, _ = await server.invite(cid, R.GUARDIAN, "刘女士")
        peer = await server.admitted(guardian_token, cid, village, label="guardian")
    spare = await server.admitted(resident_token, cid, village, device="spare", label="spare")
    return Room(server, cid, role, peer, spare, village, resident_token)


@dataclass(frozen=True)
class Cell:
    """One cell being tried: the payload, and how to check an allowed call's effect."""

    payload: Any
    effect: Callable[[], Awaitable[None]] | None = None


async def prepare(room: Room, event: str) -> Cell:
    peer, spare = room.peer, room.spare
    if event in ("admit", "deny"):
        target, pid = await room.waiting_target()

        async def admitted_or_denied() -> None:
            if event == "admit":
                assert (await target.wait_for("joined"))["you"]["participant_id"] == pid
            else:
                assert (await target.wait_for("denied"))["participant"] == pid
                await target.wait_disconnected()

        return Cell({"participant": pid}, admitted_or_denied)
    if event == "chat":
        text = f"{room.role.value} 发言"

        async def delivered() -> None:
            await spare.wait_for("chat_message", lambda m: m["text"] == text)

        return Cell({"text": text}, delivered)
    if event in ("raise_hand", "lower_hand", "end_session"):
        kind = {"raise_hand": "hand_raised", "lower_hand": "hand_lowered"}.get(event)

        async def seen() -> None:
            if kind is None:  # (the spare may have been removed by now)
                await peer.wait_for("session_ended")
                await peer.wait_disconnected()
                assert await room.server.status(room.cid) is ConsultationStatus.OPINION_PENDING
            else:
                assert (await spare.wait_for(kind))["participant"] == peer.participant_id

        return Cell(None if event == "raise_hand" else {}, seen)
    if event in ("mute", "remove"):
        target_pid = spare.participant_id
        payload: dict[str, Any] = {"participant": target_pid}
        payload.update({"kind": "video"} if event == "mute" else {"reason": "测试移出"})

        async def moderated() -> None:
            seen = await spare.wait_for("muted" if event == "mute" else "removed")
            assert seen["participant"] == target_pid

        return Cell(payload, moderated)
    if event == "consent":

        async def recorded() -> None:
            assert (await spare.wait_for("consent_recorded"))["kind"] == "consultation"

        return Cell({"kind": "consultation", "granted": True}, recorded)
    if event == "annotate":

        async def drawn() -> None:
            assert (await spare.wait_for("annotation"))["points"] == STROKE["points"]

        return Cell(STROKE, drawn)
    if event == "pointer":

        async def pointed() -> None:
            assert (await spare.wait_for("pointer"))["participant"] == peer.participant_id

        return Cell({"target_track": "resident-camera", "x": 0.5, "y": 0.25}, pointed)
    if event == "set_trainee_chat":

        async def announced() -> None:
            assert (await spare.wait_for("trainee_chat_set"))["open"] is False

        return Cell({"open": False}, announced)
    if event == "restart_subscribe":
        # Nothing published in this room: nothing to restart, and nobody is told.
        return Cell({})
    raise AssertionError(f"no preparation for {event}")


# Moderation that takes the spare away, and the end of the session, come last.
ORDER = [e for e in MATRIX if e not in ("remove", "end_session")] + ["remove", "end_session"]


@pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
async def test_permission_matrix(sig_server: SignalingServer, role: Role) -> None:
    """One column of the matrix: every event, sent by `role` in a room of its own."""
    room = await room_for(sig_server, role)
    column = ROLES.index(role)
    mismatches: list[str] = []
    for event in ORDER:
        expected = MATRIX[event][column]
        cell = await prepare(room, event)
        before = await sig_server.event_kinds(room.cid)
        ack = await room.peer.call(event, cell.payload)
        got = "ok" if ack.get("ok") is True else ack["error"]["code"]
        if got != expected:
            mismatches.append(f"{event}: expected {expected}, got {ack}")
            continue
        if expected == OK:
            if cell.effect is not None:
                await cell.effect()
            continue
        error = ack["error"]
        assert error["event"] == event
        assert room.peer.events("error")[-1] == error
        if expected == NO:
            assert f"may not {PERMISSION[event]}" in error["message"], (event, error)
        # A refused event leaves no trace in the record.
        assert await sig_server.event_kinds(room.cid) == before, event
    assert not mismatches, "\n".join(mismatches)


async def test_trainees_chat_once_the_presenter_opens_chat(sig_server: SignalingServer) -> None:
    """The trainee's CLOSED cell is the session's setting, not the role's: opened, it is OK."""
    room = await room_for(sig_server, R.TRAINEE)
    assert (await room.peer.refused("chat", {"text": "问题"}))["code"] == CLOSED
    await room.admitter.ok("set_trainee_chat", {"open": True})
    await room.peer.wait_for("trainee_chat_set")
    await room.peer.ok("chat", {"text": "问题"})
    assert (await room.spare.wait_for("chat_message"))["role"] == "trainee"


# --- scope: nobody acts on another consultation ---------------------------------------------


async def test_a_scoped_token_cannot_join_another_consultation(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    a = (await server.scheduled()).id
    b = (await server.scheduled()).id
    await server.seated(VILLAGE, b, label="village b")  # b is live: only scope can refuse
    resident_a, _ = await server.invite(a, R.RESIDENT)

    # Connecting with the consultation named in the auth payload: refused at once.
    refused = server.peer("resident a -> b")
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect({"token": resident_a, "consultation_id": b})
    assert refused.connect_errors == [{"message": "token is scoped to another consultation"}]

    # Without it (or naming its own consultation), the join is what is refused.
    for auth in ({}, {"consultation_id": a}):
        peer = await server.connect(resident_a, label="resident a", auth=auth)
        error = await peer.refused("join", {"consultation_id": b})
        assert error == {
            "code": "forbidden",
            "message": "this token is scoped to another consultation",
            "event": "join",
        }
    # A clinician's token scoped to one consultation is bound the same way.
    scoped = server.token(COUNTY, consultation=a)
    peer = await server.connect(scoped, label="county scoped to a")
    assert (await peer.refused("join", {"consultation_id": b}))["message"] == (
        "this token is scoped to another consultation"
    )
    room_b = await server.presence(b)
    assert room_b is not None and len(room_b.participants) == 1


@pytest.mark.parametrize(
    ("who", "message"),
    [
        (OUTSIDER, "not on this consultation's team"),
        (
            DemoIdentity(TOWNSHIP.user_id, TOWNSHIP.name, R.COUNTY_PHYSICIAN, TOWNSHIP.org),
            "on this team as township_doctor, not as county_physician",
        ),
        (
            DemoIdentity(UserId("other-coordinator"), "钱协调员", R.COORDINATOR, "杏花村卫生室"),
            "not on this consultation's team",
        ),
        (DemoIdentity(UserId("demo-admin"), "管理员", R.ADMIN, "安县医共体"), "may not join"),
        (
            DemoIdentity(UserId("res-self-made"), "自称患者", R.RESIDENT, "莲花村卫生室"),
            "a resident acts only through an invite to their consultation",
        ),
    ],
    ids=["outsider", "wrong-role", "other-institution-coordinator", "admin", "uninvited-resident"],
)
async def test_who_is_not_on_the_team_cannot_join(
    sig_server: SignalingServer, who: DemoIdentity, message: str
) -> None:
    server = sig_server
    cid = (await server.scheduled()).id
    await server.seated(VILLAGE, cid, label="village")
    peer = await server.connect(who, label="intruder")
    error = await peer.refused("join", {"consultation_id": cid})
    assert error["code"] == "forbidden"
    assert message in error["message"]
    assert await server.event_kinds(cid) == ["session_started", "joined"]


async def test_a_trainee_invite_does_not_open_a_consultation(sig_server: SignalingServer) -> None:
    """Trainees are for teaching sessions; a trainee token naming a consultation is refused."""
    server = sig_server
    cid = (await server.scheduled()).id
    await server.seated(VILLAGE, cid, label="village")
    token, _ = server.tokens.mint_invite(
        user_id=UserId("t_stray"),
        name="学员",
        role=R.TRAINEE,
        org=VILLAGE.org,
        consultation=cid,
        jti="stray-trainee-invite",
    )
    peer = await server.connect(token, label="trainee")
    assert (await peer.refused("join", {"consultation_id": cid}))["code"] == "forbidden"


async def test_events_apply_only_to_the_joined_room(sig_server: SignalingServer) -> None:
    server = sig_server
    a = (await server.scheduled()).id
    b = (await server.scheduled()).id
    specialist_a = await server.seated(SPECIALIST, a, label="specialist a")
    county_b = await server.seated(COUNTY, b, label="county b")
    resident_b, _ = await server.invite(b, R.RESIDENT)
    waiting_b, waiting_pid = await server.waiting(resident_b, b, label="resident b")
    await county_b.wait_for("waiting")

    # A connection is in one room; events carry no consultation of their own.
    assert (await specialist_a.refused("join", {"consultation_id": b}))["code"] == "already_joined"
    extra = await specialist_a.refused("chat", {"text": "到 b", "consultation_id": b})
    assert extra["code"] == "invalid_payload"
    assert "consultation_id" in extra["message"]
    # Participants of another room are not found from this one.
    for event, payload in [
        ("admit", {"participant": waiting_pid}),
        ("deny", {"participant": waiting_pid}),
        ("mute", {"participant": county_b.participant_id, "kind": "audio"}),
        ("remove", {"participant": county_b.participant_id, "reason": "越权"}),
    ]:
        assert (await specialist_a.refused(event, payload))["code"] == "no_such_participant"

    await specialist_a.ok("chat", {"text": "只在 a"})
    await specialist_a.wait_for("chat_message")
    assert waiting_b.connected and county_b.connected
    assert "joined" not in waiting_b.names()
    assert {r.event for r in county_b.received} == {"joined", "waiting"}
    assert await server.event_kinds(b) == ["session_started", "joined", "waiting"]


async def test_a_coordinator_runs_the_waiting_room_without_clinical_content(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    await village.ok("chat", {"text": "血氧 92%"})
    coordinator = await server.seated(COORDINATOR, cid, label="coordinator")
    assert coordinator.snapshot["chat"] == []  # the history is clinical content
    assert [p["role"] for p in coordinator.snapshot["participants"]] == [
        "village_doctor",
        "coordinator",
    ]

    token, _ = await server.invite(cid, R.RESIDENT)
    resident, pid = await server.waiting(token, cid, label="resident")
    assert (await coordinator.wait_for("waiting"))["participant"]["participant_id"] == pid
    await coordinator.ok("admit", {"participant": pid})
    assert (await resident.wait_for("joined"))["you"]["participant_id"] == pid
    assert (await coordinator.wait_for("admitted"))["participant"] == pid

    await resident.ok("consent", {"kind": "consultation", "granted": True})
    await resident.ok("raise_hand")
    await village.ok("chat", {"text": "开始问诊"})
    await village.ok("annotate", STROKE)
    await village.ok("pointer", {"target_track": "resident-camera", "x": 0.5, "y": 0.5})
    await resident.wait_for("pointer")  # the last of them has reached the room
    clinical = {"chat_message", "consent_recorded", "hand_raised", "annotation", "pointer"}
    assert not clinical & set(coordinator.names()), coordinator.names()
    assert set(coordinator.names()) == {"joined", "waiting", "admitted"}


async def test_a_coordinator_is_told_when_the_session_ends(sig_server: SignalingServer) -> None:
    server = sig_server
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    coordinator = await server.seated(COORDINATOR, cid, label="coordinator")
    await village.ok("end_session")
    await coordinator.wait_disconnected()
    assert coordinator.events("session_ended") == [
        {"session_id": village.snapshot["session_id"], "reason": "ended"}
    ]


async def test_consent_is_always_about_the_consultations_resident(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    consultation = await server.scheduled(age=9)  # a minor: the guardian consents
    cid, pseudonym = consultation.id, consultation.resident.pseudonym
    village = await server.seated(VILLAGE, cid, label="village")
    guardian_token, guardian = await server.invite(cid, R.GUARDIAN, "刘妈妈")
    mother = await server.admitted(guardian_token, cid, village, label="guardian")
    resident_token, _ = await server.invite(cid, R.RESIDENT)
    child = await server.admitted(resident_token, cid, village, label="resident")

    await mother.ok("consent", {"kind": "teaching", "granted": False, "on_behalf_of": pseudonym})
    recorded = await village.wait_for("consent_recorded")
    assert (recorded["given_by"], recorded["on_behalf_of"]) == (guardian.user_id, pseudonym)
    assert recorded["participant"] == mother.participant_id
    for peer in (mother, child):
        error = await peer.refused(
            "consent", {"kind": "recording", "granted": True, "on_behalf_of": "someone-else"}
        )
        assert error["code"] == "invalid_consent"
    record = await server.record(cid)
    assert [(c.kind.value, c.granted, c.given_by, c.on_behalf_of) for c in record.consents] == [
        ("teaching", False, guardian.user_id, pseudonym)
    ]
