"""Revoking an invite over the REST API ends the sockets that presented it: the holder is told
(`token_revoked`) and disconnected, the seat closes with reason `revoked` (the room is told, the
record says so), the token no longer connects, and everyone else carries on. On one node and
across two nodes that share Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import socketio
from signaling_fixtures import (
    SPECIALIST,
    VILLAGE,
    Peer,
    SignalingServer,
    eventually,
    start_signaling_server,
)

from rooms.model import CloseReason, ConsultationId, EventKind
from rooms.roles import Role
from server.config import load_config
from signaling.connection import Identity

pytest_plugins = ["signaling_fixtures", "redis_fixtures"]


async def revoke(server: SignalingServer, cid: str, jti: str) -> None:
    """DELETE the invite as the inviting village doctor; must answer 204."""
    async with (
        aiohttp.ClientSession() as session,
        session.delete(
            f"{server.url}/api/v1/consultations/{cid}/invites/{jti}",
            headers={"Authorization": f"Bearer {server.token(VILLAGE)}"},
        ) as resp,
    ):
        assert resp.status == 204, await resp.text()


async def assert_ended_by_revocation(peer: Peer) -> None:
    notice = await peer.wait_for("token_revoked")
    assert notice == {"message": "your token has been revoked"}
    await peer.wait_disconnected()


async def assert_refused_at_connect(server: SignalingServer, token: str) -> None:
    again = server.peer("revoked again")
    with pytest.raises(socketio.exceptions.ConnectionError):
        await again.connect({"token": token})
    assert again.connect_errors == [{"message": "invite has been revoked"}]


async def test_an_admitted_invite_revoked_leaves_the_room(sig_server: SignalingServer) -> None:
    cid = (await sig_server.scheduled()).id
    village = await sig_server.seated(VILLAGE, cid, label="village")
    token, invite = await sig_server.invite(cid, Role.RESIDENT)
    resident = await sig_server.admitted(token, cid, village, label="resident")
    seat = resident.participant_id
    # A second invite of the same resident, on another device.
    other_token, _ = await sig_server.invite(cid, Role.RESIDENT)
    bystander = await sig_server.admitted(
        other_token, cid, village, device="tablet", label="other invite"
    )

    await revoke(sig_server, cid, invite.jti)

    await assert_ended_by_revocation(resident)
    for peer in (village, bystander):
        left = await peer.wait_for("participant_left", lambda m: m["participant"] == seat)
        assert left == {"participant": seat, "reason": "revoked"}
    event = await sig_server.wait_for_event(cid, EventKind.LEFT, lambda e: e.participant_id == seat)
    assert event.data["reason"] == "revoked"
    record = await sig_server.record(cid)
    [participation] = [p for p in record.participations if p.participant_id == seat]
    assert participation.close_reason is CloseReason.REVOKED
    room = await sig_server.presence(cid)
    assert room is not None and seat not in room.participants
    await assert_refused_at_connect(sig_server, token)
    # The other invite and the room are untouched.
    assert bystander.connected
    await village.ok("chat", {"text": "撤销之后"})
    await bystander.wait_for("chat_message", lambda m: m["text"] == "撤销之后")


async def test_a_waiting_invite_revoked_leaves_the_waiting_room(
    sig_server: SignalingServer,
) -> None:
    cid = (await sig_server.scheduled()).id
    village = await sig_server.seated(VILLAGE, cid, label="village")
    token, invite = await sig_server.invite(cid, Role.RESIDENT)
    resident, seat = await sig_server.waiting(token, cid, label="resident")

    await revoke(sig_server, cid, invite.jti)

    await assert_ended_by_revocation(resident)
    left = await village.wait_for("participant_left", lambda m: m["participant"] == seat)
    assert left["reason"] == "revoked"
    room = await sig_server.presence(cid)
    assert room is not None and seat not in room.participants
    # Admitting the seat that is gone is refused, not served.
    error = await village.refused("admit", {"participant": seat})
    assert error["code"] == "no_such_participant"


async def test_every_connection_of_the_token_ends_and_no_other(
    sig_server: SignalingServer,
) -> None:
    cid = (await sig_server.scheduled()).id
    token, invite = await sig_server.invite(cid, Role.RESIDENT)
    phone = await sig_server.connect(token, label="phone, not joined")
    tablet = await sig_server.connect(token, label="tablet, not joined")
    other_token, _ = await sig_server.invite(cid, Role.RESIDENT)
    other = await sig_server.connect(other_token, label="other invite")
    staff = await sig_server.connect(SPECIALIST, label="staff")

    await revoke(sig_server, cid, invite.jti)

    await assert_ended_by_revocation(phone)
    await assert_ended_by_revocation(tablet)
    await eventually(lambda: sig_server.namespace.connection_count == 2, "two connections left")
    for peer in (other, staff):
        assert peer.connected
        assert not peer.events("token_revoked")
    await assert_refused_at_connect(sig_server, token)


# --- two nodes -------------------------------------------------------------------------------


@pytest.fixture
async def two_nodes(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[SignalingServer, SignalingServer]]:
    config = load_config(
        env={}, overrides={"dev": True, "data_dir": str(tmp_path), "redis_url": redis_url}
    )
    a = await start_signaling_server(config)
    try:
        b = await start_signaling_server(config)
    except BaseException:
        await a.close()
        raise
    yield a, b
    await b.close()
    await a.close()


async def test_a_revocation_on_one_node_ends_the_socket_on_the_other(
    two_nodes: tuple[SignalingServer, SignalingServer],
) -> None:
    a, b = two_nodes
    cid = (await a.scheduled()).id
    village = await a.seated(VILLAGE, cid, label="village on A")
    token, invite = await a.invite(cid, Role.RESIDENT)
    resident = await b.admitted(token, cid, village, label="resident on B")
    seat = resident.participant_id
    specialist = await b.seated(SPECIALIST, cid, label="specialist on B")

    await revoke(a, cid, invite.jti)

    await assert_ended_by_revocation(resident)
    for peer in (village, specialist):
        left = await peer.wait_for("participant_left", lambda m: m["participant"] == seat)
        assert left == {"participant": seat, "reason": "revoked"}
    event = await a.wait_for_event(cid, EventKind.LEFT, lambda e: e.participant_id == seat)
    assert event.data["reason"] == "revoked"
    await assert_refused_at_connect(b, token)
    assert a.namespace.connection_count == 1
    await eventually(lambda: b.namespace.connection_count == 1, "only the specialist on B")
    await specialist.ok("chat", {"text": "两个节点"})
    await village.wait_for("chat_message", lambda m: m["text"] == "两个节点")


async def test_a_token_revoked_while_its_connect_is_verified_does_not_connect(
    sig_server: SignalingServer,
) -> None:
    cid = (await sig_server.scheduled()).id
    token, invite = await sig_server.invite(cid, Role.RESIDENT)
    namespace = sig_server.namespace
    verify = namespace._authenticate
    verified, resume = asyncio.Event(), asyncio.Event()

    async def verify_then_pause(token: str, consultation: ConsultationId | None) -> Identity:
        # The token is found valid, then the revocation lands before the connect completes.
        identity = await verify(token, consultation)
        verified.set()
        await resume.wait()
        return identity

    namespace._authenticate = verify_then_pause
    peer = sig_server.peer("connecting")
    connecting = asyncio.ensure_future(peer.connect({"token": token}))
    await asyncio.wait_for(verified.wait(), 5.0)
    await revoke(sig_server, cid, invite.jti)
    resume.set()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connecting
    assert peer.connect_errors == [{"message": "invite has been revoked"}]
    assert namespace.connection_count == 0
