"""Markdown tables from the relay benchmark's JSON lines (`bench/relay.py --json --out FILE`):
medians per scenario over its runs, and each run on a line of its own.

    python bench/relay_report.py runs.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (key, header, format)
MEDIANS: list[tuple[str, str, str]] = [
    ("server_cpu_cores", "server cores", "{:.3f}"),
    ("forwarded_packets_per_s", "fwd pkt/s", "{:.0f}"),
    ("cpu_us_per_forwarded_packet", "CPU µs/fwd pkt", "{:.1f}"),
    ("cpu_us_per_forwarded_frame", "CPU µs/fwd frame", "{:.1f}"),
    ("subscriber_fps_min", "fps min", "{:.1f}"),
    ("latency_ms_p50", "lat p50", "{:.1f}"),
    ("latency_ms_p95", "lat p95", "{:.1f}"),
    ("latency_all_ms_p95", "lat p95 (all)", "{:.1f}"),
    ("direct_latency_ms_p50", "direct p50", "{:.1f}"),
    ("added_latency_ms_p50", "added p50", "{:.1f}"),
    ("added_latency_ms_p95", "added p95", "{:.1f}"),
    ("frames_lost", "frames lost", "{:.0f}"),
    ("frames_expected", "of", "{:.0f}"),
    ("server_rss_mb", "RSS MB", "{:.0f}"),
    ("client_cpu_cores", "client cores", "{:.2f}"),
    ("other_cpu_cores", "others' cores", "{:.2f}"),
]

PER_RUN: list[tuple[str, str, str]] = [
    ("server_cpu_cores", "server cores", "{:.3f}"),
    ("cpu_us_per_forwarded_packet", "µs/pkt", "{:.1f}"),
    ("subscriber_fps_min", "fps min", "{:.1f}"),
    ("latency_ms_p50", "lat p50", "{:.1f}"),
    ("latency_ms_p95", "lat p95", "{:.1f}"),
    ("latency_all_ms_p99", "all p99", "{:.1f}"),
    ("direct_latency_ms_p50", "direct p50", "{:.1f}"),
    ("direct_latency_ms_p95", "direct p95", "{:.1f}"),
    ("frames_lost", "lost", "{:.0f}"),
    ("client_cpu_cores", "client cores", "{:.2f}"),
    ("other_cpu_cores", "others", "{:.2f}"),
    ("client_loop_lag_ms_p99", "client lag p99", "{:.0f}"),
]


def load(paths: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                run = json.loads(line)
                runs.setdefault(str(run["scenario"]), []).append(run)
    return runs


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    values = [_number(r.get(key)) for r in runs if "failed" not in r]
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def cell(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else fmt.format(value)


def medians_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| scenario | runs | " + " | ".join(h for _, h, _ in MEDIANS) + " |",
        "|---|---|" + "---|" * len(MEDIANS),
    ]
    for label, group in runs.items():
        ok = [r for r in group if "failed" not in r]
        cells = [cell(median_of(group, key), fmt) for key, _, fmt in MEDIANS]
        noisy = sum(1 for r in ok if r.get("noisy"))
        count = f"{len(ok)}" + (f" ({noisy} noisy)" if noisy else "")
        lines.append(f"| {label} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| scenario | run | " + " | ".join(h for _, h, _ in PER_RUN) + " | notes |",
        "|---|---|" + "---|" * (len(PER_RUN) + 1),
    ]
    for label, group in runs.items():
        for r in group:
            if "failed" in r:
                lines.append(f"| {label} | {r['run']} | failed: {r['failed']} |")
                continue
            cells = [cell(_number(r.get(key)), fmt) for key, _, fmt in PER_RUN]
            notes = list(r.get("notes") or [])
            if r.get("noisy"):
                notes.append("noisy")
            if r.get("discarded_attempts"):
                notes.append(f"{len(r['discarded_attempts'])} noisy attempts repeated")
            lines.append(
                f"| {label} | {r['run']} | " + " | ".join(cells) + f" | {'; '.join(notes)} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    runs = load(args.files)
    print(medians_table(runs))
    print()
    print(runs_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
