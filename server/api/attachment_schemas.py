"""Bodies of the attachment endpoints (server/api/attachment_routes.py)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from rooms.model import AttachmentKind
from rooms.roles import ROLE_PERMISSIONS, Permission
from server.api.schemas import (
    AttachmentOut,
    ClinicalTime,
    Identifier,
    ReasonText,
    RequestBody,
    ResponseBody,
)

__all__ = ["AttachmentForm", "AttachmentList", "AttachmentOut", "DicomOut", "role_table"]


class AttachmentForm(RequestBody):
    """The text fields of the multipart upload (besides the one `file` part)."""

    kind: AttachmentKind = Field(
        default=AttachmentKind.DOCUMENT,
        description="`snapshot`: a still of a video tile, taken during a live session",
    )
    description: ReasonText | None = None
    taken_at: ClinicalTime | None = Field(
        default=None, description="A snapshot: when the frame was taken (default: on upload)"
    )
    track: Identifier | None = Field(
        default=None, description="A snapshot: the id of the track (the tile) it shows"
    )

    @model_validator(mode="after")
    def _snapshot_fields(self) -> AttachmentForm:
        if self.kind is not AttachmentKind.SNAPSHOT and (self.taken_at or self.track):
            raise ValueError("taken_at and track belong to a snapshot (kind=snapshot)")
        return self


class AttachmentList(ResponseBody):
    items: list[AttachmentOut]


class DicomOut(ResponseBody):
    attachment: str
    deidentified: bool
    elements: dict[str, Any] = Field(
        description="Top-level public elements by keyword (sequences and binary values left "
        "out); for trainees only an allow-list without patient identifiers"
    )


def role_table() -> str:
    """The role table of the attachment rights, for the OpenAPI document (from the one table)."""
    lines = ["| role | add_attachment | view_attachment |", "|---|---|---|"]
    for role, granted in ROLE_PERMISSIONS.items():
        add = "✓" if Permission.ADD_ATTACHMENT in granted else ""
        view = "✓" if Permission.VIEW_ATTACHMENT in granted else ""
        lines.append(f"| `{role.value}` | {add} | {view} |")
    return "\n".join(lines)
