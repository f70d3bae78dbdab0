"""Real-browser tests: the server as a subprocess (`telemed serve --dev`) on a free loopback port,
Debian's Chromium driven by Playwright, one browser per party (a fake camera file is a launch
flag), media files made here. Run inside a network namespace with only loopback (see the
Makefile's `pytest` target and ../shared/docs/browser-tests.md)."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import math
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from playwright.async_api import Browser, BrowserContext, Page, Playwright, async_playwright

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
# Generous: the machine is shared and has two cores; every wait is for a condition.
WAIT_S = 90.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: real-browser test (run in a loopback netns)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    async def api(
        self, method: str, path: str, token: str, body: dict[str, Any] | None = None
    ) -> Any:
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                method,
                f"{self.url}/api/v1{path}",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            ) as response,
        ):
            data = await response.json(content_type=None)
            assert response.status < 300, (response.status, data)
            return data

    async def demo(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/dev/identities") as response,
        ):
            assert response.status == 200
            data: dict[str, Any] = await response.json()
            return data


async def start_server(
    tmp: Path,
    *,
    netns: list[str] | None = None,
    address: str = "127.0.0.1",
    config: str = "",
    redis_url: str | None = None,
    workers: int = 1,
    **signaling: float,
) -> Server:
    """`netns` runs the server in a lab namespace (`lab.exec_prefix("srv")`), listening and
    offering media on `address`; `config` is more TOML, appended; `workers` > 1 needs
    `redis_url` (`telemed serve --workers N`)."""
    port = free_port()
    config_file = tmp / "telemed.toml"
    lines = [
        f'data_dir = "{tmp}"',
        "[media]",
        f'host_addresses = ["{address}"]',
        "[signaling]",
        *(f"{k} = {v}" for k, v in signaling.items()),
        config,
    ]
    config_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
    if redis_url is not None:
        env["TELEMED_REDIS_URL"] = redis_url
    # The log (stderr) apart from stdout, where --dev prints the demo tokens: tests/log_scan.py
    # scans every server.log for leaked tokens.
    log = tmp / "server.log"
    with log.open("wb") as err, (tmp / "server.stdout").open("wb") as out:
        command = [str(Path(sys.executable).parent / "telemed"), "--config", str(config_file)]
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, before any awaiting
            [
                *(netns or []),
                *command,
                "serve",
                "--dev",
                "--workers",
                str(workers),
                "--host",
                address,
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=err,
            env=env,
        )
    server = Server(f"http://{address}:{port}", port, process, log)
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            assert process.poll() is None, log.read_text()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{server.url}/readyz") as r:
                    if r.status == 200:
                        return server
            await asyncio.sleep(0.1)
    raise AssertionError("server did not start: " + log.read_text())


async def stop_server(server: Server) -> None:
    server.process.terminate()
    for _ in range(200):
        if server.process.poll() is not None:
            return
        await asyncio.sleep(0.1)
    server.process.kill()
    server.process.wait()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    s = await start_server(tmp_path, reconnect_grace_s=60)
    yield s
    await stop_server(s)


@pytest.fixture
async def lab() -> AsyncIterator[Any]:
    """The network lab with the village clinic and the county hospital (tests/netlab)."""
    from labcall import CLINIC, PEER  # labcall imports this module
    from netlab import Lab

    async with Lab([CLINIC, PEER]) as running:
        yield running


@pytest.fixture
async def lab_server(lab: Any, tmp_path: Path) -> AsyncIterator[Server]:
    """telemed in the lab's server namespace, on the lab's server address."""
    server = await start_server(tmp_path, netns=lab.exec_prefix("srv"), address=lab.address("srv"))
    yield server
    await stop_server(server)


def write_camera(path: Path, colour: tuple[int, int, int], frames: int = 30) -> None:
    """A y4m clip (320x240, 15 fps): a solid colour with a white square that moves, so every
    frame differs and the encoder keeps sending."""
    with av.open(str(path), "w", format="yuv4mpegpipe") as out:
        stream = out.add_stream("rawvideo", rate=15)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(frames):
            image = np.empty((240, 320, 3), dtype=np.uint8)
            image[:, :] = colour
            x = 10 + (i * 9) % 260
            image[100:140, x : x + 40] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_tone(path: Path, frequency: float, seconds: float = 2.0) -> None:
    rate = 48_000
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        t = np.arange(int(rate * seconds)) / rate
        wave = (0.3 * 32767 * np.sin(2 * math.pi * frequency * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(wave.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = fractions.Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_voice(path: Path, fundamental: float, seconds: float = 4.0) -> None:
    """Something a speech codec takes for speech: harmonics of `fundamental` whose pitch glides,
    under a syllable-rate envelope, with a little breath noise. Opus codes a pure tone (or
    Chromium's fake beep) as music, in CELT mode, which never carries in-band FEC; this it
    codes with SILK (hybrid mode), which does."""
    rate = 48_000
    t = np.arange(int(rate * seconds)) / rate
    pitch = fundamental * (1 + 0.1 * np.sin(2 * math.pi * 0.7 * t))
    phase = 2 * math.pi * np.cumsum(pitch) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * math.pi * 2.5 * t), 0, None) ** 0.5
    noise = np.random.default_rng(int(fundamental)).standard_normal(t.size)
    samples = (0.12 * wave * envelope + 0.01 * noise) * 32767
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            samples.astype(np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = rate
        frame.pts = 0
        frame.time_base = fractions.Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@dataclass
class Party:
    name: str
    browser: Browser
    context: BrowserContext
    page: Page
    console: list[str] = field(default_factory=list)

    async def debug(self, expression: str) -> Any:
        return await self.page.evaluate(f"window.telemedDebug.{expression}")

    async def participant_id(self) -> str:
        pid: str = await self.debug("participantId()")
        return pid


class Browsers:
    """Launches one Chromium per party, with its own fake camera and microphone."""

    def __init__(self, playwright: Playwright, tmp: Path) -> None:
        self.playwright = playwright
        self.tmp = tmp
        self.parties: list[Party] = []

    async def party(
        self,
        name: str,
        colour: tuple[int, int, int] = (40, 40, 40),
        tone: float = 440.0,
        *,
        locale: str = "en-US",
        viewport: tuple[int, int] = (1280, 800),
        executable: str = CHROMIUM,
        args: tuple[str, ...] = (),
        files: bool = True,
        voice: bool = False,
        home: Path | None = None,
    ) -> Party:
        """`executable` runs the browser elsewhere (`lab.chromium(clinic)`); `args` adds
        launch flags; without `files` the page has Chromium's own fake camera (640x480 at
        20 fps) and beep, not a clip of `colour` and a `tone`. With `voice` the microphone
        speaks (write_voice, pitched at `tone`), files or not. `home` is its HOME (where
        Chromium finds the user's NSS database of trusted certificates)."""
        media_files: list[str] = []
        if files:
            camera = self.tmp / f"cam-{name}.y4m"
            write_camera(camera, colour)
            media_files.append(f"--use-file-for-fake-video-capture={camera}")
        if files or voice:
            mic = self.tmp / f"mic-{name}.wav"
            (write_voice if voice else write_tone)(mic, tone)
            media_files.append(f"--use-file-for-fake-audio-capture={mic}")
        browser = await self.playwright.chromium.launch(
            executable_path=executable,
            args=[*FLAGS, *media_files, *args],
            env={**os.environ, "HOME": str(home)} if home is not None else None,
        )
        context = await browser.new_context(
            locale=locale,
            viewport={"width": viewport[0], "height": viewport[1]},
            permissions=["camera", "microphone"],
        )
        page = await context.new_page()
        party = Party(name, browser, context, page)
        page.on("console", lambda m: party.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: party.console.append(f"pageerror: {e}"))
        self.parties.append(party)
        return party

    async def watcher(self, name: str, host: Party, *, locale: str = "en-US") -> Party:
        """A party without camera or microphone (a trainee): a new context in `host`'s browser,
        which is cheaper than another browser."""
        context = await host.browser.new_context(
            locale=locale, viewport={"width": 1024, "height": 700}
        )
        page = await context.new_page()
        party = Party(name, host.browser, context, page)
        page.on("console", lambda m: party.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: party.console.append(f"pageerror: {e}"))
        self.parties.append(party)
        return party

    async def close(self) -> None:
        for party in self.parties:
            with contextlib.suppress(Exception):
                await party.browser.close()


@pytest.fixture
async def browsers(tmp_path: Path) -> AsyncIterator[Browsers]:
    async with async_playwright() as playwright:
        b = Browsers(playwright, tmp_path)
        try:
            yield b
        finally:
            await b.close()


async def eventually(
    check: Callable[[], Awaitable[bool]],
    what: str,
    diagnose: Callable[[], Awaitable[str]] | None = None,
    limit_s: float = WAIT_S,
) -> None:
    """Waits for a condition; on failure says what was waited for, with diagnostics."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.5)
    detail = await diagnose() if diagnose else ""
    raise AssertionError(f"timed out waiting for {what}\n{detail}")


async def frames_by_participant(party: Party) -> dict[str, int]:
    stats = await party.debug("inbound()")
    out: dict[str, int] = {}
    for s in stats:
        if s["info"]["kind"] == "video" and s["info"]["source"] == "camera":
            out[s["info"]["participant"]] = s["framesDecoded"]
    return out


async def audio_by_participant(party: Party) -> dict[str, float]:
    stats = await party.debug("inbound()")
    return {
        s["info"]["participant"]: s["totalAudioEnergy"]
        for s in stats
        if s["info"]["kind"] == "audio"
    }


async def assert_video_flows(receivers: list[Party], senders: dict[str, str]) -> None:
    """Every receiver decodes every sender's camera (not itself), and the count keeps rising."""

    async def diagnose() -> str:
        parts = []
        for p in receivers:
            parts.append(f"{p.name}: {json.dumps(await p.debug('inbound()'), indent=None)}")
            parts.append("  console: " + " | ".join(p.console[-15:]))
        return "\n".join(parts)

    for receiver in receivers:
        mine = await receiver.participant_id()
        wanted = {pid: name for pid, name in senders.items() if pid != mine}
        first: dict[str, int] = {}

        async def started(receiver: Party = receiver, wanted: dict[str, str] = wanted) -> bool:
            nonlocal first
            first = await frames_by_participant(receiver)
            return all(first.get(pid, 0) > 0 for pid in wanted)

        await eventually(started, f"{receiver.name} to decode {sorted(wanted.values())}", diagnose)

        async def rising(
            receiver: Party = receiver,
            wanted: dict[str, str] = wanted,
            base: dict[str, int] = first,
        ) -> bool:
            now = await frames_by_participant(receiver)
            return all(now.get(pid, 0) > base[pid] + 10 for pid in wanted)

        await eventually(rising, f"{receiver.name}'s decoded frames to keep rising", diagnose)


async def screenshot(party: Party, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await party.page.screenshot(path=str(path), full_page=True)
    return path


def no_missing_strings(*parties: Party) -> None:
    missing = [m for p in parties for m in p.console if "missing string" in m]
    assert not missing, missing


async def sign_in_as(party: Party, server: Server, role: str) -> None:
    """Development sign-in through the page: pick the demo identity of `role`."""
    await party.page.goto(f"{server.url}/web/")
    await party.page.locator(f'button[data-role="{role}"]').click()


class LoopbackCut:
    """Drops every loopback packet to or from the given ports (a page's ICE ports and its TCP
    connections): tc on lo's ingress redirects them to a veth that is down. Needs CAP_NET_ADMIN
    in the test's own network namespace (the Makefile's `unshare`); iptables and tc's drop
    action are not available here."""

    SINK = "telemed-sink"

    @staticmethod
    async def _tc(*args: str, check: bool = True) -> None:
        process = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await process.communicate()
        if check and process.returncode:
            raise AssertionError(f"{' '.join(args)}: {out.decode(errors='replace')}")

    async def cut(self, udp: list[int], tcp: list[int]) -> None:
        await self._tc("ip", "link", "del", self.SINK, check=False)
        await self._tc("ip", "link", "add", self.SINK, "type", "veth", "peer", "name", "tm-sink1")
        await self._tc("tc", "qdisc", "del", "dev", "lo", "ingress", check=False)
        await self._tc("tc", "qdisc", "add", "dev", "lo", "handle", "ffff:", "ingress")
        for protocol, ports in (("17", udp), ("6", tcp)):
            for port in ports:
                for side in ("sport", "dport"):
                    await self._tc(
                        *("tc", "filter", "add", "dev", "lo", "parent", "ffff:", "protocol"),
                        *("ip", "prio", "1", "u32", "match", "ip", "protocol", protocol, "0xff"),
                        *("match", "ip", side, str(port), "0xffff"),
                        *("action", "mirred", "egress", "redirect", "dev", self.SINK),
                    )

    async def restore(self) -> None:
        await self._tc("tc", "qdisc", "del", "dev", "lo", "ingress", check=False)
        await self._tc("ip", "link", "del", self.SINK, check=False)


def _browser_pids(marker: str) -> set[int]:
    """The processes of the Chromium whose command line holds `marker`, and their descendants
    (the network service, which owns the sockets, is a child)."""
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                roots.add(int(entry.name))
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


async def browser_tcp_ports(party: Party, server: Server) -> list[int]:
    """Local ports of `party`'s browser's TCP connections to the server (its socket.io
    websocket and any HTTP keep-alive connection), from `ss`."""
    pids = _browser_pids(f"cam-{party.name}.y4m")
    process = await asyncio.create_subprocess_exec(
        "ss",
        "-Htnp",
        "state",
        "established",
        "dst",
        f"127.0.0.1:{server.port}",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    ports = []
    for line in out.decode().splitlines():
        owners = {int(m) for m in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            ports.append(int(line.split()[2].rsplit(":", 1)[1]))
    return ports
