"""Where a relay server's CPU goes: summaries of py-spy's collapsed stacks
(`py-spy record --format raw`), by component and by function, with the idle samples (the
event loop waiting in epoll) set apart.

    python bench/relay_profile.py profile.pyspy.txt [--top 25]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_BENCH_DIR = Path(__file__).resolve().parent
_ROOT = _BENCH_DIR.parent
# Run as `python bench/relay_profile.py`: the repository root, not bench/, must be importable.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.stacks import collapsed_samples  # noqa: E402

# The first pattern that matches the file of a sample's innermost frame names the component
# the sample is charged to (self time: the shares add up to 100 % of the busy samples).
COMPONENTS: list[tuple[str, str]] = [
    ("telemed media/ (forwarding, hooks)", r"(^|/)media/"),
    ("aiortc RTCRtpSender (packetize, send)", r"aiortc/rtcrtpsender\.py"),
    ("aiortc RTCRtpReceiver (receive, RTCP)", r"aiortc/rtcrtpreceiver\.py"),
    ("aiortc DTLS/SRTP transport", r"aiortc/rtcdtlstransport\.py"),
    ("aiortc RTP/RTCP packets", r"aiortc/rtp\.py"),
    ("aiortc other", r"aiortc/"),
    ("aioice (ICE, UDP)", r"aioice/"),
    ("pylibsrtp", r"pylibsrtp/"),
    ("socket.io / engine.io", r"(socketio|engineio)/"),
    ("aiohttp", r"aiohttp/"),
    ("telemed other", r"(^|/)(rooms|signaling|server)/"),
    ("asyncio event loop", r"asyncio/"),
    ("other Python", r"."),
]
# Leaf frames that are waiting, not working: (function, end of the file name).
IDLE_LEAVES = (
    ("EpollSelector.select", "selectors.py"),
    ("select", "selectors.py"),
    ("Condition.wait", "threading.py"),
    ("wait", "threading.py"),
    ("Queue.get", "/queue.py"),
    ("get", "/queue.py"),
)


def _component(file: str) -> str:
    for component, pattern in COMPONENTS:
        if re.search(pattern, file):
            return component
    return "other"


def _short(func: str, file: str) -> str:
    tail = "/".join(file.split("/")[-2:]) if file else ""
    return f"{func} ({tail})" if tail else func


def summarize_collapsed(text: str, top: int = 25) -> dict[str, Any]:
    total = 0
    idle = 0
    by_component: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in collapsed_samples(text):
        total += count
        leaf_func, leaf_file = frames[-1]
        if any(leaf_func == f and leaf_file.endswith(end) for f, end in IDLE_LEAVES):
            idle += count
            continue
        self_time[_short(leaf_func, leaf_file)] += count
        by_component[_component(leaf_file)] += count
        seen_funcs: set[str] = set()
        for func, file in frames:
            name = _short(func, file)
            if name not in seen_funcs:
                seen_funcs.add(name)
                inclusive[name] += count
    busy = total - idle

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / busy, 1)) for k, v in counter.most_common(top)] if busy else []

    return {
        "samples": total,
        "idle_pct": round(100 * idle / total, 1) if total else None,
        # Shares below are of the busy (non-idle) samples.
        "components_pct": share(by_component),
        "self_pct": share(self_time),
        "inclusive_pct": share(inclusive),
    }


def render(summary: dict[str, Any]) -> str:
    lines = [f"samples {summary['samples']}, idle {summary['idle_pct']}%"]
    for title, key in (
        ("by component, self (% of busy)", "components_pct"),
        ("by function, self (% of busy)", "self_pct"),
        ("by function, inclusive (% of busy)", "inclusive_pct"),
    ):
        lines.append(f"\n{title}:")
        lines += [f"  {pct:5.1f}  {name}" for name, pct in summary[key]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(render(summarize_collapsed(args.profile.read_text(encoding="utf-8"), args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
