"""Limits on guessing invite codes: attempts per client address and over all clients, in a
sliding window. In memory, per process: behind several workers each counts its own share."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class TooManyAttempts(Exception):
    """`limit` says which limit was hit, in words; `retry_after_s`, when to try again."""

    def __init__(self, limit: str, retry_after_s: int) -> None:
        super().__init__(limit)
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclass
class GuessLimits:
    per_client: int = 10
    overall: int = 300
    window_s: float = 300.0
    clock: Callable[[], float] = time.monotonic
    _clients: dict[str, deque[float]] = field(default_factory=dict, init=False)
    _all: deque[float] = field(default_factory=deque, init=False)

    def attempt(self, client: str) -> None:
        """Counts one attempt by `client`, or raises TooManyAttempts (not counted then).

        Only counted attempts are kept, so the memory held is bounded by `overall`."""
        now = self.clock()
        since = now - self.window_s
        self._expire(since)
        mine = self._clients.get(client)
        if mine is not None and len(mine) >= self.per_client:
            raise TooManyAttempts(
                f"at most {self.per_client} invite code attempts per client address in "
                f"{self.window_s:g} s",
                self._wait(mine[0], now),
            )
        if len(self._all) >= self.overall:
            raise TooManyAttempts(
                f"at most {self.overall} invite code attempts in {self.window_s:g} s from "
                "all clients together",
                self._wait(self._all[0], now),
            )
        self._all.append(now)
        self._clients.setdefault(client, deque()).append(now)

    def _expire(self, since: float) -> None:
        while self._all and self._all[0] <= since:
            self._all.popleft()
        for client in [c for c, q in self._clients.items() if q and q[0] <= since]:
            q = self._clients[client]
            while q and q[0] <= since:
                q.popleft()
            if not q:
                del self._clients[client]

    def _wait(self, oldest: float, now: float) -> int:
        return max(1, int(oldest + self.window_s - now + 0.999))
