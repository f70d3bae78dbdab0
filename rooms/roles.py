"""Roles and permissions: one table maps each role to what it may do."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    RESIDENT = "resident"
    GUARDIAN = "guardian"
    VILLAGE_DOCTOR = "village_doctor"
    TOWNSHIP_DOCTOR = "township_doctor"
    COUNTY_PHYSICIAN = "county_physician"
    PROVINCIAL_SPECIALIST = "provincial_specialist"
    TRAINEE = "trainee"
    COORDINATOR = "coordinator"
    ADMIN = "admin"


class Permission(StrEnum):
    JOIN = "join"
    PUBLISH_AUDIO = "publish_audio"
    PUBLISH_VIDEO = "publish_video"
    PUBLISH_SCREEN = "publish_screen"
    SUBSCRIBE = "subscribe"
    CHAT = "chat"
    ADMIT = "admit"
    MUTE_OTHERS = "mute_others"
    REMOVE_PARTICIPANT = "remove_participant"
    ANNOTATE = "annotate"
    START_RECORDING = "start_recording"
    CONSENT = "consent"
    WRITE_OPINION = "write_opinion"
    SIGN_OPINION = "sign_opinion"
    RECORD_DECISION = "record_decision"
    END_SESSION = "end_session"
    VIEW_RECORD = "view_record"
    EXPORT_RECORD = "export_record"
    DOWNLOAD_RECORDING = "download_recording"
    MANAGE_CONSULTATION = "manage_consultation"
    VIEW_AUDIT = "view_audit"
    MANAGE_RETENTION = "manage_retention"
    # Life-cycle rights beyond the base list: who asks, who answers, who schedules.
    REQUEST_CONSULTATION = "request_consultation"
    RESPOND_TO_REQUEST = "respond_to_request"
    SCHEDULE = "schedule"
    INVITE = "invite"
    # Ends an invite link (a lost phone, a wrong recipient) without being able to issue one.
    REVOKE_INVITE = "revoke_invite"
    # Files in the record (rooms/attachments.py): adding one (a document before the call, a
    # snapshot of a tile during it) and reading them.
    ADD_ATTACHMENT = "add_attachment"
    VIEW_ATTACHMENT = "view_attachment"


P = Permission

# Patients read their own record and take a copy of it (PIPL art. 45: access, copy, transfer);
# consultations.record() filters both the same way.
_PATIENT = frozenset(
    {
        P.JOIN,
        P.PUBLISH_AUDIO,
        P.PUBLISH_VIDEO,
        P.SUBSCRIBE,
        P.CHAT,
        P.CONSENT,
        P.VIEW_RECORD,
        P.EXPORT_RECORD,
        # Their own consultation's recordings (policy scopes a patient to it).
        P.DOWNLOAD_RECORDING,
        # Their own results and photos, to their own consultation only (the same scope).
        P.ADD_ATTACHMENT,
        P.VIEW_ATTACHMENT,
    }
)

_CLINICIAN = frozenset(
    {
        P.JOIN,
        P.PUBLISH_AUDIO,
        P.PUBLISH_VIDEO,
        P.PUBLISH_SCREEN,
        P.SUBSCRIBE,
        P.CHAT,
        P.VIEW_RECORD,
        P.DOWNLOAD_RECORDING,
        P.ADD_ATTACHMENT,
        P.VIEW_ATTACHMENT,
    }
)

_INVITED_PHYSICIAN = _CLINICIAN | {
    P.ANNOTATE,
    P.WRITE_OPINION,
    P.SIGN_OPINION,
    P.EXPORT_RECORD,
    P.RESPOND_TO_REQUEST,
    P.SCHEDULE,
    P.END_SESSION,
}

# The inviting side: the clinic that asks for the consultation and answers for the resident.
_INVITING_CLINICIAN = _CLINICIAN | {
    P.ADMIT,
    P.START_RECORDING,
    P.RECORD_DECISION,
    P.END_SESSION,
    P.EXPORT_RECORD,
    P.MANAGE_CONSULTATION,
    P.REQUEST_CONSULTATION,
    P.SCHEDULE,
    P.INVITE,
    P.REVOKE_INVITE,
}

# The one table. Scope rules (team membership, the token's consultation) live in policy.py.
ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.RESIDENT: _PATIENT,
    Role.GUARDIAN: _PATIENT,
    # The family doctor sits with the resident and points at what they see.
    Role.VILLAGE_DOCTOR: _INVITING_CLINICIAN | {P.ANNOTATE},
    Role.TOWNSHIP_DOCTOR: _INVITING_CLINICIAN,
    Role.COUNTY_PHYSICIAN: _INVITED_PHYSICIAN
    | {P.ADMIT, P.REQUEST_CONSULTATION, P.INVITE, P.REVOKE_INVITE},
    Role.PROVINCIAL_SPECIALIST: _INVITED_PHYSICIAN
    | {
        P.ADMIT,
        P.REQUEST_CONSULTATION,
        P.INVITE,
        P.REVOKE_INVITE,
        P.MUTE_OTHERS,
        P.REMOVE_PARTICIPANT,
        P.START_RECORDING,
    },
    # Attachments only as rooms/attachments.py shows them to trainees: once the resident
    # consented to teaching use, images and DICOM stripped of patient identifiers.
    Role.TRAINEE: frozenset({P.JOIN, P.SUBSCRIBE, P.CHAT, P.VIEW_ATTACHMENT}),
    Role.COORDINATOR: frozenset(
        {
            # Joins the room to run the waiting room; sees and hears nothing clinical.
            P.JOIN,
            P.ADMIT,
            P.MANAGE_CONSULTATION,
            P.RESPOND_TO_REQUEST,
            P.SCHEDULE,
            # Not `invite`: an invite reads more than a coordinator may (policy.may_issue_invite).
            P.REVOKE_INVITE,
        }
    ),
    Role.ADMIN: frozenset({P.VIEW_AUDIT, P.MANAGE_RETENTION}),
}

# What publishing each kind of track takes (keys are rooms.model.TrackSource values).
SOURCE_PERMISSION: dict[str, Permission] = {
    "camera": P.PUBLISH_VIDEO,
    "field_camera": P.PUBLISH_VIDEO,
    "microphone": P.PUBLISH_AUDIO,
    "screen": P.PUBLISH_SCREEN,
}

PATIENT_ROLES = frozenset({Role.RESIDENT, Role.GUARDIAN})
CLINICIAN_ROLES = frozenset(
    {
        Role.VILLAGE_DOCTOR,
        Role.TOWNSHIP_DOCTOR,
        Role.COUNTY_PHYSICIAN,
        Role.PROVINCIAL_SPECIALIST,
    }
)
# Roles whose opinion signature the consultation waits for.
INVITED_PHYSICIAN_ROLES = frozenset({Role.COUNTY_PHYSICIAN, Role.PROVINCIAL_SPECIALIST})
# Permissions that are not about one consultation (the operator's rights).
GLOBAL_PERMISSIONS = frozenset({P.VIEW_AUDIT, P.MANAGE_RETENTION, P.REQUEST_CONSULTATION})


def permissions_of(role: Role) -> frozenset[Permission]:
    return ROLE_PERMISSIONS[role]
