"""Recording benchmark: what per-track recording costs the server's process, whether it stalls
the event loop, and how fast the composite renders.

    python bench/recording.py --runs 3                 # 4 participants, 20 s windows
    python bench/recording.py --tracks 8 --runs 3 --duration 20
    python bench/recording.py --quick                  # smoke run, well under a minute

Cost: this process plays the server. It holds N participants' `Publication`s (a video track
of the relay benchmark's clip: 640x480, 30 fps, ~1 Mbit/s VP8, keyframe every 5 s; and an
Opus track, 20 ms packets) and pushes their frames at real-time pace, as the relay's receivers
would. Runs alternate between recording every track (a `RoomRecorder` writing to a temporary
directory) and not recording; each run measures, after `--warmup` s, over `--duration` s:
- CPU: utime+stime of the whole process (all threads, from /proc/self/stat); recording cost
  per track = (CPU with recording - CPU without) / window / (2N tracks), medians over runs;
- event-loop stall: a ticker wakes every millisecond and notes how late it woke; the longest
  and the 99th percentile lateness, with and without recording. On a busy shared machine
  this is mostly the OS running other processes, so the bench also times, in event-loop
  thread CPU time (`time.thread_time`, blind to preemption), each hand-over of a frame to
  the publications (where the recorder's listener runs): recording's share of any stall.

Composite: the recorded segments of N participants (`--composite-s` s each) rendered with
`media.composite.render_composite` at 1280x720 and 640x480, 15 fps; speed = content seconds
per wall second (a multiple of real time), medians over runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import cpu_seconds, machine_busy_seconds, machine_info, median
from relay_media import Clip, ClipSpec, load_clip

from media.composite import job_from_segments, render_composite
from media.forwarding import Publication
from media.frames import EncodedFrame
from media.hub import TrackInfo
from media.recorder import RoomRecorder
from media.recording import SegmentInfo, vp8_size

CACHE = Path(tempfile.gettempdir()) / "telemed-bench"


async def _no_keyframe() -> None:
    return None


def _is_keyframe(data: bytes) -> bool:
    try:
        vp8_size(data)
    except ValueError:
        return False
    return True


class Feeder:
    """Pushes the clip into 2N publications at real-time pace, from one task."""

    def __init__(self, clip: Clip, participants: int) -> None:
        self.clip = clip
        self.keyframe = [_is_keyframe(d) for d in clip.video]
        self.tracks: list[tuple[TrackInfo, Publication]] = []
        for n in range(participants):
            for kind in ("video", "audio"):
                info = TrackInfo(f"t_{n}_{kind}", f"p{n}", kind, kind)
                self.tracks.append((info, Publication(kind, _no_keyframe)))
        self.pushed = 0
        # Event-loop thread CPU time (time.thread_time: not counting time the OS gave to other
        # processes) of each frame handed to the publications, in seconds; recording's share
        # of a stall is what it adds here.
        self.push_cpu: list[float] = []
        self.measure = False

    def _push(self, kind: str, frame: EncodedFrame) -> None:
        began = time.thread_time()
        for info, pub in self.tracks:
            if info.kind == kind:
                pub.push(frame)
        if self.measure:
            self.push_cpu.append(time.thread_time() - began)

    async def run(self, stop: asyncio.Event) -> None:
        origin = time.monotonic()
        video_n = audio_n = 0
        fps = self.clip.spec.fps
        while not stop.is_set():
            next_video, next_audio = video_n / fps, audio_n * 0.02
            due = min(next_video, next_audio)
            delay = origin + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if next_video <= next_audio:
                i = video_n % self.clip.frames
                frame = EncodedFrame(self.clip.video[i], 1000 + video_n * 3000, self.keyframe[i])
                self._push("video", frame)
                video_n += 1
            else:
                data = self.clip.audio[audio_n % len(self.clip.audio)]
                frame = EncodedFrame(data, 500 + audio_n * 960, True)
                self._push("audio", frame)
                audio_n += 1
            self.pushed += 1


async def ticker(stop: asyncio.Event, lateness: list[float]) -> None:
    period = 0.001
    while not stop.is_set():
        expected = time.monotonic() + period
        await asyncio.sleep(period)
        lateness.append(time.monotonic() - expected)


async def one_run(
    clip: Clip, participants: int, record: bool, warmup: float, duration: float, directory: Path
) -> tuple[dict[str, Any], list[SegmentInfo]]:
    feeder = Feeder(clip, participants)
    stop = asyncio.Event()
    lateness: list[float] = []
    recorder: RoomRecorder | None = None
    if record:
        recorder = RoomRecorder(directory, f"bench{int(time.time() * 1000)}")
        await recorder.start()
        for info, pub in feeder.tracks:
            recorder.add_track(info, pub, label=f"{info.participant} · bench")
    feeding = asyncio.ensure_future(feeder.run(stop))
    await asyncio.sleep(warmup)
    ticking = asyncio.ensure_future(ticker(stop, lateness))
    feeder.measure = True
    pid = os.getpid()
    cpu0, busy0, t0 = cpu_seconds(pid), machine_busy_seconds(), time.monotonic()
    await asyncio.sleep(duration)
    cpu1, busy1, t1 = cpu_seconds(pid), machine_busy_seconds(), time.monotonic()
    stop.set()
    await asyncio.gather(feeding, ticking)
    segments = await recorder.stop() if recorder is not None else []
    window = t1 - t0
    lateness.sort()
    push = sorted(feeder.push_cpu)
    result = {
        "record": record,
        "participants": participants,
        "cores": (cpu1 - cpu0) / window,
        "others_cores": max(0.0, (busy1 - busy0 - (cpu1 - cpu0)) / window),
        "stall_max_ms": 1000 * lateness[-1],
        "stall_p99_ms": 1000 * lateness[int(0.99 * (len(lateness) - 1))],
        "push_cpu_max_ms": 1000 * push[-1],
        "push_cpu_p99_ms": 1000 * push[int(0.99 * (len(push) - 1))],
        "push_cpu_mean_us": 1e6 * sum(push) / len(push),
        "dropped": sum(s.dropped for s in segments),
        "segments": len(segments),
    }
    return result, segments


def composite_speed(segments: list[SegmentInfo], out: Path, width: int, height: int) -> float:
    job = job_from_segments(segments, out, width=width, height=height, fps=15)
    return render_composite(job).speed


async def main_async(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> None:
    clip = load_clip(ClipSpec(), CACHE)
    with tempfile.TemporaryDirectory(prefix="telemed-rec-bench-") as tmp:
        directory = Path(tmp)
        runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for n in range(args.runs):
            # Alternate, so that a noisy neighbour hits both arms alike.
            for record in (n % 2 == 0, n % 2 != 0):
                result, _ = await one_run(
                    clip, args.tracks, record, args.warmup, args.duration, directory / str(n)
                )
                runs[record].append(result)
                emit({"run": n, **result})
        with_rec = runs[True]
        without = runs[False]
        per_track = [
            (w["cores"] - o["cores"]) / (2 * args.tracks)
            for w, o in zip(with_rec, without, strict=True)
        ]
        summary: dict[str, Any] = {
            "participants": args.tracks,
            "tracks": 2 * args.tracks,
            "cores_recording": median(r["cores"] for r in with_rec),
            "cores_not_recording": median(r["cores"] for r in without),
            "core_per_track": median(per_track),
            "stall_max_ms_recording": median(r["stall_max_ms"] for r in with_rec),
            "stall_max_ms_not_recording": median(r["stall_max_ms"] for r in without),
            "stall_p99_ms_recording": median(r["stall_p99_ms"] for r in with_rec),
            "stall_p99_ms_not_recording": median(r["stall_p99_ms"] for r in without),
            "push_cpu_max_ms_recording": median(r["push_cpu_max_ms"] for r in with_rec),
            "push_cpu_max_ms_not_recording": median(r["push_cpu_max_ms"] for r in without),
            "push_cpu_p99_ms_recording": median(r["push_cpu_p99_ms"] for r in with_rec),
            "push_cpu_p99_ms_not_recording": median(r["push_cpu_p99_ms"] for r in without),
            "push_cpu_mean_us_recording": median(r["push_cpu_mean_us"] for r in with_rec),
            "push_cpu_mean_us_not_recording": median(r["push_cpu_mean_us"] for r in without),
            "others_cores": median(r["others_cores"] for r in with_rec + without),
            "dropped": sum(r["dropped"] for r in with_rec),
        }
        # Composite: segments of `composite_s` seconds from a fresh recording.
        _, segments = await one_run(
            clip, args.tracks, True, 0.0, args.composite_s, directory / "composite"
        )
        for width, height in ((1280, 720), (640, 480)):
            speeds = [
                composite_speed(segments, directory / f"c{width}.mp4", width, height)
                for _ in range(args.runs)
            ]
            summary[f"composite_speed_{width}x{height}"] = median(speeds)
            summary[f"composite_speeds_{width}x{height}"] = [round(s, 2) for s in speeds]
        summary["composite_content_s"] = max(s.end_s for s in segments)
        summary["machine"] = machine_info(["av", "aiortc"])
        emit({"summary": summary})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracks", type=int, default=4, help="participants (video + audio)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--composite-s", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.warmup, args.duration, args.composite_s = 1, 1.0, 5.0, 5.0

    def emit(record: dict[str, Any]) -> None:
        print(json.dumps(record, ensure_ascii=False), flush=True)

    asyncio.run(main_async(args, emit))


if __name__ == "__main__":
    main()
