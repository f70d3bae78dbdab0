"""The low-bandwidth layers: a subscriber whose bandwidth estimate (REMB) is capped gets the
publisher's picture at low resolution; a subscriber can ask for audio only, and back."""

from __future__ import annotations

import asyncio
import contextlib

from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, pack_remb_fci
from media_client import MediaClient
from media_peers import Collector, ColourCounterTrack, ToneTrack, close_to, mean_colour
from signaling_fixtures import SignalingServer, eventually

from media.forwarding import KEYFRAME_INTERVAL_S, Publication
from media.frames import EncodedFrame
from media.low_layer import MAX_HEIGHT, MAX_WIDTH, LowLayer
from server.demo import COUNTY, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]

COLOUR = (30, 160, 220)


async def send_capped_remb(client: MediaClient, bps: int) -> None:
    """What a browser on a thin link says about its bandwidth, every 300 ms."""
    while True:
        for transceiver in client.subscriber.getTransceivers():
            receiver = transceiver.receiver
            ssrcs = [s.source for s in receiver.getSynchronizationSources()]
            rtcp_ssrc = receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
            if ssrcs and rtcp_ssrc is not None:
                packet = RtcpPsfbPacket(
                    fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0, fci=pack_remb_fci(bps, ssrcs)
                )
                await receiver._send_rtcp(packet)
        await asyncio.sleep(0.3)


async def audio_rate(server: SignalingServer, cid: str) -> float | None:
    stats = await server.namespace.media.stats(cid)
    rates = [t["bitrate_bps"] for t in stats["tracks"] if t["kind"] == "audio"]
    return float(rates[0]) if rates and rates[0] > 0 else None


def video_of(client: MediaClient) -> Collector:
    (collector,) = [c for tid, c in client.received.items() if client.info[tid]["kind"] == "video"]
    return collector


async def test_a_capped_subscriber_gets_the_low_layer_and_can_choose(
    media_server: SignalingServer,
) -> None:
    cid = (await media_server.scheduled()).id
    village = await media_server.seated(VILLAGE, cid, label="village")
    county = await media_server.seated(COUNTY, cid, label="county")
    publisher = MediaClient(village)
    viewer = MediaClient(county)
    capping: asyncio.Future[None] | None = None
    try:
        ack = await publisher.publish(
            [
                (ColourCounterTrack(COLOUR, 480, 360, noise=True), "camera"),
                (ToneTrack(440.0), "microphone"),
            ]
        )
        assert ack == {"ok": True}
        await eventually(lambda: len(viewer.received) == 2, "the viewer receives both tracks")
        video = video_of(viewer)
        await eventually(lambda: len(video.frames) > 5, "full-size frames")
        assert video.frames[0].width == 480

        # A link that carries the audio and 160 kbit/s more: not the full picture (aiortc's
        # encoder never goes below 250 kbit/s), but the 150 kbit/s low layer.
        audio_bps = await eventually(lambda: audio_rate(media_server, cid), "an audio bitrate")
        capping = asyncio.ensure_future(send_capped_remb(viewer, int(audio_bps) + 160_000))

        change = await county.wait_for("layer_changed", within=25)
        assert (change["kind"], change["layer"]) == ("video", "low")
        switched_at = len(video.frames)
        await eventually(
            lambda: len(video.frames) > switched_at + 30 and video.frames[-1].width <= MAX_WIDTH,
            "low-layer frames",
            within=20,
        )
        small = [f for f in video.frames[switched_at:] if f.width <= MAX_WIDTH]
        assert small[-1].height <= MAX_HEIGHT
        # The publisher's picture, smaller: same colour, the counter still advancing.
        assert all(close_to(mean_colour(f), COLOUR) for f in small[-10:])  # type: ignore[arg-type]
        stats = await media_server.namespace.media.stats(cid)
        (video_stats,) = [t for t in stats["tracks"] if t["kind"] == "video"]
        assert [s["layer"] for s in video_stats["subscribers"]] == ["low"]

        # The viewer asks for audio only: video stops, audio goes on.
        capping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await capping
        assert (await county.ok("set_layer", {"layer": "audio_only"}))["result"] == {"tracks": 1}
        (audio,) = [c for tid, c in viewer.received.items() if viewer.info[tid]["kind"] == "audio"]
        await asyncio.sleep(0.3)  # frames already on the wire may still arrive
        frozen, sounding = len(video.frames), len(audio.frames)
        await eventually(lambda: len(audio.frames) > sounding + 40, "audio keeps coming")
        assert len(video.frames) == frozen

        # And back to the full picture.
        await county.ok("set_layer", {"layer": "full"})
        await eventually(
            lambda: len(video.frames) > frozen + 10 and video.frames[-1].width == 480,
            "full-size frames again",
            within=20,
        )
    finally:
        if capping is not None:
            capping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await capping
        await publisher.close()
        await viewer.close()


async def test_set_layer_names_an_unknown_track(media_server: SignalingServer) -> None:
    cid = (await media_server.scheduled()).id
    county = await media_server.seated(COUNTY, cid, label="county")
    error = await county.refused("set_layer", {"track_id": "t_nothing", "layer": "low"})
    assert error["code"] == "media_error"
    error = await county.refused("set_layer", {"layer": "medium"})
    assert error["code"] == "invalid_payload"


async def test_a_low_layer_waiting_for_its_first_keyframe_keeps_asking() -> None:
    # A subscriber's switch to the low layer just after someone else asked the publisher for a
    # keyframe: the publication drops the low layer's own request (too soon after the other),
    # and the keyframe that answers the other came before the low layer listened. Seen in a
    # browser test: the low layer never started. It must ask again while it waits.
    now = [100.0]
    asked: list[float] = []

    async def ask() -> None:
        asked.append(now[0])

    source = Publication("video", ask, clock=lambda: now[0])
    source.want_keyframe()
    low = LowLayer(source)
    try:
        await asyncio.sleep(0)
        assert asked == [100.0]  # the low layer's request came too soon: dropped
        delta = EncodedFrame(b"\x01" + bytes(99), 3000, keyframe=False)
        for step in range(1, 5):
            now[0] = 100.0 + step * (KEYFRAME_INTERVAL_S + 0.01)
            source.push(delta)
            await asyncio.sleep(0)
        assert len(asked) == 5, asked
    finally:
        low.close()
