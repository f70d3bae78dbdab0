"""Summaries of py-spy's collapsed stacks (`py-spy record --format raw`): where the samples
of a server process fall, by component (inclusive) and by function (self).

    python bench/stacks.py profile.txt
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The first pattern that matches a frame's file names its component. Order matters: the
# project's packages before the libraries they call.
COMPONENTS: list[tuple[str, str]] = [
    (name, rf"(^|/)({dirs})/")
    for name, dirs in (
        ("sqlalchemy", "sqlalchemy"),
        ("asyncpg", "asyncpg"),
        ("aiosqlite / sqlite3", "aiosqlite|sqlite3"),
        ("redis client", "redis"),
        ("socket.io", "socketio"),
        ("engine.io", "engineio"),
        ("aiohttp", "aiohttp"),
        ("pydantic", "pydantic|pydantic_core"),
        ("jwt", "jwt"),
        ("json", "json"),
        ("telemed rooms/", "rooms"),
        ("telemed signaling/", "signaling"),
        ("telemed server/", "server"),
        ("asyncio", "asyncio"),
    )
]
# Leaf frames that are waiting, not working (py-spy's --nonblocking sampling cannot always
# tell): the event loop's epoll, aiosqlite's worker thread waiting on its queue, lock waits.
IDLE_LEAVES = frozenset(
    {
        "EpollSelector.select",
        "_connection_worker_thread",
        "Condition.wait",
        "Event.wait",
        "Thread.join",
        "Queue.get",
    }
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse_frames(stack: str) -> list[tuple[str, str]]:
    """(function, file) of each frame of one collapsed stack, outermost first."""
    found = []
    for frame in stack.split(";"):
        text = frame.strip()
        match = _FRAME.match(text)
        found.append((match["func"], match["file"]) if match else (text, ""))
    return found


def collapsed_samples(text: str) -> Iterator[tuple[list[tuple[str, str]], int]]:
    """(frames, sample count) of every stack line of py-spy's collapsed output."""
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield parse_frames(stack), int(count_text)


def summarize_collapsed(text: str, top: int = 25) -> dict[str, Any]:
    """Share of the busy samples per component (a sample counts for every component on its
    stack) and per leaf function, plus the thread split (event loop vs driver threads)."""
    total = 0
    idle = 0
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    leaf_component: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for frames, count in collapsed_samples(text):
        if frames and frames[-1][0] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        seen = set()
        for _, file in frames:
            for name, pattern in COMPONENTS:
                if re.search(pattern, file):
                    seen.add(name)
                    break
        for name in seen:
            inclusive[name] += count
        func, file = frames[-1] if frames else ("?", "")
        leaf[f"{func} ({Path(file).name})"] += count
        leaf_component[_component(file)] += count
        root = frames[0][0] if frames else "?"
        threads["driver thread" if "_bootstrap" in root else "main thread"] += count

    def shares(counter: Counter[str], n: int | None = None) -> dict[str, float]:
        return {k: round(100.0 * v / total, 1) for k, v in counter.most_common(n)} if total else {}

    return {
        "samples": total,
        "idle_samples_dropped": idle,
        "threads_pct": shares(threads),
        "inclusive_pct": shares(inclusive),
        "self_by_component_pct": shares(leaf_component),
        "self_top_pct": shares(leaf, top),
    }


def _component(file: str) -> str:
    for name, pattern in COMPONENTS:
        if re.search(pattern, file):
            return name
    return "other (" + (Path(file).name or "native") + ")"


def main(argv: list[str]) -> int:
    for path in argv:
        summary = summarize_collapsed(Path(path).read_text(encoding="utf-8", errors="replace"))
        print(f"{path}: {summary['samples']} samples; threads {summary['threads_pct']}")
        for title in ("inclusive_pct", "self_by_component_pct", "self_top_pct"):
            print(f"  {title}:")
            for name, share in summary[title].items():
                print(f"    {share:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
