"""Issue 11's table: each network profile, a call through telemed and the same pages calling each
other directly, side by side (tests/browser/labcall.py does the calls, tests/netlab the network).

Run as root in a network namespace of its own (the lab adds its devices to this one):

    unshare --net sh -c 'ip link set lo up && exec .venv/bin/python bench/netlab.py --runs 3'

Every (profile, mode, run) is a fresh lab, server and pair of browsers; the modes alternate in
order from run to run. Prints a Markdown table of medians (and writes every figure as JSON with
`--json`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The browser tests' conftest (not tests/conftest.py), the lab, and the project itself, instead
# of bench/ (whose signaling.py would shadow the package).
sys.path[0:1] = [str(ROOT / "tests" / "browser"), str(ROOT / "tests"), str(ROOT)]

from conftest import Browsers, start_server, stop_server  # noqa: E402
from labcall import (  # noqa: E402
    CLINIC,
    PEER,
    PROFILES,
    direct_call,
    measure,
    open_pages,
    start_recording,
    stop_and_read_audio,
    telemed_call,
)
from netlab import Lab  # noqa: E402
from playwright.async_api import async_playwright  # noqa: E402


async def one_call(profile: str, direct: bool, warmup_s: float, window_s: float) -> Any:
    up, down = PROFILES[profile]
    with tempfile.TemporaryDirectory(prefix="netlab-bench-") as tmp:
        async with Lab([CLINIC, PEER]) as lab, async_playwright() as playwright:
            server = await start_server(
                Path(tmp), netns=lab.exec_prefix("srv"), address=lab.address("srv")
            )
            browsers = Browsers(playwright, Path(tmp))
            try:
                village, county = await open_pages(lab, browsers, server)
                await (direct_call if direct else telemed_call)(server, village, county)
                if not direct:
                    await start_recording(server, browsers, village)
                await lab.impair(CLINIC, up=up, down=down)
                start = (await lab.counters())["links"][CLINIC]
                figures = await measure(village, county, direct, warmup_s, window_s)
                end = (await lab.counters())["links"][CLINIC]
                link = {
                    way: {k: end[way][k] - start[way][k] for k in ("packets", "lost")}
                    for way in ("up", "down")
                }
                if not direct:
                    recorded = await stop_and_read_audio(server, village)
                    link["recorded"] = asdict(recorded["village_doctor"])
            finally:
                await browsers.close()
                await stop_server(server)
    return {name: d.as_dict() for name, d in figures.items()}, link


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


NONE = "n/a"


def table(results: dict[str, dict[str, list[dict[str, Any]]]], window_s: float) -> str:
    lines = [
        "| profile | direction | audio concealed, direct / telemed | video fps, direct / "
        "telemed | freeze s per min, direct / telemed | resolution, direct / telemed | "
        "RTT ms, direct / telemed | kbit/s, direct / telemed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for profile, modes in results.items():
        for name in ("village→county", "county→village"):

            def pair(
                key: str, fmt: str, scale: float = 1.0, name: str = name, modes: Any = modes
            ) -> str:
                cells = []
                for mode in ("direct", "telemed"):
                    value = median([run[name][key] for run in modes.get(mode, [])])
                    cells.append(NONE if value is None else fmt.format(value * scale))
                return " / ".join(cells)

            def resolution(name: str = name, modes: Any = modes) -> str:
                cells = []
                for mode in ("direct", "telemed"):
                    runs = modes.get(mode, [])
                    sizes = sorted(f"{r[name]['width']}×{r[name]['height']}" for r in runs)
                    cells.append(sizes[len(sizes) // 2] if sizes else NONE)
                return " / ".join(cells)

            per_min = 60.0 / window_s
            lines.append(
                f"| {profile} | {name} | {pair('audio_concealed', '{:.1f} %', 100)} | "
                f"{pair('fps', '{:.1f}')} | {pair('freeze_s', '{:.1f}', per_min)} | "
                f"{resolution()} | {pair('rtt_ms', '{:.0f}')} | {pair('kbps', '{:.0f}')} |"
            )
    return "\n".join(lines)


def recording_table(links: dict[str, list[dict[str, Any]]]) -> str:
    """The village doctor's recorded audio in the telemed calls, beside its uplink's loss."""
    lines = [
        "| profile | uplink loss in the window | recorded audio missing | longest recorded gap |",
        "|---|---|---|---|",
    ]
    for profile, runs in links.items():
        if not runs:
            continue
        loss = median([r["up"]["lost"] / max(1, r["up"]["packets"]) for r in runs])
        missing = median([r["recorded"]["missing_share"] for r in runs])
        gap = median([r["recorded"]["longest_gap_ms"] for r in runs])
        lines.append(
            f"| {profile} | {(loss or 0) * 100:.1f} % | {(missing or 0) * 100:.1f} % | "
            f"{gap or 0:.0f} ms |"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--profiles", nargs="*", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {p: {} for p in args.profiles}
    links: dict[str, list[dict[str, Any]]] = {p: [] for p in args.profiles}
    started = time.monotonic()
    for run in range(args.runs):
        for profile in args.profiles:
            modes = [True, False] if run % 2 == 0 else [False, True]
            for direct in modes:
                mode = "direct" if direct else "telemed"
                figures, link = await one_call(profile, direct, args.warmup, args.window)
                results[profile].setdefault(mode, []).append(figures)
                if not direct:
                    links[profile].append(link)
                print(
                    f"[{time.monotonic() - started:5.0f} s] run {run + 1} {profile} {mode}: "
                    + json.dumps(figures, ensure_ascii=False)
                    + " "
                    + json.dumps(link),
                    flush=True,
                )
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(table(results, args.window))
    print()
    print(recording_table(links))


if __name__ == "__main__":
    asyncio.run(main())
