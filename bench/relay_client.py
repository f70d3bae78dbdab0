"""The client side of the relay benchmark: one worker process runs some participants, each a
socket.io client on `/consult` plus aiortc peer connections, as a browser would (publish
connection offered by the client, subscribe connection offered by the server), or, for the
`direct` baseline, a bare aiortc peer talking to a peer in another worker.

Publishers replay the pre-encoded clip (bench/relay_media.py). Subscribers never decode what
they do not need: every received track is tapped with the project's
`media.receiver_tap.tap_receiver`, which hands out re-assembled encoded frames the moment they
are complete (no jitter-buffer wait, no decoder thread). Per received stream a worker counts,
over the measurement window, the RTP packets that reached the receiver (and the sequence
number span: what the server sent), the frames, and when each video frame arrived with its RTP
timestamp. Video streams chosen for sampling are decoded in full and their counters read; the
others decode their first keyframe only (the anchor of their frame numbers), and a lean
subscriber then counts from RTP headers alone (LeanReceive).

The orchestrator (bench/relay.py) drives a worker through a pipe: `start`, then `window`, then
`close`; `offer` / `answer` for the direct pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import pickle
import resource
import socket
import struct
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import socketio
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtp import RtpPacket

from bench.relay_media import (
    Clip,
    CounterReader,
    PacketAudioTrack,
    PacketVideoTrack,
    decode_counter_once,
)
from media.frame_assembler import FrameAssembler
from media.frames import EncodedFrame
from media.ice_hosts import offer_host_addresses
from media.peer import prefer_codec
from media.receiver_tap import tap_receiver

NS = "/consult"
LOOPBACK = ["127.0.0.1"]


# --- plans ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartyPlan:
    label: str
    token: str
    device: str
    publish: bool
    # How many of its incoming video streams it decodes in full (the latency sample).
    decode: int
    # Admits whoever waits (the presenter of a teaching session does this for its trainees).
    admits: bool
    # Incoming streams it must be receiving before it counts as ready.
    expect_video: int
    expect_audio: int
    # "full" pins every received video track to the full picture (set_layer after each
    # subscribe answer); "auto" leaves the server's REMB-driven choice alone.
    layer: str = "full"
    # Receive by RTP headers only during the window (LeanReceive), unless it decodes.
    lean: bool = False
    # The room it joins; "": the worker's (WorkerPlan.consultation_id).
    consultation_id: str = ""


@dataclass(frozen=True)
class WorkerPlan:
    index: int
    # "room": parties on the server; "direct-publisher" / "direct-viewer": the bare pair.
    mode: str
    url: str
    consultation_id: str
    parties: tuple[PartyPlan, ...]
    clip_path: str
    # Parties join this many at a time, a new one at most every join_interval_s.
    join_concurrency: int = 4
    join_interval_s: float = 0.05
    ready_timeout_s: float = 120.0


# --- what a received stream counts ---------------------------------------------------------


@dataclass
class Window:
    start: float = math.inf
    end: float = math.inf
    # Frames arriving until here still count as delivered (not for rates).
    drain_end: float = math.inf


@dataclass
class StreamStats:
    """One received track: counted over the window by the tap, read by the orchestrator."""

    viewer: str
    publisher: str
    kind: str
    decoded: bool
    window: Window
    packets: int = 0
    packets_total: int = 0
    payload_bytes: int = 0
    seq_first: int | None = None
    seq_last: int | None = None
    frames: int = 0
    frames_total: int = 0
    # Video frames arriving in [start, drain_end): unwrapped RTP timestamp and arrival.
    ts: array[int] = field(default_factory=lambda: array("q"))
    arrival: array[float] = field(default_factory=lambda: array("d"))
    # Decoded streams: the counter of each of those frames (-1: did not decode).
    counter: array[int] = field(default_factory=lambda: array("i"))
    # Decoded keyframes, whenever they came: (counter, timestamp, arrival).
    anchors: list[tuple[int, int, float]] = field(default_factory=list)
    decode_errors: int = 0
    # Over the stream's whole life, not only the window (a join storm happens before it):
    # the first frame's arrival and the longest wait between two frames, and when it ended.
    first_frame_at: float = math.nan
    gap_max_s: float = 0.0
    gap_max_at: float = math.nan
    _last_frame_at: float = math.nan
    # For unwrapping sequence numbers.
    _last_seq: int | None = None
    _seq_base: int = 0
    # Header-only frame tracking (lean viewers, see LeanReceive): the current frame's RTP
    # timestamp and packet count, and the last marker packet's extended sequence number.
    _frame_ts: int | None = None
    _frame_packets: int = 0
    _last_marker: int | None = None
    assembler: FrameAssembler | None = None

    def count_packet(self, packet: RtpPacket, now: float) -> None:
        ext = self._count(packet.sequence_number, len(packet.payload), now)
        if packet.marker:
            self._last_marker = ext

    def count_header(self, seq: int, timestamp: int, marker: bool, size: int, now: float) -> None:
        """A packet seen by its RTP header only (lean mode): counts it, and a frame when the
        marker packet completes one whose packets all came."""
        ext = self._count(seq, size, now)
        if self.kind != "video":
            self._frame(timestamp, now)
            return
        if timestamp != self._frame_ts:
            self._frame_ts = timestamp
            self._frame_packets = 0
        self._frame_packets += 1
        if marker:
            whole = self._last_marker is not None and ext - self._last_marker == self._frame_packets
            self._last_marker = ext
            if whole:
                self._frame(timestamp, now)

    def note_frame(self, now: float) -> None:
        if math.isnan(self._last_frame_at):
            self.first_frame_at = now
        elif now - self._last_frame_at > self.gap_max_s:
            self.gap_max_s, self.gap_max_at = now - self._last_frame_at, now
        self._last_frame_at = now

    def _frame(self, timestamp: int, now: float) -> None:
        w = self.window
        self.note_frame(now)
        self.frames_total += 1
        if w.start <= now < w.end:
            self.frames += 1
        if self.kind == "video" and w.start <= now < w.drain_end:
            assert self.assembler is not None
            # The assembler's unwrapping, so these timestamps continue the anchors'.
            self.ts.append(self.assembler._unwrap(timestamp))
            self.arrival.append(now)

    def _count(self, seq: int, size: int, now: float) -> int:
        self.packets_total += 1
        if self._last_seq is not None:
            delta = (seq - self._last_seq) & 0xFFFF
            if delta < 0x8000:  # forward (with wrap)
                if seq < self._last_seq:
                    self._seq_base += 1 << 16
                self._last_seq = seq
                ext = self._seq_base + seq
            else:  # an older packet (a retransmission or reordering)
                ext = self._seq_base + seq - (1 << 16 if seq > self._last_seq else 0)
        else:
            self._last_seq = seq
            ext = seq
        w = self.window
        if w.start <= now < w.end:
            self.packets += 1
            self.payload_bytes += size
            if self.seq_first is None or ext < self.seq_first:
                self.seq_first = ext
            if self.seq_last is None or ext > self.seq_last:
                self.seq_last = ext
        return ext

    def result(self) -> dict[str, Any]:
        expected = 0
        if self.seq_first is not None and self.seq_last is not None:
            expected = self.seq_last - self.seq_first + 1
        return {
            "viewer": self.viewer,
            "publisher": self.publisher,
            "kind": self.kind,
            "decoded": self.decoded,
            "packets": self.packets,
            "packets_expected": expected,
            "payload_bytes": self.payload_bytes,
            "frames": self.frames,
            "frames_total": self.frames_total,
            "ts": self.ts,
            "arrival": self.arrival,
            "counter": self.counter,
            "anchors": self.anchors,
            "decode_errors": self.decode_errors,
            "first_frame_at": self.first_frame_at,
            "gap_max_s": self.gap_max_s,
            "gap_max_at": self.gap_max_at,
        }


class _CountingAssembler:
    """Sits where the receiver's jitter buffer was: counts each packet, then assembles."""

    def __init__(self, inner: FrameAssembler, stats: StreamStats, lean: LeanReceive | None) -> None:
        self._inner = inner
        self._stats = stats
        self._lean = lean

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        self._stats.count_packet(packet, time.monotonic())
        if self._lean is not None:
            self._lean.by_ssrc[packet.ssrc] = self._stats
        return self._inner.add(packet)


class LeanReceive:
    """A subscriber that, once it has decoded its first keyframe (the anchor of its frame
    numbers), reads each RTP packet's header only, straight from its UDP socket: no ICE
    receive queue, no SRTP decryption (the RTP header is in clear), no aiortc receiver
    (statistics, bandwidth estimate, NACK, jitter buffer). Packets, frames (marker bit, all
    packets present) and arrival times are counted from the headers. STUN (ICE consent),
    DTLS, RTCP and packets of SSRCs not yet known go the usual way. Used for the many
    undecoded viewers of a teaching session, so that client processes on the same machine
    are not what limits the server."""

    # RTP payload size here is the packet less a 12-byte header and a 16-byte SRTP tag.
    OVERHEAD = 12 + 16

    def __init__(self, transport: Any, video_streams: int = 1) -> None:
        self._transport = transport  # the subscriber's RTCDtlsTransport
        self.by_ssrc: dict[int, StreamStats] = {}
        self.on = False
        # Headers only once this many video streams (all of one subscribe connection) have
        # their anchor: a stream bypassed before its first keyframe is decoded has none.
        self._video_streams = video_streams
        self._anchored: set[int] = set()

    def anchored(self, stats: StreamStats) -> None:
        self._anchored.add(id(stats))
        if len(self._anchored) >= self._video_streams:
            self.switch_on()

    def switch_on(self) -> None:
        if self.on:
            return
        self.on = True
        for protocol in self._transport.transport._connection._protocols:
            protocol.datagram_received = self._bypass(protocol.datagram_received)

    def _bypass(self, original: Callable[[bytes, Any], None]) -> Callable[[bytes, Any], None]:
        by_ssrc = self.by_ssrc
        unpack = struct.Struct("!HII").unpack_from
        overhead = self.OVERHEAD

        def datagram_received(data: bytes, addr: Any) -> None:
            # RTP (not RTCP: payload types 192-208 there) of a known SSRC.
            if len(data) >= 12 and 127 < data[0] < 192 and not 192 <= data[1] <= 208:
                seq, timestamp, ssrc = unpack(data, 2)
                stats = by_ssrc.get(ssrc)
                if stats is not None:
                    marker = bool(data[1] & 0x80)
                    stats.count_header(
                        seq, timestamp, marker, len(data) - overhead, time.monotonic()
                    )
                    return
            original(data, addr)

        return datagram_received


def tap_and_count(receiver: Any, stats: StreamStats, lean: LeanReceive | None = None) -> None:
    reader = CounterReader() if stats.decoded else None

    def on_frame(frame: EncodedFrame) -> None:
        now = time.monotonic()
        w = stats.window
        stats.note_frame(now)
        stats.frames_total += 1
        if w.start <= now < w.end:
            stats.frames += 1
        if stats.kind != "video":
            return
        counter = -1
        if reader is not None:
            value = reader.read(frame.data)
            counter = -1 if value is None else value
            if value is None:
                stats.decode_errors += 1
            if frame.keyframe and value is not None:
                stats.anchors.append((value, frame.timestamp, now))
        elif frame.keyframe and now < w.start:
            value = decode_counter_once(frame.data)
            if value is not None:
                stats.anchors.append((value, frame.timestamp, now))
                if lean is not None:
                    lean.anchored(stats)
        if w.start <= now < w.drain_end:
            stats.ts.append(frame.timestamp)
            stats.arrival.append(now)
            if reader is not None:
                stats.counter.append(counter)

    assembler = tap_receiver(receiver, stats.kind, on_frame)
    stats.assembler = assembler
    receiver._RTCRtpReceiver__jitter_buffer = _CountingAssembler(assembler, stats, lean)


def new_peer_connection() -> RTCPeerConnection:
    # No ICE servers: never a public STUN server; host candidates on loopback only. Everything
    # on one transport from the start, as a browser ends up after BUNDLE: with aiortc's
    # default ("balanced") an answerer that creates two transceivers of one kind in one
    # setRemoteDescription leaves the second on a transport it then stops (aiortc 1.16,
    # RTCPeerConnection.setRemoteDescription skips `_bundled` transceivers when it moves the
    # BUNDLE group onto the first transport), and that stream is never received.
    return RTCPeerConnection(
        RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
    )


# Receive buffer of the clients' UDP sockets (the kernel's default, ~208 KiB, is under a
# second of a viewer's stream: a client process that stalls loses packets at its socket).
CLIENT_RCVBUF = 4 << 20


async def local_description(pc: RTCPeerConnection, offer: bool) -> str:
    offer_host_addresses(pc, LOOPBACK)
    description = await (pc.createOffer() if offer else pc.createAnswer())
    await pc.setLocalDescription(description)
    transports: Any = pc._RTCPeerConnection__iceTransports  # type: ignore[attr-defined]
    for transport in transports:
        for protocol in transport._connection._protocols:
            sock = protocol.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    sdp: str = pc.localDescription.sdp
    return sdp


# --- one participant ------------------------------------------------------------------------


class Party:
    def __init__(self, plan: PartyPlan, worker: Worker) -> None:
        self.plan = plan
        self.worker = worker
        self.window = worker.window
        self.participant_id = ""
        self.sio = socketio.AsyncClient(reconnection=False)
        self.publisher = new_peer_connection()
        self.subscriber = new_peer_connection()
        self.video: PacketVideoTrack | None = None
        self.streams: list[StreamStats] = []
        self._mid_info: dict[str, dict[str, Any]] = {}
        self._decoding_left = plan.decode
        self._lean: LeanReceive | None = None
        self._seated = asyncio.Event()
        self._publish_answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.errors: list[str] = []
        self.admitted: set[str] = set()
        self.layer_changes: list[str] = []
        self.subscriber.on("track", self._on_track)
        # (time.monotonic(), "publish" | "subscribe", state) at each connection state change.
        self.state_log: list[tuple[float, str, str]] = []
        self.seated_at = math.inf
        self.join_started_at = math.inf
        # When its turn came (the join rate's schedule), before waiting for a join slot.
        self.due_at = math.inf
        for name, pc in (("publish", self.publisher), ("subscribe", self.subscriber)):
            pc.on(
                "connectionstatechange",
                lambda name=name, pc=pc: self.state_log.append(
                    (time.monotonic(), name, pc.connectionState)
                ),
            )
        self.sio.on("joined", self._on_joined, namespace=NS)
        self.sio.on("waiting", self._on_waiting, namespace=NS)
        self.sio.on("publish_answer", self._on_publish_answer, namespace=NS)
        self.sio.on("subscribe_offer", self._on_subscribe_offer, namespace=NS)
        self.sio.on("error", self._on_error, namespace=NS)
        self.sio.on("layer_changed", self._on_layer_changed, namespace=NS)

    # socket.io events

    async def _on_joined(self, data: dict[str, Any]) -> None:
        self.participant_id = str(data["you"]["participant_id"])
        self._seated.set()
        if self.plan.admits:
            for waiting in data.get("waiting", []):
                await self._admit(str(waiting["participant_id"]))

    async def _on_waiting(self, data: dict[str, Any]) -> None:
        # Admitters hear of everyone who waits; a trainee hears of its own seat only.
        if self.plan.admits:
            await self._admit(str(data["participant"]["participant_id"]))

    async def _admit(self, who: str) -> None:
        if who in self.admitted:
            return
        self.admitted.add(who)
        ack = await self.sio.call("admit", {"participant": who}, namespace=NS, timeout=60)
        if not ack.get("ok"):
            self.errors.append(f"admit {who}: {ack}")

    async def _on_publish_answer(self, data: dict[str, Any]) -> None:
        if not self._publish_answer.done():
            self._publish_answer.set_result(str(data["sdp"]))

    async def _on_subscribe_offer(self, data: dict[str, Any]) -> None:
        self._mid_info.update(data["tracks"])
        await self.subscriber.setRemoteDescription(RTCSessionDescription(data["sdp"], "offer"))
        answer = await local_description(self.subscriber, offer=False)
        ack = await self.sio.call("subscribe_answer", {"sdp": answer}, namespace=NS, timeout=60)
        if not ack.get("ok"):
            self.errors.append(f"subscribe_answer: {ack}")
        elif self.plan.layer != "auto":
            # Applies to the video tracks received now: again after every renegotiation.
            body = {"layer": self.plan.layer}
            ack = await self.sio.call("set_layer", body, namespace=NS, timeout=60)
            if not ack.get("ok"):
                self.errors.append(f"set_layer: {ack}")

    async def _on_layer_changed(self, data: dict[str, Any]) -> None:
        self.layer_changes.append(str(data.get("layer")))

    async def _on_error(self, data: Any) -> None:
        self.errors.append(f"error event: {data}")

    def _on_track(self, track: MediaStreamTrack) -> None:
        transceiver = next(
            t for t in self.subscriber.getTransceivers() if t.receiver.track is track
        )
        info = self._mid_info.get(transceiver.mid or "", {})
        decoded = False
        if track.kind == "video" and self._decoding_left > 0:
            self._decoding_left -= 1
            decoded = True
        stats = StreamStats(
            self.plan.label, str(info.get("participant", "?")), track.kind, decoded, self.window
        )
        self.streams.append(stats)
        lean = None
        if self.plan.lean and self.plan.decode == 0:
            transport = transceiver.receiver.transport
            if self._lean is None or self._lean._transport is not transport:
                self._lean = LeanReceive(transport, max(1, self.plan.expect_video))
            lean = self._lean
        tap_and_count(transceiver.receiver, stats, lean)

    # steps

    async def join(self, url: str, consultation_id: str) -> None:
        self.join_started_at = time.monotonic()
        await self.sio.connect(
            url,
            auth={"token": self.plan.token, "consultation_id": consultation_id},
            namespaces=[NS],
            transports=["websocket"],
            wait_timeout=30,
        )
        body = {"consultation_id": consultation_id, "device": self.plan.device}
        while True:
            ack = await self.sio.call("join", body, namespace=NS, timeout=60)
            if ack.get("ok"):
                break
            if ack.get("error", {}).get("code") != "session_not_started":
                raise RuntimeError(f"{self.plan.label}: join refused: {ack}")
            await asyncio.sleep(0.2)
        await asyncio.wait_for(self._seated.wait(), timeout=120)
        self.seated_at = time.monotonic()

    async def publish(self, clip: Clip) -> None:
        self.video = PacketVideoTrack(clip)
        audio = PacketAudioTrack(clip)
        sources: dict[str, str] = {}
        transceivers: list[tuple[RTCRtpTransceiver, str]] = []
        for track, source in ((self.video, "camera"), (audio, "microphone")):
            transceiver = self.publisher.addTransceiver(track, direction="sendonly")
            prefer_codec(transceiver, track.kind)
            transceivers.append((transceiver, source))
        # A keyframe request (PLI/FIR) reaches the track, not aiortc's encoder path.
        video_sender = transceivers[0][0].sender
        video_sender._send_keyframe = self.video.request_keyframe  # type: ignore[method-assign]
        offer = await local_description(self.publisher, offer=True)
        for transceiver, source in transceivers:
            sources[str(transceiver.mid)] = source
        ack = await self.sio.call(
            "publish_offer", {"sdp": offer, "tracks": sources}, namespace=NS, timeout=60
        )
        if not ack.get("ok"):
            raise RuntimeError(f"{self.plan.label}: publish_offer refused: {ack}")
        answer = await asyncio.wait_for(self._publish_answer, timeout=60)
        await self.publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    def ready(self) -> bool:
        video = [s for s in self.streams if s.kind == "video" and s.frames_total > 0]
        audio = [s for s in self.streams if s.kind == "audio" and s.frames_total > 0]
        return len(video) >= self.plan.expect_video and len(audio) >= self.plan.expect_audio

    def publisher_log(self) -> dict[str, Any] | None:
        if self.video is None:
            return None
        return {
            "participant": self.participant_id or self.plan.label,
            "label": self.plan.label,
            "sent": self.video.sent,
            "index": self.video.index,
            "keyframe_requests": self.video.keyframe_requests,
        }

    async def close(self) -> None:
        for pc in (self.publisher, self.subscriber):
            with contextlib.suppress(Exception):
                await pc.close()
        with contextlib.suppress(Exception):
            await self.sio.disconnect()


# --- one worker process -------------------------------------------------------------------


class Worker:
    def __init__(self, plan: WorkerPlan, conn: Connection) -> None:
        self.plan = plan
        self.conn = conn
        self.window = Window()
        with Path(plan.clip_path).open("rb") as f:
            self.clip: Clip = pickle.load(f)
        self.parties: list[Party] = []
        self.lags: array[float] = array("d")
        # The direct pair.
        self.direct_pc: RTCPeerConnection | None = None
        self.direct_video: PacketVideoTrack | None = None
        self.direct_streams: list[StreamStats] = []

    async def command(self) -> tuple[Any, ...]:
        message: tuple[Any, ...] = await asyncio.to_thread(self.conn.recv)
        return message

    def reply(self, *message: Any) -> None:
        self.conn.send(message)

    async def run(self) -> None:
        lag_task = asyncio.ensure_future(self._watch_lag())
        try:
            while True:
                message = await self.command()
                name = message[0]
                try:
                    if name == "start":
                        self.reply("started", await self._start())
                    elif name == "publish":
                        for party in self.parties:
                            if party.plan.publish:
                                await party.publish(self.clip)
                        self.reply("published")
                    elif name == "offer":
                        self.reply("offer", await self._direct_offer())
                    elif name == "answer_offer":
                        self.reply("answer", await self._direct_answer(message[1]))
                    elif name == "answer":
                        await self._direct_accept(message[1])
                        self.reply("ok")
                    elif name == "wait_ready":
                        self.reply("ready", await self._wait_ready())
                    elif name == "window":
                        self.reply("results", await self._measure(*message[1:]))
                    elif name == "close":
                        await self._close()
                        self.reply("closed")
                        return
                except Exception as exc:
                    self.reply("failed", f"worker {self.plan.index} {name}: {exc!r}\n{_tb()}")
        finally:
            lag_task.cancel()

    async def _start(self) -> dict[str, Any]:
        plan = self.plan
        limit = asyncio.Semaphore(plan.join_concurrency)

        async def one(party: Party, delay: float) -> None:
            await asyncio.sleep(delay)
            party.due_at = time.monotonic()
            async with limit:
                await party.join(plan.url, party.plan.consultation_id or plan.consultation_id)

        self.parties = [Party(p, self) for p in plan.parties]
        await asyncio.gather(
            *(one(p, i * plan.join_interval_s) for i, p in enumerate(self.parties))
        )
        return {
            "worker": plan.index,
            "pid": os.getpid(),
            "errors": [e for p in self.parties for e in p.errors],
        }

    async def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.plan.ready_timeout_s
        # Polled: readiness is frames arriving on many streams, not one event.
        while time.monotonic() < deadline and not self._all_ready():  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        waiting = [p.plan.label for p in self.parties if not p.ready()]
        if self.plan.mode == "direct-viewer" and not self._all_ready():
            waiting = [self.plan.parties[0].label]
        gc.collect()
        return {
            "worker": self.plan.index,
            "parties": len(self.parties),
            "not_ready": waiting,
            "errors": [e for p in self.parties for e in p.errors],
            "pid": os.getpid(),
        }

    def _all_ready(self) -> bool:
        if self.plan.mode == "direct-viewer":
            kinds = {s.kind for s in self.direct_streams if s.frames_total > 0}
            return kinds == {"audio", "video"}
        return all(p.ready() for p in self.parties)

    async def _measure(self, start: float, end: float, drain_end: float) -> dict[str, Any]:
        self.window.start, self.window.end, self.window.drain_end = start, end, drain_end
        self.lags = array("d")
        await asyncio.sleep(max(0.0, drain_end - time.monotonic()))
        streams = [s for p in self.parties for s in p.streams] + self.direct_streams
        publishers = [log for p in self.parties if (log := p.publisher_log()) is not None]
        if self.direct_video is not None:
            publishers.append(
                {
                    "participant": "direct",
                    "label": "direct",
                    "sent": self.direct_video.sent,
                    "index": self.direct_video.index,
                    "keyframe_requests": self.direct_video.keyframe_requests,
                }
            )
        return {
            "worker": self.plan.index,
            "streams": [s.result() for s in streams],
            "publishers": publishers,
            "loop_lag_ms": self.lags,
            # Connections that failed or closed: (time, party, connection, state).
            "connection_losses": [
                (at, p.plan.label, name, state)
                for p in self.parties
                for at, name, state in p.state_log
                if state in ("failed", "closed")
            ],
            "seated_at": [p.seated_at for p in self.parties],
            # (party, its turn, connect began, seated): to `joined` from the socket.io connect
            # (for a trainee: through the waiting room and the presenter's admit).
            "joins": [
                (p.plan.label, p.due_at, p.join_started_at, p.seated_at) for p in self.parties
            ],
            # How each party's connections ended the window ("publish/subscribe" state).
            "connection_states": [
                f"{p.publisher.connectionState}/{p.subscriber.connectionState}"
                for p in self.parties
            ],
            "layer_changes": [c for p in self.parties for c in p.layer_changes],
            "errors": [e for p in self.parties for e in p.errors],
        }

    async def _watch_lag(self) -> None:
        """How late a 10 ms timer fires, during the window: the worker's own overload."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            now = time.monotonic()
            if self.window.start <= now < self.window.end:
                self.lags.append((now - before - 0.01) * 1000)

    # the direct pair: the orchestrator carries the SDP between the two workers

    async def _direct_offer(self) -> str:
        pc = self.direct_pc = new_peer_connection()
        self.direct_video = PacketVideoTrack(self.clip)
        audio = PacketAudioTrack(self.clip)
        for track in (self.direct_video, audio):
            transceiver = pc.addTransceiver(track, direction="sendonly")
            prefer_codec(transceiver, track.kind)
            if track.kind == "video":
                transceiver.sender._send_keyframe = self.direct_video.request_keyframe  # type: ignore[method-assign]
        return await local_description(pc, offer=True)

    async def _direct_answer(self, offer_sdp: str) -> str:
        pc = self.direct_pc = new_peer_connection()
        party = self.plan.parties[0]

        def on_track(track: MediaStreamTrack) -> None:
            transceiver = next(t for t in pc.getTransceivers() if t.receiver.track is track)
            decoded = track.kind == "video" and party.decode > 0
            stats = StreamStats(party.label, "direct", track.kind, decoded, self.window)
            self.direct_streams.append(stats)
            tap_and_count(transceiver.receiver, stats)

        pc.on("track", on_track)
        await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        return await local_description(pc, offer=False)

    async def _direct_accept(self, answer_sdp: str) -> None:
        assert self.direct_pc is not None
        await self.direct_pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))

    async def _close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.parties), return_exceptions=True)
        if self.direct_pc is not None:
            with contextlib.suppress(Exception):
                await self.direct_pc.close()


def _tb() -> str:
    return "".join(traceback.format_exc().splitlines(keepends=True)[-12:])


def worker_main(plan: WorkerPlan, conn: Connection) -> None:
    """Entry point of a worker process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        asyncio.run(Worker(plan, conn).run())
    finally:
        conn.close()
