"""Loss on a publisher's uplink, with real aiortc peers and the real server: the county
physician publishes a tone and a camera through `lossy_link.LossyLink` (a UDP proxy between its
publish connection and the relay's ICE port, 5 % of RTP lost, seeded), the village doctor
subscribes on a clean loopback.

Audio is never repaired (aiortc sends no NACK for audio), so what the relay must do is pass on
everything that arrives, at once: the subscriber then decodes about 95 % of the audio packets
sent. The relay that held audio behind a lost packet until 64 more had come, then looked for a
marker bit Opus packets do not carry, let about 20-50 % through at this loss.

Video is repaired by NACK and retransmission. The retransmissions are lost more often here
(30 %), so that some frames must be given up: each given-up frame is followed by a keyframe
request that reaches the publisher, and the picture goes on."""

from __future__ import annotations

import time

from lossy_link import Impairment, LossyLink
from lossy_media import StoppableTone, publish_through, settled
from media_client import MediaRoom, TrackingMediaClient, publication_of
from media_peers import ColourCounterTrack
from signaling_fixtures import eventually

from server.demo import COUNTY, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]

UPLINK_LOSS = 0.05
# The relay asks for a lost video packet up to three times; a packet is given up (and a
# keyframe requested) only when every retransmission is lost too: at 0.5, a quarter of the
# lost packets, so a 10 s window gives some up for certain.
RTX_LOSS = 0.5
# Audio frames (20 ms) the publisher sends while the subscriber counts: 10 s.
WINDOW_FRAMES = 500
# At 5 % loss about 95 % arrive; the old relay passed 20-50 %.
MIN_AUDIO_SHARE = 0.85
# Frames given up cost a few frames each until the keyframe; most are repaired.
MIN_VIDEO_SHARE = 0.3


async def test_audio_and_video_hold_up_under_uplink_loss(media_room: MediaRoom) -> None:
    server = media_room.server
    cid = (await server.scheduled()).id
    county = await media_room.seated(COUNTY, cid, label="county")
    village = await media_room.seated(VILLAGE, cid, label="village")
    link = LossyLink(Impairment(loss=UPLINK_LOSS), seed=11)
    await link.open()
    try:
        tone = StoppableTone(440.0)
        camera = ColourCounterTrack((40, 200, 40), width=320, height=240, noise=True)
        await publish_through(county, link, [(tone, "microphone"), (camera, "camera")])
        senders = {t.sender.kind: t.sender for t in county.publisher.getTransceivers()}
        audio_ssrc = senders["audio"]._ssrc
        video_ssrc, rtx_ssrc = senders["video"]._ssrc, senders["video"]._rtx_ssrc
        link.uplink.impairment.ssrc_loss[rtx_ssrc] = RTX_LOSS
        county.count_publisher_keyframe_requests()

        county_pid = county.peer.participant_id
        await eventually(
            lambda: (
                len(village.offered_from(county_pid, "audio")) == 1
                and len(village.offered_from(county_pid, "video")) == 1
            ),
            "the subscriber's offer of both tracks",
        )
        (audio_id,) = village.offered_from(county_pid, "audio")
        (video_id,) = village.offered_from(county_pid, "video")
        await eventually(
            lambda: village.frames_of(audio_id) > 0 and village.frames_of(video_id) > 0,
            "the first audio and video at the subscriber",
        )

        sent_audio_0, sent_video_0 = tone._sample // 960, camera.count
        got_audio_0, got_video_0 = village.frames_of(audio_id), village.frames_of(video_id)
        lost_0 = link.uplink.lost[audio_ssrc]
        started = time.monotonic()
        await eventually(
            lambda: tone._sample // 960 - sent_audio_0 >= WINDOW_FRAMES,
            f"{WINDOW_FRAMES} audio frames sent",
            within=WINDOW_FRAMES * 0.02 + 20,
        )
        # The tone stops, so that what was sent last can arrive and the count settle.
        tone.stop()
        sent_audio = tone._sample // 960 - sent_audio_0
        sent_video = camera.count - sent_video_0
        await settled(lambda: village.frames_of(audio_id), "the audio at the subscriber")
        got_audio = village.frames_of(audio_id) - got_audio_0
        got_video = village.frames_of(video_id) - got_video_0
        lost_audio = link.uplink.lost[audio_ssrc] - lost_0
        summary = (
            f"in {time.monotonic() - started:.1f} s: audio {got_audio}/{sent_audio} "
            f"(link lost {lost_audio}), video {got_video}/{sent_video}, "
            f"video packets lost {link.uplink.lost[video_ssrc]}, "
            f"retransmissions lost {link.uplink.lost[rtx_ssrc]} "
            f"of {link.uplink.lost[rtx_ssrc] + link.uplink.passed[rtx_ssrc]}"
        )
        print(summary)
        assert lost_audio >= 0.02 * sent_audio, summary  # the link did lose audio
        assert got_audio >= MIN_AUDIO_SHARE * sent_audio, summary
        assert got_video >= MIN_VIDEO_SHARE * sent_video, summary

        # Frames were given up, the publisher was asked for keyframes, and the picture went on.
        publication = publication_of(media_room.hub, cid, video_id)
        assert county.keyframe_requests, summary
        last_request = county.keyframe_requests[-1]
        await eventually(
            lambda: (
                (watched := village.collector(video_id)) is not None
                and watched.arrival[-1] > last_request + 0.1
            ),
            "video decoded after the last keyframe request",
        )
        assert publication.keyframe_requests >= 1

        # The relay's receiver reports to the publisher say what stayed lost: a video packet
        # repaired by retransmission counts as received (as libwebrtc counts it), so that a
        # browser's loss-based rate control does not throttle for loss that was repaired.
        # Audio is never repaired: its reports show the link's loss.
        reported = await _reported_lost(county)
        video_lost = link.uplink.lost[video_ssrc]
        assert reported["video"] < 0.5 * video_lost, (reported, video_lost, summary)
        assert reported["audio"] >= 0.5 * link.uplink.lost[audio_ssrc], (reported, summary)
    finally:
        link.close()


async def _reported_lost(client: TrackingMediaClient) -> dict[str, int]:
    """Per kind, the cumulative loss in the newest receiver report the publisher got."""
    out: dict[str, int] = {}
    for transceiver in client.publisher.getTransceivers():
        report = await transceiver.sender.getStats()
        for stats in report.values():
            if stats.type == "remote-inbound-rtp":
                out[transceiver.kind] = stats.packetsLost
    return out
