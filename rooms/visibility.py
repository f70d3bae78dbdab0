"""Which fields of a consultation each reader sees: one table (audience -> fields) and one
function that projects a consultation for a reader. Every serialiser of a consultation (REST
views, the record, the live room's snapshot) takes the projected view, never the entity, so no
path can show a field its reader may not see. docs/domain.md explains the table."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TypeVar

from rooms.model import (
    Consent,
    ConsentKind,
    Consultation,
    ConsultationId,
    ConsultationKind,
    ConsultationStatus,
    Sex,
    TeamMember,
)
from rooms.roles import CLINICIAN_ROLES, PATIENT_ROLES, Role

T = TypeVar("T")


class ConsultationField(StrEnum):
    """A field of a consultation as readers see it; values are the JSON paths in the API."""

    ID = "id"
    KIND = "kind"
    STATUS = "status"
    CREATED_AT = "created_at"
    UPDATED_AT = "updated_at"
    SPECIALTY = "specialty"
    REQUESTED_SPECIALTY = "requested_specialty"
    REQUESTED_TITLE = "requested_title"
    SCHEDULED_TIME = "scheduled_time"
    PREFERRED_TIME = "preferred_time"
    STATUS_REASON = "status_reason"
    INVITING_INSTITUTION = "inviting_institution"
    INVITING_CLINICIAN = "inviting_clinician"
    TEAM = "team"
    RESIDENT_PSEUDONYM = "resident.pseudonym"
    RESIDENT_DISPLAY_NAME = "resident.display_name"
    RESIDENT_AGE = "resident.age"
    RESIDENT_SEX = "resident.sex"
    REASON = "reason"
    PURPOSE = "purpose"
    CASE_SUMMARY = "case_summary"


class Audience(StrEnum):
    """A kind of reader: what their role and relation to the consultation let them see."""

    CARE_TEAM = "care_team"  # the clinicians on the team
    PATIENT = "patient"  # the resident and their guardian: it is their data
    SCHEDULING = "scheduling"  # coordinators: who, when, where; nothing clinical
    TRAINEE = "trainee"  # a teaching session's trainees, without teaching-use consent
    TRAINEE_CONSENTED = "trainee_consented"  # ... once the resident consented to teaching use
    OPERATOR = "operator"  # admins: ids and states, as the audit log names them


F = ConsultationField

# What every reader of a consultation sees: what it is and where it stands.
ALWAYS = frozenset({F.ID, F.KIND, F.STATUS, F.CREATED_AT, F.UPDATED_AT})
# The topic of a teaching session, which is what a trainee comes for.
_TOPIC = frozenset({F.SPECIALTY, F.REQUESTED_SPECIALTY, F.REQUESTED_TITLE, F.SCHEDULED_TIME})
# The clinical picture without who it is: what a case library keeps.
_DEIDENTIFIED_CASE = frozenset(
    {F.RESIDENT_AGE, F.RESIDENT_SEX, F.REASON, F.PURPOSE, F.CASE_SUMMARY}
)
_SCHEDULING = frozenset(
    {
        F.PREFERRED_TIME,
        F.STATUS_REASON,
        F.INVITING_INSTITUTION,
        F.INVITING_CLINICIAN,
        F.TEAM,
        F.RESIDENT_PSEUDONYM,
        F.RESIDENT_DISPLAY_NAME,
    }
)
EVERY_FIELD = frozenset(ConsultationField)

# The one table.
VISIBLE_FIELDS: dict[Audience, frozenset[ConsultationField]] = {
    Audience.CARE_TEAM: EVERY_FIELD,
    Audience.PATIENT: EVERY_FIELD,
    Audience.SCHEDULING: ALWAYS | _TOPIC | _SCHEDULING,
    Audience.TRAINEE: ALWAYS | _TOPIC,
    Audience.TRAINEE_CONSENTED: ALWAYS | _TOPIC | _DEIDENTIFIED_CASE,
    Audience.OPERATOR: ALWAYS,
}


def audience_of(role: Role, teaching_consent: bool) -> Audience:
    """The audience a reader in `role` belongs to; `teaching_consent` is whether the resident's
    teaching-use consent stands (see `teaching_consent_given`), which only trainees depend on."""
    if role in CLINICIAN_ROLES:
        return Audience.CARE_TEAM
    if role in PATIENT_ROLES:
        return Audience.PATIENT
    if role is Role.COORDINATOR:
        return Audience.SCHEDULING
    if role is Role.TRAINEE:
        return Audience.TRAINEE_CONSENTED if teaching_consent else Audience.TRAINEE
    return Audience.OPERATOR


def depends_on_consent(role: Role) -> bool:
    """Whether `audience_of` needs the consultation's consents for this role."""
    return role is Role.TRAINEE


def teaching_consent_given(consultation: Consultation, consents: Iterable[Consent]) -> bool:
    """A teaching consultation whose newest teaching-use consent is a grant (a withdrawal after
    a grant takes the case from the trainees again)."""
    if consultation.kind is not ConsultationKind.TEACHING:
        return False
    teaching = [
        c
        for c in consents
        if c.consultation_id == consultation.id and c.kind is ConsentKind.TEACHING
    ]
    # Stable sort: of two at the same instant, the later in the record wins.
    return bool(teaching) and sorted(teaching, key=lambda c: c.at)[-1].granted


@dataclass(frozen=True)
class ResidentView:
    pseudonym: str | None
    display_name: str | None
    age: int | None
    sex: Sex | None


@dataclass(frozen=True)
class ConsultationView:
    """A consultation as one reader sees it: a field they may not see is None and named in
    `hidden`. Made only by `project`."""

    audience: Audience
    hidden: frozenset[ConsultationField]
    id: ConsultationId
    kind: ConsultationKind
    status: ConsultationStatus
    created_at: datetime
    updated_at: datetime
    specialty: str | None
    requested_specialty: str | None
    requested_title: str | None
    scheduled_time: datetime | None
    preferred_time: datetime | None
    status_reason: str | None
    inviting_institution: str | None
    inviting_clinician: str | None
    team: tuple[TeamMember, ...] | None
    resident: ResidentView
    reason: str | None
    purpose: str | None
    case_summary: str | None


def project(consultation: Consultation, audience: Audience) -> ConsultationView:
    """`consultation` as `audience` sees it."""
    visible = VISIBLE_FIELDS[audience]
    c, r = consultation, consultation.resident

    def shown(field: ConsultationField, value: T) -> T | None:
        return value if field in visible else None

    return ConsultationView(
        audience=audience,
        hidden=EVERY_FIELD - visible,
        id=c.id,
        kind=c.kind,
        status=c.status,
        created_at=c.created_at,
        updated_at=c.updated_at,
        specialty=shown(F.SPECIALTY, c.specialty),
        requested_specialty=shown(F.REQUESTED_SPECIALTY, c.requested_specialty),
        requested_title=shown(F.REQUESTED_TITLE, c.requested_title),
        scheduled_time=shown(F.SCHEDULED_TIME, c.scheduled_time),
        preferred_time=shown(F.PREFERRED_TIME, c.preferred_time),
        status_reason=shown(F.STATUS_REASON, c.status_reason),
        inviting_institution=shown(F.INVITING_INSTITUTION, c.inviting_institution),
        inviting_clinician=shown(F.INVITING_CLINICIAN, c.inviting_clinician),
        team=shown(F.TEAM, tuple(c.team)),
        resident=ResidentView(
            pseudonym=shown(F.RESIDENT_PSEUDONYM, r.pseudonym),
            display_name=shown(F.RESIDENT_DISPLAY_NAME, r.display_name),
            age=shown(F.RESIDENT_AGE, r.age),
            sex=shown(F.RESIDENT_SEX, r.sex),
        ),
        reason=shown(F.REASON, c.reason),
        purpose=shown(F.PURPOSE, c.purpose),
        case_summary=shown(F.CASE_SUMMARY, c.case_summary),
    )
