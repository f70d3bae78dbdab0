"""Rules of the opinion (会诊意见): versions, signatures, locking, amendments.

A signature is Ed25519 over signed_form(): the version's content, amendment reason, content
hash, author and time, the previous version's content hash, and the signer, their role, the
signing time and the key id. The key is the server's (server/signing.py, behind
OpinionSigner); every read verifies every signature (verified())."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Protocol

from rooms.errors import Conflict, InvalidInput
from rooms.model import (
    Consultation,
    OpinionContent,
    OpinionVersion,
    Signature,
    SignatureCheck,
    UserId,
)
from rooms.roles import INVITED_PHYSICIAN_ROLES, Role


class OpinionSigner(Protocol):
    """The key that signs opinion versions and the keys that verify them."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...

    def verify(self, key_id: str, data: bytes, signature: bytes) -> bool | None:
        """Whether `signature` is key_id's over `data`; None if key_id is not known."""
        ...


def content_hash(
    consultation: Consultation,
    version: int,
    content: OpinionContent,
    amendment_reason: str | None = None,
) -> str:
    """SHA-256 of a canonical JSON form: what a signature is a signature of. An amendment's
    reason is part of what its signers sign."""
    fields: dict[str, object] = {
        "consultation": consultation.id,
        "version": version,
        **asdict(content),
    }
    if amendment_reason is not None:
        fields["amendment_reason"] = amendment_reason
    return hashlib.sha256(_canonical(fields)).hexdigest()


def _canonical(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _time(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


def signed_form(
    version: OpinionVersion,
    previous: OpinionVersion | None,
    signer: UserId,
    signer_name: str,
    signer_role: Role,
    signed_at: datetime,
    key_id: str,
) -> bytes:
    """The bytes a signature covers (canonical JSON)."""
    return _canonical(
        {
            "consultation": version.consultation_id,
            "version": version.version,
            "content": asdict(version.content),
            "amendment_reason": version.amendment_reason,
            "content_hash": version.content_hash,
            "author": version.author,
            "created_at": _time(version.created_at),
            "previous_version_hash": previous.content_hash if previous is not None else None,
            "signer": signer,
            "signer_name": signer_name,
            "signer_role": signer_role.value,
            "signed_at": _time(signed_at),
            "key_id": key_id,
        }
    )


def sign(
    signer: OpinionSigner,
    version: OpinionVersion,
    previous: OpinionVersion | None,
    by: UserId,
    name: str,
    role: Role,
    at: datetime,
) -> Signature:
    key_id = signer.key_id
    data = signed_form(version, previous, by, name, role, at, key_id)
    return Signature(
        version=version.version,
        signer=by,
        signer_name=name,
        signer_role=role,
        signed_at=at,
        content_hash=version.content_hash,
        key_id=key_id,
        value=base64.b64encode(signer.sign(data)).decode("ascii"),
        check=SignatureCheck.VALID,
    )


def check(
    signer: OpinionSigner,
    version: OpinionVersion,
    previous: OpinionVersion | None,
    signature: Signature,
) -> SignatureCheck:
    if signature.key_id is None or signature.value is None:
        return SignatureCheck.UNSIGNED
    if signature.content_hash != version.content_hash:
        return SignatureCheck.INVALID
    try:
        raw = base64.b64decode(signature.value, validate=True)
    except (binascii.Error, ValueError):
        return SignatureCheck.INVALID
    data = signed_form(
        version,
        previous,
        signature.signer,
        signature.signer_name,
        signature.signer_role,
        signature.signed_at,
        signature.key_id,
    )
    result = signer.verify(signature.key_id, data, raw)
    if result is None:
        return SignatureCheck.UNKNOWN_KEY
    return SignatureCheck.VALID if result else SignatureCheck.INVALID


def verified(signer: OpinionSigner, versions: Sequence[OpinionVersion]) -> list[OpinionVersion]:
    """Every version (of one consultation) with each signature's check set."""
    ordered = sorted(versions, key=lambda v: v.version)
    by_number = {v.version: v for v in ordered}
    return [
        replace(
            v,
            signatures=tuple(
                replace(s, check=check(signer, v, by_number.get(v.version - 1), s))
                for s in v.signatures
            ),
        )
        for v in ordered
    ]


def check_new_version(versions: Sequence[OpinionVersion], amendment_reason: str | None) -> None:
    """Once any version is signed the opinion is locked: every later version is an amendment
    and says why."""
    signed = [v for v in versions if v.locked]
    if not signed:
        if amendment_reason is not None:
            raise InvalidInput("amendment_reason is only for changing a signed opinion")
        return
    if not (amendment_reason and amendment_reason.strip()):
        newest_signed = max(v.version for v in signed)
        raise Conflict(
            f"version {newest_signed} is signed and locked; an amendment needs amendment_reason"
        )


def check_signature(
    latest: OpinionVersion | None, signer: UserId, version: int | None
) -> OpinionVersion:
    """Only the newest version is signed, once per signer, and only the version the signer read."""
    if latest is None:
        raise Conflict("there is no opinion to sign yet")
    if version is not None and version != latest.version:
        raise Conflict(f"version {version} is not the newest (newest is {latest.version})")
    if any(s.signer == signer for s in latest.signatures):
        raise Conflict(f"you have already signed version {latest.version}")
    return latest


def required_signers(consultation: Consultation) -> frozenset[UserId]:
    return frozenset(m.user_id for m in consultation.team if m.role in INVITED_PHYSICIAN_ROLES)


def fully_signed(consultation: Consultation, version: OpinionVersion) -> bool:
    required = required_signers(consultation)
    signed = {s.signer for s in version.signatures}
    return bool(required) and required <= signed


def latest(versions: Sequence[OpinionVersion]) -> OpinionVersion | None:
    return max(versions, key=lambda v: v.version, default=None)
