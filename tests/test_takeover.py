"""Taking over after a dead worker, behind one Redis and one database: the room's new owner
takes the room over (its seats kept for the reconnect grace, a recording going on as new
segments), and one live worker, under a lease, closes what the dead one was writing and ends
the rooms nobody took within the empty-room grace. Real aiohttp apps on ephemeral ports with
real media clients, a private redis-server, one SQLite file; the dead worker is a placement
whose heartbeat stops, with the rows and files its recorder would have left."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from media_client import MediaClient, media_config
from media_peers import ToneTrack
from recording_server_helpers import recordings_of, sha256_of
from signaling_fixtures import (
    SPECIALIST,
    VILLAGE,
    SignalingServer,
    eventually,
    start_signaling_server,
)
from test_nodes import live_session, open_segment, row_of

from rooms.live import RecordingOn
from rooms.model import (
    ConsultationId,
    ConsultationStatus,
    EventKind,
    ParticipantId,
    Recording,
    RecordingKind,
    RecordingState,
)
from server.app import CONFIG, PLACEMENT, RECORDINGS, ROOMS
from server.config import Config
from server.placement import RedisPlacement, WorkerLoad
from server.takeover import TAKEOVER

pytest_plugins = ["signaling_fixtures", "redis_fixtures"]

WAIT = 60.0
# The empty-room grace of these tests' workers: long enough for the test to place a room
# again right after its worker died, short enough to wait for.
GRACE_S = 3.0

Start = Callable[[str], Awaitable[SignalingServer]]


@contextlib.asynccontextmanager
async def workers(tmp_path: Path, redis_url: str, database_url: str) -> AsyncIterator[Start]:
    """Starts workers (node `node_id`) with media on loopback, on the shared database, data
    directory and Redis; every worker is stopped afterwards."""
    running: list[SignalingServer] = []

    async def start(node_id: str) -> SignalingServer:
        config = media_config(
            tmp_path,
            redis_url=redis_url,
            node_id=node_id,
            database_url=database_url,
            **{"signaling.empty_room_grace_s": GRACE_S},
        )
        server = await start_signaling_server(config)
        running.append(server)
        return server

    try:
        yield start
    finally:
        for server in running:
            await server.close()


@pytest.fixture
async def start_worker(tmp_path: Path, redis_url: str) -> AsyncIterator[Start]:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'telemed.db'}"
    async with workers(tmp_path, redis_url, database_url) as start:
        yield start


@pytest.fixture
async def start_backend_worker(
    tmp_path: Path, redis_url: str, backend_config: Config
) -> AsyncIterator[Start]:
    """As start_worker, on SQLite and on PostgreSQL (TELEMED_TEST_POSTGRES_URL)."""
    async with workers(tmp_path, redis_url, backend_config.effective_database_url) as start:
        yield start


@pytest.fixture
async def dead_worker(redis_url: str) -> AsyncIterator[RedisPlacement]:
    """A worker registered in the placement, to be killed by the test (its heartbeat stopped,
    as by kill -9: its key lapses by itself)."""
    placement = RedisPlacement(redis_url, "node-c", WorkerLoad, heartbeat_s=0.1, ttl_s=0.5)
    await placement.start()
    yield placement
    await placement.stop()


def kill(worker: RedisPlacement) -> None:
    assert worker._beat is not None
    worker._beat.cancel()


async def until_dead(observer: RedisPlacement, worker: str) -> None:
    await eventually(lambda: _dead(observer, worker), f"{worker}'s heartbeat lapses", within=WAIT)


async def _dead(observer: RedisPlacement, worker: str) -> bool:
    return worker not in await observer.alive({worker})


async def seats_of_a_dead_worker(server: SignalingServer, cid: str) -> dict[str, ParticipantId]:
    """Two seats the dead worker's connections held, still shown connected in presence (its
    clients never said goodbye)."""
    rooms = server.app[ROOMS]
    seats: dict[str, ParticipantId] = {}
    for who, conn in ((VILLAGE, "dead-conn-1"), (SPECIALIST, "dead-conn-2")):
        await rooms.join(conn, who.actor(), ConsultationId(cid), "default")
        room = await server.presence(cid)
        assert room is not None
        seat = room.by_connection(conn)
        assert seat is not None and seat.disconnected_at is None
        seats[who.user_id] = seat.participant_id
    return seats


async def recording_was_on(server: SignalingServer, cid: str, by: ParticipantId) -> None:
    """Presence as the dead worker's recorder left it: recording (the log says so too: the
    open segment's helper wrote `recording_started`)."""
    on = RecordingOn(by, datetime.now(UTC))
    await server.app[ROOMS]._presence.set_recording(ConsultationId(cid), on)


async def place_on(worker: RedisPlacement, cid: str, others: list[RedisPlacement]) -> None:
    """Places the room on `worker`: placement draws two live workers and takes the one with
    fewer rooms, so the others are given a room each first (rooms that land on `worker` are
    released), and a room that lands elsewhere is released and placed again."""
    by_id = {w.worker_id: w for w in [worker, *others]}
    # Asked of a worker with the usual heartbeat (`worker`'s short TTL would see it alone).
    asker = others[0]
    fillers = 0
    while True:
        counts = {w.worker_id: len(await w.rooms_of(w.worker_id)) for w in others}
        if min(counts.values()) > len(await worker.rooms_of(worker.worker_id)):
            break
        fillers += 1
        assert fillers < 200, counts
        filler = ConsultationId(f"filler-{fillers}")
        if (await asker.owner_of(filler)).owner == worker.worker_id:
            await worker.release(filler)
    for _ in range(200):
        placed = await asker.owner_of(ConsultationId(cid))
        if placed.owner == worker.worker_id:
            return
        await by_id[placed.owner].release(ConsultationId(cid))
    raise AssertionError(f"{cid} never landed on {worker.worker_id}")


# --- the new owner takes the room over -----------------------------------------------------


async def test_the_new_owner_keeps_the_seats_and_records_on_as_a_new_segment(
    start_worker: Start,
) -> None:
    b = await start_worker("node-b")
    cid = (await b.scheduled()).id
    seats = await seats_of_a_dead_worker(b, cid)
    session_id = (await b.presence(cid) or pytest.fail("no room")).session_id
    # The dead worker was recording: its segment is open in the record, its file written.
    old = await open_segment(b, session_id, "node-a#0dead0ff")
    await recording_was_on(b, cid, seats[VILLAGE.user_id])
    kinds_before = await b.event_kinds(cid)
    old_row = await row_of(b, old)

    # What the namespace does before the first join of the room on this worker.
    await b.namespace._take_over_once(ConsultationId(cid))

    room = await b.presence(cid)
    assert room is not None and room.recording is not None
    for participant in seats.values():
        assert room.participants[participant].disconnected_at is not None
    # The recorder runs here now; the log's start stands, the old segment is left as it was.
    assert ConsultationId(cid) in b.app[RECORDINGS].recording
    assert await b.event_kinds(cid) == kinds_before
    assert await row_of(b, old) == old_row

    # The village doctor's browser reconnects by itself, the same device: the same seat.
    village = await b.connect(VILLAGE, label="village")
    media = MediaClient(village)
    try:
        await village.join(cid, "default")
        joined = await village.wait_for("joined")
        assert joined["you"]["participant_id"] == seats[VILLAGE.user_id]
        assert joined["recording"] is not None
        ack = await media.publish([(ToneTrack(440.0), "microphone")])
        assert ack == {"ok": True}, ack

        async def new_segment() -> tuple[Recording, Path | None] | None:
            rows = await recordings_of(b.app, cid)
            fresh = [(r, p) for r, p in rows if r.kind == RecordingKind.TRACK.value and r.id != old]
            return fresh[0] if fresh else None

        row, path = await eventually(new_segment, "a new segment is recorded", within=WAIT)
        assert row.session_id == session_id
        assert row.participant_id == seats[VILLAGE.user_id]
        assert row.node == b.app[PLACEMENT].worker_id
        old_path = b.app[CONFIG].data_dir / f"recordings/{session_id}/{old}.webm"
        assert path is not None and path != old_path and path.parent == old_path.parent
    finally:
        await media.close()
    await b.app[RECORDINGS].stop(ConsultationId(cid))
    await b.app[RECORDINGS].wait()
    closed = await row_of(b, row.id)
    assert closed.state == RecordingState.COMPLETE.value
    assert (closed.sha256, closed.size_bytes) == sha256_of(b.app, path)
    assert await row_of(b, old) == old_row


async def test_a_room_not_recorded_is_taken_over_without_a_recorder(start_worker: Start) -> None:
    b = await start_worker("node-b")
    cid = (await b.scheduled()).id
    seats = await seats_of_a_dead_worker(b, cid)
    kinds_before = await b.event_kinds(cid)

    _, dropped = await b.app[ROOMS].take_over(ConsultationId(cid))

    assert sorted(p for p, _ in dropped) == sorted(seats.values())
    assert b.app[RECORDINGS].recording == []
    assert await b.event_kinds(cid) == kinds_before
    # Taken over already: a second call finds no seat still connected.
    assert (await b.app[ROOMS].take_over(ConsultationId(cid)))[1] == []


async def test_a_recorder_that_cannot_start_again_stops_the_recording_as_interrupted(
    start_worker: Start,
) -> None:
    b = await start_worker("node-b")
    cid = (await b.scheduled()).id
    seats = await seats_of_a_dead_worker(b, cid)
    await recording_was_on(b, cid, seats[VILLAGE.user_id])
    room = await b.presence(cid)
    assert room is not None
    # The session's recordings directory cannot be made: a file is in its way.
    blocked = b.app[CONFIG].data_dir / "recordings" / room.session_id
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"")

    out, _ = await b.app[ROOMS].take_over(ConsultationId(cid))

    assert b.app[RECORDINGS].recording == []
    assert (await b.presence(cid) or pytest.fail("no room")).recording is None
    events = [e for e in await b.events(cid) if e.kind.value.startswith("recording_")]
    assert [(e.kind, e.participant_id) for e in events[-2:]] == [
        (EventKind.RECORDING_STOPPED, None),
        (EventKind.RECORDING_FAILED, None),
    ]
    assert events[-2].data == {"reason": "interrupted"}
    assert "could not start again" in events[-1].data["reason"]
    assert [a.event for a in out.announcements] == [
        "recording_stopped",
        "participant_left",
        "recording_failed",
    ]


# --- one live worker cleans up after the dead one ------------------------------------------


async def test_one_live_worker_closes_the_dead_ones_segments_and_ends_the_rooms_nobody_took(
    start_backend_worker: Start, dead_worker: RedisPlacement
) -> None:
    a = await start_backend_worker("node-a")
    # The dead worker's node restarted: a new incarnation of it, among the live ones.
    reborn = await start_backend_worker("node-c")
    live = [a.app[PLACEMENT], reborn.app[PLACEMENT]]
    dead = dead_worker.worker_id
    assert reborn.app[PLACEMENT].worker_id != dead
    rooms: dict[str, tuple[str, dict[str, ParticipantId], str]] = {}
    for name in ("taken", "left"):
        cid, session_id = await live_session(a)
        await place_on(dead_worker, cid, live)
        seats = await seats_of_a_dead_worker(a, cid)
        segment = await open_segment(a, session_id, dead)
        await recording_was_on(a, cid, seats[VILLAGE.user_id])
        rooms[name] = (cid, seats, segment)
    taken, _, taken_segment = rooms["taken"]
    left, _, left_segment = rooms["left"]
    taken_session = (await row_of(a, taken_segment)).session_id
    # The restarted worker writes a segment of its own at once.
    its_own = await open_segment(reborn, taken_session, reborn.app[PLACEMENT].worker_id)
    taken_log = await a.event_kinds(taken)

    kill(dead_worker)
    await until_dead(a.app[PLACEMENT], dead)
    # A join comes for one room at once: placed on a live worker, which takes it over.
    placed = await a.app[PLACEMENT].owner_of(ConsultationId(taken))
    assert placed.fresh and placed.previous == dead
    owner = next(s for s in (a, reborn) if s.app[PLACEMENT].worker_id == placed.owner)
    _, dropped = await owner.app[ROOMS].take_over(ConsultationId(taken))
    assert len(dropped) == 2
    assert ConsultationId(taken) in owner.app[RECORDINGS].recording

    # The dead worker's segments: closed, hashed, interrupted, by one live worker.
    for segment in (taken_segment, left_segment):

        async def closed(segment: str = segment) -> Recording | None:
            row = await row_of(a, segment)
            return row if row.state != RecordingState.RECORDING.value else None

        row = await eventually(closed, "the dead worker's segment is closed", within=WAIT)
        assert row.state == RecordingState.INTERRUPTED.value, row
        path = a.app[CONFIG].data_dir / f"recordings/{row.session_id}/{segment}.webm"
        assert (row.sha256, row.size_bytes) == sha256_of(a.app, path, unfinished_ok=True)
    cleaners = (a.app[TAKEOVER], reborn.app[TAKEOVER])
    await eventually(
        lambda: any(c.cleaned_up for c in cleaners), "the cleanup is done", within=WAIT
    )
    assert sorted(c.cleaned_up for c in cleaners) == [[], [dead]]
    assert await a.app[PLACEMENT].dead_workers() == []

    # The room nobody took ended after the grace, as a room everyone left would.
    assert await a.status(left) is ConsultationStatus.OPINION_PENDING
    events = await a.events(left)
    ended = [e for e in events if e.kind is not EventKind.RECORDING_STARTED][-4:]
    assert [(e.kind, e.data.get("reason")) for e in ended] == [
        (EventKind.LEFT, "server_lost"),
        (EventKind.LEFT, "server_lost"),
        (EventKind.RECORDING_STOPPED, "interrupted"),
        (EventKind.SESSION_ENDED, "aborted"),
    ]
    assert await a.presence(left) is None
    # The room taken over goes on, recorded, its seats kept for their owners to come back.
    assert await a.status(taken) is ConsultationStatus.LIVE
    assert await a.event_kinds(taken) == taken_log
    room = await a.presence(taken)
    assert room is not None and room.recording is not None
    assert {p.participant_id for p in room.participants.values()} == {p for p, _ in dropped}
    # The restarted worker's own segment is its own: untouched.
    assert (await row_of(a, its_own)).state == RecordingState.RECORDING.value

    # The ended session's composite is made by the worker that ended it.
    async def composite() -> Recording | None:
        rows = await recordings_of(a.app, left)
        made = [r for r, _ in rows if r.kind == RecordingKind.COMPOSITE.value]
        return made[0] if made and made[0].state != RecordingState.RENDERING.value else None

    made = await eventually(composite, "the composite is made", within=WAIT)
    assert made.state == RecordingState.COMPLETE.value, made
    cleaner = next(s for s in (a, reborn) if dead in s.app[TAKEOVER].cleaned_up)
    assert made.node == cleaner.app[PLACEMENT].worker_id
