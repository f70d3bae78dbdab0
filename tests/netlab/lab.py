"""PYTEST_DONT_REWRITE
The network lab: a namespace per endpoint — "srv" for the server, one per clinic — joined by the
hub (netlab/hub.py), which impairs each clinic's link in each direction. The test's own
namespace is the endpoint "host" (unimpaired), so the test reaches the server directly; it must
be a namespace of our own (make test runs lab tests under `unshare --net`), never the machine's.

    async with Lab(["village", "county"]) as lab:
        await lab.impair("village", up=Impairment(loss=0.05), down=Impairment(loss=0.05))
        subprocess.Popen([*lab.exec_prefix("srv"), "telemed", "serve", ...])
        browser = await playwright.chromium.launch(executable_path=lab.chromium("village"))

Every endpoint has one address, 10.99.0.0/24 on its TUN device; nothing else is routed, so no
packet of the lab leaves its namespaces. Clinic names are short words ([a-z0-9], ≤ 8)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from netlab.impairment import CLEAN, Impairment

HUB = Path(__file__).resolve().parent / "hub.py"
SUBNET = "10.99.0"
SERVER = "srv"
HOST = "host"
CHROMIUM = "/usr/bin/chromium"
_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")


class LabError(RuntimeError):
    pass


def in_own_network_namespace() -> bool:
    """Whether this process's network namespace is one of ours: it has no interface but
    loopback (and a lab's devices), so the machine's network is not this one."""
    with open("/proc/self/net/dev") as dev:
        names = [line.split(":")[0].strip() for line in dev.readlines()[2:]]
    return all(name == "lo" or name.startswith("tl") for name in names)


async def _run(*argv: str, check: bool = True) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    if check and process.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {stderr.decode().strip() or process.returncode}")


def _stale_namespaces() -> list[str]:
    """Namespaces of labs whose process is gone (killed mid-test): named tl<pid>-<endpoint>."""
    netns = Path("/run/netns")
    names = [path.name for path in netns.glob("tl*-*")] if netns.is_dir() else []
    return [
        name
        for name in names
        if (pid := re.match(r"^tl(\d+)-", name)) and not Path(f"/proc/{pid.group(1)}").exists()
    ]


class Lab:
    def __init__(self, clinics: Sequence[str], *, seed: int = 1) -> None:
        for name in clinics:
            if not _NAME.match(name) or name in (SERVER, HOST):
                raise ValueError(f"a clinic name is a short lower-case word, not {name!r}")
        if len(set(clinics)) != len(clinics):
            raise ValueError("clinic names must differ")
        self.clinics = list(clinics)
        self.seed = seed
        tag = f"tl{os.getpid() % 100000}"
        # Endpoint -> (namespace or None for the test's own, tun device, address).
        names = [SERVER, *self.clinics, HOST]
        self._endpoints = {
            name: (
                None if name == HOST else f"{tag}-{name}",
                f"{tag}t{index}",
                f"{SUBNET}.{254 if name == HOST else index + 1}",
            )
            for index, name in enumerate(names)
        }
        self._hub: asyncio.subprocess.Process | None = None
        self._hub_lock = asyncio.Lock()
        self._made: list[str] = []
        self._dir: Path | None = None

    # --- what tests use ----------------------------------------------------------------------

    def address(self, name: str) -> str:
        return self._endpoints[name][2]

    def netns(self, name: str) -> str:
        ns = self._endpoints[name][0]
        if ns is None:
            raise ValueError("the host endpoint is the test's own namespace")
        return ns

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns(name)]

    def chromium(self, name: str) -> str:
        """An executable that runs Debian's Chromium in `name`'s namespace (for Playwright's
        `executable_path`; Playwright talks to it over pipes, which cross namespaces)."""
        assert self._dir is not None, "the lab is not running"
        wrapper = self._dir / f"chromium-{name}"
        if not wrapper.exists():
            wrapper.write_text(
                f'#!/bin/sh\nexec ip netns exec {self.netns(name)} {CHROMIUM} "$@"\n'
            )
            wrapper.chmod(0o755)
        return str(wrapper)

    async def impair(self, name: str, up: Impairment = CLEAN, down: Impairment = CLEAN) -> None:
        """From now on, `name`'s uplink (its packets towards anyone) and downlink."""
        answer = await self._ask(
            {"op": "impair", "link": name, "up": up.to_json(), "down": down.to_json()}
        )
        if "error" in answer:
            raise LabError(answer["error"])

    async def move(self, name: str, address: str) -> None:
        """`name`'s address changes to `address` (in 10.99.0.0/24, unused), as when a clinic's
        4G router gets a new one: the old address goes from its device, then the new one comes;
        connections bound to the old address are dead from then on."""
        ns, tun, old = self._endpoints.get(name, (None, "", ""))
        if ns is None or name not in self.clinics:
            raise LabError(f"no clinic named {name!r}")
        if not re.match(rf"^{re.escape(SUBNET)}\.([2-9]|[1-9]\d|1\d\d|2[0-4]\d|25[0-3])$", address):
            raise LabError(f"{address!r} is not a clinic address in {SUBNET}.0/24")
        answer = await self._ask({"op": "move", "link": name, "address": address})
        if "error" in answer:
            raise LabError(answer["error"])
        await _run("ip", "-n", ns, "addr", "del", f"{old}/24", "dev", tun)
        await _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", tun)
        self._endpoints[name] = (ns, tun, address)

    async def counters(self) -> dict[str, Any]:
        """Per link, per direction: packets, bytes, blocked, lost, queue_dropped, delivered."""
        return await self._ask({"op": "counters"})

    # --- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Lab:
        if os.geteuid() != 0:
            raise LabError("the network lab needs root (namespaces and TUN devices)")
        if not in_own_network_namespace():
            raise LabError(
                "the network lab adds an address to this process's network namespace: run it "
                "in one of its own (`unshare --net`), as make test does"
            )
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _start(self) -> None:
        for stale in _stale_namespaces():
            await _run("ip", "netns", "del", stale, check=False)
        self._dir = Path(tempfile.mkdtemp(prefix="netlab-"))
        spec = {
            "seed": self.seed,
            "endpoints": [
                {"name": name, "tun": tun, "address": address, "impaired": name in self.clinics}
                for name, (_, tun, address) in self._endpoints.items()
            ],
        }
        self._hub = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HUB),
            json.dumps(spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        ready = await self._line()
        if not ready.get("ready"):
            raise LabError(f"the hub did not start: {ready}")
        for ns, tun, address in self._endpoints.values():
            if ns is None:
                await _run("ip", "link", "set", "lo", "up")
                await _run("ip", "addr", "add", f"{address}/24", "dev", tun)
                await _run("ip", "link", "set", tun, "up")
                continue
            await _run("ip", "netns", "add", ns)
            self._made.append(ns)
            await _run("ip", "link", "set", tun, "netns", ns)
            await _run("ip", "-n", ns, "link", "set", "lo", "up")
            await _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", tun)
            await _run("ip", "-n", ns, "link", "set", tun, "up")

    async def _stop(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            if hub.stdin is not None:
                hub.stdin.close()  # the hub stops when its control pipe closes
            try:
                await asyncio.wait_for(hub.wait(), 5)
            except TimeoutError:
                hub.kill()
                await hub.wait()
        for ns in reversed(self._made):
            await _run("ip", "netns", "del", ns, check=False)
        self._made.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        async with self._hub_lock:
            hub = self._hub
            if hub is None or hub.stdin is None:
                raise LabError("the lab is not running")
            hub.stdin.write(json.dumps(request).encode() + b"\n")
            await hub.stdin.drain()
            return await self._line()

    async def _line(self) -> dict[str, Any]:
        assert self._hub is not None and self._hub.stdout is not None
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(self._hub.stdout.readline(), 10)
            if line:
                answer: dict[str, Any] = json.loads(line)
                return answer
        raise LabError("the hub stopped answering")
