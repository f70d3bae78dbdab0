"""Crash recovery of recordings, at the store: what the record says was being recorded when
the server died is closed, and its session ended as aborted."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_store import add_with_session

from media.hub import MediaHub
from media.peer import PeerConfig
from media.sealed import SealKeys
from rooms.live import InMemoryPresence
from rooms.model import ConsultationId, EventKind, SessionId
from server.db.migrate import upgrade
from server.db.store import SqlRecordStore
from server.recording import SessionRecordings


async def _nothing(*_: Any) -> None:
    return None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlRecordStore]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'telemed.db'}"
    await upgrade(url)
    started = SqlRecordStore(url)
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


async def test_recording_on_without_any_segment_yet_is_recovered(
    store: SqlRecordStore, tmp_path: Path
) -> None:
    await add_with_session(store, cid="c1", sid="s1")  # recording, no frame had arrived yet
    await add_with_session(store, cid="c2", sid="s2")  # recorded earlier, then stopped
    await add_with_session(store, cid="c3", sid="s3")  # never recorded
    now = datetime.now(UTC)
    async with store.transaction() as tx:
        await tx.append_event(SessionId("s1"), now, EventKind.RECORDING_STARTED, None, None, {})
        await tx.append_event(SessionId("s2"), now, EventKind.RECORDING_STARTED, None, None, {})
        await tx.append_event(
            SessionId("s2"), now, EventKind.RECORDING_STOPPED, None, None, {"reason": "stopped"}
        )
    hub = MediaHub(PeerConfig(), _nothing, _nothing)
    recordings = SessionRecordings(
        store, hub, InMemoryPresence(), tmp_path, SealKeys(os.urandom(32))
    )
    ended: list[tuple[str, str]] = []

    async def end_session(consultation_id: ConsultationId, session_id: SessionId) -> None:
        ended.append((consultation_id, session_id))

    assert await recordings.recover(end_session) == [("c1", "s1")]
    assert ended == [("c1", "s1")]
    async with store.reading() as tx:
        stops = await tx.list_session_events(SessionId("s1"), EventKind.RECORDING_STOPPED, 5)
        untouched = await tx.list_session_events(SessionId("s3"), EventKind.RECORDING_STOPPED, 5)
    assert [e.data for e in stops] == [{"reason": "interrupted"}]
    assert untouched == []
    await hub.stop()
