"""PostgreSQL lost in the middle of a consultation, and back: while it is away every action
that must be recorded is refused with `unavailable` (503 with Retry-After over REST), nothing
is announced that the record does not hold, media goes on; once it is back the same room
carries on and the record has every event before and after, none of what was refused.

A private cluster (tests/pg_cluster.py) is stopped "immediate", as a crashed machine would."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from media_client import MediaRoom
from media_peers import ColourCounterTrack, ToneTrack
from pg_cluster import PostgresCluster
from signaling_fixtures import COUNTY, VILLAGE, eventually

from rooms.model import EventKind
from server.db.migrate import upgrade

pytest_plugins = ["pg_cluster"]

MEDIA_WAIT = 20.0


async def get(url: str, token: str) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        return r.status, dict(r.headers), await r.json(content_type=None)


async def test_postgres_restarted_mid_session_refuses_clearly_and_loses_nothing(
    postgres_cluster: PostgresCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await upgrade(postgres_cluster.url)
    room = await MediaRoom.start(tmp_path, database_url=postgres_cluster.url)
    try:
        server = room.server
        cid = (await server.scheduled()).id
        village = await room.seated(VILLAGE, cid, label="village")
        county = await room.seated(COUNTY, cid, label="county")
        camera = ColourCounterTrack((200, 40, 40), width=160, height=120)
        ack = await village.publish([(camera, "camera"), (ToneTrack(440.0), "microphone")])
        assert ack == {"ok": True}, ack
        pid = village.peer.participant_id
        await eventually(lambda: county.offered_from(pid, "video"), "the camera offered")
        (video,) = county.offered_from(pid, "video")
        await eventually(lambda: county.frames_of(video) >= 20, "county sees the camera")
        await village.peer.ok("chat", {"text": "before"})
        before = [(e.seq, e.kind, e.data) for e in (await server.record(cid)).events]
        record_url = f"{server.url}/api/v1/consultations/{cid}/record"

        caplog.clear()
        postgres_cluster.stop()

        # Signaling: what must be recorded first is refused, and said why.
        error = await village.peer.refused("chat", {"text": "while away"})
        assert error["code"] == "unavailable", error
        assert "try again" in error["message"]
        # REST: 503, the same code, and when to come back.
        status, headers, body = await get(record_url, server.token(VILLAGE))
        assert status == 503, body
        assert body["code"] == "unavailable"
        assert headers.get("Retry-After") == "2"
        # A new connection is refused with the reason (its token's revocation is unchecked).
        late = server.peer("late")
        with pytest.raises(socketio.exceptions.ConnectionError):
            await late.connect({"token": server.token(VILLAGE)})
        assert late.connect_errors == [
            {"message": "the record store is unavailable; try again shortly"}
        ]
        # Media does not need the database: the camera still arrives.
        seen = county.frames_of(video)
        await eventually(lambda: county.frames_of(video) >= seen + 30, "frames while away")
        # Nobody was told of the refused chat.
        assert all(c["text"] != "while away" for c in county.peer.events("chat"))

        postgres_cluster.start()

        async def chat_again() -> bool:
            ack = await village.peer.call("chat", {"text": "after"})
            return isinstance(ack, dict) and ack.get("ok") is True

        await eventually(chat_again, "chat once the database is back", within=MEDIA_WAIT)
        status, _, body = await get(record_url, server.token(VILLAGE))
        assert status == 200, body

        # The record: every event before, unchanged, then what came after; none refused.
        # (seq is a PostgreSQL sequence: a crash skips the values it had cached, so it is
        # increasing, not contiguous.)
        record = await server.record(cid)
        (session,) = record.sessions
        assert session.ended_at is None
        events = record.events
        assert [(e.seq, e.kind, e.data) for e in events[: len(before)]] == before
        assert [e.seq for e in events] == sorted({e.seq for e in events})
        chats = [e.data["text"] for e in events if e.kind == EventKind.CHAT]
        assert chats == ["before", "after"], chats
        joined = [e.participant_id for e in events if e.kind == EventKind.JOINED]
        assert village.peer.participant_id in joined and county.peer.participant_id in joined
        presence = await server.presence(cid)
        assert presence is not None
        assert {village.peer.participant_id, county.peer.participant_id} <= set(
            presence.participants
        )
        # The room goes on to a proper end.
        await village.peer.ok("end_session")
        ended = await server.record(cid)
        assert ended.sessions[0].ended_at is not None
        assert ended.sessions[0].end_reason == "ended", ended.sessions[0]

        # The outage was logged as such, without a traceback.
        assert not [r for r in caplog.records if r.exc_info], [
            r.getMessage() for r in caplog.records if r.exc_info
        ]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
            r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
        ]
        assert any("database is unavailable" in r.getMessage() for r in caplog.records)
    finally:
        await room.close()
