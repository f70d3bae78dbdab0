"""Payloads of the client → server events. Each is validated before anything else happens;
unknown fields are errors so a client bug shows up at once."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictStr,
    StringConstraints,
    field_validator,
    model_validator,
)

from rooms.model import ConsentKind, TrackSource
from rooms.text import reject_control_characters, reject_control_characters_or_line_breaks

# Every free-text field: no control characters, and never bytes passed off as text.
Text = Annotated[StrictStr, AfterValidator(reject_control_characters)]
# A label shown on one line (a device name).
OneLineText = Annotated[StrictStr, AfterValidator(reject_control_characters_or_line_breaks)]

Id = Annotated[
    StrictStr,
    # ASCII, as the pattern reads in the JSON Schema of the document (Python's \w is Unicode).
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@:-]+$"
    ),
]
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")


class EventBody(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)


class Join(EventBody):
    consultation_id: Id
    device: Annotated[OneLineText, StringConstraints(min_length=1, max_length=40)] = "default"
    # The client still holds its seat's peer connections (a new socket, not a reloaded page).
    keep_media: StrictBool = False


class Empty(EventBody):
    pass


class Admit(EventBody):
    participant: Id


class Deny(EventBody):
    participant: Id
    reason: Annotated[Text, StringConstraints(max_length=500)] = ""


class Chat(EventBody):
    # The configured chat limit is checked by the namespace; this is the hard ceiling.
    text: Annotated[Text, StringConstraints(min_length=1, max_length=10_000)]


class Mute(EventBody):
    participant: Id
    kind: Literal["audio", "video"]


class Remove(EventBody):
    participant: Id
    reason: Annotated[Text, StringConstraints(min_length=1, max_length=500)]


class GiveConsent(EventBody):
    kind: ConsentKind
    granted: StrictBool
    on_behalf_of: Id | None = None


# Numbers are JSON numbers (an integer is a number too); never a string or a boolean.
Unit = Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class Annotate(EventBody):
    target_track: Id
    points: list[tuple[Unit, Unit]] = Field(default_factory=list, max_length=10_000)
    colour: StrictStr = "#ffcc00"
    width: StrictFloat = Field(default=3.0, ge=0.5, le=20.0, allow_inf_nan=False)
    clear: StrictBool = False
    media_time: StrictFloat | None = Field(default=None, ge=0.0, allow_inf_nan=False)

    @field_validator("colour")
    @classmethod
    def _colour(cls, value: str) -> str:
        if not _COLOUR.match(value):
            raise ValueError("colour must be #rrggbb")
        return value.lower()

    @model_validator(mode="after")
    def _has_points(self) -> Annotate:
        if not self.clear and not self.points:
            raise ValueError("a stroke needs points (or clear: true)")
        return self


class Pointer(EventBody):
    target_track: Id
    x: Unit
    y: Unit


Sdp = Annotated[StrictStr, StringConstraints(min_length=1, max_length=60_000)]


class PublishOffer(EventBody):
    sdp: Sdp
    # What each offered media section (by mid) carries.
    tracks: dict[Id, TrackSource] = Field(default_factory=dict, max_length=8)


class SubscribeAnswer(EventBody):
    sdp: Sdp


class SetLayer(EventBody):
    # One video track, or every video track received when left out.
    track_id: Id | None = None
    layer: Literal["auto", "full", "low", "audio_only"]


class TraineeChat(EventBody):
    open: StrictBool
