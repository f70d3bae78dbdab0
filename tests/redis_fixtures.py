"""Redis fixtures: a private redis-server for the test session, flushed before every test.

The server is started from the `redis-server` binary on PATH (the Makefile's system-deps target
installs it) on a free 127.0.0.1 port, without persistence, and stopped at the end of the
session whatever happened. The machine's own Redis (6379) is never touched. A missing binary is
a failure, not a skip: CI is expected to have it.

Use with `pytest_plugins = ["redis_fixtures"]` (test_presence.py and test_multinode.py do).
PYTEST_DONT_REWRITE: there are no asserts here, and this marker lets the module be imported
before pytest registers it as a plugin without a (fatal) rewrite warning."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.exceptions

REDIS_BINARY = "redis-server"
# How long a fresh server may take to answer PING, and to exit when asked to.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# Another process may grab the free port between our probe and redis binding it.
START_ATTEMPTS = 3


@dataclass(frozen=True)
class RedisServer:
    """A running private redis-server."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def _wait_until_ready(server: RedisServer) -> bool:
    """True once the server answers PING; False if it exited (e.g. the port was taken)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with redis.Redis(
        host="127.0.0.1", port=server.port, socket_connect_timeout=0.5, socket_timeout=0.5
    ) as probe:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            try:
                if probe.ping():
                    return True
            except redis.exceptions.ConnectionError:
                pass
            time.sleep(0.02)  # poll interval, bounded by the deadline
    raise RuntimeError(
        f"redis-server on port {server.port} did not answer PING within {START_TIMEOUT_S}s:\n"
        + _log_tail(server.log)
    )


def _start(workdir: Path, port: int | None = None) -> RedisServer:
    """On a free port, or on `port` (a restart: one attempt)."""
    binary = shutil.which(REDIS_BINARY)
    if binary is None:
        pytest.fail(
            f"{REDIS_BINARY} is not on PATH; the Redis tests need it. Install it with "
            "`make system-deps` (as root) or `apt-get install redis-server`.",
            pytrace=False,
        )
    attempts = START_ATTEMPTS if port is None else 1
    wanted = port
    for attempt in range(1, attempts + 1):
        port = wanted or _free_port()
        log = workdir / f"redis-{port}.log"
        # The log file is inherited by the child; closing our handle right away is fine.
        with log.open("ab") as out:
            process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(workdir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = RedisServer(port, process, log)
        try:
            if _wait_until_ready(server):
                return server
        except BaseException:
            _stop(process)
            raise
        _stop(process)
        if attempt == attempts:
            raise RuntimeError(
                f"redis-server exited at start-up {attempts} times; last log:\n" + _log_tail(log)
            )
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the whole session, always stopped afterwards."""
    server = _start(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        _stop(server.process)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the private server, emptied (FLUSHALL) so every test starts clean."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


class RestartableRedis:
    """A private redis-server of one test's own, to kill and start again on the same port
    (empty: it keeps nothing on disk, as the deployments' Redis need not)."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self.server = _start(workdir)

    @property
    def url(self) -> str:
        return self.server.url

    def kill(self) -> None:
        """SIGKILL: every client's connection is cut, everything it held is gone."""
        self.server.process.kill()
        self.server.process.wait(timeout=STOP_TIMEOUT_S)

    def start_again(self) -> None:
        self.server = _start(self._workdir, self.server.port)


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    started = RestartableRedis(redis_dir)
    try:
        yield started
    finally:
        _stop(started.server.process)
