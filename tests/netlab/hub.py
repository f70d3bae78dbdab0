"""PYTEST_DONT_REWRITE
The network lab's hub: a user-space router between TUN devices, one per endpoint, that impairs
each clinic's link. Run by `netlab.Lab` as a root subprocess (never by hand):

    python hub.py '{"seed": 1, "endpoints": [{"name": "srv", "tun": "tl1srv", "address":
    "10.99.0.1", "impaired": false}, ...]}'

It creates the TUN devices in its own namespace and prints {"ready": true}; the lab then moves
each into its endpoint's namespace (an open TUN descriptor keeps working when its device moves).
An IPv4 packet read from endpoint A's device for endpoint B's address goes through A's uplink
stage, then B's downlink stage (netlab.impairment.Stage), and is written to B's device when its
time comes. Control is JSON lines on stdin, one answer line each on stdout:
{"op": "impair", "link": NAME, "up": {...}, "down": {...}}, {"op": "move", "link": NAME,
"address": "10.99.0.N"} (a clinic's new address), {"op": "counters"}, {"op": "stop"}.

Bounded: what waits is bounded by the stages (a capped queue drops past `queue_ms`; a delay
holds at most delay + jitter of traffic), and the hub stops when stdin closes (its lab went)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import random
import struct
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netlab.impairment import CLEAN, Impairment, Stage

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65535
# Packets waiting for their time, at most: a flood through a delay must not grow without end.
MAX_PENDING = 50_000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Endpoint:
    def __init__(self, name: str, tun: str, address: str, impaired: bool, seed: int) -> None:
        self.name = name
        self.fd = open_tun(tun)
        self.address = bytes(int(part) for part in address.split("."))
        self.impaired = impaired
        # Each direction its own generator: one link's traffic never shifts another's dice.
        self.up = Stage(CLEAN, random.Random(f"{seed}/{name}/up"))
        self.down = Stage(CLEAN, random.Random(f"{seed}/{name}/down"))
        self.write_errors = 0


class Hub:
    def __init__(self, spec: dict[str, Any]) -> None:
        seed = int(spec.get("seed", 1))
        self.endpoints = [
            Endpoint(e["name"], e["tun"], e["address"], bool(e["impaired"]), seed)
            for e in spec["endpoints"]
        ]
        self.by_address = {e.address: e for e in self.endpoints}
        self.by_name = {e.name: e for e in self.endpoints}
        self.unroutable = 0
        self.overflowed = 0
        self.pending = 0
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()

    def start(self) -> None:
        for endpoint in self.endpoints:
            self.loop.add_reader(endpoint.fd, self._read, endpoint)

    def stop(self) -> None:
        for endpoint in self.endpoints:
            self.loop.remove_reader(endpoint.fd)
            os.close(endpoint.fd)

    def _read(self, source: Endpoint) -> None:
        now = self.loop.time()
        while True:
            try:
                packet = os.read(source.fd, MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                return
            if len(packet) < 20 or packet[0] >> 4 != 4:
                continue  # IPv6 and anything else: the lab routes IPv4 only
            target = self.by_address.get(packet[16:20])
            if target is None or target is source:
                self.unroutable += 1
                continue
            protocol = packet[9]
            leaves = source.up.admit(len(packet), protocol, now) if source.impaired else now
            if leaves is None:
                continue
            if not source.impaired:
                self._arrive(target, packet, protocol)
            else:
                # Always through the timers, even when due now: a packet sent at once would
                # overtake one of the stage's that is due but not yet run.
                self._later(leaves, self._arrive, target, packet, protocol)

    def _arrive(self, target: Endpoint, packet: bytes, protocol: int) -> None:
        now = self.loop.time()
        leaves = target.down.admit(len(packet), protocol, now) if target.impaired else now
        if leaves is None:
            return
        if not target.impaired:
            self._write(target, packet)
        else:
            self._later(leaves, self._write, target, packet)

    def _later(self, when: float, step: Any, *args: Any) -> None:
        if self.pending >= MAX_PENDING:
            self.overflowed += 1
            return
        self.pending += 1
        self.loop.call_at(when, self._run_pending, step, args)

    def _run_pending(self, step: Any, args: tuple[Any, ...]) -> None:
        self.pending -= 1
        step(*args)

    def _write(self, target: Endpoint, packet: bytes) -> None:
        try:
            os.write(target.fd, packet)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EIO, errno.EINVAL):
                raise
            target.write_errors += 1

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "impair":
            endpoint = self.by_name.get(str(request.get("link")))
            if endpoint is None or not endpoint.impaired:
                return {"error": f"no impaired link named {request.get('link')!r}"}
            try:
                up = Impairment.from_json(request.get("up") or {})
                down = Impairment.from_json(request.get("down") or {})
            except (TypeError, ValueError) as exc:
                return {"error": str(exc)}
            endpoint.up.set(up)
            endpoint.down.set(down)
            return {"ok": True}
        if op == "move":
            # A clinic's new address (its namespace changes the device's address itself):
            # packets for the old one are unroutable from now on, as after a real change.
            endpoint = self.by_name.get(str(request.get("link")))
            if endpoint is None or not endpoint.impaired:
                return {"error": f"no impaired link named {request.get('link')!r}"}
            try:
                address = bytes(int(part) for part in str(request.get("address")).split("."))
            except ValueError:
                address = b""
            if len(address) != 4 or address in self.by_address:
                return {"error": f"cannot move to {request.get('address')!r}"}
            del self.by_address[endpoint.address]
            endpoint.address = address
            self.by_address[address] = endpoint
            return {"ok": True}
        if op == "counters":
            return {
                "links": {
                    e.name: {
                        "up": asdict(e.up.counters),
                        "down": asdict(e.down.counters),
                        "write_errors": e.write_errors,
                    }
                    for e in self.endpoints
                },
                "unroutable": self.unroutable,
                "overflowed": self.overflowed,
            }
        if op == "stop":
            self.stopped.set()
            return {"ok": True}
        return {"error": f"unknown op {op!r}"}


async def serve(spec: dict[str, Any]) -> None:
    hub = Hub(spec)
    hub.start()
    reader = asyncio.StreamReader()
    await hub.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)

    async def control() -> None:
        while not hub.stopped.is_set():
            line = await reader.readline()
            if not line:
                hub.stopped.set()  # the lab is gone
                return
            try:
                request = json.loads(line)
                answer = hub.command(request) if isinstance(request, dict) else {"error": "?"}
            except json.JSONDecodeError as exc:
                answer = {"error": f"unreadable command: {exc}"}
            print(json.dumps(answer), flush=True)

    task = asyncio.create_task(control())
    await hub.stopped.wait()
    task.cancel()
    hub.stop()


if __name__ == "__main__":
    asyncio.run(serve(json.loads(sys.argv[1])))
