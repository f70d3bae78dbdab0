"""Verification of a consultation's record over the API (admins; each request audited):
what `telemed verify` reports (server/verify.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from rooms.consultations import ConsultationService
from rooms.errors import NotFound
from rooms.model import ConsultationId
from server.api.framework import Call, Endpoint
from server.api.schemas import ResponseBody
from server.verify import VerifyReport

ONE = "/api/v1/consultations/{consultation_id}"

Verifier = Callable[[ConsultationId], Awaitable[VerifyReport | None]]


class MismatchOut(ResponseBody):
    check: str
    where: str
    problem: str
    expected: str | None
    found: str | None
    consultation_id: str | None


class VerifyOut(ResponseBody):
    consultation_id: str
    ok: bool
    checked: dict[str, int]
    mismatches: list[MismatchOut]
    notes: list[str]

    @classmethod
    def of(cls, report: VerifyReport) -> VerifyOut:
        return cls.model_validate(report.as_json())


class VerifyRoutes:
    def __init__(self, service: ConsultationService, verifier: Verifier | None) -> None:
        self._service = service
        self._verifier = verifier

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                "GET",
                f"{ONE}/verify",
                self.verify,
                "Verify the record: event and audit chains, opinion signatures, recording files "
                "(admins)",
                VerifyOut,
                tags=("audit",),
            )
        ]

    async def verify(self, call: Call[None, None]) -> VerifyOut:
        if self._verifier is None:
            raise RuntimeError("this API was built without a verifier (to be described only)")
        cid = ConsultationId(call.path("consultation_id"))
        await self._service.verify_record(call.ctx, cid)
        report = await self._verifier(cid)
        if report is None:  # destroyed since the check a moment ago
            raise NotFound(f"no consultation {cid}")
        return VerifyOut.of(report)
