"""Everything that reaches into aiortc's internals, in one place, per object (never a
process-wide switch). aiortc is pinned to one exact version in pyproject.toml;
`check_internals()` fails loudly, naming what moved, when an upgrade changes what this module
relies on, and a test calls it.

What aiortc lacks and this module adds:
- a receiver that hands out re-assembled *encoded* frames instead of decoding them;
- releasing a video frame as soon as its last packet (marker bit) is in, instead of when the
  next frame starts, and giving up on a frame whose retransmission is lost;
- a sender that packs pre-encoded frames and reports keyframe requests (PLI/FIR) and bitrate
  feedback (REMB) to the relay instead of dropping them;
- choosing which host addresses ICE offers (aioice never offers loopback by itself)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import aiortc
from aioice import Candidate
from aiortc.rtcpeerconnection import RTCPeerConnection
from aiortc.rtcrtpreceiver import RTCRtpReceiver, decoder_worker
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import RtpPacket

PINNED_AIORTC = "1.16.0"

_RECEIVER_ATTRS = ("_RTCRtpReceiver__decoder_queue", "_RTCRtpReceiver__jitter_buffer")
_SENDER_ATTRS = ("_RTCRtpSender__encoder",)


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
    if "self.__encoder.pack(data)" not in inspect.getsource(RTCRtpSender._next_encoded_frame):
        problems.append("missing: RTCRtpSender packs non-frame data with its encoder")
    if not hasattr(RTCRtpReceiver, "_send_rtcp_pli"):
        problems.append("missing: RTCRtpReceiver._send_rtcp_pli")
    if "_RTCPeerConnection__iceTransports" not in _private_names(RTCPeerConnection):
        problems.append("missing: RTCPeerConnection.__iceTransports")
    if problems:
        raise AiortcInternalsChanged(
            "the media relay relies on aiortc internals that changed:\n  " + "\n  ".join(problems)
        )


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


class FrameAssembler:
    """Replaces the receiver's jitter buffer. Emits each frame the moment it is complete (video:
    the packet with the marker bit and everything before it since the last frame; audio: each
    packet), in order. A frame whose missing packet does not arrive within `give_up_after`
    newer packets is dropped, and a keyframe is requested instead of stalling."""

    def __init__(self, kind: str, on_frame: FrameSink, give_up_after: int = 64) -> None:
        self._video = kind == "video"
        self._on_frame = on_frame
        self._give_up_after = give_up_after
        self._next_seq: int | None = None  # first sequence number not yet emitted
        self._pending: dict[int, RtpPacket] = {}
        self._last_timestamp: int | None = None
        self._timestamp_base = 0
        self._waiting_for_keyframe = False

    # Same signature as aiortc's JitterBuffer.add; a frame is never returned here, it goes to
    # the sink, because one packet can complete several frames at once.
    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        seq = packet.sequence_number
        if self._next_seq is None:
            self._next_seq = seq
        behind = (self._next_seq - seq) & 0xFFFF
        if 0 < behind < 0x8000:
            return False, None  # already emitted or given up: a late retransmission
        self._pending[seq] = packet
        request_keyframe = False
        if len(self._pending) > self._give_up_after:
            request_keyframe = self._skip_to_next_frame()
        self._drain()
        return request_keyframe, None

    def _drain(self) -> None:
        assert self._next_seq is not None
        if not self._video:
            while (packet := self._pending.pop(self._next_seq, None)) is not None:
                self._next_seq = (self._next_seq + 1) & 0xFFFF
                self._emit([packet])
            return
        while True:
            run: list[RtpPacket] = []
            seq = self._next_seq
            while (packet := self._pending.get(seq)) is not None:
                if run and packet.timestamp != run[0].timestamp:
                    break  # a new frame starts: the one before is whole even without a marker
                run.append(packet)
                if packet.marker:
                    break
                seq = (seq + 1) & 0xFFFF
            complete = bool(run) and (run[-1].marker or packet is not None)
            if not complete:
                return
            for p in run:
                del self._pending[p.sequence_number]
            self._next_seq = (run[-1].sequence_number + 1) & 0xFFFF
            self._emit(run)

    def _skip_to_next_frame(self) -> bool:
        """The head frame will not complete: drop it and restart at the next frame start."""
        head = self._next_seq
        assert head is not None
        pending = sorted(self._pending, key=lambda s: (s - head) & 0xFFFF)
        # The first packet that follows a marker starts a frame we can still assemble.
        for earlier, later in pairwise(pending):
            if self._pending[earlier].marker:
                for s in pending[: pending.index(later)]:
                    del self._pending[s]
                self._next_seq = later
                break
        else:
            self._pending.clear()
            self._next_seq = None
        if self._video:
            self._waiting_for_keyframe = True
        return self._video

    def _emit(self, packets: list[RtpPacket]) -> None:
        data = b"".join(p._data for p in packets)  # type: ignore[attr-defined]
        if not data:
            return
        keyframe = self._video and (data[0] & 0x01) == 0
        if self._video and self._waiting_for_keyframe:
            if not keyframe:
                return  # undecodable after a gap: wait for the keyframe we asked for
            self._waiting_for_keyframe = False
        self._on_frame(EncodedFrame(data, self._unwrap(packets[0].timestamp), keyframe))

    def _unwrap(self, timestamp: int) -> int:
        if self._last_timestamp is not None and timestamp < self._last_timestamp - 0x80000000:
            self._timestamp_base += 1 << 32
        self._last_timestamp = timestamp
        return self._timestamp_base + timestamp


def tap_receiver(receiver: RTCRtpReceiver, kind: str, on_frame: FrameSink) -> FrameAssembler:
    """Turns a receiver into a source of encoded frames. Call it from the peer connection's
    `track` event, before the receiver starts (aiortc starts it once DTLS is up)."""
    assembler = FrameAssembler(kind, on_frame)
    receiver._RTCRtpReceiver__jitter_buffer = assembler  # type: ignore[attr-defined]
    receiver._RTCRtpReceiver__decoder_queue = _NoDecoding()  # type: ignore[attr-defined]
    return assembler


def media_ssrcs(receiver: RTCRtpReceiver) -> list[int]:
    """The SSRCs of the media (not retransmission) streams the receiver has heard recently."""
    rtx: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
    return [s.source for s in receiver.getSynchronizationSources() if s.source not in rtx]


async def request_keyframe(receiver: RTCRtpReceiver) -> None:
    for ssrc in media_ssrcs(receiver):
        await receiver._send_rtcp_pli(ssrc)


# --- sending pre-encoded frames -----------------------------------------------------------


@dataclass(frozen=True)
class PackedFrame:
    """A frame already split into RTP payloads, shared by every sender that forwards it."""

    payloads: list[bytes]
    # In the codec's clock (90 kHz video, 48 kHz Opus), relative to the publication's start.
    timestamp: int
    # Encoded bytes (without RTP payload descriptors), for bitrate figures.
    size: int


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


def prepare_forwarding_sender(
    sender: RTCRtpSender,
    on_keyframe_request: Callable[[], None],
    on_remb: Callable[[int], None],
) -> None:
    """The sender sends `PackedFrame`s from its track; its subscriber's PLI/FIR and REMB reach
    the callbacks."""
    sender._RTCRtpSender__encoder = _PassThroughEncoder(on_remb)  # type: ignore[attr-defined]
    sender._send_keyframe = on_keyframe_request  # type: ignore[method-assign]


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


def _gather_from(connection: Any, addresses: list[str]) -> Callable[[], Any]:
    async def gather_candidates() -> None:
        if connection._local_candidates_start:
            return
        connection._local_candidates_start = True
        for component in connection._components:
            found: list[Candidate] = await connection.get_component_candidates(
                component=component, addresses=addresses
            )
            connection._local_candidates += found
        connection._local_candidates_end = True

    return gather_candidates
