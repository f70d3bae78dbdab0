"""`kill -9` of the worker that owns a live, recorded consultation, with a private
redis-server: under `telemed serve --workers 2` (the supervisor starts it again), and as a
whole node lost behind the documented nginx (two nodes, one killed for good). The clients
reconnect by themselves (as the web client does) into the same seats on a live worker, the
recording goes on as new segments, the dead worker's segments are closed, hashed and marked
interrupted by another worker, and the record keeps everything (`telemed verify` passes at
the end)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import socketio
from api_helpers import consultation_body
from media_client import MediaClient
from media_peers import ToneTrack
from nginx import Nginx
from pydantic import SecretStr
from record_helpers import signing_key_file
from recording_server_helpers import free_port, telemed_command, write_config
from signaling_fixtures import COUNTY, NS, VILLAGE, DemoIdentity, Peer, eventually
from test_recording_server import http_record_url, rest

from server.auth import TokenService
from server.config import JwtConfig

pytest_plugins = ["redis_fixtures"]

WAIT = 90.0  # two workers importing aiortc and PyAV, media, on a shared 2-core machine
STARTED = re.compile(r"^telemed worker (\d+) started \(pid (\d+), node (\S+)\)$", re.MULTILINE)


class RejoiningPeer(Peer):
    """What the web client does about its connection (web/lib/signaling.js): socket.io
    reconnects by itself, and once joined, every new connection joins again with the same
    device label."""

    def __init__(self, url: str, label: str) -> None:
        super().__init__(url, label)
        self.sio = socketio.AsyncClient(
            reconnection=True, reconnection_delay=0.5, reconnection_delay_max=2
        )
        self.sio.on("*", self._on_any, namespace=NS)
        self.sio.on("connect_error", self._on_connect_error, namespace=NS)
        self.sio.on("disconnect", self._on_disconnect, namespace=NS)
        self.sio.on("connect", self._on_connected, namespace=NS)
        self.consultation: str | None = None
        self.rejoined: list[Any] = []
        self._rejoining: set[asyncio.Future[None]] = set()

    async def join(self, consultation_id: str, device: str = "default") -> dict[str, Any]:
        self.consultation = consultation_id
        return await super().join(consultation_id, device)

    async def _on_connected(self) -> None:
        if self.consultation is not None:
            task = asyncio.ensure_future(self._join_again(self.consultation))
            self._rejoining.add(task)
            task.add_done_callback(self._rejoining.discard)

    async def _join_again(self, consultation_id: str) -> None:
        ack = await self.sio.call(
            "join", {"consultation_id": consultation_id, "device": "default"}, NS, timeout=30
        )
        self.rejoined.append(ack)


@dataclass
class Workers:
    """Where the clients connect (`url`), and the processes of the workers behind it."""

    processes: list[subprocess.Popen[bytes]]
    url: str
    logs: list[Path]
    secret: str
    env: dict[str, str]
    # Nodes started on their own: node id -> pid (the supervisor prints its workers').
    nodes: dict[str, int] = field(default_factory=dict)

    def token(self, who: DemoIdentity) -> str:
        tokens = TokenService(JwtConfig(secret=SecretStr(self.secret)))
        return tokens.mint(user_id=who.user_id, name=who.name, role=who.role, org=who.org)

    def started(self) -> list[tuple[int, int, str]]:
        text = self.logs[0].read_text(errors="replace")
        return [(int(m[1]), int(m[2]), m[3]) for m in STARTED.finditer(text)]

    def pid_of(self, node: str) -> int:
        if node in self.nodes:
            return self.nodes[node]
        return [pid for _, pid, n in self.started() if n == node][-1]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for _, pid, _ in self.started():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _deployment(tmp_path: Path, redis_url: str) -> tuple[Path, str, dict[str, str]]:
    """A config file (data under tmp_path, a recording key), the JWT secret, the env."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config_file = tmp_path / "telemed.toml"
    write_config(config_file, data_dir)
    secret = secrets.token_urlsafe(36)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
    env |= {
        "TELEMED_JWT_SECRET": secret,
        "TELEMED_SIGNING_KEY_FILE": str(signing_key_file(tmp_path)),
        "TELEMED_REDIS_URL": redis_url,
        "PYTHONIOENCODING": "utf-8",
    }
    return config_file, secret, env


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path, redis_url: str) -> AsyncIterator[Workers]:
    """`telemed serve --workers 2` on one port."""
    config_file, secret, env = _deployment(tmp_path, redis_url)
    port = free_port()
    log = tmp_path / "workers.log"
    argv = [*telemed_command(), "--config", str(config_file), "serve", "--workers", "2"]
    process = _spawn([*argv, "--host", "127.0.0.1", "--port", str(port)], env, log)
    workers = Workers([process], f"http://127.0.0.1:{port}", [log], secret, env)
    try:
        await eventually(lambda: len(workers.started()) >= 2, "two workers started", within=WAIT)
        await eventually(lambda: _ready(workers.url), "the workers ready", within=WAIT)
        yield workers
    finally:
        workers.stop()


@contextlib.asynccontextmanager
async def two_nodes_behind_nginx(tmp_path: Path, redis_url: str) -> AsyncIterator[Workers]:
    """Two single-process nodes (`telemed serve`, node ids node-a and node-b) behind the
    documented nginx configuration (tests/nginx.py)."""
    config_file, secret, env = _deployment(tmp_path, redis_url)
    ports = {"node-a": free_port(), "node-b": free_port()}
    processes, logs, pids = [], [], {}
    for node, port in ports.items():
        argv = [*telemed_command(), "--config", str(config_file), "serve", "--workers", "1"]
        log = tmp_path / f"{node}.log"
        process = _spawn(
            [*argv, "--host", "127.0.0.1", "--port", str(port)],
            env | {"TELEMED_NODE_ID": node},
            log,
        )
        processes.append(process)
        logs.append(log)
        pids[node] = process.pid
    try:
        for port in ports.values():
            await eventually(
                lambda p=port: _ready(f"http://127.0.0.1:{p}"), "a node ready", within=WAIT
            )
        async with Nginx(tmp_path, [f"127.0.0.1:{p}" for p in ports.values()]) as proxy:
            yield Workers(processes, proxy.url, logs, secret, env, pids)
    finally:
        Workers(processes, "", logs, secret, env, pids).stop()


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def _verify(tmp_path: Path, cid: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [*telemed_command(), "--config", str(tmp_path / "telemed.toml"), "verify", cid]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


async def _ready(url: str) -> bool:
    try:
        await rest(url, "GET", "/readyz", "")
    except Exception:
        return False
    return True


async def owner_of(redis_url: str, cid: str) -> str:
    """The incarnation (`<node id>#<token>`) the room is placed on."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        incarnation = await client.get(f"telemed:placement:{cid}")
    finally:
        await client.aclose()
    assert incarnation, f"{cid} is placed nowhere"
    return str(incarnation)


def node_of(incarnation: str) -> str:
    return incarnation.split("#", 1)[0]


async def segments(url: str, cid: str, token: str) -> list[dict[str, Any]]:
    record = await http_record_url(url, cid, token)
    rows: list[dict[str, Any]] = record["recordings"]
    return rows


@pytest.mark.parametrize("lost", ["worker", "node"])
async def test_the_owner_killed_mid_recording_is_survived_in_the_same_seats(
    tmp_path: Path, redis_url: str, lost: str
) -> None:
    peers: list[Peer] = []
    clients: list[MediaClient] = []
    deployment = two_workers if lost == "worker" else two_nodes_behind_nginx
    async with deployment(tmp_path, redis_url) as workers:
        try:
            url = workers.url
            village_token = workers.token(VILLAGE)
            body = consultation_body()
            cid = str((await rest(url, "POST", "/api/v1/consultations", village_token, body))["id"])
            county = workers.token(COUNTY)
            await rest(url, "POST", f"/api/v1/consultations/{cid}/accept", county, {})
            when = {"scheduled_time": "2030-03-02T10:00:00+08:00"}
            await rest(url, "POST", f"/api/v1/consultations/{cid}/schedule", county, when)
            invite = await rest(
                url,
                "POST",
                f"/api/v1/consultations/{cid}/invites",
                village_token,
                {"role": "resident"},
            )
            village, resident = RejoiningPeer(url, "village"), RejoiningPeer(url, "resident")
            peers += [village, resident]
            await village.connect({"token": village_token})
            await village.join(cid)
            await village.wait_for("joined", within=WAIT)
            await resident.connect({"token": invite["token"]})
            await resident.join(cid)
            waiting = await resident.wait_for("waiting", within=WAIT)
            await village.ok("admit", {"participant": waiting["participant"]["participant_id"]})
            await resident.wait_for("joined", within=WAIT)
            seats = {"village": village.participant_id, "resident": resident.participant_id}
            for peer, tone in ((village, 440.0), (resident, 660.0)):
                client = MediaClient(peer)
                clients.append(client)
                assert await client.publish([(ToneTrack(tone), "microphone")]) == {"ok": True}
            await resident.ok("consent", {"kind": "recording", "granted": True})
            await village.ok("chat", {"text": "before the crash"})
            await village.ok("start_recording")

            async def two_being_written() -> list[dict[str, Any]] | None:
                rows = [
                    r for r in await segments(url, cid, village_token) if r["state"] == "recording"
                ]
                return rows if len(rows) == 2 else None

            before_rows = await eventually(two_being_written, "two segments written", within=WAIT)
            await asyncio.sleep(3)  # something recorded into them
            before = await http_record_url(url, cid, village_token)

            # The room's worker dies without a word.
            dead = await owner_of(redis_url, cid)
            os.kill(workers.pid_of(node_of(dead)), signal.SIGKILL)
            killed_at = time.monotonic()
            # New media connections for after the reconnect (the old ones went with the worker);
            # they take over the clients' subscribe offers at once.
            fresh = {
                label: MediaClient(peer)
                for label, peer in (("village", village), ("resident", resident))
            }
            clients += list(fresh.values())

            # Both reconnect by themselves and get their seats back, on a live worker.
            for label, rejoining in (("village", village), ("resident", resident)):
                try:
                    await eventually(
                        lambda p=rejoining: bool(p.rejoined) and p.rejoined[-1].get("ok") is True,
                        f"{label} joined again",
                        within=WAIT,
                    )
                except AssertionError:
                    raise AssertionError(
                        f"{label}: joins {rejoining.rejoined}, disconnects "
                        f"{rejoining.disconnects}, errors {rejoining.events('error')}"
                    ) from None
                assert rejoining.participant_id == seats[label], label
            # A live incarnation: the other worker, or (--workers) the dead one started again,
            # never the dead one; a node lost for good is not the owner again.
            now_on = await owner_of(redis_url, cid)
            assert now_on != dead
            if lost == "node":
                assert node_of(now_on) != node_of(dead)
            for label, tone in (("village", 440.0), ("resident", 660.0)):
                ack = await fresh[label].publish([(ToneTrack(tone), "microphone")])
                assert ack == {"ok": True}, (label, ack)

            # The recording goes on as new segments; the dead worker's are closed as
            # interrupted, with their hash, by another worker.
            old_ids = {r["id"] for r in before_rows}

            async def carried_on() -> list[dict[str, Any]] | None:
                rows = await segments(url, cid, village_token)
                new = [r for r in rows if r["id"] not in old_ids and r["state"] == "recording"]
                old = [r for r in rows if r["id"] in old_ids]
                done = all(r["state"] == "interrupted" and r["sha256"] for r in old)
                return rows if len(new) == 2 and done else None

            await eventually(carried_on, "new segments, the old ones recovered", within=WAIT)
            recovered_after = time.monotonic() - killed_at
            await asyncio.sleep(2)
            await village.ok("chat", {"text": "after the crash"})
            # Its ack arrives before the disconnect that ending the session causes.
            await village.ok("end_session")
            await village.wait_for("session_ended", within=WAIT)

            async def all_closed() -> list[dict[str, Any]] | None:
                rows = await segments(url, cid, village_token)
                return (
                    rows if all(r["state"] != "recording" and r["sha256"] for r in rows) else None
                )

            await eventually(all_closed, "every segment closed with its hash", within=WAIT)
            after = await http_record_url(url, cid, village_token)
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.close()
            for peer in peers:
                with contextlib.suppress(Exception):
                    await peer.close()

        # The record: what was there before the crash is there unchanged, nobody left.
        events_before = [(e["seq"], e["kind"]) for e in before["events"]]
        events_after = [(e["seq"], e["kind"]) for e in after["events"]]
        assert events_after[: len(events_before)] == events_before
        later = [kind for _, kind in events_after[len(events_before) :]]
        assert "left" not in later and "joined" not in later, later
        assert [e["data"]["text"] for e in after["events"] if e["kind"] == "chat"] == [
            "before the crash",
            "after the crash",
        ]
        assert [k for _, k in events_after].count("recording_started") == 1
        print(f"recovered {recovered_after:.1f} s after the kill")

        verify = _verify(tmp_path, cid, workers.env)
        assert verify.returncode == 0, verify.stdout + verify.stderr
