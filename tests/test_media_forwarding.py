"""The forwarding relay with real aiortc peers on loopback: what the subscriber decodes is the
publisher's picture and tone, passed through without re-encoding."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import RtpPacket
from media_peers import (
    LOOPBACK,
    Collector,
    ColourCounterTrack,
    ToneTrack,
    answer_offer,
    close_to,
    dominant_frequency,
    local_description,
    mean_colour,
    read_counter,
    wait_for,
)

from media.forwarding import Publication
from media.internals import check_internals
from media.peer import IncomingTrack, PeerConfig, PublishConnection, SubscribeConnection

SERVER = PeerConfig(host_addresses=LOOPBACK)


def test_the_aiortc_internals_the_relay_uses_are_there() -> None:
    check_internals()


class Relay:
    """A publisher → server → subscriber chain, closed at the end."""

    def __init__(self) -> None:
        self.publications: dict[str, Publication] = {}
        self.publish = PublishConnection(SERVER, self._published)
        self.subscribe = SubscribeConnection(SERVER)
        self.publisher = RTCPeerConnection()
        self.subscriber = RTCPeerConnection()

    def _published(self, incoming: IncomingTrack) -> None:
        self.publications[incoming.kind] = incoming.publication

    async def close(self) -> None:
        for pc in (self.publisher, self.subscriber):
            await pc.close()
        await self.publish.close()
        await self.subscribe.close()


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    chain = Relay()
    try:
        yield chain
    finally:
        await chain.close()


async def test_video_and_audio_pass_through_the_relay(relay: Relay) -> None:
    video = ColourCounterTrack((200, 40, 40))
    relay.publisher.addTrack(video)
    relay.publisher.addTrack(ToneTrack(440.0))
    answer = await relay.publish.answer(await local_description(relay.publisher, offer=True))
    await relay.publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    await wait_for(lambda: len(relay.publications) == 2, what="both tracks published")

    received: dict[str, Collector] = {}
    relay.subscriber.on("track", lambda t: received.setdefault(t.kind, Collector(t)))
    for kind in ("video", "audio"):
        relay.subscribe.add(relay.publications[kind])
    offer = await relay.subscribe.offer()
    await relay.subscribe.accept_answer(await answer_offer(relay.subscriber, offer))

    await wait_for(
        lambda: "video" in received and len(received["video"].frames) >= 30,
        what="30 forwarded video frames",
    )
    await wait_for(
        lambda: "audio" in received and len(received["audio"].frames) >= 50,
        what="1 s of forwarded audio",
    )
    frames = received["video"].frames
    counters = [read_counter(f) for f in frames]  # type: ignore[arg-type]
    assert counters == sorted(counters), counters
    assert counters[-1] - counters[0] >= 25
    assert all(close_to(mean_colour(f), (200, 40, 40)) for f in frames[-10:])  # type: ignore[arg-type]
    assert abs(dominant_frequency(received["audio"].frames[-50:]) - 440.0) < 15  # type: ignore[arg-type]
    # Forwarded, not re-encoded: every frame that reached the subscriber came from the publisher.
    assert relay.publications["video"].frames_in >= len(frames)
    for collector in received.values():
        await collector.stop()


async def test_a_packet_the_subscriber_lost_comes_again_over_rtx(relay: Relay) -> None:
    relay.publisher.addTrack(ColourCounterTrack((40, 40, 200)))
    answer = await relay.publish.answer(await local_description(relay.publisher, offer=True))
    await relay.publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    await wait_for(lambda: "video" in relay.publications, what="the video published")
    received: list[Collector] = []
    relay.subscriber.on("track", lambda t: received.append(Collector(t)))
    outgoing = relay.subscribe.add(relay.publications["video"])
    offer = await relay.subscribe.offer()
    await relay.subscribe.accept_answer(await answer_offer(relay.subscriber, offer))
    await wait_for(lambda: received and len(received[0].frames) >= 10, what="10 frames")

    sender = outgoing.transceiver.sender
    (transceiver,) = relay.subscriber.getTransceivers()
    dtls = transceiver.receiver.transport
    receiver = transceiver.receiver
    dropped: list[int] = []
    resent: list[int] = []
    handle_data = dtls._handle_rtp_data
    handle_packet = receiver._handle_rtp_packet

    # The subscriber loses one packet of the relay's stream: its header is readable before
    # decryption (SRTP encrypts the payload only).
    async def lossy(data: bytes, arrival_time_ms: int) -> None:
        ssrc = int.from_bytes(data[8:12], "big")
        if not dropped and ssrc == sender._ssrc:
            dropped.append(int.from_bytes(data[2:4], "big"))
            return
        await handle_data(data, arrival_time_ms)

    async def noting(packet: RtpPacket, arrival_time_ms: int) -> None:
        if packet.ssrc == sender._rtx_ssrc:
            resent.append(int.from_bytes(packet.payload[:2], "big"))  # the original number
        await handle_packet(packet, arrival_time_ms)

    dtls._handle_rtp_data = lossy  # type: ignore[method-assign]
    receiver._handle_rtp_packet = noting  # type: ignore[method-assign]
    await wait_for(lambda: bool(dropped) and dropped[0] in resent, what="the lost packet resent")
    # The picture goes on, in order.
    frames = received[0].frames
    before = len(frames)
    await wait_for(lambda: len(frames) >= before + 15, what="15 more frames")
    counters = [read_counter(f) for f in frames]  # type: ignore[arg-type]
    assert counters == sorted(counters), counters
    await received[0].stop()
