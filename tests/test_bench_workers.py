"""The benchmarks' view of `telemed serve --workers N` (bench/common.py, bench/relay.py,
bench/signaling.py): which processes serve, reaching each worker behind the shared port, and
what the capacity table counts. The figures in BENCHMARKS.md rest on these."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

# bench/ is not an installed package: the repository root makes `bench.*` importable.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.common import (  # noqa: E402
    ManagedProcess,
    free_port,
    get_from_every_worker,
    recording_key_env,
    signing_key_env,
    started_workers,
    telemed_command,
    wait_for_workers,
    wait_until_ready,
)
from bench.relay import bound_hints, render_workers  # noqa: E402
from bench.signaling import Scenario, node_spec  # noqa: E402

pytest_plugins = ["redis_fixtures"]

# Two workers importing aiortc and PyAV on a shared 2-core machine.
WAIT_S = 120.0


def test_worker_pids_come_from_the_supervisors_lines_the_latest_start_of_each(
    tmp_path: Path,
) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        "telemed listening on http://127.0.0.1:9000 (public URL http://127.0.0.1:9000)\n"
        "telemed worker 1 started (pid 101, node vm:9000/w1)\n"
        "telemed worker 2 started (pid 102, node vm:9000/w2)\n"
        "worker 2 (pid 102, node vm:9000/w2) was killed by SIGKILL\n"
        "telemed worker 2 started (pid 205, node vm:9000/w2)\n",
        encoding="utf-8",
    )
    assert started_workers(log) == {1: ("vm:9000/w1", 101), 2: ("vm:9000/w2", 205)}


def test_node_specs_name_nodes_redis_and_workers() -> None:
    assert node_spec("1") == (1, False, 1)
    assert node_spec("1r") == (1, True, 1)
    assert node_spec("2") == (2, True, 1)
    assert node_spec("1w2") == (1, True, 2)
    assert node_spec("1w0") is None
    assert node_spec("2w2") is None
    assert Scenario(1, "postgres", True, 2).label == "1 node, 2 workers, postgres"
    assert Scenario(1, "postgres", True).label == "1 node, postgres, redis"


def _consult(rooms: int, workers: int, **figures: Any) -> dict[str, Any]:
    run = {
        "scenario": f"consult-x{rooms}-w{workers}",
        "rooms": rooms,
        "server_workers": workers,
        "subscriber_fps_min": 29.8,
        "frames_lost": 0,
        "added_latency_all_ms_p95": 5.0,
        "rooms_by_worker": [rooms] if workers == 1 else [rooms // 2, rooms - rooms // 2],
        "server_cpu_cores_by_worker": [0.1 * rooms / workers] * workers,
        "bound_hints": [],
    }
    return run | figures


def test_capacity_is_the_largest_size_holding_fps_without_loss_or_backlog() -> None:
    results = {
        "consult-x1-w1": [_consult(1, 1)],
        "consult-x2-w1": [_consult(2, 1)],
        # Clients behind: a backlog arrives in a burst, 40 fps in the window, every frame late.
        "consult-x3-w1": [_consult(3, 1, subscriber_fps_min=40.0, added_latency_all_ms_p95=900)],
        "consult-x1-w2": [_consult(1, 2)],
        "consult-x2-w2": [_consult(2, 2, frames_lost=3)],
        "consult-x3-w2": [_consult(3, 2, subscriber_fps_min=28.0)],
    }
    table = render_workers(results)
    assert "capacity, 1 worker(s): 2 consultations (held at [1, 2]; not at [3])" in table
    assert "capacity, 2 worker(s): 1 consultations (held at [1]; not at [2, 3])" in table
    assert "| consult-x3-w2 | 1 | 1 / 2 |" in table


def test_bound_hints_name_what_was_saturated() -> None:
    quiet = {
        "server_cpu_cores_by_worker": [0.3, 0.31],
        "machine_busy_cores": 1.0,
        "client_loop_lag_ms_p99": 4.0,
        "other_cpu_cores": 0.05,
    }
    assert bound_hints(quiet, 2) == []
    busy = quiet | {
        "server_cpu_cores_by_worker": [0.95],
        "machine_busy_cores": 1.95,
        "client_loop_lag_ms_p99": 300.0,
        "other_cpu_cores": 0.6,
    }
    assert [h.split(":")[0] for h in bound_hints(busy, 2)] == [
        "server",
        "machine",
        "clients",
        "others",
    ]


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def _serve_two_workers(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
    env |= {
        "TELEMED_DATA_DIR": str(tmp_path / "data"),
        "TELEMED_JWT_SECRET": "b" * 48,
        "TELEMED_REDIS_URL": redis_url,
        **recording_key_env(tmp_path),
        **signing_key_env(tmp_path),
    }
    argv = [*telemed_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = ManagedProcess("server", [*argv, "--workers", "2"], tmp_path / "server.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(url + "/readyz", server, WAIT_S)
        serving = await wait_for_workers(url, server, 2, WAIT_S)
        nodes = [node for node, _ in serving]
        assert [n.rsplit("/", 1)[1] for n in nodes] == ["w1", "w2"]
        pids = {pid for _, pid in serving}
        assert len(pids) == 2 and server.pid not in pids
        # The supervisor's children, not some other process.
        assert {_parent_of(pid) for pid in pids} == {server.pid}
        # Every worker reached, each answer from the worker that said who it was.
        answers = await get_from_every_worker(url, ["/healthz", "/metrics"], 2)
        assert sorted(answers) == sorted(nodes)
        for node, (health, metrics) in answers.items():
            assert json.loads(health)["node"] == node
            assert "telemed_media_rooms" in metrics
    finally:
        assert server.stop(timeout=30) == 0


def test_the_benchmark_finds_and_reaches_both_workers_of_a_server(
    tmp_path: Path, redis_url: str
) -> None:
    asyncio.run(_serve_two_workers(tmp_path, redis_url))
