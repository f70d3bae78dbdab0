"""A sender that sends pre-encoded frames the relay pushes (`prepare_forwarding_sender`),
instead of pulling frames from its track and encoding them, and reports to the relay what
aiortc drops or smooths: the subscriber's keyframe requests (PLI/FIR), bitrate feedback (REMB)
and each receiver report's loss and round-trip time (aiortc smooths its round-trip time and
measures it only from reports that answer its newest sender report). The subscriber's hop
figures are `subscriber_figures`. Every aiortc, aioice and pylibsrtp internal used here is
listed by `internals_problems()`, which media/internals.py's `check_internals()` runs."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aioice
import pylibsrtp
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcicetransport import RTCIceTransport
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpsender import RTCRtpSender, random_sequence_number
from aiortc.rtp import (
    RTP_HISTORY_SIZE,
    AnyRtcpPacket,
    HeaderExtensionsMap,
    RtcpRrPacket,
    RtcpSrPacket,
    RtpPacket,
    wrap_rtx,
)
from aiortc.utils import random32

from media.frames import FrameSend, PackedFrame
from media.source_check import missing_lines

# Set in RTCRtpSender.__init__ and read or replaced here.
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


def internals_problems() -> list[str]:
    """Each aiortc, aioice and pylibsrtp internal this module relies on that is no longer
    there."""
    problems: list[str] = []
    sender_init = inspect.getsource(RTCRtpSender.__init__)
    for name in _SENDER_ATTRS:
        if not re.search(rf"self\.__{name.removeprefix('_RTCRtpSender__')}\b", sender_init):
            problems.append(f"missing: RTCRtpSender.{name}")
    for name in ("_ssrc", "_rtx_ssrc"):
        if f"self.{name} = " not in sender_init:
            problems.append(f"missing: RTCRtpSender.{name}")
    handle_rtcp = inspect.getsource(RTCRtpSender._handle_rtcp_packet)
    for needle, where in (
        ("self._send_keyframe()", "RTCRtpSender routes PLI/FIR to _send_keyframe"),
        ("self.__encoder.target_bitrate = bitrate", "RTCRtpSender hands REMB to its encoder"),
        ("await self._retransmit(seq)", "RTCRtpSender routes NACK to _retransmit"),
    ):
        if needle not in handle_rtcp:
            problems.append(f"missing: {where}")
    # What subscriber_figures reads of the last receiver report.
    for needle in (
        'id="remote-inbound-rtp_" + str(id(self))',
        "packetsLost=report.packets_lost",
        "jitter=report.jitter",
        "roundTripTime=self.__rtt",
        "fractionLost=report.fraction_lost",
    ):
        if needle not in handle_rtcp:
            problems.append(f"missing: RTCRtpSender keeps receiver reports ({needle})")
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
    run_rtcp = inspect.getsource(RTCRtpSender._run_rtcp)
    if (
        "self.__lsr = ((self.__ntp_timestamp) >> 16) & 0xFFFFFFFF" not in run_rtcp
        or "await self._send_rtcp(packets)" not in run_rtcp
    ):
        problems.append("missing: RTCRtpSender._run_rtcp sends its reports with _send_rtcp")
    if "self.__encoder.pack(data)" not in inspect.getsource(RTCRtpSender._next_encoded_frame):
        problems.append("missing: RTCRtpSender packs non-frame data with its encoder")
    dtls = RTCDtlsTransport
    problems += missing_lines(
        "RTCDtlsTransport",
        (dtls.__init__, dtls._handle_rtcp_data, dtls._send_rtp, dtls._set_state),
        (
            "await recipient._handle_rtcp_packet(packet)",
            "self._tx_srtp",
            "self.__tx_bytes",
            "self.__tx_packets",
            "self._state = state",
            "async def _send_rtp(self, data: bytes)",
        ),
    )
    if "self._connection" not in inspect.getsource(RTCIceTransport.__init__):
        problems.append("missing: RTCIceTransport._connection")
    if "active_pair = self._nominated.get(component)" not in inspect.getsource(
        aioice.Connection.sendto
    ):
        problems.append("missing: aioice Connection._nominated")
    pair = aioice.ice.CandidatePair
    if "self.protocol = protocol" not in inspect.getsource(pair.__init__) or not isinstance(
        getattr(pair, "remote_addr", None), property
    ):
        problems.append("missing: aioice CandidatePair.protocol and .remote_addr")
    ids = getattr(HeaderExtensionsMap(), "_HeaderExtensionsMap__ids", None)
    if not (hasattr(ids, "mid") and hasattr(ids, "abs_send_time")):
        problems.append("missing: HeaderExtensionsMap.__ids (mid, abs_send_time)")
    if not isinstance(getattr(pylibsrtp, "SRTP_MAX_TRAILER_LEN", None), int):
        problems.append("missing: pylibsrtp.SRTP_MAX_TRAILER_LEN")
    elif not _protects_as_pylibsrtp():
        problems.append(
            "changed: pylibsrtp Session._srtp, _cdata, _buffer with libsrtp's srtp_protect "
            "no longer protect as Session.protect does"
        )
    return problems


def _protects_as_pylibsrtp() -> bool:
    """Whether _Route's way (libsrtp on the session's own buffer) gives what pylibsrtp's
    Session.protect gives, on two sessions with one key."""
    key = bytes(range(30))  # AES_CM_128_HMAC_SHA1_80, pylibsrtp's default profile
    plain = struct.pack("!BBHII", 0x80, 96, 1, 2, 3) + bytes(100)
    try:
        policy = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
        expected = pylibsrtp.Session(policy).protect(plain)
        route: Any = _Route.__new__(_Route)  # its SRTP part only: no socket
        session = pylibsrtp.Session(policy)
        route._srtp, route._cdata, route._buffer = session._srtp[0], session._cdata, session._buffer
        route._length = _SRTP.ffi.new("int *")
        route._limit = len(route._cdata) - pylibsrtp.SRTP_MAX_TRAILER_LEN
        return bool(route.protect(plain) == expected)
    except Exception:
        return False
