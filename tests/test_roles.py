"""The role x permission matrix, written out by hand from docs/domain.md.

The expectation below is typed in, not derived from ROLE_PERMISSIONS: a change to the table
must show up here as a failing case and be agreed on deliberately.
"""

from __future__ import annotations

import pytest

from rooms.roles import (
    CLINICIAN_ROLES,
    INVITED_PHYSICIAN_ROLES,
    PATIENT_ROLES,
    ROLE_PERMISSIONS,
    Permission,
    Role,
    permissions_of,
)

_CLINICIAN_BASE = {
    "join",
    "publish_audio",
    "publish_video",
    "publish_screen",
    "subscribe",
    "chat",
    "view_record",
    "download_recording",
    "add_attachment",
    "view_attachment",
}

EXPECTED: dict[Role, set[str]] = {
    # Joins only their own consultation, gives consent, publishes camera/mic once admitted.
    Role.RESIDENT: {
        "join",
        "publish_audio",
        "publish_video",
        "subscribe",
        "chat",
        "consent",
        "view_record",
        "export_record",
        "download_recording",
        "add_attachment",
        "view_attachment",
    },
    # Like the resident; gives consent for minors.
    Role.GUARDIAN: {
        "join",
        "publish_audio",
        "publish_video",
        "subscribe",
        "chat",
        "consent",
        "view_record",
        "export_record",
        "download_recording",
        "add_attachment",
        "view_attachment",
    },
    # The inviting clinician: creates the request, admits, records (with consent), decides.
    Role.VILLAGE_DOCTOR: _CLINICIAN_BASE
    | {
        "admit",
        "start_recording",
        "record_decision",
        "end_session",
        "export_record",
        "manage_consultation",
        "request_consultation",
        "schedule",
        "invite",
        "revoke_invite",
        "annotate",
    },
    # May also be the inviting side (a consultation from a township clinic).
    Role.TOWNSHIP_DOCTOR: _CLINICIAN_BASE
    | {
        "admit",
        "start_recording",
        "record_decision",
        "end_session",
        "export_record",
        "manage_consultation",
        "request_consultation",
        "schedule",
        "invite",
        "revoke_invite",
    },
    # Joins, publishes, annotates, writes and signs an opinion; answers the invitation.
    Role.COUNTY_PHYSICIAN: _CLINICIAN_BASE
    | {
        "annotate",
        "write_opinion",
        "sign_opinion",
        "export_record",
        "respond_to_request",
        "schedule",
        "end_session",
        "admit",
        "request_consultation",
        "invite",
        "revoke_invite",
    },
    # The county rights, plus moderation.
    Role.PROVINCIAL_SPECIALIST: _CLINICIAN_BASE
    | {
        "annotate",
        "write_opinion",
        "sign_opinion",
        "export_record",
        "respond_to_request",
        "schedule",
        "end_session",
        "admit",
        "mute_others",
        "remove_participant",
        "request_consultation",
        "invite",
        "revoke_invite",
        "start_recording",
    },
    # Watch and listen only; chat.
    Role.TRAINEE: {"join", "subscribe", "chat", "view_attachment"},
    # Schedules and admits; no clinical content.
    Role.COORDINATOR: {
        "join",
        "admit",
        "manage_consultation",
        "respond_to_request",
        "schedule",
        "revoke_invite",
    },
    # Configuration, audit log, retention; no clinical authorship.
    Role.ADMIN: {"view_audit", "manage_retention"},
}

ALL_PAIRS = [(role, permission) for role in Role for permission in Permission]


def _roles_with(permission: Permission) -> set[Role]:
    return {role for role, granted in ROLE_PERMISSIONS.items() if permission in granted}


def test_enumerations_have_the_expected_size() -> None:
    assert len(Role) == 9
    assert len(Permission) == 29
    assert len(ALL_PAIRS) == 9 * 29


def test_expected_table_names_only_real_permissions() -> None:
    known = {p.value for p in Permission}
    for role, names in EXPECTED.items():
        assert names <= known, f"{role}: unknown {sorted(names - known)}"


def test_every_role_has_an_entry() -> None:
    assert set(ROLE_PERMISSIONS) == set(Role)
    assert set(EXPECTED) == set(Role)


@pytest.mark.parametrize(("role", "permission"), ALL_PAIRS, ids=str)
def test_role_permission_matrix(role: Role, permission: Permission) -> None:
    expected = permission.value in EXPECTED[role]
    assert (permission in ROLE_PERMISSIONS[role]) is expected


@pytest.mark.parametrize("role", list(Role), ids=str)
def test_permissions_of_reads_the_table(role: Role) -> None:
    assert permissions_of(role) == {Permission(name) for name in EXPECTED[role]}


def test_trainee_never_publishes() -> None:
    publish = {Permission.PUBLISH_AUDIO, Permission.PUBLISH_VIDEO, Permission.PUBLISH_SCREEN}
    assert not (ROLE_PERMISSIONS[Role.TRAINEE] & publish)


@pytest.mark.parametrize("role", [Role.RESIDENT, Role.GUARDIAN], ids=str)
@pytest.mark.parametrize(
    "permission",
    [
        Permission.ADMIT,
        Permission.MUTE_OTHERS,
        Permission.REMOVE_PARTICIPANT,
        Permission.END_SESSION,
        Permission.SIGN_OPINION,
    ],
    ids=str,
)
def test_patients_never_moderate_end_or_sign(role: Role, permission: Permission) -> None:
    assert permission not in ROLE_PERMISSIONS[role]


@pytest.mark.parametrize(
    "permission",
    [
        Permission.WRITE_OPINION,
        Permission.SIGN_OPINION,
        Permission.RECORD_DECISION,
        Permission.VIEW_RECORD,
    ],
    ids=str,
)
def test_admin_has_no_clinical_authorship(permission: Permission) -> None:
    assert permission not in ROLE_PERMISSIONS[Role.ADMIN]


@pytest.mark.parametrize(
    "permission",
    [Permission.VIEW_RECORD, Permission.DOWNLOAD_RECORDING, Permission.EXPORT_RECORD],
    ids=str,
)
def test_coordinator_sees_no_clinical_record(permission: Permission) -> None:
    assert permission not in ROLE_PERMISSIONS[Role.COORDINATOR]


@pytest.mark.parametrize("permission", [Permission.WRITE_OPINION, Permission.SIGN_OPINION], ids=str)
def test_only_invited_physicians_write_and_sign_opinions(permission: Permission) -> None:
    assert _roles_with(permission) == {Role.COUNTY_PHYSICIAN, Role.PROVINCIAL_SPECIALIST}


@pytest.mark.parametrize(
    "permission", [Permission.MUTE_OTHERS, Permission.REMOVE_PARTICIPANT], ids=str
)
def test_only_provincial_specialist_moderates(permission: Permission) -> None:
    assert _roles_with(permission) == {Role.PROVINCIAL_SPECIALIST}


def test_role_groups() -> None:
    assert {Role.RESIDENT, Role.GUARDIAN} == PATIENT_ROLES
    assert {Role.COUNTY_PHYSICIAN, Role.PROVINCIAL_SPECIALIST} == INVITED_PHYSICIAN_ROLES
    assert {
        Role.VILLAGE_DOCTOR,
        Role.TOWNSHIP_DOCTOR,
        Role.COUNTY_PHYSICIAN,
        Role.PROVINCIAL_SPECIALIST,
    } == CLINICIAN_ROLES


def test_provincial_specialist_has_all_county_rights() -> None:
    county = ROLE_PERMISSIONS[Role.COUNTY_PHYSICIAN]
    assert county <= ROLE_PERMISSIONS[Role.PROVINCIAL_SPECIALIST]


def test_only_clinicians_issue_invites() -> None:
    """An invite reads what its holder's role may; a non-clinician issuing one would hand out
    more than they see (rooms/policy.py may_issue_invite relies on this)."""
    assert _roles_with(Permission.INVITE) <= CLINICIAN_ROLES
    assert Role.COORDINATOR in _roles_with(Permission.REVOKE_INVITE)
