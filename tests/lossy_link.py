"""PYTEST_DONT_REWRITE
A user-space impaired link for media tests: a UDP proxy between one aiortc client and the
relay's ICE port, on loopback, that loses (uniformly, or in Gilbert-Elliott bursts) and delays
(with jitter) the datagrams of each direction, from a seeded random generator.

How it gets on the path: aioice offers the host candidates it gathered itself and the client
and the server then talk to each other directly. The proxy has two sockets: `client_side`
stands for the server towards the client, `server_side` for the client towards the server.
`offer_through` rewrites the port of the client's candidates in the offer to `server_side`'s
(the server only knows the proxy as the client), `answer_through` the server's in the answer
to `client_side`'s (the client only knows the proxy as the server). Every datagram of the
connection, ICE checks included, then goes through the proxy, and ICE picks that path because
it is the only one either side knows. Only RTP and RTCP (first byte 128-191, RFC 7983) are
impaired: STUN and DTLS pass untouched, so that the connection's set-up does not depend on
the dice.

Bounded: at most `max_queued` datagrams wait in a delay; the proxy's sockets close with
`close()` (the test's `finally`)."""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_CANDIDATE = re.compile(r"^(a=candidate:\S+ \d+ udp \d+ 127\.0\.0\.1 )(\d+)( typ host.*)$", re.M)


@dataclass
class Impairment:
    """What one direction of the link does to RTP and RTCP."""

    # Loss in the good state (or the only state, without bursts), 0..1.
    loss: float = 0.0
    # Gilbert-Elliott bursts: per packet, the chance to go from good to bad and back, and the
    # loss while bad. No bursts while `to_bad` is 0.
    to_bad: float = 0.0
    to_good: float = 1.0
    bad_loss: float = 1.0
    # One-way delay and its jitter (uniform, ±), seconds; order is kept.
    delay_s: float = 0.0
    jitter_s: float = 0.0
    # Loss for particular SSRCs instead of `loss` (a retransmission stream, say).
    ssrc_loss: dict[int, float] = field(default_factory=dict)


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Any) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.on_datagram(data)


class _Direction:
    def __init__(self, impairment: Impairment, rng: random.Random, max_queued: int) -> None:
        self.impairment = impairment
        self._rng = rng
        self._bad = False
        self._max_queued = max_queued
        self._queued = 0
        self._last_due = 0.0
        # RTP packets by SSRC: passed on, and lost.
        self.passed: Counter[int] = Counter()
        self.lost: Counter[int] = Counter()

    def handle(self, data: bytes, send: Any) -> None:
        impairment = self.impairment
        if len(data) < 12 or not 127 < data[0] < 192:
            send(data)  # STUN, DTLS: untouched
            return
        rtp = not 191 < data[1] < 224
        ssrc = int.from_bytes(data[8:12], "big") if rtp else None
        if self._lose(ssrc):
            if ssrc is not None:
                self.lost[ssrc] += 1
            return
        if ssrc is not None:
            self.passed[ssrc] += 1
        if impairment.delay_s <= 0 and impairment.jitter_s <= 0:
            send(data)
            return
        if self._queued >= self._max_queued:
            return  # the delay line is full: lost
        loop = asyncio.get_running_loop()
        jitter = self._rng.uniform(-impairment.jitter_s, impairment.jitter_s)
        due = max(loop.time() + max(impairment.delay_s + jitter, 0.0), self._last_due)
        self._last_due = due
        self._queued += 1
        loop.call_at(due, self._deliver, data, send)

    def _deliver(self, data: bytes, send: Any) -> None:
        self._queued -= 1
        send(data)

    def _lose(self, ssrc: int | None) -> bool:
        impairment = self.impairment
        rng = self._rng
        if ssrc is not None and ssrc in impairment.ssrc_loss:
            return rng.random() < impairment.ssrc_loss[ssrc]
        if impairment.to_bad > 0:
            if self._bad:
                self._bad = rng.random() >= impairment.to_good
            else:
                self._bad = rng.random() < impairment.to_bad
            if self._bad:
                return rng.random() < impairment.bad_loss
        return rng.random() < impairment.loss


class LossyLink:
    """One client's link to the relay. `uplink` is client → server, `downlink` the way back."""

    def __init__(
        self,
        uplink: Impairment,
        downlink: Impairment | None = None,
        *,
        seed: int = 1,
        max_queued: int = 4096,
    ) -> None:
        rng = random.Random(seed)
        self.uplink = _Direction(uplink, rng, max_queued)
        self.downlink = _Direction(downlink or Impairment(), rng, max_queued)
        self._client_side = _Side(self._from_client)
        self._server_side = _Side(self._from_server)
        self._client: tuple[str, int] | None = None
        self._server: tuple[str, int] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for side in (self._client_side, self._server_side):
            side.transport, _ = await loop.create_datagram_endpoint(
                lambda side=side: side, local_addr=("127.0.0.1", 0)
            )

    def close(self) -> None:
        for side in (self._client_side, self._server_side):
            if side.transport is not None:
                side.transport.close()

    def _port(self, side: _Side) -> int:
        assert side.transport is not None, "open() the link first"
        port: int = side.transport.get_extra_info("sockname")[1]
        return port

    def offer_through(self, offer_sdp: str) -> str:
        """The client's offer, its candidates moved to the proxy; notes where the client is."""
        self._client = ("127.0.0.1", _candidate_port(offer_sdp))
        return _with_port(offer_sdp, self._port(self._server_side))

    def answer_through(self, answer_sdp: str) -> str:
        """The server's answer, its candidates moved to the proxy; notes where the server is."""
        self._server = ("127.0.0.1", _candidate_port(answer_sdp))
        return _with_port(answer_sdp, self._port(self._client_side))

    def _from_client(self, data: bytes) -> None:
        if self._server is not None:
            self.uplink.handle(data, self._to_server)

    def _from_server(self, data: bytes) -> None:
        if self._client is not None:
            self.downlink.handle(data, self._to_client)

    def _to_server(self, data: bytes) -> None:
        transport = self._server_side.transport
        if transport is not None and not transport.is_closing():
            transport.sendto(data, self._server)

    def _to_client(self, data: bytes) -> None:
        transport = self._client_side.transport
        if transport is not None and not transport.is_closing():
            transport.sendto(data, self._client)


def _candidate_port(sdp: str) -> int:
    ports = {int(m.group(2)) for m in _CANDIDATE.finditer(sdp)}
    if len(ports) != 1:
        raise AssertionError(f"expected one loopback host candidate port, found {sorted(ports)}")
    return ports.pop()


def _with_port(sdp: str, port: int) -> str:
    return _CANDIDATE.sub(lambda m: f"{m.group(1)}{port}{m.group(3)}", sdp)
