"""Signaling benchmark: N socket.io clients in M consultation rooms, joining and chatting,
against one telemed node or two nodes sharing Redis and PostgreSQL.

    python bench/signaling.py --connections 1000 --rooms 100 --runs 3 --nodes 1 --db sqlite
    python bench/signaling.py --connections 1000 --rooms 100 --nodes 1,2 --db postgres
    python bench/signaling.py --connections 1000 --rooms 100 --nodes 1r,1w2 --db postgres
    python bench/signaling.py --quick

`--nodes 1w2`: one node of `telemed serve --workers 2` (a supervisor and two workers sharing
its port, the kernel spreading the sockets over them) behind Redis; its CPU is summed over the
supervisor and the workers (pids from the supervisor's `telemed worker i started` lines) and
given per worker; ratios are taken against `1` and against `1r` (one process with Redis).

Each run starts everything afresh in a temporary directory and tears it down in `finally`:
the telemed node(s) (`telemed serve`, separate processes), a scratch PostgreSQL database and
a private redis-server when the scenario needs them. Consultations are created through the
REST API (a village doctor requests one per room with the room's clinicians on the team, a
county physician on the team accepts and schedules it); every client is a clinician on the
team, so joins seat at once (clinicians hold `admit`; there is no waiting room).

Clients run in `--workers` separate processes, each one asyncio loop holding its share of the
connections with a lean websocket socket.io client (bench/common.py); all clients of a room
live in one worker, spread over the nodes. Phases of a run:

1. warm-up: a few extra rooms join and chat, then leave (not measured);
2. joins, open loop at `--join-rate` per second, rooms interleaved: join latency is emit
   `join` -> its ack (the `joined` snapshot precedes the ack); connect latency (websocket +
   namespace connect) is reported apart;
3. chat, open loop: each room gets one message every `--interval` s from a rotating sender,
   rooms staggered; the first `--chat-warmup` s are not measured, then `--duration` s are.
   The text carries the sender's CLOCK_MONOTONIC send time; fan-out latency is each other
   member's `chat_message` arrival minus that (the sender's own echo is not counted);
4. a real `socketio.AsyncClient` (the probe) sits in room 0 and must see exactly the measured
   messages of room 0, with the documented payload fields.

Server CPU is utime+stime from /proc/PID/stat over the measured chat window (and over the
join phase) as % of one core; memory is VmRSS, and per connection the RSS growth from after
warm-up to after the joins, divided by the connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

_BENCH_DIR = Path(__file__).resolve().parent
_ROOT = _BENCH_DIR.parent
# Run as `python bench/signaling.py`: the repository root, not bench/, must be importable
# (bench/signaling.py would otherwise shadow the project's `signaling` package).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.common import (  # noqa: E402
    ManagedProcess,
    SioClient,
    SioError,
    cpu_seconds,
    cpu_seconds_of,
    create_scratch_database,
    drop_scratch_database,
    free_port,
    machine_busy_seconds,
    machine_info,
    median,
    processes_named,
    raise_fd_limit,
    recording_key_env,
    rss_bytes,
    signing_key_env,
    start_redis,
    summarize,
    telemed_command,
    wait_for_quiet,
    wait_for_workers,
    wait_redis,
    wait_until_ready,
)

NAMESPACE = "/consult"
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
# Team roles that hold `admit` (seated without a waiting room); the first requests the
# consultation, the second (a county physician) accepts and schedules it.
MEMBER_ROLES = ("village_doctor", "county_physician", "township_doctor", "provincial_specialist")
CHAT_FIELDS = frozenset({"seq", "at", "participant", "name", "role", "text"})
PACKAGES: tuple[str, ...] = (
    "aiohttp",
    "python-socketio",
    "python-engineio",
    "SQLAlchemy",
    "aiosqlite",
)
PACKAGES += ("asyncpg", "redis", "pydantic", "PyJWT")


# --- plans handed to the client workers -----------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    room: int
    member: int
    token: str
    consultation_id: str
    node: int
    url: str
    join_at_s: float


@dataclass(frozen=True)
class WorkerPlan:
    worker: int
    clients: tuple[ClientSpec, ...]
    nodes: int
    rooms_total: int
    interval_s: float
    timeout_s: float
    nice: int


@dataclass(frozen=True)
class ChatPhase:
    start_ns: int  # the first message (chat warm-up starts)
    measure_ns: int  # messages sent from here on are measured
    end_ns: int  # no message is sent at or after this
    drain_s: float  # how long to wait for late deliveries


def node_of(member: int, nodes: int) -> int:
    """Room members alternate between the nodes, so a room's fan-out crosses them."""
    return member % nodes


# --- the client worker process --------------------------------------------------------------


@dataclass
class _Client:
    spec: ClientSpec
    sio: SioClient
    joined: bool = False


@dataclass
class _ChatTally:
    fanout_ms: list[float] = field(default_factory=list)
    same_node_ms: list[float] = field(default_factory=list)
    cross_node_ms: list[float] = field(default_factory=list)
    ack_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    expected: dict[tuple[int, int], int] = field(default_factory=dict)
    delivered: Counter[tuple[int, int]] = field(default_factory=Counter)
    room0_sent: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    checked: int = 0
    malformed: int = 0
    sent: int = 0


class Worker:
    def __init__(self, plan: WorkerPlan, session: aiohttp.ClientSession) -> None:
        self.plan = plan
        self.session = session
        self.clients: list[_Client] = []
        self.rooms: dict[int, list[_Client]] = {}
        self.tally = _ChatTally()
        self.join_errors: Counter[str] = Counter()
        self._inflight: set[asyncio.Task[None]] = set()

    # Every server event of every client lands here, in that client's reader.
    def on_event(self, client: _Client, event: str, data: Any, received_ns: int) -> None:
        if event == "chat_message":
            text = data.get("text") if isinstance(data, dict) else None
            if not isinstance(text, str) or not text.startswith("b|"):
                return
            tally = self.tally
            if tally.checked < 100:
                tally.checked += 1
                if not data.keys() >= CHAT_FIELDS or not isinstance(data["seq"], int):
                    tally.malformed += 1
            _, room, k, sender, sent_ns, warm = text.split("|")
            sender_member = int(sender)
            if sender_member == client.spec.member or warm == "1":
                return  # the sender's own echo, or a warm-up message
            key = (int(room), int(k))
            tally.delivered[key] += 1
            ms = (received_ns - int(sent_ns)) / 1e6
            tally.fanout_ms.append(ms)
            if node_of(sender_member, self.plan.nodes) == client.spec.node:
                tally.same_node_ms.append(ms)
            else:
                tally.cross_node_ms.append(ms)
        elif event == "error":
            code = data.get("code") if isinstance(data, dict) else data
            self.tally.errors[f"error event: {code}"] += 1

    async def join_all(self, t0_ns: int) -> dict[str, Any]:
        connect_ms: list[float] = []
        join_ms: list[float] = []
        open_ms: list[float] = []

        async def one(spec: ClientSpec) -> None:
            await _sleep_until(t0_ns + int(spec.join_at_s * 1e9))
            client = _Client(spec, SioClient(self.session, spec.url, NAMESPACE))
            client.sio.on_event = lambda e, d, t: self.on_event(client, e, d, t)
            self.clients.append(client)
            started = time.monotonic_ns()
            try:
                await client.sio.connect({"token": spec.token}, limit_s=self.plan.timeout_s)
            except (SioError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.join_errors[f"connect: {type(exc).__name__}: {str(exc)[:80]}"] += 1
                return
            connected = time.monotonic_ns()
            connect_ms.append((connected - started) / 1e6)
            body = {"consultation_id": spec.consultation_id, "device": "bench"}
            try:
                ack, acked = await client.sio.call("join", body, limit_s=self.plan.timeout_s)
            except (SioError, TimeoutError) as exc:
                self.join_errors[f"join: {type(exc).__name__}: {str(exc)[:80]}"] += 1
                return
            if not (isinstance(ack, dict) and ack.get("ok") is True):
                self.join_errors[f"join refused: {_error_code(ack)}"] += 1
                return
            client.joined = True
            join_ms.append((acked - connected) / 1e6)
            if spec.member == 0:
                open_ms.append((acked - connected) / 1e6)
            self.rooms.setdefault(spec.room, []).append(client)

        await asyncio.gather(*(one(spec) for spec in self.plan.clients))
        for members in self.rooms.values():
            members.sort(key=lambda c: c.spec.member)
        return {
            "connect_ms": connect_ms,
            "join_ms": join_ms,
            "open_join_ms": open_ms,
            "joined": sum(c.joined for c in self.clients),
            "errors": dict(self.join_errors),
        }

    async def chat(self, phase: ChatPhase) -> dict[str, Any]:
        self.tally = tally = _ChatTally()
        stop = asyncio.Event()
        lag = asyncio.create_task(self._watch_loop_lag(stop, phase))
        await asyncio.gather(
            *(
                self._room_loop(room, members, phase)
                for room, members in self.rooms.items()
                if len(members) >= 2
            )
        )
        deadline = time.monotonic() + phase.drain_s
        while time.monotonic() < deadline and (self._inflight or self._missing() > 0):  # noqa: ASYNC110 - polls the tally
            await asyncio.sleep(0.05)
        stop.set()
        await lag
        for task in list(self._inflight):
            task.cancel()
        expected = sum(tally.expected.values())
        delivered = sum(min(tally.delivered[k], n) for k, n in tally.expected.items())
        return {
            "fanout_ms": tally.fanout_ms,
            "same_node_ms": tally.same_node_ms,
            "cross_node_ms": tally.cross_node_ms,
            "ack_ms": tally.ack_ms,
            "lag_ms": tally.lag_ms,
            "sent": tally.sent,
            "expected": expected,
            "delivered": delivered,
            "duplicates": sum(
                max(0, tally.delivered[k] - tally.expected.get(k, 0)) for k in tally.delivered
            ),
            "room0_sent": tally.room0_sent,
            "errors": dict(tally.errors),
            "checked": tally.checked,
            "malformed": tally.malformed,
            "held": sum(c.joined and c.sio.connected for c in self.clients),
        }

    def _missing(self) -> int:
        tally = self.tally
        return sum(max(0, n - tally.delivered[k]) for k, n in tally.expected.items())

    async def _room_loop(self, room: int, members: list[_Client], phase: ChatPhase) -> None:
        interval_ns = int(self.plan.interval_s * 1e9)
        offset_ns = interval_ns * room // self.plan.rooms_total  # rooms staggered evenly
        k = 0
        while True:
            due = phase.start_ns + offset_ns + k * interval_ns
            if due >= phase.end_ns:
                return
            await _sleep_until(due)
            sender = members[k % len(members)]
            # Open loop: a slow answer must not delay the next message.
            task = asyncio.create_task(
                self._send(room, k, sender, due >= phase.measure_ns, len(members) - 1)
            )
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            k += 1

    async def _send(
        self, room: int, k: int, sender: _Client, measured: bool, receivers: int
    ) -> None:
        tally = self.tally
        if measured:
            tally.expected[(room, k)] = receivers
            tally.sent += 1
            if room == 0:
                tally.room0_sent.append(k)
        sent = time.monotonic_ns()
        text = f"b|{room}|{k}|{sender.spec.member}|{sent}|{0 if measured else 1}"
        try:
            ack, acked = await sender.sio.call("chat", {"text": text}, self.plan.timeout_s)
        except (SioError, TimeoutError) as exc:
            tally.errors[f"chat: {type(exc).__name__}"] += 1
            return
        if not (isinstance(ack, dict) and ack.get("ok") is True):
            tally.errors[f"chat refused: {_error_code(ack)}"] += 1
        elif measured:
            tally.ack_ms.append((acked - sent) / 1e6)

    async def _watch_loop_lag(self, stop: asyncio.Event, phase: ChatPhase) -> None:
        """How late this client loop wakes up: the client side's share of the latency."""
        tick_ns = 5_000_000
        while not stop.is_set():
            before = time.monotonic_ns()
            await asyncio.sleep(tick_ns / 1e9)
            if phase.measure_ns <= before < phase.end_ns:
                self.tally.lag_ms.append(max(0, time.monotonic_ns() - before - tick_ns) / 1e6)

    async def close_all(self) -> None:
        await asyncio.gather(*(c.sio.close() for c in self.clients), return_exceptions=True)


def worker_main(plan: WorkerPlan, conn: Connection) -> None:
    """Entry point of a client worker process (spawned)."""
    raise_fd_limit()
    if plan.nice:
        os.nice(plan.nice)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_worker(plan, conn))


async def _worker(plan: WorkerPlan, conn: Connection) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        worker = Worker(plan, session)
        conn.send(("ready", os.getpid()))
        try:
            while True:
                command, arg = await asyncio.to_thread(conn.recv)
                if command == "join":
                    conn.send(("joined", await worker.join_all(arg)))
                elif command == "chat":
                    conn.send(("chatted", await worker.chat(arg)))
                elif command == "close":
                    await worker.close_all()
                    conn.send(("closed", None))
                    return
                else:
                    raise ValueError(f"unknown command {command!r}")
        finally:
            await worker.close_all()


async def _sleep_until(deadline_ns: int) -> None:
    delay = (deadline_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


def _error_code(ack: Any) -> str:
    if isinstance(ack, dict) and isinstance(ack.get("error"), dict):
        return str(ack["error"].get("code"))
    return repr(ack)[:80]


# --- scenarios ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    nodes: int
    db: str  # "sqlite" | "postgres"
    redis: bool
    # Per node: `telemed serve --workers N` (N > 1: a supervisor and N workers on its port).
    workers: int = 1

    @property
    def label(self) -> str:
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''}"
        if self.workers > 1:
            return f"{nodes}, {self.workers} workers, {self.db}"
        return f"{nodes}, {self.db}" + (", redis" if self.redis and self.nodes == 1 else "")


def node_spec(spec: str) -> tuple[int, bool, int] | None:
    """--nodes item -> (nodes, redis, workers per node); None if it is not one."""
    fixed = {"1": (1, False, 1), "1r": (1, True, 1), "2": (2, True, 1)}
    if spec in fixed:
        return fixed[spec]
    match = re.fullmatch(r"1w([2-9])", spec)
    return (1, True, int(match[1])) if match else None


def scenarios_from(nodes: Sequence[str], dbs: Sequence[str]) -> list[Scenario]:
    found: list[Scenario] = []
    for db in dbs:
        for spec in nodes:
            parsed = node_spec(spec)
            assert parsed is not None  # checked by parse_args
            count, redis, workers = parsed
            if (count > 1 or workers > 1) and db == "sqlite":
                print(
                    f"skipping {spec} on sqlite: nodes and workers must share one database, "
                    "and two processes writing one SQLite file serialise",
                    file=sys.stderr,
                )
                continue
            found.append(Scenario(count, db, redis, workers))
    return found


@dataclass(frozen=True)
class Member:
    room: int
    member: int
    user_id: str
    name: str
    role: str
    org: str
    token: str


@dataclass(frozen=True)
class Room:
    index: int
    consultation_id: str
    members: tuple[Member, ...]


class Minter:
    """Access tokens for the benchmark's clinicians, signed with the run's secret."""

    def __init__(self, secret: str) -> None:
        from pydantic import SecretStr

        from server.auth import TokenService
        from server.config import JwtConfig

        self._tokens = TokenService(JwtConfig(secret=SecretStr(secret)))

    def member(self, run_tag: str, room: int, index: int, role: str) -> Member:
        from rooms.model import UserId
        from rooms.roles import Role

        user_id = f"bench-{run_tag}-r{room}-m{index}"
        name = f"Bench {room}-{index}"
        org = f"bench-org-{index % 7}"
        token = self._tokens.mint(user_id=UserId(user_id), name=name, role=Role(role), org=org)
        return Member(room, index, user_id, name, role, org, token)


async def create_rooms(
    base_url: str, minter: Minter, run_tag: str, first: int, count: int, size: int, extra: int
) -> list[Room]:
    """`count` scheduled consultations whose teams are `size` clinicians each (room `first`
    gets `extra` more, for the probe), created, accepted and scheduled through the REST API."""
    api = base_url + "/api/v1"
    when = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    limit = asyncio.Semaphore(8)

    async def one(session: aiohttp.ClientSession, index: int) -> Room:
        n = size + (extra if index == first else 0)
        members = tuple(
            minter.member(run_tag, index, i, MEMBER_ROLES[i % len(MEMBER_ROLES)]) for i in range(n)
        )
        body = {
            "specialty": "respiratory",
            "resident": {
                "pseudonym": f"bench-{run_tag}-resident-{index}",
                "display_name": f"Resident {index}",
                "age": 70,
                "sex": "female",
            },
            "reason": "benchmark",
            "purpose": "benchmark",
            "requested_specialty": "respiratory",
            "requested_title": "chief physician",
            "team": [
                {"user_id": m.user_id, "name": m.name, "role": m.role, "institution": m.org}
                for m in members[1:]
            ],
        }

        async def post(token: str, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.post(api + path, json=payload, headers=headers) as response:
                answer: dict[str, Any] = await response.json(content_type=None)
                if response.status >= 300:
                    raise RuntimeError(f"POST {path}: {response.status} {answer}")
                return answer

        async with limit:
            created = await post(members[0].token, "/consultations", body)
            cid = str(created["id"])
            await post(members[1].token, f"/consultations/{cid}/accept", None)
            await post(members[1].token, f"/consultations/{cid}/schedule", {"scheduled_time": when})
        return Room(index, cid, members)

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(one(session, first + i) for i in range(count))))


# --- one run of one scenario ------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    node_cpu: list[float]
    node_rss: list[int]
    worker_cpu: list[float]
    pg_cpu: float
    redis_cpu: float
    machine_busy: float  # CPU seconds all processes used (from /proc/stat)
    own_cpu: float  # this orchestrator process
    # Per serving process (a node's workers, or the node itself), node by node.
    serving_cpu: list[float] = field(default_factory=list)


class Run:
    def __init__(self, scenario: Scenario, args: argparse.Namespace, index: int) -> None:
        self.scenario = scenario
        self.args = args
        self.index = index
        self.tag = secrets.token_hex(3)
        self.tmp = Path(tempfile.mkdtemp(prefix="telemed-bench-"))
        self.nodes: list[ManagedProcess] = []
        # Per node, its serving processes: (node id, pid); with workers, the supervisor
        # (the node's process) is counted in the node's CPU besides them.
        self.serving: list[list[tuple[str, int]]] = []
        self.ports: list[int] = []
        self.redis: ManagedProcess | None = None
        self.database: str | None = None
        self.workers: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Connection] = []
        self.worker_pids: list[int] = []
        self.stats_files: list[Path] = []
        self.instrumented: list[Any] = []
        self.quiet_wait_s = 0.0
        self._pg_seen: dict[int, float] = {}
        self._pg_total: dict[int, float] = {}
        self.busy_before_pct = math.nan

    def _postgres_cpu(self) -> float:
        """CPU seconds of the machine's PostgreSQL processes, counting each process from the
        first time it was seen (backends come and go; a plain sum would jump)."""
        total = 0.0
        for pid in processes_named("postgres"):
            with contextlib.suppress(OSError, ValueError):
                now = cpu_seconds(pid)
                first = self._pg_seen.setdefault(pid, now)
                self._pg_total[pid] = now - first
        total = sum(self._pg_total.values())
        return total

    def sample(self) -> Sample:
        pg = self._postgres_cpu() if self.scenario.db == "postgres" else 0.0
        return Sample(
            at=time.monotonic(),
            node_cpu=[cpu_seconds_of(self._node_pids(i)) for i in range(len(self.nodes))],
            node_rss=[
                sum(rss_bytes(pid) for pid in self._node_pids(i)) for i in range(len(self.nodes))
            ],
            worker_cpu=[cpu_seconds_of([pid]) for pid in self.worker_pids],
            pg_cpu=pg,
            redis_cpu=cpu_seconds_of([self.redis.pid]) if self.redis else 0.0,
            machine_busy=machine_busy_seconds(),
            own_cpu=cpu_seconds(os.getpid()),
            serving_cpu=[cpu_seconds_of([pid]) for node in self.serving for _, pid in node],
        )

    def _node_pids(self, index: int) -> list[int]:
        node = self.nodes[index]
        serving = [pid for _, pid in self.serving[index]] if index < len(self.serving) else []
        return sorted({node.pid, *serving})

    async def execute(self) -> dict[str, Any]:
        try:
            report = await self._execute()
        finally:
            await self._teardown()
        if self.instrumented:
            report["server"]["instrumented"] = self.instrumented
        return report

    def _read_stats(self) -> list[Any]:
        found = []
        for path in self.stats_files:
            try:
                found.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                found.append(None)
        return found

    async def _wait_for_quiet(self) -> None:
        """The machine is shared: wait (boundedly) until others leave most of it idle."""
        busy, waited = await wait_for_quiet(self.args.quiet_below, self.args.quiet_wait)
        self.busy_before_pct, self.quiet_wait_s = busy, waited
        if self.busy_before_pct > self.args.quiet_below:
            print(
                f"machine still busy ({self.busy_before_pct:.0f}% of a core) after "
                f"{waited:.0f}s; measuring anyway",
                file=sys.stderr,
            )

    async def _execute(self) -> dict[str, Any]:
        args, scenario = self.args, self.scenario
        await self._wait_for_quiet()
        secret = secrets.token_urlsafe(36)  # 48 characters
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
        env |= {
            "TELEMED_DATA_DIR": str(self.tmp / "data"),
            "TELEMED_JWT_SECRET": secret,
            "TELEMED_LOG_LEVEL": args.log_level,
            **recording_key_env(self.tmp),
            **signing_key_env(self.tmp),
        }
        if scenario.db == "postgres":
            self.database, url = await create_scratch_database(args.pg_url)
            env["TELEMED_DATABASE_URL"] = url
        if scenario.redis:
            redis_port = free_port()
            self.redis = start_redis(redis_port, self.tmp / "redis.log", args.nice)
            await wait_redis(redis_port, self.redis)
            env["TELEMED_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        config = self.tmp / "bench.toml"
        config.write_text(_server_config(args), encoding="utf-8")
        command = [*telemed_command(), "--config", str(config)]
        wrapped = command
        if args.instrument:
            wrapped = [sys.executable, str(_BENCH_DIR / "serve_instrumented.py")]
            if args.sqlite_pool is not None:
                wrapped += ["--sqlite-pool", str(args.sqlite_pool)]
        if scenario.db == "postgres":
            # Once, before the nodes start, so they do not race each other migrating.
            upgrade = ManagedProcess(
                "db upgrade", [*command, "db", "upgrade"], self.tmp / "upgrade.log", env
            )
            if await asyncio.to_thread(upgrade.proc.wait) != 0:
                raise RuntimeError(f"telemed db upgrade failed:\n{upgrade.tail()}")
            upgrade.stop()
        for i in range(scenario.nodes):
            port = free_port()
            # Explicit: with Redis the default is one worker per core.
            serve = ["serve", "--workers", str(scenario.workers)]
            serve += ["--host", "127.0.0.1", "--port", str(port)]
            if args.instrument:
                stats = self.tmp / f"node{i}-stats.json"
                self.stats_files.append(stats)
                serve = [*wrapped, "--stats-out", str(stats), "--", "--config", str(config), *serve]
            else:
                serve = [*command, *serve]
            self.nodes.append(
                ManagedProcess(f"node {i}", serve, self.tmp / f"node{i}.log", env, nice=args.nice)
            )
            self.ports.append(port)
        urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        for node, url in zip(self.nodes, urls, strict=True):
            await wait_until_ready(url + "/readyz", node)
            # Every worker listening before any client connects (the kernel spreads the
            # connections over those listening).
            self.serving.append(await wait_for_workers(url, node, scenario.workers))

        # Rooms: the measured ones, then the warm-up ones.
        minter = Minter(secret)
        n, m = args.connections, args.rooms
        size = n // m
        rooms = await create_rooms(urls[0], minter, self.tag, 0, m, size, extra=1)
        warm_rooms = await create_rooms(urls[0], minter, self.tag, m, args.warm_rooms, 6, 0)

        # Client workers, each with whole rooms.
        self._start_workers(rooms, urls, size)
        await self._warm_up(warm_rooms, urls)
        gc.collect()
        await asyncio.sleep(1.0)
        baseline = self.sample()

        # Joins.
        self._next_phase()
        t0 = time.monotonic_ns() + 500_000_000
        # The offered join window (joins may take longer; py-spy stops at its duration).
        join_spies = self._start_profilers(args.connections / args.join_rate, "join")
        joined = await self._ask_all(("join", t0), "joined")
        after_join = self.sample()
        join_profiles = await self._finish_profilers(join_spies, "join")
        join_window = after_join.at - baseline.at
        probe = Probe(urls[-1], rooms[0])
        await probe.start(args.timeout)
        await asyncio.sleep(1.0)
        settled = self.sample()

        # Chat.
        start = time.monotonic_ns() + 1_000_000_000
        measure = start + int(args.chat_warmup * 1e9)
        end = measure + int(args.duration * 1e9)
        phase = ChatPhase(start, measure, end, drain_s=5.0)
        for pipe in self.pipes:
            pipe.send(("chat", phase))
        await _sleep_until(measure)
        window_start = self.sample()
        self._next_phase()
        spies = self._start_profilers(args.duration, "chat")
        await _sleep_until(end)
        window_end = self.sample()
        self._next_phase()
        chatted = await self._collect("chatted")
        profiles = await self._finish_profilers(spies, "chat")
        await probe.stop()
        await self._ask_all(("close", None), "closed")

        report = self._report(
            rooms, joined, chatted, probe, baseline, after_join, settled, window_start, window_end
        )
        report["join"]["window_s"] = join_window
        if profiles:
            report["server"]["profiles"] = profiles
        if join_profiles:
            report["join"]["profiles"] = join_profiles
        return report

    def _start_profilers(self, duration: float, phase: str) -> list[tuple[ManagedProcess, Path]]:
        """py-spy on every node for a phase (the join phase or the measured chat window;
        sampling, --nonblocking, so the node is never paused)."""
        if not self.args.py_spy:
            return []
        spies = []
        for i, node in enumerate(self.nodes):
            out = self.tmp / f"node{i}.{phase}.pyspy.txt"
            argv = [self.args.py_spy, "record", "--pid", str(node.pid), "--format", "raw"]
            argv += ["--duration", str(max(1, round(duration))), "--rate", "100"]
            argv += ["--nonblocking", "--output", str(out)]
            log = self.tmp / f"pyspy{i}.{phase}.log"
            spies.append((ManagedProcess(f"py-spy {i} {phase}", argv, log), out))
        return spies

    async def _finish_profilers(
        self, spies: list[tuple[ManagedProcess, Path]], phase: str
    ) -> list[Any]:
        from bench.stacks import summarize_collapsed

        found: list[Any] = []
        for i, (spy, out) in enumerate(spies):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(spy.proc.wait), 30)
            spy.stop()
            if not out.exists():
                found.append({"error": spy.tail()})
                continue
            text = out.read_text(encoding="utf-8", errors="replace")
            if self.args.profile_dir:
                self.args.profile_dir.mkdir(parents=True, exist_ok=True)
                name = f"{self.scenario.label.replace(', ', '-').replace(' ', '')}"
                target = (
                    self.args.profile_dir
                    / f"{name}-n{self.args.connections}-run{self.index}-node{i}-{phase}.txt"
                )
                target.write_text(text, encoding="utf-8")
            found.append(summarize_collapsed(text))
        return found

    def _next_phase(self) -> None:
        """Tells instrumented nodes (bench/serve_instrumented.py) that a phase begins."""
        if self.args.instrument:
            for node in self.nodes:
                node.proc.send_signal(signal.SIGUSR1)

    def _start_workers(self, rooms: list[Room], urls: list[str], size: int) -> None:
        args = self.args
        count = max(1, min(args.workers, len(rooms)))
        per_worker: list[list[ClientSpec]] = [[] for _ in range(count)]
        for room in rooms:
            for member in room.members[:size]:
                # Interleaved: member 0 of every room, then member 1 of every room, ...
                order = member.member * len(rooms) + room.index
                if args.join_order == "grouped":
                    order = room.index * size + member.member
                node = node_of(member.member, self.scenario.nodes)
                per_worker[room.index % count].append(
                    ClientSpec(
                        room.index,
                        member.member,
                        member.token,
                        room.consultation_id,
                        node,
                        urls[node],
                        order / args.join_rate,
                    )
                )
        ctx = multiprocessing.get_context("spawn")
        for i, specs in enumerate(per_worker):
            plan = WorkerPlan(
                i,
                tuple(specs),
                self.scenario.nodes,
                len(rooms),
                args.interval,
                args.timeout,
                args.nice,
            )
            parent, child = ctx.Pipe()
            process = ctx.Process(target=worker_main, args=(plan, child), daemon=True)
            process.start()
            self.workers.append(process)
            self.pipes.append(parent)
        for pipe in self.pipes:
            if not pipe.poll(60):
                raise RuntimeError("a client worker did not start")
            kind, pid = pipe.recv()
            assert kind == "ready"
            self.worker_pids.append(pid)

    async def _ask_all(self, command: tuple[str, Any], answer: str) -> list[dict[str, Any]]:
        for pipe in self.pipes:
            pipe.send(command)
        return await self._collect(answer)

    async def _collect(self, answer: str) -> list[dict[str, Any]]:
        replies = []
        for pipe, process in zip(self.pipes, self.workers, strict=True):
            while not await asyncio.to_thread(pipe.poll, 1.0):
                if not process.is_alive():
                    raise RuntimeError(f"client worker {process.pid} died")
            kind, body = pipe.recv()
            if kind != answer:
                raise RuntimeError(f"worker answered {kind!r}, expected {answer!r}")
            replies.append(body)
        return replies

    async def _warm_up(self, rooms: list[Room], urls: list[str]) -> None:
        """Every code path once (connect, join, chat, leave) on every node, not measured."""
        async with aiohttp.ClientSession() as session:
            clients: list[tuple[Member, SioClient]] = []
            for room in rooms:
                for member in room.members:
                    url = urls[node_of(member.member, len(urls))]
                    sio = SioClient(session, url, NAMESPACE)
                    await sio.connect({"token": member.token}, self.args.timeout)
                    ack, _ = await sio.call(
                        "join", {"consultation_id": room.consultation_id, "device": "bench"}
                    )
                    if not (isinstance(ack, dict) and ack.get("ok")):
                        raise RuntimeError(f"warm-up join refused: {ack}")
                    clients.append((member, sio))
            for k in range(4 * len(rooms[0].members) if rooms else 0):
                await asyncio.gather(
                    *(
                        sio.call("chat", {"text": f"warm-up {k}"})
                        for member, sio in clients
                        if member.member == k % len(rooms[0].members)
                    )
                )
                await asyncio.sleep(0.05)
            await asyncio.gather(*(sio.close() for _, sio in clients))
        await asyncio.sleep(0.5)

    def _report(
        self,
        rooms: list[Room],
        joined: list[dict[str, Any]],
        chatted: list[dict[str, Any]],
        probe: Probe,
        baseline: Sample,
        after_join: Sample,
        settled: Sample,
        start: Sample,
        end: Sample,
    ) -> dict[str, Any]:
        args, scenario = self.args, self.scenario

        def merged(replies: list[dict[str, Any]], key: str) -> list[float]:
            return [v for r in replies for v in r[key]]

        def counted(replies: list[dict[str, Any]], key: str) -> dict[str, int]:
            total: Counter[str] = Counter()
            for r in replies:
                total.update(r[key])
            return dict(total)

        window = end.at - start.at
        join_window = after_join.at - baseline.at

        def pct(a: float, b: float, seconds: float) -> float:
            return 100.0 * (b - a) / seconds if seconds > 0 else math.nan

        node_cpu = [pct(a, b, window) for a, b in zip(start.node_cpu, end.node_cpu, strict=True)]
        node_cpu_join = [
            pct(a, b, join_window)
            for a, b in zip(baseline.node_cpu, after_join.node_cpu, strict=True)
        ]
        worker_cpu = [
            pct(a, b, window) for a, b in zip(start.serving_cpu, end.serving_cpu, strict=True)
        ]
        worker_cpu_join = [
            pct(a, b, join_window)
            for a, b in zip(baseline.serving_cpu, after_join.serving_cpu, strict=True)
        ]
        held = sum(r["held"] for r in chatted)
        joined_count = sum(r["joined"] for r in joined)
        rss_growth = sum(settled.node_rss) - sum(baseline.node_rss)
        expected = sum(r["expected"] for r in chatted)
        delivered = sum(r["delivered"] for r in chatted)
        sent = sum(r["sent"] for r in chatted)
        join_cpu_s = sum(after_join.node_cpu) - sum(baseline.node_cpu)
        chat_cpu_s = sum(end.node_cpu) - sum(start.node_cpu)
        room0 = sorted(k for r in chatted for k in r["room0_sent"])
        probe_check = probe.check(room0)
        chat_errors = counted(chatted, "errors")
        size = args.connections // args.rooms
        return {
            "scenario": scenario.label,
            "nodes": scenario.nodes,
            "workers": scenario.workers,
            "db": scenario.db,
            "redis": scenario.redis,
            "run": self.index,
            "connections": args.connections,
            "rooms": args.rooms,
            "room_size": size,
            "offered": {
                "join_rate_per_s": args.join_rate,
                "chat_messages_per_s": args.rooms / args.interval,
                "deliveries_per_s": args.rooms / args.interval * size,
                "measured_messages_per_s": sent / args.duration,
            },
            "join": {
                "joined": joined_count,
                "connect_ms": summarize(merged(joined, "connect_ms")),
                "join_ms": summarize(merged(joined, "join_ms")),
                "open_join_ms": summarize(merged(joined, "open_join_ms")),
                "errors": counted(joined, "errors"),
                "window_s": join_window,
                "server_cpu_pct": node_cpu_join,
                "worker_cpu_pct": worker_cpu_join,
                # Server CPU of the join phase (connects included) per seated connection.
                "server_cpu_ms_per_join": 1000 * join_cpu_s / max(1, joined_count),
            },
            "chat": {
                "sent": sent,
                "expected_deliveries": expected,
                "delivered": delivered,
                "lost": expected - delivered,
                "duplicates": sum(r["duplicates"] for r in chatted),
                "fanout_ms": summarize(merged(chatted, "fanout_ms")),
                "same_node_ms": summarize(merged(chatted, "same_node_ms")),
                "cross_node_ms": summarize(merged(chatted, "cross_node_ms")),
                "ack_ms": summarize(merged(chatted, "ack_ms")),
                "errors": chat_errors,
                "payloads_checked": sum(r["checked"] for r in chatted),
                "payloads_malformed": sum(r["malformed"] for r in chatted),
            },
            "connections_held": held + probe.held(),
            "server": {
                "cpu_pct": node_cpu,
                # Per serving process: node by node, each node's workers (with --nodes 1wN).
                "workers": [node for serving in self.serving for node, _ in serving],
                "worker_cpu_pct": worker_cpu,
                # Server CPU of the measured chat window per message sent in it (with its
                # fan-out to the room's other members).
                "cpu_ms_per_chat": 1000 * chat_cpu_s / max(1, sent),
                "rss_mb_baseline": [b / 2**20 for b in baseline.node_rss],
                "rss_mb_joined": [b / 2**20 for b in settled.node_rss],
                "rss_mb_end": [b / 2**20 for b in end.node_rss],
                "rss_kb_per_connection": rss_growth / 1024 / max(1, joined_count + 1),
            },
            "clients": {
                "workers": len(self.worker_pids),
                "cpu_pct": [
                    pct(a, b, window) for a, b in zip(start.worker_cpu, end.worker_cpu, strict=True)
                ],
                "loop_lag_ms": summarize(merged(chatted, "lag_ms")),
            },
            "machine": {
                "busy_cpu_pct": pct(start.machine_busy, end.machine_busy, window),
                # Everything else on the (shared) machine during the window.
                "foreign_cpu_pct": pct(
                    start.machine_busy - _ours(start, scenario.db),
                    end.machine_busy - _ours(end, scenario.db),
                    window,
                ),
                "quiet_wait_s": self.quiet_wait_s,
                "busy_before_pct": self.busy_before_pct,
            },
            "postgres_cpu_pct": pct(start.pg_cpu, end.pg_cpu, window),
            "redis_cpu_pct": pct(start.redis_cpu, end.redis_cpu, window),
            "probe": probe_check,
        }

    async def _teardown(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.close()
        for process in self.workers:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for node in self.nodes:
            code = await asyncio.to_thread(node.stop)
            if code not in (0, None) and self.args.verbose:
                print(f"{node.name} exited {code}:\n{node.tail()}", file=sys.stderr)
        self.instrumented = self._read_stats()
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
        if self.database is not None:
            await drop_scratch_database(self.args.pg_url, self.database)
        if self.args.keep:
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _ours(sample: Sample, db: str) -> float:
    pg = sample.pg_cpu if db == "postgres" else 0.0
    return sum(sample.node_cpu) + sum(sample.worker_cpu) + pg + sample.redis_cpu + sample.own_cpu


class Probe:
    """A real `socketio.AsyncClient` in room 0: checks the lean clients' reading of the
    protocol against the reference client."""

    def __init__(self, url: str, room: Room) -> None:
        import socketio

        self.url = url
        self.room = room
        self.member = room.members[-1]  # the extra team member
        self.client = socketio.AsyncClient(reconnection=False)
        self.messages: list[dict[str, Any]] = []
        self.join_ack: Any = None
        self.client.on("chat_message", self._on_chat, namespace=NAMESPACE)

    async def _on_chat(self, data: dict[str, Any]) -> None:
        self.messages.append(data)

    async def start(self, limit_s: float) -> None:
        await self.client.connect(
            self.url,
            auth={"token": self.member.token},
            namespaces=[NAMESPACE],
            transports=["websocket"],
            wait_timeout=limit_s,
        )
        self.join_ack = await self.client.call(
            "join",
            {"consultation_id": self.room.consultation_id, "device": "probe"},
            namespace=NAMESPACE,
            timeout=limit_s,
        )

    def held(self) -> int:
        return 1 if self.client.connected else 0

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    def check(self, room0_sent: list[int]) -> dict[str, Any]:
        seen = []
        malformed = 0
        for data in self.messages:
            if not data.keys() >= CHAT_FIELDS:
                malformed += 1
            parts = str(data.get("text", "")).split("|")
            if len(parts) == 6 and parts[0] == "b" and parts[1] == "0" and parts[5] == "0":
                seen.append(int(parts[2]))
        seqs = [d.get("seq") for d in self.messages if isinstance(d.get("seq"), int)]
        joined = bool(self.join_ack and self.join_ack.get("ok"))
        return {
            # What the reference client saw must be what was sent and well-formed; under
            # overload it may not have seen everything by the end of the drain.
            "ok": joined and malformed == 0 and set(seen) <= set(room0_sent),
            "complete": sorted(seen) == room0_sent,
            "join_ack_ok": joined,
            "room0_sent": len(room0_sent),
            "probe_saw": len(seen),
            "malformed": malformed,
            "seq_increasing": seqs == sorted(seqs),
        }


def _server_config(args: argparse.Namespace) -> str:
    # Grace periods longer than a run: the warm-up clients' seats must not expire (and write
    # to the database) in the middle of the measurement. The rate limit stays the default
    # (20 events/s, burst 40): the offered chat rate is ~0.2 events/s per connection.
    return "\n".join(
        [
            "[signaling]",
            "reconnect_grace_s = 3600",
            "empty_room_grace_s = 3600",
            f"max_participants = {max(100, args.connections // args.rooms + 2)}",
            "",
        ]
    )


# --- aggregation and output -------------------------------------------------------------------

# (key in the flat metrics, column header, format)
COLUMNS: list[tuple[str, str, str]] = [
    ("held", "held", "{:.0f}"),
    ("join_p50", "join p50", "{:.1f}"),
    ("join_p99", "join p99", "{:.1f}"),
    ("connect_p99", "conn p99", "{:.1f}"),
    ("fanout_p50", "fan-out p50", "{:.1f}"),
    ("fanout_p99", "fan-out p99", "{:.1f}"),
    ("cross_p99", "x-node p99", "{:.1f}"),
    ("ack_p99", "ack p99", "{:.1f}"),
    ("lost", "late/lost", "{:.0f}"),
    ("server_cpu_pct", "srv CPU%", "{:.0f}"),
    ("server_cpu_join_pct", "srv CPU% join", "{:.0f}"),
    ("cpu_ms_per_join", "CPU ms/join", "{:.1f}"),
    ("cpu_ms_per_chat", "CPU ms/chat", "{:.2f}"),
    ("rss_mb", "RSS MB", "{:.0f}"),
    ("kb_per_conn", "KB/conn", "{:.1f}"),
    ("client_cpu_pct", "cli CPU%", "{:.0f}"),
    ("client_lag_p99", "cli lag p99", "{:.1f}"),
    ("pg_cpu_pct", "PG CPU%", "{:.0f}"),
    ("redis_cpu_pct", "redis CPU%", "{:.0f}"),
    ("foreign_cpu_pct", "other CPU%", "{:.0f}"),
]


def flat(run: dict[str, Any]) -> dict[str, float]:
    join, chat, server = run["join"], run["chat"], run["server"]
    return {
        "held": run["connections_held"],
        "join_p50": join["join_ms"]["p50"],
        "join_p99": join["join_ms"]["p99"],
        "open_join_p99": join["open_join_ms"]["p99"],
        "connect_p50": join["connect_ms"]["p50"],
        "connect_p99": join["connect_ms"]["p99"],
        "fanout_p50": chat["fanout_ms"]["p50"],
        "fanout_p99": chat["fanout_ms"]["p99"],
        "fanout_max": chat["fanout_ms"]["max"],
        "same_p99": chat["same_node_ms"]["p99"],
        "cross_p50": chat["cross_node_ms"]["p50"],
        "cross_p99": chat["cross_node_ms"]["p99"],
        "ack_p50": chat["ack_ms"]["p50"],
        "ack_p99": chat["ack_ms"]["p99"],
        "lost": chat["lost"],
        "server_cpu_pct": sum(server["cpu_pct"]),
        "server_cpu_join_pct": sum(run["join"]["server_cpu_pct"]),
        "cpu_ms_per_join": run["join"]["server_cpu_ms_per_join"],
        "cpu_ms_per_chat": server["cpu_ms_per_chat"],
        "rss_mb": sum(server["rss_mb_end"]),
        "kb_per_conn": server["rss_kb_per_connection"],
        "client_cpu_pct": sum(run["clients"]["cpu_pct"]),
        "client_lag_p99": run["clients"]["loop_lag_ms"]["p99"],
        "pg_cpu_pct": run["postgres_cpu_pct"] if run["db"] == "postgres" else math.nan,
        "redis_cpu_pct": run["redis_cpu_pct"] if run["redis"] else math.nan,
        "foreign_cpu_pct": run["machine"]["foreign_cpu_pct"],
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    flats = [flat(r) for r in runs]
    return {key: median(f[key] for f in flats) for key in flats[0]} if flats else {}


RATIO_KEYS = (
    "join_p50",
    "join_p99",
    "fanout_p50",
    "fanout_p99",
    "ack_p99",
    "server_cpu_pct",
    "cpu_ms_per_join",
    "cpu_ms_per_chat",
)


def ratios(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per run, each scenario against the plain one-node scenario on the same database
    measured in the same run; medians over runs."""
    found: dict[str, dict[str, float]] = {}
    by_run: dict[int, dict[str, dict[str, Any]]] = {}
    for runs in results.values():
        for run in runs:
            by_run.setdefault(run["run"], {})[run["scenario"]] = run
    labels = {run["scenario"]: run for runs in results.values() for run in runs}
    for label, example in labels.items():
        if example["nodes"] == 1 and not example["redis"]:
            continue
        bases = [Scenario(1, example["db"], False).label]
        if example.get("workers", 1) > 1:
            # Workers need Redis: one process with Redis is the like-for-like baseline.
            bases.append(Scenario(1, example["db"], True).label)
        for base in bases:
            per_key: dict[str, list[float]] = {k: [] for k in RATIO_KEYS}
            for scenarios in by_run.values():
                if label in scenarios and base in scenarios:
                    a, b = flat(scenarios[label]), flat(scenarios[base])
                    for key in RATIO_KEYS:
                        if b[key]:
                            per_key[key].append(a[key] / b[key])
            if any(per_key.values()):
                found[f"{label} / {base}"] = {k: median(v) for k, v in per_key.items()}
    return found


def render_table(summary: dict[str, dict[str, float]], runs: dict[str, int], n: int) -> str:
    headers = ["scenario", "runs", *(h for _, h, _ in COLUMNS)]
    rows = []
    for label, values in summary.items():
        cells = [label, str(runs[label])]
        for key, _, fmt in COLUMNS:
            value = values.get(key, math.nan)
            cells.append("-" if math.isnan(value) else fmt.format(value))
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        f"medians over runs, {n} connections; latencies in ms",
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _one_line(run: dict[str, Any]) -> str:
    f = flat(run)
    probe = "ok" if run["probe"]["ok"] else f"FAILED {run['probe']}"
    errors = {**run["join"]["errors"], **run["chat"]["errors"]}
    return (
        f"[run {run['run']}] {run['scenario']}: held {f['held']:.0f}, "
        f"join p50/p99 {f['join_p50']:.1f}/{f['join_p99']:.1f} ms, "
        f"fan-out p50/p99 {f['fanout_p50']:.1f}/{f['fanout_p99']:.1f} ms, "
        f"lost {f['lost']:.0f}, server CPU {f['server_cpu_pct']:.0f}%, "
        f"RSS {f['rss_mb']:.0f} MB ({f['kb_per_conn']:.1f} KB/conn), "
        f"client CPU {f['client_cpu_pct']:.0f}%, probe {probe}"
        + (f", errors {errors}" if errors else "")
    )


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--connections", type=int, default=1000, help="measured client connections")
    p.add_argument("--rooms", type=int, default=100, help="consultation rooms (N/M per room)")
    p.add_argument("--runs", type=int, default=3, help="runs of every scenario (medians)")
    p.add_argument(
        "--nodes",
        default="1",
        help="comma list: 1 (one node), 1r (one node with the Redis manager and presence), "
        "2 (two nodes behind Redis; postgres only), 1w2 (one node of `telemed serve "
        "--workers 2` behind Redis, its two workers sharing the port; postgres only)",
    )
    p.add_argument("--db", default="sqlite", help="comma list of sqlite, postgres")
    p.add_argument("--duration", type=float, default=20.0, help="measured chat seconds")
    p.add_argument("--chat-warmup", type=float, default=3.0, help="unmeasured chat seconds")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between a room's messages")
    p.add_argument("--join-rate", type=float, default=100.0, help="joins per second, all clients")
    p.add_argument("--join-order", choices=("interleaved", "grouped"), default="interleaved")
    p.add_argument("--workers", type=int, default=2, help="client worker processes")
    p.add_argument("--warm-rooms", type=int, default=2, help="rooms of the (unmeasured) warm-up")
    p.add_argument("--timeout", type=float, default=30.0, help="per connect / join / chat ack")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL to create a scratch db in")
    p.add_argument("--log-level", default="WARNING", help="TELEMED_LOG_LEVEL of the nodes")
    p.add_argument(
        "--quiet-below",
        type=float,
        default=40.0,
        help="before each run, wait until the machine's CPU use is below this (%% of a core)",
    )
    p.add_argument("--quiet-wait", type=float, default=180.0, help="longest wait for quiet, s")
    p.add_argument(
        "--instrument",
        action="store_true",
        help="run nodes through bench/serve_instrumented.py (timers per phase, in the JSON)",
    )
    p.add_argument(
        "--sqlite-pool",
        type=int,
        help="with --instrument: an experiment, SQLite pool of N connections and no overflow",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the nodes, client workers and redis (negative: ahead of other "
        "work on a shared machine; needs root)",
    )
    p.add_argument("--py-spy", help="path to py-spy: profile every node in the chat window")
    p.add_argument("--profile-dir", type=Path, help="keep the py-spy stacks here")
    p.add_argument("--json-out", type=Path, help="also write the JSON report here")
    p.add_argument("--keep", action="store_true", help="keep each run's temp dir (logs)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument(
        "--quick", action="store_true", help="50 connections, 5 rooms, 1 run, 5 s (smoke test)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.connections, args.rooms, args.runs, args.duration = 50, 5, 1, 5.0
        args.chat_warmup, args.warm_rooms = 1.0, 1
    if args.rooms < 1 or args.connections < 2 * args.rooms:
        p.error("need at least two connections per room")
    if args.connections // args.rooms > 50:
        p.error("at most 50 connections per room (a team holds the requester and 50 more)")
    args.node_specs = [s.strip() for s in args.nodes.split(",") if s.strip()]
    args.dbs = [s.strip() for s in args.db.split(",") if s.strip()]
    for spec in args.node_specs:
        if node_spec(spec) is None:
            p.error(f"--nodes: {spec!r} is not 1, 1r, 2 or 1w2 .. 1w9")
        if args.instrument and spec.startswith("1w"):
            p.error("--instrument wraps one process per node: not with --nodes 1wN")
    for db in args.dbs:
        if db not in ("sqlite", "postgres"):
            p.error(f"--db: {db!r} is not sqlite or postgres")
    return args


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = scenarios_from(args.node_specs, args.dbs)
    if not scenarios:
        raise SystemExit("no scenario to run")
    results: dict[str, list[dict[str, Any]]] = {s.label: [] for s in scenarios}
    for run_index in range(args.runs):
        # Alternate the order, so no scenario always runs on a machine warmed by another.
        order = scenarios if run_index % 2 == 0 else scenarios[::-1]
        for scenario in order:
            run = await Run(scenario, args, run_index).execute()
            results[scenario.label].append(run)
            print(_one_line(run), file=sys.stderr, flush=True)
    summary = {label: medians(runs) for label, runs in results.items()}
    return {
        "benchmark": "signaling",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(PACKAGES),
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("node_specs", "dbs")
        },
        "medians": summary,
        "ratios": ratios(results),
        "runs": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    report = asyncio.run(amain(args))
    counts = {label: len(runs) for label, runs in report["runs"].items()}
    print(render_table(report["medians"], counts, args.connections))
    for pair, values in report["ratios"].items():
        shown = ", ".join(f"{k} x{v:.2f}" for k, v in values.items())
        print(f"ratio {pair} (median of per-run ratios): {shown}")
    text = json.dumps(_clean(report), indent=1, allow_nan=False)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    failed = [r for runs in report["runs"].values() for r in runs if not r["probe"]["ok"]]
    return 1 if failed else 0


def _clean(value: Any) -> Any:
    """JSON has no NaN: an empty sample's statistics become null."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 3)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
