"""The /api/v1 endpoints: each reads its validated input, calls one use case, returns a model."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from media.hub import MediaHub
from media.sealed import SealKeys
from rooms.attachments import AttachmentService
from rooms.consultations import (
    ConsultationService,
    NewConsultation,
    NewTeamMember,
    RequestContext,
)
from rooms.invite_codes import InviteCodes
from rooms.lifecycle import Action
from rooms.model import Consultation, ConsultationId, OpinionContent, Resident, UserId
from rooms.store import ConsultationFilter
from server.api.attachment_routes import Announce, AttachmentRoutes
from server.api.fhir_routes import FhirRoutes
from server.api.framework import Api, Authenticate, Call, Endpoint, Handler
from server.api.invite_routes import InviteRoutes, Revocations
from server.api.media_routes import MediaRoutes
from server.api.recording_routes import PlaybackGrants, RecordingRoutes
from server.api.retention_routes import LegalHoldRoutes
from server.api.schemas import (
    AuditEntryOut,
    AuditList,
    AuditQuery,
    ConsultationList,
    ConsultationOut,
    ConsultationQuery,
    CreateConsultation,
    DecisionIn,
    DecisionOut,
    NoBody,
    OpinionIn,
    OpinionOut,
    ReasonBody,
    RecordOut,
    ScheduleBody,
    SignedOut,
    SignIn,
    TeamMemberIn,
)
from server.api.verify_routes import Verifier, VerifyRoutes
from server.attachment_files import AttachmentFiles
from server.auth import TokenService
from server.config import DEFAULT_ATTACHMENT_MAX_BYTES
from server.guess_limits import GuessLimits

PREFIX = "/api/v1"
ONE = PREFIX + "/consultations/{consultation_id}"


class LiveTransitions(Protocol):
    """Carries out a life-cycle action through the live room where it ends an open session
    (announced, everyone disconnected, the recording stopped; signaling)."""

    async def transition(
        self,
        ctx: RequestContext,
        consultation_id: ConsultationId,
        action: Action,
        *,
        reason: str | None = None,
        scheduled_time: datetime | None = None,
    ) -> Consultation: ...


def _cid(call: Call[Any, Any]) -> ConsultationId:
    return ConsultationId(call.path("consultation_id"))


class ConsultationRoutes:
    def __init__(
        self,
        service: ConsultationService,
        live: LiveTransitions | None,
    ) -> None:
        self._service = service
        # Without it (an API built only to be described) a transition touches the record alone.
        self._transitions: LiveTransitions | ConsultationService = live or service

    def endpoints(self) -> list[Endpoint]:
        tags = ("consultations",)
        lifecycle = [
            Endpoint(
                "POST",
                f"{ONE}/{action.value}",
                self._transition_handler(action),
                f"{action.value.capitalize()} the consultation",
                ConsultationOut,
                body=body,
                tags=("life cycle",),
                errors=(400, 401, 403, 404, 409),
            )
            for action, body in (
                (Action.ACCEPT, NoBody),
                (Action.DECLINE, ReasonBody),
                (Action.SCHEDULE, ScheduleBody),
                (Action.CANCEL, ReasonBody),
                (Action.ABORT, ReasonBody),
                (Action.ARCHIVE, NoBody),
            )
        ]
        return [
            Endpoint(
                "POST",
                f"{PREFIX}/consultations",
                self.create,
                "Request a consultation",
                ConsultationOut,
                body=CreateConsultation,
                status=201,
                tags=tags,
            ),
            Endpoint(
                "GET",
                f"{PREFIX}/consultations",
                self.list,
                "List the consultations you may see",
                ConsultationList,
                query=ConsultationQuery,
                tags=tags,
            ),
            Endpoint("GET", ONE, self.get, "Get one consultation", ConsultationOut, tags=tags),
            *lifecycle,
            Endpoint(
                "POST",
                f"{ONE}/team",
                self.add_member,
                "Add a clinician or coordinator to the team",
                ConsultationOut,
                body=TeamMemberIn,
                status=201,
                tags=tags,
                errors=(400, 401, 403, 404, 409),
            ),
            Endpoint(
                "POST",
                f"{ONE}/opinions",
                self.write_opinion,
                "Write the opinion (a new version; an amendment once signed)",
                OpinionOut,
                body=OpinionIn,
                status=201,
                tags=("opinion",),
                errors=(400, 401, 403, 404, 409),
            ),
            Endpoint(
                "POST",
                f"{ONE}/opinions/sign",
                self.sign_opinion,
                "Sign the newest opinion version",
                SignedOut,
                body=SignIn,
                tags=("opinion",),
                errors=(400, 401, 403, 404, 409),
            ),
            Endpoint(
                "POST",
                f"{ONE}/decision",
                self.record_decision,
                "Record the inviting clinician's final decision",
                DecisionOut,
                body=DecisionIn,
                status=201,
                tags=("opinion",),
                errors=(400, 401, 403, 404, 409),
            ),
            Endpoint(
                "GET",
                f"{ONE}/record",
                self.record,
                "The session record (audited)",
                RecordOut,
                tags=("record",),
            ),
            Endpoint(
                "GET",
                f"{PREFIX}/audit",
                self.audit,
                "The audit log (admins)",
                AuditList,
                query=AuditQuery,
                tags=("audit",),
                errors=(400, 401, 403),
            ),
        ]

    async def create(self, call: Call[CreateConsultation, None]) -> ConsultationOut:
        b = call.body
        new = NewConsultation(
            kind=b.kind,
            specialty=b.specialty,
            resident=Resident(
                b.resident.pseudonym, b.resident.display_name, b.resident.age, b.resident.sex
            ),
            reason=b.reason,
            purpose=b.purpose,
            case_summary=b.case_summary,
            requested_specialty=b.requested_specialty,
            requested_title=b.requested_title,
            preferred_time=b.preferred_time,
            team=[_member(m) for m in b.team],
        )
        return await self._out(call, await self._service.create(call.ctx, new))

    async def list(self, call: Call[None, ConsultationQuery]) -> ConsultationList:
        q = call.query
        query = ConsultationFilter(
            status=q.status, role=q.role, institution=q.institution, limit=q.limit, offset=q.offset
        )
        found = await self._service.list_visible(call.ctx, query)
        views = await self._service.views(call.ctx, found)
        return ConsultationList(items=[ConsultationOut.of(v) for v in views])

    async def get(self, call: Call[None, None]) -> ConsultationOut:
        return await self._out(call, await self._service.get(call.ctx, _cid(call)))

    async def _out(self, call: Call[Any, Any], consultation: Consultation) -> ConsultationOut:
        """Every consultation this API returns is projected for its reader first."""
        return ConsultationOut.of(await self._service.view(call.ctx, consultation))

    def _transition_handler(self, action: Action) -> Handler:
        async def handle(call: Call[NoBody | ReasonBody | ScheduleBody, None]) -> ConsultationOut:
            body = call.body
            consultation = await self._transitions.transition(
                call.ctx,
                _cid(call),
                action,
                reason=body.reason if isinstance(body, ReasonBody) else None,
                scheduled_time=body.scheduled_time if isinstance(body, ScheduleBody) else None,
            )
            return await self._out(call, consultation)

        return handle

    async def add_member(self, call: Call[TeamMemberIn, None]) -> ConsultationOut:
        consultation = await self._service.add_member(call.ctx, _cid(call), _member(call.body))
        return await self._out(call, consultation)

    async def write_opinion(self, call: Call[OpinionIn, None]) -> OpinionOut:
        b = call.body
        content = OpinionContent(b.findings, b.assessment, b.recommendations, b.referral_advice)
        version = await self._service.write_opinion(
            call.ctx, _cid(call), content, b.amendment_reason
        )
        return OpinionOut.of(version)

    async def sign_opinion(self, call: Call[SignIn, None]) -> SignedOut:
        version, consultation = await self._service.sign_opinion(
            call.ctx, _cid(call), call.body.version
        )
        return SignedOut(opinion=OpinionOut.of(version), consultation_status=consultation.status)

    async def record_decision(self, call: Call[DecisionIn, None]) -> DecisionOut:
        decision = await self._service.record_decision(call.ctx, _cid(call), call.body.decision)
        return DecisionOut.of(decision)

    async def record(self, call: Call[None, None]) -> RecordOut:
        record = await self._service.record(call.ctx, _cid(call))
        return RecordOut.of(record, await self._service.view(call.ctx, record.consultation))

    async def audit(self, call: Call[None, AuditQuery]) -> AuditList:
        q = call.query
        cid = ConsultationId(q.consultation) if q.consultation else None
        entries = await self._service.audit_log(call.ctx, cid, q.limit, q.after)
        return AuditList(items=[AuditEntryOut.of(e) for e in entries])


def _member(m: TeamMemberIn) -> NewTeamMember:
    return NewTeamMember(UserId(m.user_id), m.name, m.role, m.institution)


def build_api(
    service: ConsultationService,
    tokens: TokenService,
    invite_ttl_s: int,
    authenticate: Authenticate,
    hub: MediaHub,
    *,
    public_url: str = "",
    data_dir: Path = Path("data"),
    recording_keys: SealKeys | None = None,
    revocations: Revocations | None = None,
    live: LiveTransitions | None = None,
    link_key: bytes | None = None,
    verifier: Verifier | None = None,
    attachments: AttachmentService | None = None,
    attachment_max_bytes: int = DEFAULT_ATTACHMENT_MAX_BYTES,
    announce: Announce | None = None,
    invite_codes: InviteCodes | None = None,
    invite_guesses: GuessLimits | None = None,
    invite_base_url: str = "",
) -> Api:
    """`public_url` is the base of links in exports; empty, the request's own origin.
    `data_dir` holds the recordings, sealed with `recording_keys` (without them, recording
    content is refused). `revocations` ends the connections of a revoked invite; without it (an
    API built only to be described) revoking touches the record alone. `live` carries out
    life-cycle actions through the live room. `link_key` signs playback links (a key of this
    process's own without it). `verifier` checks a record (server/verify.py); an API without
    one is only described. Attachments are stored under `data_dir` with `recording_keys` too,
    at most `attachment_max_bytes` each; `announce` delivers `attachment_added` to the room.
    `invite_codes` issues and redeems short invite codes, guarded by `invite_guesses`;
    invite links start with `invite_base_url` (else the request's origin)."""
    api = Api(authenticate)
    files = AttachmentFiles(data_dir, recording_keys)
    for endpoint in [
        *RecordingRoutes(
            service, data_dir, authenticate, recording_keys, PlaybackGrants(key=link_key)
        ).endpoints(),
        *ConsultationRoutes(service, live).endpoints(),
        *InviteRoutes(
            service,
            tokens,
            invite_ttl_s,
            revocations,
            invite_codes,
            invite_guesses or GuessLimits(),
            invite_base_url,
        ).endpoints(),
        *MediaRoutes(service, hub).endpoints(),
        *FhirRoutes(service, public_url).endpoints(),
        *LegalHoldRoutes(service).endpoints(),
        *VerifyRoutes(service, verifier).endpoints(),
        *AttachmentRoutes(
            attachments or AttachmentService(service.store),
            files,
            attachment_max_bytes,
            announce,
        ).endpoints(),
    ]:
        api.add(endpoint)
    return api
