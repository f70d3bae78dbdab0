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


class LossBook:
    """The share of packets lost between the last two samples of cumulative counts (expected,
    lost) of each object: the receiver report's "fraction lost", over a second."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[int, int]] = {}
        self._fractions: dict[int, float] = {}

    def sample(self, key: int, expected: int, lost: int) -> None:
        last = self._last.get(key)
        self._last[key] = (expected, lost)
        if last is None:
            return
        expected_since = expected - last[0]
        if expected_since > 0:
            self._fractions[key] = min(1.0, max(0, lost - last[1]) / expected_since)

    def fraction(self, key: int) -> float | None:
        return self._fractions.get(key)

    def keep_only(self, keys: set[int]) -> None:
        for key in list(self._last):
            if key not in keys:
                self._last.pop(key, None)
                self._fractions.pop(key, None)
