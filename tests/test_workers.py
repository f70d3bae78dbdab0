"""`telemed serve --workers N`: a supervisor and N worker processes on one port, run as a user
runs them (the console script in a subprocess, a private redis-server, SQLite under tmp_path).

Which worker answers is read from GET /healthz's `node`; each request goes on a connection of
its own, which SO_REUSEPORT hands to one of the listening workers."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from server.config import ConfigError, load_config
from server.supervisor import Backoff, check_workers, default_workers, worker_config

pytest_plugins = ["redis_fixtures"]

TELEMED = Path(sys.executable).parent / "telemed"
# Generous: two workers importing aiortc and PyAV on a shared 2-core machine.
WAIT_S = 120.0
COMMAND_TIMEOUT_S = 60.0
STARTED = re.compile(r"^telemed worker (\d+) started \(pid (\d+), node (\S+)\)$", re.MULTILINE)

T = TypeVar("T")

# Straight to 127.0.0.1, whatever http_proxy the test run has.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- the pieces, without processes ---------------------------------------------------------


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_healthy_run() -> None:
    backoff = Backoff(first_s=0.5, max_s=10.0, healthy_s=30.0)
    # (how long the worker ran, the wait before it starts again)
    table = [
        (0.1, 0.5),
        (0.1, 1.0),
        (2.0, 2.0),
        (0.1, 4.0),
        (29.9, 8.0),
        (0.1, 10.0),
        (0.1, 10.0),
        (30.0, 0.5),
        (0.1, 1.0),
        (3600.0, 0.5),
    ]
    assert [(ran, backoff.delay(ran)) for ran, _ in table] == table


def test_workers_default_to_one_without_redis_and_to_every_core_with_it() -> None:
    alone = load_config(env={})
    assert default_workers(alone) == 1
    shared = load_config(env={"TELEMED_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert default_workers(shared) == len(os.sched_getaffinity(0))
    # TELEMED_WORKERS (a container's environment) says how many, whatever the cores.
    set_three = load_config(
        env={"TELEMED_REDIS_URL": "redis://127.0.0.1:1/0", "TELEMED_WORKERS": "3"}
    )
    assert default_workers(set_three) == 3
    with pytest.raises(ConfigError, match="workers"):
        load_config(env={"TELEMED_WORKERS": "0"})


def test_what_several_workers_need_is_checked_before_any_starts() -> None:
    alone = load_config(env={})
    check_workers(alone, 1)
    with pytest.raises(ConfigError, match="--workers 2 needs TELEMED_REDIS_URL"):
        check_workers(alone, 2)
    redis = {"TELEMED_REDIS_URL": "redis://127.0.0.1:1/0"}
    check_workers(load_config(env=redis), 3)
    with pytest.raises(ConfigError, match="needs a fixed port, not 0"):
        check_workers(load_config(env={**redis, "TELEMED_PORT": "0"}), 2)
    # The node id may hold 128 characters: "/w10" more would not fit.
    long_node = {**redis, "TELEMED_NODE_ID": "n" * 125}
    check_workers(load_config(env=long_node), 9)
    with pytest.raises(ConfigError, match="worker 10"):
        check_workers(load_config(env=long_node), 10)


def test_each_worker_has_its_own_node_id_and_the_rest_of_the_config() -> None:
    config = load_config(
        env={
            "TELEMED_REDIS_URL": "redis://127.0.0.1:1/0",
            "TELEMED_NODE_ID": "ward-7",
            "TELEMED_JWT_SECRET": "worker-test-secret-0123456789abcdef",
        }
    )
    second = worker_config(config, 2)
    assert (second.node_id, second.effective_node_id) == ("ward-7/w2", "ward-7/w2")
    assert second.model_dump(exclude={"node_id"}) == config.model_dump(exclude={"node_id"})
    unnamed = load_config(env={"TELEMED_PORT": "9100"})
    assert worker_config(unnamed, 1).node_id == f"{socket.gethostname()}:9100/w1"


# --- real processes ------------------------------------------------------------------------


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No TELEMED_* of the caller; data (SQLite, development keys) under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
    env["TELEMED_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONIOENCODING"] = "utf-8"  # demo names are Chinese, whatever the locale
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    """Whether a server could listen on `port`: as servers bind, past connections in TIME_WAIT
    (our requests') do not count, but any listener does (SO_REUSEPORT is not asked for)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def _is_running(pid: int) -> bool:
    """False once the process is gone (a zombie counts as gone: it serves nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_for(what: str, check: Callable[[], T | None], process: subprocess.Popen[bytes]) -> T:
    """`check()`'s first answer that is not None; fail if the supervisor exits meanwhile."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        # Waiting on the supervisor is the poll interval, and notices its exit at once.
        try:
            code = process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"the supervisor exited with {code} while waiting for {what}")
    pytest.fail(f"no {what} after {WAIT_S} s")


def _wait_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and any(_is_running(pid) for pid in pids):
        time.sleep(0.1)  # poll interval, bounded by the deadline
    assert not [pid for pid in pids if _is_running(pid)], "workers left running"


@dataclass(frozen=True)
class Started:
    index: int
    pid: int
    node: str


@dataclass
class Supervisor:
    process: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8")

    def started(self) -> list[Started]:
        """Every worker start the supervisor printed, in order."""
        return [Started(int(m[1]), int(m[2]), m[3]) for m in STARTED.finditer(self.stdout)]

    def node_answering(self) -> str | None:
        """The node of whichever worker answers GET /healthz, on a fresh connection."""
        try:
            with _OPENER.open(f"http://127.0.0.1:{self.port}/healthz", timeout=10) as reply:
                body = json.loads(reply.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        assert body["status"] == "ok"
        node: str = body["node"]
        return node

    def wait_until_answering(self, nodes: set[str]) -> None:
        """Until each of `nodes` has answered /healthz (any other node answering fails)."""
        seen: set[str] = set()

        def all_seen() -> bool | None:
            node = self.node_answering()
            if node is not None:
                assert node in nodes, (node, nodes)
                seen.add(node)
            return True if seen == nodes else None

        _wait_for(f"answers from {sorted(nodes - seen)}", all_seen, self.process)


@contextmanager
def running_supervisor(tmp_path: Path, env: dict[str, str], *args: str) -> Iterator[Supervisor]:
    port = _free_port()
    stdout_path, stderr_path = tmp_path / "workers.stdout", tmp_path / "workers.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [str(TELEMED), "serve", *args, "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=err,
        )
    supervisor = Supervisor(process, port, stdout_path, stderr_path)
    try:
        yield supervisor
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for worker in supervisor.started():  # whatever a failed test left
            if _is_running(worker.pid):
                os.kill(worker.pid, signal.SIGKILL)


def test_two_workers_share_one_port_a_killed_one_comes_back_and_sigterm_stops_all(
    tmp_path: Path, redis_url: str
) -> None:
    env = _env(tmp_path, TELEMED_REDIS_URL=redis_url)
    with running_supervisor(tmp_path, env, "--dev", "--workers", "2") as supervisor:
        first = _wait_for(
            "two worker starts",
            lambda: supervisor.started() if len(supervisor.started()) == 2 else None,
            supervisor.process,
        )
        base = f"{socket.gethostname()}:{supervisor.port}"
        assert [(w.index, w.node) for w in first] == [(1, f"{base}/w1"), (2, f"{base}/w2")]
        assert len({w.pid for w in first}) == 2
        nodes = {w.node for w in first}
        supervisor.wait_until_answering(nodes)

        killed = first[0]
        os.kill(killed.pid, signal.SIGKILL)
        again = _wait_for(
            "worker 1 started again",
            lambda: next((w for w in supervisor.started()[2:] if w.index == 1), None),
            supervisor.process,
        )
        assert again.node == killed.node and again.pid not in {w.pid for w in first}
        assert not _is_running(killed.pid)
        supervisor.wait_until_answering(nodes)  # the new worker 1 included: the old one is dead
        assert (
            f"worker 1 (pid {killed.pid}, node {killed.node}) was killed by SIGKILL"
            in supervisor.stderr
        )

        supervisor.process.send_signal(signal.SIGTERM)
        assert supervisor.process.wait(timeout=COMMAND_TIMEOUT_S) == 0
        workers = supervisor.started()
        _wait_gone({w.pid for w in workers})
        assert _port_is_free(supervisor.port)

    # Once for all workers, the restarted one included: the migration, the development keys,
    # the demo. (alembic logs this line each time it migrates, even a database at head.)
    assert supervisor.stderr.count("Will assume non-transactional DDL") == 1
    assert supervisor.stdout.count("Demo consultation ") == 1
    assert supervisor.stderr.count("generated a recording key") == 1
    assert (tmp_path / "data" / "signing-dev.pem").exists()
    assert [w.index for w in workers] == [1, 2, 1]


def test_workers_die_with_a_supervisor_killed_with_sigkill(tmp_path: Path, redis_url: str) -> None:
    env = _env(tmp_path, TELEMED_REDIS_URL=redis_url)
    with running_supervisor(tmp_path, env, "--dev", "--workers", "2") as supervisor:
        workers = _wait_for(
            "two worker starts",
            lambda: supervisor.started() if len(supervisor.started()) == 2 else None,
            supervisor.process,
        )
        # Serving, so each has asked for its parent-death signal long since.
        supervisor.wait_until_answering({w.node for w in workers})

        supervisor.process.kill()
        supervisor.process.wait(timeout=COMMAND_TIMEOUT_S)
        _wait_gone({w.pid for w in workers})
        assert _port_is_free(supervisor.port)


def test_one_worker_with_redis_is_the_plain_server(tmp_path: Path, redis_url: str) -> None:
    env = _env(tmp_path, TELEMED_REDIS_URL=redis_url)
    with running_supervisor(tmp_path, env, "--dev", "--workers", "1") as server:
        node = _wait_for("an answer", server.node_answering, server.process)
        # No supervisor: the process started answers itself, under its own node id.
        assert node == f"{socket.gethostname()}:{server.port}"
        assert server.started() == []
        assert server.stdout.count("Demo consultation ") == 1
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=COMMAND_TIMEOUT_S) == 0
    assert not (tmp_path / "data" / "signing-dev.pem").exists()


def _telemed(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TELEMED), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def test_several_workers_without_redis_are_refused(tmp_path: Path) -> None:
    port = _free_port()
    result = _telemed(
        ["serve", "--dev", "--workers", "2", "--port", str(port)], _env(tmp_path), tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("telemed: --workers 2 needs TELEMED_REDIS_URL"), result.stderr
    # Refused before anything started: nothing printed, no database, the port never taken.
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()
    assert _port_is_free(port)


@pytest.mark.parametrize(
    ("given", "error"), [("0", "must be at least 1, not 0"), ("x", "not a number")]
)
def test_a_worker_count_below_one_is_refused(tmp_path: Path, given: str, error: str) -> None:
    result = _telemed(["serve", "--dev", "--workers", given], _env(tmp_path), tmp_path)
    assert result.returncode == 2
    assert f"argument --workers: {error}" in result.stderr
    assert result.stdout == ""


def test_workers_refuse_a_port_already_taken(tmp_path: Path, redis_url: str) -> None:
    """SO_REUSEPORT would let the workers share it with another server of this user's."""
    env = _env(tmp_path, TELEMED_REDIS_URL=redis_url)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _telemed(["serve", "--dev", "--workers", "2", "--port", str(port)], env, tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"telemed: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()
