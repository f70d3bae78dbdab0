"""Recording on the server side, end to end: the consent and permission rules over signaling,
real aiortc media recorded through the real server into per-track files and a composite
(content decoded and checked), the recordings API (playback links, byte ranges, who may
download, the audit log), and a `kill -9` of the server in the middle of a recording."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from api_helpers import OUTSIDER, Api, consultation_body, one
from media_client import MediaClient, MediaRoom
from media_peers import ColourCounterTrack, ToneTrack, close_to, dominant_frequency, mean_colour
from pydantic import SecretStr
from recording_server_helpers import (
    EBML_MAGIC,
    ServerProcess,
    add_sealed_recording,
    colour_fraction,
    decoded,
    plaintext,
    read_composite,
    recordings_of,
    sha256_of,
    tones_present,
    write_config,
)
from signaling_fixtures import (
    COUNTY,
    SPECIALIST,
    VILLAGE,
    Peer,
    SignalingServer,
    eventually,
    http_record,
    start_signaling_server,
)

from rooms.model import (
    ConsultationKind,
    Recording,
    RecordingState,
)
from rooms.roles import Role
from server.api.recording_routes import PlaybackGrants, link_key
from server.app import COMPOSITES, RECORDINGS
from server.auth import AuthError, TokenService
from server.config import JwtConfig, load_config

pytest_plugins = ["signaling_fixtures", "media_client"]

SIZE = {"width": 160, "height": 120}
# Generous deadlines for conditions on a busy two-core machine: a wait that is met returns
# at once; these only bound a failure.
MEDIA_WAIT = 60.0


def recording_events(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (e["kind"], e["data"])
        for e in record["events"]
        if e["kind"] in ("recording_started", "recording_stopped")
    ]


# --- 1. the rules, over signaling ----------------------------------------------------------


async def test_recording_needs_consent_and_permission_and_the_room_sees_it(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    consultation = await server.scheduled()
    cid = consultation.id
    village = await server.seated(VILLAGE, cid, label="village")
    resident_token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(resident_token, cid, village, label="resident")
    county = await server.seated(COUNTY, cid, label="county")

    # No consent yet: refused, and nothing written to the log.
    error = await village.refused("start_recording")
    assert error["code"] == "consent_missing", error
    assert "recording_started" not in await server.event_kinds(cid)
    # A county physician may not start a recording, consent or not.
    assert (await county.refused("start_recording"))["code"] == "forbidden"

    await resident.ok("consent", {"kind": "recording", "granted": True})
    assert (await county.refused("start_recording"))["code"] == "forbidden"
    await village.ok("start_recording")
    for peer in (village, resident, county):
        joined = await peer.wait_for(
            "participant_joined", lambda d: d.get("participant_id") == "recorder"
        )
        assert joined["role"] == "recorder"
        started = await peer.wait_for("recording_started")
        assert started["by"] == village.participant_id

    # A late joiner is told at once.
    specialist = await server.seated(SPECIALIST, cid, label="specialist")
    snapshot = specialist.snapshot
    assert snapshot["recording"] is not None
    assert snapshot["recording"]["by"] == village.participant_id, snapshot["recording"]
    assert "recorder" in [p["participant_id"] for p in snapshot["participants"]]

    assert (await village.refused("start_recording"))["code"] == "already_recording"

    # The resident withdraws consent: the recording stops, for everyone.
    await resident.ok("consent", {"kind": "recording", "granted": False})
    for peer in (village, resident, county, specialist):
        stopped = await peer.wait_for("recording_stopped")
        assert stopped["reason"] == "consent_withdrawn", stopped
        assert stopped["by"] == resident.participant_id
    assert (await village.refused("stop_recording"))["code"] == "not_recording"
    # Without consent again, no new start either.
    assert (await village.refused("start_recording"))["code"] == "consent_missing"

    record = await http_record(server, cid, server.token(VILLAGE))
    assert recording_events(record) == [
        ("recording_started", {}),
        ("recording_stopped", {"reason": "consent_withdrawn"}),
    ]
    seqs = [e["seq"] for e in record["events"] if e["kind"].startswith("recording_")]
    assert seqs == sorted(seqs)
    kinds = [e["kind"] for e in record["events"]]
    # The consent came before the start, the withdrawal before the stop.
    consent_seqs = [e["seq"] for e in record["events"] if e["kind"] == "consent"]
    assert consent_seqs[0] < seqs[0] < consent_seqs[1] < seqs[1], kinds


async def test_teaching_recording_also_needs_the_teaching_consent(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    cid = (await server.scheduled(kind=ConsultationKind.TEACHING)).id
    village = await server.seated(VILLAGE, cid, label="village")
    resident_token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(resident_token, cid, village, label="resident")
    trainee_token, _ = await server.invite(cid, Role.TRAINEE, "学员")
    trainee = await server.admitted(trainee_token, cid, village, label="trainee")

    await resident.ok("consent", {"kind": "recording", "granted": True})
    error = await village.refused("start_recording")
    assert error["code"] == "consent_missing"
    assert "teaching" in error["message"], error
    assert (await trainee.refused("start_recording"))["code"] == "forbidden"

    await resident.ok("consent", {"kind": "teaching", "granted": True})
    assert (await trainee.refused("start_recording"))["code"] == "forbidden"
    await village.ok("start_recording")
    await trainee.wait_for("recording_started")
    await trainee.wait_for("participant_joined", lambda d: d.get("participant_id") == "recorder")
    # Withdrawing only the teaching consent stops a teaching recording too.
    await resident.ok("consent", {"kind": "teaching", "granted": False})
    stopped = await trainee.wait_for("recording_stopped")
    assert stopped["reason"] == "consent_withdrawn"
    record = await http_record(server, cid, server.token(VILLAGE))
    assert recording_events(record) == [
        ("recording_started", {}),
        ("recording_stopped", {"reason": "consent_withdrawn"}),
    ]


# --- 3. the recordings API -----------------------------------------------------------------


async def invite_token(api: Api, cid: str, role: str) -> str:
    reply = await api.post(one(cid, "/invites"), VILLAGE, {"role": role, "name": f"{role} 1"})
    assert reply.status in (200, 201), reply
    token: str = reply.body["token"]
    return token


async def test_recordings_api_links_ranges_access_and_audit(api: Api) -> None:
    data_a = secrets.token_bytes(1000)
    data_b = secrets.token_bytes(500)
    cid_a, session_a = await api.live()
    resident_b = consultation_body()["resident"] | {"pseudonym": "res-0002"}
    cid_b, session_b = await api.live(resident=resident_b)
    cid_t, session_t = await api.live(kind="teaching")
    rec_a = await add_sealed_recording(api.app, session_a.id, data_a)
    rec_b = await add_sealed_recording(api.app, session_b.id, data_b)
    rec_t = await add_sealed_recording(api.app, session_t.id, b"teaching" * 100)
    allowed: dict[str, int] = {rec_a: 0, rec_b: 0, rec_t: 0}

    async def playback(rec: str, who: Any, status: int = 200) -> str:
        reply = await api.post(f"/api/v1/recordings/{rec}/playback", who)
        assert reply.status == status, reply
        if status != 200:
            return ""
        allowed[rec] += 1
        url: str = reply.body["url"]
        assert url.startswith(f"/api/v1/recordings/{rec}/content?token=")
        expires = datetime.fromisoformat(reply.body["expires_at"])
        assert datetime.now(UTC) < expires <= datetime.now(UTC) + timedelta(minutes=11)
        return url

    url_a = await playback(rec_a, VILLAGE)
    # The link alone, no Authorization header: the whole file.
    whole = await api.get(url_a, None)
    assert whole.status == 200, whole
    assert whole.raw == data_a
    assert whole.content_type == "video/webm"
    assert whole.headers.get("Accept-Ranges") == "bytes"
    allowed[rec_a] += 1
    # A byte range: exactly those bytes.
    part = await api.get(url_a, None, headers={"Range": "bytes=100-199"})
    assert part.status == 206, part
    assert part.raw == data_a[100:200]
    assert part.headers["Content-Range"] == "bytes 100-199/1000"
    allowed[rec_a] += 1
    tail = await api.get(url_a, None, headers={"Range": "bytes=-10"})
    assert tail.status == 206 and tail.raw == data_a[-10:], tail
    allowed[rec_a] += 1
    unsatisfiable = await api.get(url_a, None, headers={"Range": "bytes=5000-6000"})
    assert unsatisfiable.status == 416, unsatisfiable
    allowed[rec_a] += 1
    # With a bearer token instead of a link.
    direct = await api.get(f"/api/v1/recordings/{rec_a}/content", VILLAGE)
    assert direct.status == 200 and direct.raw == data_a
    allowed[rec_a] += 1

    # A clinician not on the team; a trainee of a teaching session, on its own recording.
    await playback(rec_a, OUTSIDER, 403)
    outsider = await api.get(f"/api/v1/recordings/{rec_a}/content", OUTSIDER)
    assert outsider.status == 403, outsider
    trainee = await invite_token(api, cid_t, "trainee")
    await playback(rec_t, trainee, 403)
    assert (await api.get(f"/api/v1/recordings/{rec_t}/content", trainee)).status == 403
    # The village doctor can play the teaching recording (the trainee's 403 is not a bad file).
    await playback(rec_t, VILLAGE)

    # A resident: their own consultation's recordings, not another's.
    resident_a = await invite_token(api, cid_a, "resident")
    resident_b_token = await invite_token(api, cid_b, "resident")
    own = await playback(rec_a, resident_a)
    got = await api.get(own, None, headers={"Range": "bytes=0-9"})
    assert got.status == 206 and got.raw == data_a[:10]
    allowed[rec_a] += 1
    await playback(rec_a, resident_b_token, 403)
    assert (await api.get(f"/api/v1/recordings/{rec_a}/content", resident_b_token)).status == 403
    url_b = await playback(rec_b, resident_b_token)
    got_b = await api.get(url_b, None)
    assert got_b.status == 200 and got_b.raw == data_b
    allowed[rec_b] += 1

    # A's link does not open B.
    token_a = url_a.split("token=", 1)[1]
    crossed = await api.get(f"/api/v1/recordings/{rec_b}/content", None, params={"token": token_a})
    assert crossed.status == 403, crossed
    # A tampered link: another payload under A's signature, or a changed signature.
    payload, _, signature = token_a.partition(".")
    forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + signature
    for bad in (forged, payload + "." + signature[::-1], "garbage", payload):
        reply = await api.get(f"/api/v1/recordings/{rec_a}/content", None, params={"token": bad})
        assert reply.status == 401, (bad, reply)
    # Unknown recording.
    assert (await api.post("/api/v1/recordings/rec_nothere/playback", VILLAGE)).status == 404
    missing = await api.get("/api/v1/recordings/rec_nothere/content", VILLAGE)
    assert missing.status == 404

    # Every access that was let through is in the audit log, with the recording as target.
    audit = await api.audit()
    for rec, count in allowed.items():
        entries = [e for e in audit if e["action"] == "download_recording" and e["target"] == rec]
        assert len(entries) == count, (rec, count, entries)
    ranges = [
        e["detail"].get("range")
        for e in audit
        if e["action"] == "download_recording" and e["target"] == rec_a
    ]
    assert "bytes=100-199" in ranges and "bytes=5000-6000" in ranges
    assert {e["consultation_id"] for e in audit if e["target"] == rec_a} == {cid_a}


def test_playback_links_expire() -> None:
    from rooms.policy import Actor

    grants = PlaybackGrants(ttl_s=60)
    actor = Actor(VILLAGE.user_id, VILLAGE.name, VILLAGE.role, VILLAGE.org, None)
    token, expires = grants.grant(actor, "rec_a", now=1000.0)
    assert expires == 1060.0
    assert grants.check(token, "rec_a", now=1059.0).user_id == VILLAGE.user_id
    with pytest.raises(AuthError) as expired:
        grants.check(token, "rec_a", now=1061.0)
    assert expired.value.status == 401
    with pytest.raises(AuthError) as other:
        grants.check(token, "rec_b", now=1000.0)
    assert other.value.status == 403
    # Another key does not verify these links; the same configured key does, anywhere.
    with pytest.raises(AuthError) as foreign:
        PlaybackGrants().check(token, "rec_a", now=1000.0)
    assert foreign.value.status == 401
    # The key derived from the JWT secret: the same on every node and after a restart.
    jwt_config = JwtConfig()
    key = link_key(jwt_config.secret.get_secret_value())
    shared, _ = PlaybackGrants(key=key).grant(actor, "rec_a", now=1000.0)
    assert PlaybackGrants(key=key).check(shared, "rec_a", now=1001.0).user_id == VILLAGE.user_id
    # A link is no access token, nor an access token a link, though both come of that secret.
    tokens = TokenService(jwt_config)
    access = tokens.mint(
        user_id=VILLAGE.user_id, name=VILLAGE.name, role=VILLAGE.role, org=VILLAGE.org
    )
    with pytest.raises(AuthError) as not_a_link:
        PlaybackGrants(key=key).check(access, "rec_a", now=1000.0)
    assert not_a_link.value.status == 401
    with pytest.raises(AuthError):
        tokens.verify(shared)


# --- 2. real media through the server -------------------------------------------------------

LOOKS: dict[str, tuple[tuple[int, int, int], float]] = {
    "village": ((220, 40, 40), 300.0),
    "resident": ((40, 200, 40), 500.0),
    "county": ((40, 40, 220), 700.0),
}
RECORD_S = 6.0


async def publish_looks(clients: dict[str, MediaClient]) -> dict[str, str]:
    """Each client publishes its colour and tone; returns participant ids by label, once every
    client receives every other's video and audio."""
    for label, client in clients.items():
        colour, tone = LOOKS[label]
        ack = await client.publish(
            [(ColourCounterTrack(colour, **SIZE), "camera"), (ToneTrack(tone), "microphone")]
        )
        assert ack == {"ok": True}, ack
    pids = {label: c.peer.participant_id for label, c in clients.items()}
    for label, client in clients.items():
        for other, pid in pids.items():
            if other != label:
                await eventually(
                    lambda c=client, p=pid: (
                        len(c.tracks_from(p, "video")) == 1
                        and len(c.tracks_from(p, "video")[0].frames) >= 10
                        and len(c.tracks_from(p, "audio")) == 1
                        and len(c.tracks_from(p, "audio")[0].frames) >= 20
                    ),
                    f"{label} receives {other}'s media",
                    within=MEDIA_WAIT,
                )
    return pids


def check_track_file(
    app: Any, path: Path, row: Recording, colour: Any, tone: float, *, unfinished_ok: bool = False
) -> float:
    """The file is sealed: nothing of the WebM on disk, what was recorded (its SHA-256 and
    size in the row) once decrypted, and that decodes with the codec of its kind and the
    published content. Returns its decoded length."""
    assert EBML_MAGIC not in path.read_bytes(), row
    recorded = plaintext(app, path, unfinished_ok=unfinished_ok)
    assert recorded.startswith(EBML_MAGIC), row
    assert (row.sha256, row.size_bytes) == (hashlib.sha256(recorded).hexdigest(), len(recorded))
    got = decoded(app, path)
    if row.media_type.startswith("video/"):
        assert got.codec == "vp8", (row, got.codec)
        frames = got.video[len(got.video) // 4 :]
        assert frames, row
        assert all(close_to(mean_colour(f), colour) for f in frames), (row, mean_colour(frames[0]))
    else:
        assert got.codec == "opus", (row, got.codec)
        assert abs(dominant_frequency(got.audio[50:]) - tone) < 20, row  # type: ignore[arg-type]
    return got.duration_s


async def check_download(server: SignalingServer, row: Recording, recorded: bytes) -> None:
    """Downloads are of what was recorded: a byte range is exactly those bytes of it."""
    middle = len(recorded) // 3
    url = f"{server.url}/api/v1/recordings/{row.id}/content"
    auth = {"Authorization": f"Bearer {server.token(VILLAGE)}"}
    async with aiohttp.ClientSession() as http:
        span = {"Range": f"bytes={middle}-{middle + 99_999}"}
        async with http.get(url, headers={**auth, **span}) as reply:
            assert reply.status == 206, reply
            end = min(len(recorded), middle + 100_000)
            assert reply.headers["Content-Range"] == f"bytes {middle}-{end - 1}/{len(recorded)}"
            assert await reply.read() == recorded[middle:end]
        async with http.get(url, headers=auth) as reply:
            assert reply.status == 200 and await reply.read() == recorded


async def test_recorded_consultation_leaves_checked_tracks_and_a_composite(
    media_room: MediaRoom,
) -> None:
    await run_recorded_consultation(media_room)


async def run_recorded_consultation(room: MediaRoom) -> None:
    server = room.server
    cid = (await server.scheduled()).id
    village = await room.seated(VILLAGE, cid, label="village")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await room.admitted(token, cid, village.peer, label="resident")
    county = await room.seated(COUNTY, cid, label="county")
    clients: dict[str, MediaClient] = {"village": village, "resident": resident, "county": county}
    pids = await publish_looks(clients)
    label_of = {pid: label for label, pid in pids.items()}

    await resident.peer.ok("consent", {"kind": "recording", "granted": True})
    await village.peer.ok("start_recording")

    async def open_segments() -> list[tuple[Recording, Path | None]] | None:
        rows = [r for r in await recordings_of(server.app, cid) if r[0].kind == "track"]
        return rows if len(rows) == 6 else None

    await eventually(open_segments, "a segment per published track", within=MEDIA_WAIT)
    await asyncio.sleep(RECORD_S)
    ending = datetime.now(UTC)
    await village.peer.ok("end_session")

    async def closed() -> list[tuple[Recording, Path | None]] | None:
        rows = [r for r in await recordings_of(server.app, cid) if r[0].kind == "track"]
        done = all(r.state != RecordingState.RECORDING.value for r, _ in rows)
        return rows if done else None

    rows = await eventually(closed, "every segment closed", within=MEDIA_WAIT)
    assert len(rows) == 6, rows
    seen: set[tuple[str, str]] = set()
    for row, path in rows:
        assert row.state == RecordingState.COMPLETE.value, row
        assert path is not None and path.is_file(), row
        assert path.is_relative_to(server.config.data_dir)
        label = label_of[str(row.participant_id)]
        kind = "video" if row.media_type == "video/webm" else "audio"
        assert row.media_type == f"{kind}/webm"
        seen.add((label, kind))
        assert row.source == ("camera" if kind == "video" else "microphone"), row
        assert row.name and row.role == clients[label].peer.snapshot["you"]["role"], row
        assert row.offset_s is not None and row.offset_s > 0, row
        assert row.duration_s is not None
        # Recorded from its first packet until the session ended.
        recorded = (ending - row.started_at).total_seconds()
        assert abs(row.duration_s - recorded) <= 0.5, (row, recorded)
        colour, tone = LOOKS[label]
        length = check_track_file(server.app, path, row, colour, tone)
        assert abs(length - row.duration_s) <= 0.5, (row, length)
    assert seen == {(label, kind) for label in LOOKS for kind in ("video", "audio")}

    # The record over HTTP: the same segments, hashed, and the session's recording events.
    record = await http_record(server, cid, server.token(VILLAGE))
    by_id = {r["id"]: r for r in record["recordings"]}
    for row, _ in rows:
        assert by_id[row.id]["sha256"] == row.sha256
        assert by_id[row.id]["state"] == "complete"
    assert recording_events(record) == [
        ("recording_started", {}),
        ("recording_stopped", {"reason": "session_ended"}),
    ]

    row, path = next((r, p) for r, p in rows if r.media_type == "video/webm")
    assert path is not None
    await check_download(server, row, plaintext(server.app, path))

    # The composite, made when the session ended.
    await server.app[RECORDINGS].wait()  # the segments hashed, the render handed over
    await server.app[COMPOSITES].wait()
    composites = [r for r in await recordings_of(server.app, cid) if r[0].kind == "composite"]
    assert len(composites) == 1, composites
    composite, path = composites[0]
    assert composite.state == RecordingState.COMPLETE.value, composite
    assert composite.media_type == "video/mp4"
    assert path is not None
    assert (composite.sha256, composite.size_bytes) == sha256_of(server.app, path)
    assert b"ftyp" not in path.read_bytes()  # sealed too
    content = read_composite(server.app, path)
    assert (content.video_codec, content.audio_codec) == ("h264", "aac")
    assert content.video_frames > 0
    assert composite.duration_s is not None
    assert composite.duration_s >= RECORD_S - 0.5, composite
    for label, (colour, _) in LOOKS.items():
        assert colour_fraction(content.middle, colour) > 0.02, label
    present = tones_present(content.audio, content.rate, [tone for _, tone in LOOKS.values()])
    assert all(present.values()), present


# --- 4. kill -9 in the middle of a recording ----------------------------------------------


async def rest(url: str, method: str, path: str, token: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, url + path, json=body, headers={"Authorization": f"Bearer {token}"}
        ) as r,
    ):
        answer = await r.json(content_type=None)
        assert r.status < 300, (method, path, r.status, answer)
        return answer


async def test_kill_9_during_recording_keeps_what_was_written(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config_file = tmp_path / "telemed.toml"
    write_config(config_file, data_dir)
    secret = secrets.token_urlsafe(36)
    tokens = TokenService(JwtConfig(secret=SecretStr(secret)))

    def token(who: Any) -> str:
        return tokens.mint(user_id=who.user_id, name=who.name, role=who.role, org=who.org)

    process = ServerProcess(config_file, secret, tmp_path / "server.log")
    peers: list[Peer] = []
    clients: list[MediaClient] = []
    try:
        await process.ready()
        url = process.url
        created = await rest(
            url, "POST", "/api/v1/consultations", token(VILLAGE), consultation_body()
        )
        cid = str(created["id"])
        await rest(url, "POST", f"/api/v1/consultations/{cid}/accept", token(COUNTY), {})
        when = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
        await rest(
            url,
            "POST",
            f"/api/v1/consultations/{cid}/schedule",
            token(COUNTY),
            {"scheduled_time": when},
        )
        invite = await rest(
            url,
            "POST",
            f"/api/v1/consultations/{cid}/invites",
            token(VILLAGE),
            {"role": "resident"},
        )

        village_peer = Peer(url, "village")
        resident_peer = Peer(url, "resident")
        peers += [village_peer, resident_peer]
        village, resident = MediaClient(village_peer), MediaClient(resident_peer)
        clients += [village, resident]
        await village_peer.connect({"token": token(VILLAGE)})
        await village_peer.join(cid)
        await village_peer.wait_for("joined", within=MEDIA_WAIT)
        await resident_peer.connect({"token": invite["token"]})
        await resident_peer.join(cid)
        waiting = await resident_peer.wait_for("waiting", within=MEDIA_WAIT)
        await village_peer.ok("admit", {"participant": waiting["participant"]["participant_id"]})
        await resident_peer.wait_for("joined", within=MEDIA_WAIT)
        pids = await publish_looks({"village": village, "resident": resident})

        await resident_peer.ok("consent", {"kind": "recording", "granted": True})
        await village_peer.ok("chat", {"text": "开始录制前的留言"})
        await village_peer.ok("start_recording")

        async def recording_rows() -> list[dict[str, Any]] | None:
            record = await http_record_url(url, cid, token(VILLAGE))
            rows = [r for r in record["recordings"] if r["state"] == "recording"]
            return rows if len(rows) == 4 else None

        await eventually(recording_rows, "four segments being written", within=MEDIA_WAIT)
        await asyncio.sleep(8.5)
        await village_peer.ok("chat", {"text": "录制中的留言"})
        before = await http_record_url(url, cid, token(VILLAGE))
        process.kill()
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        for peer in peers:
            with contextlib.suppress(Exception):
                await peer.close()
        process.kill()

    # Restart on the same data_dir (in this process, to reach its store and composites).
    config = load_config(config_file, env={"TELEMED_JWT_SECRET": secret})
    server = await start_signaling_server(config)
    try:
        await check_recovered(server, cid, before, pids)
    finally:
        await server.close()


async def http_record_url(url: str, cid: str, token: str) -> Any:
    return await rest(url, "GET", f"/api/v1/consultations/{cid}/record", token)


async def check_recovered(
    server: SignalingServer, cid: str, before: dict[str, Any], pids: dict[str, str]
) -> None:
    label_of = {pid: label for label, pid in pids.items()}
    rows = [r for r in await recordings_of(server.app, cid) if r[0].kind == "track"]
    assert len(rows) == 4, rows
    for row, path in rows:
        assert row.state == RecordingState.INTERRUPTED.value, row
        assert path is not None and path.is_file(), row
        assert row.duration_s is not None and row.duration_s >= 7.0, row
        colour, tone = LOOKS[label_of[str(row.participant_id)]]
        length = check_track_file(server.app, path, row, colour, tone, unfinished_ok=True)
        assert length >= 7.0, (row, length)
        # Served as recorded up to the crash, ranges included.
        await check_download(server, row, plaintext(server.app, path, unfinished_ok=True))

    record = await server.record(cid)
    (session,) = record.sessions
    assert session.ended_at is not None
    assert session.end_reason == "aborted", session
    after = [(e.seq, e.kind.value, e.data) for e in record.events]
    # Everything written before the kill is still there, unchanged.
    for e in before["events"]:
        assert (e["seq"], e["kind"], e["data"]) in after, e
    kinds_before = [e["kind"] for e in before["events"]]
    for kind in ("session_started", "joined", "admitted", "consent", "recording_started", "chat"):
        assert kind in kinds_before, kinds_before
    chats = [e.data.get("text") for e in record.events if e.kind.value == "chat"]
    assert chats == ["开始录制前的留言", "录制中的留言"], chats
    tail = after[len(before["events"]) :]
    assert [(k, d) for _, k, d in tail] == [
        # The two seats the dead server held, then the recording it was writing.
        ("left", {"reason": "server_lost"}),
        ("left", {"reason": "server_lost"}),
        ("recording_stopped", {"reason": "interrupted"}),
        ("session_ended", {"reason": "aborted"}),
    ], tail

    # The composite is made from what survived.
    await server.app[COMPOSITES].wait()
    composites = [r for r in await recordings_of(server.app, cid) if r[0].kind == "composite"]
    assert [c.state for c, _ in composites] == [RecordingState.COMPLETE.value], composites


async def test_the_record_over_http_says_why_a_session_ended(api: Api) -> None:
    from rooms.model import ConsultationId
    from server.app import SERVICE

    cid, session = await api.live()
    await api.app[SERVICE].end_session(None, ConsultationId(cid), session.id, "aborted")
    reply = await api.get(one(cid, "/record"), VILLAGE)
    assert reply.status == 200, reply
    assert reply.body["sessions"][0]["end_reason"] == "aborted"
