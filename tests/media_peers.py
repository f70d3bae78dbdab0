"""PYTEST_DONT_REWRITE
Synthetic media with known content, and the checks that read it back: a solid colour with a
frame counter stamped into the pixels, and a pure tone."""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections.abc import Callable

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack, VideoStreamTrack

from media.ice_hosts import offer_host_addresses

LOOPBACK = ["127.0.0.1"]
BITS = 16
BLOCK = 16


class ColourCounterTrack(VideoStreamTrack):
    """Solid `colour` frames; frame n carries n in a row of black/white blocks at the top."""

    def __init__(
        self,
        colour: tuple[int, int, int],
        width: int = 320,
        height: int = 240,
        *,
        noise: bool = False,
    ) -> None:
        super().__init__()
        self.colour = colour
        # Random pixels in the bottom quarter make the picture expensive to encode, like a real
        # camera, so the encoder runs at its target bitrate.
        self.noise = noise
        self.width = width
        self.height = height
        self.count = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        image = np.empty((self.height, self.width, 3), dtype=np.uint8)
        image[:, :] = self.colour
        if self.noise:
            rows = slice(3 * self.height // 4, self.height)
            image[rows] = np.random.randint(0, 256, image[rows].shape, dtype=np.uint8)
        for bit in range(counter_bits(self.width)):
            value = 255 if (self.count >> bit) & 1 else 0
            image[0:BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = value
        self.count += 1
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = pts
        frame.time_base = time_base
        return frame


class ToneTrack(AudioStreamTrack):
    """A sine tone of `frequency` Hz, 48 kHz mono, 20 ms frames."""

    def __init__(self, frequency: float) -> None:
        super().__init__()
        self.frequency = frequency
        self._sample = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        rate, samples = 48_000, 960
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._sample / rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (np.arange(samples) + self._sample) / rate
        wave = (0.5 * 32767 * np.sin(2 * math.pi * self.frequency * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(wave.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = self._sample
        frame.time_base = fractions.Fraction(1, rate)
        self._sample += samples
        return frame


def counter_bits(width: int) -> int:
    return min(BITS, width // BLOCK)


def read_counter(frame: av.VideoFrame) -> int:
    image = frame.to_ndarray(format="rgb24")
    count = 0
    for bit in range(counter_bits(frame.width)):
        block = image[2 : BLOCK - 2, bit * BLOCK + 2 : (bit + 1) * BLOCK - 2]
        if block.mean() > 127:
            count |= 1 << bit
    return count


def mean_colour(frame: av.VideoFrame) -> tuple[int, int, int]:
    image = frame.to_ndarray(format="rgb24")
    h, w, _ = image.shape
    centre = image[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].reshape(-1, 3).mean(axis=0)
    return int(centre[0]), int(centre[1]), int(centre[2])


def close_to(
    colour: tuple[int, int, int], wanted: tuple[int, int, int], tolerance: int = 30
) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, wanted, strict=True))


def dominant_frequency(frames: list[av.AudioFrame]) -> float:
    chunks = []
    for frame in frames:
        data = frame.to_ndarray()
        # Packed stereo s16 from the Opus decoder: take the first channel.
        mono = data.reshape(-1, len(frame.layout.channels))[:, 0] if data.ndim == 2 else data
        chunks.append(mono.astype(np.float64))
    signal = np.concatenate(chunks)
    rate = frames[0].sample_rate
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[int(np.argmax(spectrum))])


class Collector:
    """Reads a received track in the background and keeps what arrives."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.track = track
        self.frames: list[av.VideoFrame | av.AudioFrame] = []
        self.arrival: list[float] = []
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                self.frames.append(frame)
                self.arrival.append(time.monotonic())
        except Exception:
            return

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def wait_for(condition: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def local_description(pc: RTCPeerConnection, offer: bool) -> str:
    offer_host_addresses(pc, LOOPBACK)
    description = await (pc.createOffer() if offer else pc.createAnswer())
    await pc.setLocalDescription(description)
    return pc.localDescription.sdp


async def answer_offer(pc: RTCPeerConnection, offer_sdp: str) -> str:
    await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
    return await local_description(pc, offer=False)
