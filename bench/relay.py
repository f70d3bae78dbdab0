"""Media relay benchmark: a telemed server forwarding VP8 + Opus between aiortc clients on
loopback, with the server, the publishers and the subscribers in separate processes.

    python bench/relay.py direct --runs 3
    python bench/relay.py consult --runs 3
    python bench/relay.py teaching --viewers 10,50,100 --runs 3
    python bench/relay.py teaching --viewers 200 --runs 1
    python bench/relay.py --quick                  # smoke run of all three, about a minute
    python bench/relay.py teaching --viewers 50 --runs 1 --py-spy /tmp/relay-pyspy/bin/py-spy
    python bench/relay_report.py runs.jsonl        # tables from `--json --out runs.jsonl`
    # scale-out: K consultations at once against `telemed serve --workers N` (issue 13)
    python bench/relay.py consult --rooms 2,3,4,5,6 --server-workers 1,2 --runs 1
    python bench/relay.py teaching --viewers 200 --server-workers 2,1 --join-rate 20

Scenarios:
- `consult`: the four clinicians of one consultation's team (no waiting room) each publish
  audio and 640x480 30 fps video and receive the other three (12 video + 12 audio streams
  forwarded); one client process per party. Everyone joins first, then they publish in turn
  (`--consult-publish on-join`: each publishes as soon as it is in, so the later ones' first
  subscribe offers hold several sections of each kind; before the relay bundled every section
  on one transport, see media/peer.py, that lost the second of a kind).
- `teaching --viewers K`: one presenter (the inviting village doctor) publishes audio and
  video; K trainees, invited through the REST API, join a teaching consultation, wait in the
  waiting room and are admitted by the presenter (the `admit` event), as the protocol has
  it; trainees only receive. Processes: the presenter; the `--decoded` sampled trainees; the
  other trainees, about 40 per process (`--viewer-procs`).
- `direct`: one aiortc peer sends the same media straight to another (no server). Beside
  every consult/teaching run such a pair also runs in the same window (`--no-baseline` to
  leave it out): `added_latency_*` is the room's latency less the pair's, in the same run.

Media: a clip encoded once and cached (bench/relay_media.py): 640x480, 30 fps, ~1 Mbit/s VP8
with a keyframe every 5 s, the frame counter in the pixels; 1 s of Opus looped. Publishers
replay it as `av.Packet`s (aiortc packs them without encoding), at 30 fps, and answer a
keyframe request at once. Subscribers tap their receivers with the project's
`media.receiver_tap.tap_receiver` (encoded frames as soon as complete, no decoding) and pin
the full layer (`set_layer`, `--layers auto` leaves the server's REMB-driven choice on).
Trainees that are not sampled are lean once they have decoded their first keyframe: they
read RTP headers straight off their socket (relay_client.LeanReceive), so that a hundred
client peers fit on the same two cores as the server.

Each run starts a fresh server (`telemed --config FILE serve`, temporary data directory,
random JWT secret, niced to `--server-nice` so the clients do not starve it; the config sets
`media.host_addresses = ["127.0.0.1"]` and raises the signaling rate limit for the
presenter's admits) and kills everything it started in `finally`. The machine is shared:
a run first waits (up to `--quiet-wait` s) for the machine to be nearly idle, and is repeated
(up to `--retries` times) when others used more than `--noisy-above` cores in its window.
After every participant receives what it should, `--warmup` s pass unmeasured, then the
window of `--duration` s is measured:

- server CPU: utime+stime of the server process from /proc/PID/stat at the window's edges;
- forwarded packets: what the server sent to subscribers in the window, from the RTP sequence
  numbers each subscriber saw (first to last; received packets are reported too);
- per-subscriber fps: video frames complete at the subscriber in the window / duration;
- frames lost: frames the publisher sent in the window that never reached a subscriber
  whole (by 2 s after the window), by RTP timestamp;
- latency: the publisher hands frame n to its sender -> the frame is complete at the
  subscriber. `latency_ms_*`: from the counter decoded out of the pixels, in the sampled
  subscribers (they decode every frame, as a browser would); `latency_all_ms_*`: every
  subscriber, the frame number from RTP timestamps, anchored by a decoded keyframe (the
  sampled subscribers check every decoded counter against it: `counter_mismatches`).
  All processes read the same CLOCK_MONOTONIC.
- the server's responsiveness: GET /healthz every 0.5 s (`server_http_ms_*`); connections
  that failed or closed, and when (`connection_losses`).

Several workers (`--server-workers N,...`): the server is `telemed serve --workers N` with a
private redis-server (`--save '' --appendonly no`, a free port; for N = 1 too when another N
is measured, so that only the worker count differs) and SQLite in the data dir or a scratch
PostgreSQL database (`--db postgres`). The clients connect to the one port; the kernel
spreads the sockets over the workers (SO_REUSEPORT), placement puts each room on a worker and
its media goes there. The worker pids come from the supervisor's `telemed worker i started
(pid P, node N)` lines; server CPU is summed over the workers and the supervisor and given
per worker; rooms per worker from Redis (`telemed:placement:*`); each worker's /metrics is
read over a connection that asked /healthz which worker it reached. `consult --rooms K`: K
4-party consultations at once; party i of room k in client process (4k + i) mod
`--consult-procs`; rooms from `--decode-rooms` on do not decode and receive by RTP headers.
Capacity (the table after the run): the largest K whose every stream held >= 29 fps with no
frame lost and subscriber latency p95 within 50 ms of the direct pair's. `bound_hints` says
what likely limited each run (a worker near a core, the machine's cores, the clients' loops
late, others' load). The join figures (`seated`, `join_ms_*`, `video_gap_max_ms`: the longest
wait between two frames at any subscriber over its whole life, the join storm included;
`publisher_send_gap_max_ms`) are reported for every room scenario.

Per packet vs per frame: `cpu_us_per_forwarded_packet` divides by RTP packets sent (video
~4 per frame at 1 Mbit/s, audio 1 per 20 ms frame); `cpu_us_per_forwarded_frame` by the
server's own count of frames handed to subscribers' senders (telemed_media_frames_forwarded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import pickle
import re
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

_BENCH_DIR = Path(__file__).resolve().parent
_ROOT = _BENCH_DIR.parent
# Run as `python bench/relay.py`: the repository root, not bench/, must be importable
# (bench/signaling.py would otherwise shadow the project's `signaling` package).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.common import (  # noqa: E402
    ManagedProcess,
    cpu_seconds,
    cpu_seconds_of,
    create_scratch_database,
    drop_scratch_database,
    free_port,
    get_from_every_worker,
    machine_busy_seconds,
    machine_info,
    percentile,
    recording_key_env,
    rss_bytes,
    signing_key_env,
    start_redis,
    telemed_command,
    wait_for_quiet,
    wait_for_workers,
    wait_redis,
    wait_until_ready,
)
from bench.relay_client import PartyPlan, WorkerPlan, worker_main  # noqa: E402
from bench.relay_media import VIDEO_CLOCK, ClipSpec, clip_path, load_clip  # noqa: E402
from bench.relay_report import cell, median_of  # noqa: E402

PACKAGES = ("aiortc", "av", "aioice", "pylibsrtp", "cryptography", "python-socketio", "aiohttp")
CONSULT_ROLES = ("village_doctor", "county_physician", "township_doctor", "provincial_specialist")
# A frame arriving later than this after the window still counts as delivered, not lost.
DRAIN_S = 2.0
# ManagedProcess.stop: SIGINT, then SIGKILL after this many seconds.
STOP_TIMEOUT_S = 10.0
PLACEMENT_PREFIX = "telemed:placement:"


@dataclass(frozen=True)
class Member:
    user_id: str
    name: str
    role: str
    org: str
    token: str


# --- one run ------------------------------------------------------------------------------


class Run:
    def __init__(
        self,
        args: argparse.Namespace,
        scenario: str,
        viewers: int,
        index: int,
        rooms: int = 1,
        server_workers: int = 1,
    ) -> None:
        self.args = args
        self.scenario = scenario
        self.viewers = viewers
        self.index = index
        # consult: this many 4-party consultations at once; the server: `--workers N`.
        self.rooms = rooms
        self.server_workers = server_workers
        # A private redis-server whenever several workers are measured (also for N = 1 in
        # the same invocation, so that only the worker count differs) or --redis.
        self.uses_redis = bool(args.redis) or server_workers > 1
        self.redis: ManagedProcess | None = None
        self.redis_url = ""
        self.database: str | None = None
        # The processes that serve: (node id, pid), worker 1 first; one entry without workers.
        self.serving: list[tuple[str, int]] = []
        self.consultations: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="telemed-relay-"))
        self.server: ManagedProcess | None = None
        self.url = ""
        self.secret = secrets.token_urlsafe(36)
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Connection] = []
        self.worker_pids: list[int] = []
        self.notes: list[str] = []
        self.room: tuple[str, str] | None = None  # consultation id, a team member's token
        self.direct_pipes: list[Connection] = []
        self.setup_started = time.monotonic()

    @property
    def label(self) -> str:
        label = f"teaching-{self.viewers}" if self.scenario == "teaching" else self.scenario
        if self.scenario == "consult" and (self.rooms > 1 or self.uses_redis):
            label += f"-x{self.rooms}"
        if self.uses_redis:
            label += f"-w{self.server_workers}"
        return label

    # processes

    async def _start_server(self) -> None:
        port = free_port()
        config = self.tmp / "relay.toml"
        config.write_text(
            "\n".join(
                [
                    'log_level = "WARNING"',
                    "[signaling]",
                    # The presenter admits every trainee: far above the default 20/s.
                    "events_per_second = 1000.0",
                    "event_burst = 1000",
                    f"max_participants = {max(100, self.viewers + 10)}",
                    "reconnect_grace_s = 3600",
                    "empty_room_grace_s = 3600",
                    "[media]",
                    'host_addresses = ["127.0.0.1"]',
                    "",
                ]
            ),
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
        env |= {"TELEMED_DATA_DIR": str(self.tmp / "data"), "TELEMED_JWT_SECRET": self.secret}
        env |= recording_key_env(self.tmp) | signing_key_env(self.tmp)
        if self.uses_redis:
            redis_port = free_port()
            self.redis = start_redis(redis_port, self.tmp / "redis.log", self.args.server_nice)
            await wait_redis(redis_port, self.redis)
            self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
            env["TELEMED_REDIS_URL"] = self.redis_url
        if self.args.db == "postgres":
            # A scratch database; the server (or the supervisor, once) migrates it.
            self.database, env["TELEMED_DATABASE_URL"] = await create_scratch_database(
                self.args.pg_url
            )
        argv = [*telemed_command(), "--config", str(config), "serve"]
        # Always explicit: with Redis the default would be one worker per core.
        argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(self.server_workers)]
        self.server = ManagedProcess(
            "server",
            argv,
            self.tmp / "server.log",
            env,
            nice=self.args.server_nice,
            nice_may_fail=True,  # not allowed: run at the default
        )
        self.url = f"http://127.0.0.1:{port}"
        await wait_until_ready(self.url + "/readyz", self.server)
        self.serving = await wait_for_workers(self.url, self.server, self.server_workers)

    async def _per_worker(
        self, paths: Sequence[str], token: str | None = None
    ) -> dict[str, list[Any]]:
        return await get_from_every_worker(self.url, paths, self.server_workers, token)

    def _spawn(self, plan: WorkerPlan) -> Connection:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=worker_main, args=(plan, theirs), daemon=True)
        process.start()
        theirs.close()
        self.processes.append(process)
        self.pipes.append(ours)
        return ours

    async def _ask(self, pipe: Connection, message: tuple[Any, ...], limit_s: float) -> Any:
        pipe.send(message)
        return await self._answer(pipe, limit_s)

    async def _answer(self, pipe: Connection, limit_s: float) -> Any:
        if not await asyncio.to_thread(pipe.poll, limit_s):
            raise RuntimeError(f"a client worker did not answer within {limit_s:.0f}s")
        reply = pipe.recv()
        if reply[0] == "failed":
            raise RuntimeError(reply[1])
        return reply[1] if len(reply) > 1 else None

    async def _teardown(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(Exception):
                pipe.send(("close",))
        deadline = time.monotonic() + 15
        for process in self.processes:
            await asyncio.to_thread(process.join, max(0.1, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                await asyncio.to_thread(process.join, 3)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 3)
        for pipe in self.pipes:
            pipe.close()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop, timeout=STOP_TIMEOUT_S)
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop, timeout=STOP_TIMEOUT_S)
        if self.database is not None:
            with contextlib.suppress(Exception):
                await drop_scratch_database(self.args.pg_url, self.database)
        if self.args.keep:
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # the consultation

    def _member(self, index: int, role: str, room: int = 0) -> Member:
        from pydantic import SecretStr

        from rooms.model import UserId
        from rooms.roles import Role
        from server.auth import TokenService
        from server.config import JwtConfig

        tokens = TokenService(JwtConfig(secret=SecretStr(self.secret)))
        user_id = f"relay-{role}-{index}" if room == 0 else f"relay-r{room}-{role}-{index}"
        name = f"Relay {role} {index}" if room == 0 else f"Relay {role} {index} room {room}"
        org = "relay-clinic" if index == 0 else f"relay-hospital-{index}"
        token = tokens.mint(user_id=UserId(user_id), name=name, role=Role(role), org=org)
        return Member(user_id, name, role, org, token)

    async def _create_consultation(
        self, members: list[Member], kind: str, trainees: int
    ) -> tuple[str, list[str]]:
        api = self.url + "/api/v1"
        when = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        async with aiohttp.ClientSession() as http:

            async def post(token: str, path: str, body: dict[str, Any] | None) -> Any:
                headers = {"Authorization": f"Bearer {token}"}
                async with http.post(api + path, json=body, headers=headers) as response:
                    answer = await response.json(content_type=None)
                    if response.status >= 300:
                        raise RuntimeError(f"POST {path}: {response.status} {answer}")
                    return answer

            created = await post(
                members[0].token,
                "/consultations",
                {
                    "kind": kind,
                    "specialty": "respiratory",
                    "resident": {
                        "pseudonym": f"relay-{secrets.token_hex(4)}",
                        "display_name": "Relay resident",
                        "age": 70,
                        "sex": "female",
                    },
                    "reason": "relay benchmark",
                    "purpose": "relay benchmark",
                    "requested_specialty": "respiratory",
                    "requested_title": "chief physician",
                    "team": [
                        {"user_id": m.user_id, "name": m.name, "role": m.role, "institution": m.org}
                        for m in members[1:]
                    ],
                },
            )
            cid = str(created["id"])
            await post(members[1].token, f"/consultations/{cid}/accept", None)
            await post(members[1].token, f"/consultations/{cid}/schedule", {"scheduled_time": when})
            limit = asyncio.Semaphore(8)

            async def invite(i: int) -> str:
                async with limit:
                    body = {"role": "trainee", "name": f"Trainee {i}"}
                    answer = await post(members[0].token, f"/consultations/{cid}/invites", body)
                    return str(answer["token"])

            tokens = list(await asyncio.gather(*(invite(i) for i in range(trainees))))
        return cid, tokens

    # measuring

    def _sample(self) -> dict[str, float]:
        serving = [pid for _, pid in self.serving]
        # With workers, the supervisor's own (small) share counts too.
        supervisor = [self.server.pid] if self.server and self.server_workers > 1 else []
        sample = {
            "at": time.monotonic(),
            "server_cpu": cpu_seconds_of(supervisor + serving),
            "machine": machine_busy_seconds(),
            "own": cpu_seconds(os.getpid()),
            "clients": 0.0,
        }
        for i, pid in enumerate(self.worker_pids):
            with contextlib.suppress(OSError, ValueError):
                sample[f"worker{i}"] = cpu_seconds(pid)
                sample["clients"] += sample[f"worker{i}"]
        for i, pid in enumerate(serving):
            sample[f"serving{i}"] = cpu_seconds_of([pid])
        sample["redis"] = cpu_seconds_of([self.redis.pid]) if self.redis else 0.0
        return sample

    async def _metrics_by_worker(self) -> dict[str, dict[str, float]]:
        """The media counters of /metrics, per worker (node id)."""
        found: dict[str, dict[str, float]] = {}
        for node, (text,) in (await self._per_worker(["/metrics"])).items():
            found[node] = {}
            for line in str(text).splitlines():
                match = re.match(r"^telemed_media_(\w+?)(?:_total)? ([0-9.e+-]+)$", line)
                if match:
                    found[node][match[1]] = float(match[2])
        return found

    async def _placements(self) -> dict[str, str]:
        """Consultation id -> node id of the worker Redis placed its room on."""
        if not self.redis_url:
            return {}
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.redis_url, decode_responses=True)
        try:
            keys = [k async for k in client.scan_iter(PLACEMENT_PREFIX + "*")]
            owners = await client.mget(keys) if keys else []
        finally:
            await client.aclose()
        # The owner is an incarnation, `<node id>#<token>` (server/placement.py).
        return {
            k.removeprefix(PLACEMENT_PREFIX): str(v).split("#", 1)[0]
            for k, v in zip(keys, owners, strict=True)
            if v
        }

    async def _probe_server(self, until: float) -> list[float]:
        times: list[float] = []
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < until - 0.5:
                began = time.monotonic()
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with http.get(
                        self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=10)
                    ) as r:
                        await r.read()
                        times.append(1000 * (time.monotonic() - began))
                await asyncio.sleep(max(0.0, began + 0.5 - time.monotonic()))
        return times

    async def _room_stats(self) -> dict[str, Any]:
        """From the room's media statistics (GET .../media) after the window: how many video
        subscriptions get each layer, and what the server lost of its publishers' packets."""
        if self.room is None:
            return {}
        _, token = self.room
        layers: dict[str, int] = defaultdict(int)
        lost = 0
        # Room 0 only (its village doctor's token); each worker knows the rooms it owns.
        paths = [f"/api/v1/consultations/{self.room[0]}/media"]
        for (body,) in (await self._per_worker(paths, token)).values():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                for track in body["tracks"]:
                    lost += int(track["intake"].get("packets_lost") or 0)
                    if track["kind"] == "video":
                        for sub in track["subscribers"]:
                            layers[str(sub.get("layer"))] += 1
        return {"subscriber_layers": dict(layers), "server_inbound_packets_lost": lost}

    async def _wait_for_quiet(self) -> float:
        """The machine is shared: wait (boundedly) until others leave most of it idle."""
        busy, _ = await wait_for_quiet(self.args.quiet_below, self.args.quiet_wait)
        if busy > self.args.quiet_below:
            self.notes.append(f"machine {busy:.0f}% busy before the run")
        return busy

    async def execute(self) -> dict[str, Any]:
        try:
            busy_before = await self._wait_for_quiet()
            result = await (self._direct() if self.scenario == "direct" else self._room())
            result["machine_busy_before_pct"] = round(busy_before, 1)
            return result
        finally:
            await self._teardown()

    async def _room(self) -> dict[str, Any]:
        args = self.args
        await self._start_server()
        clip = str(clip_path(args.clip, args.cache_dir))
        setup_started = self.setup_started = time.monotonic()
        if self.scenario == "consult":
            # K consultations; client process p holds party i of room k where (4k + i) mod P
            # is p: with P = 4, process i is role i of every room (the session openers, the
            # village doctors, all in the first). Rooms from --decode-rooms on decode nothing
            # and receive by RTP headers (LeanReceive), so that the clients of many rooms
            # leave the 2 cores to the server.
            procs = max(1, args.consult_procs)
            parties: list[list[PartyPlan]] = [[] for _ in range(procs)]
            for k in range(self.rooms):
                members = [self._member(i, role, k) for i, role in enumerate(CONSULT_ROLES)]
                cid, _ = await self._create_consultation(members, "consultation", 0)
                self.consultations.append(cid)
                if k == 0:
                    self.room = (cid, members[0].token)
                sampled = k < args.decode_rooms
                for i, m in enumerate(members):
                    parties[(4 * k + i) % procs].append(
                        PartyPlan(
                            m.role if self.rooms == 1 else f"r{k}-{m.role}",
                            m.token,
                            "bench",
                            True,
                            args.consult_decode if sampled else 0,
                            False,
                            3,
                            3,
                            args.layers,
                            lean=not sampled,
                            consultation_id=cid,
                        )
                    )
            plans = [
                WorkerPlan(p, "room", self.url, "", tuple(group), clip)
                for p, group in enumerate(parties)
                if group
            ]
            first, rest = plans[:1], plans[1:]
        else:
            members = [self._member(0, "village_doctor"), self._member(1, "county_physician")]
            cid, tokens = await self._create_consultation(members[:2], "teaching", self.viewers)
            self.room = (cid, members[0].token)
            presenter = PartyPlan("presenter", members[0].token, "bench", True, 0, True, 0, 0)
            # The sampled viewers (decoding every frame, aiortc's whole receive path) in a
            # process of their own; the rest, lean unless --full-viewers, share the others.
            sampled = min(args.decoded, self.viewers)
            bulk = self.viewers - sampled
            procs = args.viewer_procs or max(1, min(4, math.ceil(bulk / 40)))
            groups: list[list[PartyPlan]] = [[] for _ in range(procs + 1)]
            for i, token in enumerate(tokens):
                decoded = i < sampled
                groups[0 if decoded else 1 + (i - sampled) % procs].append(
                    PartyPlan(
                        f"trainee-{i}",
                        token,
                        "bench",
                        False,
                        1 if decoded else 0,
                        False,
                        1,
                        1,
                        args.layers,
                        lean=not decoded and not args.full_viewers,
                    )
                )
            ready_s = 60.0 + 0.5 * self.viewers
            first = [WorkerPlan(0, "room", self.url, cid, (presenter,), clip)]
            rest = [
                WorkerPlan(
                    i + 1,
                    "room",
                    self.url,
                    cid,
                    tuple(group),
                    clip,
                    join_concurrency=args.join_concurrency,
                    join_interval_s=(procs + 1) / args.join_rate,
                    ready_timeout_s=ready_s,
                )
                for i, group in enumerate(groups)
                if group
            ]
        limit = 120.0 + self.viewers + 30.0 * self.rooms
        # The session's opener first (the village doctor); in a consultation everyone joins
        # before anyone publishes, and the publishers take turns.
        # --consult-publish on-join: each party publishes as soon as it is in, so the later
        # ones' first subscribe offers hold two or three tracks of each kind.
        on_join = self.scenario == "teaching" or args.consult_publish == "on-join"
        for pipe in [self._spawn(p) for p in first]:
            await self._ask(pipe, ("start",), limit)
            if on_join:
                await self._ask(pipe, ("publish",), limit)
        more = [self._spawn(p) for p in rest]
        if on_join and self.scenario == "consult":
            for pipe in more:
                await self._ask(pipe, ("start",), limit)
                await self._ask(pipe, ("publish",), limit)
        else:
            for pipe in more:
                pipe.send(("start",))
            for pipe in more:
                await self._answer(pipe, limit)
        if not on_join:
            for pipe in self.pipes:
                await self._ask(pipe, ("publish",), limit)
        for pipe in self.pipes:
            pipe.send(("wait_ready",))
        readies = [await self._answer(pipe, limit) for pipe in self.pipes]
        self.worker_pids = [r["pid"] for r in readies]
        not_ready = [label for r in readies for label in r["not_ready"]]
        errors = [e for r in readies for e in r["errors"]]
        if not_ready:
            self.notes.append(f"{len(not_ready)} parties not receiving everything: {not_ready[:5]}")
        setup_s = time.monotonic() - setup_started
        if args.baseline:
            await self._start_direct_pair()
        return await self._measure(setup_s, errors)

    async def _direct(self) -> dict[str, Any]:
        await self._start_direct_pair()
        return await self._measure(0.0, [])

    async def _start_direct_pair(self) -> None:
        """Two aiortc peers in processes of their own, the same media straight from one to the
        other. Its own scenario, and, beside a room, the baseline measured in the same run."""
        clip = str(clip_path(self.args.clip, self.args.cache_dir))
        viewer_party = PartyPlan("direct-viewer", "", "", False, 1, False, 1, 1)
        index = len(self.pipes)
        publisher = self._spawn(WorkerPlan(index, "direct-publisher", "", "", (), clip))
        viewer = self._spawn(WorkerPlan(index + 1, "direct-viewer", "", "", (viewer_party,), clip))
        self.direct_pipes = [publisher, viewer]
        offer = await self._ask(publisher, ("offer",), 60)
        answer = await self._ask(viewer, ("answer_offer", offer), 60)
        await self._ask(publisher, ("answer", answer), 60)
        ready = await self._ask(viewer, ("wait_ready",), 60)
        pub_ready = await self._ask(publisher, ("wait_ready",), 60)
        self.worker_pids += [pub_ready["pid"], ready["pid"]]
        if ready["not_ready"]:
            self.notes.append("the direct viewer receives nothing")

    async def _measure(self, setup_s: float, errors: list[str]) -> dict[str, Any]:
        args = self.args
        await asyncio.sleep(args.warmup)
        start = time.monotonic() + 0.5
        end = start + args.duration
        drain_end = end + DRAIN_S
        for pipe in self.pipes:
            pipe.send(("window", start, end, drain_end))
        # The server's counters just before the window, its CPU time at the window's edges:
        # the scrapes' own cost stays outside.
        await asyncio.sleep(max(0.0, start - 0.1 - time.monotonic()))
        by_worker_before = await self._metrics_by_worker() if self.server else {}
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        before = self._sample()
        spy = self._start_py_spy()
        probe = asyncio.ensure_future(self._probe_server(end)) if self.server else None
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        after = self._sample()
        probe_ms = sorted(await probe) if probe is not None else []
        # The workers' and the supervisor's, as the CPU.
        supervisor = [self.server.pid] if self.server and self.server_workers > 1 else []
        rss = sum(rss_bytes(pid) for pid in [*supervisor, *(p for _, p in self.serving)])
        by_worker_after = await self._metrics_by_worker() if self.server else {}
        metrics_before, metrics_after = _summed(by_worker_before), _summed(by_worker_after)
        placements = await self._placements()
        replies = [await self._answer(pipe, 60 + DRAIN_S) for pipe in self.pipes]
        direct = [
            r for pipe, r in zip(self.pipes, replies, strict=True) if pipe in self.direct_pipes
        ]
        if self.scenario != "direct":
            replies = [r for r in replies if all(r is not d for d in direct)]
        room_stats = await self._room_stats()
        if args.raw_dir is not None:
            args.raw_dir.mkdir(parents=True, exist_ok=True)
            raw = (
                args.raw_dir
                / f"{self.label}-run{self.index}-{os.getpid()}-{time.time():.0f}.pickle"
            )
            raw.write_bytes(pickle.dumps({"replies": replies, "start": start, "end": end}))
        profile = await self._finish_py_spy(spy)
        result = analyse(replies, start, end, args.duration)
        result |= self._joins_and_gaps(replies)
        losses = sorted(loss for r in replies for loss in r.get("connection_losses", []))
        if losses:
            # Seconds after the first join; the publishers' losses are what stop everyone.
            result["connection_losses"] = [
                (round(at - self.setup_started, 1), who, name, state)
                for at, who, name, state in losses[:20]
            ]
            seated = [t for r in replies for t in r.get("seated_at", [])]
            first = losses[0][0]
            self.notes.append(
                f"{len(losses)} connections failed or closed before the end, the first "
                f"{first - self.setup_started:.0f}s after the first join, when "
                f"{sum(1 for t in seated if t <= first)} parties were seated"
            )
        if direct and self.scenario != "direct":
            # The same media straight between two peers, in this run's window: the baseline.
            base = analyse(direct, start, end, args.duration)
            for key in ("latency_ms_p50", "latency_ms_p95", "latency_all_ms_p95"):
                result[f"direct_{key}"] = base[key]
            result["added_latency_ms_p50"] = result["latency_ms_p50"] - base["latency_ms_p50"]
            result["added_latency_ms_p95"] = result["latency_ms_p95"] - base["latency_ms_p95"]
            result["added_latency_all_ms_p95"] = (
                result["latency_all_ms_p95"] - base["latency_all_ms_p95"]
            )
        result |= {
            "scenario": self.label,
            "viewers": self.viewers if self.scenario == "teaching" else None,
            "rooms": self.rooms,
            "db": self.args.db,
            "redis": self.uses_redis,
            "run": self.index,
            "duration_s": args.duration,
            "setup_s": round(setup_s, 1),
            # GET /healthz every 0.5 s in the window: how long the server's one event loop
            # (which also forwards all media) took to answer.
            "server_http_ms_p50": percentile(probe_ms, 50),
            "server_http_ms_max": probe_ms[-1] if probe_ms else None,
            "errors": errors[:10],
            "notes": self.notes,
            "layers_requested": args.layers,
            # Video subscriptions by the layer the server sent at the end of the window, and
            # publisher -> server packets lost since the start (the server's inbound stats).
            **room_stats,
            "layer_changes": len([c for r in replies for c in r.get("layer_changes", [])]),
        }
        wall = after["at"] - before["at"]
        cpu = after["server_cpu"] - before["server_cpu"]
        clients = after["clients"] - before["clients"]
        machine = after["machine"] - before["machine"]
        own = after["own"] - before["own"]
        result |= {
            # Per client process, in the order they were started (room: the publisher(s)
            # first; teaching: presenter, sampled viewers, the other viewers; then the pair).
            "client_cpu_cores_by_process": [
                round((after.get(f"worker{i}", 0.0) - before.get(f"worker{i}", 0.0)) / wall, 3)
                for i in range(len(self.worker_pids))
            ],
            "client_cpu_cores": clients / wall,
            "machine_busy_cores": machine / wall,
            # Whatever else ran on the machine meanwhile (other users, the kernel's share).
            "other_cpu_cores": (machine - cpu - clients - own) / wall,
        }
        if self.server is not None:
            frames_fwd = metrics_after.get("frames_forwarded", math.nan) - metrics_before.get(
                "frames_forwarded", math.nan
            )
            forwarded = result["forwarded_packets"]
            result |= {
                "server_cpu_cores": cpu / wall,
                "cpu_us_per_forwarded_packet": 1e6 * cpu / forwarded if forwarded else math.nan,
                "server_frames_forwarded": frames_fwd,
                "cpu_us_per_forwarded_frame": 1e6 * cpu / frames_fwd if frames_fwd else math.nan,
                "server_frames_dropped": metrics_after.get("frames_dropped", math.nan)
                - metrics_before.get("frames_dropped", math.nan),
                "server_keyframe_requests": metrics_after.get("keyframe_requests", math.nan)
                - metrics_before.get("keyframe_requests", math.nan),
                "server_rss_mb": rss / 2**20,
            }
        else:
            result |= {
                k: None
                for k in (
                    "server_cpu_cores",
                    "cpu_us_per_forwarded_packet",
                    "cpu_us_per_forwarded_frame",
                    "server_rss_mb",
                )
            }
        if self.server is not None:
            result |= self._by_worker(
                before, after, by_worker_before, by_worker_after, placements, replies
            )
        result["bound_hints"] = bound_hints(result, os.cpu_count() or 1)
        if profile is not None:
            result["profile"] = profile
        return result

    def _joins_and_gaps(self, replies: list[dict[str, Any]]) -> dict[str, Any]:
        """How the joins went (a join storm comes before the window), and whether media
        stopped meanwhile: the longest wait between two video frames at each subscriber
        over its whole life, and between two frames the publishers sent."""
        joins = [tuple(j) for r in replies for j in r.get("joins", [])]
        seated = [j for j in joins if math.isfinite(j[3])]
        connect_ms = sorted(1000 * (j[3] - j[2]) for j in seated)
        due_ms = sorted(1000 * (j[3] - j[1]) for j in seated)
        video = [s for r in replies for s in r["streams"] if s["kind"] == "video"]
        gaps = sorted(1000 * float(s.get("gap_max_s") or 0.0) for s in video)
        sampled = [s for s in video if s["decoded"]]
        worst = max(video, key=lambda s: float(s.get("gap_max_s") or 0.0), default=None)
        sent_gaps = [
            max((b - a for a, b in zip(log["sent"], log["sent"][1:], strict=False)), default=0.0)
            for r in replies
            for log in r["publishers"]
        ]
        return {
            "parties": len(joins),
            "seated": len(seated),
            "join_ms_p50": percentile(connect_ms, 50),
            "join_ms_p99": percentile(connect_ms, 99),
            "join_ms_max": connect_ms[-1] if connect_ms else math.nan,
            # From the party's turn in the join schedule (includes waiting for a join slot).
            "join_due_ms_p99": percentile(due_ms, 99),
            "joins_span_s": (
                max(j[3] for j in seated) - min(j[2] for j in seated) if seated else math.nan
            ),
            "video_gap_max_ms": gaps[-1] if gaps else math.nan,
            "video_gap_median_of_max_ms": percentile(gaps, 50),
            "video_gap_max_ms_sampled": max(
                (1000 * float(s.get("gap_max_s") or 0.0) for s in sampled), default=math.nan
            ),
            # Seconds after the first join at which the longest gap ended.
            "video_gap_max_at_s": (
                float(worst["gap_max_at"]) - self.setup_started
                if worst is not None and worst.get("gap_max_at") is not None
                else math.nan
            ),
            "publisher_send_gap_max_ms": 1000 * max(sent_gaps, default=math.nan),
        }

    def _by_worker(
        self,
        before: dict[str, float],
        after: dict[str, float],
        metrics_before: dict[str, dict[str, float]],
        metrics_after: dict[str, dict[str, float]],
        placements: dict[str, str],
        replies: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """Per serving process (worker 1 first): CPU, the rooms placed on it, what it
        forwarded (the packets its rooms' subscribers saw, the frames it counted)."""
        wall = after["at"] - before["at"]
        nodes = [node for node, _ in self.serving]
        room_of_label = re.compile(r"^r(\d+)-")
        # The rooms in the order of their labels' k (teaching: its one room).
        known = self.consultations or ([self.room[0]] if self.room else [])

        def owner_of(cid: str) -> str:
            # One serving process (no placement without Redis): it owns every room.
            return placements.get(cid) or (nodes[0] if len(nodes) == 1 else "?")

        forwarded: dict[str, int] = defaultdict(int)
        video_streams: dict[str, int] = defaultdict(int)
        for reply in replies:
            for stream in reply["streams"]:
                match = room_of_label.match(stream["viewer"])
                k = int(match[1]) if match else 0
                owner = owner_of(known[k] if k < len(known) else "")
                forwarded[owner] += stream["packets_expected"]
                video_streams[owner] += stream["kind"] == "video"
        rooms = Counter(owner_of(cid) for cid in known)
        frames = [
            metrics_after.get(n, {}).get("frames_forwarded", math.nan)
            - metrics_before.get(n, {}).get("frames_forwarded", math.nan)
            for n in nodes
        ]
        served = sum(frames)
        if served > 0 and len(nodes) > 1:
            # A teaching room's trainees that reached another worker are served by it (an
            # edge, signaling/edge_media.py), not by the room's owner: the packets and the
            # streams the subscribers saw are shared out as the workers' own counts of
            # frames forwarded are.
            packets, streams = sum(forwarded.values()), sum(video_streams.values())
            forwarded = defaultdict(
                int, {n: round(packets * f / served) for n, f in zip(nodes, frames, strict=True)}
            )
            video_streams = defaultdict(
                int, {n: round(streams * f / served) for n, f in zip(nodes, frames, strict=True)}
            )
        cores = [
            (after.get(f"serving{i}", 0.0) - before.get(f"serving{i}", 0.0)) / wall
            for i in range(len(nodes))
        ]
        return {
            "server_workers": self.server_workers,
            "worker_nodes": nodes,
            "server_cpu_cores_by_worker": cores,
            "supervisor_cpu_cores": (
                (after["server_cpu"] - before["server_cpu"]) / wall - sum(cores)
                if self.server_workers > 1
                else 0.0
            ),
            "rooms_by_worker": [rooms.get(n, 0) for n in nodes],
            "rooms_unplaced": rooms.get("?", 0) if self.redis_url else 0,
            "media_rooms_by_worker": [
                metrics_after.get(n, {}).get("rooms", math.nan) for n in nodes
            ],
            "forwarded_packets_per_s_by_worker": [forwarded.get(n, 0) / wall for n in nodes],
            "cpu_us_per_forwarded_packet_by_worker": [
                1e6 * c * wall / forwarded[n] if forwarded.get(n) else math.nan
                for c, n in zip(cores, nodes, strict=True)
            ],
            "server_frames_forwarded_by_worker": frames,
            # Video streams forwarded (each with its audio), and the worker's CPU per stream.
            "video_streams_by_worker": [video_streams.get(n, 0) for n in nodes],
            "server_millicores_per_video_stream_by_worker": [
                1000 * c / video_streams[n] if video_streams.get(n) else math.nan
                for c, n in zip(cores, nodes, strict=True)
            ],
            "redis_cpu_cores": (after["redis"] - before["redis"]) / wall,
            "server_cores_per_room_by_worker": [
                c / rooms[n] if rooms.get(n) else math.nan
                for c, n in zip(cores, nodes, strict=True)
            ],
        }

    def _start_py_spy(self) -> tuple[ManagedProcess, Path] | None:
        if not self.args.py_spy or self.server is None:
            return None
        out = self.args.profile_dir / f"{self.label}-run{self.index}.pyspy.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [self.args.py_spy, "record", "--pid", str(self.server.pid), "--format", "raw"]
        argv += ["--duration", str(max(1, int(self.args.duration))), "--rate", "200"]
        argv += ["--nonblocking", "--output", str(out)]
        return ManagedProcess("py-spy", argv, self.tmp / "py-spy.log"), out

    async def _finish_py_spy(self, spy: tuple[ManagedProcess, Path] | None) -> Any:
        if spy is None:
            return None
        process, out = spy
        await asyncio.to_thread(process.proc.wait, self.args.duration + 30)
        process.stop(timeout=STOP_TIMEOUT_S)
        from bench.relay_profile import summarize_collapsed

        if not out.exists():
            return {"error": process.tail()}
        return {"file": str(out), **summarize_collapsed(out.read_text(encoding="utf-8"))}


def bound_hints(result: dict[str, Any], cores: int) -> list[str]:
    """What likely limited a run, from its window's CPU figures: a worker (one event loop)
    near a whole core; the machine's cores nearly all busy; the client processes' event loops
    late (they then receive in bursts); others' work on the shared machine."""
    hints = []
    by_worker = result.get("server_cpu_cores_by_worker") or []
    if any(isinstance(c, float) and c >= 0.85 for c in by_worker):
        hints.append("server: a worker near one core")
    busy = result.get("machine_busy_cores")
    if isinstance(busy, float) and busy >= 0.92 * cores:
        hints.append(f"machine: {busy:.2f} of {cores} cores busy")
    lag = result.get("client_loop_lag_ms_p99")
    if isinstance(lag, float) and lag > 50:
        hints.append(f"clients: their loops {lag:.0f} ms late (p99)")
    other = result.get("other_cpu_cores")
    if isinstance(other, float) and other > 0.25:
        hints.append(f"others: {other:.2f} cores")
    return hints


def _summed(by_worker: dict[str, dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for counters in by_worker.values():
        for name, value in counters.items():
            total[name] += value
    return dict(total)


# --- analysis -----------------------------------------------------------------------------


class PublisherLog:
    def __init__(self, log: dict[str, Any]) -> None:
        self.sent: Sequence[float] = log["sent"]
        self.index: Sequence[int] = log["index"]
        self.by_index: dict[int, list[int]] = defaultdict(list)
        for n, i in enumerate(self.index):
            self.by_index[i].append(n)

    def resolve(self, counter: int, arrival: float) -> int | None:
        """The latest frame n sent as clip frame `counter` no later than `arrival`."""
        ns = self.by_index.get(counter, [])
        sent = self.sent
        best = None
        lo, hi = 0, len(ns)
        # ns is increasing, and so is sent[n]: binary search for the last sent <= arrival.
        while lo < hi:
            mid = (lo + hi) // 2
            if sent[ns[mid]] <= arrival:
                best = ns[mid]
                lo = mid + 1
            else:
                hi = mid
        return best

    def candidates(self, counter: int, arrival: float, within_s: float = 10.0) -> list[int]:
        return [
            n for n in self.by_index.get(counter, []) if 0 <= arrival - self.sent[n] <= within_s
        ]

    def frames_sent_between(self, start: float, end: float) -> range:
        first = bisect_right(self.sent, start - 1e-9)
        last = bisect_right(self.sent, end - 1e-9)
        return range(first, last)


def _frame_numbers(stream: dict[str, Any], pub: PublisherLog) -> tuple[list[int] | None, int, bool]:
    """Frame numbers of the stream's window frames from their RTP timestamps, anchored by a
    decoded keyframe: the anchor reading (of those that fit) under which no frame arrives
    before it was sent, the latest such. Returns (numbers, anchors tried, found)."""
    step = VIDEO_CLOCK // 30
    ts: Sequence[int] = stream["ts"]
    arrival: Sequence[float] = stream["arrival"]
    tried = 0
    for counter, anchor_ts, anchor_at in reversed(stream["anchors"]):
        for n0 in reversed(pub.candidates(counter, anchor_at)):
            tried += 1
            numbers = [n0 + round((t - anchor_ts) / step) for t in ts]
            if all(
                0 <= n < len(pub.sent) and arrival[i] >= pub.sent[n] - 0.0005
                for i, n in enumerate(numbers)
            ):
                return numbers, tried, True
    return None, tried, False


def analyse(
    replies: list[dict[str, Any]], start: float, end: float, duration: float
) -> dict[str, Any]:
    publishers = {log["participant"]: PublisherLog(log) for r in replies for log in r["publishers"]}
    streams = [s for r in replies for s in r["streams"]]
    video = [s for s in streams if s["kind"] == "video"]
    audio = [s for s in streams if s["kind"] == "audio"]
    lat_decoded: list[float] = []
    lat_all: list[float] = []
    mismatches = 0
    unanchored = 0
    frames_lost = 0
    frames_expected = 0
    fps: list[float] = []
    publisher_fps: list[float] = []
    for log in publishers.values():
        publisher_fps.append(len(log.frames_sent_between(start, end)) / duration)
    for s in video:
        fps.append(s["frames"] / duration)
        pub = publishers.get(s["publisher"])
        if pub is None:
            unanchored += 1
            continue
        in_window = [start <= a < end for a in s["arrival"]]
        if s["decoded"]:
            for counter, arrival, inside in zip(s["counter"], s["arrival"], in_window, strict=True):
                if counter < 0 or not inside:
                    continue
                n = pub.resolve(counter, arrival)
                if n is not None:
                    lat_decoded.append(1000 * (arrival - pub.sent[n]))
        numbers, _, found = _frame_numbers(s, pub)
        expected = pub.frames_sent_between(start, end)
        frames_expected += len(expected)
        if not found or numbers is None:
            unanchored += 1
            continue
        received = set(numbers)
        frames_lost += sum(1 for n in expected if n not in received)
        for n, arrival, inside in zip(numbers, s["arrival"], in_window, strict=True):
            if inside:
                lat_all.append(1000 * (arrival - pub.sent[n]))
        if s["decoded"]:
            for n, counter in zip(numbers, s["counter"], strict=True):
                if counter >= 0 and pub.index[n] != counter:
                    mismatches += 1
    lat_decoded.sort()
    lat_all.sort()
    fps.sort()
    lags = sorted(x for r in replies for x in r["loop_lag_ms"])
    forwarded = sum(s["packets_expected"] for s in streams)
    received = sum(s["packets"] for s in streams)
    return {
        "streams_video": len(video),
        "streams_audio": len(audio),
        "forwarded_packets": forwarded,
        "forwarded_packets_per_s": forwarded / duration,
        "forwarded_video_packets_per_s": sum(s["packets_expected"] for s in video) / duration,
        "received_packets": received,
        "packets_lost": max(0, forwarded - received),
        "forwarded_mbit_per_s": 8 * sum(s["payload_bytes"] for s in streams) / duration / 1e6,
        "video_packets_per_frame": (
            sum(s["packets"] for s in video) / max(1, sum(s["frames"] for s in video))
        ),
        "subscriber_fps_min": fps[0] if fps else math.nan,
        "subscriber_fps_p5": percentile(fps, 5),
        "subscriber_fps_median": percentile(fps, 50),
        "audio_fps_min": min((s["frames"] / duration for s in audio), default=math.nan),
        "publisher_fps_min": min(publisher_fps, default=math.nan),
        "latency_ms_p50": percentile(lat_decoded, 50),
        "latency_ms_p95": percentile(lat_decoded, 95),
        "latency_ms_p99": percentile(lat_decoded, 99),
        "latency_samples": len(lat_decoded),
        "latency_all_ms_p50": percentile(lat_all, 50),
        "latency_all_ms_p95": percentile(lat_all, 95),
        "latency_all_ms_p99": percentile(lat_all, 99),
        "latency_all_ms_max": lat_all[-1] if lat_all else math.nan,
        "frames_lost": frames_lost,
        "frames_expected": frames_expected,
        "counter_mismatches": mismatches,
        "decode_errors": sum(s["decode_errors"] for s in video),
        "streams_unanchored": unanchored,
        "publisher_keyframe_requests": sum(
            int(log["keyframe_requests"]) for r in replies for log in r["publishers"]
        ),
        "connection_states": dict(
            Counter(c for r in replies for c in r.get("connection_states", []))
        ),
        "client_loop_lag_ms_p99": percentile(lags, 99),
        "client_loop_lag_ms_max": lags[-1] if lags else math.nan,
    }


# --- aggregation and output ---------------------------------------------------------------

SUMMARY: list[tuple[str, str, str]] = [
    ("server_cpu_cores", "srv cores", "{:.3f}"),
    ("forwarded_packets_per_s", "fwd pkt/s", "{:.0f}"),
    ("cpu_us_per_forwarded_packet", "µs/pkt", "{:.1f}"),
    ("cpu_us_per_forwarded_frame", "µs/frame", "{:.1f}"),
    ("subscriber_fps_min", "fps min", "{:.1f}"),
    ("latency_ms_p50", "lat p50", "{:.1f}"),
    ("latency_ms_p95", "lat p95", "{:.1f}"),
    ("latency_all_ms_p50", "all p50", "{:.1f}"),
    ("latency_all_ms_p95", "all p95", "{:.1f}"),
    ("added_latency_ms_p50", "+lat p50", "{:.1f}"),
    ("added_latency_ms_p95", "+lat p95", "{:.1f}"),
    ("frames_lost", "lost", "{:.0f}"),
    ("frames_expected", "of", "{:.0f}"),
    ("seated", "seated", "{:.0f}"),
    ("join_ms_p99", "join p99", "{:.0f}"),
    ("video_gap_max_ms", "gap max", "{:.0f}"),
    ("server_rss_mb", "RSS MB", "{:.0f}"),
    ("client_cpu_cores", "cli cores", "{:.2f}"),
    ("other_cpu_cores", "other", "{:.2f}"),
]


def render_table(results: dict[str, list[dict[str, Any]]]) -> str:
    header = "| scenario | runs | " + " | ".join(h for _, h, _ in SUMMARY) + " |"
    lines = [header, "|" + "---|" * (len(SUMMARY) + 2)]
    for label, runs in results.items():
        cells = [cell(median_of(runs, key), fmt) for key, _, fmt in SUMMARY]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Capacity: every video stream at this many fps or more, no frame lost, and (with the direct
# pair beside the room) the subscribers' latency p95 at most this much above the pair's:
# clients that fall behind receive a backlog in a burst, which lifts a window's fps to 30
# and above while every frame is late (medians of runs).
CAPACITY_FPS = 29.0
CAPACITY_ADDED_P95_MS = 50.0


def _elementwise_median(runs: list[dict[str, Any]], key: str) -> list[float]:
    lists = [r[key] for r in runs if isinstance(r.get(key), list)]
    if not lists:
        return []
    width = min(len(x) for x in lists)
    return [
        statistics.median(
            v for x in lists if isinstance(v := x[i], int | float) and math.isfinite(v)
        )
        if any(isinstance(x[i], int | float) and math.isfinite(x[i]) for x in lists)
        else math.nan
        for i in range(width)
    ]


def _bound_counts(runs: list[dict[str, Any]]) -> str:
    counts = Counter(h.split(":")[0] for r in runs for h in r.get("bound_hints", []))
    return ", ".join(f"{name} ×{n}" for name, n in sorted(counts.items())) or "none"


def render_workers(results: dict[str, list[dict[str, Any]]]) -> str:
    """Per worker (medians of runs, element by element), and the consultations' capacity per
    worker count: the largest K whose runs hold every stream at >= CAPACITY_FPS with no frame
    lost and added latency p95 <= CAPACITY_ADDED_P95_MS."""

    def fmt(values: list[float], pattern: str) -> str:
        return " / ".join(pattern.format(v) if math.isfinite(v) else "-" for v in values)

    lines = [
        "| scenario | runs | rooms by worker | cores by worker | fwd pkt/s by worker "
        "| µs/fwd pkt by worker | cores/room by worker | mcores/video stream by worker "
        "| supervisor cores | redis cores | bound (runs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    capacity: dict[int, list[tuple[int, bool]]] = defaultdict(list)
    key = "server_millicores_per_video_stream_by_worker"
    for label, runs in results.items():
        ok = [r for r in runs if "failed" not in r and r.get("server_workers")]
        if not ok:
            continue
        lines.append(
            f"| {label} | {len(ok)} "
            f"| {fmt(_elementwise_median(ok, 'rooms_by_worker'), '{:.0f}')} "
            f"| {fmt(_elementwise_median(ok, 'server_cpu_cores_by_worker'), '{:.3f}')} "
            f"| {fmt(_elementwise_median(ok, 'forwarded_packets_per_s_by_worker'), '{:.0f}')} "
            f"| {fmt(_elementwise_median(ok, 'cpu_us_per_forwarded_packet_by_worker'), '{:.1f}')} "
            f"| {fmt(_elementwise_median(ok, 'server_cores_per_room_by_worker'), '{:.3f}')} "
            f"| {fmt(_elementwise_median(ok, key), '{:.1f}')} "
            f"| {cell(median_of(ok, 'supervisor_cpu_cores'), '{:.3f}')} "
            f"| {cell(median_of(ok, 'redis_cpu_cores'), '{:.3f}')} "
            f"| {_bound_counts(ok)} |"
        )
        if label.startswith("consult"):
            fps = median_of(ok, "subscriber_fps_min")
            lost = median_of(ok, "frames_lost")
            added = median_of(ok, "added_latency_all_ms_p95")
            good = (
                math.isfinite(fps)
                and fps >= CAPACITY_FPS
                and lost == 0
                and not added > CAPACITY_ADDED_P95_MS  # NaN (no direct pair): not judged
            )
            capacity[int(ok[0]["server_workers"])].append((int(ok[0]["rooms"]), good))
    for workers, sizes in sorted(capacity.items()):
        held = [k for k, good in sorted(sizes) if good]
        failed = [k for k, good in sorted(sizes) if not good]
        lines.append(
            f"\ncapacity, {workers} worker(s): {max(held) if held else 0} consultations "
            f"(held at {held or '-'}; not at {failed or '-'})"
        )
    return "\n".join(lines)


def clean(value: Any) -> Any:
    """JSON without NaN/inf (null instead), floats rounded."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


# --- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Media relay benchmark (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "scenarios", nargs="*", choices=["consult", "teaching", "direct", []], default=[]
    )
    parser.add_argument("--viewers", default="10,50,100", help="teaching: K, comma-separated")
    parser.add_argument(
        "--rooms", default="1", help="consult: K 4-party consultations at once, comma-separated"
    )
    parser.add_argument(
        "--server-workers",
        default="1",
        help="`telemed serve --workers N`, comma-separated; several: a private redis-server "
        "for every N (1 too), each K measured with every N in turn",
    )
    parser.add_argument(
        "--redis", action="store_true", help="a private redis-server even for one worker"
    )
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get(
            "TELEMED_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
        ),
        help="--db postgres: a scratch database is created next to this one",
    )
    parser.add_argument(
        "--decode-rooms",
        type=int,
        default=1,
        help="consult: rooms whose parties decode (--consult-decode); the others' parties "
        "receive by RTP headers (LeanReceive)",
    )
    parser.add_argument(
        "--consult-procs", type=int, default=4, help="consult: client processes for all rooms"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=20.0, help="measured window, s")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured, after setup")
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    parser.add_argument("--out", type=Path, help="also append each run's JSON here")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument("--viewer-procs", type=int, default=0, help="0: one per 50 viewers")
    parser.add_argument("--decoded", type=int, default=2, help="teaching: fully decoded viewers")
    parser.add_argument(
        "--consult-decode", type=int, default=1, help="consult: streams each party decodes"
    )
    parser.add_argument(
        "--layers",
        choices=["full", "auto"],
        default="full",
        help="full: subscribers pin the full picture (set_layer); auto: the server's choice",
    )
    parser.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="consult/teaching: no direct pair beside the room (the same-run latency baseline)",
    )
    parser.add_argument(
        "--full-viewers",
        action="store_true",
        help="teaching: undecoded viewers keep aiortc's whole receive path in the window "
        "(default: RTP headers only, see relay_client.LeanReceive)",
    )
    parser.add_argument(
        "--consult-publish",
        choices=["after-join", "on-join"],
        default="after-join",
        help="consult: everyone joins, then each publishes in turn; or each publishes as "
        "soon as it has joined (late joiners' first offers then hold several tracks of a "
        "kind: tests/test_media_joiner.py)",
    )
    parser.add_argument("--join-rate", type=float, default=20.0, help="teaching joins per s")
    parser.add_argument("--join-concurrency", type=int, default=4)
    parser.add_argument(
        "--server-nice",
        type=int,
        default=-10,
        help="nice value of the server (negative: ahead of the client processes)",
    )
    parser.add_argument("--kbps", type=int, default=1000, help="video bitrate of the clip")
    parser.add_argument("--clip-frames", type=int, default=600)
    parser.add_argument("--gop", type=int, default=150, help="keyframe every N clip frames")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "relay")
    parser.add_argument("--quiet-below", type=float, default=25.0, help="%% of a core")
    parser.add_argument("--quiet-wait", type=float, default=300.0, help="s, at most")
    parser.add_argument(
        "--noisy-above",
        type=float,
        default=0.25,
        help="cores others used during the window beyond which a run is repeated",
    )
    parser.add_argument("--retries", type=int, default=2, help="repeats of a noisy run")
    parser.add_argument("--py-spy", help="py-spy executable: profile the server in the window")
    parser.add_argument(
        "--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "relay-profiles"
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    parser.add_argument("--raw-dir", type=Path, help="also pickle what the clients reported here")
    args = parser.parse_args(argv)
    if args.quick:
        args.scenarios = args.scenarios or ["consult", "teaching", "direct"]
        args.viewers = "10"
        args.runs = 1
        args.duration = 5.0
        args.warmup = 1.5
        args.clip_frames = 150
        args.gop = 75
        args.quiet_wait = 0.0
        args.retries = 0
    if not args.scenarios:
        parser.error("name at least one scenario (or --quick)")
    args.viewer_counts = [int(v) for v in str(args.viewers).split(",") if v.strip()]
    args.room_counts = [int(v) for v in str(args.rooms).split(",") if v.strip()]
    args.worker_counts = [int(v) for v in str(args.server_workers).split(",") if v.strip()]
    if min(args.room_counts + args.worker_counts, default=0) < 1:
        parser.error("--rooms and --server-workers: positive numbers")
    # N = 1 beside N > 1 runs with Redis too: only the worker count differs.
    args.redis = args.redis or max(args.worker_counts) > 1
    args.clip = ClipSpec(kbps=args.kbps, frames=args.clip_frames, gop=args.gop)
    return args


async def amain(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    started = time.monotonic()
    clip = await asyncio.to_thread(load_clip, args.clip, args.cache_dir)
    info = machine_info(PACKAGES)
    info["clip"] = {
        "width": clip.spec.width,
        "height": clip.spec.height,
        "fps": clip.spec.fps,
        "video_kbps": round(clip.video_kbps()),
        "gop": clip.spec.gop,
        "frames": clip.frames,
        "audio_packet_bytes": round(sum(map(len, clip.audio)) / len(clip.audio)),
    }
    print(f"# {json.dumps(info, ensure_ascii=False)}", file=sys.stderr)
    # (scenario, viewers, rooms, server workers); the worker counts innermost, so that each
    # size is measured with N = 1 and N = 2 back to back (similar noise).
    plan: list[tuple[str, int, int, int]] = []
    for scenario in args.scenarios:
        if scenario == "teaching":
            plan += [("teaching", k, 1, n) for k in args.viewer_counts for n in args.worker_counts]
        elif scenario == "consult":
            plan += [("consult", 0, k, n) for k in args.room_counts for n in args.worker_counts]
        else:
            plan.append((scenario, 0, 1, 1))
    results: dict[str, list[dict[str, Any]]] = {}
    for run_index in range(args.runs):
        for scenario, viewers, rooms, workers in plan:
            result = await _attempts(args, scenario, viewers, run_index, rooms, workers)
            result["machine"] = info
            results.setdefault(result["scenario"], []).append(result)
            line = json.dumps(clean(result), ensure_ascii=False)
            if args.json:
                print(line, flush=True)
            if args.out:
                with args.out.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
    table = render_table(results)
    if any(r.get("server_workers") for runs in results.values() for r in runs):
        table += "\n\n" + render_workers(results)
    print(
        table if not args.json else "\n".join("# " + t for t in table.splitlines()), file=sys.stderr
    )
    print(f"# total {time.monotonic() - started:.0f}s", file=sys.stderr)
    return results


async def _attempts(
    args: argparse.Namespace,
    scenario: str,
    viewers: int,
    run_index: int,
    rooms: int = 1,
    server_workers: int = 1,
) -> dict[str, Any]:
    """One run, again (up to --retries times) while others kept the machine busy during the
    window or the run failed; the last attempt stands, the discarded ones are summarized."""
    discarded: list[dict[str, Any]] = []
    while True:
        run = Run(args, scenario, viewers, run_index, rooms, server_workers)
        try:
            result = await run.execute()
        except Exception as exc:
            result = {"scenario": run.label, "run": run_index, "failed": repr(exc)}
        other = result.get("other_cpu_cores")
        noisy = isinstance(other, float) and other > args.noisy_above
        result["noisy"] = noisy
        print(_one_line(result), file=sys.stderr, flush=True)
        if not (noisy or "failed" in result) or len(discarded) >= args.retries:
            result["discarded_attempts"] = discarded
            return result
        discarded.append(
            {
                k: result.get(k)
                for k in ("failed", "other_cpu_cores", "cpu_us_per_forwarded_packet")
                if k in result
            }
        )


def _one_line(result: dict[str, Any]) -> str:
    if "failed" in result:
        return f"{result['scenario']} run {result['run']}: FAILED {result['failed']}"
    parts = [
        f"{result['scenario']} run {result['run']}{' (noisy)' if result.get('noisy') else ''}:"
    ]
    for key, header, fmt in SUMMARY:
        value = result.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            parts.append(f"{header}={fmt.format(value)}")
    if result.get("notes"):
        parts.append(f"notes={result['notes']}")
    if result.get("bound_hints"):
        parts.append(f"bound={result['bound_hints']}")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loop_task: asyncio.Task[Any] | None = None

    async def run() -> dict[str, list[dict[str, Any]]]:
        nonlocal loop_task
        loop_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        # SIGTERM tears down like Ctrl-C: every child is stopped in `finally`.
        loop.add_signal_handler(signal.SIGTERM, lambda: loop_task and loop_task.cancel())
        return await amain(args)

    try:
        results = asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    failed = any("failed" in r for runs in results.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
