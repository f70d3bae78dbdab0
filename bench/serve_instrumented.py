"""`telemed serve` with timers around the signaling hot path, for finding where time goes.

    python bench/serve_instrumented.py --stats-out stats.json [--sqlite-pool N] -- \
        --config cfg.toml serve --port 8081

Runs the project's own CLI (`server.cli.main`) in this process after wrapping, without
changing behaviour:

- `SqlRecordStore.transaction`, per calling function: `wait` (pool checkout + BEGIN — on
  SQLite the BEGIN IMMEDIATE that queues for the write lock), `body`, `commit`;
- `ConsultNamespace._on_connect`, `LiveRoomService.join` / `.chat`, `ConsultNamespace._apply`
  (the socket.io emits of an outcome) and the whole `_dispatch` of each event;
- the Redis presence lock's acquire (two nodes);
- the server event loop's lag (a 5 ms timer's overshoot);
- the garbage collector's pauses, per generation.

Each SIGUSR1 starts the next phase (the benchmark sends one before the joins, at the start and
at the end of the measured chat window); on exit the per-phase summaries go to --stats-out.

`--sqlite-pool N` is an experiment, not a server option: it opens SQLite engines with a pool
of N connections and no overflow (the server's default is SQLAlchemy's 5 + 10 overflow).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import signal
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

_BENCH_DIR = Path(__file__).resolve().parent
_ROOT = _BENCH_DIR.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.common import summarize  # noqa: E402

PHASES = ("setup", "join", "chat", "after")


class Timers:
    def __init__(self) -> None:
        self.phase = 0
        self.samples: list[dict[str, list[float]]] = [defaultdict(list) for _ in PHASES]

    def add(self, name: str, seconds: float) -> None:
        self.samples[min(self.phase, len(PHASES) - 1)][name].append(seconds * 1000.0)

    def next_phase(self) -> None:
        self.phase += 1

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for name, samples in zip(PHASES, self.samples, strict=True):
            out[name] = {
                key: summarize(values) | {"total_ms": sum(values)}
                for key, values in sorted(samples.items())
            }
        return out


TIMERS = Timers()


def _timed_coroutine(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            TIMERS.add(name, time.perf_counter() - started)

    wrapper.__name__ = getattr(fn, "__name__", name)
    wrapper.__qualname__ = getattr(fn, "__qualname__", name)
    return wrapper


def install(sqlite_pool: int | None) -> None:
    import redis.asyncio.lock

    import server.app
    import server.db.engine
    import server.db.store
    from rooms.room_service import LiveRoomService
    from server.db.store import SqlRecordStore
    from signaling.namespace import ConsultNamespace

    original_tx = SqlRecordStore.transaction

    def transaction(self: SqlRecordStore) -> contextlib.AbstractAsyncContextManager[Any]:
        caller = sys._getframe(1).f_code.co_name

        @contextlib.asynccontextmanager
        async def timed() -> AsyncIterator[Any]:
            started = time.perf_counter()
            manager = original_tx(self)
            repository = await manager.__aenter__()
            entered = time.perf_counter()
            TIMERS.add(f"tx {caller}: wait", entered - started)
            try:
                yield repository
            except BaseException:
                if not await manager.__aexit__(*sys.exc_info()):
                    raise
            else:
                body_done = time.perf_counter()
                TIMERS.add(f"tx {caller}: body", body_done - entered)
                await manager.__aexit__(None, None, None)
                TIMERS.add(f"tx {caller}: commit", time.perf_counter() - body_done)
            TIMERS.add(f"tx {caller}: total", time.perf_counter() - started)

        return timed()

    SqlRecordStore.transaction = transaction  # type: ignore[method-assign,assignment]
    ConsultNamespace._on_connect = _timed_coroutine("ns connect", ConsultNamespace._on_connect)  # type: ignore[method-assign]
    ConsultNamespace._apply = _timed_coroutine("ns apply (emits)", ConsultNamespace._apply)  # type: ignore[method-assign]
    LiveRoomService.join = _timed_coroutine("room join", LiveRoomService.join)  # type: ignore[method-assign]
    LiveRoomService.chat = _timed_coroutine("room chat", LiveRoomService.chat)  # type: ignore[method-assign]

    original_dispatch = ConsultNamespace._dispatch

    async def dispatch(self: ConsultNamespace, *args: Any) -> Any:
        # (sid, [conn,] event, data): the event is the first string after the sid.
        event = next((a for a in args[1:] if isinstance(a, str)), "?")
        started = time.perf_counter()
        try:
            return await original_dispatch(self, *args)
        finally:
            TIMERS.add(f"dispatch {event[:20]}", time.perf_counter() - started)

    ConsultNamespace._dispatch = dispatch  # type: ignore[method-assign]

    redis.asyncio.lock.Lock.acquire = _timed_coroutine(  # type: ignore[method-assign]
        "redis presence lock acquire", redis.asyncio.lock.Lock.acquire
    )

    if sqlite_pool is not None:
        original_make = server.db.engine.make_engine

        def make_engine(database_url: str, **kwargs: Any) -> Any:
            if not database_url.startswith("sqlite"):
                return original_make(database_url, **kwargs)
            from sqlalchemy import event
            from sqlalchemy.ext.asyncio import create_async_engine

            engine = create_async_engine(
                database_url,
                connect_args=dict(kwargs.get("connect_args") or {}),
                pool_size=sqlite_pool,
                max_overflow=0,
            )
            event.listen(engine.sync_engine, "connect", server.db.engine._sqlite_connect)
            event.listen(engine.sync_engine, "begin", server.db.engine._sqlite_begin)
            return engine

        server.db.engine.make_engine = make_engine
        server.db.store.make_engine = make_engine  # type: ignore[attr-defined]

    original_create_app = server.app.create_app

    def create_app(config: Any) -> Any:
        app = original_create_app(config)

        async def lag_and_signals(_: Any) -> AsyncIterator[None]:
            _time_gc()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR1, TIMERS.next_phase)
            task = asyncio.create_task(_watch_lag())
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        app.cleanup_ctx.append(lag_and_signals)
        return app

    server.app.create_app = create_app
    import server.cli

    server.cli.create_app = create_app  # type: ignore[attr-defined]


def _time_gc() -> None:
    started: list[float] = []

    def pause(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            TIMERS.add(f"gc generation {info['generation']}", time.perf_counter() - started[0])

    gc.callbacks.append(pause)


async def _watch_lag() -> None:
    tick = 0.005
    while True:
        before = time.perf_counter()
        await asyncio.sleep(tick)
        TIMERS.add("event loop lag", max(0.0, time.perf_counter() - before - tick))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--stats-out", type=Path, required=True)
    parser.add_argument("--sqlite-pool", type=int)
    parser.add_argument("telemed_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    telemed_args = [a for a in args.telemed_args if a != "--"]
    install(args.sqlite_pool)
    from server.cli import main as telemed_main

    try:
        return telemed_main(telemed_args)
    finally:
        args.stats_out.write_text(json.dumps(_clean(TIMERS.summary()), indent=1) + "\n")


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if value != value else round(value, 3)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    sys.exit(main())
