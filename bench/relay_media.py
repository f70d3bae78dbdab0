"""Synthetic media for the relay benchmark: a VP8 clip encoded once, ahead of time, with a
frame counter stamped into its pixels, and an Opus tone; tracks that replay them as
`av.Packet`s (aiortc's sender packetizes packets without encoding), and the counter reader.

The clip: 640x480 at 30 fps, a textured background panning a few pixels a frame plus a little
noise (so the encoder spends about the target bitrate, ~1 Mbit/s, like a camera), and the
frame's index in the clip as 16 black/white 16x16 blocks along the top of the luma plane. It
is cut into closed groups of pictures (a keyframe every `gop` frames, nothing referring across
them): a publisher answers a keyframe request (PLI/FIR) at once, the way a browser does, by
jumping to the start of the next group, a keyframe. (Splicing a keyframe of the same picture
into the delta stream does not work: libvpx's delta frames also refer to its golden frame.)

A publisher's frame number n (0, 1, 2, ... since it started) goes out as some clip frame, with
pts n * 3000 in the 90 kHz clock; the publisher notes when each n left and which clip frame it
was. A subscriber tells n apart from RTP timestamp differences, and the clip frame from the
decoded counter; the two agree or the benchmark says so.
"""

from __future__ import annotations

import asyncio
import fractions
import hashlib
import math
import pickle
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

VIDEO_CLOCK = 90_000
AUDIO_CLOCK = 48_000
AUDIO_SAMPLES = 960  # 20 ms
COUNTER_BITS = 16
BLOCK = 16
CLIP_VERSION = 2


@dataclass(frozen=True)
class ClipSpec:
    width: int = 640
    height: int = 480
    fps: int = 30
    kbps: int = 1000
    frames: int = 600
    gop: int = 150

    def key(self) -> str:
        text = f"{CLIP_VERSION}-{self.width}x{self.height}-{self.fps}-{self.kbps}-{self.frames}"
        text += f"-{self.gop}"
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Clip:
    spec: ClipSpec
    video: list[bytes]  # VP8 frames; every `spec.gop`-th a keyframe
    audio: list[bytes]  # 1 s of Opus, 20 ms packets

    @property
    def frames(self) -> int:
        return len(self.video)

    def video_kbps(self) -> float:
        return sum(len(d) for d in self.video) * 8 * self.spec.fps / len(self.video) / 1e3


# --- making the clip --------------------------------------------------------------------------


def _video_encoder(spec: ClipSpec, kbps: int) -> av.VideoCodecContext:
    """libvpx as aiortc's Vp8Encoder sets it up (real-time, CBR, no lag), one thread."""
    codec = av.CodecContext.create("libvpx", "w")
    codec.width = spec.width
    codec.height = spec.height
    codec.bit_rate = kbps * 1000
    codec.pix_fmt = "yuv420p"
    codec.framerate = fractions.Fraction(spec.fps, 1)
    codec.time_base = fractions.Fraction(1, spec.fps)
    codec.gop_size = 100_000
    codec.qmin = 2
    codec.qmax = 56
    bps = str(kbps * 1000)
    codec.options = {
        "bufsize": bps,
        "cpu-used": "-6",
        "deadline": "realtime",
        "lag-in-frames": "0",
        "minrate": bps,
        "maxrate": bps,
        "noise-sensitivity": "4",
        "overshoot-pct": "15",
        "partitions": "0",
        "static-thresh": "1",
        "undershoot-pct": "100",
    }
    codec.thread_count = 1
    return codec


def stamp_counter(luma: np.ndarray, value: int) -> None:
    for bit in range(COUNTER_BITS):
        luma[0:BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = 235 if (value >> bit) & 1 else 16


def _pictures(spec: ClipSpec) -> Callable[[int], av.VideoFrame]:
    w, h = spec.width, spec.height
    rng = np.random.default_rng(20_260_501)
    coarse = rng.integers(16, 236, (h // 4, w // 4), dtype=np.uint8)
    texture = np.kron(coarse, np.ones((8, 8), dtype=np.uint8)).astype(np.float64)
    for _ in range(3):
        texture = (
            texture
            + np.roll(texture, 4, 0)
            + np.roll(texture, -4, 0)
            + np.roll(texture, 4, 1)
            + np.roll(texture, -4, 1)
        ) / 5
    noise = rng.integers(-6, 7, (30, h, w)).astype(np.int16)
    chroma_u = np.full((h // 2, w // 2), 100, dtype=np.uint8)
    chroma_v = np.full((h // 2, w // 2), 150, dtype=np.uint8)
    tex = texture.astype(np.int16)

    def picture(n: int) -> av.VideoFrame:
        y0, x0 = (2 * n) % h, (3 * n) % w
        luma = np.clip(tex[y0 : y0 + h, x0 : x0 + w] + noise[n % 30], 16, 235).astype(np.uint8)
        stamp_counter(luma, n)
        frame = av.VideoFrame(w, h, "yuv420p")
        _fill_plane(frame.planes[0], luma)
        _fill_plane(frame.planes[1], chroma_u)
        _fill_plane(frame.planes[2], chroma_v)
        frame.pts = n
        frame.time_base = fractions.Fraction(1, spec.fps)
        return frame

    return picture


def _fill_plane(plane: av.video.plane.VideoPlane, data: np.ndarray) -> None:
    rows, cols = data.shape
    if plane.line_size == cols:
        plane.update(data.tobytes())
        return
    padded = np.zeros((rows, plane.line_size), dtype=np.uint8)
    padded[:, :cols] = data
    plane.update(padded.tobytes())


def _encode(codec: av.VideoCodecContext, frame: av.VideoFrame) -> bytes:
    return b"".join(bytes(p) for p in codec.encode(frame))


def _opus_second(frequency: float = 440.0) -> list[bytes]:
    from aiortc.codecs.opus import OpusEncoder

    encoder = OpusEncoder()
    packets: list[bytes] = []
    sample = 0
    # Encode a little more than a second and keep 50 packets (the encoder buffers a frame).
    while len(packets) < 50:
        t = (np.arange(AUDIO_SAMPLES) + sample) / AUDIO_CLOCK
        wave = (0.4 * 32767 * np.sin(2 * math.pi * frequency * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(wave.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_CLOCK
        frame.pts = sample
        frame.time_base = fractions.Fraction(1, AUDIO_CLOCK)
        sample += AUDIO_SAMPLES
        payloads, _ = encoder.encode(frame)
        packets += payloads
    return packets[:50]


def make_clip(spec: ClipSpec) -> Clip:
    if spec.frames % spec.gop:
        raise ValueError("the clip's length must be a whole number of groups of pictures")
    picture = _pictures(spec)
    codec = _video_encoder(spec, spec.kbps)
    video: list[bytes] = []
    for n in range(spec.frames):
        frame = picture(n)
        if n % spec.gop == 0:
            frame.pict_type = av.video.frame.PictureType.I
        video.append(_encode(codec, frame))
    codec.encode(None)  # flush; lag-in-frames 0 leaves nothing behind
    keyframes = [n for n, data in enumerate(video) if is_vp8_keyframe(data)]
    if keyframes != list(range(0, spec.frames, spec.gop)):
        raise RuntimeError(f"keyframes at {keyframes[:10]}, wanted every {spec.gop} frames")
    return Clip(spec, video, _opus_second())


def load_clip(spec: ClipSpec, cache_dir: Path) -> Clip:
    """The clip from the cache, made (and cached) on first use."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = clip_path(spec, cache_dir)
    if path.exists():
        with path.open("rb") as f:
            clip = pickle.load(f)
        if isinstance(clip, Clip) and clip.spec == spec:
            return clip
    clip = make_clip(spec)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump(clip, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return clip


def clip_path(spec: ClipSpec, cache_dir: Path) -> Path:
    return cache_dir / f"relay-clip-{spec.key()}.pickle"


def is_vp8_keyframe(data: bytes) -> bool:
    return bool(data) and (data[0] & 0x01) == 0


# --- replaying it -----------------------------------------------------------------------------


class PacketVideoTrack(MediaStreamTrack):
    """Sends the clip's frames as packets at the clip's frame rate (never skipping: a late
    frame is sent late and the schedule is kept), noting when each frame n left `recv()` and
    which clip frame it was. A keyframe request makes the next frame the next keyframe."""

    kind = "video"

    def __init__(self, clip: Clip) -> None:
        super().__init__()
        self._clip = clip
        self._interval = 1.0 / clip.spec.fps
        self._step = VIDEO_CLOCK // clip.spec.fps
        self._start: float | None = None
        self._n = 0
        self._index = 0
        self._keyframe_wanted = False
        self.sent = array("d")  # time.monotonic() when frame n was handed to the sender
        self.index = array("i")  # the clip frame sent as frame n
        self.keyframe_requests = 0

    def request_keyframe(self) -> None:
        self.keyframe_requests += 1
        self._keyframe_wanted = True

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._n * self._interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        gop = self._clip.spec.gop
        if self._keyframe_wanted and self._index % gop:
            self._index = (self._index // gop + 1) * gop % self._clip.frames
        self._keyframe_wanted = False
        packet = av.Packet(self._clip.video[self._index])
        packet.pts = self._n * self._step
        packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.sent.append(time.monotonic())
        self.index.append(self._index)
        self._n += 1
        self._index = (self._index + 1) % self._clip.frames
        return packet


class PacketAudioTrack(MediaStreamTrack):
    """Loops one second of Opus packets, 20 ms apart."""

    kind = "audio"

    def __init__(self, clip: Clip) -> None:
        super().__init__()
        self._packets = clip.audio
        self._start: float | None = None
        self._n = 0

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._n * AUDIO_SAMPLES / AUDIO_CLOCK - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        packet = av.Packet(self._packets[self._n % len(self._packets)])
        packet.pts = self._n * AUDIO_SAMPLES
        packet.time_base = fractions.Fraction(1, AUDIO_CLOCK)
        self._n += 1
        return packet


# --- reading it back --------------------------------------------------------------------------


class CounterReader:
    """Decodes a VP8 stream (every frame, in order, as a browser would) and reads the counter
    from the luma plane; None for a frame that does not decode."""

    def __init__(self) -> None:
        self._codec = av.CodecContext.create("libvpx", "r")
        self._codec.thread_count = 1
        self.errors = 0

    def read(self, data: bytes) -> int | None:
        try:
            frames = self._codec.decode(av.Packet(data))
        except av.error.FFmpegError:
            self.errors += 1
            return None
        if not frames:
            return None
        return read_counter(frames[0])


def read_counter(frame: av.VideoFrame) -> int:
    plane = frame.planes[0]
    luma = np.frombuffer(memoryview(plane), dtype=np.uint8, count=plane.line_size * BLOCK).reshape(
        BLOCK, plane.line_size
    )
    count = 0
    for bit in range(COUNTER_BITS):
        block = luma[2 : BLOCK - 2, bit * BLOCK + 2 : (bit + 1) * BLOCK - 2]
        if block.mean() > 127:
            count |= 1 << bit
    return count


def decode_counter_once(data: bytes) -> int | None:
    """The counter of one keyframe, decoded on its own."""
    return CounterReader().read(data) if is_vp8_keyframe(data) else None
