"""Re-assembling a received RTP stream into encoded frames, in place of aiortc's jitter buffer:
a video frame leaves as soon as its last packet (marker bit) is in, rather than when the next
frame starts, and a frame whose retransmission is lost is given up (with a keyframe request)
instead of stalling the stream. Plain Python over the packets' fields, no aiortc import:
media/receiver_tap.py puts it in a receiver and feeds it."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from media.frames import EncodedFrame, FrameSink


@dataclass(frozen=True)
class AssemblyLimits:
    """How long and how much the frame assembler waits for a missing packet.

    Audio is never repaired (aiortc sends NACKs for video only), so a missing audio packet is
    waited for only as long as reordering on a real path lasts: packets of one burst overtake
    each other by a few milliseconds, well under one Opus frame (20 ms). The window is a bit
    shorter than a frame, so that on a steady stream a packet behind a loss leaves with the
    next one to arrive, however the arrival times jitter. Waiting longer only
    delays every packet behind each loss for every subscriber (and NetEQ in the browser then
    grows its own buffer); waiting less turns reordering into loss. A held audio packet leaves
    when `audio_reorder_s` has passed since it arrived, or when more than
    `audio_reorder_packets` are held (a burst after a stall), whichever comes first.

    Video is repaired by NACK and retransmission. The NACK or the retransmission can be lost
    too (on a 5 % link, one repair in twenty), and aiortc asks again only when a new loss
    appears, so the assembler asks again itself once a retry interval (the measured repair
    delay, NACK to retransmission, about one RTT, and a quarter more) has passed,
    `video_nack_retries` times. A missing packet is waited for as long as those asks take
    plus a margin, within `video_min_wait_s`..`video_max_wait_s`. What a frame may hold,
    and what may be held behind a gap, is capped in packets and bytes (a 1080p keyframe is
    a few hundred packets).
    """

    audio_reorder_s: float = 0.015
    audio_reorder_packets: int = 3
    video_min_wait_s: float = 0.05
    video_max_wait_s: float = 0.3
    video_margin_s: float = 0.02
    video_nack_retries: int = 2
    # Before any retransmission has been seen: a repair delay typical of a clinic's 4G link.
    video_initial_repair_s: float = 0.06
    max_frame_packets: int = 512
    max_frame_bytes: int = 512 * 1024
    # A keyframe request after a frame is given up, then at most this often while the
    # keyframe has not come (the same spacing as Publication.want_keyframe).
    keyframe_interval_s: float = 0.3


# What the frame assembler holds: aiortc's RtpPacket (its `_data` set by aiortc's receiver,
# before the relay's intake is up) or media/receiver_tap.py's ReceivedPacket; both read alike.
_Packet = Any

# FrameAssembler._dropping: the frame given up is whichever the next packet belongs to (RTP
# timestamps are 32-bit unsigned, so never this).
UNKNOWN_FRAME = -1


class FrameAssembler:
    """Replaces the receiver's jitter buffer. Emits each frame the moment it is complete (video:
    the packet with the marker bit and everything before it since the last frame; audio: each
    packet), in order. A missing packet is waited for only as `AssemblyLimits` says: audio for
    a short reorder window, video for about two repair delays; then what is held behind it
    goes on (audio) or its frame is dropped and a keyframe requested (video). A packet that
    arrives after its slot has passed is dropped.

    Sequence numbers are extended past 2**16 (`ext`) so that every comparison is plain. In
    order, a packet costs a few comparisons; the held packets (a dict) and the gaps (a deque of
    when each was noticed) are touched only around a loss, and nothing is scanned per packet."""

    def __init__(
        self,
        kind: str,
        on_frame: FrameSink,
        limits: AssemblyLimits = AssemblyLimits(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._video = kind == "video"
        self._on_frame = on_frame
        self._limits = limits
        self._clock = clock
        self._first = 0  # extended sequence number of the first packet
        self._highest: int | None = None  # highest extended sequence number seen
        self._next = 0  # first extended sequence number not yet emitted or given up
        # Packets after a gap, by extended sequence number, and their payload bytes.
        self._held: dict[int, _Packet] = {}
        self._held_bytes = 0
        # Per gap, oldest first: [the packet that revealed it, when it arrived, when its
        # packets were last asked for (NACK), how often they were asked again]. Every missing
        # number below that packet's was noticed then.
        self._gaps: deque[list[Any]] = deque()
        # The last gaps given up (first and last missing number, when noticed): a packet
        # that comes after all still tells how long repairs take.
        self._given_up: deque[tuple[int, int, float]] = deque(maxlen=16)
        # Video: the frame being assembled (in order, no gap) and its bytes.
        self._frame: list[_Packet] = []
        self._frame_bytes = 0
        # The RTP timestamp of a frame that was given up and whose remaining packets are
        # dropped; UNKNOWN_FRAME when the next packet's frame is that one.
        self._dropping: int | None = None
        self._waiting_for_keyframe = False
        self._last_keyframe_request = float("-inf")
        self._repair_s = limits.video_initial_repair_s
        self._last_timestamp: int | None = None
        self._timestamp_base = 0
        # Intake counts, read for the relay's per-hop loss figures.
        self.packets_received = 0  # distinct packets that came in time to be used
        self.packets_lost = 0  # sequence numbers given up on
        self.packets_late = 0  # came after their slot had passed, or twice
        self.frames_given_up = 0  # video frames that could not be completed
        self.frames_skipped = 0  # whole delta frames dropped while waiting for a keyframe

    @property
    def packets_expected(self) -> int:
        """Sequence numbers from the first packet's to the highest one's."""
        return 0 if self._highest is None else self._highest - self._first + 1

    @property
    def video_retry_s(self) -> float:
        """How long after a NACK a missing video packet is asked for again."""
        return 1.25 * self._repair_s + 0.005

    @property
    def video_wait_s(self) -> float:
        """How long a missing video packet is waited for now: its NACK and the asks again."""
        limits = self._limits
        wait = (1 + limits.video_nack_retries) * self.video_retry_s + limits.video_margin_s
        return min(max(wait, limits.video_min_wait_s), limits.video_max_wait_s)

    @property
    def holding(self) -> bool:
        """Whether packets wait behind a gap."""
        return bool(self._held)

    def wanted(self, sequence_number: int) -> bool:
        """Whether a missing packet (16-bit number) is still waited for, not given up."""
        highest = self._highest
        if highest is None:
            return True
        delta = (sequence_number - highest) & 0xFFFF
        ext = highest + (delta - 0x10000 if delta & 0x8000 else delta)
        return ext >= self._next and ext not in self._held

    def nack_again(self) -> list[int]:
        """Video: the sequence numbers (16-bit) of the gaps last asked for a retry interval
        ago, which are asked for again now. Called while packets are held."""
        if not self._video:
            return []
        now = self._clock()
        retry_s, retries = self.video_retry_s, self._limits.video_nack_retries
        again: list[int] = []
        low = self._next
        for gap in self._gaps:
            revealed_by = gap[0]
            if gap[3] < retries and now - gap[2] >= retry_s:
                gap[2] = now
                gap[3] += 1
                again.extend(e & 0xFFFF for e in range(low, revealed_by) if e not in self._held)
            low = revealed_by + 1
        return again

    # Same signature as aiortc's JitterBuffer.add; a frame is never returned here, it goes to
    # the sink, because one packet can complete several frames at once. True asks for a
    # keyframe.
    def add(self, packet: _Packet) -> tuple[bool, None]:
        highest = self._highest
        if highest is None:
            ext = self._first = self._next = packet.sequence_number
            highest = ext - 1  # as if the one before had been emitted
        else:
            delta = (packet.sequence_number - highest) & 0xFFFF
            ext = highest + (delta - 0x10000 if delta & 0x8000 else delta)
        if ext == self._next:
            self.packets_received += 1
            self._next = ext + 1
            if ext > highest:
                self._highest = ext
                request = self._accept(packet)
                if not self._held:
                    return request, None
            else:  # it fills the gap at the head
                if self._video:
                    self._note_repair(ext)
                request = self._accept(packet)
                request = self._pass_held() or request
        elif ext < self._next or ext in self._held:
            self.packets_late += 1
            if self._video and ext < self._next:
                self._note_late_repair(ext)
            return False, None
        else:
            self.packets_received += 1
            self._held[ext] = packet
            self._held_bytes += len(packet._data)
            request = False
            if ext > highest:
                if ext > highest + 1:
                    now = self._clock()
                    self._gaps.append([ext, now, now, 0])
                self._highest = ext
            elif self._video:
                self._note_repair(ext)
        if self._held:
            request = self._give_up_if_due() or request
        return request, None

    def _pass_held(self) -> bool:
        """Hands on the held packets that follow, in order, up to the next gap."""
        request = False
        held = self._held
        while (packet := held.pop(self._next, None)) is not None:
            self._held_bytes -= len(packet._data)
            self._next += 1
            request = self._accept(packet) or request
        gaps = self._gaps
        while gaps and gaps[0][0] <= self._next:
            gaps.popleft()
        return request

    def _give_up_if_due(self) -> bool:
        """Gives up the gap at the head while its wait is over or too much is held behind it."""
        limits = self._limits
        held = self._held
        request = False
        while held:
            revealed_by, noticed = self._gaps[0][:2]
            if self._video:
                due = (
                    len(held) > limits.max_frame_packets
                    or self._held_bytes > limits.max_frame_bytes
                    or self._clock() - noticed >= self.video_wait_s
                )
            else:
                due = (
                    len(held) > limits.audio_reorder_packets
                    or self._clock() - noticed >= limits.audio_reorder_s
                )
            if not due:
                return request
            # The first packet held: the one that revealed the gap, or one of the gap's own
            # that came late; found by whichever is the shorter search.
            if revealed_by - self._next <= len(held):
                first = next(e for e in range(self._next + 1, revealed_by + 1) if e in held)
            else:
                first = min(held)
            self.packets_lost += first - self._next
            if self._video:
                self._given_up.append((self._next, first - 1, noticed))
                request = self._drop_frame() or request
            self._next = first
            request = self._pass_held() or request
        return request

    def _note_repair(self, ext: int) -> None:
        """A missing video packet came (a retransmission, or reordered): how long after its
        gap was last asked for."""
        for revealed_by, _, asked, _ in self._gaps:
            if ext < revealed_by:
                self._add_repair_sample(self._clock() - asked)
                return

    def _note_late_repair(self, ext: int) -> None:
        """A packet of a gap already given up: the wait was shorter than the repair takes."""
        for first, last, noticed in self._given_up:
            if first <= ext <= last:
                self._add_repair_sample(self._clock() - noticed)
                return

    def _add_repair_sample(self, seconds: float) -> None:
        # Smoothed as TCP smooths its RTT; bounded so one stray sample cannot stick.
        sample = min(seconds, self._limits.video_max_wait_s)
        self._repair_s += (sample - self._repair_s) / 8

    def _accept(self, packet: _Packet) -> bool:
        """The next packet in order. Returns whether to request a keyframe."""
        if not self._video:
            self._emit([packet])
            return False
        timestamp = packet.timestamp
        dropping = self._dropping
        if dropping is not None:
            if dropping == UNKNOWN_FRAME or timestamp == dropping:
                self._dropping = None if packet.marker else timestamp
                return False  # the rest of a frame given up
            self._dropping = None  # a new frame starts
        frame = self._frame
        request = False
        if frame and timestamp != frame[0].timestamp:
            # A new frame starts: the one before is whole even without a marker.
            request = self._end_frame()
            frame = self._frame
        frame.append(packet)
        self._frame_bytes += len(packet._data)
        if packet.marker:
            return self._end_frame() or request
        limits = self._limits
        if len(frame) > limits.max_frame_packets or self._frame_bytes > limits.max_frame_bytes:
            return self._drop_frame() or request
        return request

    def _end_frame(self) -> bool:
        frame, self._frame, self._frame_bytes = self._frame, [], 0
        return self._emit(frame)

    def _drop_frame(self) -> bool:
        """The frame being assembled cannot be completed: its remaining packets are dropped
        and the picture resumes at a keyframe, which is requested."""
        frame = self._frame
        if frame or self._dropping is None:  # else the frame being dropped already counted
            self.frames_given_up += 1
        self._dropping = frame[0].timestamp if frame else UNKNOWN_FRAME
        self._frame = []
        self._frame_bytes = 0
        self._waiting_for_keyframe = True
        return self._keyframe_due()

    def _keyframe_due(self) -> bool:
        now = self._clock()
        if now - self._last_keyframe_request < self._limits.keyframe_interval_s:
            return False
        self._last_keyframe_request = now
        return True

    def _emit(self, packets: list[_Packet]) -> bool:
        """Hands a frame to the sink. Returns whether to ask for a keyframe again: a delta
        frame is dropped while the keyframe asked for has not come."""
        if len(packets) == 1:
            data: bytes = packets[0]._data
        else:
            data = b"".join(p._data for p in packets)
        if not data:
            return False
        keyframe = self._video and (data[0] & 0x01) == 0
        if self._video and self._waiting_for_keyframe:
            if not keyframe:
                self.frames_skipped += 1
                return self._keyframe_due()  # undecodable after a gap: wait for a keyframe
            self._waiting_for_keyframe = False
        self._on_frame(EncodedFrame(data, self._unwrap(packets[0].timestamp), keyframe))
        return False

    def _unwrap(self, timestamp: int) -> int:
        if self._last_timestamp is not None and timestamp < self._last_timestamp - 0x80000000:
            self._timestamp_base += 1 << 32
        self._last_timestamp = timestamp
        return self._timestamp_base + timestamp
