"""Shared pieces of the benchmarks (signaling, relay, recording): a lean socket.io client,
statistics, /proc readers and the processes a benchmark starts (telemed nodes, redis-server,
a scratch PostgreSQL database).

Everything here runs in the benchmark's own processes; the server under test is always a
separate `telemed serve` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- statistics ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summarize(values: Iterable[float]) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of a sample (NaN-valued when empty)."""
    ordered = sorted(values)
    n = len(ordered)
    return {
        "n": float(n),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if n else math.nan,
        "mean": sum(ordered) / n if n else math.nan,
    }


def median(values: Iterable[float]) -> float:
    finite = sorted(v for v in values if not math.isnan(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


# --- /proc ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        stat = f.read()
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS from /proc/PID/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (non-idle time, /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def processes_named(name: str) -> list[int]:
    """Pids whose command name (/proc/PID/comm) is `name`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", encoding="ascii", errors="replace") as f:
                if f.read().strip() == name:
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


async def wait_for_quiet(below_pct: float, limit_s: float) -> tuple[float, float]:
    """The machine is shared: waits (at most about `limit_s`) until the whole machine is busy
    at most `below_pct` % of one core, measured over 2 s; returns (last busy %, seconds
    waited)."""
    started = time.monotonic()
    while True:
        before, at = machine_busy_seconds(), time.monotonic()
        await asyncio.sleep(2.0)
        busy = 100 * (machine_busy_seconds() - before) / (time.monotonic() - at)
        waited = time.monotonic() - started
        if busy <= below_pct or waited >= limit_s:
            return busy, waited


def cpu_seconds_of(pids: Iterable[int]) -> float:
    """Summed CPU seconds of processes that may come and go (gone ones count as 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += cpu_seconds(pid)
    return total


def machine_info(packages: Sequence[str]) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
                break
    versions: dict[str, str] = {}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "packages": versions,
    }


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (a node holding 1,000 sockets needs it
    where the soft limit is the common 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- processes the benchmark owns ----------------------------------------------------------


class ManagedProcess:
    """A child process with its output in a log file, stopped gently and then firmly."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        nice: int = 0,
        nice_may_fail: bool = False,
    ) -> None:
        """`nice_may_fail`: where `nice` is not allowed (a negative one without root), run at
        the default instead of failing to start."""
        self.name = name

        def prepare() -> None:
            raise_fd_limit()
            if nice:
                try:
                    os.nice(nice)
                except OSError:
                    if not nice_may_fail:
                        raise

        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=prepare,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int | None:
        """SIGINT (aiohttp and redis shut down cleanly on it), then SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def wait_until_ready(url: str, proc: ManagedProcess, limit_s: float = 60.0) -> None:
    """Polls `url` until it answers 200; fails at once if the process died."""
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as session:
        while True:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} not ready after {limit_s:.0f}s:\n{proc.tail()}")
            await asyncio.sleep(0.1)


# --- `telemed serve --workers N` -------------------------------------------------------------

# What the supervisor prints for every worker it starts (server/supervisor.py).
WORKER_STARTED = re.compile(r"telemed worker (\d+) started \(pid (\d+), node (.+)\)")


def started_workers(log_path: Path) -> dict[int, tuple[str, int]]:
    """Worker index -> (node id, pid) from a supervisor's output; the latest start of each
    index (a restarted worker has a new pid)."""
    found: dict[int, tuple[str, int]] = {}
    text = log_path.read_text(encoding="utf-8", errors="replace")
    for match in WORKER_STARTED.finditer(text):
        found[int(match[1])] = (match[3].strip(), int(match[2]))
    return found


async def get_from_every_worker(
    url: str, paths: Sequence[str], workers: int, token: str | None = None
) -> dict[str, list[Any]]:
    """GET each of `paths` (JSON under /api/, text otherwise) from every worker behind `url`,
    keyed by node id. The kernel hands each new connection to one worker (SO_REUSEPORT):
    fresh connections, one per session and kept alive, each first asking /healthz which
    worker it reached, until `workers` different ones have answered (or enough tries)."""
    found: dict[str, list[Any]] = {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=30)
    for _ in range(25 * max(1, workers)):
        connector = aiohttp.TCPConnector(limit=1)
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                async with http.get(url + "/healthz") as response:
                    node = str((await response.json())["node"])
                if node in found:
                    continue
                answers: list[Any] = []
                for path in paths:
                    async with http.get(url + path, headers=headers) as response:
                        answers.append(
                            await response.json()
                            if path.startswith("/api/")
                            else await response.text()
                        )
                found[node] = answers
        if len(found) >= workers:
            break
    return found


async def wait_for_workers(
    url: str, proc: ManagedProcess, workers: int, limit_s: float = 60.0
) -> list[tuple[str, int]]:
    """(node id, pid) of each serving process, worker 1 first, once every one of them
    answers /healthz (until then the kernel gives every connection to those already
    listening); for `workers` 1, the server process itself."""
    deadline = time.monotonic() + limit_s
    while True:
        answered = set(await get_from_every_worker(url, [], workers))
        if workers == 1 and answered:
            return [(answered.pop(), proc.pid)]
        started = started_workers(proc.log_path)
        if len(started) == workers and answered >= {node for node, _ in started.values()}:
            return [started[i] for i in sorted(started)]
        if time.monotonic() > deadline or not proc.alive():
            raise RuntimeError(
                f"{workers} workers not all up ({sorted(answered)} answered):\n{proc.tail()}"
            )
        await asyncio.sleep(0.2)


def start_redis(port: int, log_path: Path, nice: int = 0) -> ManagedProcess:
    return ManagedProcess(
        "redis-server",
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        log_path,
        nice=nice,
    )


async def wait_redis(port: int, proc: ManagedProcess, limit_s: float = 15.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if not proc.alive():
            raise RuntimeError(f"redis-server exited early:\n{proc.tail()}")
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                if (await reader.readline()).startswith(b"+PONG"):
                    return
            finally:
                writer.close()
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server does not answer PING")
        await asyncio.sleep(0.05)


def _asyncpg_dsn(sqlalchemy_url: str) -> str:
    return re.sub(r"^postgresql\+asyncpg://", "postgresql://", sqlalchemy_url)


def _with_database(sqlalchemy_url: str, database: str) -> str:
    head, _, tail = sqlalchemy_url.partition("://")
    authority = tail.split("/", 1)[0]
    return f"{head}://{authority}/{database}"


async def create_scratch_database(admin_url: str) -> tuple[str, str]:
    """Creates an empty database next to the one `admin_url` names; returns (name, URL)."""
    import asyncpg  # the project's PostgreSQL driver

    name = f"telemed_bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, _with_database(admin_url, name)


async def drop_scratch_database(admin_url: str, name: str) -> None:
    import asyncpg

    if not name.startswith("telemed_bench_"):
        raise ValueError(f"refusing to drop {name!r}: not a benchmark database")
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def recording_key_env(directory: Path) -> dict[str, str]:
    """A fresh recording key file in `directory`, as `telemed serve` outside --dev needs one."""
    key_file = directory / "recording.key"
    key_file.write_bytes(os.urandom(32))
    return {"TELEMED_RECORDING_KEY_FILE": str(key_file)}


def signing_key_env(directory: Path) -> dict[str, str]:
    """A fresh opinion signing key (Ed25519, PEM) in `directory`: outside --dev `telemed serve`
    refuses to start without one, and the workers of one server must share it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_file = directory / "signing.pem"
    key_file.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return {"TELEMED_SIGNING_KEY_FILE": str(key_file)}


def telemed_command() -> list[str]:
    """The `telemed` console script of the interpreter running the benchmark."""
    script = Path(sys.executable).parent / "telemed"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())"]


# --- a lean socket.io client ---------------------------------------------------------------


class SioError(Exception):
    pass


EventHandler = Callable[[str, Any, int], None]


@dataclass
class _Pending:
    future: asyncio.Future[tuple[Any, int]]


class SioClient:
    """socket.io v5 over engine.io v4, websocket transport only, one namespace.

    Far cheaper per connection than `socketio.AsyncClient` (no polling handshake, no
    per-client background tasks besides one reader), which lets two client processes hold a
    thousand connections. Speaks: open (`0`), namespace connect (`40/ns,{auth}` ->
    `40/ns,{sid}` or `44/ns,{error}`), events (`42/ns,[name, data]`), events with an ack id
    (`42/ns,ID[...]` -> `43/ns,ID[...]`), ping (`2` -> `3`), disconnect (`41/ns,`).

    `on_event(name, data, received_at_ns)` runs in the reader for every server event, with
    the monotonic time the frame was read, before JSON decoding.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        namespace: str = "/consult",
        on_event: EventHandler | None = None,
    ) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/socket.io/?EIO=4&transport=websocket"
        self._ns = namespace
        self._event_prefix = f"42{namespace},"
        self._ack_prefix = f"43{namespace},"
        self._acks: dict[int, asyncio.Future[tuple[Any, int]]] = {}
        self._next_ack = 0
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self.on_event = on_event
        self.closed_reason: str | None = None

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed and self.closed_reason is None

    async def connect(self, auth: Mapping[str, Any], limit_s: float = 15.0) -> None:
        async with asyncio.timeout(limit_s):
            ws = await self._session.ws_connect(
                self._url, autoping=True, heartbeat=None, max_msg_size=0
            )
            try:
                first = await ws.receive()
                if first.type is not aiohttp.WSMsgType.TEXT or not str(first.data).startswith("0"):
                    raise SioError(f"no engine.io open packet: {first.type} {first.data!r}")
                await ws.send_str(f"40{self._ns}," + json.dumps(dict(auth)))
                while True:
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        raise SioError(f"connection closed during connect: {msg.type}")
                    data: str = msg.data
                    if data.startswith(f"40{self._ns},"):
                        break
                    if data.startswith(f"44{self._ns},"):
                        raise SioError(f"connection refused: {data[len(self._ns) + 3 :]}")
                    if data == "2":
                        await ws.send_str("3")
            except BaseException:
                await ws.close()
                raise
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        event_prefix, ack_prefix = self._event_prefix, self._ack_prefix
        try:
            async for msg in ws:
                received = time.monotonic_ns()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                data: str = msg.data
                if data.startswith(event_prefix):
                    body = json.loads(data[len(event_prefix) :])
                    if self.on_event is not None:
                        self.on_event(body[0], body[1] if len(body) > 1 else None, received)
                elif data.startswith(ack_prefix):
                    rest = data[len(ack_prefix) :]
                    split = rest.index("[")
                    future = self._acks.pop(int(rest[:split]), None)
                    if future is not None and not future.done():
                        args = json.loads(rest[split:])
                        future.set_result((args[0] if args else None, received))
                elif data == "2":
                    await ws.send_str("3")
                elif data.startswith(f"41{self._ns}"):
                    self.closed_reason = "disconnected by the server"
                    break
                elif data.startswith("1"):
                    self.closed_reason = "engine.io close"
                    break
        except (aiohttp.ClientError, OSError) as exc:
            self.closed_reason = self.closed_reason or f"reader: {type(exc).__name__}"
        finally:
            self.closed_reason = self.closed_reason or "websocket closed"
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(SioError(f"connection lost: {self.closed_reason}"))
            self._acks.clear()

    async def call(self, event: str, data: Any, limit_s: float = 30.0) -> tuple[Any, int]:
        """Sends an event with an ack id; returns (ack payload, monotonic ns it arrived)."""
        ws = self._ws
        if ws is None or not self.connected:
            raise SioError(f"not connected ({self.closed_reason})")
        self._next_ack += 1
        ack_id = self._next_ack
        future: asyncio.Future[tuple[Any, int]] = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = future
        payload = json.dumps([event, data], separators=(",", ":"), ensure_ascii=False)
        try:
            await ws.send_str(f"42{self._ns},{ack_id}{payload}")
            return await asyncio.wait_for(future, limit_s)
        finally:
            self._acks.pop(ack_id, None)

    async def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None and not ws.closed:
            with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
                await ws.send_str(f"41{self._ns},")
            with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
                await ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self.closed_reason = self.closed_reason or "closed by the client"


def ns_to_ms(value: int) -> float:
    return value / 1_000_000.0
