"""One owner of a room's live state: a consultation aborted over REST ends its live room the
way `end_session` does (announced, everyone disconnected, the recording stopped and hashed,
the composite made); recording start and stop are decided and carried out under the room's
lock, so what the log and the room are told is what the recorder did; a disconnect while a
`join` is running does not leave a seat that never expires."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from media_client import MediaRoom
from media_peers import ColourCounterTrack, ToneTrack
from recording_server_helpers import recordings_of, sha256_of
from signaling_fixtures import (
    NS,
    SPECIALIST,
    VILLAGE,
    ServerFactory,
    SignalingServer,
    eventually,
    http_record,
)

from rooms.model import ConsultationId, ConsultationStatus, EventKind, RecordingState
from rooms.roles import Role
from server.app import COMPOSITES, RECORDINGS, ROOMS

pytest_plugins = ["signaling_fixtures", "media_client"]

MEDIA_WAIT = 60.0
SIZE = {"width": 160, "height": 120}


async def rest_post(server: SignalingServer, path: str, token: str, body: Any) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def recording_log(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(e["kind"], e["data"]) for e in record["events"] if e["kind"].startswith("recording_")]


# --- 1. aborting over REST goes through the live room ---------------------------------------


async def test_aborting_a_recorded_live_consultation_over_rest_ends_its_room(
    media_room: MediaRoom,
) -> None:
    server = media_room.server
    cid = (await server.scheduled()).id
    village = await media_room.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await media_room.admitted(token, cid, village.peer, label="resident")
    for client, (colour, tone) in (
        (village, ((220, 40, 40), 300.0)),
        (resident, ((40, 200, 40), 500.0)),
    ):
        ack = await client.publish(
            [(ColourCounterTrack(colour, **SIZE), "camera"), (ToneTrack(tone), "microphone")]
        )
        assert ack == {"ok": True}, ack
    await resident.peer.ok("consent", {"kind": "recording", "granted": True})
    await village.peer.ok("start_recording")

    async def open_segments() -> Any:
        rows = [r for r in await recordings_of(server.app, cid) if r[0].kind == "track"]
        return rows if len(rows) == 4 else None

    await eventually(open_segments, "a segment per published track", within=MEDIA_WAIT)

    status, body = await rest_post(
        server, f"/api/v1/consultations/{cid}/abort", server.token(VILLAGE), {"reason": "网络中断"}
    )
    assert status == 200, body
    assert body["status"] == "aborted"
    # Everyone in the room is told, with the reason, and disconnected.
    for peer in (village.peer, resident.peer):
        stopped = await peer.wait_for("recording_stopped")
        assert stopped["reason"] == "session_ended", stopped
        ended = await peer.wait_for("session_ended")
        assert ended["reason"] == "aborted", ended
        assert ended["detail"] == "网络中断", ended
        await eventually(lambda p=peer: not p.sio.connected, f"{peer.label} is disconnected")
    assert await server.presence(cid) is None
    await eventually(lambda: not media_room.hub.members(cid), "the room's media is gone")
    assert cid not in server.app[RECORDINGS].recording

    # Every segment closed and hashed; the files no longer grow.
    async def closed() -> Any:
        rows = [r for r in await recordings_of(server.app, cid) if r[0].kind == "track"]
        done = all(r.state != RecordingState.RECORDING.value for r, _ in rows)
        return rows if done else None

    rows = await eventually(closed, "every segment closed", within=MEDIA_WAIT)
    assert len(rows) == 4, rows
    for row, path in rows:
        assert row.state == RecordingState.COMPLETE.value, row
        assert path is not None, row
        assert (row.sha256, row.size_bytes) == sha256_of(server.app, path), row

    # The log: the stop before the end, and the end says why.
    record = await http_record(server, cid, server.token(VILLAGE))
    assert recording_log(record) == [
        ("recording_started", {}),
        ("recording_stopped", {"reason": "session_ended"}),
    ]
    assert record["events"][-1]["kind"] == "session_ended"
    assert record["events"][-1]["data"] == {"reason": "aborted: 网络中断"}
    assert record["sessions"][0]["end_reason"] == "aborted: 网络中断"

    # And the composite is made, as for a session ended in the room.
    await server.app[RECORDINGS].wait()  # the segments hashed, the render handed over
    await server.app[COMPOSITES].wait()
    composites = [r for r in await recordings_of(server.app, cid) if r[0].kind == "composite"]
    assert len(composites) == 1, composites
    assert composites[0][0].state == RecordingState.COMPLETE.value, composites


async def test_aborting_an_unrecorded_live_consultation_closes_the_room(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident, _ = await server.waiting(token, cid, label="resident")
    # Someone without the permission is refused and changes nothing.
    status, body = await rest_post(
        server, f"/api/v1/consultations/{cid}/abort", token, {"reason": "不想看了"}
    )
    assert status == 403, body
    assert await server.presence(cid) is not None
    assert village.sio.connected
    status, body = await rest_post(
        server, f"/api/v1/consultations/{cid}/abort", server.token(VILLAGE), {"reason": "停电"}
    )
    assert status == 200, body
    for peer in (village, resident):
        ended = await peer.wait_for("session_ended")
        assert (ended["reason"], ended["detail"]) == ("aborted", "停电")
        await eventually(lambda p=peer: not p.sio.connected, f"{peer.label} is disconnected")
    assert await server.status(cid) is ConsultationStatus.ABORTED
    assert await server.presence(cid) is None
    kinds = await server.event_kinds(cid)
    assert kinds[-1] == "session_ended"
    assert "recording_stopped" not in kinds


# --- 2. recording control has one owner per room --------------------------------------------


async def recording_room(server: SignalingServer) -> tuple[str, Any, Any]:
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    specialist = await server.seated(SPECIALIST, cid, label="specialist")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, label="resident")
    await resident.ok("consent", {"kind": "recording", "granted": True})
    return cid, village, specialist


async def test_quick_starts_and_stops_leave_the_recorder_as_the_log_says(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    cid, village, specialist = await recording_room(server)
    for _ in range(8):
        # From two connections at once: each decision and its carrying out are one step.
        await asyncio.gather(
            village.call("start_recording"),
            specialist.call("stop_recording"),
            village.call("stop_recording"),
            specialist.call("start_recording"),
        )
        events = [e for e in await server.events(cid) if e.kind.value.startswith("recording_")]
        on = bool(events) and events[-1].kind is EventKind.RECORDING_STARTED
        room = await server.presence(cid)
        assert room is not None
        assert (room.recording is not None) == on, events[-1]
        assert (ConsultationId(cid) in server.app[RECORDINGS].recording) == on, events[-1]
        # Started and stopped alternate.
        kinds = [e.kind for e in events]
        assert all(a is not b for a, b in itertools.pairwise(kinds)), kinds


class GatedReads:
    """The recorders' store with a gate before a read: a test holds a recorder's start there
    (test only; the store itself is real)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.gate = False

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[Any]:
        if self.gate:
            self.gate = False
            self.held.set()
            await self.release.wait()
        async with self._inner.reading() as tx:
            yield tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_a_stop_while_the_recorder_starts_waits_for_it(sig_server: SignalingServer) -> None:
    server = sig_server
    cid, village, specialist = await recording_room(server)
    recordings = server.app[RECORDINGS]
    gated = GatedReads(recordings._store)
    recordings._store = gated
    gated.gate = True
    start = asyncio.ensure_future(village.call("start_recording"))
    await gated.held.wait()
    stop = asyncio.ensure_future(specialist.call("stop_recording"))
    lock = server.app[ROOMS]._presence.lock(ConsultationId(cid))
    # The stop was decided while the recorder was starting, or it waits for the room.
    await eventually(
        lambda: stop.done() or getattr(lock, "_waiters", None), "the stop is decided or waits"
    )
    gated.release.set()
    assert (await start)["ok"] is True
    assert (await stop)["ok"] is True
    kinds = [e.kind for e in await server.events(cid) if e.kind.value.startswith("recording_")]
    assert kinds == [EventKind.RECORDING_STARTED, EventKind.RECORDING_STOPPED], kinds
    # Stopped, as the log says: no recorder left running.
    assert ConsultationId(cid) not in recordings.recording


async def test_a_start_that_fails_is_logged_and_announced_as_failed(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    cid, village, specialist = await recording_room(server)
    room = await server.presence(cid)
    assert room is not None
    # A file where the session's recordings directory must go: the recorder cannot start.
    blocker: Path = server.config.data_dir / "recordings" / room.session_id
    await asyncio.to_thread(blocker.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(blocker.write_bytes, b"")
    ack = await village.ok("start_recording")
    assert ack["result"]["recording"] is False, ack
    for peer in (village, specialist):
        failed = await peer.wait_for("recording_failed")
        assert failed["by"] == village.participant_id
        assert failed["reason"], failed
    assert "recording_started" not in [r.event for r in village.received]
    record = await http_record(server, cid, server.token(VILLAGE))
    [(kind, data)] = recording_log(record)
    assert kind == "recording_failed" and data["reason"], (kind, data)
    room = await server.presence(cid)
    assert room is not None and room.recording is None
    assert ConsultationId(cid) not in server.app[RECORDINGS].recording
    late = await server.seated(SPECIALIST, cid, device="tablet", label="late")
    assert late.snapshot["recording"] is None
    assert "recorder" not in [p["participant_id"] for p in late.snapshot["participants"]]
    # With the obstacle gone, a start works and is what it says.
    await asyncio.to_thread(blocker.unlink)
    ack = await village.ok("start_recording")
    assert ack.get("result", {}).get("recording", True) is True, ack
    await specialist.wait_for("recording_started")
    assert ConsultationId(cid) in server.app[RECORDINGS].recording


class GatedWrites(GatedReads):
    """The recorders' store with a gate before each write (the segment rows' closing)."""

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        if self.gate:
            self.held.set()
            await self.release.wait()
        async with self._inner.transaction() as tx:
            yield tx


async def test_session_ended_is_not_held_back_while_segments_are_hashed(
    media_room: MediaRoom,
) -> None:
    server = media_room.server
    cid = (await server.scheduled()).id
    village = await media_room.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await media_room.admitted(token, cid, village.peer, label="resident")
    ack = await village.publish([(ToneTrack(300.0), "microphone")])
    assert ack == {"ok": True}, ack
    await resident.peer.ok("consent", {"kind": "recording", "granted": True})
    await village.peer.ok("start_recording")

    async def open_segment() -> Any:
        rows = [r for r in await recordings_of(server.app, cid) if r[0].kind == "track"]
        return rows if rows else None

    await eventually(open_segment, "the segment is open", within=MEDIA_WAIT)
    recordings = server.app[RECORDINGS]
    gated = GatedWrites(recordings._store)
    recordings._store = gated
    gated.gate = True
    # Ended while the segment's closing cannot reach the record: everyone hears of it all
    # the same.
    await village.peer.ok("end_session")
    for peer in (village.peer, resident.peer):
        await peer.wait_for("session_ended")
    await gated.held.wait()
    [(row, _)] = await open_segment()
    assert row.state == RecordingState.RECORDING.value, row
    gated.gate = False
    gated.release.set()

    async def closed() -> Any:
        rows = [r for r in await recordings_of(server.app, cid) if r[0].kind == "track"]
        return rows if all(r.state == RecordingState.COMPLETE.value for r, _ in rows) else None

    [(row, path)] = await eventually(closed, "the segment is closed", within=MEDIA_WAIT)
    assert path is not None and row.sha256 == sha256_of(server.app, path)[0]


# --- 3. a disconnect while `join` runs --------------------------------------------------------


class GatedPresence:
    """The app's presence store with a gate before a seat is stored: a test holds `join`
    there while the client disconnects (test only; the store itself is real)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.gate = False

    async def put_participant(self, consultation_id: Any, participant: Any) -> None:
        if self.gate:
            self.gate = False
            self.held.set()
            await self.release.wait()
        await self._inner.put_participant(consultation_id, participant)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_a_disconnect_during_join_leaves_no_seat_behind(
    start_sig_server: ServerFactory,
) -> None:
    server = await start_sig_server(reconnect_grace_s=0.3, empty_room_grace_s=0.3)
    rooms = server.app[ROOMS]
    gated = GatedPresence(rooms._presence)
    rooms._presence = gated
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    county = await server.connect(SPECIALIST, label="specialist")
    gated.gate = True
    join = asyncio.ensure_future(county.sio.call("join", {"consultation_id": cid}, namespace=NS))
    await gated.held.wait()
    connections = server.namespace.connection_count
    await county.sio.disconnect()
    await eventually(
        lambda: server.namespace.connection_count < connections, "the server saw the disconnect"
    )
    gated.release.set()
    join.cancel()

    # The seat the join took is a dropped connection's: it expires like any other.
    async def specialist_left() -> bool:
        room = await server.presence(cid)
        return room is not None and all(
            p.user_id != SPECIALIST.user_id for p in room.participants.values()
        )

    await eventually(specialist_left, "the dead connection's seat expires")
    left = await server.wait_for_event(cid, EventKind.LEFT, lambda e: e.actor == SPECIALIST.user_id)
    assert left.data["reason"] == "network_lost", left
    # Once the last clinician goes, the room can end.
    await village.ok("leave")
    await server.wait_for_event(cid, EventKind.SESSION_ENDED)


# --- 4. timer tasks' failures -----------------------------------------------------------------


async def test_a_failing_timer_is_logged(
    start_sig_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_sig_server(reconnect_grace_s=0.1)
    cid = (await server.scheduled()).id
    await server.seated(VILLAGE, cid, label="village")
    county = await server.seated(SPECIALIST, cid, label="specialist")
    rooms = server.app[ROOMS]

    async def broken_expire(*_: Any) -> Any:
        raise RuntimeError("the expiry broke")

    rooms.expire = broken_expire  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR)
    await county.sio.disconnect()

    def logged() -> list[logging.LogRecord]:
        # Logged by the server when the task ends, not by asyncio if it is ever collected.
        return [
            r
            for r in caplog.records
            if r.name != "asyncio" and r.exc_info and "the expiry broke" in str(r.exc_info[1])
        ]

    await eventually(logged, "the timer's failure is logged")
    await asyncio.sleep(0)
    assert len(logged()) == 1
