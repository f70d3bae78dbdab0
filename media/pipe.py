"""Tracks piped between workers, for a room larger than one worker: the room's worker (the
owner) sends each published track once to every other worker that serves some of the room's
receive-only seats (an edge); the edge feeds a Publication of its own with it, and serves its
subscribers from that. The edge packetizes and sends itself, so its subscribers' NACKs are
answered from its own send history; its keyframe requests go upstream at most once a second
per track, however many of its subscribers ask (a storm of trainees joining at 9:00 asks the
presenter's encoder once a second, not once per trainee).

On the wire: RTP over UDP (RFC 3550 header, SSRC naming the track), protected with SRTP under
a key per pipe that the owner gives the edge over Redis (signaling/edge_media.py). The payload
is one byte of flags (keyframe, first fragment of a frame) and a fragment of the encoded frame
as the relay holds it (VP8 without payload descriptors, or Opus); the marker bit ends a frame.
Keyframe requests come back as SRTCP PLI packets whose sender SSRC names the pipe. A lost
fragment loses its frame, and video waits for the next keyframe (asked for at once): between
workers on one machine or one LAN, loss is rare enough that repairing it is not worth a
history on the owner too."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pylibsrtp

from media.forwarding import NodeCounters, Publication
from media.frames import EncodedFrame

log = logging.getLogger(__name__)

# Fragments fit a 1500-byte Ethernet MTU with IP, UDP, RTP, the flags byte and the SRTP tag.
FRAGMENT_BYTES = 1200
# A frame larger than this is not reassembled (a 1080p keyframe is a few hundred kB at most).
MAX_FRAME_BYTES = 2 * 1024 * 1024
# Keyframe requests from an edge reach the owner at most this often per track.
KEYFRAME_EVERY_S = 1.0
# Unsent bytes queued at the pipe's socket beyond which frames are dropped, not queued.
MAX_UNSENT_BYTES = 1024 * 1024
KEY_BYTES = 30  # AES_CM_128_HMAC_SHA1_80: a 16-byte key and a 14-byte salt

_RTP_HEADER = struct.Struct("!BBHII")
_PLI = struct.Struct("!BBHII")
_KEYFRAME = 0x01
_FIRST = 0x02
_RTCP_PSFB = 206
_PLI_FMT = 1
_PAYLOAD_TYPE = {"video": 96, "audio": 111}

Address = tuple[str, int]


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _session(key: bytes, outbound: bool) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy
    ssrc_type = policy.SSRC_ANY_OUTBOUND if outbound else policy.SSRC_ANY_INBOUND
    return pylibsrtp.Session(policy=pylibsrtp.Policy(key=key, ssrc_type=ssrc_type))


class PipeEndpoint:
    """A worker's one UDP socket for pipes, both ways: as an owner it sends tracks and hears
    keyframe requests; as an edge it receives tracks and sends keyframe requests."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._transport: asyncio.DatagramTransport | None = None
        self._ids = itertools.count(1)
        # SSRCs are unique per owner endpoint: an edge tells tracks apart by (owner, SSRC).
        self._ssrcs = itertools.count(1)
        self._outgoing: dict[int, PipeOut] = {}  # by pipe id
        self._incoming: dict[tuple[Address, int], _InTrack] = {}  # by (owner, ssrc)
        self.undelivered = 0  # datagrams nobody here was waiting for, or that failed SRTP

    @property
    def address(self) -> Address:
        assert self._transport is not None, "start() the endpoint first"
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self._host, 0)
        )

    async def stop(self) -> None:
        for pipe in list(self._outgoing.values()):
            pipe.close()
        for track in list(self._incoming.values()):
            track.pipe.close()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def open_out(self, edge: Address, key: bytes) -> PipeOut:
        """A pipe to one edge (for one room): tracks added to it are sent there."""
        pipe = PipeOut(self, next(self._ids), edge, key)
        self._outgoing[pipe.pipe_id] = pipe
        return pipe

    def open_in(self, owner: Address, pipe_id: int, key: bytes, counters: NodeCounters) -> PipeIn:
        """The receiving end of the owner's pipe `pipe_id`."""
        return PipeIn(self, owner, pipe_id, key, counters)

    def _send(self, datagram: bytes, to: Address) -> bool:
        transport = self._transport
        # asyncio queues what the kernel does not take at once (its _SelectorDatagramTransport
        # has the buffer size of every transport, not in the DatagramTransport type).
        if transport is None or transport.get_write_buffer_size() > MAX_UNSENT_BYTES:  # type: ignore[attr-defined]
            return False
        transport.sendto(datagram, to)
        return True

    def _received(self, data: bytes, sender: Address) -> None:
        if len(data) < 12 or data[0] >> 6 != 2:
            self.undelivered += 1
            return
        if data[1] == _RTCP_PSFB:
            pipe = self._outgoing.get(int.from_bytes(data[4:8], "big"))
            if pipe is None or not pipe.keyframe_request(data):
                self.undelivered += 1
            return
        track = self._incoming.get((sender, int.from_bytes(data[8:12], "big")))
        if track is None or not track.received(data):
            self.undelivered += 1


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: PipeEndpoint) -> None:
        self._endpoint = endpoint

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            self._endpoint._received(data, (str(addr[0]), int(str(addr[1]))))
        except Exception:
            # One bad datagram must not end the socket's protocol.
            log.exception("a pipe datagram could not be handled")

    def error_received(self, exc: Exception) -> None:
        # An edge that went away answers with ICMP port unreachable: its pipe closes when
        # its seats go (signaling/edge_media.py).
        log.debug("pipe socket: %s", exc)


@dataclass
class _OutTrack:
    publication: Publication
    kind: str
    listener: Callable[[EncodedFrame], None]
    sequence: int = 0
    # The publication's resumptions after a mute, as last seen: frames were skipped since.
    resumptions: int = 0
    frames_sent: int = 0
    frames_dropped: int = 0


class PipeOut:
    """The owner's side of a pipe to one edge for one room."""

    def __init__(self, endpoint: PipeEndpoint, pipe_id: int, edge: Address, key: bytes) -> None:
        self._endpoint = endpoint
        self.pipe_id = pipe_id
        self.edge = edge
        self.key = key
        self._protect = _session(key, outbound=True)
        self._unprotect = _session(key, outbound=False)
        self._tracks: dict[int, _OutTrack] = {}  # by ssrc
        self.keyframe_requests = 0

    def add(self, publication: Publication) -> int:
        """Sends every frame of `publication` from now on; returns the track's SSRC."""
        ssrc = next(self._endpoint._ssrcs)

        def send(frame: EncodedFrame) -> None:
            self._send_frame(ssrc, frame)

        self._tracks[ssrc] = _OutTrack(
            publication, publication.kind, send, resumptions=publication.resumptions
        )
        publication.add_listener(send)
        return ssrc

    def remove(self, ssrc: int) -> None:
        track = self._tracks.pop(ssrc, None)
        if track is not None:
            track.publication.remove_listener(track.listener)

    def close(self) -> None:
        for ssrc in list(self._tracks):
            self.remove(ssrc)
        self._endpoint._outgoing.pop(self.pipe_id, None)

    def frames(self, ssrc: int) -> tuple[int, int]:
        """Frames of one track sent and dropped (the socket was backed up)."""
        track = self._tracks[ssrc]
        return track.frames_sent, track.frames_dropped

    def _send_frame(self, ssrc: int, frame: EncodedFrame) -> None:
        track = self._tracks.get(ssrc)
        if track is None:
            return
        if track.resumptions != track.publication.resumptions:
            # Frames were held back by a mute: a sequence number left out shows the edge the
            # gap, and its video waits for a keyframe as after a loss.
            track.resumptions = track.publication.resumptions
            track.sequence = (track.sequence + 1) & 0xFFFF
        data = frame.data
        chunks = [data[i : i + FRAGMENT_BYTES] for i in range(0, len(data), FRAGMENT_BYTES)]
        chunks = chunks or [b""]
        timestamp = frame.timestamp & 0xFFFFFFFF
        payload_type = _PAYLOAD_TYPE[track.kind]
        last = len(chunks) - 1
        sent = True
        for index, chunk in enumerate(chunks):
            flags = (_KEYFRAME if frame.keyframe else 0) | (_FIRST if index == 0 else 0)
            header = _RTP_HEADER.pack(
                0x80,
                payload_type | (0x80 if index == last else 0),
                track.sequence,
                timestamp,
                ssrc,
            )
            track.sequence = (track.sequence + 1) & 0xFFFF
            # A fragment not sent still used its sequence number: the edge sees the gap.
            if sent:
                datagram = self._protect.protect(header + bytes((flags,)) + chunk)
                sent = self._endpoint._send(datagram, self.edge)
        if sent:
            track.frames_sent += 1
        else:
            track.frames_dropped += 1

    def keyframe_request(self, data: bytes) -> bool:
        try:
            plain = self._unprotect.unprotect_rtcp(data)
        except pylibsrtp.Error:
            return False
        if len(plain) < _PLI.size or plain[0] & 0x1F != _PLI_FMT:
            return False
        track = self._tracks.get(_PLI.unpack_from(plain)[4])
        if track is None:
            return False
        self.keyframe_requests += 1
        track.publication.want_keyframe()
        return True


@dataclass
class _InTrack:
    pipe: PipeIn
    ssrc: int
    publication: Publication
    expected: int | None = None
    fragments: list[bytes] = field(default_factory=list)
    size: int = 0
    keyframe: bool = False
    # Inside a frame whose first fragment arrived and none since was lost.
    assembling: bool = False
    # Video after a loss: nothing is passed on until a keyframe.
    needs_keyframe: bool = True
    timestamp_high: int = 0
    last_timestamp: int | None = None
    frames_lost: int = 0
    # Keyframe requests upstream: when the last went, and one waiting for its turn.
    last_request: float = float("-inf")
    request_due: asyncio.TimerHandle | None = None

    def received(self, datagram: bytes) -> bool:
        try:
            plain = self.pipe._unprotect.unprotect(datagram)
        except pylibsrtp.Error:
            return False
        if len(plain) < _RTP_HEADER.size + 1:
            return False
        _, marker_type, sequence, timestamp, _ = _RTP_HEADER.unpack_from(plain)
        flags = plain[_RTP_HEADER.size]
        chunk = plain[_RTP_HEADER.size + 1 :]
        if self.expected is not None and sequence != self.expected:
            self._lost()
        self.expected = (sequence + 1) & 0xFFFF
        if flags & _FIRST:
            self.fragments, self.size = [], 0
            self.keyframe = bool(flags & _KEYFRAME)
            self.assembling = True
        if not self.assembling:
            return True
        self.size += len(chunk)
        if self.size > MAX_FRAME_BYTES:
            self._lost()
            return True
        self.fragments.append(chunk)
        if marker_type & 0x80:
            self.assembling = False
            self._frame_done(b"".join(self.fragments), self._unwrap(timestamp))
            self.fragments = []
        return True

    def _lost(self) -> None:
        if self.assembling or self.publication.kind == "video":
            self.frames_lost += 1
        self.assembling = False
        self.fragments, self.size = [], 0
        if self.publication.kind == "video":
            self.needs_keyframe = True
            self.request_keyframe()

    def _frame_done(self, data: bytes, timestamp: int) -> None:
        if self.publication.kind == "video" and self.needs_keyframe:
            if not self.keyframe:
                self.request_keyframe()
                return
            self.needs_keyframe = False
        self.publication.push(EncodedFrame(data, timestamp, self.keyframe))

    def _unwrap(self, timestamp: int) -> int:
        last = self.last_timestamp
        if last is not None and timestamp < last and last - timestamp > 1 << 31:
            self.timestamp_high += 1 << 32
        self.last_timestamp = timestamp
        return self.timestamp_high + timestamp

    def request_keyframe(self) -> None:
        """At most once every KEYFRAME_EVERY_S; a request inside that second goes at its end,
        so no subscriber waits longer than that for its first picture."""
        if self.request_due is not None or self.pipe.closed:
            return
        loop = asyncio.get_running_loop()
        wait = self.last_request + KEYFRAME_EVERY_S - loop.time()
        if wait <= 0:
            self._send_request()
        else:
            self.request_due = loop.call_later(wait, self._send_request)

    def _send_request(self) -> None:
        self.request_due = None
        if self.pipe.closed:
            return
        self.last_request = asyncio.get_running_loop().time()
        self.pipe.requests_sent += 1
        self.pipe._send_pli(self.ssrc)


class PipeIn:
    """The edge's side of one owner's pipe for one room: a Publication per piped track."""

    def __init__(
        self,
        endpoint: PipeEndpoint,
        owner: Address,
        pipe_id: int,
        key: bytes,
        counters: NodeCounters,
    ) -> None:
        self._endpoint = endpoint
        self.owner = owner
        self.pipe_id = pipe_id
        self._counters = counters
        self._unprotect = _session(key, outbound=False)
        self._protect = _session(key, outbound=True)
        self._tracks: dict[int, _InTrack] = {}
        self.closed = False
        self.requests_sent = 0

    def add(self, ssrc: int, kind: str) -> Publication:
        """The publication the owner's track `ssrc` feeds; it ends when removed."""
        self.remove(ssrc)
        holder: list[_InTrack] = []

        async def ask_upstream() -> None:
            holder[0].request_keyframe()

        publication = Publication(kind, ask_upstream, counters=self._counters)
        track = _InTrack(self, ssrc, publication)
        holder.append(track)
        self._tracks[ssrc] = track
        self._endpoint._incoming[(self.owner, ssrc)] = track
        return publication

    def remove(self, ssrc: int) -> None:
        track = self._tracks.pop(ssrc, None)
        if track is None:
            return
        self._endpoint._incoming.pop((self.owner, ssrc), None)
        if track.request_due is not None:
            track.request_due.cancel()
        track.publication.end()

    def close(self) -> None:
        for ssrc in list(self._tracks):
            self.remove(ssrc)
        self.closed = True

    def frames_lost(self, ssrc: int) -> int:
        return self._tracks[ssrc].frames_lost

    def _send_pli(self, ssrc: int) -> None:
        packet = _PLI.pack(0x80 | _PLI_FMT, _RTCP_PSFB, 2, self.pipe_id, ssrc)
        self._endpoint._send(self._protect.protect_rtcp(packet), self.owner)
