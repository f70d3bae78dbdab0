"""Rules of the opinion (会诊意见): versions, signatures, locking, amendments."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict

from rooms.errors import Conflict, InvalidInput
from rooms.model import Consultation, OpinionContent, OpinionVersion, UserId
from rooms.roles import INVITED_PHYSICIAN_ROLES


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
    canonical = json.dumps(
        fields,
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
