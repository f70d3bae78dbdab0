"""can() and require(): the role table, then the token's scope and the consultation's team."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from rooms.errors import DomainError, Forbidden
from rooms.model import (
    Consultation,
    ConsultationId,
    ConsultationKind,
    ConsultationStatus,
    Resident,
    Sex,
    TeamMember,
    UserId,
)
from rooms.policy import Actor, can, require
from rooms.roles import ROLE_PERMISSIONS, Permission, Role

P = Permission

C1 = ConsultationId("c-1")
C2 = ConsultationId("c-2")
TEACHING = ConsultationId("t-1")

VILLAGE_CLINIC = "Lixi Village Clinic"
TOWNSHIP_CENTRE = "Shanhe Township Health Centre"
COUNTY_HOSPITAL = "Anxian County Hospital"
PROVINCIAL_HOSPITAL = "Provincial People's Hospital"
UNRELATED = "Far Away County Hospital"

VD = UserId("u-village")
VD2 = UserId("u-village-2")
TD = UserId("u-township")
CP = UserId("u-county")
PS = UserId("u-provincial")
RES = UserId("r-pseudo-1")
GUA = UserId("g-1")
TR = UserId("u-trainee")
CO = UserId("u-coord")
AD = UserId("u-admin")


def member(user_id: UserId, role: Role, institution: str) -> TeamMember:
    return TeamMember(user_id, f"name of {user_id}", role, institution, datetime.now(UTC))


def make_consultation(
    consultation_id: ConsultationId,
    team: list[TeamMember],
    kind: ConsultationKind = ConsultationKind.CONSULTATION,
    inviting_clinician: UserId = VD,
    inviting_institution: str = VILLAGE_CLINIC,
) -> Consultation:
    now = datetime.now(UTC)
    return Consultation(
        id=consultation_id,
        kind=kind,
        specialty="respiratory",
        resident=Resident("r-pseudo-1", "王阿姨", 67, Sex.FEMALE),
        inviting_institution=inviting_institution,
        inviting_clinician=inviting_clinician,
        reason="persistent cough",
        purpose="diagnosis",
        case_summary="三周咳嗽 低热",
        requested_specialty="respiratory",
        requested_title="chief physician",
        preferred_time=None,
        scheduled_time=None,
        status=ConsultationStatus.LIVE,
        status_reason=None,
        created_at=now,
        updated_at=now,
        team=team,
    )


def consultation_c1() -> Consultation:
    return make_consultation(
        C1,
        [
            member(VD, Role.VILLAGE_DOCTOR, VILLAGE_CLINIC),
            member(VD2, Role.VILLAGE_DOCTOR, VILLAGE_CLINIC),
            member(TD, Role.TOWNSHIP_DOCTOR, TOWNSHIP_CENTRE),
            member(CP, Role.COUNTY_PHYSICIAN, COUNTY_HOSPITAL),
            member(PS, Role.PROVINCIAL_SPECIALIST, PROVINCIAL_HOSPITAL),
            member(RES, Role.RESIDENT, VILLAGE_CLINIC),
            member(GUA, Role.GUARDIAN, VILLAGE_CLINIC),
        ],
    )


def consultation_c2() -> Consultation:
    """Another consultation the c-1 people are not on."""
    return make_consultation(
        C2,
        [member(UserId("u-other"), Role.VILLAGE_DOCTOR, "Other Clinic")],
        inviting_clinician=UserId("u-other"),
        inviting_institution="Other Clinic",
    )


def consultation_teaching() -> Consultation:
    return make_consultation(
        TEACHING,
        [member(PS, Role.PROVINCIAL_SPECIALIST, PROVINCIAL_HOSPITAL)],
        kind=ConsultationKind.TEACHING,
        inviting_clinician=PS,
        inviting_institution=PROVINCIAL_HOSPITAL,
    )


CONSULTATIONS = {"c1": consultation_c1, "c2": consultation_c2, "teaching": consultation_teaching}


def actor(user_id: UserId, role: Role, org: str, scope: ConsultationId | None = None) -> Actor:
    return Actor(user_id=user_id, name=f"name of {user_id}", role=role, org=org, scope=scope)


@dataclass(frozen=True)
class Case:
    id: str
    actor: Actor
    permission: Permission
    consultation: str | None  # key of CONSULTATIONS, or None for "no consultation"
    allowed: bool
    reason: str = "allowed"  # a fragment of the decision's reason


VILLAGE = actor(VD, Role.VILLAGE_DOCTOR, VILLAGE_CLINIC)
VILLAGE_2 = actor(VD2, Role.VILLAGE_DOCTOR, VILLAGE_CLINIC)
TOWNSHIP = actor(TD, Role.TOWNSHIP_DOCTOR, TOWNSHIP_CENTRE)
COUNTY = actor(CP, Role.COUNTY_PHYSICIAN, COUNTY_HOSPITAL)
PROVINCIAL = actor(PS, Role.PROVINCIAL_SPECIALIST, PROVINCIAL_HOSPITAL)
RESIDENT_C1 = actor(RES, Role.RESIDENT, VILLAGE_CLINIC, C1)
GUARDIAN_C1 = actor(GUA, Role.GUARDIAN, VILLAGE_CLINIC, C1)
TRAINEE_TEACHING = actor(TR, Role.TRAINEE, COUNTY_HOSPITAL, TEACHING)
TRAINEE_C1 = actor(TR, Role.TRAINEE, COUNTY_HOSPITAL, C1)
ADMIN = actor(AD, Role.ADMIN, "operator")

CASES = [
    # Team members acting in the role they are on the team as.
    Case("village-doctor-admits", VILLAGE, P.ADMIT, "c1", True),
    Case("county-signs", COUNTY, P.SIGN_OPINION, "c1", True),
    Case("provincial-mutes", PROVINCIAL, P.MUTE_OTHERS, "c1", True),
    Case("township-publishes", TOWNSHIP, P.PUBLISH_VIDEO, "c1", True),
    Case(
        "clinician-scoped-to-own",
        actor(PS, Role.PROVINCIAL_SPECIALIST, PROVINCIAL_HOSPITAL, C1),
        P.JOIN,
        "c1",
        True,
    ),
    # The role table comes first.
    Case(
        "county-may-not-mute",
        COUNTY,
        P.MUTE_OTHERS,
        "c1",
        False,
        "role county_physician may not mute_others",
    ),
    # The token's role must be the role the person is on the team as.
    Case(
        "token-role-differs",
        actor(CP, Role.PROVINCIAL_SPECIALIST, COUNTY_HOSPITAL),
        P.JOIN,
        "c1",
        False,
        "on this team as county_physician, not as provincial_specialist",
    ),
    Case(
        "token-role-differs-escalation",
        actor(VD, Role.PROVINCIAL_SPECIALIST, VILLAGE_CLINIC),
        P.MUTE_OTHERS,
        "c1",
        False,
        "on this team as village_doctor, not as provincial_specialist",
    ),
    # Clinicians not on the team.
    Case(
        "non-member-clinician", PROVINCIAL, P.JOIN, "c2", False, "not on this consultation's team"
    ),
    Case(
        "non-member-same-institution",
        actor(UserId("u-stranger"), Role.VILLAGE_DOCTOR, VILLAGE_CLINIC),
        P.JOIN,
        "c1",
        False,
        "not on this consultation's team",
    ),
    Case(
        "clinician-token-scoped-elsewhere",
        actor(PS, Role.PROVINCIAL_SPECIALIST, PROVINCIAL_HOSPITAL, C2),
        P.JOIN,
        "c1",
        False,
        "scoped to another consultation",
    ),
    # Residents and guardians act only through an invite to their own consultation.
    Case("resident-joins-own", RESIDENT_C1, P.JOIN, "c1", True),
    Case("resident-consents-own", RESIDENT_C1, P.CONSENT, "c1", True),
    Case("guardian-consents-own", GUARDIAN_C1, P.CONSENT, "c1", True),
    Case(
        "resident-token-on-other-consultation",
        RESIDENT_C1,
        P.JOIN,
        "c2",
        False,
        "scoped to another consultation",
    ),
    Case(
        "resident-without-scope",
        actor(RES, Role.RESIDENT, VILLAGE_CLINIC),
        P.JOIN,
        "c1",
        False,
        "a resident acts only through an invite to their consultation",
    ),
    Case(
        "guardian-without-scope",
        actor(GUA, Role.GUARDIAN, VILLAGE_CLINIC),
        P.CONSENT,
        "c1",
        False,
        "a guardian acts only through an invite to their consultation",
    ),
    Case(
        "scoped-resident-not-on-team",
        actor(UserId("r-other"), Role.RESIDENT, VILLAGE_CLINIC, C1),
        P.JOIN,
        "c1",
        False,
        "not on this consultation's team",
    ),
    Case(
        "resident-may-not-admit", RESIDENT_C1, P.ADMIT, "c1", False, "role resident may not admit"
    ),
    # Trainees: teaching sessions only, through an invite, watch and listen.
    Case("trainee-joins-teaching", TRAINEE_TEACHING, P.JOIN, "teaching", True),
    Case("trainee-subscribes-teaching", TRAINEE_TEACHING, P.SUBSCRIBE, "teaching", True),
    Case(
        "trainee-scoped-non-teaching",
        TRAINEE_C1,
        P.JOIN,
        "c1",
        False,
        "not on this consultation's team",
    ),
    Case(
        "trainee-without-scope",
        actor(TR, Role.TRAINEE, COUNTY_HOSPITAL),
        P.JOIN,
        "teaching",
        False,
        "trainees join through an invite to the teaching session",
    ),
    Case(
        "trainee-scoped-elsewhere",
        TRAINEE_C1,
        P.JOIN,
        "teaching",
        False,
        "scoped to another consultation",
    ),
    Case(
        "trainee-may-not-publish",
        TRAINEE_TEACHING,
        P.PUBLISH_AUDIO,
        "teaching",
        False,
        "role trainee may not publish_audio",
    ),
    # Coordinators: those of the inviting institution run its consultations; others must be on
    # the team (a hospital's coordinator must not reach every case its specialists are on).
    Case(
        "coordinator-of-inviting-institution",
        actor(CO, Role.COORDINATOR, VILLAGE_CLINIC),
        P.SCHEDULE,
        "c1",
        True,
    ),
    Case(
        "coordinator-of-invited-institution",
        actor(CO, Role.COORDINATOR, PROVINCIAL_HOSPITAL),
        P.RESPOND_TO_REQUEST,
        "c1",
        False,
        "not on this consultation's team",
    ),
    Case(
        "coordinator-of-unrelated-institution",
        actor(CO, Role.COORDINATOR, UNRELATED),
        P.SCHEDULE,
        "c1",
        False,
        "not on this consultation's team",
    ),
    Case(
        "coordinator-may-not-view-record",
        actor(CO, Role.COORDINATOR, VILLAGE_CLINIC),
        P.VIEW_RECORD,
        "c1",
        False,
        "role coordinator may not view_record",
    ),
    # Permissions that are not about one consultation.
    Case("admin-views-audit", ADMIN, P.VIEW_AUDIT, None, True),
    Case("admin-manages-retention", ADMIN, P.MANAGE_RETENTION, None, True),
    Case(
        "admin-with-scope",
        actor(AD, Role.ADMIN, "operator", C1),
        P.VIEW_AUDIT,
        None,
        False,
        "a token scoped to one consultation may not do this",
    ),
    Case("admin-may-not-join", ADMIN, P.JOIN, "c1", False, "role admin may not join"),
    Case("village-doctor-requests", VILLAGE, P.REQUEST_CONSULTATION, None, True),
    Case(
        "scoped-token-may-not-request",
        actor(VD, Role.VILLAGE_DOCTOR, VILLAGE_CLINIC, C1),
        P.REQUEST_CONSULTATION,
        None,
        False,
        "a token scoped to one consultation may not do this",
    ),
    Case(
        "clinician-may-not-view-audit",
        VILLAGE,
        P.VIEW_AUDIT,
        None,
        False,
        "role village_doctor may not view_audit",
    ),
    Case("join-needs-consultation", VILLAGE, P.JOIN, None, False, "join needs a consultation"),
    Case(
        "sign-needs-consultation",
        COUNTY,
        P.SIGN_OPINION,
        None,
        False,
        "sign_opinion needs a consultation",
    ),
    # The final decision belongs to the inviting clinician alone.
    Case("inviting-clinician-decides", VILLAGE, P.RECORD_DECISION, "c1", True),
    Case(
        "other-village-doctor-may-not-decide",
        VILLAGE_2,
        P.RECORD_DECISION,
        "c1",
        False,
        "only the inviting clinician records the final decision",
    ),
    Case(
        "township-doctor-may-not-decide",
        TOWNSHIP,
        P.RECORD_DECISION,
        "c1",
        False,
        "only the inviting clinician records the final decision",
    ),
]


def _consultation(key: str | None) -> Consultation | None:
    return None if key is None else CONSULTATIONS[key]()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_can(case: Case) -> None:
    decision = can(case.actor, case.permission, _consultation(case.consultation))
    assert decision.allowed is case.allowed, decision.reason
    assert bool(decision) is case.allowed
    assert case.reason in decision.reason
    if case.allowed:
        assert decision.reason == "allowed"


def test_case_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if not c.allowed], ids=lambda c: c.id)
def test_require_raises_forbidden_with_the_reason(case: Case) -> None:
    with pytest.raises(Forbidden) as excinfo:
        require(case.actor, case.permission, _consultation(case.consultation))
    assert case.reason in str(excinfo.value)
    assert (
        str(excinfo.value)
        == can(case.actor, case.permission, _consultation(case.consultation)).reason
    )
    assert isinstance(excinfo.value, DomainError)
    assert excinfo.value.code == "forbidden"


@pytest.mark.parametrize("case", [c for c in CASES if c.allowed], ids=lambda c: c.id)
def test_require_returns_quietly_when_allowed(case: Case) -> None:
    require(case.actor, case.permission, _consultation(case.consultation))


@pytest.mark.parametrize(
    ("role", "permission"), [(r, p) for r in Role for p in Permission], ids=str
)
def test_team_member_in_full_scope_gets_exactly_the_role_table(
    role: Role, permission: Permission
) -> None:
    """With every scope and team condition met, can() answers what the role table says."""
    user = UserId(f"u-{role.value}")
    consultation = make_consultation(
        C1,
        [member(user, role, VILLAGE_CLINIC)],
        kind=ConsultationKind.TEACHING,
        inviting_clinician=user,
    )
    needs_scope = role in {Role.RESIDENT, Role.GUARDIAN, Role.TRAINEE}
    who = actor(user, role, VILLAGE_CLINIC, C1 if needs_scope else None)
    decision = can(who, permission, consultation)
    expected = permission in ROLE_PERMISSIONS[role]
    assert decision.allowed is expected, decision.reason
    if not expected:
        assert decision.reason == f"role {role.value} may not {permission.value}"
