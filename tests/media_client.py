"""PYTEST_DONT_REWRITE
A participant with media: a signaling client plus the two peer connections (publish and
subscribe), as a browser would run them, on aiortc and loopback.

Also the media tests' shared fixtures, `media_room` and `media_server`: use with
`pytest_plugins = ["media_client"]` (as signaling_fixtures.py is used)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack
from media_peers import Collector, answer_offer, local_description
from signaling_fixtures import DemoIdentity, Peer, SignalingServer, start_signaling_server

from media.forwarding import Publication
from media.hub import MediaHub
from server.config import Config, load_config


def client_peer_connection(
    ice_servers: list[RTCIceServer] | None = None,
    policy: RTCIceTransportPolicy = RTCIceTransportPolicy.ALL,
) -> RTCPeerConnection:
    """As docs/protocol.md asks of clients: every section on one transport (max-bundle). With
    aiortc's default (balanced), an answer to an offer holding two sections of a kind other
    than the first section's leaves the second on a transport that BUNDLE then stops.
    No ICE servers unless given (aiortc would ask a public STUN server)."""
    return RTCPeerConnection(
        RTCConfiguration(
            iceServers=ice_servers or [],
            iceTransportPolicy=policy,
            bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
        )
    )


class MediaClient:
    def __init__(
        self,
        peer: Peer,
        *,
        send_remb: bool = False,
        ice_servers: list[RTCIceServer] | None = None,
        policy: RTCIceTransportPolicy = RTCIceTransportPolicy.ALL,
    ) -> None:
        """`ice_servers` and `policy` configure both peer connections (RELAY: TURN only)."""
        self.peer = peer
        self.send_remb = send_remb
        self.publisher = client_peer_connection(ice_servers, policy)
        self.subscriber = client_peer_connection(ice_servers, policy)
        # What arrived, by track id, with the track info the offer named it with.
        self.received: dict[str, Collector] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self._mid_info: dict[str, dict[str, Any]] = {}
        self.answers = 0
        self._sources: list[str] = []  # of the publish connection's sections, in order
        self.subscriber.on("track", self._on_track)
        peer.sio.on("subscribe_offer", self._on_offer, namespace="/consult")

    async def publish(self, tracks: list[tuple[MediaStreamTrack, str]]) -> dict[str, Any]:
        """Publishes (track, source) pairs; returns the ack of publish_offer. Called again,
        it adds tracks to the publish connection (the offer names every section)."""
        for track, source in tracks:
            self.publisher.addTransceiver(track, direction="sendonly")
            self._sources.append(source)
        offer = await local_description(self.publisher, offer=True)
        sources = {
            t.mid: source
            for t, source in zip(self.publisher.getTransceivers(), self._sources, strict=True)
            if t.mid is not None
        }
        before = len(self.peer.events("publish_answer"))
        ack = await self.peer.call("publish_offer", {"sdp": offer, "tracks": sources})
        if ack.get("ok"):
            await self.peer.wait_for("publish_answer")
            answer = self.peer.events("publish_answer")[before]
            await self.publisher.setRemoteDescription(
                RTCSessionDescription(answer["sdp"], "answer")
            )
        return dict(ack)

    async def _on_offer(self, data: dict[str, Any]) -> None:
        self._mid_info.update(data["tracks"])
        answer = await self.answer_subscribe_offer(data["sdp"])
        await self.peer.ok("subscribe_answer", {"sdp": answer})
        self.answers += 1

    async def answer_subscribe_offer(self, offer_sdp: str) -> str:
        return await answer_offer(self.subscriber, offer_sdp)

    def _on_track(self, track: MediaStreamTrack) -> None:
        transceiver = next(
            t for t in self.subscriber.getTransceivers() if t.receiver.track is track
        )
        if not self.send_remb:
            # aiortc's receive-side estimator reports about half of what it receives on an
            # idle loopback (a browser's estimate tracks capacity), which would push the relay
            # to the low layer for no reason: this simulated browser sends no REMB unless asked.
            receiver = transceiver.receiver
            receiver._RTCRtpReceiver__remote_bitrate_estimator = None  # type: ignore[attr-defined]
        info = self._mid_info.get(transceiver.mid or "", {})
        track_id = info.get("track_id", f"mid-{transceiver.mid}")
        self.info[track_id] = info
        self.received[track_id] = Collector(track)

    def tracks_from(self, participant: str, kind: str) -> list[Collector]:
        return [
            self.received[tid]
            for tid, info in self.info.items()
            if info.get("participant") == participant and info.get("kind") == kind
        ]

    async def close(self) -> None:
        for collector in self.received.values():
            await collector.stop()
        await self.publisher.close()
        await self.subscriber.close()


# --- shared by the media test modules: a server with media on loopback, clients that keep
# --- what they negotiated, and the few relay internals the tests read --------------------

MEDIA_OVERRIDES: dict[str, Any] = {"dev": True, "media.host_addresses": ["127.0.0.1"]}


def media_config(data_dir: Path, **overrides: Any) -> Config:
    """A development config whose relay offers 127.0.0.1 in ICE (aioice never offers loopback
    by itself); keyword arguments are more dotted overrides (`signaling.reconnect_grace_s`)."""
    return load_config(
        env={}, overrides={**MEDIA_OVERRIDES, "data_dir": str(data_dir), **overrides}
    )


class TrackingMediaClient(MediaClient):
    """A MediaClient that also remembers each subscribe offer, when each answer was accepted,
    and which received track carries a track id now (aiortc reuses a transceiver, and fires no
    new `track` event, when a renegotiation puts another track on a mid it had before)."""

    def __init__(self, peer: Peer, *, send_remb: bool = False) -> None:
        super().__init__(peer, send_remb=send_remb)
        self.offers: list[dict[str, dict[str, Any]]] = []
        # time.monotonic() when each subscribe_answer was acknowledged by the server.
        self.answered_at: list[float] = []
        # Refused subscribe answers (the refusal, cut short): a handler's exception would only
        # be logged by socket.io, so it is kept here for the test to assert on.
        self.answer_failures: list[str] = []
        self.keyframe_requests: list[float] = []

    async def _on_offer(self, data: dict[str, Any]) -> None:
        self.offers.append(dict(data["tracks"]))
        try:
            await super()._on_offer(data)
        except AssertionError as exc:
            message = str(exc)
            self.answer_failures.append(message[:80] + " ... " + message[-200:])
            return
        self.answered_at.append(time.monotonic())

    def settled(self) -> bool:
        """Every subscribe offer received so far has been answered (or refused)."""
        return len(self.answered_at) + len(self.answer_failures) == len(self.offers)

    def offered(self) -> dict[str, dict[str, Any]]:
        """The newest subscribe offer's tracks by mid ({} before the first)."""
        return self.offers[-1] if self.offers else {}

    def collector(self, track_id: str) -> Collector | None:
        """What arrives on the mid that the newest offer naming `track_id` put it on (a later
        offer may have dropped it: then what arrived before, and anything still arriving), or
        None if no offer named it."""
        mid = next(
            (m for o in reversed(self.offers) for m, i in o.items() if i["track_id"] == track_id),
            None,
        )
        if mid is None:
            return None
        receiver_track = next(
            (t.receiver.track for t in self.subscriber.getTransceivers() if t.mid == mid), None
        )
        return next((c for c in self.received.values() if c.track is receiver_track), None)

    def frames_of(self, track_id: str) -> int:
        """How many frames arrived so far on the mid that carries `track_id` (0 if none)."""
        found = self.collector(track_id)
        return len(found.frames) if found is not None else 0

    def offered_from(self, participant: str, kind: str) -> list[str]:
        """Track ids of `participant`'s `kind` tracks in the newest subscribe offer."""
        return [
            i["track_id"]
            for i in self.offered().values()
            if i["participant"] == participant and i["kind"] == kind
        ]

    def count_publisher_keyframe_requests(self) -> None:
        """From now on, every PLI/FIR that reaches a video sender of the publish connection is
        noted in `keyframe_requests` (aiortc routes both to `RTCRtpSender._send_keyframe`,
        which then forces the next encoded frame to be a keyframe)."""
        for transceiver in self.publisher.getTransceivers():
            sender = transceiver.sender
            if sender.kind != "video":
                continue
            original = sender._send_keyframe

            def noted(original: Callable[[], None] = original) -> None:
                self.keyframe_requests.append(time.monotonic())
                original()

            sender._send_keyframe = noted  # type: ignore[method-assign]


class MediaRoom:
    """A started server with media on loopback, and every media client a test makes; `close`
    closes the clients' peer connections, then the socket.io clients and the server."""

    def __init__(self, server: SignalingServer) -> None:
        self.server = server
        self.clients: list[MediaClient] = []

    @classmethod
    async def start(cls, data_dir: Path, **overrides: Any) -> MediaRoom:
        return cls(await start_signaling_server(media_config(data_dir, **overrides)))

    @property
    def hub(self) -> MediaHub:
        return self.server.namespace.media

    def client(self, peer: Peer) -> TrackingMediaClient:
        client = TrackingMediaClient(peer)
        self.clients.append(client)
        return client

    def plain_client(self, peer: Peer) -> MediaClient:
        """A MediaClient (no offer tracking) for an already connected peer, closed with the
        room."""
        client = MediaClient(peer)
        self.clients.append(client)
        return client

    async def seated(
        self, who: DemoIdentity | str, cid: str, *, label: str, device: str = "default"
    ) -> TrackingMediaClient:
        """Connected, listening for subscribe offers, then joined (a participant who may admit
        is seated at once), as a browser would do it: the offer of the room's tracks comes
        with the seat."""
        client = self.client(await self.server.connect(who, label=label))
        await client.peer.join(cid, device)
        await client.peer.wait_for("joined")
        return client

    async def waiting(
        self, token: str, cid: str, *, label: str, device: str = "default"
    ) -> tuple[TrackingMediaClient, str]:
        """Connected, listening, joined into the waiting room; returns it and its participant
        id."""
        client = self.client(await self.server.connect(token, label=label))
        await client.peer.join(cid, device)
        waiting = await client.peer.wait_for("waiting")
        participant_id: str = waiting["participant"]["participant_id"]
        return client, participant_id

    async def admitted(
        self, token: str, cid: str, admitter: Peer, *, label: str, device: str = "default"
    ) -> TrackingMediaClient:
        """Through the waiting room into the room, admitted by `admitter`."""
        client, participant_id = await self.waiting(token, cid, label=label, device=device)
        await admitter.ok("admit", {"participant": participant_id})
        await client.peer.wait_for("joined")
        return client

    async def drop_client(self, client: TrackingMediaClient) -> None:
        """Closes one client's peer connections and its socket.io connection, and forgets it."""
        await client.close()
        await client.peer.close()
        self.clients.remove(client)
        if client.peer in self.server.peers:
            self.server.peers.remove(client.peer)

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        self.clients.clear()
        await self.server.close()


@pytest.fixture
async def media_room(tmp_path: Path) -> AsyncIterator[MediaRoom]:
    """A server with media on loopback (media_config, data in tmp_path), closed after the test:
    the media clients made through it first, then the socket.io clients and the server."""
    started = await MediaRoom.start(tmp_path)
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
def media_server(media_room: MediaRoom) -> SignalingServer:
    """The server of `media_room`, for tests that make their own MediaClients."""
    return media_room.server


def publication_of(hub: MediaHub, room: str, track_id: str) -> Publication:
    """The relay's Publication of a published track (reaches into the hub: it exposes track
    infos, not the forwarding objects)."""
    members: dict[str, Any] = hub._rooms.get(room, {})
    for member in members.values():
        published = member.published.get(track_id)
        if published is not None:
            publication: Publication = published.publication
            return publication
    raise AssertionError(f"no publication {track_id} in {room}")
