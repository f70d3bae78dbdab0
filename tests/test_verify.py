"""`telemed verify` and GET /consultations/{id}/verify: a clean record verifies clean; a changed
event, audit entry, recording file and opinion signature are each reported precisely."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from api_helpers import ADMIN, COUNTY, VILLAGE, Api, assert_problem, one
from pytest_aiohttp import AiohttpClient
from record_helpers import signing_key_file, tamper
from sqlalchemy import text
from test_fhir import full_consultation

from media.sealed import SealedWriter
from rooms.model import ConsultationId, Recording, RecordingId, SessionId
from server.app import RECORDING_KEYS, STORE, create_app
from server.config import Config, SigningConfig
from server.recording_keys import DEV_KEY_FILE

FILE = b"\x1a\x45\xdf\xa3 a recorded segment"


@dataclass
class Consulted:
    api: Api
    config: Config
    cid: str
    recording_file: Path


@pytest.fixture(name="c")
async def consulted(
    aiohttp_client: AiohttpClient, backend_config: Config, tmp_path: Path
) -> AsyncIterator[Consulted]:
    """A whole consultation (test_fhir's) with a recording file, on a server with a key file."""
    config = backend_config.model_copy(
        update={"signing": SigningConfig(key_file=signing_key_file(tmp_path))}
    )
    api = Api(await aiohttp_client(create_app(config)))
    cid, _, _ = await full_consultation(api)
    async with api.app[STORE].reading() as tx:
        (session,) = await tx.list_sessions(ConsultationId(cid))
    path = config.data_dir / "recordings" / "rec_verify.webm"
    path.parent.mkdir(parents=True, exist_ok=True)
    seal(api, path, FILE)
    async with api.app[STORE].transaction() as tx:
        await tx.add_recording(
            Recording(
                RecordingId("rec_verify"), SessionId(session.id), "p3-camera", "track",
                "video/webm", hashlib.sha256(FILE).hexdigest(), 1.0, len(FILE), "complete",
                session.started_at, session.started_at,
            ),
            path="recordings/rec_verify.webm",
        )  # fmt: skip
    yield Consulted(api, config, cid, path)


def seal(api: Api, path: Path, data: bytes) -> None:
    """`data` as the recorder leaves a file: sealed with the server's recording key."""
    with SealedWriter(path, api.app[RECORDING_KEYS]) as sealed:
        sealed.write(data)


async def verify(c: Consulted) -> dict[str, Any]:
    reply = await c.api.get(one(c.cid, "/verify"), ADMIN)
    assert reply.status == 200, reply
    body: dict[str, Any] = reply.body
    return body


async def test_a_clean_record_verifies_clean_for_admins_only_and_audited(c: Consulted) -> None:
    report = await verify(c)
    assert report["ok"] is True and report["mismatches"] == [] and report["notes"] == []
    checked = report["checked"]
    assert checked["events"] >= 4 and checked["audit_entries"] > 10
    assert (checked["opinion_versions"], checked["signatures"]) == (2, 2)
    assert checked["recording_files"] == 1
    entries = [e for e in await c.api.audit(consultation=c.cid) if e["action"] == "verify_record"]
    assert [(e["actor"], e["actor_role"]) for e in entries] == [(ADMIN.user_id, "admin")]
    for who in (VILLAGE, COUNTY):
        refused = assert_problem(await c.api.get(one(c.cid, "/verify"), who), 403, "view_audit")
        assert refused["code"] == "forbidden"
    assert assert_problem(await c.api.get(one("c_nope", "/verify"), ADMIN), 404)["code"] == (
        "not_found"
    )


async def tamper_everything(c: Consulted) -> dict[str, Any]:
    store = c.api.app[STORE]
    async with store.reading() as tx:
        events = await tx.list_events(ConsultationId(c.cid))
        audit = await tx.list_audit(ConsultationId(c.cid), 100, 0)
    chat = next(e for e in events if e.kind.value == "chat")
    await tamper(
        store,
        "session_events",
        f"UPDATE session_events SET actor = 'u-someone-else' WHERE id = {chat.seq}",
    )
    await tamper(
        store,
        "audit_log",
        f"UPDATE audit_log SET remote_addr = '10.6.6.6' WHERE id = {audit[1].seq}",
    )
    # Another recording sealed with the same key in its place: the seal holds, the hash not.
    seal(c.api, c.recording_file, FILE + b"!")
    async with store.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE opinion_signatures SET signer_name = '冒名' "
                f"WHERE consultation_id = '{c.cid}' AND signer = '{COUNTY.user_id}'"
            )
        )
    return {"event": chat.seq, "audit": audit[1].seq}


async def test_each_tampering_is_reported_precisely(c: Consulted) -> None:
    where = await tamper_everything(c)
    report = await verify(c)
    assert report["ok"] is False
    found = {(m["check"], m["where"]): m for m in report["mismatches"]}
    assert set(found) == {
        ("event_chain", f"seq {where['event']}"),
        ("audit_chain", f"seq {where['audit']}"),
        ("opinion", f"version 1, signed by {COUNTY.user_id}"),
        ("recording_file", "recording rec_verify"),
    }
    event = found["event_chain", f"seq {where['event']}"]
    assert event["problem"] == (
        f"event {where['event']} was changed: its content does not match its hash"
    )
    assert event["expected"] != event["found"] and event["consultation_id"] == c.cid
    assert found["audit_chain", f"seq {where['audit']}"]["consultation_id"] == c.cid
    signature = found["opinion", f"version 1, signed by {COUNTY.user_id}"]
    assert "does not verify" in signature["problem"]
    file = found["recording_file", "recording rec_verify"]
    assert file["expected"] == hashlib.sha256(FILE).hexdigest()
    assert file["found"] == hashlib.sha256(FILE + b"!").hexdigest()


async def test_a_recording_file_altered_on_disk_fails_its_seal(c: Consulted) -> None:
    raw = bytearray(c.recording_file.read_bytes())
    raw[-20] ^= 0x01  # inside the last chunk's ciphertext
    c.recording_file.write_bytes(bytes(raw))
    report = await verify(c)
    (mismatch,) = report["mismatches"]
    assert (mismatch["check"], mismatch["where"]) == ("recording_file", "recording rec_verify")
    assert mismatch["problem"].startswith("the file fails its seal: "), mismatch
    assert mismatch["expected"] == hashlib.sha256(FILE).hexdigest()


# -- the command -------------------------------------------------------------------------------


def telemed_verify(c: Consulted, *args: str, key: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
    env |= {
        "TELEMED_DATA_DIR": str(c.config.data_dir),
        "TELEMED_DATABASE_URL": c.config.effective_database_url,
        "PYTHONIOENCODING": "utf-8",
    }
    if key:
        env["TELEMED_SIGNING_KEY_FILE"] = str(c.config.signing.key_file)
    # The key the development server generated for its recordings.
    env["TELEMED_RECORDING_KEY_FILE"] = str(c.config.data_dir / DEV_KEY_FILE)
    code = "import sys; from server.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, "verify", *args],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


async def test_the_command_exits_0_1_or_2_and_says_what_does_not_match(c: Consulted) -> None:
    clean = telemed_verify(c, c.cid)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith(f"consultation {c.cid}: checked ")
    assert clean.stdout.rstrip().endswith("all match")

    assert telemed_verify(c, "c_nope").returncode == 2
    keyless = telemed_verify(c, c.cid, "--json", key=False)
    assert keyless.returncode == 2 and keyless.stdout == ""
    assert keyless.stderr.startswith("telemed: set TELEMED_SIGNING_KEY_FILE")

    where = await tamper_everything(c)
    text_report = telemed_verify(c, c.cid)
    assert text_report.returncode == 1
    lines = text_report.stdout.splitlines()
    seq = where["event"]
    assert any(line.startswith(f"MISMATCH event_chain seq {seq}: event {seq} ") for line in lines)
    assert any(line.startswith("MISMATCH recording_file recording rec_verify: ") for line in lines)
    assert f"  expected: {hashlib.sha256(FILE).hexdigest()}" in lines
    assert lines[-1] == "4 mismatches"

    as_json = telemed_verify(c, c.cid, "--json")
    assert as_json.returncode == 1
    parsed = json.loads(as_json.stdout)
    assert parsed["ok"] is False and len(parsed["mismatches"]) == 4
