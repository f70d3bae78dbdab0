"""Recording content served from sealed files (server/api/recording_routes.py): ranges of the
plaintext across chunk boundaries, a file that fails its seal refused with a clear problem, a
whole download that does not match the record's SHA-256 broken off, interrupted recordings
served up to their last whole chunk."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from api_helpers import PROBLEM_JSON, VILLAGE, Api
from recording_server_helpers import add_sealed_recording

from media.sealed import DEFAULT_CHUNK_SIZE, OVERHEAD, SealedWriter
from rooms.model import RecordingId, RecordingState
from server.app import CONFIG, RECORDING_KEYS, STORE

DATA = os.urandom(3 * DEFAULT_CHUNK_SIZE + 1000)


def url(rec: str) -> str:
    return f"/api/v1/recordings/{rec}/content"


async def file_of(api: Api, rec: str) -> Path:
    async with api.app[STORE].reading() as tx:
        stored = await tx.get_recording(RecordingId(rec))
    assert stored is not None and stored.path is not None
    path: Path = api.app[CONFIG].data_dir / stored.path
    return path


async def set_state(api: Api, rec: str, **changes: object) -> None:
    async with api.app[STORE].transaction() as tx:
        stored = await tx.get_recording(RecordingId(rec))
        assert stored is not None
        await tx.update_recording(replace(stored.recording, **changes))  # type: ignore[arg-type]


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_ranges_across_chunks_are_the_plaintext_bytes(api: Api) -> None:
    _, session = await api.live()
    rec = await add_sealed_recording(api.app, session.id, DATA)
    on_disk = (await file_of(api, rec)).read_bytes()
    assert DATA[:4096] not in on_disk
    edge = DEFAULT_CHUNK_SIZE
    for first, last in [(0, 0), (edge - 5, edge + 5), (10, 2 * edge + 10), (3 * edge, None)]:
        header = f"bytes={first}-{'' if last is None else last}"
        reply = await api.get(url(rec), VILLAGE, headers={"Range": header})
        end = len(DATA) if last is None else last + 1
        assert reply.status == 206, reply
        assert reply.raw == DATA[first:end]
        assert reply.headers["Content-Range"] == f"bytes {first}-{end - 1}/{len(DATA)}"
    whole = await api.get(url(rec), VILLAGE)
    assert whole.status == 200 and whole.raw == DATA
    assert whole.headers["Content-Length"] == str(len(DATA))


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "another_key"])
async def test_a_file_that_fails_its_seal_is_refused_clearly(
    api: Api, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    _, session = await api.live()
    rec = await add_sealed_recording(api.app, session.id, DATA)
    path = await file_of(api, rec)
    if damage == "flipped_byte":
        raw = bytearray(path.read_bytes())
        raw[-10] ^= 0x01
        path.write_bytes(bytes(raw))
    elif damage == "truncated":
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size - (1000 + OVERHEAD))
    else:
        from media.sealed import SealKeys

        with SealedWriter(path, SealKeys(os.urandom(32))) as other:
            other.write(DATA)

    with caplog.at_level(logging.INFO):
        reply = await api.get(url(rec), VILLAGE, headers={"Range": "bytes=0-99"})

    assert reply.status == 409, reply
    assert reply.content_type == PROBLEM_JSON
    assert reply.body["code"] == "recording_damaged"
    assert reply.body["detail"] == (
        f"recording {rec} does not read back as it was recorded (altered, truncated, or sealed "
        "with a key that is not configured)"
    )
    assert_no_traceback(caplog)


async def test_a_whole_download_that_does_not_match_the_record_is_broken_off(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    _, session = await api.live()
    rec = await add_sealed_recording(api.app, session.id, DATA)
    await set_state(api, rec, sha256=hashlib.sha256(b"something else").hexdigest())

    with caplog.at_level(logging.INFO):
        async with api.client.get(url(rec), headers=api.auth(VILLAGE)) as reply:
            assert reply.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await reply.read()

    assert "does not match the SHA-256 in the record" in caplog.text
    assert_no_traceback(caplog)
    # A range is checked chunk by chunk (the seal), not against the whole file's hash.
    part = await api.get(url(rec), VILLAGE, headers={"Range": "bytes=0-99"})
    assert part.status == 206 and part.raw == DATA[:100]


async def test_an_interrupted_recording_is_served_up_to_its_last_whole_chunk(api: Api) -> None:
    _, session = await api.live()
    rec = await add_sealed_recording(api.app, session.id, DATA)
    path = await file_of(api, rec)
    # As a kill -9 leaves it: the final record never written.
    await asyncio.to_thread(path.write_bytes, path.read_bytes()[: -(1000 + OVERHEAD)])
    kept = DATA[: 3 * DEFAULT_CHUNK_SIZE]

    refused = await api.get(url(rec), VILLAGE)
    assert refused.status == 409 and refused.body["code"] == "recording_damaged", refused

    await set_state(
        api,
        rec,
        state=RecordingState.INTERRUPTED.value,
        sha256=hashlib.sha256(kept).hexdigest(),
        size_bytes=len(kept),
    )
    whole = await api.get(url(rec), VILLAGE)
    assert whole.status == 200 and whole.raw == kept, whole
    tail = await api.get(url(rec), VILLAGE, headers={"Range": "bytes=-10"})
    assert tail.status == 206 and tail.raw == kept[-10:]


async def test_the_keys_are_the_apps_own(api: Api) -> None:
    # Development mode without a key file: one generated into the data dir, owner-only.
    key_file = api.app[CONFIG].data_dir / "recording-dev.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert api.app[RECORDING_KEYS].ids == [api.app[RECORDING_KEYS].current_id]
