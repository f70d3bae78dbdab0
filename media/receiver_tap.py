"""A receiver that hands out re-assembled *encoded* frames instead of decoding them
(`tap_receiver`), and what the relay reads and asks of it: the publisher's hop figures
(`intake_figures`), the uplink estimate it sends as REMB, the loss its receiver reports pass
on, keyframe requests (PLI).

`LeanReceive` does, per packet, what aiortc's `RTCRtpReceiver._handle_rtp_packet` does, for the
packets media/rtp_intake.py hands it straight from the socket. Every aiortc internal used here
is listed by `internals_problems()`, which media/internals.py's `check_internals()` runs."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from aiortc import clock as aiortc_clock
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import (
    NackGenerator,
    RTCRtpReceiver,
    StreamStatistics,
    decoder_worker,
)
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, pack_remb_fci

from media.frame_assembler import FrameAssembler
from media.frames import FrameSink
from media.opus import has_fec

# Set in RTCRtpReceiver.__init__ and read or replaced here.
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


class _NoDecoding:
    """Stands in for the receiver's decoder queue: the decoder thread reads `None` at once and
    exits, and encoded frames put here are dropped (they already went to the relay)."""

    def get(self) -> None:
        return None

    def put(self, _: object) -> None:
        pass


def tap_receiver(receiver: RTCRtpReceiver, kind: str, on_frame: FrameSink) -> FrameAssembler:
    """Turns a receiver into a source of encoded frames. Call it from the peer connection's
    `track` event, before the receiver starts (aiortc starts it once DTLS is up). Its RTP is
    then handled by `LeanReceive` straight from the socket (media/rtp_intake.py's
    `demux_media_first`)."""
    assembler = FrameAssembler(kind, on_frame)
    anyreceiver: Any = receiver
    anyreceiver._RTCRtpReceiver__jitter_buffer = assembler
    anyreceiver._RTCRtpReceiver__decoder_queue = _NoDecoding()
    estimator = anyreceiver._RTCRtpReceiver__remote_bitrate_estimator
    throttled = None
    if estimator is not None:  # video only
        throttled = _ThrottledEstimator(estimator)
        anyreceiver._RTCRtpReceiver__remote_bitrate_estimator = throttled
    anyreceiver._telemed_rx = LeanReceive(receiver, assembler, throttled)
    return assembler


class ReceivedPacket:
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

    def __init__(self, clockrate: int, lean: LeanReceive) -> None:
        super().__init__(clockrate)
        self._lean = lean

    @property
    def fraction_lost(self) -> int:
        own: int = super().fraction_lost  # also moves the interval on, as aiortc expects
        return max(own, self._lean.downstream_loss_256)


class LeanReceive:
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
        self, packet: ReceivedPacket, abs_send_time: int | None, padding: int, arrival_ms: int
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
    lean: LeanReceive | None = getattr(receiver, "_telemed_rx", None)
    if lean is None or lean.estimator is None:
        return None
    return lean.estimator.last_bps


def report_downstream_loss(receiver: RTCRtpReceiver, fraction: float) -> None:
    """From now on the receiver reports to the publisher of this (audio) track say at least
    `fraction` (0..1) lost: what its subscribers lose downstream (media/opus.py)."""
    lean: LeanReceive | None = getattr(receiver, "_telemed_rx", None)
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
    lean: LeanReceive | None = getattr(receiver, "_telemed_rx", None)
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
    lean: LeanReceive | None = getattr(receiver, "_telemed_rx", None)
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


def internals_problems() -> list[str]:
    """Each aiortc internal this module relies on that is no longer there."""
    problems: list[str] = []
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
    receiver_init = inspect.getsource(RTCRtpReceiver.__init__)
    for name in _RECEIVER_ATTRS:
        if not re.search(rf"self\.__{name.removeprefix('_RTCRtpReceiver__')}\b", receiver_init):
            problems.append(f"missing: RTCRtpReceiver.{name}")
    if "self._enabled" not in receiver_init:
        problems.append("missing: RTCRtpReceiver._enabled")
    # What LeanReceive does in place of RTCRtpReceiver._handle_rtp_packet.
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
    for name, parameters in (
        ("_send_rtcp", ["self", "packet"]),
        ("_send_rtcp_nack", ["self", "media_ssrc", "lost"]),
        ("_send_rtcp_pli", ["self", "media_ssrc"]),
    ):
        method = getattr(RTCRtpReceiver, name, None)
        if method is None or list(inspect.signature(method).parameters) != parameters:
            problems.append(f"missing: RTCRtpReceiver.{name}({', '.join(parameters[1:])})")
    if "fraction_lost=stream.fraction_lost" not in inspect.getsource(RTCRtpReceiver._run_rtcp):
        problems.append("missing: RTCRtpReceiver._run_rtcp reports each stream's fraction_lost")
    for cls in (StreamStatistics, NackGenerator):
        if "packet.sequence_number" not in inspect.getsource(cls.add):
            problems.append(f"missing: {cls.__name__}.add reads the sequence number")
    if "self.missing" not in inspect.getsource(NackGenerator.__init__):
        problems.append("missing: NackGenerator.missing")
    statistics_init = inspect.getsource(StreamStatistics.__init__)
    for needle in ("self._clockrate = clockrate", "self.base_seq"):
        if needle not in statistics_init:
            problems.append(f"missing: StreamStatistics {needle}")
    for name in ("fraction_lost", "packets_lost", "jitter"):
        if not isinstance(getattr(StreamStatistics, name, None), property):
            problems.append(f"missing: StreamStatistics.{name}")
    return problems
