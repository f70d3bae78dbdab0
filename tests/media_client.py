"""PYTEST_DONT_REWRITE
A participant with media: a signaling client plus the two peer connections (publish and
subscribe), as a browser would run them, on aiortc and loopback."""

from __future__ import annotations

from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from media_peers import Collector, answer_offer, local_description
from signaling_fixtures import Peer


class MediaClient:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.publisher = RTCPeerConnection()
        self.subscriber = RTCPeerConnection()
        # What arrived, by track id, with the track info the offer named it with.
        self.received: dict[str, Collector] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self._mid_info: dict[str, dict[str, Any]] = {}
        self.answers = 0
        self.subscriber.on("track", self._on_track)
        peer.sio.on("subscribe_offer", self._on_offer, namespace="/consult")

    async def publish(self, tracks: list[tuple[MediaStreamTrack, str]]) -> dict[str, Any]:
        """Publishes (track, source) pairs; returns the ack of publish_offer."""
        for track, _ in tracks:
            self.publisher.addTransceiver(track, direction="sendonly")
        offer = await local_description(self.publisher, offer=True)
        sources = {
            t.mid: source
            for t, (_, source) in zip(self.publisher.getTransceivers(), tracks, strict=True)
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
        answer = await answer_offer(self.subscriber, data["sdp"])
        await self.peer.ok("subscribe_answer", {"sdp": answer})
        self.answers += 1

    def _on_track(self, track: MediaStreamTrack) -> None:
        transceiver = next(
            t for t in self.subscriber.getTransceivers() if t.receiver.track is track
        )
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
