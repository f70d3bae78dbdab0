"""PYTEST_DONT_REWRITE
What a link does to the packets crossing it in one direction, and the pure scheduling of it: no
sockets, no clock of its own, so that it can be tested on its own and driven by the hub.

A packet meets, in order: the UDP block, the loss (uniform, or Gilbert-Elliott bursts), the
rate cap's queue (a token-bucket link of `rate_kbps` with a drop-tail queue holding at most
`queue_ms` of it, as a 4G router's buffer does), then the delay with its jitter. Order is kept
unless `reorder` asks otherwise: a reordered packet skips the order-keeping and leaves with its
own jittered delay, so it may overtake the ones before it."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Impairment:
    # Loss in the good state (the only state without bursts), 0..1.
    loss: float = 0.0
    # Gilbert-Elliott: per packet, the chance of going from good to bad and back, and the loss
    # while bad. No bursts while `to_bad` is 0.
    to_bad: float = 0.0
    to_good: float = 1.0
    bad_loss: float = 1.0
    # One-way delay and its jitter (uniform, ±), milliseconds.
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    # The chance that a packet ignores the order (needs jitter to overtake anything).
    reorder: float = 0.0
    # A rate cap, kbit/s (None: none), and how much of it the queue holds before dropping.
    rate_kbps: float | None = None
    queue_ms: float = 300.0
    # Every UDP datagram dropped (a firewall that lets only TCP through).
    block_udp: bool = False

    def __post_init__(self) -> None:
        for name in ("loss", "to_bad", "to_good", "bad_loss", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, not {value}")
        for name in ("delay_ms", "jitter_ms", "queue_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.jitter_ms > self.delay_ms:
            raise ValueError("jitter_ms cannot exceed delay_ms (a packet cannot leave early)")
        if self.rate_kbps is not None and self.rate_kbps <= 0:
            raise ValueError("rate_kbps must be positive")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Impairment:
        return cls(**data)


CLEAN = Impairment()

UDP = 17


@dataclass
class StageCounters:
    packets: int = 0
    bytes: int = 0
    blocked: int = 0
    lost: int = 0
    queue_dropped: int = 0
    delivered: int = 0
    # The longest a packet waited in the rate cap's queue, ms.
    max_queue_ms: float = 0.0


class Stage:
    """One direction of one link. `admit` answers when a packet arriving at `now` (seconds)
    leaves, or None when it is dropped."""

    def __init__(self, impairment: Impairment, rng: random.Random) -> None:
        self.impairment = impairment
        self.counters = StageCounters()
        self._rng = rng
        self._bad = False
        self._link_free_at = 0.0  # when the capped link has sent everything queued
        self._last_departure = 0.0

    def set(self, impairment: Impairment) -> None:
        """A new impairment from the next packet on; what is queued keeps its times."""
        self.impairment = impairment
        if impairment.to_bad == 0.0:
            self._bad = False

    def admit(self, size: int, protocol: int, now: float) -> float | None:
        imp = self.impairment
        c = self.counters
        c.packets += 1
        c.bytes += size
        if imp.block_udp and protocol == UDP:
            c.blocked += 1
            return None
        if self._lost():
            c.lost += 1
            return None
        leaves = now
        if imp.rate_kbps is not None:
            start = max(now, self._link_free_at)
            if (start - now) * 1000.0 > imp.queue_ms:
                c.queue_dropped += 1
                return None
            self._link_free_at = start + size * 8 / (imp.rate_kbps * 1000.0)
            leaves = self._link_free_at
            c.max_queue_ms = max(c.max_queue_ms, (start - now) * 1000.0)
        if imp.delay_ms:
            jitter = self._rng.uniform(-imp.jitter_ms, imp.jitter_ms) if imp.jitter_ms else 0.0
            leaves += (imp.delay_ms + jitter) / 1000.0
        if not (imp.reorder and self._rng.random() < imp.reorder):
            # Strictly later: timers due at the same moment may run in any order.
            leaves = max(leaves, self._last_departure + 1e-6)
            self._last_departure = leaves
        c.delivered += 1
        return leaves

    def _lost(self) -> bool:
        imp = self.impairment
        if imp.to_bad:
            if self._bad:
                self._bad = self._rng.random() >= imp.to_good
            else:
                self._bad = self._rng.random() < imp.to_bad
            if self._bad:
                return self._rng.random() < imp.bad_loss
        return bool(imp.loss) and self._rng.random() < imp.loss
