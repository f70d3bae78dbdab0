"""The garbage collector on a long-running server: what start-up made is kept out of its
full collections.

A full collection scans every tracked object, and its pause grows with them: ~300 ms with
1,000 connections on one worker (BENCHMARKS.md), long enough to hold every chat message in
flight. The modules, tables, models and the app itself live as long as the process, so once
the server has started they are frozen (gc.freeze): collections skip them from then on."""

from __future__ import annotations

import gc

from aiohttp import web


def freeze_after_startup(app: web.Application) -> None:
    """For a server process (not a test making many apps: what it freezes is never freed)."""
    app.on_startup.append(_freeze)


async def _freeze(_app: web.Application) -> None:
    gc.collect()
    gc.freeze()
