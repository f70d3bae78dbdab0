"""The opinion (会诊意见): content hash, versions, locking, signatures."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from datetime import UTC, datetime

import pytest

from rooms.errors import Conflict, InvalidInput
from rooms.model import (
    Consultation,
    ConsultationId,
    ConsultationKind,
    ConsultationStatus,
    OpinionContent,
    OpinionVersion,
    Resident,
    Sex,
    Signature,
    TeamMember,
    UserId,
)
from rooms.opinion import (
    check_new_version,
    check_signature,
    content_hash,
    fully_signed,
    latest,
    required_signers,
)
from rooms.roles import Role

C1 = ConsultationId("c-1")
VD = UserId("u-village")
TD = UserId("u-township")
CP = UserId("u-county")
PS = UserId("u-provincial")
PS2 = UserId("u-provincial-2")
CO = UserId("u-coord")
RES = UserId("r-pseudo-1")

HEX64 = re.compile(r"[0-9a-f]{64}")

CONTENT = OpinionContent(
    findings="Cough for three weeks, low fever, crackles at the right base.",
    assessment="Community-acquired pneumonia, likely bacterial.",
    recommendations="Chest X-ray, full blood count; amoxicillin if confirmed.",
    referral_advice="Refer to county hospital if SpO2 < 94%.",
)
CONTENT_ZH = OpinionContent(
    findings="咳嗽三周，低热，右下肺可闻及湿啰音。",
    assessment="社区获得性肺炎，细菌性可能大。",
    recommendations="胸片、血常规；确诊后口服阿莫西林。",
    referral_advice="血氧饱和度低于94%转县医院。",
)


def member(user_id: UserId, role: Role, institution: str = "somewhere") -> TeamMember:
    return TeamMember(user_id, f"name of {user_id}", role, institution, datetime.now(UTC))


def make_consultation(
    team: list[TeamMember] | None = None, consultation_id: ConsultationId = C1
) -> Consultation:
    now = datetime.now(UTC)
    if team is None:
        team = [
            member(VD, Role.VILLAGE_DOCTOR),
            member(TD, Role.TOWNSHIP_DOCTOR),
            member(CP, Role.COUNTY_PHYSICIAN),
            member(PS, Role.PROVINCIAL_SPECIALIST),
            member(RES, Role.RESIDENT),
            member(CO, Role.COORDINATOR),
        ]
    return Consultation(
        id=consultation_id,
        kind=ConsultationKind.CONSULTATION,
        specialty="respiratory",
        resident=Resident("r-pseudo-1", "王阿姨", 67, Sex.FEMALE),
        inviting_institution="Lixi Village Clinic",
        inviting_clinician=VD,
        reason="persistent cough",
        purpose="diagnosis",
        case_summary="three weeks of cough",
        requested_specialty="respiratory",
        requested_title="chief physician",
        preferred_time=None,
        scheduled_time=None,
        status=ConsultationStatus.OPINION_PENDING,
        status_reason=None,
        created_at=now,
        updated_at=now,
        team=team,
    )


def signature(version: int, signer: UserId, role: Role = Role.COUNTY_PHYSICIAN) -> Signature:
    return Signature(version, signer, f"name of {signer}", role, datetime.now(UTC), "0" * 64)


def opinion_version(
    number: int,
    signers: tuple[UserId, ...] = (),
    amendment_reason: str | None = None,
) -> OpinionVersion:
    return OpinionVersion(
        consultation_id=C1,
        version=number,
        content=CONTENT,
        author=CP,
        created_at=datetime.now(UTC),
        amendment_reason=amendment_reason,
        content_hash=content_hash(make_consultation(), number, CONTENT),
        signatures=tuple(signature(number, s) for s in signers),
    )


# content_hash


def test_content_hash_is_stable_hex_sha256() -> None:
    first = content_hash(make_consultation(), 1, CONTENT)
    second = content_hash(make_consultation(), 1, dataclasses.replace(CONTENT))
    assert first == second
    assert HEX64.fullmatch(first)


def test_content_hash_known_answer() -> None:
    """Pins the canonical form: stored signatures must stay verifiable across releases."""
    consultation = make_consultation()
    content = OpinionContent("f", "a", "r", "无")
    canonical = (
        '{"assessment":"a","consultation":"c-1","findings":"f",'
        '"recommendations":"r","referral_advice":"无","version":1}'
    )
    expected = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert content_hash(consultation, 1, content) == expected


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(OpinionContent)])
def test_content_hash_changes_with_each_field(field: str) -> None:
    changed = dataclasses.replace(CONTENT, **{field: getattr(CONTENT, field) + "."})
    consultation = make_consultation()
    assert content_hash(consultation, 1, changed) != content_hash(consultation, 1, CONTENT)


def test_content_hash_changes_with_version() -> None:
    consultation = make_consultation()
    assert content_hash(consultation, 2, CONTENT) != content_hash(consultation, 1, CONTENT)


def test_content_hash_changes_with_consultation() -> None:
    other = make_consultation(consultation_id=ConsultationId("c-2"))
    assert content_hash(other, 1, CONTENT) != content_hash(make_consultation(), 1, CONTENT)


def test_content_hash_keeps_field_boundaries() -> None:
    consultation = make_consultation()
    left = OpinionContent("ab", "c", "", "")
    right = OpinionContent("a", "bc", "", "")
    assert content_hash(consultation, 1, left) != content_hash(consultation, 1, right)


def test_content_hash_ignores_consultation_state_outside_the_opinion() -> None:
    """A status change or a new team member does not change what was signed."""
    consultation = make_consultation()
    before = content_hash(consultation, 1, CONTENT)
    consultation.status = ConsultationStatus.SIGNED
    consultation.team.append(member(PS2, Role.PROVINCIAL_SPECIALIST))
    assert content_hash(consultation, 1, CONTENT) == before


def test_content_hash_handles_chinese_text() -> None:
    consultation = make_consultation()
    first = content_hash(consultation, 1, CONTENT_ZH)
    assert HEX64.fullmatch(first)
    assert first == content_hash(consultation, 1, dataclasses.replace(CONTENT_ZH))
    changed = dataclasses.replace(CONTENT_ZH, assessment="社区获得性肺炎，病毒性可能大。")
    assert content_hash(consultation, 1, changed) != first


# check_new_version


def test_first_version_needs_no_reason() -> None:
    check_new_version([], None)


@pytest.mark.parametrize("reason", ["fix typo", "", "   "], ids=repr)
def test_reason_on_a_first_version_is_refused(reason: str) -> None:
    with pytest.raises(InvalidInput, match="amendment_reason"):
        check_new_version([], reason)


def test_unsigned_version_can_be_replaced_without_reason() -> None:
    check_new_version([opinion_version(1)], None)


def test_reason_on_an_unsigned_chain_is_refused() -> None:
    with pytest.raises(InvalidInput, match="amendment_reason"):
        check_new_version([opinion_version(1)], "new lab result")


@pytest.mark.parametrize("reason", [None, "", "   ", "\t\n"], ids=repr)
def test_signed_version_is_locked_without_a_reason(reason: str | None) -> None:
    with pytest.raises(Conflict, match="locked") as excinfo:
        check_new_version([opinion_version(2, signers=(CP,))], reason)
    assert "version 2" in str(excinfo.value)


def test_signed_version_can_be_amended_with_a_reason() -> None:
    check_new_version([opinion_version(1, signers=(CP,))], "CT result changes the assessment")


# check_signature


def test_nothing_to_sign() -> None:
    with pytest.raises(Conflict, match="no opinion"):
        check_signature(None, CP, None)


@pytest.mark.parametrize("stale", [1, 2, 4])
def test_signing_a_version_that_is_not_the_newest(stale: int) -> None:
    with pytest.raises(Conflict, match=f"version {stale} is not the newest"):
        check_signature(opinion_version(3), CP, stale)


def test_signing_twice_is_refused() -> None:
    with pytest.raises(Conflict, match="already signed"):
        check_signature(opinion_version(1, signers=(CP,)), CP, 1)


@pytest.mark.parametrize("version", [3, None], ids=["version-given", "no-version"])
def test_signing_returns_the_newest(version: int | None) -> None:
    newest = opinion_version(3, signers=(PS,))
    assert check_signature(newest, CP, version) is newest


# required_signers and fully_signed


def test_required_signers_are_the_invited_physicians_on_the_team() -> None:
    consultation = make_consultation()
    consultation.team.append(member(PS2, Role.PROVINCIAL_SPECIALIST))
    assert required_signers(consultation) == {CP, PS, PS2}


def test_no_required_signers_without_invited_physicians() -> None:
    team = [member(VD, Role.VILLAGE_DOCTOR), member(TD, Role.TOWNSHIP_DOCTOR)]
    assert required_signers(make_consultation(team)) == frozenset()


@pytest.mark.parametrize(
    ("signers", "expected"),
    [
        ((), False),
        ((CP,), False),
        ((PS,), False),
        ((VD, TD), False),
        ((CP, PS), True),
        ((PS, CP), True),
        ((VD, CP, PS), True),
    ],
    ids=[
        "none",
        "county-only",
        "provincial-only",
        "non-required-only",
        "both",
        "both-reversed",
        "both-plus-extra",
    ],
)
def test_fully_signed(signers: tuple[UserId, ...], expected: bool) -> None:
    assert fully_signed(make_consultation(), opinion_version(1, signers=signers)) is expected


@pytest.mark.parametrize("signers", [(), (VD,), (VD, TD)], ids=["none", "one", "two"])
def test_never_fully_signed_without_required_signers(signers: tuple[UserId, ...]) -> None:
    team = [member(VD, Role.VILLAGE_DOCTOR), member(TD, Role.TOWNSHIP_DOCTOR)]
    consultation = make_consultation(team)
    assert fully_signed(consultation, opinion_version(1, signers=signers)) is False


# latest


def test_latest_of_nothing() -> None:
    assert latest([]) is None


def test_latest_picks_the_highest_version() -> None:
    versions = [opinion_version(2), opinion_version(3), opinion_version(1)]
    newest = latest(versions)
    assert newest is versions[1]
    assert latest(tuple(reversed(versions))) is versions[1]


def test_every_version_after_a_signed_one_is_an_amendment() -> None:
    chain = [opinion_version(1, signers=(CP,)), opinion_version(2)]
    check_new_version(chain, "second amendment")
    with pytest.raises(Conflict, match="version 1 is signed and locked"):
        check_new_version(chain, None)


def test_content_hash_covers_the_amendment_reason() -> None:
    consultation = make_consultation()
    plain = content_hash(consultation, 2, CONTENT)
    assert content_hash(consultation, 2, CONTENT, "new CT") != plain
    assert content_hash(consultation, 2, CONTENT, "new CT") != content_hash(
        consultation, 2, CONTENT, "other reason"
    )
