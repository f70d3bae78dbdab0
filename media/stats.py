"""Rates from counters: sampled once a second, so the forwarding path only counts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Rate:
    fps: float = 0.0
    bitrate_bps: float = 0.0


class RateBook:
    """Keeps the last sample of each counted object and the rate since the one before."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[int, tuple[float, int, int]] = {}
        self._rates: dict[int, Rate] = {}

    def sample(self, key: int, frames: int, octets: int) -> None:
        now = self._clock()
        last = self._last.get(key)
        self._last[key] = (now, frames, octets)
        if last is None:
            return
        elapsed = now - last[0]
        if elapsed <= 0:
            return
        self._rates[key] = Rate((frames - last[1]) / elapsed, 8 * (octets - last[2]) / elapsed)

    def rate(self, key: int) -> Rate:
        return self._rates.get(key, Rate())

    def keep_only(self, keys: set[int]) -> None:
        """Forgets objects that are gone, so the book does not grow."""
        for key in list(self._last):
            if key not in keys:
                self._last.pop(key, None)
                self._rates.pop(key, None)
