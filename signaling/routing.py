"""What the namespace needs to route a room's events to the worker that owns the room.

Behind Redis every live room has one owning worker (server/placement.py): its seats, media,
recorder and timers live there. A client may reach any worker (SO_REUSEPORT, a proxy, no
sticky sessions); the worker holding its socket — the *edge* — relays its events after `join`
to the room's owner over a WorkerLink and relays the owner's acks back. What the owner sends the
client (events, room broadcasts, room memberships, a disconnect) goes through socket.io's
Redis manager, which delivers to a socket on whichever worker holds it. docs/protocol.md,
"Several workers", says why this and not a redirect."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rooms.errors import Unavailable
from rooms.model import ConsultationId

# A request to another worker and its answer: JSON objects.
Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[Message | None]]


class WorkerGone(Unavailable):
    """Nobody listens for the worker any more: it died, and its heartbeat has not lapsed yet
    (the next placement, within a few seconds, puts the room on a live one)."""


@dataclass(frozen=True)
class Placed:
    owner: str
    # True when this call placed the room: it had no owner, or its owner had died.
    fresh: bool
    # The dead owner a fresh placement replaced ("" when the room had none).
    previous: str = ""


class Placement(Protocol):
    @property
    def worker_id(self) -> str:
        """This worker's id (its incarnation: a restarted worker has a new one)."""

    async def owner_of(self, consultation_id: ConsultationId) -> Placed:
        """The room's worker, placing the room first if it has no live one; raises
        rooms.errors.Unavailable while the placement store is away."""

    async def release(self, consultation_id: ConsultationId) -> None:
        """The room ended on this worker."""

    async def alive(self, workers: set[str]) -> set[str]:
        """Those of `workers` that are still alive."""


class WorkerLink(Protocol):
    async def call(self, worker: str, message: Message) -> Message:
        """Sends `message` to `worker`'s handler and returns its answer; raises WorkerGone if
        nobody listens for `worker`, rooms.errors.Unavailable if it does not answer."""

    async def tell(self, worker: str, message: Message) -> None:
        """Sends `message` without waiting for an answer (lost if the worker is gone)."""


@dataclass(frozen=True)
class Routing:
    placement: Placement
    link: WorkerLink
