"""The session record as a FHIR R4B Bundle (type `collection`): a pure function of the caller's
filtered SessionRecord, so an export never shows more than the record page does.

Every entry's fullUrl is `urn:uuid:` + a UUIDv5 of the resource type and our id, so exporting
the same record twice gives the same fullUrls, and every reference between entries is one of
those fullUrls. People and things outside the bundle (an admin reading the audit log) are
referenced by identifier only. Identifier systems, code systems and extensions of our own live
under `{base_url}/fhir/`.

Where FHIR has no element for what we keep, we say so in an extension rather than bend a field:
- Attachment.hash is SHA-1 by definition; our recordings carry SHA-256, which goes in the
  `sha256` extension on Media.content (hex) and never in `hash`.
- Attachment.size is a 32-bit unsignedInt in R4B; larger files give their size in the
  `size-bytes` extension instead.
- A signature over an opinion is Ed25519 over its signed form (rooms/opinion.py):
  Provenance.signature.data is the signature, `sigFormat` application/octet-stream (FHIR
  names no type for a raw Ed25519 signature), `targetFormat` application/json; the signed form
  itself (base64, `signed-form`), the `signature-key-id`, `signature-algorithm` and the
  result of verifying it for this export (`signature-verification`) are extensions, the
  version's hash is in `content-sha256`. Signatures made before signatures were keyed carry
  no `data` and verify as `unsigned`.
- telemed schedules a start time, not a length; FHIR wants an end on a booked appointment
  (invariant app-3), so Appointment.end is the start plus a nominal slot of NOMINAL_SLOT."""

from __future__ import annotations

import base64
import html
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from rooms import opinion
from rooms.model import (
    Attachment,
    AuditAction,
    AuditEntry,
    Consent,
    ConsentKind,
    ConsultationStatus,
    EventKind,
    FinalDecision,
    OpinionVersion,
    Participation,
    Recording,
    Session,
    SessionId,
    SessionRecord,
    Signature,
    TeamMember,
)
from rooms.roles import PATIENT_ROLES, Role

Resource = dict[str, Any]

# The namespace of every fullUrl; fixed forever, or exports stop lining up with earlier ones.
NAMESPACE = uuid.UUID("6f1c0c52-3a43-5b0e-9c1e-2f6b8f1e4d70")
NOMINAL_SLOT = timedelta(minutes=30)
# Attachment.size is unsignedInt in R4B.
MAX_UNSIGNED_INT = 2**31 - 1

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
MEDIA_TYPE = "http://terminology.hl7.org/CodeSystem/media-type"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_CATEGORY = "http://loinc.org"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
SIGNATURE_TYPE = "urn:iso-astm:E1762-95:2013"
LOINC = "http://loinc.org"
XHTML = "http://www.w3.org/1999/xhtml"

_ENCOUNTER_CLASS = {"system": ACT_CODE, "code": "VR", "display": "virtual"}
_CONSULT_NOTE = {"system": LOINC, "code": "11488-4", "display": "Consult note"}

# The consultation's life cycle, seen as an order (ServiceRequest.status).
_REQUEST_STATUS = {
    ConsultationStatus.REQUESTED: "active",
    ConsultationStatus.ACCEPTED: "active",
    ConsultationStatus.SCHEDULED: "active",
    ConsultationStatus.LIVE: "active",
    ConsultationStatus.OPINION_PENDING: "active",
    ConsultationStatus.SIGNED: "completed",
    ConsultationStatus.ARCHIVED: "completed",
    ConsultationStatus.DECLINED: "revoked",
    ConsultationStatus.CANCELLED: "revoked",
    ConsultationStatus.ABORTED: "revoked",
}
_MEDIA_STATUS = {
    "recording": "in-progress",
    "rendering": "in-progress",
    "complete": "completed",
    # Closed and hashed after a crash: some of the intended recording exists.
    "interrupted": "stopped",
    "failed": "not-done",
}
_CONSENT_SCOPE = {
    ConsentKind.CONSULTATION: "treatment",
    ConsentKind.RECORDING: "patient-privacy",
    ConsentKind.TEACHING: "patient-privacy",
}
# What each kind of consent lets us do with the data (consentaction).
_CONSENT_ACTION = {
    ConsentKind.CONSULTATION: "disclose",
    ConsentKind.RECORDING: "collect",
    ConsentKind.TEACHING: "use",
}
_AUDIT_ACTION = {
    AuditAction.VIEW_CONSULTATION: "R",
    AuditAction.VIEW_RECORD: "R",
    AuditAction.EXPORT_RECORD: "R",
    AuditAction.DOWNLOAD_RECORDING: "R",
    AuditAction.VIEW_AUDIT: "R",
    AuditAction.CREATE_CONSULTATION: "C",
    AuditAction.WRITE_OPINION: "C",
    AuditAction.RECORD_DECISION: "C",
    AuditAction.ISSUE_INVITE: "C",
    AuditAction.DESTROY: "D",
}
_OPINION_SECTIONS = (
    ("findings", "Findings"),
    ("assessment", "Assessment"),
    ("recommendations", "Recommendations"),
    ("referral_advice", "Referral advice"),
)


def fhir_time(at: datetime) -> str:
    """An instant in UTC, as FHIR writes it."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def resource_uuid(resource_type: str, key: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{resource_type}/{key}"))


def export_bundle(record: SessionRecord, base_url: str, at: datetime) -> Resource:
    """The record as a Bundle of type `collection`, exported at `at`."""
    return _Exporter(record, base_url.rstrip("/")).bundle(at)


@dataclass
class _Entries:
    """Resources by fullUrl, in the order they were first added."""

    resources: dict[str, Resource] = field(default_factory=dict)

    def add(self, resource_type: str, key: str, resource: Resource) -> str:
        rid = resource_uuid(resource_type, key)
        url = f"urn:uuid:{rid}"
        if url not in self.resources:
            self.resources[url] = {"resourceType": resource_type, "id": rid, **resource}
        return url


def _ref(url: str, display: str | None = None) -> dict[str, str]:
    return {"reference": url, **({"display": display} if display else {})}


def _text(value: str) -> dict[str, str]:
    return {"text": value}


def _narrative(value: str) -> dict[str, str]:
    return {"status": "generated", "div": f'<div xmlns="{XHTML}">{html.escape(value)}</div>'}


def _period(start: datetime, end: datetime | None) -> dict[str, str]:
    return {"start": fhir_time(start), **({"end": fhir_time(end)} if end is not None else {})}


class _Exporter:
    def __init__(self, record: SessionRecord, base_url: str) -> None:
        self.record = record
        self.c = record.consultation
        self.base = base_url
        self.entries = _Entries()
        # user id -> reference to the resource that stands for them (Patient, RelatedPerson or
        # PractitionerRole), filled as the team and the participants are added.
        self.people: dict[str, str] = {}

    # -- naming ---------------------------------------------------------------------------

    def system(self, name: str) -> str:
        return f"{self.base}/fhir/sid/{name}"

    def code_system(self, name: str) -> str:
        return f"{self.base}/fhir/CodeSystem/{name}"

    def extension(self, name: str, **value: Any) -> dict[str, Any]:
        return {"url": f"{self.base}/fhir/StructureDefinition/{name}", **value}

    def identifier(self, name: str, value: str) -> dict[str, str]:
        return {"system": self.system(name), "value": value}

    def someone(self, user_id: str, display: str | None = None) -> dict[str, Any]:
        """A reference to a person: into the bundle if they are in it, else by identifier."""
        url = self.people.get(user_id)
        if url is not None:
            return _ref(url, display)
        return {
            "identifier": self.identifier("users", user_id),
            **({"display": display} if display else {}),
        }

    # -- the whole bundle -----------------------------------------------------------------

    def bundle(self, at: datetime) -> Resource:
        r = self.record
        self.patient = self.add_patient()
        self.device = self.entries.add(
            "Device",
            "telemed",
            {"deviceName": [{"name": "telemed", "type": "user-friendly-name"}]},
        )
        self.inviting_org = self.organization(self.c.inviting_institution)
        for member in self.c.team:
            self.add_member(member)
        for p in r.participations:
            if p.user_id not in self.people:
                self.add_participant_only(p)
        self.request = self.add_service_request()
        self.appointment = self.add_appointment()
        self.add_care_team()
        self.encounters = {s.id: self.add_encounter(s) for s in r.sessions}
        for event in r.events:
            if event.kind is EventKind.CHAT:
                self.add_chat(event.seq, event.session_id, event.at, event.actor, event.data)
        for recording in r.recordings:
            self.add_media(recording)
        for attachment in r.attachments:
            self.add_document(attachment)
        compositions: dict[int, str] = {}
        for version in r.opinions:
            compositions[version.version] = self.add_opinion(version, compositions)
        for index, decision in enumerate(r.decisions):
            self.add_decision(index, decision, compositions)
        for index, consent in enumerate(r.consents):
            self.add_consent(index, consent)
        for entry in r.audit:
            self.add_audit_event(entry)
        return {
            "resourceType": "Bundle",
            "id": resource_uuid("Bundle", f"{self.c.id}/{fhir_time(at)}"),
            "identifier": self.identifier("consultations", self.c.id),
            "type": "collection",
            "timestamp": fhir_time(at),
            "entry": [
                {"fullUrl": url, "resource": resource}
                for url, resource in self.entries.resources.items()
            ],
        }

    # -- who --------------------------------------------------------------------------------

    def add_patient(self) -> str:
        resident = self.c.resident
        # Pseudonym only: no name, no national id. The display name stays in telemed.
        url = self.entries.add(
            "Patient",
            resident.pseudonym,
            {
                "identifier": [self.identifier("residents", resident.pseudonym)],
                "gender": resident.sex.value,
            },
        )
        self.people[resident.pseudonym] = url
        return url

    def organization(self, name: str) -> str:
        return self.entries.add("Organization", name, {"name": name})

    def role_code(self, role: Role) -> dict[str, Any]:
        return {"coding": [{"system": self.code_system("role"), "code": role.value}]}

    def add_member(self, member: TeamMember) -> None:
        if member.role is Role.RESIDENT:
            self.people[member.user_id] = self.patient
            return
        if member.role is Role.GUARDIAN:
            self.people[member.user_id] = self.entries.add(
                "RelatedPerson",
                f"{self.c.id}/{member.user_id}",
                {
                    "identifier": [self.identifier("users", member.user_id)],
                    "patient": _ref(self.patient),
                    "relationship": [
                        {"coding": [{"system": self.code_system("role"), "code": "guardian"}]}
                    ],
                    "name": [{"text": member.name}],
                },
            )
            return
        self.add_practitioner(member.user_id, member.name, member.role, member.institution)

    def add_practitioner(
        self, user_id: str, name: str, role: Role, institution: str | None
    ) -> None:
        practitioner = self.entries.add(
            "Practitioner",
            user_id,
            {"identifier": [self.identifier("users", user_id)], "name": [{"text": name}]},
        )
        role_resource: Resource = {
            "practitioner": _ref(practitioner, name),
            "code": [self.role_code(role)],
        }
        if institution:
            role_resource["organization"] = _ref(self.organization(institution), institution)
        self.people[user_id] = self.entries.add(
            "PractitionerRole", f"{self.c.id}/{user_id}", role_resource
        )

    def add_participant_only(self, p: Participation) -> None:
        """Someone in a session who is not on the team (a trainee of a teaching session)."""
        if p.role in PATIENT_ROLES:
            return
        self.add_practitioner(p.user_id, p.name, p.role, None)

    # -- the request, the appointment, the team ---------------------------------------------

    def invited_roles(self) -> list[dict[str, str]]:
        return [
            _ref(self.people[m.user_id], m.name)
            for m in self.c.team
            if m.user_id != self.c.inviting_clinician
            and m.role not in PATIENT_ROLES
            and m.role is not Role.COORDINATOR
        ]

    def add_service_request(self) -> str:
        c = self.c
        resource: Resource = {
            "identifier": [self.identifier("consultations", c.id)],
            "status": _REQUEST_STATUS[c.status],
            "intent": "order",
            "code": {
                "coding": [{"system": self.code_system("consultation-kind"), "code": c.kind.value}],
                "text": f"remote {c.kind.value}: {c.specialty}",
            },
            "orderDetail": [_text(c.purpose)],
            "subject": _ref(self.patient),
            "authoredOn": fhir_time(c.created_at),
            "requester": self.someone(c.inviting_clinician),
            "performerType": {
                "coding": [
                    {"system": self.code_system("specialty"), "code": c.requested_specialty}
                ],
                "text": f"{c.requested_title}, {c.requested_specialty}",
            },
            "performer": self.invited_roles(),
            "reasonCode": [_text(c.reason)],
        }
        if c.preferred_time is not None:
            resource["occurrenceDateTime"] = fhir_time(c.preferred_time)
        if c.case_summary:
            resource["note"] = [{"text": c.case_summary}]
        if not resource["performer"]:
            del resource["performer"]
        return self.entries.add("ServiceRequest", c.id, resource)

    def add_appointment(self) -> str | None:
        c = self.c
        if c.scheduled_time is None:
            return None
        if self.record.sessions:
            status = "fulfilled"
        elif c.status in (ConsultationStatus.CANCELLED, ConsultationStatus.ABORTED):
            status = "cancelled"
        else:
            status = "booked"
        participants = [{"actor": _ref(self.patient), "status": "accepted"}]
        participants += [
            {"actor": _ref(url), "status": "accepted"}
            for user_id, url in self.people.items()
            if any(m.user_id == user_id for m in self.c.team) and url != self.patient
        ]
        return self.entries.add(
            "Appointment",
            c.id,
            {
                "identifier": [self.identifier("consultations", c.id)],
                "status": status,
                "basedOn": [_ref(self.request)],
                "reasonCode": [_text(c.reason)],
                "start": fhir_time(c.scheduled_time),
                "end": fhir_time(c.scheduled_time + NOMINAL_SLOT),
                "created": fhir_time(c.created_at),
                "participant": participants,
            },
        )

    def add_care_team(self) -> None:
        c = self.c
        participants = []
        for m in c.team:
            entry: Resource = {
                "role": [self.role_code(m.role)],
                "member": _ref(
                    self.people[m.user_id], m.name if m.role not in PATIENT_ROLES else None
                ),
                "period": {"start": fhir_time(m.added_at)},
            }
            if m.role not in PATIENT_ROLES:
                entry["onBehalfOf"] = _ref(self.organization(m.institution), m.institution)
            participants.append(entry)
        closed = c.status in {
            ConsultationStatus.ARCHIVED,
            ConsultationStatus.DECLINED,
            ConsultationStatus.CANCELLED,
            ConsultationStatus.ABORTED,
        }
        self.entries.add(
            "CareTeam",
            c.id,
            {
                "identifier": [self.identifier("consultations", c.id)],
                "status": "inactive" if closed else "active",
                "name": f"consultation team {c.id}",
                "subject": _ref(self.patient),
                "participant": participants,
                "managingOrganization": [_ref(self.inviting_org, c.inviting_institution)],
            },
        )

    # -- sessions and what happened in them --------------------------------------------------

    def add_encounter(self, s: Session) -> str:
        participants = []
        for p in self.record.participations:
            who = self.people.get(p.user_id)
            # Encounter.participant names practitioners and related persons; the resident is
            # the Encounter's subject.
            if p.session_id != s.id or who is None or who == self.patient:
                continue
            extensions = [self.extension("device", valueString=p.device)]
            if p.close_reason is not None:
                extensions.append(self.extension("close-reason", valueCode=p.close_reason.value))
            participants.append(
                {
                    "extension": extensions,
                    "type": [{"coding": [{"system": PARTICIPATION_TYPE, "code": "PART"}]}],
                    "period": _period(p.joined_at, p.left_at),
                    "individual": _ref(who, p.name),
                }
            )
        # A session is under way until it ends, however it ended (the reason is in the
        # session's own extension); the consultation's later steps do not reopen it.
        status = "in-progress" if s.ended_at is None else "finished"
        resource: Resource = {
            "identifier": [self.identifier("sessions", s.id)],
            "status": status,
            "class": _ENCOUNTER_CLASS,
            "subject": _ref(self.patient),
            "basedOn": [_ref(self.request)],
            "period": _period(s.started_at, s.ended_at),
            "reasonCode": [_text(self.c.reason)],
            "serviceProvider": _ref(self.inviting_org, self.c.inviting_institution),
        }
        if s.end_reason is not None:
            resource["extension"] = [self.extension("end-reason", valueString=s.end_reason)]
        if participants:
            resource["participant"] = participants
        if self.appointment is not None:
            resource["appointment"] = [_ref(self.appointment)]
        return self.entries.add("Encounter", s.id, resource)

    def add_chat(
        self,
        seq: int,
        session_id: SessionId,
        at: datetime,
        actor: str | None,
        data: dict[str, Any],
    ) -> None:
        resource: Resource = {
            "identifier": [self.identifier("events", str(seq))],
            "status": "completed",
            "subject": _ref(self.patient),
            "encounter": _ref(self.encounters[session_id]),
            "sent": fhir_time(at),
            "payload": [{"contentString": str(data.get("text", ""))}],
        }
        if actor is not None:
            resource["sender"] = self.someone(actor, data.get("name"))
        self.entries.add("Communication", f"event/{seq}", resource)

    def add_media(self, r: Recording) -> None:
        url = f"{self.base}/api/v1/recordings/{r.id}/content"
        kind = r.media_type.split("/", 1)[0]
        content: Resource = {"contentType": r.media_type, "url": url, "title": r.track}
        extensions = []
        if r.sha256 is not None:
            # Not Attachment.hash: that is SHA-1 by definition.
            extensions.append(self.extension("sha256", valueString=r.sha256))
        if r.size_bytes is not None:
            if r.size_bytes <= MAX_UNSIGNED_INT:
                content["size"] = r.size_bytes
            else:
                # R4B has no integer64; a decimal holds any byte count exactly.
                extensions.append(self.extension("size-bytes", valueDecimal=r.size_bytes))
        if extensions:
            content["extension"] = extensions
        resource: Resource = {
            "identifier": [self.identifier("recordings", r.id)],
            "status": _MEDIA_STATUS.get(r.state, "unknown"),
            "subject": _ref(self.patient),
            "encounter": _ref(self.encounters[r.session_id]),
            "createdPeriod": _period(r.started_at, r.ended_at),
            "content": content,
        }
        if kind in ("video", "audio", "image"):
            resource["type"] = {"coding": [{"system": MEDIA_TYPE, "code": kind}]}
        if r.duration_s is not None:
            resource["duration"] = round(r.duration_s, 3)
        operator = self.publisher(r)
        if operator is not None:
            resource["operator"] = operator
        self.entries.add("Media", r.id, resource)

    def add_document(self, a: Attachment) -> None:
        """An attachment as a DocumentReference: its file by URL, its SHA-256 (an extension,
        as for recordings), who added it and in which session."""
        content: Resource = {
            "contentType": a.format.value,
            "url": f"{self.base}/api/v1/consultations/{a.consultation_id}/attachments/{a.id}"
            "/content",
            "creation": fhir_time(a.taken_at or a.added_at),
            "extension": [self.extension("sha256", valueString=a.sha256)],
        }
        if a.filename:
            content["title"] = a.filename
        if a.size_bytes <= MAX_UNSIGNED_INT:
            content["size"] = a.size_bytes
        else:
            content["extension"].append(self.extension("size-bytes", valueDecimal=a.size_bytes))
        resource: Resource = {
            "identifier": [self.identifier("attachments", a.id)],
            "status": "current",
            "type": {
                "coding": [{"system": self.code_system("attachment-kind"), "code": a.kind.value}]
            },
            "subject": _ref(self.patient),
            "date": fhir_time(a.added_at),
            "author": [self.someone(a.added_by, a.added_by_name)],
            "content": [{"attachment": content}],
        }
        if a.description:
            resource["description"] = a.description
        if a.session_id is not None and a.session_id in self.encounters:
            resource["context"] = {"encounter": [_ref(self.encounters[a.session_id])]}
        self.entries.add("DocumentReference", a.id, resource)

    def publisher(self, r: Recording) -> dict[str, str] | None:
        """Whose track a recording is, if they are a practitioner in the bundle
        (Media.operator takes no Patient)."""
        for p in self.record.participations:
            if p.session_id == r.session_id and p.participant_id == r.participant_id:
                url = self.people.get(p.user_id)
                if url is not None and url != self.patient:
                    return _ref(url, p.name)
        return None

    # -- the opinion and the decision ---------------------------------------------------------

    def latest_encounter(self) -> str | None:
        sessions = self.record.sessions
        return self.encounters[sessions[-1].id] if sessions else None

    def add_opinion(self, v: OpinionVersion, earlier: dict[int, str]) -> str:
        if not v.locked:
            status = "preliminary"
        elif v.amendment_reason is not None:
            status = "amended"
        else:
            status = "final"
        sections = [
            {"title": title, "text": _narrative(getattr(v.content, name))}
            for name, title in _OPINION_SECTIONS
            if getattr(v.content, name)
        ]
        if v.amendment_reason is not None:
            sections.append({"title": "Amendment reason", "text": _narrative(v.amendment_reason)})
        resource: Resource = {
            "identifier": self.identifier("opinions", f"{self.c.id}/{v.version}"),
            "status": status,
            "type": {"coding": [_CONSULT_NOTE]},
            "subject": _ref(self.patient),
            "date": fhir_time(v.created_at),
            "author": [self.someone(v.author)],
            "title": f"Consultation opinion (会诊意见), version {v.version}",
            "custodian": _ref(self.inviting_org, self.c.inviting_institution),
            "extension": [self.extension("content-sha256", valueString=v.content_hash)],
        }
        encounter = self.latest_encounter()
        if encounter is not None:
            resource["encounter"] = _ref(encounter)
        if v.signatures:
            resource["attester"] = [
                {
                    "mode": "legal",
                    "time": fhir_time(s.signed_at),
                    "party": self.someone(s.signer, s.signer_name),
                }
                for s in v.signatures
            ]
        previous = earlier.get(v.version - 1)
        if previous is not None:
            resource["relatesTo"] = [{"code": "replaces", "targetReference": _ref(previous)}]
        if sections:
            resource["section"] = sections
        url = self.entries.add("Composition", f"{self.c.id}/opinion/{v.version}", resource)
        for s in v.signatures:
            self.add_provenance(v, s, url)
        return url

    def add_provenance(self, v: OpinionVersion, s: Signature, composition: str) -> None:
        # Author's signature for the one who wrote this version, coauthor's for the others.
        code = "1.2.840.10065.1.12.1.1" if s.signer == v.author else "1.2.840.10065.1.12.1.2"
        who = self.someone(s.signer, s.signer_name)
        signature: Resource = {
            "type": [{"system": SIGNATURE_TYPE, "code": code}],
            "when": fhir_time(s.signed_at),
            "who": who,
            "extension": [
                self.extension("content-sha256", valueString=s.content_hash),
                # What the server found when it verified the signature for this export.
                self.extension("signature-verification", valueCode=str(s.check)),
            ],
        }
        previous = next((p for p in self.record.opinions if p.version == v.version - 1), None)
        if s.key_id is not None and s.value is not None and (v.version == 1 or previous):
            # Ed25519 over the signed form, which travels with it (targetFormat: what `data`
            # signs) so that anyone with the public key of key-id can check it.
            form = opinion.signed_form(
                v, previous, s.signer, s.signer_name, s.signer_role, s.signed_at, s.key_id
            )
            signature["extension"] += [
                self.extension("signature-key-id", valueString=s.key_id),
                self.extension("signature-algorithm", valueCode="Ed25519"),
                self.extension(
                    "signed-form", valueBase64Binary=base64.b64encode(form).decode("ascii")
                ),
            ]
            signature["targetFormat"] = "application/json"
            signature["sigFormat"] = "application/octet-stream"
            signature["data"] = s.value
        self.entries.add(
            "Provenance",
            f"{self.c.id}/opinion/{v.version}/{s.signer}",
            {
                "target": [_ref(composition)],
                "recorded": fhir_time(s.signed_at),
                "agent": [{"who": who}],
                "signature": [signature],
            },
        )

    def add_decision(self, index: int, d: FinalDecision, compositions: dict[int, str]) -> None:
        resource: Resource = {
            "identifier": self.identifier("decisions", f"{self.c.id}/{index + 1}"),
            "status": "final",
            "type": {"coding": [_CONSULT_NOTE], "text": "final decision of the inviting clinician"},
            "subject": _ref(self.patient),
            "date": fhir_time(d.at),
            "author": [self.someone(d.decided_by)],
            "title": "Final decision",
            "custodian": _ref(self.inviting_org, self.c.inviting_institution),
            "section": [{"title": "Decision", "text": _narrative(d.decision)}],
        }
        signed = [v for v in self.record.opinions if v.locked and v.created_at <= d.at]
        if signed and signed[-1].version in compositions:
            resource["relatesTo"] = [
                {"code": "appends", "targetReference": _ref(compositions[signed[-1].version])}
            ]
        self.entries.add("Composition", f"{self.c.id}/decision/{index + 1}", resource)

    # -- consents and the audit trail -----------------------------------------------------------

    def add_consent(self, index: int, consent: Consent) -> None:
        # A later entry of the same kind replaces this one (a grant withdrawn, or given again).
        superseded = any(later.kind is consent.kind for later in self.record.consents[index + 1 :])
        resource: Resource = {
            "identifier": [self.identifier("consents", f"{self.c.id}/{index + 1}")],
            "status": "inactive" if superseded else "active",
            "scope": {"coding": [{"system": CONSENT_SCOPE, "code": _CONSENT_SCOPE[consent.kind]}]},
            "category": [
                {"coding": [{"system": CONSENT_CATEGORY, "code": "59284-0"}]},
                {
                    "coding": [
                        {"system": self.code_system("consent-kind"), "code": consent.kind.value}
                    ]
                },
            ],
            "patient": _ref(self.patient),
            "dateTime": fhir_time(consent.at),
            "performer": [self.someone(consent.given_by)],
            "organization": [_ref(self.inviting_org, self.c.inviting_institution)],
            "policyRule": {
                "coding": [{"system": ACT_CODE, "code": "OPTIN" if consent.granted else "OPTOUT"}]
            },
            "provision": {
                "type": "permit" if consent.granted else "deny",
                "action": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                "code": _CONSENT_ACTION[consent.kind],
                            }
                        ]
                    }
                ],
            },
            "extension": [self.extension("on-behalf-of", valueString=consent.on_behalf_of)],
        }
        self.entries.add("Consent", f"{self.c.id}/consent/{index + 1}", resource)

    def add_audit_event(self, e: AuditEntry) -> None:
        agent: Resource = {
            "who": self.someone(e.actor),
            "role": [self.role_code(e.actor_role)],
            "requestor": True,
        }
        if e.remote_addr:
            agent["network"] = {"address": e.remote_addr, "type": "2"}
        entity: Resource = {"what": _ref(self.request)}
        if e.target is not None:
            entity["name"] = e.target
        if e.detail:
            entity["detail"] = [
                {"type": key, "valueString": _detail_value(value)}
                for key, value in sorted(e.detail.items())
            ]
        self.entries.add(
            "AuditEvent",
            f"audit/{e.seq}",
            {
                "type": {"system": AUDIT_EVENT_TYPE, "code": "rest"},
                "subtype": [{"system": self.code_system("audit-action"), "code": e.action.value}],
                "action": _AUDIT_ACTION.get(e.action, "U"),
                "recorded": fhir_time(e.at),
                "outcome": "0",
                "agent": [agent],
                "source": {"observer": _ref(self.device, "telemed")},
                "entity": [entity],
            },
        )


def _detail_value(value: object) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def references(resource: object) -> Iterable[str]:
    """Every literal reference in a resource (for checks that they resolve)."""
    if isinstance(resource, dict):
        for key, value in resource.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(resource, list):
        for item in resource:
            yield from references(item)
