"""The record as FHIR: the route only asks the service for the caller's filtered record (which
checks export_record and audits the export) and hands it to the pure mapping."""

from __future__ import annotations

from typing import Any, Literal

from rooms.clock import Clock, utc_now
from rooms.consultations import ConsultationService
from rooms.model import ConsultationId
from server.api.framework import Call, Endpoint
from server.api.schemas import ResponseBody
from server.fhir.export import export_bundle

ONE = "/api/v1/consultations/{consultation_id}"
FHIR_JSON = "application/fhir+json"


class FhirEntry(ResponseBody):
    fullUrl: str
    # A FHIR R4B resource; its structure is FHIR's (the tests validate it with fhir.resources).
    resource: dict[str, Any]


class FhirBundle(ResponseBody):
    """A FHIR R4B Bundle of type `collection` (field names are FHIR's)."""

    resourceType: Literal["Bundle"]
    id: str
    identifier: dict[str, str]
    type: Literal["collection"]
    timestamp: str
    entry: list[FhirEntry]


class FhirRoutes:
    def __init__(
        self, service: ConsultationService, public_url: str, clock: Clock = utc_now
    ) -> None:
        self._service = service
        self._public_url = public_url
        self._now = clock

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                "GET",
                f"{ONE}/fhir",
                self.export,
                "The record as a FHIR R4B Bundle, filtered for the caller (audited as an export)",
                FhirBundle,
                tags=("record",),
                content_type=FHIR_JSON,
            )
        ]

    async def export(self, call: Call[None, None]) -> FhirBundle:
        cid = ConsultationId(call.path("consultation_id"))
        record = await self._service.export_record(call.ctx, cid)
        base = self._public_url or str(call.request.url.origin())
        return FhirBundle.model_validate(export_bundle(record, base, self._now()))
