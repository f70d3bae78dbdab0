"""Who is in a live room right now: the presence model and the store that holds it.

The in-memory store is the embedded default; a Redis store (server/) shares presence between
server nodes behind the same protocol."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from rooms.model import ConsultationId, ParticipantId, SessionId, UserId
from rooms.roles import Role


class ParticipantState(StrEnum):
    WAITING = "waiting"
    ADMITTED = "admitted"


@dataclass(frozen=True)
class LiveParticipant:
    participant_id: ParticipantId
    user_id: UserId
    name: str
    role: Role
    org: str
    device: str
    # The transport's handle for this participant's connection (a socket id); opaque here.
    connection: str
    state: ParticipantState
    joined_at: datetime
    hand_raised: bool = False
    audio_muted: bool = False
    video_muted: bool = False
    # Set while the connection is gone and the seat is kept for the reconnect grace period.
    disconnected_at: datetime | None = None

    def public(self) -> dict[str, Any]:
        """What other participants are told about this one."""
        return {
            "participant_id": self.participant_id,
            "user_id": self.user_id,
            "name": self.name,
            "role": self.role.value,
            "org": self.org,
            "device": self.device,
            "state": self.state.value,
            "joined_at": self.joined_at.isoformat(),
            "hand_raised": self.hand_raised,
            "audio_muted": self.audio_muted,
            "video_muted": self.video_muted,
            "connected": self.disconnected_at is None,
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["joined_at"] = self.joined_at.isoformat()
        data["disconnected_at"] = self.disconnected_at.isoformat() if self.disconnected_at else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LiveParticipant:
        return cls(
            participant_id=ParticipantId(data["participant_id"]),
            user_id=UserId(data["user_id"]),
            name=data["name"],
            role=Role(data["role"]),
            org=data["org"],
            device=data["device"],
            connection=data["connection"],
            state=ParticipantState(data["state"]),
            joined_at=datetime.fromisoformat(data["joined_at"]),
            hand_raised=data["hand_raised"],
            audio_muted=data["audio_muted"],
            video_muted=data["video_muted"],
            disconnected_at=(
                datetime.fromisoformat(data["disconnected_at"]) if data["disconnected_at"] else None
            ),
        )


@dataclass(frozen=True)
class RecordingOn:
    """The room is being recorded: since when, and who started it."""

    by: ParticipantId
    at: datetime

    def to_dict(self) -> dict[str, str]:
        return {"by": self.by, "at": self.at.isoformat()}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> RecordingOn:
        return cls(ParticipantId(data["by"]), datetime.fromisoformat(data["at"]))


@dataclass
class RoomState:
    consultation_id: ConsultationId
    session_id: SessionId
    participants: dict[ParticipantId, LiveParticipant] = field(default_factory=dict)
    # Users removed by a moderator may not come back into this session.
    removed_users: set[UserId] = field(default_factory=set)
    # Whether trainees may chat (teaching sessions start with it closed).
    trainee_chat: bool = False
    recording: RecordingOn | None = None

    def admitted(self) -> list[LiveParticipant]:
        return sorted(
            (p for p in self.participants.values() if p.state is ParticipantState.ADMITTED),
            key=lambda p: p.joined_at,
        )

    def waiting(self) -> list[LiveParticipant]:
        return sorted(
            (p for p in self.participants.values() if p.state is ParticipantState.WAITING),
            key=lambda p: p.joined_at,
        )

    def by_connection(self, connection: str) -> LiveParticipant | None:
        return next((p for p in self.participants.values() if p.connection == connection), None)

    def by_device(self, user_id: UserId, device: str) -> LiveParticipant | None:
        return next(
            (p for p in self.participants.values() if p.user_id == user_id and p.device == device),
            None,
        )


class PresenceStore(Protocol):
    """Room presence. Each call is atomic on its own; callers serialise work on one room with
    `lock(consultation_id)`, which spans nodes where the store does."""

    def lock(self, consultation_id: ConsultationId) -> AbstractAsyncContextManager[Any, Any]: ...

    async def get(self, consultation_id: ConsultationId) -> RoomState | None: ...

    async def create(self, room: RoomState) -> None: ...

    async def put_participant(
        self, consultation_id: ConsultationId, participant: LiveParticipant
    ) -> None: ...

    async def drop_participant(
        self, consultation_id: ConsultationId, participant_id: ParticipantId
    ) -> None: ...

    async def mark_removed(self, consultation_id: ConsultationId, user_id: UserId) -> None: ...

    async def set_trainee_chat(self, consultation_id: ConsultationId, open_: bool) -> None: ...

    async def set_recording(
        self, consultation_id: ConsultationId, recording: RecordingOn | None
    ) -> None: ...

    async def close(self, consultation_id: ConsultationId) -> None: ...


class InMemoryPresence:
    """Presence for a single server process."""

    def __init__(self) -> None:
        self._rooms: dict[ConsultationId, RoomState] = {}
        self._locks: dict[ConsultationId, asyncio.Lock] = {}

    def lock(self, consultation_id: ConsultationId) -> asyncio.Lock:
        return self._locks.setdefault(consultation_id, asyncio.Lock())

    def rooms(self) -> list[ConsultationId]:
        return list(self._rooms)

    async def get(self, consultation_id: ConsultationId) -> RoomState | None:
        room = self._rooms.get(consultation_id)
        if room is None:
            return None
        # A copy, so callers see the same semantics as a store that serialises.
        return replace(
            room, participants=dict(room.participants), removed_users=set(room.removed_users)
        )

    async def create(self, room: RoomState) -> None:
        self._rooms[room.consultation_id] = replace(
            room, participants=dict(room.participants), removed_users=set(room.removed_users)
        )

    async def put_participant(
        self, consultation_id: ConsultationId, participant: LiveParticipant
    ) -> None:
        self._rooms[consultation_id].participants[participant.participant_id] = participant

    async def drop_participant(
        self, consultation_id: ConsultationId, participant_id: ParticipantId
    ) -> None:
        room = self._rooms.get(consultation_id)
        if room is not None:
            room.participants.pop(participant_id, None)

    async def mark_removed(self, consultation_id: ConsultationId, user_id: UserId) -> None:
        self._rooms[consultation_id].removed_users.add(user_id)

    async def set_trainee_chat(self, consultation_id: ConsultationId, open_: bool) -> None:
        self._rooms[consultation_id].trainee_chat = open_

    async def set_recording(
        self, consultation_id: ConsultationId, recording: RecordingOn | None
    ) -> None:
        self._rooms[consultation_id].recording = recording

    async def close(self, consultation_id: ConsultationId) -> None:
        self._rooms.pop(consultation_id, None)
