"""The `telemed` command: serve, db upgrade, token, render, retention run, verify."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from media.internals import AiortcInternalsChanged, check_internals
from rooms.model import ConsultationId, SessionId, UserId
from rooms.roles import Role
from server.app import CONFIG as CONFIG_KEY
from server.app import SERVICE, TOKENS, create_app
from server.auth import SigningKeyMissing, TokenService
from server.composites import Composites
from server.config import Config, ConfigError, load_config
from server.db.migrate import upgrade
from server.db.store import SqlRecordStore
from server.demo import describe, ensure_demo
from server.logs import configure_logging
from server.memory import freeze_after_startup
from server.recording_keys import load_recording_keys
from server.retention import RetentionError, RetentionReport, run_retention
from server.signing import load_opinion_keys
from server.supervisor import check_workers, create_supervisor, default_workers, run_worker
from server.verify import VerifyReport, verify_consultation

log = logging.getLogger("telemed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for name in ("host", "port"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "dev", False):
        overrides["dev"] = True
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"telemed: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    try:
        result: int = args.run(config, args)
    except ConfigError as exc:
        print(f"telemed: {exc}", file=sys.stderr)
        return 2
    except AiortcInternalsChanged as exc:
        print(f"telemed: refusing to start: {exc}", file=sys.stderr)
        return 2
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telemed", description="Telemedicine consultation server")
    parser.add_argument("--config", type=Path, help="TOML config file (also TELEMED_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--dev", action="store_true", help="development mode: demo data and tokens")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--workers",
        type=_worker_count,
        help="worker processes sharing the port (default: the number of cores with "
        "TELEMED_REDIS_URL, else 1)",
    )
    # What the supervisor of --workers N starts each worker with (server/supervisor.py).
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply migrations").set_defaults(run=_db_upgrade)

    token = commands.add_parser("token", help="print an access token (demos and tests)")
    token.add_argument("--user", required=True)
    token.add_argument("--name", required=True)
    token.add_argument("--role", required=True, choices=[r.value for r in Role])
    token.add_argument("--org", default="")
    token.add_argument("--consultation", help="scope the token to one consultation")
    token.add_argument("--ttl", type=_positive_int, help="lifetime in seconds")
    token.set_defaults(run=_token)

    render = commands.add_parser(
        "render", help="(re)make the composite recording of a consultation's sessions"
    )
    render.add_argument("consultation", help="consultation id")
    render.add_argument("--session", help="only this session (default: every recorded one)")
    render.set_defaults(run=_render)

    retention = commands.add_parser("retention", help="retention of records, recordings, logs")
    retention_commands = retention.add_subparsers(dest="retention_command", required=True)
    run = retention_commands.add_parser(
        "run", help="destroy what has expired and is not on legal hold, and log each destruction"
    )
    run.add_argument("--dry-run", action="store_true", help="report only; change nothing")
    run.add_argument(
        "--now", type=_aware_time, help="count periods back from this ISO time (default: now)"
    )
    run.set_defaults(run=_retention_run)

    verify = commands.add_parser(
        "verify",
        help="check a consultation's record: event and audit chains, opinion signatures, "
        "recording files (exit 0 all match, 1 a mismatch, 2 no such consultation)",
    )
    verify.add_argument("consultation", help="consultation id")
    verify.add_argument("--json", action="store_true", help="the report as JSON")
    verify.set_defaults(run=_verify)
    return parser


def _serve(config: Config, args: argparse.Namespace) -> int:
    config.check_safe_to_serve()
    if args.worker_index is not None:
        if args.supervisor_pid is None:
            raise ConfigError("--worker-index needs --supervisor-pid")
        return run_worker(config, args.worker_index, args.supervisor_pid)
    workers: int = default_workers(config) if args.workers is None else args.workers
    check_workers(config, workers)
    if workers > 1:
        # Here once, as create_app does in each worker: else every worker would fail at start
        # and be started again, forever.
        check_internals()
        supervisor = create_supervisor(config, workers, _worker_argv(args))
        _print_listening(config)
        return supervisor.run()
    app = create_app(config)
    if config.dev:
        app.cleanup_ctx.append(_print_demo)
    freeze_after_startup(app)
    _print_listening(config)
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None)
    return 0


def _print_listening(config: Config) -> None:
    listen = f"http://{config.host}:{config.port}"
    print(f"telemed listening on {listen} (public URL {config.effective_public_url})", flush=True)
    print(f"database: {_redact(config.effective_database_url)}", flush=True)


def _worker_argv(args: argparse.Namespace) -> Callable[[int], list[str]]:
    """This command line for worker i: a clean interpreter, the same config and overrides."""
    common = [sys.executable, "-m", "server.cli"]
    if args.config is not None:
        common += ["--config", str(args.config)]
    common.append("serve")
    if args.dev:
        common.append("--dev")
    if args.host is not None:
        common += ["--host", args.host]
    if args.port is not None:
        common += ["--port", str(args.port)]
    supervisor = ["--supervisor-pid", str(os.getpid())]
    return lambda index: [*common, "--worker-index", str(index), *supervisor]


async def _print_demo(app: web.Application) -> AsyncIterator[None]:
    setup = await ensure_demo(app[SERVICE], app[TOKENS])
    print(describe(setup, app[CONFIG_KEY].effective_public_url), flush=True)
    yield


def _db_upgrade(config: Config, _: argparse.Namespace) -> int:
    asyncio.run(upgrade(config.effective_database_url))
    print(f"database at head: {_redact(config.effective_database_url)}")
    return 0


def _token(config: Config, args: argparse.Namespace) -> int:
    try:
        token = TokenService(config.jwt).mint(
            user_id=UserId(args.user),
            name=args.name,
            role=Role(args.role),
            org=args.org,
            consultation=ConsultationId(args.consultation) if args.consultation else None,
            ttl_s=args.ttl,
        )
    except (SigningKeyMissing, ValueError) as exc:
        print(f"telemed: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _render(config: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_render_sessions(config, ConsultationId(args.consultation), args.session))


async def _render_sessions(
    config: Config, consultation_id: ConsultationId, only: str | None
) -> int:
    await upgrade(config.effective_database_url)
    store = SqlRecordStore(config.effective_database_url)
    await store.start()
    try:
        async with store.reading() as tx:
            sessions = [s.id for s in await tx.list_sessions(consultation_id)]
        if only is not None:
            if only not in sessions:
                print(f"telemed: no session {only} in {consultation_id}", file=sys.stderr)
                return 2
            sessions = [SessionId(only)]
        composites = Composites(
            store, config.data_dir, load_recording_keys(config), node=config.effective_node_id
        )
        made = 0
        for session_id in sessions:
            print(f"session {session_id}", file=sys.stderr)
            done = await composites.render(consultation_id, session_id, _progress_bar)
            print(file=sys.stderr)
            if done is None:
                print(f"  nothing recorded in {session_id}", file=sys.stderr)
                continue
            made += 1
            print(f"  {done.state}: {done.id} ({done.duration_s} s, sha256 {done.sha256})")
            if done.state != "complete":
                return 1
        return 0 if made or only is None else 1
    finally:
        await store.stop()


def _progress_bar(fraction: float) -> None:
    filled = int(fraction * 30)
    print(f"\r  [{'#' * filled}{'-' * (30 - filled)}] {fraction:4.0%}", end="", file=sys.stderr)


def _retention_run(config: Config, args: argparse.Namespace) -> int:
    now: datetime = args.now or datetime.now(UTC)
    try:
        report = asyncio.run(_retention(config, now, args.dry_run))
    except RetentionError as exc:
        print(f"telemed: {exc}", file=sys.stderr)
        return 1
    verb = "would destroy" if report.dry_run else "destroyed"
    for name, cutoff in report.cutoffs.items():
        print(f"{name}: expired if before {cutoff.isoformat()}")
    for destruction in report.destroyed:
        print(f"{verb} {destruction.describe()}")
    print(f"{len(report.destroyed)} {'to destroy' if report.dry_run else 'destroyed'}")
    return 0


async def _retention(config: Config, now: datetime, dry_run: bool) -> RetentionReport:
    await upgrade(config.effective_database_url)
    store = SqlRecordStore(config.effective_database_url)
    await store.start()
    try:
        return await run_retention(
            store, config.retention.periods, config.data_dir, now, dry_run=dry_run
        )
    finally:
        await store.stop()


def _verify(config: Config, args: argparse.Namespace) -> int:
    if config.signing.key_file is None and not config.dev:
        # A key made for this run would find every signature "unknown_key".
        raise ConfigError("set TELEMED_SIGNING_KEY_FILE (the server's) to verify signatures")
    report = asyncio.run(_verify_record(config, ConsultationId(args.consultation)))
    if report is None:
        print(f"telemed: no consultation {args.consultation}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_json(), ensure_ascii=False, indent=2))
    else:
        checked = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in report.checked.items())
        print(f"consultation {report.consultation_id}: checked {checked}")
        for m in report.mismatches:
            print(f"MISMATCH {m.check} {m.where}: {m.problem}")
            if m.expected is not None or m.found is not None:
                print(f"  expected: {m.expected}\n  found:    {m.found}")
        for note in report.notes:
            print(f"note: {note}")
        print("all match" if report.ok else f"{len(report.mismatches)} mismatches")
    return 0 if report.ok else 1


async def _verify_record(config: Config, consultation_id: ConsultationId) -> VerifyReport | None:
    await upgrade(config.effective_database_url)
    store = SqlRecordStore(config.effective_database_url)
    await store.start()
    try:
        signer = load_opinion_keys(config.signing, dev=config.dev)
        keys = load_recording_keys(config)
        return await verify_consultation(store, signer, config.data_dir, keys, consultation_id)
    finally:
        await store.stop()


def _aware_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone (e.g. {text}+08:00 or {text}Z)")
    return value


def _worker_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value}")
    return value


def _redact(url: str) -> str:
    """Database URLs may carry a password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


if __name__ == "__main__":  # how the supervisor starts its workers
    sys.exit(main())
