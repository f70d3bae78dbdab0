"""The one answer to "may this person do this in this consultation?"."""

from __future__ import annotations

from dataclasses import dataclass

from rooms.errors import Forbidden
from rooms.model import Consultation, ConsultationId, ConsultationKind, UserId
from rooms.roles import (
    CLINICIAN_ROLES,
    GLOBAL_PERMISSIONS,
    PATIENT_ROLES,
    Permission,
    Role,
    permissions_of,
)


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
    # The machine-readable name of a refusal (the problem's `code`).
    code: str = "forbidden"

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
    _raise_unless(can(actor, permission, consultation))


class Refused(Forbidden):
    """A 403 whose code names the rule that refused."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _raise_unless(decision: Decision) -> None:
    if not decision:
        if decision.code == Forbidden.code:
            raise Forbidden(decision.reason)
        raise Refused(decision.code, decision.reason)


# Levels of care in a county medical alliance, village clinic up to provincial hospital.
CARE_LEVEL: dict[Role, int] = {
    Role.VILLAGE_DOCTOR: 1,
    Role.TOWNSHIP_DOCTOR: 2,
    Role.COUNTY_PHYSICIAN: 3,
    Role.PROVINCIAL_SPECIALIST: 4,
}


def may_add_to_team(
    actor: Actor, consultation: Consultation, role: Role, institution: str
) -> Decision:
    """Who may add whom to a team (docs/domain.md, "The team"). A team member reads the whole
    record, so clinical access is granted only by a clinician who holds it:
    - a clinician of the inviting institution adds any clinician, and coordinators of their
      own institution (the inviting side keeps clinical responsibility and chooses whom to ask);
    - an invited clinician adds a colleague of their own institution at their level or below;
    - a coordinator adds only coordinators of the inviting institution;
    - nobody else changes the team.
    Guardians join the team by invite: `may_issue_invite` decides."""
    # Clinicians change the team by being on it; anyone else needs manage_consultation first.
    gate = Permission.JOIN if actor.role in CLINICIAN_ROLES else Permission.MANAGE_CONSULTATION
    scope = can(actor, gate, consultation)
    if not scope:
        return scope
    inviting = consultation.inviting_institution
    if actor.role is Role.COORDINATOR:
        if role is not Role.COORDINATOR:
            return Decision(
                False,
                f"a coordinator may not add a {role.value}: clinicians are added by a clinician "
                "on the team",
                "team_clinician_needs_clinician",
            )
        return _own_institution(institution, inviting, "coordinators on the team")
    if actor.role not in CLINICIAN_ROLES:
        # No such role manages consultations today; one that did would still add nobody.
        return Decision(
            False, f"a {actor.role.value} does not change the team", "team_change_not_permitted"
        )
    if actor.org == inviting:
        if role is Role.COORDINATOR:
            return _own_institution(institution, inviting, "coordinators on the team")
        return _ALLOW
    if role not in CLINICIAN_ROLES:
        return Decision(
            False,
            f"coordinators are added by the inviting institution ({inviting})",
            "team_coordinator_by_inviting_side",
        )
    if institution != actor.org:
        return _own_institution(institution, actor.org, "an invited clinician's colleagues")
    if CARE_LEVEL[role] > CARE_LEVEL[actor.role]:
        return Decision(
            False,
            f"a {actor.role.value} adds a colleague at their level or below, not a {role.value}",
            "team_level_above_adder",
        )
    return _ALLOW


def may_issue_invite(actor: Actor, consultation: Consultation, role: Role) -> Decision:
    """An invite grants no more than its issuer holds, for the issuer holds the token too:
    - a resident's or guardian's invite reads the whole record and consents for the resident:
      it is issued by a clinician of the inviting institution, who sits with the resident and
      knows the family (a guardian joins the team by it);
    - a trainee's invite reads the case once the resident consents to teaching use: it is
      issued by a clinician on the team, not by a coordinator, who may not read it.
    Scope and the `invite` permission are can()'s: only clinicians hold `invite` (coordinators
    hold `revoke_invite`; tests/test_roles.py keeps it so)."""
    scope = can(actor, Permission.INVITE, consultation)
    if not scope:
        return scope
    inviting = consultation.inviting_institution
    if role in PATIENT_ROLES and actor.org != inviting:
        return Decision(
            False,
            f"a {role.value} is invited by a clinician of the inviting institution ({inviting})",
            "invite_by_inviting_clinician",
        )
    return _ALLOW


def require_invite(actor: Actor, consultation: Consultation, role: Role) -> None:
    _raise_unless(may_issue_invite(actor, consultation, role))


def require_team_addition(
    actor: Actor, consultation: Consultation, role: Role, institution: str
) -> None:
    _raise_unless(may_add_to_team(actor, consultation, role, institution))


def _own_institution(institution: str, required: str, who: str) -> Decision:
    if institution == required:
        return _ALLOW
    return Decision(
        False, f"{who} are of {required}, not {institution}", "team_institution_mismatch"
    )


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
