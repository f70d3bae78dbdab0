"""The composite of a recorded session: one MP4 (H.264 + AAC) with a grid of the video tiles,
each labelled, placed on the session clock, the audio tracks mixed, and optionally annotation
strokes burnt in (the teaching copy).

Given `SealKeys`, the segments are read through their seal and the MP4 is sealed as it is
written (media/sealed.py), so no plaintext reaches the disk. Its index then goes at the end
(no `faststart`, which rereads the file): players fetch it with a Range request. The child
process gets the keys on its stdin, never in the job file.

Rendering decodes and encodes, so it never runs in the server's process: `run_composite`
starts `python -m media.composite JOB.json` and reads its progress; `render_composite` is the
same work in the calling process (the worker, or a CLI). The output is written to a temporary
file beside it and renamed over it at the end, so a rerun replaces it whole and a failed run
leaves the previous one."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from media.recording import SegmentInfo, file_sha256
from media.sealed import SealedWriter, SealKeys, media_input, plaintext_sha256

CJK_FONT = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")
AUDIO_RATE = 48_000
AAC_FRAME = 1024
# Audio placed within this many samples of where the previous frame ended continues it
# (Matroska stores times in whole milliseconds); further away it is a real gap or overlap.
_SNAP_SAMPLES = AUDIO_RATE // 100

Progress = Callable[[float], None]
Image8 = NDArray[np.uint8]
Samples = NDArray[np.float32]


# --- the job --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentRef:
    """A segment file and where it sits on the session clock; `sha256`, what the record says
    was recorded into it (checked before a sealed segment is used)."""

    path: str
    start_s: float
    duration_s: float
    track_id: str = ""
    sha256: str | None = None


@dataclass(frozen=True)
class Tile:
    """One picture in the grid: a label and the video segments shown in it, in time order
    (a participant's camera across reconnects is one tile)."""

    label: str
    segments: tuple[SegmentRef, ...]


@dataclass(frozen=True)
class Stroke:
    """An annotation: drawn on the tile showing `track_id` from `at_s` (session clock) for the
    job's `stroke_s`. Points are (x, y) in 0..1 of the picture; colour is "#rrggbb"."""

    track_id: str
    at_s: float
    points: tuple[tuple[float, float], ...]
    colour: str = "#ff0000"
    width: int = 4


@dataclass(frozen=True)
class CompositeJob:
    output: str
    tiles: tuple[Tile, ...]
    audio: tuple[SegmentRef, ...] = ()
    strokes: tuple[Stroke, ...] = ()
    width: int = 1280
    height: int = 720
    fps: int = 15
    stroke_s: float = 4.0
    crf: int = 26
    preset: str = "superfast"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> CompositeJob:
        raw = json.loads(text)

        def ref(r: dict[str, Any]) -> SegmentRef:
            return SegmentRef(**r)

        return cls(
            **{
                **raw,
                "tiles": tuple(
                    Tile(t["label"], tuple(ref(s) for s in t["segments"])) for t in raw["tiles"]
                ),
                "audio": tuple(ref(s) for s in raw["audio"]),
                "strokes": tuple(
                    Stroke(**{**s, "points": tuple(tuple(p) for p in s["points"])})
                    for s in raw["strokes"]
                ),
            }
        )


def job_from_segments(
    segments: Sequence[SegmentInfo],
    output: Path,
    *,
    strokes: Sequence[Stroke] = (),
    **options: Any,
) -> CompositeJob:
    """A job from a recording's segments: one tile per participant and video source (in the
    order they first appear), labelled with its first segment's label, and every audio
    segment mixed. Segments without a file (FAILED with nothing written) are left out."""
    usable = sorted(
        (s for s in segments if s.duration_s > 0 and s.path.exists()), key=lambda s: s.start_s
    )
    tiles: dict[tuple[str, str], list[SegmentInfo]] = {}
    for s in usable:
        if s.kind == "video":
            tiles.setdefault((s.participant or s.track_id, s.source), []).append(s)

    def ref(s: SegmentInfo) -> SegmentRef:
        return SegmentRef(str(s.path), s.start_s, s.duration_s, s.track_id, s.sha256)

    return CompositeJob(
        output=str(output),
        tiles=tuple(Tile(group[0].label, tuple(ref(s) for s in group)) for group in tiles.values()),
        audio=tuple(ref(s) for s in usable if s.kind == "audio"),
        strokes=tuple(strokes),
        **options,
    )


@dataclass(frozen=True)
class CompositeResult:
    output: str
    duration_s: float
    frames: int
    size_bytes: int
    sha256: str
    render_s: float

    @property
    def speed(self) -> float:
        """Multiple of real time."""
        return self.duration_s / self.render_s if self.render_s > 0 else math.inf


class CompositeError(Exception):
    pass


# --- layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int


def grid(count: int, width: int, height: int) -> list[Rect]:
    """Tile rectangles: 1, 2 side by side, 2×2, 3×2, 3×3, ... filled row by row."""
    if count <= 0:
        return []
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    tw, th = width // cols // 2 * 2, height // rows // 2 * 2
    return [Rect((i % cols) * tw, (i // cols) * th, tw, th) for i in range(count)]


def _fit(src_w: int, src_h: int, box: Rect) -> Rect:
    """The largest rectangle of the source's shape centred in `box` (even sizes and offsets,
    as 4:2:0 chroma needs)."""
    scale = min(box.width / src_w, box.height / src_h)
    w = max(2, int(src_w * scale) // 2 * 2)
    h = max(2, int(src_h * scale) // 2 * 2)
    return Rect((box.width - w) // 4 * 2, (box.height - h) // 4 * 2, w, h)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if CJK_FONT.exists():
        return ImageFont.truetype(str(CJK_FONT), size)
    return ImageFont.load_default(size)


# Pictures are composed as YUV 4:2:0 planes (Y, U, V), what the decoder gives and the encoder
# takes: no colour conversion of whole frames, only scaling.
Planes = tuple[Image8, Image8, Image8]


def _planes(frame: av.VideoFrame) -> Planes:
    """The planes of a yuv420p frame, as arrays."""
    w, h = frame.width, frame.height
    flat = np.asarray(frame.to_ndarray(), dtype=np.uint8).reshape(-1)
    return (
        flat[: w * h].reshape(h, w),
        flat[w * h : w * h * 5 // 4].reshape(h // 2, w // 2),
        flat[w * h * 5 // 4 :].reshape(h // 2, w // 2),
    )


def _rgb_planes(rgb: Image8) -> Planes:
    return _planes(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p"))


def _planes_rgb(planes: Planes) -> Image8:
    flat = np.concatenate([p.reshape(-1) for p in planes])
    h, w = planes[0].shape
    frame = av.VideoFrame.from_ndarray(flat.reshape(h * 3 // 2, w), format="yuv420p")
    return np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)


def _paste(canvas: Planes, planes: Planes, x: int, y: int) -> None:
    for i, plane in enumerate(planes):
        d = 1 if i == 0 else 2
        h, w = plane.shape
        canvas[i][y // d : y // d + h, x // d : x // d + w] = plane


@dataclass
class _Overlay:
    """An RGBA picture blended onto the canvas: per plane, premultiplied colour and the
    share of the picture below that shows through."""

    x: int
    y: int
    colour: tuple[NDArray[np.float32], ...]
    keep: tuple[NDArray[np.float32], ...]

    @classmethod
    def from_image(cls, image: Image.Image, x: int, y: int) -> _Overlay:
        rgba = np.asarray(image.convert("RGBA"))
        h, w = rgba.shape[0] // 2 * 2, rgba.shape[1] // 2 * 2
        rgba = rgba[:h, :w]
        alpha = rgba[:, :, 3].astype(np.float32) / 255.0
        half = alpha.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        alphas = (alpha, half, half)
        planes = _rgb_planes(np.ascontiguousarray(rgba[:, :, :3]))
        return cls(
            x,
            y,
            tuple((p * a).astype(np.float32) for p, a in zip(planes, alphas, strict=True)),
            tuple((1.0 - a).astype(np.float32) for a in alphas),
        )

    def blend(self, canvas: Planes, x: int, y: int) -> None:
        """Blends onto `canvas` with the overlay's corner at (x + self.x, y + self.y)."""
        for i, plane in enumerate(canvas):
            d = 1 if i == 0 else 2
            h, w = self.keep[i].shape
            top, left = (y + self.y) // d, (x + self.x) // d
            region = plane[top : top + h, left : left + w]
            rh, rw = region.shape
            region[:] = region * self.keep[i][:rh, :rw] + self.colour[i][:rh, :rw]


def _label(text: str, box: Rect) -> _Overlay | None:
    if not text:
        return None
    size = max(12, box.height // 16)
    font = _font(size)
    pad = size // 3
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    left, top, right, bottom = (int(v) for v in probe.textbbox((0, 0), text, font=font))
    w = min(box.width, right - left + 2 * pad) // 2 * 2
    h = (bottom - top + 2 * pad + 1) // 2 * 2
    image = Image.new("RGBA", (w, h), (0, 0, 0, 160))
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=(255, 255, 255, 255))
    return _Overlay.from_image(image, 0, box.height - h)


def _placeholder(box: Rect) -> Planes:
    """A tile with no picture: black with a dash."""
    image = Image.new("RGB", (box.width, box.height), (0, 0, 0))
    font = _font(max(16, box.height // 6))
    ImageDraw.Draw(image).text(
        (box.width // 2, box.height // 2), "—", font=font, fill=(90, 90, 90), anchor="mm"
    )
    return _rgb_planes(np.asarray(image, dtype=np.uint8))


# --- video ----------------------------------------------------------------------------------


def _video_frames(ref: SegmentRef, keys: SealKeys | None) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decoded frames of one segment with their session-clock times."""
    with media_input(Path(ref.path), keys, unfinished_ok=True) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        first: float | None = None
        try:
            for frame in container.decode(stream):
                if frame.pts is None or frame.time is None:
                    continue
                if first is None:
                    first = frame.time
                yield ref.start_s + frame.time - first, frame
        except av.FFmpegError:
            return  # a torn end (an interrupted segment): what came before is shown


class _TileSource:
    """What one tile shows at each output time: the newest frame at or before it (within half
    an output frame) while a segment is running, else the placeholder."""

    def __init__(self, tile: Tile, box: Rect, half_frame_s: float, keys: SealKeys | None) -> None:
        self.box = box
        self.keys = keys
        self.segments = sorted(tile.segments, key=lambda s: s.start_s)
        self.half = half_frame_s
        self.track_ids = {s.track_id for s in self.segments}
        self.label = _label(tile.label, box)
        self.placeholder = _placeholder(box)
        self._frames = self._all_frames()
        self._next: tuple[float, int, av.VideoFrame] | None = next(self._frames, None)
        self._current: tuple[float, int, av.VideoFrame] | None = None
        self._picture: Planes | None = None
        self.fit: Rect | None = None

    def _all_frames(self) -> Iterator[tuple[float, int, av.VideoFrame]]:
        for index, ref in enumerate(self.segments):
            for t, frame in _video_frames(ref, self.keys):
                yield t, index, frame

    def draw(self, canvas: Planes, t: float, strokes: list[Stroke]) -> None:
        """Paints the tile as it is at output time `t` onto `canvas`, with `strokes` and the
        label over it."""
        picture = self._at(t)
        if strokes and self.fit is not None and picture is not self.placeholder:
            picture = _rgb_planes(_draw_strokes(_planes_rgb(picture), strokes, self.fit))
        _paste(canvas, picture, self.box.x, self.box.y)
        if self.label is not None:
            self.label.blend(canvas, self.box.x, self.box.y)

    def _at(self, t: float) -> Planes:
        changed = False
        while self._next is not None and self._next[0] <= t + self.half:
            self._current = self._next
            self._next = next(self._frames, None)
            changed = True
        current = self._current
        if current is None:
            return self.placeholder
        segment = self.segments[current[1]]
        if not (segment.start_s - self.half <= t <= segment.start_s + segment.duration_s):
            return self.placeholder
        if changed or self._picture is None:
            # Only frames that are shown are scaled; the decoder still sees every one.
            self._picture = self._scaled(current[2])
        return self._picture

    def _scaled(self, frame: av.VideoFrame) -> Planes:
        fit = _fit(frame.width, frame.height, self.box)
        self.fit = fit
        scaled = frame.reformat(
            width=fit.width, height=fit.height, format="yuv420p", interpolation="FAST_BILINEAR"
        )
        if (fit.width, fit.height) == (self.box.width, self.box.height):
            return _planes(scaled)
        tile = (
            np.full((self.box.height, self.box.width), 16, dtype=np.uint8),
            np.full((self.box.height // 2, self.box.width // 2), 128, dtype=np.uint8),
            np.full((self.box.height // 2, self.box.width // 2), 128, dtype=np.uint8),
        )
        _paste(tile, _planes(scaled), fit.x, fit.y)
        return tile


def _draw_strokes(tile: Image8, strokes: list[Stroke], fit: Rect) -> Image8:
    image = Image.fromarray(tile)
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        points = [(fit.x + x * fit.width, fit.y + y * fit.height) for x, y in stroke.points]
        if len(points) == 1:
            (x, y), r = points[0], stroke.width
            draw.ellipse((x - r, y - r, x + r, y + r), fill=stroke.colour)
        else:
            draw.line(points, fill=stroke.colour, width=stroke.width, joint="curve")
    return np.asarray(image, dtype=np.uint8)


# --- audio ----------------------------------------------------------------------------------


class _AudioSource:
    """One audio segment decoded to stereo float samples, positioned on the session clock."""

    def __init__(self, ref: SegmentRef, keys: SealKeys | None) -> None:
        self.ref = ref
        self.keys = keys
        self._chunks: deque[tuple[int, Samples]] = deque()
        self._decoded = self._decode()
        self._done = False
        self.end = round((ref.start_s + ref.duration_s) * AUDIO_RATE)

    def _decode(self) -> Iterator[tuple[int, Samples]]:
        base = round(self.ref.start_s * AUDIO_RATE)
        resampler = av.AudioResampler(format="flt", layout="stereo", rate=AUDIO_RATE)
        with media_input(Path(self.ref.path), self.keys, unfinished_ok=True) as container:
            stream = container.streams.audio[0]
            first: int | None = None
            position: int | None = None
            try:
                for frame in container.decode(stream):
                    if frame.pts is None or frame.time is None:
                        continue
                    at = round(frame.time * AUDIO_RATE)
                    first = at if first is None else first
                    placed = base + at - first
                    if position is not None and abs(placed - position) <= _SNAP_SAMPLES:
                        placed = position
                    for out in resampler.resample(frame):
                        samples = out.to_ndarray().reshape(-1, 2).astype(np.float32)
                        yield placed, samples
                        placed += len(samples)
                    position = placed
            except av.FFmpegError:
                return  # a torn end: keep what decoded

    def add_to(self, mix: Samples, start: int) -> None:
        """Adds this source's samples for [start, start + len(mix)) into `mix`."""
        stop = start + len(mix)
        while not self._done and (not self._chunks or self._chunk_end() < stop):
            chunk = next(self._decoded, None)
            if chunk is None:
                self._done = True
            else:
                self._chunks.append(chunk)
        while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= start:
            self._chunks.popleft()
        for at, samples in self._chunks:
            lo, hi = max(at, start), min(at + len(samples), stop)
            if lo < hi:
                mix[lo - start : hi - start] += samples[lo - at : hi - at]

    def _chunk_end(self) -> int:
        at, samples = self._chunks[-1]
        return at + len(samples)


# --- rendering ------------------------------------------------------------------------------


def render_composite(
    job: CompositeJob,
    progress: Progress | None = None,
    partial: Callable[[Path], None] | None = None,
    keys: SealKeys | None = None,
) -> CompositeResult:
    """Renders the job into `job.output` (replaced atomically), calling `progress` with
    0..1 as it goes and 1.0 at the end, and `partial` with the temporary file it writes
    first; segments and output sealed with `keys` if given (the SHA-256 is then of the
    plaintext). Blocking and CPU-heavy: run it in a worker process (see `run_composite`)."""
    began = time.monotonic()
    ends = [s.start_s + s.duration_s for t in job.tiles for s in t.segments]
    ends += [s.start_s + s.duration_s for s in job.audio]
    if not ends:
        raise CompositeError("the job has no segments")
    duration = max(ends)
    if keys is not None:
        _check_recorded(job, keys)
    frames = max(1, math.ceil(duration * job.fps))
    output = Path(job.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    temp = Path(temp_name)
    if partial is not None:
        partial(temp)
    try:
        _render(job, temp, duration, frames, progress, keys)
        os.replace(temp, output)
    finally:
        temp.unlink(missing_ok=True)
    digest, size = file_sha256(output) if keys is None else plaintext_sha256(output, keys)
    if progress is not None:
        progress(1.0)
    return CompositeResult(
        str(output), frames / job.fps, frames, size, digest, time.monotonic() - began
    )


def _check_recorded(job: CompositeJob, keys: SealKeys) -> None:
    """Every segment reads back as the record says it was recorded."""
    for ref in [*(s for t in job.tiles for s in t.segments), *job.audio]:
        if ref.sha256 is None:
            continue
        digest, _ = plaintext_sha256(Path(ref.path), keys, unfinished_ok=True)
        if digest != ref.sha256:
            raise CompositeError(
                f"segment {ref.track_id or ref.path} does not match the SHA-256 in the record"
            )


def _render(
    job: CompositeJob,
    path: Path,
    duration: float,
    frames: int,
    progress: Progress | None,
    keys: SealKeys | None,
) -> None:
    if keys is None:
        _encode(job, str(path), {"movflags": "+faststart"}, duration, frames, progress, keys)
        return
    with SealedWriter(path, keys) as sink:
        _encode(job, sink, {}, duration, frames, progress, keys)


def _encode(
    job: CompositeJob,
    target: Any,
    options: dict[str, str],
    duration: float,
    frames: int,
    progress: Progress | None,
    keys: SealKeys | None,
) -> None:
    half = 0.5 / job.fps
    boxes = grid(len(job.tiles), job.width, job.height)
    tiles = [_TileSource(tile, box, half, keys) for tile, box in zip(job.tiles, boxes, strict=True)]
    audio = [_AudioSource(ref, keys) for ref in job.audio]
    strokes = sorted(job.strokes, key=lambda s: s.at_s)
    buffer = np.zeros(job.width * job.height * 3 // 2, dtype=np.uint8)
    area = job.width * job.height
    canvas: Planes = (
        buffer[:area].reshape(job.height, job.width),
        buffer[area : area * 5 // 4].reshape(job.height // 2, job.width // 2),
        buffer[area * 5 // 4 :].reshape(job.height // 2, job.width // 2),
    )
    with av.open(target, mode="w", format="mp4", options=options) as out:
        video = out.add_stream("libx264", rate=job.fps)
        video.width, video.height, video.pix_fmt = job.width, job.height, "yuv420p"
        video.options = {"preset": job.preset, "crf": str(job.crf)}
        video.codec_context.gop_size = job.fps * 2
        sound = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo") if audio else None
        if sound is not None:
            sound.bit_rate = 96_000
        audio_at = 0
        total_samples = round(duration * AUDIO_RATE)
        reported = -1
        for n in range(frames):
            t = n / job.fps
            active = [s for s in strokes if s.at_s <= t < s.at_s + job.stroke_s]
            for source in tiles:
                source.draw(canvas, t, [s for s in active if s.track_id in source.track_ids])
            frame = av.VideoFrame.from_ndarray(
                buffer.reshape(job.height * 3 // 2, job.width), format="yuv420p"
            )
            frame.pts = n
            frame.time_base = Fraction(1, job.fps)
            out.mux(video.encode(frame))
            if sound is not None:
                # Audio up to the end of this video frame, so the two stay interleaved.
                until = min(total_samples, round((n + 1) / job.fps * AUDIO_RATE))
                while audio_at < until:
                    out.mux(sound.encode(_mixed(audio, audio_at)))
                    audio_at += AAC_FRAME
            if progress is not None and (percent := 100 * n // frames) != reported:
                reported = percent
                progress(n / frames)
        out.mux(video.encode(None))
        if sound is not None:
            out.mux(sound.encode(None))


def _mixed(sources: list[_AudioSource], start: int) -> av.AudioFrame:
    mix = np.zeros((AAC_FRAME, 2), dtype=np.float32)
    for source in sources:
        source.add_to(mix, start)
    np.clip(mix, -1.0, 1.0, out=mix)
    frame = av.AudioFrame.from_ndarray(mix.reshape(1, -1), format="flt", layout="stereo")
    frame.sample_rate = AUDIO_RATE
    frame.pts = start
    frame.time_base = Fraction(1, AUDIO_RATE)
    return frame


# --- the worker process ---------------------------------------------------------------------


async def run_composite(
    job: CompositeJob,
    on_progress: Progress | None = None,
    *,
    keys: SealKeys | None = None,
    python: str = sys.executable,
) -> CompositeResult:
    """Renders `job` in a child process (`python -m media.composite`), calling `on_progress`
    on the event loop as it reports; sealed with `keys` if given. Raises CompositeError if
    the render fails; cancelling kills the child."""
    job_path = await asyncio.to_thread(_write_job, job)
    result: CompositeResult | None = None
    # The child's temporary output, named as soon as it exists.
    partial: Path | None = None
    try:
        argv = [python, "-m", "media.composite", str(job_path)]
        child = await asyncio.create_subprocess_exec(
            *argv,
            *(["--keys-on-stdin"] if keys is not None else []),
            env={**os.environ, _PARENT_PID: str(os.getpid())},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        if keys is not None:
            child.stdin.write(keys.to_json().encode())
        child.stdin.close()
        errors = asyncio.ensure_future(child.stderr.read())
        try:
            async for line in child.stdout:
                message = json.loads(line)
                if "partial" in message:
                    partial = Path(message["partial"])
                elif "progress" in message and on_progress is not None:
                    on_progress(float(message["progress"]))
                elif "result" in message:
                    result = CompositeResult(**message["result"])
            code = await child.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
            errors.cancel()
            raise
        stderr = (await errors).decode(errors="replace")
    finally:
        await asyncio.to_thread(job_path.unlink, True)
    if code != 0 or result is None:
        # A child that was killed had no chance to remove its half-written output.
        if partial is not None:
            await asyncio.to_thread(partial.unlink, True)
        raise CompositeError(f"the composite render failed ({code}): {stderr[-2000:]}")
    return result


def _write_job(job: CompositeJob) -> Path:
    output = Path(job.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", suffix=".json", prefix=f".{output.name}.job.", dir=output.parent, delete=False
    ) as f:
        f.write(job.to_json())
    return Path(f.name)


def main(argv: list[str] | None = None) -> int:
    """`python -m media.composite JOB.json [--keys-on-stdin]`: renders, printing JSON lines
    {"progress": f} and finally {"result": {...}}; sealed with the keys read from stdin."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or args[1:] not in ([], ["--keys-on-stdin"]):
        print("usage: python -m media.composite JOB.json [--keys-on-stdin]", file=sys.stderr)
        return 2
    job = CompositeJob.from_json(Path(args[0]).read_text(encoding="utf-8"))
    keys = SealKeys.from_json(sys.stdin.read()) if len(args) == 2 else None
    die_with_parent(int(os.environ.get(_PARENT_PID, os.getppid())))

    def report(fraction: float) -> None:
        print(json.dumps({"progress": round(fraction, 4)}), flush=True)

    def writing(temp: Path) -> None:
        # If this process is killed, its parent removes what it leaves.
        print(json.dumps({"partial": str(temp)}), flush=True)

    result = render_composite(job, report, writing, keys)
    print(json.dumps({"result": dataclasses.asdict(result)}), flush=True)
    return 0


def die_with_parent(parent_pid: int) -> None:
    """A parent killed with -9 takes this child along (Linux: the parent-death signal), and
    SIGTERM unwinds it (a renderer's temporary file goes too; the restarted server renders
    again). Elsewhere a renderer notices at its next progress line, when the pipe breaks.
    `parent_pid` is the parent's pid as the parent gave it: a child adopted before it asked
    for the signal sees another parent (not always 1: a subreaper, or a parent that is PID 1
    in a container)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the signal was asked for
        sys.exit(143)


# The renderer's parent, as the parent names itself (see die_with_parent).
_PARENT_PID = "TELEMED_RENDER_PARENT_PID"


def remove_partial_outputs(output: Path) -> None:
    """Temporary files a renderer of `output` left when it was killed (call only when no
    renderer of it can be running, e.g. at start-up)."""
    for partial in output.parent.glob(f".{output.name}.*.tmp"):
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
