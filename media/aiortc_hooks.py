"""Everything that reaches into aiortc's internals, in one place, per object (never a
process-wide switch). aiortc is pinned to one exact version in pyproject.toml;
`check_internals()` fails loudly, naming what moved, when an upgrade changes what this module
relies on, and a test calls it.

What aiortc lacks and this module adds:
- a receiver that hands out re-assembled *encoded* frames instead of decoding them;
- releasing a video frame as soon as its last packet (marker bit) is in, instead of when the
  next frame starts, and giving up on a frame whose retransmission is lost;
- a sender that packs pre-encoded frames and reports keyframe requests (PLI/FIR), bitrate
  feedback (REMB) and each receiver report's loss and round-trip time to the relay instead of
  dropping them (aiortc smooths its round-trip time and measures it only from reports that
  answer its newest sender report);
- receiving RTP in the socket's callback, without aiortc's per-datagram queue and task;
- choosing which host addresses ICE offers (aioice never offers loopback by itself).

ICE restarts, which aiortc cannot do either, are media/ice_restart.py's; `check_internals()`
checks what that module relies on too."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import aioice
import aiortc
import pylibsrtp
from aioice import Candidate
from aiortc import clock as aiortc_clock
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcicetransport import RTCIceTransport
from aiortc.rtcpeerconnection import RTCPeerConnection
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import (
    NackGenerator,
    RTCRtpReceiver,
    StreamStatistics,
    decoder_worker,
)
from aiortc.rtcrtpsender import RTCRtpSender, random_sequence_number
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTP_HISTORY_SIZE,
    AnyRtcpPacket,
    HeaderExtensionsMap,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSrPacket,
    RtpPacket,
    pack_remb_fci,
    wrap_rtx,
)
from aiortc.utils import random32

from media.ice_restart import internals_problems as ice_restart_internals_problems
from media.opus import has_fec

log = logging.getLogger(__name__)

PINNED_AIORTC = "1.16.0"

_RECEIVER_ATTRS = (
    "_RTCRtpReceiver__decoder_queue",
    "_RTCRtpReceiver__jitter_buffer",
    "_RTCRtpReceiver__remote_bitrate_estimator",
    "_RTCRtpReceiver__active_ssrc",
    "_RTCRtpReceiver__codecs",
    "_RTCRtpReceiver__nack_generator",
    "_RTCRtpReceiver__remote_streams",
    "_RTCRtpReceiver__rtcp_ssrc",
    "_RTCRtpReceiver__rtx_ssrc",
)
_SENDER_ATTRS = (
    "_RTCRtpSender__encoder",
    "_RTCRtpSender__mid",
    "_RTCRtpSender__rtp_header_extensions_map",
    "_RTCRtpSender__rtp_started",
    "_RTCRtpSender__rtp_exited",
    "_RTCRtpSender__rtx_payload_type",
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__octet_count",
    "_RTCRtpSender__packet_count",
    "_RTCRtpSender__stats",
)


class AiortcInternalsChanged(RuntimeError):
    pass


def check_internals() -> None:
    """Raises naming each internal this module relies on that is no longer there."""
    problems: list[str] = []
    if aiortc.__version__ != PINNED_AIORTC:
        problems.append(
            f"aiortc is {aiortc.__version__}, the relay was written for {PINNED_AIORTC}"
        )
    receive_src = inspect.getsource(RTCRtpReceiver.receive)
    handle_src = inspect.getsource(RTCRtpReceiver._handle_rtp_packet)
    for needle, where in (
        ("self.__decoder_queue", "RTCRtpReceiver.receive passes the decoder queue to the thread"),
        (
            "self.__jitter_buffer.add(packet)",
            "RTCRtpReceiver._handle_rtp_packet feeds the jitter buffer",
        ),
        (
            "packet._data = depayload(codec, packet.payload)",
            "the receiver depayloads before buffering",
        ),
        ("self.__decoder_queue.put((codec, encoded_frame))", "the receiver queues encoded frames"),
    ):
        if needle not in receive_src + handle_src:
            problems.append(f"missing: {where}")
    if "input_q.get()" not in inspect.getsource(decoder_worker):
        problems.append("missing: decoder_worker reads its input queue with get()")
    handle_rtcp = inspect.getsource(RTCRtpSender._handle_rtcp_packet)
    for needle, where in (
        ("self._send_keyframe()", "RTCRtpSender routes PLI/FIR to _send_keyframe"),
        ("self.__encoder.target_bitrate = bitrate", "RTCRtpSender hands REMB to its encoder"),
    ):
        if needle not in handle_rtcp:
            problems.append(f"missing: {where}")
    sender_init = inspect.getsource(RTCRtpSender.__init__)
    for name in _SENDER_ATTRS:
        if not re.search(rf"self\.__{name.removeprefix('_RTCRtpSender__')}\b", sender_init):
            problems.append(f"missing: RTCRtpSender.{name}")
    receiver_init = inspect.getsource(RTCRtpReceiver.__init__)
    for name in _RECEIVER_ATTRS:
        if not re.search(rf"self\.__{name.removeprefix('_RTCRtpReceiver__')}\b", receiver_init):
            problems.append(f"missing: RTCRtpReceiver.{name}")
    send_src = inspect.getsource(RTCRtpSender.send)
    for needle, where in (
        ("self._run_rtp(parameters.codecs[0])", "RTCRtpSender.send starts _run_rtp(codec)"),
        ("self.__rtp_header_extensions_map.configure", "the sender's extension ids"),
    ):
        if needle not in send_src:
            problems.append(f"missing: {where}")
    for needle, where in (
        ("self.__rtp_history.get(", "RTCRtpSender._retransmit reads its history"),
        ("self.__rtp_exited.wait()", "RTCRtpSender.stop waits for the RTP task"),
    ):
        if needle not in inspect.getsource(RTCRtpSender._retransmit) + inspect.getsource(
            RTCRtpSender.stop
        ):
            problems.append(f"missing: {where}")
    if "self.__lsr = ((self.__ntp_timestamp) >> 16) & 0xFFFFFFFF" not in inspect.getsource(
        RTCRtpSender._run_rtcp
    ) or "await self._send_rtcp(packets)" not in inspect.getsource(RTCRtpSender._run_rtcp):
        problems.append("missing: RTCRtpSender._run_rtcp sends its reports with _send_rtcp")
    if "fraction_lost=stream.fraction_lost" not in inspect.getsource(RTCRtpReceiver._run_rtcp):
        problems.append("missing: RTCRtpReceiver._run_rtcp reports each stream's fraction_lost")
    if "await recipient._handle_rtcp_packet(packet)" not in inspect.getsource(RTCDtlsTransport):
        problems.append("missing: RTCDtlsTransport hands RTCP to _handle_rtcp_packet")
    if "await self._retransmit(seq)" not in handle_rtcp:
        problems.append("missing: RTCRtpSender routes NACK to _retransmit")
    for needle in (
        'id="remote-inbound-rtp_" + str(id(self))',
        "packetsLost=report.packets_lost",
        "jitter=report.jitter",
        "roundTripTime=self.__rtt",
        "fractionLost=report.fraction_lost",
    ):
        if needle not in handle_rtcp:
            problems.append(f"missing: RTCRtpSender keeps receiver reports ({needle})")
    if "self.__ids = HeaderExtensions()" not in inspect.getsource(HeaderExtensionsMap):
        problems.append("missing: HeaderExtensionsMap.__ids")
    dtls_src = inspect.getsource(RTCDtlsTransport)
    for needle in ("self._tx_srtp", "self.__tx_bytes", "self.__tx_packets"):
        if needle not in dtls_src:
            problems.append(f"missing: RTCDtlsTransport {needle}")
    if "self._connection" not in inspect.getsource(RTCIceTransport.__init__):
        problems.append("missing: RTCIceTransport._connection")
    stun_protocol = inspect.getsource(aioice.ice.StunProtocol.datagram_received)
    if "self.receiver.data_received(data, self.local_candidate.component)" not in stun_protocol:
        problems.append("missing: aioice StunProtocol hands non-STUN data to its receiver")
    if "self._transport_policy" not in inspect.getsource(aioice.Connection.__init__):
        problems.append("missing: aioice Connection._transport_policy")
    if "self._protocols" not in inspect.getsource(aioice.Connection.__init__):
        problems.append("missing: aioice Connection._protocols")
    if "active_pair = self._nominated.get(component)" not in inspect.getsource(
        aioice.Connection.sendto
    ):
        problems.append("missing: aioice Connection._nominated")
    if "self.__encoder.pack(data)" not in inspect.getsource(RTCRtpSender._next_encoded_frame):
        problems.append("missing: RTCRtpSender packs non-frame data with its encoder")
    if not hasattr(RTCRtpReceiver, "_send_rtcp_pli"):
        problems.append("missing: RTCRtpReceiver._send_rtcp_pli")
    if "_RTCPeerConnection__iceTransports" not in _private_names(RTCPeerConnection):
        problems.append("missing: RTCPeerConnection.__iceTransports")
    _check_receive_internals(handle_src, dtls_src, problems)
    problems += ice_restart_internals_problems()
    if problems:
        raise AiortcInternalsChanged(
            "the media relay relies on aiortc internals that changed:\n  " + "\n  ".join(problems)
        )


def _check_receive_internals(handle_src: str, dtls_src: str, problems: list[str]) -> None:
    """What `_LeanReceive` does in place of RTCRtpReceiver._handle_rtp_packet, and what
    `_RtpIntake` does in place of the DTLS transport's receive task."""
    for needle in (
        "self.__remote_bitrate_estimator.add(",
        "self.__active_ssrc[packet.ssrc] = clock.current_datetime()",
        "codec = self.__codecs.get(packet.payload_type)",
        "self.__remote_streams[packet.ssrc].add(packet)",
        "original_ssrc = self.__rtx_ssrc.get(packet.ssrc)",
        "self.__nack_generator.add(packet)",
        "await self._send_rtcp_nack(",
        "await self._send_rtcp_pli(packet.ssrc)",
        "fmt=RTCP_PSFB_APP",
        "if not self._enabled:",
    ):
        if needle not in handle_src:
            problems.append(f"missing in RTCRtpReceiver._handle_rtp_packet: {needle}")
    for needle in (
        "self._rx_srtp.unprotect(data)",
        "self.__rx_bytes += len(data)",
        "self.__rx_packets += 1",
        "receiver = self._rtp_router.route_rtp(packet)",
        "RtpPacket.parse(data, self._rtp_header_extensions_map)",
    ):
        if needle not in dtls_src:
            problems.append(f"missing in RTCDtlsTransport: {needle}")
    if "self.__dtlsTransports" not in inspect.getsource(RTCPeerConnection.__init__):
        problems.append("missing: RTCPeerConnection.__dtlsTransports")
    for name in ("_srtp", "_cdata", "_buffer"):
        if f"self.{name}" not in inspect.getsource(pylibsrtp.Session.__init__):
            problems.append(f"missing: pylibsrtp Session.{name}")
    if not hasattr(_SRTP.lib, "srtp_unprotect"):
        problems.append("missing: libsrtp srtp_unprotect in pylibsrtp's binding")
    for cls in (StreamStatistics, NackGenerator):
        if "packet.sequence_number" not in inspect.getsource(cls.add):
            problems.append(f"missing: {cls.__name__}.add reads the sequence number")
    statistics = inspect.getsource(StreamStatistics)
    for needle in (
        "self._clockrate = clockrate",
        "self.base_seq",
        "def packets_lost",
        "def jitter",
    ):
        if needle not in statistics:
            problems.append(f"missing: StreamStatistics {needle}")


def _private_names(cls: type) -> set[str]:
    source = inspect.getsource(cls)
    return {f"_{cls.__name__}__{n}" for n in ("iceTransports",) if f"self.__{n}" in source}


# --- receiving encoded frames -------------------------------------------------------------


@dataclass(frozen=True)
class EncodedFrame:
    """One re-assembled frame as it arrived: VP8 (without RTP payload descriptors) or Opus."""

    data: bytes
    # RTP timestamp of the frame, unwrapped to keep increasing past 2**32.
    timestamp: int
    keyframe: bool


FrameSink = Callable[[EncodedFrame], None]


class _NoDecoding:
    """Stands in for the receiver's decoder queue: the decoder thread reads `None` at once and
    exits, and encoded frames put here are dropped (they already went to the relay)."""

    def get(self) -> None:
        return None

    def put(self, _: object) -> None:
        pass


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
# before the relay's intake is up) or the intake's _Received; both read alike.
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


def tap_receiver(receiver: RTCRtpReceiver, kind: str, on_frame: FrameSink) -> FrameAssembler:
    """Turns a receiver into a source of encoded frames. Call it from the peer connection's
    `track` event, before the receiver starts (aiortc starts it once DTLS is up). Its RTP is
    then handled by `_LeanReceive` straight from the socket (see `demux_media_first`)."""
    assembler = FrameAssembler(kind, on_frame)
    anyreceiver: Any = receiver
    anyreceiver._RTCRtpReceiver__jitter_buffer = assembler
    anyreceiver._RTCRtpReceiver__decoder_queue = _NoDecoding()
    estimator = anyreceiver._RTCRtpReceiver__remote_bitrate_estimator
    throttled = None
    if estimator is not None:  # video only
        throttled = _ThrottledEstimator(estimator)
        anyreceiver._RTCRtpReceiver__remote_bitrate_estimator = throttled
    anyreceiver._telemed_rx = _LeanReceive(receiver, assembler, throttled)
    return assembler


class _Received:
    """One received RTP packet, with only what forwarding needs; the frame assembler, aiortc's
    RTP router, receiver statistics and NACK generator read these attributes."""

    __slots__ = ("marker", "payload", "payload_type", "sequence_number", "ssrc", "timestamp")

    def __init__(
        self,
        sequence_number: int,
        timestamp: int,
        marker: int,
        ssrc: int,
        payload_type: int,
        payload: bytes,
    ) -> None:
        self.sequence_number = sequence_number
        self.timestamp = timestamp
        self.marker = marker
        self.ssrc = ssrc
        self.payload_type = payload_type
        # The payload, replaced by the codec data (VP8 descriptor stripped) before assembly.
        self.payload = payload

    @property
    def _data(self) -> bytes:
        return self.payload


def _vp8_data(payload: bytes) -> bytes:
    """The frame data after the VP8 payload descriptor (RFC 7741 section 4.2)."""
    pos = 1
    if payload[0] & 0x80:
        ext = payload[1]
        pos = 2
        if ext & 0x80:  # picture id, 7 or 15 bits
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:  # TL0PICIDX
            pos += 1
        if ext & 0x30:  # TID / KEYIDX
            pos += 1
    if pos > len(payload):
        raise ValueError("VP8 payload descriptor is truncated")
    return payload[pos:]


# Active sources are kept with a timestamp (getSynchronizationSources); refreshed this often
# rather than reading a datetime per packet.
_ACTIVE_REFRESH_MS = 500


class _ReportedStream(StreamStatistics):
    """An Opus stream's statistics whose receiver reports tell the publisher at least the
    loss its subscribers see downstream (`report_downstream_loss`): aiortc builds each report
    block's fraction lost from this property."""

    def __init__(self, clockrate: int, lean: _LeanReceive) -> None:
        super().__init__(clockrate)
        self._lean = lean

    @property
    def fraction_lost(self) -> int:
        own: int = super().fraction_lost  # also moves the interval on, as aiortc expects
        return max(own, self._lean.downstream_loss_256)


class _LeanReceive:
    """What RTCRtpReceiver._handle_rtp_packet does for a tapped receiver, synchronously, in the
    socket's callback: the bandwidth estimator (REMB), active sources, receiver statistics (for
    RTCP receiver reports and getStats), RTX unwrapping, NACKs for missing packets, VP8
    depayloading and the frame assembler (keyframe requests). The rare RTCP it sends (NACK,
    PLI, REMB) goes out in a task, as aiortc's does."""

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        assembler: FrameAssembler,
        estimator: _ThrottledEstimator | None,
    ) -> None:
        anyreceiver: Any = receiver
        self._receiver = anyreceiver
        self._assembler = assembler
        self.estimator = estimator
        # Filled by aiortc when the receiver starts; the same objects it reads.
        self._codecs: dict[int, RTCRtpCodecParameters] = anyreceiver._RTCRtpReceiver__codecs
        self._rtx_ssrc: dict[int, int] = anyreceiver._RTCRtpReceiver__rtx_ssrc
        self._streams: dict[int, StreamStatistics] = anyreceiver._RTCRtpReceiver__remote_streams
        self._active: dict[int, Any] = anyreceiver._RTCRtpReceiver__active_ssrc
        self._nack: NackGenerator | None = anyreceiver._RTCRtpReceiver__nack_generator
        self._active_ms = 0
        self._active_at: Any = None
        self._tasks: set[asyncio.Future[None]] = set()
        # Counted where each happens, for the per-hop figures (`intake_figures`).
        self.packets_retransmitted = 0  # arrived over RTX
        # Of those, counted as received on their media stream too (its receiver reports).
        self.packets_repaired = 0
        self.nacks_sent = 0  # NACK packets sent to the publisher
        self.plis_sent = 0  # keyframe requests (PLI) sent to the publisher, for any reason
        self.fec_packets = 0  # Opus packets carrying in-band FEC (media/opus.py)
        # The subscribers' loss the receiver reports pass on (Opus only), in 1/256ths.
        self.downstream_loss_256 = 0

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def handle(
        self, packet: _Received, abs_send_time: int | None, padding: int, arrival_ms: int
    ) -> None:
        receiver = self._receiver
        if not receiver._enabled:
            return
        ssrc = packet.ssrc
        if self.estimator is not None and abs_send_time is not None:
            remb = self.estimator.add(
                arrival_ms, abs_send_time, len(packet.payload) + padding, ssrc
            )
            rtcp_ssrc = receiver._RTCRtpReceiver__rtcp_ssrc
            if remb is not None and rtcp_ssrc is not None:
                self._spawn(
                    receiver._send_rtcp(
                        RtcpPsfbPacket(
                            fmt=RTCP_PSFB_APP,
                            ssrc=rtcp_ssrc,
                            media_ssrc=0,
                            fci=pack_remb_fci(*remb),
                        )
                    )
                )
        if arrival_ms - self._active_ms >= _ACTIVE_REFRESH_MS:
            self._active_ms = arrival_ms
            self._active_at = aiortc_clock.current_datetime()
        self._active[ssrc] = self._active_at
        codec = self._codecs.get(packet.payload_type)
        if codec is None:
            return
        stats = self._streams.get(ssrc)
        if stats is None:
            stats = self._streams[ssrc] = (
                _ReportedStream(codec.clockRate, self)
                if codec.name == "opus"
                else StreamStatistics(codec.clockRate)
            )
        stats.add(packet)  # type: ignore[arg-type]
        name = codec.name
        if name == "rtx":
            original = self._rtx_ssrc.get(ssrc)
            apt = codec.parameters.get("apt")
            payload = packet.payload
            if original is None or len(payload) < 2 or not isinstance(apt, int):
                return
            codec = self._codecs.get(apt)
            if codec is None:
                return
            name = codec.name
            packet.sequence_number = (payload[0] << 8) | payload[1]
            packet.payload = payload[2:]
            packet.ssrc = ssrc = original
            packet.payload_type = apt
            self.packets_retransmitted += 1
            # A repaired packet counts as received on its own stream, as a browser counts
            # it: the receiver reports then say what stayed lost, and a publisher's loss-based
            # rate control does not take random loss that NACK repairs for congestion.
            repaired = self._streams.get(original)
            if repaired is not None:
                repaired.add(packet)  # type: ignore[arg-type]
                self.packets_repaired += 1
        nack = self._nack
        if nack is not None and nack.add(packet):  # type: ignore[arg-type]
            # aiortc keeps what the assembler has given up on among the missing, to be asked
            # for again with every new loss: only what is still waited for is asked.
            nack.missing = {s for s in nack.missing if self._assembler.wanted(s)}
            self.nacks_sent += 1
            self._spawn(receiver._send_rtcp_nack(ssrc, sorted(nack.missing)))
        if name == "VP8" and packet.payload:
            try:
                packet.payload = _vp8_data(packet.payload)
            except (ValueError, IndexError):
                return
        elif name == "opus" and has_fec(packet.payload):
            self.fec_packets += 1
        assembler = self._assembler
        request_keyframe, _ = assembler.add(packet)
        if nack is not None and assembler.holding:
            again = assembler.nack_again()
            if again:
                self.nacks_sent += 1
                self._spawn(receiver._send_rtcp_nack(ssrc, again))
        if request_keyframe:
            self.plis_sent += 1
            self._spawn(receiver._send_rtcp_pli(ssrc))


class _ThrottledEstimator:
    """aiortc's receive-side bandwidth estimator, fed once per group of packets sent together
    (a video frame) instead of once per packet, and with its REMB reports at most every
    REMB_INTERVAL_MS. The estimator works on such groups anyway (packets sent within 5 ms:
    their total size, the last one's send and arrival times), so feeding it the group gives
    it the same inputs for a quarter of the Python work. Unthrottled, it reports on every
    packet while it detects overuse (on a busy machine, arrival jitter alone makes that
    happen), each report an RTCP packet to build, protect and send; libwebrtc also spaces
    them (200 ms)."""

    REMB_INTERVAL_MS = 200
    # abs-send-time is in 2**-18 s, 24 bits; aiortc's group length is 5 ms.
    GROUP_UNITS = (5 << 18) // 1000

    def __init__(self, estimator: Any) -> None:
        self._estimator = estimator
        self._last_ms: int | None = None
        # The newest estimate sent to the publisher (REMB), bits per second.
        self.last_bps: int | None = None
        # The group being gathered: first and last send time, last arrival, size, SSRC.
        self._group: list[int] | None = None

    def add(
        self, arrival_time_ms: int, abs_send_time: int, payload_size: int, ssrc: int
    ) -> tuple[int, list[int]] | None:
        group = self._group
        if group is not None and (abs_send_time - group[0]) & 0xFFFFFF < self.GROUP_UNITS:
            group[1] = abs_send_time
            group[2] = arrival_time_ms
            group[3] += payload_size
            group[4] = ssrc
            return None
        self._group = [abs_send_time, abs_send_time, arrival_time_ms, payload_size, ssrc]
        if group is None:
            return None
        remb: tuple[int, list[int]] | None = self._estimator.add(
            arrival_time_ms=group[2], abs_send_time=group[1], payload_size=group[3], ssrc=group[4]
        )
        if remb is None:
            return None
        if self._last_ms is not None and arrival_time_ms - self._last_ms < self.REMB_INTERVAL_MS:
            return None
        self._last_ms = arrival_time_ms
        self.last_bps = remb[0]
        return remb


def uplink_estimate_bps(receiver: RTCRtpReceiver) -> int | None:
    """What the relay last told the publisher of this (video) track its uplink carries (the
    REMB it sends), or None before it has told it anything."""
    lean: _LeanReceive | None = getattr(receiver, "_telemed_rx", None)
    if lean is None or lean.estimator is None:
        return None
    return lean.estimator.last_bps


def report_downstream_loss(receiver: RTCRtpReceiver, fraction: float) -> None:
    """From now on the receiver reports to the publisher of this (audio) track say at least
    `fraction` (0..1) lost: what its subscribers lose downstream (media/opus.py)."""
    lean: _LeanReceive | None = getattr(receiver, "_telemed_rx", None)
    if lean is None:
        return
    lean.downstream_loss_256 = min(255, int(fraction * 256))
    for ssrc, stream in lean._streams.items():
        if not isinstance(stream, _ReportedStream) and ssrc not in lean._rtx_ssrc:
            # Its first packets came before the relay's intake was up, through aiortc's own
            # receive path, which made a plain StreamStatistics: it becomes a reported one,
            # counts and all.
            stream.__class__ = _ReportedStream
            stream._lean = lean  # type: ignore[attr-defined]


def media_ssrcs(receiver: RTCRtpReceiver) -> list[int]:
    """The SSRCs of the media (not retransmission) streams the receiver has heard recently."""
    rtx: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
    return [s.source for s in receiver.getSynchronizationSources() if s.source not in rtx]


async def request_keyframe(receiver: RTCRtpReceiver) -> None:
    lean: _LeanReceive | None = getattr(receiver, "_telemed_rx", None)
    for ssrc in media_ssrcs(receiver):
        if lean is not None:
            lean.plis_sent += 1
        await receiver._send_rtcp_pli(ssrc)


@dataclass(frozen=True)
class IntakeFigures:
    """What the relay received of one published track: the publisher's hop.

    From sequence numbers: `packets_expected` (from the first to the highest),
    `packets_received` (distinct packets that came in time to be used), `packets_lost` on the
    link (not received on the media stream, before any repair; the relay's receiver reports
    tell the publisher the loss after repair, as a browser's do), `packets_given_up` (never came in
    time, repair included: what every subscriber and the recording miss), `packets_late`
    (came after their slot had passed, or twice) and `packets_retransmitted` (arrived over
    RTX). Video: `frames_given_up` (could not be completed) and `frames_skipped` (dropped
    while waiting for the keyframe that follows). `nacks_sent` and `plis_sent` went to the
    publisher; `fec_packets` counts Opus packets with in-band FEC. `jitter_s` is the
    interarrival jitter (RFC 3550)."""

    packets_expected: int
    packets_received: int
    packets_lost: int
    packets_given_up: int
    packets_late: int
    packets_retransmitted: int
    frames_given_up: int
    frames_skipped: int
    nacks_sent: int
    plis_sent: int
    fec_packets: int
    jitter_s: float


def intake_figures(receiver: RTCRtpReceiver) -> IntakeFigures | None:
    """The figures of a receiver tapped by `tap_receiver` (None for any other); read once a
    second or per scrape, never per packet."""
    lean: _LeanReceive | None = getattr(receiver, "_telemed_rx", None)
    if lean is None:
        return None
    assembler = lean._assembler
    lost = 0
    jitter_s = 0.0
    for ssrc, stream in list(lean._streams.items()):
        if ssrc in lean._rtx_ssrc or stream.base_seq is None:
            continue
        lost += stream.packets_lost
        jitter_s = max(jitter_s, stream.jitter / stream._clockrate)
    return IntakeFigures(
        packets_expected=assembler.packets_expected,
        packets_received=assembler.packets_received,
        # The streams count repaired packets as received: add them back for the link's loss.
        packets_lost=lost + lean.packets_repaired,
        packets_given_up=assembler.packets_lost,
        packets_late=assembler.packets_late,
        packets_retransmitted=lean.packets_retransmitted,
        frames_given_up=assembler.frames_given_up,
        frames_skipped=assembler.frames_skipped,
        nacks_sent=lean.nacks_sent,
        plis_sent=lean.plis_sent,
        fec_packets=lean.fec_packets,
        jitter_s=jitter_s,
    )


# --- sending pre-encoded frames -----------------------------------------------------------


@dataclass(frozen=True)
class PackedFrame:
    """A frame already split into RTP payloads, shared by every sender that forwards it."""

    payloads: list[bytes]
    # In the codec's clock (90 kHz video, 48 kHz Opus), relative to the publication's start.
    timestamp: int
    # Encoded bytes (without RTP payload descriptors), for bitrate figures.
    size: int
    # Bytes of all payloads (with descriptors), for the RTCP sender report's octet count.
    payload_bytes: int
    # Several payloads, all but the last of one size and the last no larger: the packets can
    # go out in one segmented send.
    uniform: bool


# A frame the sender could not send now (not connected yet, or the socket's queue is full):
# the caller drops it (and video resumes at a keyframe).
FrameSend = Callable[[PackedFrame], bool]

# More unsent bytes than this queued at a subscriber's socket (asyncio buffers what the kernel
# does not take at once): frames for it are dropped instead of queued without bound.
MAX_UNSENT_BYTES = 256 * 1024
# Retransmissions (NACK) towards one subscriber, bounded. On a link that drops what it cannot
# carry, the subscriber asks again for every packet the queue dropped, and again when the
# retransmission is dropped too; answered without a bound, the repairs kept a 400 kbit/s
# link's queue full for ten seconds after its picture had stepped down (1,600 packets resent
# in 8 s). So: at most RETRANSMIT_SHARE of the bytes sent (the budget may gather up to
# RETRANSMIT_BURST), never a packet older than a live picture can still use, and one packet
# at most once per RETRANSMIT_SPACING_S. Random loss of 10 % needs about a tenth.
RETRANSMIT_SHARE = 0.25
RETRANSMIT_BURST = 48 * 1024
RETRANSMIT_MAX_AGE_S = 1.0
RETRANSMIT_SPACING_S = 0.05
_NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900 to 1970
_RTP_HEAD = struct.Struct("!BH")  # second byte (marker, payload type), sequence number
_RTP_TIMESTAMP = struct.Struct("!I")
# pylibsrtp's cffi binding (ffi, lib), which its module imports but does not export.
_SRTP: Any = pylibsrtp
_SOL_UDP = 17
_UDP_SEGMENT = 103  # linux/udp.h
_SEGMENT_SIZE = struct.Struct("=H")


class _PassThroughEncoder:
    """Stands in for the sender's encoder: the relay has packed the frame already; REMB
    feedback, which aiortc would hand to an encoder, goes to the relay."""

    def __init__(self, on_remb: Callable[[int], None]) -> None:
        self._on_remb = on_remb
        self._target_bitrate = 0

    def pack(self, frame: PackedFrame) -> tuple[list[bytes], int]:
        return frame.payloads, frame.timestamp

    @property
    def target_bitrate(self) -> int:
        return self._target_bitrate

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self._target_bitrate = bitrate
        self._on_remb(bitrate)


class _Route:
    """The UDP socket and address of a sender's ICE pair, and its SRTP session. Sends on a
    duplicate of the ICE socket's descriptor, so that a frame's packets can go in one system
    call: with UDP segmentation offload (Linux 4.18+), when all but the last have one size,
    as a frame's VP8 packets do; otherwise one sendto per packet."""

    def __init__(self, pair: Any, session: Any) -> None:
        self.pair = pair
        self.session = session
        self.address: tuple[str, int] = pair.remote_addr
        self._transport = pair.protocol.transport
        sock = self._transport.get_extra_info("socket")
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        self._sock.setblocking(False)
        self._segmentation = True
        # pylibsrtp's Session.protect, without its per-call allocation and checks.
        self._srtp = session._srtp[0]
        self._cdata = session._cdata
        self._buffer = session._buffer
        self._length = _SRTP.ffi.new("int *")
        self._limit = len(self._cdata) - pylibsrtp.SRTP_MAX_TRAILER_LEN

    def protect(self, plain: bytes) -> bytes:
        size = len(plain)
        if size > self._limit:
            raise ValueError("packet is too long")
        self._length[0] = size
        self._buffer[0:size] = plain
        if _SRTP.lib.srtp_protect(self._srtp, self._cdata, self._length) != 0:
            raise ValueError("SRTP protection failed")
        protected: bytes = self._buffer[0 : self._length[0]]
        return protected

    def backed_up(self) -> bool:
        """aiortc's own sends (RTCP) wait in asyncio's buffer: the socket is full."""
        return bool(self._transport.get_write_buffer_size() > MAX_UNSENT_BYTES)

    def send(self, packets: list[bytes], uniform: bool) -> bool:
        """False if the socket would block (the frame is dropped)."""
        try:
            if uniform and self._segmentation:
                segment = _SEGMENT_SIZE.pack(len(packets[0]))
                try:
                    self._sock.sendmsg(
                        packets, [(_SOL_UDP, _UDP_SEGMENT, segment)], 0, self.address
                    )
                    return True
                except BlockingIOError:
                    raise
                except OSError:
                    self._segmentation = False  # not offered by this kernel or route
            for packet in packets:
                self._sock.sendto(packet, self.address)
        except OSError:  # BlockingIOError included: the socket is full
            return False
        return True

    def close(self) -> None:
        self._sock.close()


class _FrameSender:
    """Sends the frames the relay pushes for one sender, at once, in the caller's turn of the
    event loop: what aiortc's sending task does per packet (an RtpPacket object, header
    extensions packed from scratch, a chain of coroutines down to the socket, two clock reads
    through datetime) is done here with one RTP header per sender, patched in place. The
    sender's RTCP reports, statistics and retransmissions (NACK, over RTX) keep working."""

    def __init__(self, sender: RTCRtpSender, codec: RTCRtpCodecParameters) -> None:
        anysender: Any = sender
        self._sender = anysender
        if codec.payloadType is None:
            raise ValueError(f"{codec.mimeType} has no payload type")
        self._payload_type: int = codec.payloadType
        self._seq = random_sequence_number()
        self._timestamp_origin = random32()
        self._rtx_seq = random_sequence_number()
        self._ext_map: HeaderExtensionsMap = anysender._RTCRtpSender__rtp_header_extensions_map
        # The unprotected packets last sent, by sequence number modulo the history size.
        self._history: list[bytes | None] = [None] * RTP_HISTORY_SIZE
        # When each packet of the history was sent, and last sent again (monotonic clock).
        self._sent_at = [0.0] * RTP_HISTORY_SIZE
        self._resent_at = [float("-inf")] * RTP_HISTORY_SIZE
        self._retransmit_budget = 0.0  # bytes
        self.retransmissions_refused = 0
        self._header, self._abs_send_time_at = self._template(sender._ssrc)
        self._current: _Route | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self._current is not None:
            self._current.close()
            self._current = None

    def _template(self, ssrc: int) -> tuple[bytearray, int | None]:
        """The RTP header with the extensions aiortc sends (mid, abs-send-time), one-byte form
        (RFC 8285); where the 3 bytes of abs-send-time go."""
        anymap: Any = self._ext_map
        ids = anymap._HeaderExtensionsMap__ids
        mid: str | None = self._sender._RTCRtpSender__mid
        if max(ids.mid or 0, ids.abs_send_time or 0) > 14 or len(mid or "") > 16:
            # The relay offers these ids and mids itself; aiortc's are 1-3 and short.
            raise ValueError(f"extension ids or mid {mid!r} too large for one-byte headers")
        elements = b""
        if ids.mid and mid:
            encoded = mid.encode()
            elements += bytes([(ids.mid << 4) | (len(encoded) - 1)]) + encoded
        at = None
        if ids.abs_send_time:
            at = 12 + 4 + len(elements) + 1
            elements += bytes([(ids.abs_send_time << 4) | 2]) + b"\0\0\0"
        elements += b"\0" * (-len(elements) % 4)
        first = 0x90 if elements else 0x80  # version 2, extension bit
        header = struct.pack("!BBHII", first, self._payload_type, 0, 0, ssrc)
        if elements:
            header += struct.pack("!HH", 0xBEDE, len(elements) // 4) + elements
        return bytearray(header), at

    def _route(self, dtls: Any) -> _Route | None:
        """Where this sender's packets go now (None while not connected); rebuilt when the
        ICE pair or the SRTP session changes."""
        if dtls._state is not DtlsState.CONNECTED:
            return None
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None or pair.protocol.transport is None:
            return None
        route = self._current
        if route is not None and route.pair is pair and route.session is dtls._tx_srtp:
            return route
        if route is not None:
            route.close()
        self._current = route = _Route(pair, dtls._tx_srtp)
        return route

    def send(self, frame: PackedFrame) -> bool:
        if self.closed:
            return False
        sender = self._sender
        dtls = sender.transport
        route = self._route(dtls)
        if route is None or route.backed_up():
            return False
        protect = route.protect
        header = self._header
        ntp = int((time.time() + _NTP_UNIX_OFFSET) * (1 << 32))
        if self._abs_send_time_at is not None:
            at = self._abs_send_time_at
            header[at : at + 3] = ((ntp >> 14) & 0xFFFFFF).to_bytes(3, "big")
        timestamp = (self._timestamp_origin + frame.timestamp) & 0xFFFFFFFF
        _RTP_TIMESTAMP.pack_into(header, 4, timestamp)
        payload_type = self._payload_type
        history = self._history
        seq = self._seq
        payloads = frame.payloads
        count = len(payloads)
        marked = count - 1
        packets = []
        sent_at = self._sent_at
        now = time.monotonic()
        self._retransmit_budget = min(
            RETRANSMIT_BURST, self._retransmit_budget + RETRANSMIT_SHARE * frame.payload_bytes
        )
        for i, payload in enumerate(payloads):
            _RTP_HEAD.pack_into(
                header, 1, payload_type | 0x80 if i == marked else payload_type, seq
            )
            plain = b"".join((header, payload))
            history[seq % RTP_HISTORY_SIZE] = plain
            sent_at[seq % RTP_HISTORY_SIZE] = now
            packets.append(protect(plain))
            seq = (seq + 1) & 0xFFFF
        self._seq = seq
        # What RTCP sender reports and getStats() read. Counted even if the socket refuses the
        # frame below: those sequence numbers are gone, and the subscriber may ask for them.
        sender._RTCRtpSender__ntp_timestamp = ntp
        sender._RTCRtpSender__rtp_timestamp = timestamp
        sender._RTCRtpSender__octet_count += frame.payload_bytes
        sender._RTCRtpSender__packet_count += count
        if not route.send(packets, frame.uniform):
            return False
        dtls._RTCDtlsTransport__tx_bytes += frame.payload_bytes + count * (
            len(packets[0]) - len(payloads[0])
        )
        dtls._RTCDtlsTransport__tx_packets += count
        return True

    async def retransmit(self, sequence_number: int) -> bool:
        """A packet the subscriber reported lost (NACK), again, over RTX when negotiated,
        within the bounds above. False if it is no longer in the history, or refused."""
        slot = sequence_number % RTP_HISTORY_SIZE
        plain = self._history[slot]
        if plain is None or self.closed:
            return False
        now = time.monotonic()
        if (
            now - self._sent_at[slot] > RETRANSMIT_MAX_AGE_S
            or now - self._resent_at[slot] < RETRANSMIT_SPACING_S
            or self._retransmit_budget < len(plain)
        ):
            self.retransmissions_refused += 1
            return False
        packet = RtpPacket.parse(plain, self._ext_map)
        if packet.sequence_number != sequence_number:
            return False
        self._retransmit_budget -= len(plain)
        self._resent_at[slot] = now
        sender = self._sender
        rtx_payload_type: int | None = sender._RTCRtpSender__rtx_payload_type
        if rtx_payload_type is not None:
            packet = wrap_rtx(packet, rtx_payload_type, self._rtx_seq, sender._rtx_ssrc)
            self._rtx_seq = (self._rtx_seq + 1) & 0xFFFF
        with contextlib.suppress(ConnectionError):
            await sender.transport._send_rtp(packet.serialize(self._ext_map))
        return True


@dataclass(frozen=True)
class ReceiverReport:
    """What one receiver report of the subscriber says about a stream the relay sends it."""

    fraction_lost: float  # 0..1, since its previous report
    rtt_s: float | None  # from the sender report it answers; None if that is unknown


class _ReportTap:
    """Round-trip times from a sender's receiver reports, one per report and unsmoothed. aiortc
    keeps a smoothed figure (each report moves it 15 % of the way) and counts only reports
    that answer its newest sender report, so a queue filling on the subscriber's path showed
    seconds late, or not at all once the queue outlasted the report interval."""

    KEEP = 8  # sender reports remembered, by their LSR (RFC 3550 6.4.1)

    def __init__(self, ssrc: int) -> None:
        self._ssrc = ssrc
        # When each recent sender report left (wall clock, as aiortc's); None when two carried
        # the same LSR (a paused track's reports repeat it) and a report cannot tell which.
        self._sent: dict[int, float | None] = {}

    def sent(self, packets: Iterable[AnyRtcpPacket]) -> None:
        for packet in packets:
            if isinstance(packet, RtcpSrPacket):
                lsr = (packet.sender_info.ntp_timestamp >> 16) & 0xFFFFFFFF
                self._sent[lsr] = None if lsr in self._sent else time.time()
                while len(self._sent) > self.KEEP:
                    del self._sent[next(iter(self._sent))]

    def received(self, packet: AnyRtcpPacket) -> list[ReceiverReport]:
        if not isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            return []
        reports = []
        for block in packet.reports:
            if block.ssrc != self._ssrc:
                continue
            rtt = None
            left = self._sent.get(block.lsr) if block.lsr else None
            if left is not None:
                rtt = time.time() - left - block.dlsr / 65536
                if rtt < 0:
                    rtt = None  # clocks of a paused track's repeated reports
            reports.append(ReceiverReport(block.fraction_lost / 256, rtt))
        return reports


@dataclass
class _Forwarding:
    """What prepare_forwarding_sender set for a sender; the newest call wins. The counts
    last as long as the sender, whichever track it carries."""

    on_start: Callable[[FrameSend], None]
    on_keyframe_request: Callable[[], None]
    on_report: Callable[[ReceiverReport], None]
    frame_sender: _FrameSender | None = None
    keyframe_requests: int = 0  # PLI/FIR from the subscriber
    retransmitted: int = 0  # packets sent again on the subscriber's NACK

    def keyframe_requested(self) -> None:
        self.keyframe_requests += 1
        self.on_keyframe_request()


def prepare_forwarding_sender(
    sender: RTCRtpSender,
    on_keyframe_request: Callable[[], None],
    on_remb: Callable[[int], None],
    on_start: Callable[[FrameSend], None],
    on_report: Callable[[ReceiverReport], None],
) -> None:
    """The sender forwards `PackedFrame`s that the relay pushes: once the sender starts (the
    connection is up), `on_start` gets the function to push them to, which sends at once and
    returns False for a frame it could not send. The subscriber's PLI/FIR, REMB and receiver
    reports reach the callbacks. Calling this again on a running sender only changes the
    callbacks."""
    anysender: Any = sender
    anysender._RTCRtpSender__encoder = _PassThroughEncoder(on_remb)
    forwarding: _Forwarding | None = getattr(sender, "_telemed_forwarding", None)
    if forwarding is not None:
        forwarding.on_start = on_start
        forwarding.on_keyframe_request = on_keyframe_request
        forwarding.on_report = on_report
        return
    forwarding = _Forwarding(on_start, on_keyframe_request, on_report)
    anysender._telemed_forwarding = forwarding
    anysender._send_keyframe = forwarding.keyframe_requested
    tap = _ReportTap(sender._ssrc)
    send_rtcp = sender._send_rtcp
    handle_rtcp = sender._handle_rtcp_packet

    async def send_rtcp_noted(packets: list[AnyRtcpPacket]) -> None:
        tap.sent(packets)
        await send_rtcp(packets)

    async def handle_rtcp_noted(packet: AnyRtcpPacket) -> None:
        for report in tap.received(packet):
            forwarding.on_report(report)
        await handle_rtcp(packet)

    anysender._send_rtcp = send_rtcp_noted
    anysender._handle_rtcp_packet = handle_rtcp_noted

    # Replaces, for this sender only, the task aiortc runs to pull frames from the track and
    # send them packet by packet: the relay pushes frames instead.
    async def run_rtp(codec: RTCRtpCodecParameters) -> None:
        frame_sender = _FrameSender(sender, codec)
        forwarding.frame_sender = frame_sender

        async def retransmit(sequence_number: int) -> None:
            if await frame_sender.retransmit(sequence_number):
                forwarding.retransmitted += 1

        anysender._retransmit = retransmit
        anysender._RTCRtpSender__rtp_started.set()
        try:
            forwarding.on_start(frame_sender.send)
            await asyncio.Future()  # until the sender stops (cancelled)
        except asyncio.CancelledError:
            pass
        finally:
            frame_sender.close()
            track = sender.track
            if track is not None:
                track.stop()
            anysender._RTCRtpSender__encoder = None
            anysender._RTCRtpSender__rtp_exited.set()

    anysender._run_rtp = run_rtp


@dataclass(frozen=True)
class SubscriberFigures:
    """What one subscriber got of one forwarded track: its own hop. From the subscriber's
    latest RTCP receiver report (None until one came): `fraction_lost` (0..1, since its
    report before), `packets_lost` (cumulative), `jitter_s`, and `rtt_s` (from the report's
    echo of the relay's sender report). Counted by the relay: `packets_sent`,
    `retransmitted` (on its NACKs) and `keyframe_requests` (its PLI/FIR)."""

    packets_sent: int
    retransmitted: int
    keyframe_requests: int
    fraction_lost: float | None
    packets_lost: int | None
    jitter_s: float | None
    rtt_s: float | None


def subscriber_figures(sender: RTCRtpSender, clock_rate: int) -> SubscriberFigures:
    """The figures of a sender set up by `prepare_forwarding_sender`; read synchronously from
    what aiortc keeps of the last receiver report (its getStats() reads the same)."""
    anysender: Any = sender
    forwarding: _Forwarding | None = getattr(sender, "_telemed_forwarding", None)
    report: Any = anysender._RTCRtpSender__stats.get(f"remote-inbound-rtp_{id(sender)}")
    return SubscriberFigures(
        packets_sent=anysender._RTCRtpSender__packet_count,
        retransmitted=forwarding.retransmitted if forwarding else 0,
        keyframe_requests=forwarding.keyframe_requests if forwarding else 0,
        # aiortc keeps the report's 8-bit fixed-point fraction (RFC 3550 section 6.4.1).
        fraction_lost=None if report is None else report.fractionLost / 256,
        packets_lost=None if report is None else report.packetsLost,
        jitter_s=None if report is None else report.jitter / clock_rate,
        rtt_s=None if report is None else report.roundTripTime,
    )


# --- ICE host addresses -------------------------------------------------------------------


def offer_host_addresses(pc: RTCPeerConnection, addresses: Iterable[str]) -> None:
    """Makes every ICE gatherer of `pc` offer exactly these host addresses (aioice leaves out
    loopback and offers every interface otherwise). Call before each setLocalDescription."""
    wanted = list(addresses)
    transports: Iterable[Any] = pc._RTCPeerConnection__iceTransports  # type: ignore[attr-defined]
    for transport in transports:
        connection = transport.iceGatherer._connection
        if getattr(connection, "_telemed_addresses", None) == wanted:
            continue
        connection._telemed_addresses = wanted
        connection.gather_candidates = _gather_from(connection, wanted)


def demux_media_first(pc: RTCPeerConnection) -> None:
    """Each UDP socket of `pc`'s ICE hands RTP/RTCP datagrams (first byte 128-191, RFC 7983)
    straight to the connection: aioice first tries to parse every datagram as STUN, and a
    media packet fails that parse by an exception. Once DTLS is up, RTP is handled right in
    the socket's callback (`_RtpIntake`): no queue and task wake-up per datagram between aioice
    and the DTLS transport. Call after each setLocalDescription."""
    transports: Iterable[Any] = pc._RTCPeerConnection__dtlsTransports  # type: ignore[attr-defined]
    for dtls in transports:
        connection = dtls.transport._connection
        intake = getattr(dtls, "_telemed_intake", None)
        if intake is None:
            intake = dtls._telemed_intake = _RtpIntake(dtls)
        for protocol in connection._protocols:
            if getattr(protocol, "_telemed_demux", False):
                continue
            protocol._telemed_demux = True
            protocol.datagram_received = _media_first(protocol, intake)


def _media_first(protocol: Any, intake: _RtpIntake) -> Callable[[bytes, tuple[Any, ...]], None]:
    stun_path = protocol.datagram_received

    def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
        if 127 < data[0] < 192:
            # RTCP (packet type 192-223 in the second byte, RFC 5761) takes aiortc's path.
            if len(data) > 1 and not 191 < data[1] < 224 and intake.receive(data):
                return
            protocol.receiver.data_received(data, protocol.local_candidate.component)
        else:
            stun_path(data, addr)

    return datagram_received


_RTP_FIXED = struct.Struct("!BBHII")
_RTP_EXTENSION = struct.Struct("!HH")


class _RtpIntake:
    """One DTLS transport's RTP, from the socket's callback: unprotected by libsrtp into a
    preallocated buffer (pylibsrtp allocates per call), counted where getStats() reads it,
    parsed for the fields forwarding needs (abs-send-time the only header extension read),
    routed by aiortc's RTP router and handed to the receiver's `_LeanReceive`. A receiver
    that is not tapped gets aiortc's own packet handling, in a task."""

    def __init__(self, dtls: Any) -> None:
        self._dtls = dtls
        self._session: Any = None
        self._srtp: Any = None
        self._cdata: Any = None
        self._buffer: Any = None
        self._length = _SRTP.ffi.new("int *")
        self._tasks: set[asyncio.Future[None]] = set()

    def receive(self, data: bytes) -> bool:
        """False if the transport cannot take RTP yet (aiortc's path then queues it)."""
        dtls = self._dtls
        session = dtls._rx_srtp
        if session is None or dtls._state is not DtlsState.CONNECTED:
            return False
        try:
            self._receive(dtls, session, data)
        except Exception:  # a malformed packet must not reach the event loop's handler
            log.exception("handling a received RTP packet failed; dropped")
        return True

    def _receive(self, dtls: Any, session: Any, data: bytes) -> None:
        if session is not self._session:
            self._session = session
            self._srtp = session._srtp[0]
            self._cdata = session._cdata
            self._buffer = session._buffer
        # aiortc's clock (ms since 1900): the estimator may also see packets aiortc handled.
        arrival_ms = int((time.time() + _NTP_UNIX_OFFSET) * 1000)
        size = len(data)
        dtls._RTCDtlsTransport__rx_bytes += size
        dtls._RTCDtlsTransport__rx_packets += 1
        if size > len(self._cdata):
            return
        self._length[0] = size
        self._buffer[0:size] = data
        if _SRTP.lib.srtp_unprotect(self._srtp, self._cdata, self._length) != 0:
            return  # not authentic, or replayed: aiortc drops it too
        plain: bytes = self._buffer[0 : self._length[0]]
        end = len(plain)
        if end < 12:
            return
        first, second, seq, timestamp, ssrc = _RTP_FIXED.unpack_from(plain)
        if first >> 6 != 2:
            return
        pos = 12 + 4 * (first & 0x0F)
        abs_send_time = None
        if first & 0x10:
            if end < pos + 4:
                return
            profile, words = _RTP_EXTENSION.unpack_from(plain, pos)
            pos += 4
            stop = pos + 4 * words
            if stop > end:
                return
            wanted = self._abs_send_time_id()
            if wanted and profile == 0xBEDE:  # one-byte elements (RFC 8285)
                at = pos
                while at < stop:
                    element = plain[at]
                    if element == 0:  # padding
                        at += 1
                        continue
                    ident = element >> 4
                    if ident == 15:
                        break
                    length = (element & 0x0F) + 1
                    if ident == wanted and length == 3:
                        abs_send_time = int.from_bytes(plain[at + 1 : at + 4], "big")
                        break
                    at += 1 + length
            elif wanted and profile & 0xFFF0 == 0x1000:  # two-byte elements
                packet = RtpPacket.parse(plain, dtls._rtp_header_extensions_map)
                abs_send_time = packet.extensions.abs_send_time
            pos = stop
        padding = 0
        if first & 0x20:
            padding = plain[-1]
            if not padding or padding > end - pos:
                return
            end -= padding
        packet_in = _Received(seq, timestamp, second >> 7, ssrc, second & 0x7F, plain[pos:end])
        receiver = dtls._rtp_router.route_rtp(packet_in)
        if receiver is None:
            return
        lean: _LeanReceive | None = getattr(receiver, "_telemed_rx", None)
        if lean is not None:
            lean.handle(packet_in, abs_send_time, padding, arrival_ms)
            return
        task = asyncio.ensure_future(
            receiver._handle_rtp_packet(
                RtpPacket.parse(plain, dtls._rtp_header_extensions_map),
                arrival_time_ms=aiortc_clock.current_ms(),
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _abs_send_time_id(self) -> int | None:
        ids = self._dtls._rtp_header_extensions_map._HeaderExtensionsMap__ids
        ident: int | None = ids.abs_send_time
        return ident


def _gather_from(connection: Any, addresses: list[str]) -> Callable[[], Any]:
    async def gather_candidates() -> None:
        if connection._local_candidates_start:
            return
        connection._local_candidates_start = True
        # As aioice does: the relay policy gathers no host candidate, only TURN's.
        hosts = addresses if connection._transport_policy == aioice.TransportPolicy.ALL else []
        for component in connection._components:
            found: list[Candidate] = await connection.get_component_candidates(
                component=component, addresses=hosts
            )
            connection._local_candidates += found
        connection._local_candidates_end = True

    return gather_candidates
