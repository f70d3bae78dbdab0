"""The one answer to "may this person do this in this consultation?"."""

from __future__ import annotations

from dataclasses import dataclass

from rooms.errors import Forbidden
from rooms.model import Consultation, ConsultationId, ConsultationKind, UserId
from rooms.roles import GLOBAL_PERMISSIONS, PATIENT_ROLES, Permission, Role, permissions_of


@dataclass(frozen=True)
class Actor:
    """Who is asking, as their verified token says."""

    user_id: UserId
    name: str
    role: Role
    org: str
    # Set on invite tokens: the one consultation this token may touch.
    scope: ConsultationId | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


_ALLOW = Decision(True, "allowed")


def can(actor: Actor, permission: Permission, consultation: Consultation | None = None) -> Decision:
    """Role table first, then the consultation's scope and team."""
    if permission not in permissions_of(actor.role):
        return Decision(False, f"role {actor.role.value} may not {permission.value}")
    if consultation is None:
        if permission not in GLOBAL_PERMISSIONS:
            return Decision(False, f"{permission.value} needs a consultation")
        if actor.scope is not None:
            return Decision(False, "a token scoped to one consultation may not do this")
        return _ALLOW
    if actor.scope is not None and actor.scope != consultation.id:
        return Decision(False, "this token is scoped to another consultation")
    if actor.role in PATIENT_ROLES and actor.scope is None:
        return Decision(
            False, f"a {actor.role.value} acts only through an invite to their consultation"
        )
    membership = _membership(actor, consultation)
    if not membership:
        return membership
    if (
        permission is Permission.RECORD_DECISION
        and actor.user_id != consultation.inviting_clinician
    ):
        return Decision(False, "only the inviting clinician records the final decision")
    return _ALLOW


def require(actor: Actor, permission: Permission, consultation: Consultation | None = None) -> None:
    decision = can(actor, permission, consultation)
    if not decision:
        raise Forbidden(decision.reason)


def _membership(actor: Actor, consultation: Consultation) -> Decision:
    member = consultation.member(actor.user_id)
    if member is not None:
        if member.role != actor.role:
            return Decision(
                False, f"on this team as {member.role.value}, not as {actor.role.value}"
            )
        return _ALLOW
    if actor.role is Role.TRAINEE and consultation.kind is ConsultationKind.TEACHING:
        # Trainees are many and not on the team; their invite scopes them to this session.
        return (
            _ALLOW
            if actor.scope == consultation.id
            else Decision(False, "trainees join through an invite to the teaching session")
        )
    if actor.role is Role.COORDINATOR and actor.org == consultation.inviting_institution:
        # Scheduling staff of the inviting institution run its consultations.
        return _ALLOW
    return Decision(False, "not on this consultation's team")
