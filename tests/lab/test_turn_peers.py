"""coturn and telemed's TURN credentials, in the network lab: coturn takes what server/turn.py
mints until it expires, and an allocation made in time outlives it; and calls through TURN
with aiortc peers that may use nothing else (ICE transport policy
"relay": they offer only candidates on the TURN server, so every packet between them and the
relay passes coturn). coturn runs in the lab's server namespace; telemed runs in this process,
the lab's "host" endpoint, and offers its host address there, which coturn reaches across the
lab's hub — the deployment's rule: the relay's own UDP must be reachable from the TURN server.
The peers reach coturn over TCP on 3478, or over TLS on 443 with a certificate made by the test.
Each peer takes the ICE servers `joined` handed it: credentials minted for its seat."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aioice import stun
from aioice.turn import TurnTransport, create_turn_endpoint
from aiortc import RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection
from coturn import Coturn, Transport
from media_client import MediaClient, MediaRoom
from media_peers import ColourCounterTrack, ToneTrack, close_to, dominant_frequency, mean_colour
from netlab import Lab
from signaling_fixtures import COUNTY, VILLAGE, DemoIdentity, eventually

from server.config import TurnConfig
from server.turn import TurnCredentials

pytestmark = pytest.mark.lab

WAIT_S = 60.0
CLINIC = "village"
VILLAGE_COLOUR, COUNTY_COLOUR = (200, 40, 40), (40, 40, 200)
VILLAGE_TONE, COUNTY_TONE = 440.0, 660.0


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with Lab([CLINIC]) as lab:
        yield lab


@pytest.fixture
async def turn(lab: Lab, tmp_path: Path) -> AsyncIterator[Coturn]:
    # The relay runs in this process: the lab's "host" endpoint.
    relay = lab.address("host")
    async with Coturn(tmp_path, lab.address("srv"), lab.exec_prefix("srv"), relay=relay) as turn:
        yield turn


def minted(turn: Coturn, user: str, *, expires_in_s: float, secret: str = "") -> dict[str, Any]:
    """Credentials from server/turn.py for `user` that expire `expires_in_s` from now."""
    ttl_s = 3600
    config = TurnConfig(secret=secret or turn.secret, urls=[turn.url("tcp")], ttl_s=ttl_s)
    return TurnCredentials(config, clock=lambda: time.time() + expires_in_s - ttl_s).mint(user)


async def allocate(turn: Coturn, credentials: dict[str, Any]) -> TurnTransport:
    """A TURN allocation over TCP (raises stun.TransactionFailed when coturn refuses)."""
    transport, _ = await create_turn_endpoint(
        asyncio.DatagramProtocol,
        (turn.address, 3478),
        credentials["username"],
        credentials["credential"],
        transport="tcp",
    )
    return transport


async def permit(allocation: TurnTransport, peer: str) -> None:
    """Asks coturn to let `peer` send to the allocation (raises stun.TransactionFailed)."""
    request = stun.Message(
        message_method=stun.Method.CREATE_PERMISSION, message_class=stun.Class.REQUEST
    )
    request.attributes["XOR-PEER-ADDRESS"] = (peer, 9)
    protocol = allocation._TurnTransport__inner_protocol  # type: ignore[attr-defined]
    await protocol.request_with_retry(request)


async def refresh(allocation: TurnTransport) -> int:
    """Refreshes the allocation now (aioice would in minutes); returns the granted lifetime."""
    request = stun.Message(message_method=stun.Method.REFRESH, message_class=stun.Class.REQUEST)
    request.attributes["LIFETIME"] = 600
    protocol = allocation._TurnTransport__inner_protocol  # type: ignore[attr-defined]
    response, _ = await protocol.request_with_retry(request)
    lifetime: int = response.attributes["LIFETIME"]
    return lifetime


def refused_as_unauthorized(error: BaseException) -> bool:
    return (
        isinstance(error, stun.TransactionFailed)
        and error.response.attributes["ERROR-CODE"][0] == 401
    )


async def test_coturn_takes_minted_credentials_until_they_expire(lab: Lab, turn: Coturn) -> None:
    fresh = await allocate(turn, minted(turn, "p_fresh", expires_in_s=600))
    try:
        # It relays to the relay's address, and to no other private one (a clinic's).
        await permit(fresh, turn.relay)
        with pytest.raises(stun.TransactionFailed) as denied:
            await permit(fresh, lab.address(CLINIC))
        assert denied.value.response.attributes["ERROR-CODE"][0] == 403, denied.value
    finally:
        fresh.close()

    with pytest.raises(stun.TransactionFailed) as expired:
        await allocate(turn, minted(turn, "p_expired", expires_in_s=-30))
    assert refused_as_unauthorized(expired.value), expired.value
    with pytest.raises(stun.TransactionFailed) as forged:
        await allocate(
            turn, minted(turn, "p_forged", expires_in_s=600, secret="not-the-shared-secret")
        )
    assert refused_as_unauthorized(forged.value), forged.value
    log = turn.log_text()
    assert "p_fresh>: incoming packet ALLOCATE processed, success" in log
    assert "p_expired>: incoming packet ALLOCATE processed, success" not in log


async def test_an_allocation_made_in_time_outlives_its_credentials(turn: Coturn) -> None:
    """coturn checks the expiry when the allocation is made, not when it is refreshed: a call
    does not drop when its credentials expire (README, [turn] ttl_s)."""
    credentials = minted(turn, "p_short", expires_in_s=3)
    expiry = int(credentials["username"].split(":")[0])
    allocation = await allocate(turn, credentials)
    try:
        # Well past it: the expiry is in whole seconds, and a busy coturn looks late.
        await eventually(lambda: time.time() > expiry + 3, "the credentials expired", within=15)
        assert await refresh(allocation) == 600
    finally:
        allocation.close()
    with pytest.raises(stun.TransactionFailed):
        await allocate(turn, credentials)  # but no new allocation with them


def only(transport: Transport, ice_servers: list[dict[str, Any]], turn: Coturn) -> RTCIceServer:
    """The TURN server of `joined.ice_servers`, narrowed to one of its URLs (aiortc uses the
    first TURN URL it is given; a browser would try them all)."""
    (server,) = ice_servers
    assert turn.url(transport) in server["urls"], server
    return RTCIceServer(
        urls=[turn.url(transport)], username=server["username"], credential=server["credential"]
    )


async def turn_client(
    room: MediaRoom, who: DemoIdentity, cid: str, transport: Transport, turn: Coturn
) -> tuple[MediaClient, dict[str, Any]]:
    """Seated, then given TURN-only peer connections configured from its own `joined`."""
    peer = await room.server.connect(who, label=who.role.value)
    await peer.join(cid)
    joined = await peer.wait_for("joined")
    ice = only(transport, joined["ice_servers"], turn)
    client = MediaClient(peer, ice_servers=[ice], policy=RTCIceTransportPolicy.RELAY)
    room.clients.append(client)
    return client, joined


def selected_local_candidate(pc: RTCPeerConnection) -> Any:
    """The local candidate of the nominated pair (aioice's; aiortc exposes no stats of it)."""
    ice = pc.getTransceivers()[0].sender.transport.transport
    nominated = ice._connection._nominated  # one component: RTP and RTCP are muxed
    assert nominated, "no nominated candidate pair"
    return next(iter(nominated.values())).local_candidate


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_a_turn_only_call_carries_both_ways(
    lab: Lab,
    turn: Coturn,
    tmp_path: Path,
    transport: Transport,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aiortc opens turns: with Python's default TLS context: it trusts what SSL_CERT_FILE names.
    monkeypatch.setenv("SSL_CERT_FILE", str(turn.cert))
    room = await MediaRoom.start(
        tmp_path / "server",
        **{
            "media.host_addresses": [lab.address("host")],
            "turn.secret": turn.secret,
            "turn.urls": [turn.url("udp"), turn.url("tcp"), turn.url("tls")],
        },
    )
    try:
        cid = (await room.server.scheduled()).id
        village, village_joined = await turn_client(room, VILLAGE, cid, transport, turn)
        county, county_joined = await turn_client(room, COUNTY, cid, transport, turn)
        village_id = village_joined["you"]["participant_id"]
        county_id = county_joined["you"]["participant_id"]
        for client, colour, tone in (
            (village, VILLAGE_COLOUR, VILLAGE_TONE),
            (county, COUNTY_COLOUR, COUNTY_TONE),
        ):
            ack = await client.publish(
                [(ColourCounterTrack(colour), "camera"), (ToneTrack(tone), "microphone")]
            )
            assert ack["ok"], ack

        def received(client: MediaClient, sender: str) -> bool:
            video = client.tracks_from(sender, "video")
            audio = client.tracks_from(sender, "audio")
            return bool(
                video and audio and len(video[0].frames) > 30 and len(audio[0].frames) > 100
            )

        await eventually(
            lambda: received(county, village_id), "county hears and sees village", within=WAIT_S
        )
        await eventually(
            lambda: received(village, county_id), "village hears and sees county", within=WAIT_S
        )

        # Content: each side sees the other's colour and hears the other's tone.
        for receiver, sender, colour, tone in (
            (county, village_id, VILLAGE_COLOUR, VILLAGE_TONE),
            (village, county_id, COUNTY_COLOUR, COUNTY_TONE),
        ):
            frame = receiver.tracks_from(sender, "video")[0].frames[-1]
            assert close_to(mean_colour(frame), colour), mean_colour(frame)
            audio = receiver.tracks_from(sender, "audio")[0].frames[-100:]
            assert abs(dominant_frequency(audio) - tone) < 15, dominant_frequency(audio)

        # Every connection of both peers runs on a TURN allocation.
        for client in (village, county):
            for pc in (client.publisher, client.subscriber):
                candidate = selected_local_candidate(pc)
                assert candidate.type == "relay", candidate
                assert candidate.host == turn.address, candidate

        # coturn's side: the allocations are the peers' own minted usernames, over the
        # transport asked for; closed, they report the media they relayed.
        for client in (village, county):
            await client.close()
        room.clients.clear()
        usernames = {
            village_joined["ice_servers"][0]["username"],
            county_joined["ice_servers"][0]["username"],
        }

        def all_closed() -> bool:
            mine = [s for s in turn.sessions() if s.username in usernames]
            return len(mine) >= 4 and all(s.peer_sent is not None for s in mine)

        await eventually(all_closed, "coturn closed the four allocations", within=WAIT_S)
        mine = [s for s in turn.sessions() if s.username in usernames]
        port = 443 if transport == "tls" else 3478
        for session in mine:
            assert session.tls is (transport == "tls"), session
            assert session.local_port == port, session
            assert session.closed_reason is not None and "TCP" in session.closed_reason, session
        # Each participant's allocations carried media both ways: what it published out to
        # the relay, what it received in from it (dozens of frames each way, many kB).
        for participant in (village_id, county_id):
            theirs = [s for s in mine if s.username.endswith(f":{participant}")]
            assert max((s.peer_sent or 0 for s in theirs), default=0) > 20_000, mine
            assert max((s.peer_received or 0 for s in theirs), default=0) > 20_000, mine
    finally:
        await room.close()
