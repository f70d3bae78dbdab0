"""PYTEST_DONT_REWRITE
Media clients on a `lossy_link.LossyLink`: publishing through it (the client offers), and
subscribing through it (the server offers), with the candidates of both sides moved onto the
link. Also a tone that can stop, so that counts settle."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import av
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from lossy_link import LossyLink
from media_client import TrackingMediaClient
from media_peers import ToneTrack, answer_offer, local_description
from signaling_fixtures import Peer, eventually


class StoppableTone(ToneTrack):
    """A tone whose sender stops when the track is stopped (ToneTrack's recv goes on)."""

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        return await super().recv()

    @property
    def frames_sent(self) -> int:
        return self._sample // 960


async def settled(count: Callable[[], int], what: str) -> None:
    """Until `count` has not changed for 0.3 s (at most 5 s)."""
    last: list[tuple[float, int]] = []

    def still() -> bool:
        now, value = time.monotonic(), count()
        if not last or last[-1][1] != value:
            last.append((now, value))
        return now - last[-1][0] >= 0.3

    await eventually(still, f"{what} settles", within=5.0)


async def publish_through(
    client: TrackingMediaClient, link: LossyLink, tracks: list[tuple[Any, str]]
) -> None:
    """MediaClient.publish, with the offer and the answer's candidates moved onto the link."""
    for track, _ in tracks:
        client.publisher.addTransceiver(track, direction="sendonly")
    offer = link.offer_through(await local_description(client.publisher, offer=True))
    sources = {
        t.mid: source
        for t, (_, source) in zip(client.publisher.getTransceivers(), tracks, strict=True)
        if t.mid is not None
    }
    before = len(client.peer.events("publish_answer"))
    assert await client.peer.call("publish_offer", {"sdp": offer, "tracks": sources}) == {
        "ok": True
    }
    await client.peer.wait_for("publish_answer")
    answer = client.peer.events("publish_answer")[before]["sdp"]
    await client.publisher.setRemoteDescription(
        RTCSessionDescription(link.answer_through(answer), "answer")
    )


class LossySubscriber(TrackingMediaClient):
    """A TrackingMediaClient whose subscribe connection runs through `link`: the server's offer
    reaches it with the server's candidates moved to the link's client side, and its answer
    leaves with its own moved to the link's server side. Its downlink is what the relay sends
    to this subscriber."""

    def __init__(self, peer: Peer, link: LossyLink) -> None:
        super().__init__(peer)
        self.link = link

    async def _on_offer(self, data: dict[str, Any]) -> None:
        self.offers.append(dict(data["tracks"]))
        self._mid_info.update(data["tracks"])
        answer = await answer_offer(self.subscriber, self.link.answer_through(data["sdp"]))
        await self.peer.ok("subscribe_answer", {"sdp": self.link.offer_through(answer)})
        self.answers += 1
        self.answered_at.append(time.monotonic())
