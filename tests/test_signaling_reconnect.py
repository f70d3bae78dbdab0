"""Connections coming and going: refusals at connect (with the reason the client sees), a token
expiring while connected, the reconnect grace period, the seat lost after it, a reloaded page
taking its seat over, and the session the server ends when no clinician is left.

Proving that something did *not* happen after a timer needs no fixed sleep: a second, later
timer of the same length (another participant or room) is the witness — timers fire in the
order they were started, so once the witness's effect is seen, the first timer has run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import socketio
from pydantic import SecretStr
from signaling_fixtures import (
    COUNTY,
    NS,
    SPECIALIST,
    VILLAGE,
    DemoIdentity,
    ServerFactory,
    SignalingServer,
)

from rooms.consultations import RequestContext
from rooms.model import CloseReason, ConsultationId, ConsultationStatus, EventKind
from rooms.roles import Role
from server.auth import TokenService
from server.config import JwtConfig

pytest_plugins = ["signaling_fixtures"]

AuthMaker = Callable[[SignalingServer, str, str], Awaitable[Any]]


def shifted(server: SignalingServer, by: timedelta, **jwt: Any) -> TokenService:
    """A token service whose clock (for minting) is off by `by`, or whose JWT settings differ."""
    config = server.config.jwt.model_copy(update=jwt) if jwt else server.config.jwt
    return TokenService(config, now=lambda: datetime.now(UTC) + by)


async def no_auth(server: SignalingServer, a: str, b: str) -> Any:
    return None


async def empty_token(server: SignalingServer, a: str, b: str) -> Any:
    return {"token": ""}


async def token_not_a_string(server: SignalingServer, a: str, b: str) -> Any:
    return {"token": 12345}


async def auth_not_an_object(server: SignalingServer, a: str, b: str) -> Any:
    return server.token(VILLAGE)  # the token itself instead of {"token": ...}


async def malformed(server: SignalingServer, a: str, b: str) -> Any:
    return {"token": "not-a-jwt"}


async def forged(server: SignalingServer, a: str, b: str) -> Any:
    other = TokenService(JwtConfig(secret=SecretStr("another-secret-" + "x" * 32)))
    token = other.mint(user_id=VILLAGE.user_id, name=VILLAGE.name, role=VILLAGE.role, org="")
    return {"token": token}


async def wrong_audience(server: SignalingServer, a: str, b: str) -> Any:
    service = shifted(server, timedelta(0), audience="someone-else")
    return {"token": service.mint(user_id=VILLAGE.user_id, name="x", role=VILLAGE.role, org="")}


async def expired(server: SignalingServer, a: str, b: str) -> Any:
    service = shifted(server, -timedelta(hours=2))
    token = service.mint(
        user_id=VILLAGE.user_id, name=VILLAGE.name, role=VILLAGE.role, org="", ttl_s=3600
    )
    return {"token": token}


async def not_yet_valid(server: SignalingServer, a: str, b: str) -> Any:
    service = shifted(server, timedelta(hours=1))
    return {"token": service.mint(user_id=VILLAGE.user_id, name="x", role=VILLAGE.role, org="")}


async def revoked_invite(server: SignalingServer, a: str, b: str) -> Any:
    token, invite = await server.invite(a, Role.RESIDENT)
    await server.service.revoke_invite(
        RequestContext(VILLAGE.actor()), ConsultationId(a), invite.jti, timedelta(hours=3)
    )
    return {"token": token, "consultation_id": a}


async def scoped_to_another(server: SignalingServer, a: str, b: str) -> Any:
    token, _ = await server.invite(a, Role.RESIDENT)
    return {"token": token, "consultation_id": b}


REFUSALS: list[tuple[AuthMaker, str]] = [
    (no_auth, "missing token in the auth payload"),
    (empty_token, "missing token in the auth payload"),
    (token_not_a_string, "missing token in the auth payload"),
    (auth_not_an_object, "missing token in the auth payload"),
    (malformed, "token is malformed"),
    (forged, "token signature is invalid"),
    (wrong_audience, "token audience is wrong"),
    (expired, "token expired"),
    (not_yet_valid, "token not yet valid"),
    (revoked_invite, "invite has been revoked"),
    (scoped_to_another, "token is scoped to another consultation"),
]


@pytest.mark.parametrize(("make_auth", "reason"), REFUSALS, ids=[f.__name__ for f, _ in REFUSALS])
async def test_refused_connections_tell_the_client_why(
    sig_server: SignalingServer, make_auth: AuthMaker, reason: str
) -> None:
    server = sig_server
    a = (await server.scheduled()).id
    b = (await server.scheduled()).id
    peer = server.peer("refused")
    with pytest.raises(socketio.exceptions.ConnectionError) as refused:
        await peer.connect(await make_auth(server, a, b))
    # The exception only names the namespace; the reason arrives as `connect_error` data.
    assert str(refused.value) == f"One or more namespaces failed to connect: {NS}"
    assert peer.connect_errors == [{"message": reason}]
    assert not peer.connected
    assert server.namespace.connection_count == 0


async def test_a_token_that_expires_while_connected_is_refused_then_disconnected(
    sig_server: SignalingServer,
) -> None:
    """Expired a few seconds ago: still inside the verification leeway at connect, but each
    event checks the expiry itself (docs/protocol.md: refused with token_expired, then the
    server disconnects)."""
    server = sig_server
    cid = (await server.scheduled()).id
    service = shifted(server, -timedelta(seconds=3610))
    token = service.mint(
        user_id=VILLAGE.user_id, name=VILLAGE.name, role=VILLAGE.role, org=VILLAGE.org, ttl_s=3600
    )
    peer = await server.connect(token, label="stale")
    assert peer.connected
    error = await peer.refused("join", {"consultation_id": cid}, within=1.0)
    assert error["code"] == "token_expired"
    assert "reconnect" in error["message"]
    await peer.wait_disconnected()
    assert await server.status(cid) is ConsultationStatus.SCHEDULED


@pytest.mark.parametrize("how", ["drop", "disconnect"])
async def test_coming_back_within_the_grace_period_keeps_the_seat(
    start_sig_server: ServerFactory, how: str
) -> None:
    server = await start_sig_server(reconnect_grace_s=1.0)
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, device="phone", label="resident")
    witness = await server.seated(COUNTY, cid, label="county")
    pid = resident.participant_id
    await village.wait_for("participant_joined", lambda p: p["participant_id"] == pid)

    await resident.ok("raise_hand")
    if how == "drop":
        await resident.drop()
    else:
        await resident.close()  # a clean socket.io goodbye, but no `leave`
    # While the seat is held, it is still in the room, shown as not connected.
    latecomer = await server.seated(SPECIALIST, cid, label="specialist")
    held = next(p for p in latecomer.snapshot["participants"] if p["participant_id"] == pid)
    assert (held["connected"], held["hand_raised"]) == (False, True)
    await witness.drop()  # its grace period ends after the resident's would
    back = await server.connect(token, label="resident back")
    await back.join(cid, "phone")
    snapshot = await back.wait_for("joined")
    assert snapshot["you"]["participant_id"] == pid
    assert snapshot["you"]["state"] == "admitted"
    assert (snapshot["you"]["connected"], snapshot["you"]["hand_raised"]) == (True, True)
    assert "waiting" not in back.names()

    lost = await village.wait_for("participant_left")
    assert lost == {"participant": witness.participant_id, "reason": "network_lost"}
    # By now the resident's grace period is over too: still seated, nobody was told anything.
    assert [p["participant"] for p in village.events("participant_left")] == [
        witness.participant_id
    ]
    assert [p["participant_id"] for p in village.events("participant_joined")] == [
        pid,
        witness.participant_id,
        latecomer.participant_id,
    ]
    assert len(village.events("waiting")) == 1  # the resident's first arrival only
    await back.ok("chat", {"text": "我回来了"})
    assert (await village.wait_for("chat_message"))["participant"] == pid

    record = await server.record(cid)
    [seat] = [
        p for p in record.participations if p.user_id != VILLAGE.user_id and p.role is Role.RESIDENT
    ]
    assert (seat.participant_id, seat.left_at, seat.close_reason) == (pid, None, None)
    assert [e.participant_id for e in record.events if e.kind is EventKind.LEFT] == [
        witness.participant_id
    ]


async def test_a_waiting_participant_coming_back_keeps_the_place(
    start_sig_server: ServerFactory,
) -> None:
    server = await start_sig_server(reconnect_grace_s=5.0)
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident, pid = await server.waiting(token, cid, device="phone", label="resident")
    await resident.drop()
    back = await server.connect(token, label="resident back")
    await back.join(cid, "phone")
    assert (await back.wait_for("waiting"))["participant"]["participant_id"] == pid
    await village.ok("admit", {"participant": pid})
    assert (await back.wait_for("joined"))["you"]["participant_id"] == pid


async def test_after_the_grace_period_the_seat_is_lost(start_sig_server: ServerFactory) -> None:
    server = await start_sig_server(reconnect_grace_s=0.3)
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    county = await server.seated(COUNTY, cid, label="county")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, device="phone", label="resident")
    pid = resident.participant_id

    await resident.drop()
    for peer in (village, county):
        assert await peer.wait_for("participant_left") == {
            "participant": pid,
            "reason": "network_lost",
        }
    left = await server.wait_for_event(cid, EventKind.LEFT)
    assert (left.participant_id, left.data) == (pid, {"reason": "network_lost"})
    record = await server.record(cid)
    [seat] = [p for p in record.participations if p.participant_id == pid]
    assert seat.close_reason is CloseReason.NETWORK_LOST
    assert seat.left_at is not None and seat.left_at >= seat.joined_at

    # Coming back now is arriving anew: the waiting room and a new participant id.
    back = await server.connect(token, label="resident back")
    await back.join(cid, "phone")
    waiting = await back.wait_for("waiting")
    assert waiting["participant"]["participant_id"] != pid
    assert "joined" not in back.names()


async def test_a_waiting_participant_who_drops_leaves_the_waiting_room(
    start_sig_server: ServerFactory,
) -> None:
    server = await start_sig_server(reconnect_grace_s=0.3)
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident, pid = await server.waiting(token, cid, label="resident")
    await resident.drop()
    assert await village.wait_for("participant_left") == {
        "participant": pid,
        "reason": "network_lost",
    }
    assert (await village.refused("admit", {"participant": pid}))["code"] == "no_such_participant"
    left = await server.wait_for_event(cid, EventKind.LEFT)
    assert left.participant_id == pid
    assert pid not in {p.participant_id for p in (await server.record(cid)).participations}


@pytest.mark.parametrize("how", ["leave", "drop"])
async def test_the_session_ends_when_no_clinician_is_left(
    start_sig_server: ServerFactory, how: str
) -> None:
    server = await start_sig_server(reconnect_grace_s=0.2, empty_room_grace_s=0.3)
    consultation = await server.scheduled()
    cid = consultation.id
    village = await server.seated(VILLAGE, cid, label="village")
    session_id = village.snapshot["session_id"]
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, label="resident")

    if how == "leave":
        await village.ok("leave")
    else:
        await village.drop()
    reason = "left" if how == "leave" else "network_lost"
    assert await resident.wait_for("participant_left") == {
        "participant": village.participant_id,
        "reason": reason,
    }
    assert await resident.wait_for("session_ended") == {
        "session_id": session_id,
        "reason": "no clinician left",
    }
    await resident.wait_disconnected()
    assert await server.status(cid) is ConsultationStatus.OPINION_PENDING

    record = await server.record(cid)
    assert [e.kind.value for e in record.events][-2:] == ["left", "session_ended"]
    ended = record.events[-1]
    assert (ended.actor, ended.data) == (None, {"reason": "no clinician left"})
    closes = {p.role: p.close_reason for p in record.participations}
    assert closes == {
        Role.VILLAGE_DOCTOR: CloseReason(reason),
        Role.RESIDENT: CloseReason.SESSION_ENDED,
    }
    [session] = record.sessions
    assert session.ended_at is not None


@pytest.mark.parametrize("who", [VILLAGE, COUNTY], ids=["same-clinician", "another-clinician"])
async def test_a_clinician_coming_back_in_time_keeps_the_session(
    start_sig_server: ServerFactory, who: DemoIdentity
) -> None:
    server = await start_sig_server(empty_room_grace_s=1.0)
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, label="resident")
    # The witness: another room whose last clinician leaves just after.
    other = (await server.scheduled()).id
    other_county = await server.seated(COUNTY, other, label="other county")
    other_token, _ = await server.invite(other, Role.RESIDENT)
    other_resident = await server.admitted(other_token, other, other_county, label="other res")

    await village.ok("leave")
    await other_county.ok("leave")
    returning = await server.seated(who, cid, label="returning")
    await resident.wait_for("participant_joined")

    await other_resident.wait_for("session_ended")  # the witness's timer has run...
    assert await server.status(other) is ConsultationStatus.OPINION_PENDING
    # ...so this room's ran before it, and found a clinician.
    assert "session_ended" not in resident.names()
    assert await server.status(cid) is ConsultationStatus.LIVE
    await returning.ok("chat", {"text": "继续"})
    assert (await resident.wait_for("chat_message"))["text"] == "继续"


@pytest.mark.parametrize("role", [Role.VILLAGE_DOCTOR, Role.RESIDENT], ids=["doctor", "resident"])
async def test_the_same_device_connecting_again_takes_its_seat_over(
    sig_server: SignalingServer, role: Role
) -> None:
    """A reloaded page: the old connection is still up when the new one joins."""
    server = sig_server
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    county = await server.seated(COUNTY, cid, label="county")
    if role is Role.RESIDENT:
        token, _ = await server.invite(cid, Role.RESIDENT)
        old = await server.admitted(token, cid, village, device="phone", label="old")
    else:
        token, old = server.token(VILLAGE), village
    pid = old.participant_id
    if role is Role.RESIDENT:
        await county.wait_for("participant_joined", lambda p: p["participant_id"] == pid)
    seen_before = list(county.received)

    reloaded = await server.connect(token, label="reloaded")
    await reloaded.join(cid, old.snapshot["you"]["device"])
    snapshot = await reloaded.wait_for("joined")
    assert snapshot["you"]["participant_id"] == pid
    assert "waiting" not in reloaded.names()
    await old.wait_disconnected()

    # Nothing was announced; the seat works from the new connection.
    await reloaded.ok("chat", {"text": "刷新了页面"})
    assert (await county.wait_for("chat_message"))["participant"] == pid
    assert county.received[: len(seen_before)] == seen_before
    assert [r.event for r in county.received[len(seen_before) :]] == ["chat_message"]
    room = await server.presence(cid)
    assert room is not None
    assert [p.participant_id for p in room.participants.values() if p.role is role] == [pid]
    assert not any(e.kind is EventKind.LEFT for e in await server.events(cid))


async def test_the_newest_departure_starts_the_empty_room_grace(
    start_sig_server: ServerFactory,
) -> None:
    """Leave, come back, leave again: the grace counts from the second departure, so the
    session ends no sooner than the grace after it (an earlier watch must not end it early).
    Timers never fire early, so this holds by the record's own timestamps."""
    grace = 0.5
    server = await start_sig_server(empty_room_grace_s=grace)
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, label="resident")

    await village.ok("leave")
    await village.join(cid)
    await resident.wait_for("participant_joined")
    await village.ok("leave")
    ended = await resident.wait_for("session_ended")
    assert ended["reason"] == "no clinician left"

    events = await server.events(cid)
    first, second = [e for e in events if e.kind is EventKind.LEFT]
    end = events[-1]
    assert end.kind is EventKind.SESSION_ENDED
    assert second.at > first.at
    assert end.at - second.at >= timedelta(seconds=grace - 0.005)


async def test_a_seat_held_for_a_reconnect_closes_with_the_session(
    sig_server: SignalingServer,
) -> None:
    server = sig_server  # the default 30 s grace: the seat is still held at the end
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, label="resident")
    await resident.drop()
    await village.ok("end_session")
    await village.wait_disconnected()
    record = await server.record(cid)
    seat = next(p for p in record.participations if p.participant_id == resident.participant_id)
    assert seat.close_reason is CloseReason.SESSION_ENDED
    assert await server.presence(cid) is None
    # Coming back finds the consultation over.
    back = await server.connect(token, label="resident back")
    assert (await back.refused("join", {"consultation_id": cid}))["code"] == "not_joinable"
