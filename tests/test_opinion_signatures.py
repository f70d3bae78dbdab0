"""Opinion signatures: Ed25519 with the server's key over the signed form (content, author,
signer, time, the previous version's hash), verified on every read and in the FHIR export."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from api_helpers import COUNTY, SPECIALIST, VILLAGE, Api, one
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from record_helpers import signing_key_file
from sqlalchemy import text
from test_fhir import entries, export, full_consultation

from rooms import opinion
from rooms.model import (
    ConsultationId,
    OpinionContent,
    OpinionVersion,
    Signature,
    SignatureCheck,
    UserId,
)
from rooms.roles import Role
from server.app import SIGNER, STORE
from server.config import ConfigError, SigningConfig
from server.signing import OpinionKeys, load_opinion_keys

AT = datetime(2026, 12, 3, 9, 30, 0, 123456, tzinfo=UTC)
CONTENT = OpinionContent("右下肺湿啰音", "社区获得性肺炎", "阿莫西林", "血氧低于94%转诊")


def version(number: int, content: OpinionContent = CONTENT) -> OpinionVersion:
    return OpinionVersion(
        consultation_id=ConsultationId("c-1"),
        version=number,
        content=content,
        author=UserId("u-county"),
        created_at=AT + timedelta(minutes=number),
        amendment_reason=None if number == 1 else "补充",
        content_hash=f"{number:064x}",
    )


def signed(keys: OpinionKeys, v: OpinionVersion, previous: OpinionVersion | None) -> Signature:
    return opinion.sign(
        keys, v, previous, UserId("u-prov"), "省专家", Role.PROVINCIAL_SPECIALIST, AT
    )


def with_signature(v: OpinionVersion, s: Signature) -> OpinionVersion:
    return dataclasses.replace(v, signatures=(dataclasses.replace(s, check=None),))


def test_a_signature_verifies_and_any_change_to_what_it_covers_breaks_it() -> None:
    keys = OpinionKeys(Ed25519PrivateKey.generate())
    v1, v2 = version(1), version(2)
    s2 = signed(keys, v2, v1)
    assert s2.key_id == keys.key_id and s2.key_id.startswith("ed25519:")
    assert len(base64.b64decode(s2.value or "")) == 64
    good = opinion.verified(keys, [v1, with_signature(v2, s2)])
    assert good[1].signatures[0].check is SignatureCheck.VALID

    changed_content = dataclasses.replace(v2, content=dataclasses.replace(CONTENT, findings="无"))
    changed_previous = dataclasses.replace(v1, content_hash="f" * 64)
    changed_signer = dataclasses.replace(s2, signer_name="别人")
    changed_time = dataclasses.replace(s2, signed_at=AT + timedelta(seconds=1))
    changed_author = dataclasses.replace(v2, author=UserId("u-other"))
    for versions in (
        [v1, with_signature(changed_content, s2)],
        [changed_previous, with_signature(v2, s2)],
        [v1, with_signature(v2, changed_signer)],
        [v1, with_signature(v2, changed_time)],
        [v1, with_signature(changed_author, s2)],
        [v1, with_signature(v2, dataclasses.replace(s2, value="not base64!"))],
    ):
        assert opinion.verified(keys, versions)[1].signatures[0].check is SignatureCheck.INVALID


def test_rotated_keys_still_verify_and_unknown_or_legacy_ones_say_so() -> None:
    old = Ed25519PrivateKey.generate()
    old_keys = OpinionKeys(old)
    v1 = version(1)
    s1 = signed(old_keys, v1, None)
    rotated = OpinionKeys(Ed25519PrivateKey.generate(), [old.public_key()])
    assert rotated.key_id != old_keys.key_id
    assert opinion.verified(rotated, [with_signature(v1, s1)])[0].signatures[0].check is (
        SignatureCheck.VALID
    )
    forgetful = OpinionKeys(Ed25519PrivateKey.generate())
    assert opinion.verified(forgetful, [with_signature(v1, s1)])[0].signatures[0].check is (
        SignatureCheck.UNKNOWN_KEY
    )
    legacy = dataclasses.replace(s1, key_id=None, value=None)
    assert opinion.verified(rotated, [with_signature(v1, legacy)])[0].signatures[0].check is (
        SignatureCheck.UNSIGNED
    )


def test_keys_load_from_pem_files(tmp_path: Path) -> None:
    key_file = signing_key_file(tmp_path)
    private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    previous = tmp_path / "old.pub.pem"
    old = Ed25519PrivateKey.generate()
    previous.write_bytes(
        old.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    keys = load_opinion_keys(
        SigningConfig(key_file=key_file, previous_public_keys=[previous]), dev=False
    )
    data = b"signed form"
    assert keys.verify(keys.key_id, data, private.sign(data)) is True
    assert keys.verify(OpinionKeys(old).key_id, data, old.sign(data)) is True
    assert keys.verify(keys.key_id, data, old.sign(data)) is False
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        load_opinion_keys(
            SigningConfig(key_file=key_file, previous_public_keys=[key_file]), dev=False
        )


# -- through the API -----------------------------------------------------------------------------


async def signed_twice(api: Api) -> str:
    """full_consultation with its amendment (version 2) signed by both physicians too."""
    cid, _, _ = await full_consultation(api)
    for who in (COUNTY, SPECIALIST):
        reply = await api.post(one(cid, "/opinions/sign"), who, {"version": 2})
        assert reply.status == 200, reply
        mine = next(s for s in reply.body["opinion"]["signatures"] if s["signer"] == who.user_id)
        assert mine["verification"] == "valid" and mine["key_id"] == api.app[SIGNER].key_id
    return cid


async def signatures(api: Api, cid: str) -> list[tuple[int, str, str]]:
    reply = await api.get(one(cid, "/record"), VILLAGE)
    assert reply.status == 200, reply
    return [
        (v["version"], s["signer"], s["verification"])
        for v in reply.body["opinions"]
        for s in v["signatures"]
    ]


async def test_every_read_verifies_and_shows_a_changed_opinion(api: Api) -> None:
    cid = await signed_twice(api)
    assert {check for _, _, check in await signatures(api, cid)} == {"valid"}
    async with api.app[STORE].engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE opinion_versions SET recommendations = '不必复查' "
                f"WHERE consultation_id = '{cid}' AND version = 1"
            )
        )
    # Version 1's signatures no longer match its content; version 2's still do (they cover
    # version 1's content hash, which did not change).
    assert sorted(await signatures(api, cid)) == [
        (1, COUNTY.user_id, "invalid"),
        (1, SPECIALIST.user_id, "invalid"),
        (2, COUNTY.user_id, "valid"),
        (2, SPECIALIST.user_id, "valid"),
    ]


async def test_the_fhir_provenance_carries_a_signature_anyone_can_check(api: Api) -> None:
    cid = await signed_twice(api)
    bundle = await export(api, cid, VILLAGE)
    provenance = entries(bundle, "Provenance")
    assert len(provenance) == 4
    public = serialization.load_pem_public_key(
        (api.app[SIGNER].public_key_pem(api.app[SIGNER].key_id) or "").encode()
    )
    assert isinstance(public, Ed25519PublicKey)
    for p in provenance:
        (sig,) = p["signature"]
        assert sig["sigFormat"] == "application/octet-stream"
        assert sig["targetFormat"] == "application/json"
        assert sig["when"] and sig["who"] and sig["type"][0]["system"]
        ext = {e["url"].rsplit("/", 1)[1]: e for e in sig["extension"]}
        assert ext["signature-verification"]["valueCode"] == "valid"
        assert ext["signature-algorithm"]["valueCode"] == "Ed25519"
        form = base64.b64decode(ext["signed-form"]["valueBase64Binary"])
        signed_form: dict[str, Any] = json.loads(form)
        assert signed_form["key_id"] == ext["signature-key-id"]["valueString"]
        assert signed_form["content_hash"] == ext["content-sha256"]["valueString"]
        public.verify(base64.b64decode(sig["data"]), form)  # raises if it does not verify
