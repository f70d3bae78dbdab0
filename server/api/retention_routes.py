"""Legal holds: an operator (manage_retention) keeps a consultation's record from destruction."""

from __future__ import annotations

from datetime import datetime

from rooms.consultations import ConsultationService
from rooms.model import ConsultationId
from rooms.retention import LegalHold
from server.api.framework import Call, Endpoint
from server.api.schemas import ReasonBody, ResponseBody

ONE = "/api/v1/consultations/{consultation_id}"


class LegalHoldOut(ResponseBody):
    """The hold in force; `held` false (and the rest null) when there is none."""

    consultation_id: str
    held: bool
    reason: str | None = None
    placed_by: str | None = None
    placed_at: datetime | None = None

    @classmethod
    def of(cls, consultation_id: str, hold: LegalHold | None) -> LegalHoldOut:
        if hold is None:
            return cls(consultation_id=consultation_id, held=False)
        return cls(
            consultation_id=consultation_id,
            held=True,
            reason=hold.reason,
            placed_by=hold.placed_by,
            placed_at=hold.placed_at,
        )


class LegalHoldRoutes:
    def __init__(self, service: ConsultationService) -> None:
        self._service = service

    def endpoints(self) -> list[Endpoint]:
        tags = ("retention",)
        return [
            Endpoint(
                "GET",
                f"{ONE}/legal-hold",
                self.get_hold,
                "The legal hold in force, if any (admins)",
                LegalHoldOut,
                tags=tags,
            ),
            Endpoint(
                "PUT",
                f"{ONE}/legal-hold",
                self.place,
                "Put the record on legal hold, or change the reason of the hold (admins)",
                LegalHoldOut,
                body=ReasonBody,
                tags=tags,
            ),
            Endpoint(
                "DELETE",
                f"{ONE}/legal-hold",
                self.release,
                "Release the legal hold, with a reason (admins)",
                None,
                body=ReasonBody,
                status=204,
                tags=tags,
                errors=(400, 401, 403, 404, 409),
            ),
        ]

    async def get_hold(self, call: Call[None, None]) -> LegalHoldOut:
        cid = ConsultationId(call.path("consultation_id"))
        return LegalHoldOut.of(cid, await self._service.legal_hold(call.ctx, cid))

    async def place(self, call: Call[ReasonBody, None]) -> LegalHoldOut:
        cid = ConsultationId(call.path("consultation_id"))
        hold = await self._service.place_legal_hold(call.ctx, cid, call.body.reason)
        return LegalHoldOut.of(cid, hold)

    async def release(self, call: Call[ReasonBody, None]) -> None:
        cid = ConsultationId(call.path("consultation_id"))
        await self._service.release_legal_hold(call.ctx, cid, call.body.reason)
