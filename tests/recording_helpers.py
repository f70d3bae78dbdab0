"""PYTEST_DONT_REWRITE
Known content for recording tests, encoded for real (libvpx, libopus) into the EncodedFrames the
relay hands its listeners, and the checks that read recordings back."""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from media.frames import EncodedFrame
from media.recording import DiskWriter, SegmentInfo, SegmentWriter
from media.sealed import SealKeys, media_input

Colour = tuple[int, int, int]
WHITE: Colour = (255, 255, 255)
VIDEO_STEP = 3000  # 90 kHz ticks per frame at 30 fps
AUDIO_STEP = 960  # 48 kHz ticks per 20 ms Opus packet


def vp8_frames(
    colour: Colour,
    seconds: float,
    *,
    width: int = 320,
    height: int = 240,
    fps: int = 30,
    bitrate: int = 300_000,
    flash: tuple[float, float] | None = None,
    noise: bool = False,
    first_timestamp: int = 1234,
) -> list[EncodedFrame]:
    """Solid `colour` (white during `flash`, seconds from the start) encoded as VP8, a keyframe
    every two seconds, with 90 kHz timestamps. `noise` fills the bottom quarter with random
    pixels, so the encoder has to spend its bitrate like on a camera picture."""
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = fractions.Fraction(1, fps)
    encoder.bit_rate = bitrate
    encoder.gop_size = 2 * fps
    encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    step = 90_000 // fps
    frames: list[EncodedFrame] = []
    rng = np.random.default_rng(7)
    for n in range(round(seconds * fps)):
        t = n / fps
        shade = WHITE if flash is not None and flash[0] <= t < flash[1] else colour
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[:, :] = shade
        if noise:
            rows = slice(3 * height // 4, height)
            image[rows] = rng.integers(0, 256, image[rows].shape, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = n
        for packet in encoder.encode(frame):
            assert packet.pts is not None
            frames.append(
                EncodedFrame(bytes(packet), first_timestamp + packet.pts * step, packet.is_keyframe)
            )
    return frames


def opus_frames(
    frequency: float,
    seconds: float,
    *,
    amplitude: float = 0.2,
    beep: tuple[float, float, float] | None = None,
    first_timestamp: int = 777,
) -> list[EncodedFrame]:
    """A `frequency` Hz tone (plus, if given, a loud `beep` = (start s, end s, Hz)) encoded as
    20 ms Opus packets, with 48 kHz timestamps."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = 48_000
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.bit_rate = 48_000
    frames: list[EncodedFrame] = []
    for n in range(round(seconds * 50)):
        t = (np.arange(AUDIO_STEP) + n * AUDIO_STEP) / 48_000
        wave = amplitude * np.sin(2 * math.pi * frequency * t)
        if beep is not None:
            wave += np.where((t >= beep[0]) & (t < beep[1]), 0.6, 0.0) * np.sin(
                2 * math.pi * beep[2] * t
            )
        samples = (wave * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 48_000
        frame.pts = n * AUDIO_STEP
        for packet in encoder.encode(frame):
            assert packet.pts is not None
            frames.append(EncodedFrame(bytes(packet), first_timestamp + packet.pts, True))
    return frames


class ManualClock:
    """A session clock the test sets by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Fed:
    """A track fed into a writer: its segment and the frames it was given."""

    segment: SegmentWriter
    frames: list[EncodedFrame]


async def record_track(
    writer: DiskWriter,
    path: Path,
    kind: str,
    frames: Sequence[EncodedFrame],
    *,
    clock: ManualClock | None = None,
    start_s: float = 0.0,
    keyframe_requests: list[float] | None = None,
    keys: SealKeys | None = None,
) -> SegmentInfo:
    """Pushes `frames` into a new segment as the relay would, the first arriving at session
    time `start_s`, and closes it (sealed, given `keys`)."""
    requests = keyframe_requests if keyframe_requests is not None else []
    clock = clock or ManualClock()
    segment = SegmentWriter(
        writer,
        path,
        kind,
        session_clock=clock,
        request_keyframe=lambda: requests.append(0.0),
        keys=keys,
    )
    clock.now = start_s
    for frame in frames:
        segment.push(frame)
        await asyncio.sleep(0)
    info = await segment.close()
    assert info is not None
    return info


@dataclass
class Decoded:
    codec: str
    duration_s: float
    video: list[av.VideoFrame]
    audio: list[av.AudioFrame]


def decode(path: Path, keys: SealKeys | None = None) -> Decoded:
    """Every frame of a segment file (through the seal, given `keys`; a cut-short file up to
    its last whole chunk)."""
    with media_input(path, keys, unfinished_ok=True) as container:
        stream = container.streams[0]
        video: list[av.VideoFrame] = []
        audio: list[av.AudioFrame] = []
        times: list[float] = []
        # Packed s16, as aiortc's decoder gives it (what media_peers' checks expect).
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=48_000)
        for frame in container.decode(stream):
            assert frame.time is not None
            times.append(frame.time)
            if isinstance(frame, av.VideoFrame):
                video.append(frame)
            elif isinstance(frame, av.AudioFrame):
                audio.extend(resampler.resample(frame))
        step = (times[-1] - times[0]) / max(1, len(times) - 1)
        return Decoded(stream.codec_context.name, times[-1] - times[0] + step, video, audio)


def centre_colour(image: np.ndarray, box: tuple[int, int, int, int]) -> Colour:
    """Mean colour of the middle of box = (x, y, w, h) of an RGB image."""
    x, y, w, h = box
    part = image[y + h // 3 : y + 2 * h // 3, x + w // 3 : x + 2 * w // 3].reshape(-1, 3)
    mean = part.mean(axis=0)
    return int(mean[0]), int(mean[1]), int(mean[2])


def spectrum(signal: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    magnitude = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return np.fft.rfftfreq(len(signal), 1 / rate), magnitude


def has_tone(signal: np.ndarray, rate: int, frequency: float, ratio: float = 20.0) -> bool:
    """Whether `frequency` stands out of the spectrum (peak near it vs the median level)."""
    freqs, magnitude = spectrum(signal, rate)
    near = magnitude[(freqs > frequency - 10) & (freqs < frequency + 10)]
    return bool(near.max() > ratio * np.median(magnitude))


def onset(values: Sequence[float], threshold: float) -> int:
    """Index of the first value above `threshold`."""
    return next(i for i, v in enumerate(values) if v > threshold)


def tone_energy(signal: np.ndarray, rate: int, frequency: float, window: int) -> list[float]:
    """Energy at `frequency` in consecutive windows of `window` samples (Goertzel-like)."""
    t = np.arange(window) / rate
    probe = np.exp(-2j * math.pi * frequency * t)
    return [
        float(abs(np.dot(signal[i : i + window], probe)))
        for i in range(0, len(signal) - window, window)
    ]


def record_until_killed(directory: str, started: Any, key: bytes | None = None) -> None:
    """The crash test's child process: records a video and an audio track in real time (as
    they would arrive from a publisher; sealed with `key` if given) until it is killed; sets
    `started` at the first frame."""
    keys = SealKeys(key) if key is not None else None
    asyncio.run(_record_in_real_time(Path(directory), started, keys))


async def _record_in_real_time(directory: Path, started: Any, keys: SealKeys | None) -> None:
    video = vp8_frames((40, 200, 40), 15.0)
    audio = opus_frames(660.0, 15.0)
    writer = DiskWriter()
    writer.start()
    origin = time.monotonic()

    def session_clock() -> float:
        return time.monotonic() - origin

    segments = {
        kind: SegmentWriter(
            writer, directory / f"{kind}.webm", kind, session_clock=session_clock, keys=keys
        )
        for kind in ("video", "audio")
    }
    timeline = [((f.timestamp - video[0].timestamp) / 90_000, "video", f) for f in video]
    timeline += [((f.timestamp - audio[0].timestamp) / 48_000, "audio", f) for f in audio]
    timeline.sort(key=lambda item: item[0])
    for at, kind, frame in timeline:
        delay = origin + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        segments[kind].push(frame)
        if not started.is_set():
            started.set()
    await asyncio.sleep(3600)  # killed long before
