"""The forwarding core: one publication per published track, fanned out to subscriber tracks
as packed encoded frames. Nothing here decodes or encodes."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiortc.codecs.vpx import Vp8Encoder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from media.frames import EncodedFrame, FrameSend, PackedFrame

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
AUDIO_CLOCK = 48_000
# A subscriber that falls this many frames behind loses the oldest ones (about 1 s of video).
MAX_QUEUED_FRAMES = 30
# Keyframe requests reach the publisher at most this often.
KEYFRAME_INTERVAL_S = 0.3


@dataclass
class NodeCounters:
    """A node's counts since it started, for /metrics: counted where each event happens, next
    to the counts of the publication or track concerned, so they never go down when those
    go."""

    frames_received: int = 0  # from publishers
    frames_forwarded: int = 0  # to subscribers' senders, every layer
    frames_dropped: int = 0  # for subscribers that fell behind
    keyframe_requests: int = 0  # sent to publishers


class Publication:
    """One published track (a camera, a microphone, a screen) and its subscribers. A layer the
    relay makes of another publication is `from_publisher=False`: its frames and keyframe
    requests are the relay's own, so the node's counters count only what it forwards."""

    def __init__(
        self,
        kind: str,
        request_keyframe: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
        counters: NodeCounters | None = None,
        *,
        from_publisher: bool = True,
    ) -> None:
        self.kind = kind
        self.counters = counters or NodeCounters()
        self._from_publisher = from_publisher
        self._request_keyframe = request_keyframe
        self._clock = clock
        self._subscribers: set[ForwardedTrack] = set()
        self._first_timestamp: int | None = None
        self._picture_id = 0
        self._last_keyframe_request = float("-inf")
        self._keyframe_task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[EncodedFrame], None]] = []
        self.frames_in = 0
        self.bytes_in = 0
        self.keyframe_requests = 0
        self.ended = False
        self.muted = False
        # How many times forwarding resumed after a forced mute: frames were skipped.
        self.resumptions = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> ForwardedTrack:
        track = ForwardedTrack(self)
        self._subscribers.add(track)
        if self.kind == "video":
            # A newcomer can only start decoding at a keyframe.
            self.want_keyframe()
        return track

    def unsubscribe(self, track: ForwardedTrack) -> None:
        self._subscribers.discard(track)
        track.stop()

    def detach(self, track: ForwardedTrack) -> None:
        """Stops feeding `track` without ending it (it is being handed over)."""
        self._subscribers.discard(track)

    def share_clock(self, other: Publication) -> None:
        """Timestamps relative to the same origin as `other` (a layer of the same picture)."""
        self._first_timestamp = other._first_timestamp

    def add_listener(self, listener: Callable[[EncodedFrame], None]) -> None:
        """Something besides subscribers that needs every frame (the low layer, a recorder)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[EncodedFrame], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def set_muted(self, muted: bool) -> None:
        """A forced mute: nothing of this track is forwarded to anyone until it is lifted."""
        if self.muted and not muted:
            self.resumptions += 1
        self.muted = muted
        if not muted:
            for track in self._subscribers:
                track.restart()

    def push(self, frame: EncodedFrame) -> None:
        """Called for each frame that arrives from the publisher."""
        if self.muted:
            return
        for listener in self._listeners:
            listener(frame)
        self.frames_in += 1
        if self._from_publisher:
            self.counters.frames_received += 1
        self.bytes_in += len(frame.data)
        if self._first_timestamp is None:
            self._first_timestamp = frame.timestamp
        timestamp = frame.timestamp - self._first_timestamp
        if self.kind == "video":
            # Packetized once for every subscriber; VP8 payload descriptors carry a picture id
            # that only has to increase per stream.
            payloads = Vp8Encoder._packetize(frame.data, self._picture_id)
            self._picture_id = (self._picture_id + 1) % (1 << 15)
        else:
            payloads = [frame.data]
        sizes = [len(p) for p in payloads]
        uniform = len(sizes) > 1 and sizes[-1] <= sizes[0] and min(sizes[:-1]) == max(sizes[:-1])
        packed = PackedFrame(payloads, timestamp, len(frame.data), sum(sizes), uniform)
        for track in self._subscribers:
            track.offer(packed, frame.keyframe)

    def want_keyframe(self) -> None:
        """Asks the publisher for a keyframe, at most every KEYFRAME_INTERVAL_S."""
        if self.kind != "video" or self.ended:
            return
        now = self._clock()
        if now - self._last_keyframe_request < KEYFRAME_INTERVAL_S:
            return
        if self._keyframe_task is not None and not self._keyframe_task.done():
            return
        self._last_keyframe_request = now
        self.keyframe_requests += 1
        if self._from_publisher:
            self.counters.keyframe_requests += 1
        self._keyframe_task = asyncio.ensure_future(self._request_keyframe())

    def end(self) -> None:
        """The publisher is gone: every subscriber's track ends."""
        self.ended = True
        for track in list(self._subscribers):
            self.unsubscribe(track)
        if self._keyframe_task is not None:
            self._keyframe_task.cancel()


class ForwardedTrack(MediaStreamTrack):
    """What a subscriber's sender forwards: packed frames of one publication, video starting
    (and restarting after a drop) at a keyframe. Once the sender has attached (`attach`), each
    frame goes to it as it arrives; before, or for a sender that reads with recv(), frames
    queue, the newest kept when the reader falls behind."""

    def __init__(self, publication: Publication) -> None:
        super().__init__()
        self.kind = publication.kind
        self._publication = publication
        self._queue: deque[PackedFrame] = deque()
        self._ready = asyncio.Event()
        self._needs_keyframe = publication.kind == "video"
        self._successor: ForwardedTrack | None = None
        self._send: FrameSend | None = None
        self._counters = publication.counters
        self.paused = False
        self.frames_out = 0
        self.bytes_out = 0
        self.frames_dropped = 0

    def offer(self, frame: PackedFrame, keyframe: bool) -> None:
        if self.readyState != "live" or self.paused:
            return
        if self._needs_keyframe:
            if not keyframe:
                self._publication.want_keyframe()
                return
            self._needs_keyframe = False
        if self._send is not None:
            self._push(frame)
            return
        if len(self._queue) >= MAX_QUEUED_FRAMES:
            # Behind by a second: drop what is queued and start again at a keyframe (video) or
            # with the newest audio.
            self.frames_dropped += len(self._queue)
            self._counters.frames_dropped += len(self._queue)
            self._queue.clear()
            if self.kind == "video" and not keyframe:
                self._needs_keyframe = True
                self._publication.want_keyframe()
                return
        self._queue.append(frame)
        self._ready.set()

    def attach(self, send: FrameSend) -> None:
        """From now on every frame goes straight to `send` (the subscriber's sender), in the
        publisher's turn of the event loop: no queue, no task to wake per subscriber."""
        self._send = send
        while self._queue:
            self._push(self._queue.popleft())

    def _push(self, frame: PackedFrame) -> None:
        assert self._send is not None
        try:
            sent = self._send(frame)
        except Exception:
            log.exception("forwarding a frame failed; this subscriber's track stops")
            self._send = None
            self.stop()
            return
        if sent:
            self.frames_out += 1
            self.bytes_out += frame.size
            self._counters.frames_forwarded += 1
            return
        # Not sent (not connected, or the subscriber's socket is backed up): video resumes at
        # a keyframe.
        self.frames_dropped += 1
        self._counters.frames_dropped += 1
        if self.kind == "video" and not self._needs_keyframe:
            self._needs_keyframe = True

    def pause(self, paused: bool) -> None:
        """A paused track forwards nothing (this subscriber gets audio only)."""
        self.paused = paused
        if paused:
            self._queue.clear()
        else:
            self.restart()

    def restart(self) -> None:
        """After a gap, video resumes at a keyframe."""
        if self.kind == "video":
            self._needs_keyframe = True
            self._publication.want_keyframe()

    @property
    def publication(self) -> Publication:
        return self._publication

    def hand_over(self, successor: ForwardedTrack) -> None:
        """The sender reading this track moves on to `successor` (another layer): a recv()
        already waiting here continues there, so the sender never sees this track end."""
        self._publication.detach(self)
        self._successor = successor
        if self._send is not None:
            successor.attach(self._send)
            self._send = None
        self._ready.set()

    async def recv(self) -> PackedFrame:  # type: ignore[override]
        while not self._queue:
            if self._successor is not None:
                return await self._successor.recv()
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        frame = self._queue.popleft()
        self.frames_out += 1
        self.bytes_out += frame.size
        self._counters.frames_forwarded += 1
        return frame

    def request_keyframe(self) -> None:
        """The subscriber's PLI/FIR."""
        self._publication.want_keyframe()

    def stop(self) -> None:
        super().stop()
        self._ready.set()  # wakes a pending recv(), which then ends


# What Publication.push relies on of aiortc's VP8 packetizer (the payload size is what keeps a
# forwarded packet inside a 1,500-byte path MTU with the RTP header and SRTP's tag).
VP8_PAYLOAD_MAX = 1300


def internals_problems() -> list[str]:
    """What `Publication.push` relies on of `Vp8Encoder._packetize`, a private classmethod of
    aiortc, tried on a frame: called on the class with (data, picture id), it splits the data
    into payloads of at most VP8_PAYLOAD_MAX bytes, all but the last of one size, each a
    4-byte VP8 payload descriptor (RFC 7741: the 15-bit picture id; the start-of-partition
    bit on the first) and the next piece of the data, unchanged."""
    packetize = getattr(Vp8Encoder, "_packetize", None)
    if packetize is None or list(inspect.signature(packetize).parameters) != [
        "buffer",
        "picture_id",
    ]:
        return ["missing: Vp8Encoder._packetize(buffer, picture_id)"]
    picture_id = 0x1234
    frame = bytes(range(256)) * 12  # three payloads
    try:
        payloads = packetize(frame, picture_id)
    except Exception as exc:
        return [f"changed: Vp8Encoder._packetize fails on a frame ({type(exc).__name__})"]
    descriptor = bytes([0x80, 0x80, 0x80 | picture_id >> 8, picture_id & 0xFF])
    if not (
        isinstance(payloads, list)
        and len(payloads) == -(-len(frame) // (VP8_PAYLOAD_MAX - len(descriptor)))
        and all(isinstance(p, bytes) and len(p) <= VP8_PAYLOAD_MAX for p in payloads)
        and len({len(p) for p in payloads[:-1]}) == 1
        and payloads[0][:4] == bytes([descriptor[0] | 0x10]) + descriptor[1:]
        and all(p[:4] == descriptor for p in payloads[1:])
        and b"".join(p[4:] for p in payloads) == frame
    ):
        return ["changed: Vp8Encoder._packetize no longer makes the payloads forwarding sends"]
    return []
