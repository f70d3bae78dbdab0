"""A private PostgreSQL cluster for tests that stop and start the database under a running
server (the machine's own PostgreSQL on 5432 is never touched).

initdb and postgres refuse to run as root, so as root the cluster belongs to the `postgres`
user (Debian's package creates it). Stopping is "immediate": the server dies as if the machine
lost it, without a checkpoint, and recovers from its WAL when started again.
PYTEST_DONT_REWRITE: no asserts here."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        command = [str(PG_BIN / argv[0]), *argv[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=START_TIMEOUT_S)

    def init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        """As if the machine lost it: no checkpoint, connections cut."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@pytest.fixture
def postgres_cluster() -> Iterator[PostgresCluster]:
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL's server binaries are missing from {PG_BIN}")
    # Not under pytest's tmp_path: its parents are root's alone, and the cluster's user must
    # reach its directory.
    root = Path(tempfile.mkdtemp(prefix="telemed-pg-"))
    cluster = PostgresCluster(root)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.running():
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
