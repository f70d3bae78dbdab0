"""A late joiner's first picture. A publisher has streamed for a long time, so its last natural
keyframe is far behind; then someone joins. The relay must ask the publisher for a keyframe at
once, so that the newcomer decodes a picture within a second of answering its subscribe offer,
showing what the publisher sends now.

LATE_JOIN_AFTER_S keeps the issue's "late joiner after 20 s". What matters is that the joiner
arrives long after the keyframes of the start (the encoder's first frame, the first viewer's
request, and the encoder rebuilds that the first bitrate estimates cause in the first seconds):
aiortc's VP8 encoder otherwise makes a keyframe only every 3000 frames (100 s), so without the
relay's request the newcomer would wait (measured without the fix: no picture within 15 s). The
test checks that premise where the frames enter the relay (decoded frames do not say whether
they were keyframes): no keyframe in the QUIET_BEFORE_JOIN_S before the join."""

from __future__ import annotations

import time

import av
from media_client import MediaRoom, publication_of
from media_peers import ColourCounterTrack, close_to, mean_colour, read_counter
from signaling_fixtures import eventually

from media.forwarding import Publication
from media.frames import EncodedFrame
from server.demo import COUNTY, SPECIALIST, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]

SIZE = {"width": 160, "height": 120}
LATE_JOIN_AFTER_S = 20.0
FPS = 30
# The newcomer's first frame must be decoded this soon after its subscribe answer was accepted.
FIRST_FRAME_WITHIN_S = 1.0
# ... and show a frame at most this many frames older than the one the publisher is at then.
MAX_FRAMES_BEHIND = FPS
QUIET_BEFORE_JOIN_S = 10.0


def note_keyframes(publication: Publication) -> list[float]:
    """From now on, the time each keyframe of `publication` reaches the relay (its `push` is
    what the receiver tap calls with every re-assembled frame)."""
    times: list[float] = []
    push = publication.push

    def noting(frame: EncodedFrame) -> None:
        if frame.keyframe:
            times.append(time.monotonic())
        push(frame)

    publication.push = noting  # type: ignore[method-assign]
    return times


async def test_a_late_joiner_gets_a_current_picture_within_a_second(media_room: MediaRoom) -> None:
    server = media_room.server
    cid = (await server.scheduled()).id
    county = await media_room.seated(COUNTY, cid, label="county")
    early = await media_room.seated(SPECIALIST, cid, label="early")

    colour = (40, 180, 220)
    camera = ColourCounterTrack(colour, **SIZE)
    assert await county.publish([(camera, "camera")]) == {"ok": True}
    county.count_publisher_keyframe_requests()
    county_pid = county.peer.participant_id
    await eventually(lambda: early.offered_from(county_pid, "video"), "the early viewer's offer")
    (track_id,) = early.offered_from(county_pid, "video")
    publication = publication_of(media_room.hub, cid, track_id)
    keyframes = note_keyframes(publication)

    started = time.monotonic()
    await eventually(
        lambda: early.frames_of(track_id) > 0 and time.monotonic() - started >= LATE_JOIN_AFTER_S,
        f"the early viewer has watched for {LATE_JOIN_AFTER_S} s",
        within=LATE_JOIN_AFTER_S + 10,
    )
    watched = early.collector(track_id)
    assert watched is not None
    assert len(watched.frames) >= FPS * LATE_JOIN_AFTER_S * 0.8, len(watched.frames)
    relay_requests_before = publication.keyframe_requests
    publisher_requests_before = len(county.keyframe_requests)
    join_at = time.monotonic()
    early_frames_at_join = len(watched.frames)
    keyframes_before = list(keyframes)
    # The premise: the stream has gone long without a keyframe.
    assert not keyframes_before or join_at - keyframes_before[-1] >= QUIET_BEFORE_JOIN_S, [
        round(t - started, 2) for t in keyframes_before
    ]

    late = await media_room.seated(VILLAGE, cid, label="late")
    await eventually(lambda: late.offered_from(county_pid, "video"), "the late joiner's offer")
    await eventually(lambda: late.answered_at, "the late joiner's answer accepted")
    answered_at = late.answered_at[0]
    first_seen = await eventually(
        lambda: (c := late.collector(track_id)) is not None and bool(c.frames) and c,
        "the late joiner's first frame",
        within=5,
    )
    publisher_count = camera.count  # read as soon as the first frame is seen (5 ms polls)
    first: av.VideoFrame = first_seen.frames[0]
    after_answer_s = first_seen.arrival[0] - answered_at
    behind = publisher_count - read_counter(first)
    print(
        f"\nlate joiner: first frame {after_answer_s * 1000:.0f} ms after its answer, "
        f"{(first_seen.arrival[0] - join_at) * 1000:.0f} ms after joining; {behind} frames "
        f"behind the publisher; keyframes before the join at "
        f"{[round(t - started, 2) for t in keyframes_before]} s"
    )

    assert after_answer_s < FIRST_FRAME_WITHIN_S, after_answer_s
    # It started on a keyframe made for it: one reached the relay after the join.
    assert any(join_at < t <= first_seen.arrival[0] for t in keyframes), keyframes
    assert close_to(mean_colour(first), colour), mean_colour(first)
    assert 0 <= behind <= MAX_FRAMES_BEHIND, (read_counter(first), publisher_count)
    # It was the relay that asked, and the request reached the publisher's encoder.
    assert publication.keyframe_requests > relay_requests_before
    assert len(county.keyframe_requests) > publisher_requests_before
    assert min(county.keyframe_requests[publisher_requests_before:]) >= join_at
    # The picture goes on from there, in order.
    await eventually(lambda: len(first_seen.frames) >= 15, "the late joiner's next frames")
    counters = [read_counter(f) for f in first_seen.frames]
    assert counters == sorted(counters), counters
    # The early viewer was not disturbed: its picture went on.
    assert len(watched.frames) >= early_frames_at_join + 15
    assert close_to(mean_colour(watched.frames[-1]), colour)  # type: ignore[arg-type]
