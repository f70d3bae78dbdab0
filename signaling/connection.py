"""What the namespace knows of a connection: who it is (its verified token), how fast it may
send, which room it is in and, behind several workers, where its other end is."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from rooms.model import ConsultationId
from rooms.policy import Actor
from signaling.ratelimit import TokenBucket


@dataclass(frozen=True)
class Identity:
    """Who a connection is, as their verified token says, and until when."""

    actor: Actor
    expires_at: datetime
    # The token's `jti`: revoking it ends every connection that presented it.
    token_id: str | None = None


class Refused(Exception):
    """A connection refused at connect; the message is what the client sees."""


# Verifies a token (and, for a scoped token, the consultation the client asks for).
Authenticate = Callable[[str, ConsultationId | None], Awaitable[Identity]]


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = 64 * 1024
    events_per_second: float = 20.0
    event_burst: int = 40
    reconnect_grace_s: float = 30.0
    empty_room_grace_s: float = 120.0
    chat_max_chars: int = 2000
    annotation_max_points: int = 500


class EventCounts(Protocol):
    """Counts what happens, where it happens (the server's metrics)."""

    def event(self, name: str, ok: bool) -> None:
        """A client event was handled (`name` one of the namespace's events) or refused."""

    def happened(self, what: str) -> None:
        """Something happened in a room: `seat_taken`, `participant_left`, `chat_message`,
        `recording_started`, `recording_failed`, `session_ended`."""


@dataclass
class Connection:
    identity: Identity
    bucket: TokenBucket
    consultation_id: ConsultationId | None = None
    # socket.io runs each event in a task of its own; this keeps one connection's events in
    # the order they were sent (asyncio locks are fair).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set once the token is revoked, for events already queued behind the revocation.
    revoked: bool = False
    # Set once the connection dropped, for the event still running (a join, say).
    gone: bool = False
    # Relayed (signaling/routing.py): on the edge, the worker that owns its room; on the
    # owner, the worker that holds its socket. Neither: a connection of this worker alone.
    owner: str | None = None
    edge: str | None = None
    # On the owner: the edge's pipe socket, where tracks go for the seats it serves
    # (signaling/edge_media.py).
    edge_pipe: tuple[str, int] | None = None
    # The edge keeps the auth payload to present it to the owner (never logged).
    auth: Any = None

    @property
    def actor(self) -> Actor:
        return self.identity.actor
