"""Media statistics of a live room."""

from __future__ import annotations

from typing import Any

from media.hub import MediaHub
from rooms.consultations import ConsultationService
from rooms.model import ConsultationId
from rooms.roles import Permission
from server.api.framework import Call, Endpoint
from server.api.schemas import ResponseBody

ONE = "/api/v1/consultations/{consultation_id}"


class MediaStats(ResponseBody):
    """Per published track (with each subscriber's view of it) and per participant. Rates are
    over the last second; `layer` is `full`, `low` or `audio_only`. Each track's `intake` is
    the loss on its publisher's link, each subscriber's figures the loss on that
    subscriber's link (docs/protocol.md, Media, Loss per hop)."""

    tracks: list[dict[str, Any]]
    participants: list[dict[str, Any]]


class MediaRoutes:
    def __init__(self, service: ConsultationService, hub: MediaHub) -> None:
        self._service = service
        self._hub = hub

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                "GET",
                f"{ONE}/media",
                self.stats,
                "Media statistics of the live room (rates, loss, jitter, round-trip time)",
                MediaStats,
                tags=("media",),
            )
        ]

    async def stats(self, call: Call[None, None]) -> MediaStats:
        cid = ConsultationId(call.path("consultation_id"))
        await self._service.authorize(call.ctx, cid, Permission.JOIN)
        return MediaStats(**await self._hub.stats(cid))
