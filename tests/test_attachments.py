"""Attachments through the real app: uploads told by their bytes, streamed under a cap, sealed
and hashed like recordings, permissions on every action, every access audited, the record's
timeline, trainees' de-identified DICOM."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from api_helpers import (
    ADMIN,
    COORDINATOR,
    COUNTY,
    OUTSIDER,
    SPECIALIST,
    TOWNSHIP,
    VILLAGE,
    Api,
    Identity,
    assert_problem,
    one,
)
from attachment_helpers import (
    PATIENT_ID,
    PATIENT_NAME,
    dicom_declared_compressed,
    dicom_file,
    dicom_without_pixels,
    form,
    jpeg,
    jpeg_with_exif,
    pdf,
    png,
    upload,
)
from PIL import Image
from pytest_aiohttp import AiohttpClient

from rooms.model import Consent, ConsentKind, ConsultationId, UserId
from rooms.retention import Period, RetentionPeriods
from rooms.roles import Role
from server.app import CONFIG, STORE, create_app
from server.config import load_config
from server.dicom import PATIENT_IDENTIFIERS
from server.retention import run_retention

TRAINEE = Identity(UserId("trainee-1"), "学员甲", Role.TRAINEE, "医学院")


async def resident_token(api: Api, cid: str) -> str:
    reply = await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})
    assert reply.status == 201, reply
    token: str = reply.body["token"]
    return token


async def trainee_token(api: Api, cid: str) -> str:
    reply = await api.post(one(cid, "/invites"), VILLAGE, {"role": "trainee", "name": TRAINEE.name})
    assert reply.status == 201, reply
    token: str = reply.body["token"]
    return token


@pytest.mark.parametrize(
    ("data", "media_type"),
    [
        (jpeg(), "image/jpeg"),
        (png(), "image/png"),
        (pdf(), "application/pdf"),
        (dicom_file(), "application/dicom"),
    ],
    ids=["jpeg", "png", "pdf", "dicom"],
)
async def test_each_kind_is_stored_sealed_hashed_and_served_back(
    backend_api: Api, data: bytes, media_type: str
) -> None:
    api = backend_api
    cid = await api.create()
    # The declared type and the name say nothing: the bytes do.
    reply = await upload(api, cid, VILLAGE, data, filename="x.txt", content_type="text/plain")
    assert reply.status == 201, reply
    body = reply.body
    assert body["media_type"] == media_type
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["size_bytes"] == len(data)
    assert body["filename"] == "x.txt"
    assert body["added_by"] == VILLAGE.user_id and body["added_by_role"] == "village_doctor"
    assert body["session_id"] is None and body["kind"] == "document"
    # Sealed at rest: the plaintext is nowhere in the file.
    files = list((api.app[CONFIG].data_dir / "attachments" / cid).iterdir())
    assert [f.name for f in files] == [body["id"]]
    assert data[:64] not in files[0].read_bytes()

    got = await api.get(one(cid, f"/attachments/{body['id']}/content"), COUNTY)
    assert got.status == 200, got
    assert got.raw == data
    assert got.content_type == media_type
    listed = await api.get(one(cid, "/attachments"), SPECIALIST)
    assert [a["id"] for a in listed.body["items"]] == [body["id"]]
    meta = await api.get(one(cid, f"/attachments/{body['id']}"), TOWNSHIP)
    assert meta.body == {**body, "deidentified": False}


async def test_wrong_magic_is_a_415_naming_what_was_found(api: Api) -> None:
    cid = await api.create()
    gif = b"GIF89a" + b"\x00" * 200
    reply = await upload(api, cid, VILLAGE, gif, filename="photo.jpg", content_type="image/jpeg")
    problem = assert_problem(reply, 415, "a GIF image", "JPEG", "DICM at byte 128")
    assert problem["code"] == "unsupported_attachment"
    text = await upload(api, cid, VILLAGE, b"hello, this is not a scan" * 10)
    assert_problem(text, 415, "it is text")
    odd = await upload(api, cid, VILLAGE, bytes(range(200, 256)) * 4)
    assert_problem(odd, 415, "unknown content starting with c8 c9 ca")
    # DICM at 128 but nothing a DICOM reader can read after it.
    fake = b"\x00" * 128 + b"DICM" + b"\xff" * 50
    assert_problem(await upload(api, cid, VILLAGE, fake), 415, "not DICOM")
    # Nothing was kept of any of them.
    assert (await api.get(one(cid, "/attachments"), VILLAGE)).body["items"] == []
    folder = api.app[CONFIG].data_dir / "attachments" / cid
    assert not folder.exists() or list(folder.iterdir()) == []


async def test_an_oversize_file_is_a_413_naming_the_limit(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    config = load_config(
        env={},
        overrides={"dev": True, "data_dir": str(tmp_path), "attachments.max_bytes": 100_000},
    )
    api = Api(await aiohttp_client(create_app(config)))
    cid = await api.create()
    big = jpeg() + b"\x00" * 100_000
    reply = await upload(api, cid, VILLAGE, big)
    problem = assert_problem(reply, 413, "limit of 100000 bytes")
    assert problem["code"] == "attachment_too_large"
    # A Content-Length far over the limit is refused before a byte is read.
    huge = await api.request(
        "POST",
        one(cid, "/attachments"),
        VILLAGE,
        data=b"x" * 300_000,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_problem(huge, 413, "the limit is")
    folder = config.data_dir / "attachments" / cid
    assert not folder.exists() or list(folder.iterdir()) == []
    # Just under the limit is fine.
    ok = await upload(api, cid, VILLAGE, jpeg() + b"\x00" * 1000)
    assert ok.status == 201, ok


async def test_malformed_uploads_are_clear_400s_and_415s(api: Api) -> None:
    cid = await api.create()
    path = one(cid, "/attachments")
    not_multipart = await api.post(path, VILLAGE, {"file": "x"})
    assert_problem(not_multipart, 415, "multipart/form-data")
    truncated = await api.request(
        "POST",
        path,
        VILLAGE,
        data=b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n\xff\xd8\xff'
        + b"\x00" * 200,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_problem(truncated, 400, "ends before its closing boundary")
    no_file = aiohttp.FormData(default_to_multipart=True)
    no_file.add_field("kind", "document")
    assert_problem(await upload(api, cid, VILLAGE, no_file), 400, "no `file` part")
    two = form(jpeg())
    two.add_field("file", jpeg(), filename="b.jpg")
    assert_problem(await upload(api, cid, VILLAGE, two), 400, "more than one `file`")
    unknown = form(jpeg(), colour="red")
    assert_problem(await upload(api, cid, VILLAGE, unknown), 400, "unknown form field 'colour'")
    bad_kind = await upload(api, cid, VILLAGE, jpeg(), kind="xray")
    assert_problem(bad_kind, 400, "form")
    bad_time = await upload(api, cid, VILLAGE, jpeg(), kind="snapshot", taken_at="yesterday")
    assert_problem(bad_time, 400, "taken_at")
    misplaced = await upload(api, cid, VILLAGE, jpeg(), track="t1")
    assert_problem(misplaced, 400, "belong to a snapshot")
    assert (await api.get(path, VILLAGE)).body["items"] == []


async def test_bad_and_foreign_ids_are_404s(api: Api) -> None:
    cid = await api.create()
    other = await api.create()
    added = (await upload(api, other, VILLAGE, jpeg())).body["id"]
    for bad in ["att_nope", "x" * 300, "%E2%80%AE", added]:
        reply = await api.get(one(cid, f"/attachments/{bad}/content"), VILLAGE)
        assert_problem(reply, 404)
    assert_problem(await api.get(one("c_missing", "/attachments"), VILLAGE), 404)
    assert_problem(await upload(api, "c_missing", VILLAGE, jpeg()), 404)


async def test_permissions_on_every_action(api: Api) -> None:
    cid = await api.create()
    other = await api.create()
    added = (await upload(api, cid, COUNTY, pdf())).body["id"]
    # Not on the team, a coordinator (no clinical content), nobody.
    for who in (OUTSIDER, COORDINATOR):
        assert_problem(await upload(api, cid, who, jpeg()), 403)
        assert_problem(await api.get(one(cid, "/attachments"), who), 403)
        assert_problem(await api.get(one(cid, f"/attachments/{added}/content"), who), 403)
    assert_problem(await upload(api, cid, None, jpeg()), 401)
    # A resident adds to their own consultation, and only to it.
    resident = await resident_token(api, cid)
    own = await upload(api, cid, resident, jpeg())
    assert own.status == 201, own
    assert own.body["added_by_role"] == "resident"
    assert_problem(await upload(api, other, resident, jpeg()), 403, "scoped to another")
    assert_problem(await api.get(one(other, "/attachments"), resident), 403)
    # Once the consultation is over, nothing more is added.
    await api.act(cid, "cancel", VILLAGE, {"reason": "resident moved away"})
    assert_problem(await upload(api, cid, VILLAGE, jpeg()), 409, "cancelled")


async def test_every_access_is_audited(api: Api) -> None:
    cid = await api.create()
    added = (await upload(api, cid, VILLAGE, jpeg())).body
    await api.get(one(cid, "/attachments"), COUNTY)
    await api.get(one(cid, f"/attachments/{added['id']}"), COUNTY)
    await api.get(one(cid, f"/attachments/{added['id']}/content"), SPECIALIST)
    entries = [e for e in await api.audit(consultation=cid) if "attachment" in e["action"]]
    assert [(e["action"], e["actor"], e["target"]) for e in entries] == [
        ("add_attachment", VILLAGE.user_id, added["id"]),
        ("view_attachment", COUNTY.user_id, None),
        ("view_attachment", COUNTY.user_id, added["id"]),
        ("download_attachment", SPECIALIST.user_id, added["id"]),
    ]
    assert entries[0]["detail"]["sha256"] == added["sha256"]
    assert entries[3]["detail"] == {"use": "content", "deidentified": False}


async def test_during_a_session_it_is_on_the_timeline_and_a_snapshot_records_its_taker(
    api: Api,
) -> None:
    cid = await api.create()
    before = (await upload(api, cid, VILLAGE, pdf())).body
    assert_problem(
        await upload(api, cid, COUNTY, jpeg(), kind="snapshot"), 409, "during a live session"
    )
    await api.act(cid, "accept", COUNTY)
    await api.act(cid, "schedule", COUNTY, {"scheduled_time": "2025-03-02T10:00:00+08:00"})
    session = await api.start_session(cid)
    taken = "2025-03-02T10:05:07+08:00"
    snap = await upload(api, cid, COUNTY, png(), kind="snapshot", taken_at=taken, track="t_cam1")
    assert snap.status == 201, snap
    assert snap.body["kind"] == "snapshot" and snap.body["session_id"] == session.id
    assert snap.body["added_by"] == COUNTY.user_id
    assert datetime.fromisoformat(snap.body["taken_at"]) == datetime.fromisoformat(taken)
    assert snap.body["track"] == "t_cam1"
    not_image = await upload(api, cid, COUNTY, pdf(), kind="snapshot")
    assert_problem(not_image, 400, "a snapshot is a JPEG or PNG")

    record = await api.get(one(cid, "/record"), VILLAGE)
    assert [a["id"] for a in record.body["attachments"]] == [before["id"], snap.body["id"]]
    events = [e for e in record.body["events"] if e["kind"] == "attachment_added"]
    assert len(events) == 1
    assert events[0]["data"]["attachment"] == snap.body["id"]
    assert events[0]["data"]["sha256"] == snap.body["sha256"]
    assert events[0]["actor"] == COUNTY.user_id


async def test_a_trainee_sees_dicom_stripped_and_no_documents(api: Api) -> None:
    cid = await api.scheduled(kind="teaching")
    dicom = (await upload(api, cid, SPECIALIST, dicom_file(), filename="刘奶奶.dcm")).body
    report = (await upload(api, cid, SPECIALIST, pdf())).body
    photo = (await upload(api, cid, SPECIALIST, jpeg_with_exif())).body
    trainee = await trainee_token(api, cid)
    # No teaching-use consent yet: nothing.
    refused = assert_problem(await api.get(one(cid, "/attachments"), trainee), 403)
    assert refused["code"] == "teaching_consent_required"
    async with api.app[STORE].transaction() as tx:
        await tx.add_consent(
            Consent(
                ConsultationId(cid),
                None,
                ConsentKind.TEACHING,
                True,
                UserId("res"),
                "self",
                datetime.now(UTC),
            )
        )
    listed = (await api.get(one(cid, "/attachments"), trainee)).body["items"]
    assert [a["id"] for a in listed] == [dicom["id"], photo["id"]]  # no PDF report
    assert all(a["deidentified"] and a["filename"] is None for a in listed)
    assert_problem(await api.get(one(cid, f"/attachments/{report['id']}/content"), trainee), 404)
    # The DICOM file itself is not handed out; its metadata without identifiers is.
    raw = await api.get(one(cid, f"/attachments/{dicom['id']}/content"), trainee)
    assert assert_problem(raw, 403)["code"] == "deidentified_only"
    shown = await api.get(one(cid, f"/attachments/{dicom['id']}/dicom"), trainee)
    assert shown.status == 200, shown
    assert shown.body["deidentified"] is True
    elements = shown.body["elements"]
    assert elements["Modality"] == "OT" and elements["Rows"] == 8
    assert not PATIENT_IDENTIFIERS & set(elements)
    assert PATIENT_NAME not in shown.raw.decode() and PATIENT_ID not in shown.raw.decode()
    full = await api.get(one(cid, f"/attachments/{dicom['id']}/dicom"), COUNTY)
    assert full.body["elements"]["PatientName"] == PATIENT_NAME
    assert full.body["elements"]["PatientID"] == PATIENT_ID
    # An image without its EXIF (the phone's owner named in it).
    picture = await api.get(one(cid, f"/attachments/{photo['id']}/content"), trainee)
    assert picture.status == 200
    assert "刘奶奶".encode() not in picture.raw
    with Image.open(io.BytesIO(picture.raw)) as image:
        assert image.format == "JPEG" and not image.getexif()
    team_copy = await api.get(one(cid, f"/attachments/{photo['id']}/content"), COUNTY)
    assert team_copy.raw == jpeg_with_exif()


async def test_dicom_renders_to_png_with_its_pixels(api: Api) -> None:
    cid = await api.create()
    added = (await upload(api, cid, VILLAGE, dicom_file(rows=8, columns=16))).body
    reply = await api.get(one(cid, f"/attachments/{added['id']}/image.png"), COUNTY)
    assert reply.status == 200, reply
    assert reply.content_type == "image/png"
    with Image.open(io.BytesIO(reply.raw)) as image:
        assert image.size == (16, 8) and image.mode == "L"
        assert image.getpixel((0, 0)) == 0 and image.getpixel((15, 7)) == 255
    not_dicom = (await upload(api, cid, VILLAGE, jpeg())).body["id"]
    assert_problem(
        await api.get(one(cid, f"/attachments/{not_dicom}/image.png"), COUNTY), 409, "not DICOM"
    )


async def test_a_damaged_file_is_refused_clearly(api: Api) -> None:
    cid = await api.create()
    added = (await upload(api, cid, VILLAGE, jpeg())).body["id"]
    path = api.app[CONFIG].data_dir / "attachments" / cid / added
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1
    path.write_bytes(bytes(raw))
    reply = await api.get(one(cid, f"/attachments/{added}/content"), VILLAGE)
    assert assert_problem(reply, 409, "does not read back")["code"] == "attachment_damaged"
    path.unlink()
    assert_problem(await api.get(one(cid, f"/attachments/{added}/content"), VILLAGE), 404, "gone")


async def test_retention_destroys_attachments_with_their_record_never_on_hold(
    backend_api: Api,
) -> None:
    api = backend_api
    data_dir = api.app[CONFIG].data_dir
    cid = await api.create()
    kept = await api.create()
    added = (await upload(api, cid, VILLAGE, dicom_file())).body
    assert (await upload(api, kept, VILLAGE, jpeg())).status == 201
    await api.act(cid, "cancel", VILLAGE, {"reason": "家属决定去省医院"})
    await api.act(kept, "cancel", VILLAGE, {"reason": "家属决定去省医院"})
    hold = await api.request(
        "PUT", one(kept, "/legal-hold"), ADMIN, json_body={"reason": "court order 17"}
    )
    assert hold.status == 200, hold
    file = data_dir / "attachments" / cid / added["id"]
    assert file.exists()
    later = datetime(2060, 1, 1, tzinfo=UTC)
    periods = RetentionPeriods(Period(15), Period(3), Period(0, 6))
    dry = await run_retention(api.app[STORE], periods, data_dir, later, dry_run=True)
    assert file.exists()
    assert [d.detail["attachments"] for d in dry.destroyed if d.what == "record"] == [
        [
            {
                "id": added["id"],
                "media_type": "application/dicom",
                "sha256": added["sha256"],
                "size_bytes": added["size_bytes"],
                "file": "present",
            }
        ]
    ]
    report = await run_retention(api.app[STORE], periods, data_dir, later)
    record = next(d for d in report.destroyed if d.what == "record")
    assert record.consultation_id == cid
    assert record.detail["rows"]["attachments"] == 1
    assert record.detail["attachments"][0]["file"] == "deleted"
    assert not file.exists()
    # The held consultation keeps its attachment, file and all.
    listed = await api.get(one(kept, "/attachments"), VILLAGE)
    assert len(listed.body["items"]) == 1
    only = listed.body["items"][0]["id"]
    assert (await api.get(one(kept, f"/attachments/{only}/content"), VILLAGE)).raw == jpeg()


async def test_the_fhir_export_holds_each_attachment_as_a_document_reference(
    backend_api: Api,
) -> None:
    from test_fhir import validate

    api = backend_api
    cid = await api.scheduled()
    report = (await upload(api, cid, VILLAGE, pdf(), filename="血常规.pdf")).body
    session = await api.start_session(cid)
    snap = (await upload(api, cid, COUNTY, jpeg(), kind="snapshot", track="t_cam")).body
    reply = await api.get(one(cid, "/fhir"), VILLAGE)
    assert reply.status == 200, reply
    bundle = reply.body
    validate(bundle)
    documents = [
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DocumentReference"
    ]
    by_id = {d["identifier"][0]["value"]: d for d in documents}
    assert set(by_id) == {report["id"], snap["id"]}
    first = by_id[report["id"]]["content"][0]["attachment"]
    assert first["contentType"] == "application/pdf" and first["title"] == "血常规.pdf"
    assert first["size"] == report["size_bytes"]
    assert first["url"].endswith(f"/attachments/{report['id']}/content")
    assert {"valueString": report["sha256"]}.items() <= first["extension"][0].items()
    assert "context" not in by_id[report["id"]]
    taken = by_id[snap["id"]]
    assert taken["type"]["coding"][0]["code"] == "snapshot"
    encounter = taken["context"]["encounter"][0]["reference"]
    encounters = {
        e["fullUrl"]: e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Encounter"
    }
    assert session.id in str(encounters[encounter]["identifier"])


async def test_verify_checks_each_attachment_file(api: Api) -> None:
    cid = await api.create()
    good = (await upload(api, cid, VILLAGE, png())).body
    bad = (await upload(api, cid, VILLAGE, jpeg())).body
    clean = await api.get(one(cid, "/verify"), ADMIN)
    assert clean.status == 200, clean
    assert clean.body["ok"] is True and clean.body["checked"]["attachment_files"] == 2
    path = api.app[CONFIG].data_dir / "attachments" / cid / bad["id"]
    path.unlink()
    broken = (await api.get(one(cid, "/verify"), ADMIN)).body
    assert broken["ok"] is False
    assert [(m["check"], m["where"], m["problem"]) for m in broken["mismatches"]] == [
        ("attachment_file", f"attachment {bad['id']}", "the file is missing")
    ]
    assert good["id"] not in str(broken["mismatches"])


async def test_hostile_dicom_is_refused_or_not_rendered_never_a_500(api: Api) -> None:
    cid = await api.create()
    whole = dicom_file()
    for cut in (len(whole) // 2, 140, 200):
        reply = await upload(api, cid, VILLAGE, whole[:cut])
        # Cut in its file meta it is no DICOM; cut in its pixels pydicom still reads the
        # metadata, and rendering says what is wrong.
        assert reply.status in (201, 415), reply
        if reply.status == 201:
            image = await api.get(one(cid, f"/attachments/{reply.body['id']}/image.png"), COUNTY)
            assert_problem(image, 409)
    junk_meta = b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"1.2" * 20
    assert_problem(await upload(api, cid, VILLAGE, junk_meta), 415, "not DICOM")
    no_pixels = (await upload(api, cid, VILLAGE, dicom_without_pixels())).body["id"]
    reply = await api.get(one(cid, f"/attachments/{no_pixels}/image.png"), COUNTY)
    problem = assert_problem(reply, 409, "no image")
    assert problem["code"] == "attachment_not_renderable"
    compressed = await upload(api, cid, VILLAGE, dicom_declared_compressed())
    assert compressed.status == 201, compressed
    reply = await api.get(one(cid, f"/attachments/{compressed.body['id']}/image.png"), COUNTY)
    assert_problem(reply, 409, "compressed", "uncompressed DICOM only")
    # Its metadata still reads.
    meta = await api.get(one(cid, f"/attachments/{compressed.body['id']}/dicom"), COUNTY)
    assert meta.body["elements"]["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.50"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--b\r\n"),
        ("multipart/form-data; boundary=", b"--\r\n"),
        ("multipart/form-data; boundary=b", b""),
        ("multipart/form-data; boundary=b", b"no boundary here at all"),
        (
            "multipart/form-data; boundary=b",
            b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
        ),
        ("multipart/mixed; boundary=b", b"--b\r\n\r\n--b--\r\n"),
        ("image/jpeg", b"\xff\xd8\xff\xe0" + b"\x00" * 100),
        ("application/octet-stream", b""),
    ],
    ids=[
        "no-boundary",
        "empty-boundary",
        "empty-body",
        "garbage",
        "nameless-part",
        "mixed",
        "raw-jpeg",
        "octet-stream",
    ],
)
async def test_hostile_bodies_get_a_clear_4xx(api: Api, content_type: str, body: bytes) -> None:
    cid = await api.create()
    reply = await api.request(
        "POST", one(cid, "/attachments"), VILLAGE, data=body, headers={"Content-Type": content_type}
    )
    assert reply.status in (400, 415), reply
    assert_problem(reply, reply.status)
    assert (await api.get(one(cid, "/attachments"), VILLAGE)).body["items"] == []


async def test_a_download_that_does_not_match_the_record_is_broken_off(api: Api) -> None:
    from sqlalchemy import update

    from server.db.tables import attachments

    cid = await api.create()
    added = (await upload(api, cid, VILLAGE, pdf())).body["id"]
    async with api.app[STORE].transaction() as tx:
        await tx.connection.execute(
            update(attachments)
            .where(attachments.c.id == added)
            .values(sha256=hashlib.sha256(b"another file").hexdigest())
        )
    async with api.client.get(
        one(cid, f"/attachments/{added}/content"), headers=api.auth(VILLAGE)
    ) as reply:
        assert reply.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await reply.read()
