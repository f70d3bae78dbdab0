"""`telemed serve --workers N`: one supervisor process and N worker processes on one address.

The supervisor does once what must happen once (the migration; in development mode the keys
and the demo identities), then runs each worker as a clean interpreter (`python -m server.cli
serve … --worker-index i`), starts one that dies again, and stops them all on SIGTERM or
SIGINT. Each worker is a whole `telemed serve` app binding the same host:port with
SO_REUSEPORT, so the kernel spreads new connections over them; they share presence and room
placement through Redis, the database and the data dir on disk. Worker i's node id is
`<node id>/w<i>`, the same across its restarts: the recordings it writes carry it, and a
restarted worker recovers its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import ValidationError

from media.composite import die_with_parent
from rooms.consultations import ConsultationService
from server.app import create_app
from server.auth import TokenService
from server.config import Config, ConfigError
from server.db.migrate import upgrade
from server.db.store import SqlRecordStore
from server.demo import describe, ensure_demo
from server.memory import freeze_after_startup
from server.recording_keys import load_recording_keys
from server.signing import development_key_file, load_opinion_keys

log = logging.getLogger(__name__)

# How long the workers may take to stop after SIGTERM before they are killed.
STOP_TIMEOUT_S = 10.0
# The command line of worker i (a list of arguments, the program first).
WorkerArgv = Callable[[int], Sequence[str]]


def default_workers(config: Config) -> int:
    """`workers` of the config if set; else every core this process may run on when the
    workers can share state (Redis), else 1."""
    if config.workers is not None:
        return config.workers
    if not config.redis_url:
        return 1
    if sys.platform == "linux":
        # The affinity mask, not os.cpu_count(): a container or taskset may allow fewer cores.
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_workers(config: Config, workers: int) -> None:
    """ConfigError if `workers` processes cannot serve `config` together."""
    if workers == 1:
        return
    if not config.redis_url:
        raise ConfigError(
            f"--workers {workers} needs TELEMED_REDIS_URL (or redis_url): the workers share "
            "presence and room placement through Redis"
        )
    if config.port == 0:
        raise ConfigError(f"--workers {workers} needs a fixed port, not 0: the workers share it")
    worker_config(config, workers)  # the longest node id


def worker_node_id(config: Config, index: int) -> str:
    return f"{config.effective_node_id}/w{index}"


def worker_config(config: Config, index: int) -> Config:
    """`config` as worker `index` runs it: its own node id, validated like any configuration."""
    try:
        return Config.model_validate(
            {**config.model_dump(), "node_id": worker_node_id(config, index)}
        )
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration for worker {index}: {exc}") from exc


@dataclass
class Backoff:
    """How long a dead worker waits to start again: doubling from `first_s` up to `max_s`, and
    `first_s` again after a run of `healthy_s` or more, so a crash loop slows down while a rare
    crash is mended at once."""

    first_s: float = 0.5
    max_s: float = 10.0
    healthy_s: float = 30.0
    _last_s: float | None = field(default=None, init=False)

    def delay(self, ran_s: float) -> float:
        """The wait after a run that lasted `ran_s` seconds."""
        if self._last_s is None or ran_s >= self.healthy_s:
            self._last_s = self.first_s
        else:
            self._last_s = min(self._last_s * 2, self.max_s)
        return self._last_s


def create_supervisor(config: Config, workers: int, worker_argv: WorkerArgv) -> Supervisor:
    """What each worker would refuse at start-up is refused here, once (ConfigError), before
    any is started; the development keys are made here, so that the workers do not race to."""
    _check_address_free(config.host, config.port)
    env = dict(os.environ)
    if config.dev and config.signing.key_file is None:
        key_file = development_key_file(config.data_dir).resolve()
        config = config.model_copy(
            update={"signing": config.signing.model_copy(update={"key_file": key_file})}
        )
        env["TELEMED_SIGNING_KEY_FILE"] = str(key_file)
    load_opinion_keys(config.signing, dev=config.dev)
    load_recording_keys(config)
    return Supervisor(config, workers, worker_argv, env)


class Supervisor:
    """Runs workers 1..N until SIGTERM or SIGINT; `run()` returns the exit status."""

    def __init__(
        self, config: Config, workers: int, worker_argv: WorkerArgv, env: Mapping[str, str]
    ) -> None:
        self._config = config
        self._workers = workers
        self._worker_argv = worker_argv
        self._env = dict(env)

    def run(self) -> int:
        return asyncio.run(self._run())

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, stopping.set)
        try:
            await self._prepare()
            async with asyncio.TaskGroup() as group:
                for index in range(1, self._workers + 1):
                    group.create_task(self._keep_running(index, stopping))
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        log.info("all %d workers stopped", self._workers)
        return 0

    async def _prepare(self) -> None:
        """Once for all workers: they start with migrate=False (server/app.py)."""
        config = self._config
        await upgrade(config.effective_database_url)
        if not config.dev:
            return
        store = SqlRecordStore(config.effective_database_url)
        await store.start()
        try:
            service = ConsultationService(store, load_opinion_keys(config.signing, dev=True))
            setup = await ensure_demo(service, TokenService(config.jwt))
        finally:
            await store.stop()
        print(describe(setup, config.effective_public_url), flush=True)

    async def _keep_running(self, index: int, stopping: asyncio.Event) -> None:
        """Worker `index`, started again whenever it dies, until `stopping`."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        node = worker_node_id(self._config, index)
        stop = asyncio.create_task(stopping.wait())
        try:
            while not stopping.is_set():
                started = loop.time()
                try:
                    worker = await asyncio.create_subprocess_exec(
                        *self._worker_argv(index),
                        env=self._env,
                        stdin=subprocess.DEVNULL,
                        # A group of its own: a Ctrl-C in the terminal reaches the supervisor
                        # alone, which stops the workers in order.
                        process_group=0,
                    )
                except OSError as exc:
                    log.error("worker %d could not be started: %s", index, exc)
                else:
                    print(
                        f"telemed worker {index} started (pid {worker.pid}, node {node})",
                        flush=True,
                    )
                    await self._watch(index, worker, stop)
                    if stopping.is_set():
                        return
                    reason = _exit_reason(worker.returncode)
                    log.warning("worker %d (pid %d, node %s) %s", index, worker.pid, node, reason)
                delay = backoff.delay(loop.time() - started)
                log.info("starting worker %d again in %.1f s", index, delay)
                await asyncio.wait({stop}, timeout=delay)
        finally:
            stop.cancel()

    async def _watch(
        self, index: int, worker: asyncio.subprocess.Process, stop: asyncio.Task[bool]
    ) -> None:
        """Until the worker exits, or `stop` (then it is stopped; also if this is cancelled)."""
        exited = asyncio.create_task(worker.wait())
        try:
            await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if worker.returncode is None:
                await _stop_worker(index, worker)
            exited.cancel()


async def _stop_worker(index: int, worker: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        worker.terminate()
    try:
        await asyncio.wait_for(worker.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning(
            "worker %d (pid %d) still running %.0f s after SIGTERM: killing it",
            index,
            worker.pid,
            STOP_TIMEOUT_S,
        )
        with contextlib.suppress(ProcessLookupError):
            worker.kill()
        await worker.wait()


def _exit_reason(returncode: int | None) -> str:
    if returncode is None:
        return "is gone"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _check_address_free(host: str, port: int) -> None:
    """The workers bind with SO_REUSEPORT, which would let them share the port with another
    server of this user's (an old instance still running): make sure nobody listens there."""
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            with socket.socket(family, kind, proto) as probe:
                # As aiohttp binds: past connections in TIME_WAIT do not count, IPv6 alone.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run_worker(config: Config, index: int, supervisor_pid: int) -> int:
    """Worker `index` of a supervisor: the app on the shared port, without migrating, until
    SIGTERM (from the supervisor, or from the kernel when the supervisor dies)."""
    _die_with_supervisor(supervisor_pid)
    config = worker_config(config, index)
    app = create_app(config, migrate=False)
    freeze_after_startup(app)
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        print=None,
        access_log=None,
        reuse_port=True,
    )
    return 0


def _die_with_supervisor(supervisor_pid: int) -> None:
    # The signal follows the thread that forked us: the supervisor's main thread, which lives
    # as long as the supervisor (asyncio forks from the loop's thread).
    die_with_parent(supervisor_pid)
