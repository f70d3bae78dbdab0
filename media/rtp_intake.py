"""Receiving RTP in the socket's callback, without aiortc's per-datagram queue and task: each
UDP socket of a connection's ICE hands RTP straight to `_RtpIntake`, which unprotects it with
libsrtp, parses what forwarding needs, routes it with aiortc's RTP router and hands it to the
receiver's `LeanReceive` (media/receiver_tap.py). STUN and RTCP keep aioice's and aiortc's
paths. Every aiortc, aioice and pylibsrtp internal used here is listed by
`internals_problems()`, which media/internals.py's `check_internals()` runs."""

from __future__ import annotations

import asyncio
import inspect
import logging
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import aioice
import pylibsrtp
from aiortc import clock as aiortc_clock
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcicetransport import RTCIceTransport
from aiortc.rtcpeerconnection import RTCPeerConnection
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from media.receiver_tap import LeanReceive, ReceivedPacket
from media.source_check import missing_lines

log = logging.getLogger(__name__)

_NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900 to 1970
# pylibsrtp's cffi binding (ffi, lib), which its module imports but does not export.
_SRTP: Any = pylibsrtp


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
    routed by aiortc's RTP router and handed to the receiver's `LeanReceive`. A receiver
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
        packet_in = ReceivedPacket(seq, timestamp, second >> 7, ssrc, second & 0x7F, plain[pos:end])
        receiver = dtls._rtp_router.route_rtp(packet_in)
        if receiver is None:
            return
        lean: LeanReceive | None = getattr(receiver, "_telemed_rx", None)
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


def internals_problems() -> list[str]:
    """Each aiortc, aioice and pylibsrtp internal this module relies on that is no longer
    there."""
    problems: list[str] = []
    if "self.__dtlsTransports" not in inspect.getsource(RTCPeerConnection.__init__):
        problems.append("missing: RTCPeerConnection.__dtlsTransports")
    if "self._connection" not in inspect.getsource(RTCIceTransport.__init__):
        problems.append("missing: RTCIceTransport._connection")
    if "self._protocols" not in inspect.getsource(aioice.Connection.__init__):
        problems.append("missing: aioice Connection._protocols")
    stun_protocol = inspect.getsource(aioice.ice.StunProtocol.datagram_received)
    if "self.receiver.data_received(data, self.local_candidate.component)" not in stun_protocol:
        problems.append("missing: aioice StunProtocol hands non-STUN data to its receiver")
    # What _RtpIntake does in place of the DTLS transport's receive task.
    dtls = RTCDtlsTransport
    problems += missing_lines(
        "RTCDtlsTransport",
        (dtls._recv_next, dtls._handle_rtp_data, dtls.start, dtls._set_state),
        (
            "self._rx_srtp.unprotect(data)",
            "self.__rx_bytes += len(data)",
            "self.__rx_packets += 1",
            "receiver = self._rtp_router.route_rtp(packet)",
            "RtpPacket.parse(data, self._rtp_header_extensions_map)",
            "self._set_state(State.CONNECTED)",
            "self._state = state",
        ),
    )
    parameters = inspect.signature(RTCRtpReceiver._handle_rtp_packet).parameters
    if list(parameters) != ["self", "packet", "arrival_time_ms"]:
        problems.append("missing: RTCRtpReceiver._handle_rtp_packet(packet, arrival_time_ms)")
    ids = getattr(HeaderExtensionsMap(), "_HeaderExtensionsMap__ids", None)
    if not hasattr(ids, "abs_send_time"):
        problems.append("missing: HeaderExtensionsMap.__ids (abs_send_time)")
    if not _unprotects_as_pylibsrtp():
        problems.append(
            "changed: pylibsrtp Session._srtp, _cdata, _buffer with libsrtp's srtp_unprotect "
            "no longer unprotect what Session.protect made"
        )
    return problems


def _unprotects_as_pylibsrtp() -> bool:
    """Whether _RtpIntake's way (libsrtp on the session's own buffer) gets back what
    pylibsrtp's Session.protect protected, with one key."""
    key = bytes(range(30))  # AES_CM_128_HMAC_SHA1_80, pylibsrtp's default profile
    plain = struct.pack("!BBHII", 0x80, 96, 1, 2, 3) + bytes(100)
    try:
        policy = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
        protected = pylibsrtp.Session(policy).protect(plain)
        policy = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND)
        session = pylibsrtp.Session(policy)
        buffer, length = session._buffer, _SRTP.ffi.new("int *")
        length[0] = len(protected)
        buffer[0 : len(protected)] = protected
        if _SRTP.lib.srtp_unprotect(session._srtp[0], session._cdata, length) != 0:
            return False
        return bool(buffer[0 : length[0]] == plain)
    except Exception:
        return False
