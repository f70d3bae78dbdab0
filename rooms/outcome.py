"""What a room action asks the transport to do: announcements to audiences, and changes to
which connections are in which audience. The domain decides; signaling/ delivers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from rooms.model import ConsultationId


class Audience(StrEnum):
    ROOM = "room"  # every admitted participant of the consultation
    ADMITTERS = "admitters"  # participants who may admit from the waiting room
    CONNECTION = "connection"  # one connection


@dataclass(frozen=True)
class Target:
    audience: Audience
    key: str  # a consultation id, or a connection id

    @classmethod
    def room(cls, consultation_id: ConsultationId) -> Target:
        return cls(Audience.ROOM, consultation_id)

    @classmethod
    def admitters(cls, consultation_id: ConsultationId) -> Target:
        return cls(Audience.ADMITTERS, consultation_id)

    @classmethod
    def connection(cls, connection: str) -> Target:
        return cls(Audience.CONNECTION, connection)


@dataclass(frozen=True)
class Announcement:
    event: str
    payload: dict[str, Any]
    to: Target
    skip_connection: str | None = None


@dataclass(frozen=True)
class Membership:
    """Put a connection into (or take it out of) an audience of a consultation."""

    connection: str
    audience: Audience
    consultation_id: ConsultationId
    enter: bool


@dataclass(frozen=True)
class Seat:
    """A participant who took a seat: media starts flowing to (and from) them."""

    consultation_id: ConsultationId
    participant_id: str
    connection: str
    may_subscribe: bool
    # Whether the seat may publish any kind of track: a seat that may not (a trainee) can
    # be served by another worker than the room's (a room larger than one worker).
    may_publish: bool = False


@dataclass
class Outcome:
    """Applied by the transport in this order: memberships, media, announcements,
    disconnects."""

    memberships: list[Membership] = field(default_factory=list)
    announcements: list[Announcement] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    seated: list[Seat] = field(default_factory=list)
    # Participants whose seat is gone: their media stops everywhere.
    unseated: list[tuple[ConsultationId, str]] = field(default_factory=list)
    # Seats resumed on a new connection whose media connections carry on.
    moved: list[Seat] = field(default_factory=list)
    # Forced mutes: (consultation, participant, "audio" | "video").
    muted: list[tuple[ConsultationId, str, str]] = field(default_factory=list)
    # Rooms whose session ended: nothing of them stays here.
    ended: list[ConsultationId] = field(default_factory=list)
    # A reply to the connection that sent the event (the ack), if any.
    reply: dict[str, Any] | None = None

    def announce(
        self, event: str, payload: dict[str, Any], to: Target, skip: str | None = None
    ) -> None:
        self.announcements.append(Announcement(event, payload, to, skip))

    def enter(self, connection: str, audience: Audience, consultation_id: ConsultationId) -> None:
        self.memberships.append(Membership(connection, audience, consultation_id, True))

    def leave(self, connection: str, audience: Audience, consultation_id: ConsultationId) -> None:
        self.memberships.append(Membership(connection, audience, consultation_id, False))
