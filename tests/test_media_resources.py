"""Churn: people join, publish, receive and leave, fifty times over. What the cycles leave
behind in the server must not grow with their number: asyncio tasks, live media objects,
memory, and the negotiation of someone who stays through all of it.

How it is measured. Server and clients share this process and its event loop; each cycle's
clients are closed before a figure is taken, so what remains is the server's.
- Tasks: `len(asyncio.all_tasks())` once the loop has settled (polled until it stops falling:
  aiortc and socket.io finish their closing tasks a little after `close`). One kind is counted
  apart: engine.io starts a ping timer task per connection that sleeps `ping_interval` (25 s)
  before it looks whether its socket is still open, so each closed connection leaves one
  behind for up to 25 s. They are checked to belong to closed sockets, and left out of the
  comparison; at this pace (~0.6 s a cycle, two connections each) about 80 are pending.
- Memory: the resident set size (VmRSS of /proc/self/status), because much of what a peer
  connection holds lives in C (libvpx, libopus, OpenSSL, PyAV buffers), which tracemalloc would
  not see (tracemalloc also slows aiortc's packet path several-fold). RSS is noisy and the
  allocator keeps freed arenas: measured here it rises ~10 MB over the first ten cycles and then
  stays flat within ±3 MB. So it gets a generous bound over the whole run and a tighter one over
  the second half, and the objects a leak would consist of (peer connections, RTP senders and
  receivers, publications, forwarded tracks, clients) are counted exactly: those must come back
  to their warm-up numbers."""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass

from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from media_client import MediaRoom, TrackingMediaClient
from media_peers import ColourCounterTrack, ToneTrack, close_to, mean_colour, read_counter
from signaling_fixtures import eventually

from media.forwarding import ForwardedTrack, Publication
from server.demo import COUNTY, SPECIALIST

pytest_plugins = ["signaling_fixtures", "media_client"]

SIZE = {"width": 160, "height": 120}
CYCLES = 50
WARM_UP = 5
# Frames each side must receive per cycle (about 0.2 s at 30 fps): enough to check picture and
# counter, short enough to keep 50 cycles around half a minute.
FRAMES_PER_CYCLE = 6
# The hub's once-a-second sampler and socket.io's service task come and go with timers; a leak
# of one task per cycle would add 45.
TASK_TOLERANCE = 3
# Over the 45 cycles after the warm-up (the allocator still grows its arenas there), and over
# the last 25 (where it has stopped). A leaked peer connection with its buffers costs well over
# 0.5 MB, so leaking one per cycle would break the second bound.
RSS_GROWTH_LIMIT_MB = 30.0
RSS_SECOND_HALF_LIMIT_MB = 10.0
COUNTY_COLOUR = (40, 60, 220)
SPECIALIST_COLOUR = (220, 200, 40)


LEAK_TYPES: dict[str, type] = {
    "RTCPeerConnection": RTCPeerConnection,
    "RTCRtpSender": RTCRtpSender,
    "RTCRtpReceiver": RTCRtpReceiver,
    "Publication": Publication,
    "ForwardedTrack": ForwardedTrack,
    "TrackingMediaClient": TrackingMediaClient,
}


@dataclass(frozen=True)
class Footprint:
    tasks: int
    # engine.io ping timers of connections already closed (see the module docstring).
    closed_ping_timers: int
    rss_mb: float
    objects: dict[str, int]


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def live_objects() -> dict[str, int]:
    gc.collect()
    counts = dict.fromkeys(LEAK_TYPES, 0)
    for obj in gc.get_objects():
        for name, cls in LEAK_TYPES.items():
            if isinstance(obj, cls):
                counts[name] += 1
    return counts


def classify_tasks() -> tuple[int, int]:
    """(other tasks, engine.io ping timers of closed sockets); a ping timer of a socket still
    open counts as an other task."""
    others = closed_pings = 0
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        owner = frame.f_locals.get("self") if frame is not None else None
        if getattr(coro, "__qualname__", "") == "AsyncSocket._send_ping" and (
            getattr(owner, "closed", False) or getattr(owner, "closing", False)
        ):
            closed_pings += 1
        else:
            others += 1
    return others, closed_pings


async def footprint(within_s: float = 10.0) -> Footprint:
    """Measured once the task count stops falling: the lowest over a quiet half second."""
    deadline = time.monotonic() + within_s
    lowest = classify_tasks()
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.5:
        await asyncio.sleep(0.02)
        now = classify_tasks()
        if now[0] < lowest[0]:
            lowest, quiet_since = now, time.monotonic()
    return Footprint(lowest[0], lowest[1], rss_mb(), live_objects())


async def one_cycle(room: MediaRoom, cid: str, n: int) -> None:
    """Two people join, each publishes a short stream and receives the other's, both leave."""
    county = await room.seated(COUNTY, cid, label=f"county-{n}", device="churn")
    specialist = await room.seated(SPECIALIST, cid, label=f"specialist-{n}", device="churn")
    cameras = {
        "county": ColourCounterTrack(COUNTY_COLOUR, **SIZE),
        "specialist": ColourCounterTrack(SPECIALIST_COLOUR, **SIZE),
    }
    for client, camera in ((county, cameras["county"]), (specialist, cameras["specialist"])):
        ack = await client.publish([(camera, "camera"), (ToneTrack(500.0), "microphone")])
        assert ack == {"ok": True}, (n, ack)

    for receiver, sender, label in (
        (county, specialist, "specialist"),
        (specialist, county, "county"),
    ):
        pid = sender.peer.participant_id
        await eventually(
            lambda r=receiver, p=pid: r.offered_from(p, "video"), f"{n}: {label}'s video offered"
        )
        (video,) = receiver.offered_from(pid, "video")
        await eventually(
            lambda r=receiver, v=video: r.frames_of(v) >= FRAMES_PER_CYCLE,
            f"{n}: {label}'s video arrives",
            within=10,
        )
        got = receiver.collector(video)
        assert got is not None
        last = got.frames[-1]
        wanted = COUNTY_COLOUR if label == "county" else SPECIALIST_COLOUR
        assert close_to(mean_colour(last), wanted), (n, label)  # type: ignore[arg-type]
        assert 0 < read_counter(last) <= cameras[label].count, (n, label)  # type: ignore[arg-type]

    for client in (county, specialist):
        await client.peer.ok("leave")
        await room.drop_client(client)
    await eventually(lambda: room.hub.members(cid) == [], f"{n}: the hub holds no one")


async def test_fifty_join_publish_leave_cycles_leave_nothing_behind(media_room: MediaRoom) -> None:
    """Each cycle's participants come and go completely; between cycles the session stays open
    (its empty-room grace is two minutes), so every cycle joins the same session."""
    cid = (await media_room.server.scheduled()).id
    started = time.monotonic()
    for n in range(WARM_UP):
        await one_cycle(media_room, cid, n)
    warm = await footprint()
    for n in range(WARM_UP, CYCLES // 2):
        await one_cycle(media_room, cid, n)
    half = await footprint()
    for n in range(CYCLES // 2, CYCLES):
        await one_cycle(media_room, cid, n)
    after = await footprint()
    elapsed = time.monotonic() - started
    print(
        f"\n{CYCLES} cycles in {elapsed:.1f} s; tasks {warm.tasks} / {half.tasks} / "
        f"{after.tasks} (+ closed sockets' ping timers {warm.closed_ping_timers} / "
        f"{half.closed_ping_timers} / {after.closed_ping_timers}); RSS {warm.rss_mb:.1f} / "
        f"{half.rss_mb:.1f} / {after.rss_mb:.1f} MB; objects {after.objects}"
    )
    assert media_room.hub.members(cid) == []
    assert media_room.hub.tracks(cid) == []
    assert abs(after.tasks - warm.tasks) <= TASK_TOLERANCE, (warm.tasks, after.tasks)
    assert after.rss_mb - warm.rss_mb < RSS_GROWTH_LIMIT_MB, (warm.rss_mb, after.rss_mb)
    assert after.rss_mb - half.rss_mb < RSS_SECOND_HALF_LIMIT_MB, (half.rss_mb, after.rss_mb)
    assert after.objects == warm.objects, (warm.objects, after.objects)


# Visitors the steady participant sees come and go. Each adds a video and an audio section to
# its subscribe connection if sections are never reused: ~2,300 characters of answer SDP, so
# the 60,000-character limit of subscribe_answer is crossed after about 25.
STEADY_VISITS = 30


async def test_a_participant_who_stays_keeps_receiving_through_many_visitors(
    media_room: MediaRoom,
) -> None:
    cid = (await media_room.server.scheduled()).id
    steady = await media_room.seated(SPECIALIST, cid, label="steady")
    steady_camera = ColourCounterTrack(SPECIALIST_COLOUR, **SIZE)
    assert await steady.publish([(steady_camera, "camera")]) == {"ok": True}
    first_answer_chars = 0
    for n in range(STEADY_VISITS + 1):
        visitor = await media_room.seated(COUNTY, cid, label=f"visitor-{n}", device="visit")
        camera = ColourCounterTrack(COUNTY_COLOUR, **SIZE)
        ack = await visitor.publish([(camera, "camera"), (ToneTrack(500.0), "microphone")])
        assert ack == {"ok": True}, (n, ack)
        pid = visitor.peer.participant_id
        await eventually(
            lambda p=pid: steady.offered_from(p, "video") and steady.settled(),
            f"{n}: the steady participant answers the offer of the visitor's tracks",
        )
        assert steady.answer_failures == [], (n, steady.answer_failures)
        if n == 0:
            first_answer_chars = len(steady.subscriber.localDescription.sdp)
        if n == STEADY_VISITS:
            break  # the last visitor stays, to be seen
        await visitor.peer.ok("leave")
        await media_room.drop_client(visitor)
        await eventually(
            lambda p=pid: not steady.offered_from(p, "video") and steady.settled(),
            f"{n}: the steady participant answers the offer without the visitor",
        )
        assert steady.answer_failures == [], (n, steady.answer_failures)

    # The last visitor is seen, with its own picture.
    (video,) = steady.offered_from(visitor.peer.participant_id, "video")
    await eventually(lambda: steady.frames_of(video) >= FRAMES_PER_CYCLE, "the last visitor")
    got = steady.collector(video)
    assert got is not None and close_to(mean_colour(got.frames[-1]), COUNTY_COLOUR)  # type: ignore[arg-type]
    # What the steady participant negotiates is what the room holds now, not its history.
    answer_chars = len(steady.subscriber.localDescription.sdp)
    assert answer_chars <= 2 * first_answer_chars, (first_answer_chars, answer_chars)
