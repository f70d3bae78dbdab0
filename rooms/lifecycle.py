"""The consultation life cycle: one table of transitions, one function that applies them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from rooms.errors import IllegalTransition, InvalidInput
from rooms.model import ConsultationStatus

S = ConsultationStatus


class Action(StrEnum):
    ACCEPT = "accept"
    DECLINE = "decline"
    SCHEDULE = "schedule"
    START_SESSION = "start_session"
    END_SESSION = "end_session"
    COMPLETE_SIGNING = "complete_signing"
    ARCHIVE = "archive"
    CANCEL = "cancel"
    ABORT = "abort"


@dataclass(frozen=True)
class Transition:
    sources: frozenset[ConsultationStatus]
    target: ConsultationStatus
    needs_reason: bool = False


# States in which the consultation has not yet happened, and the ones in which it is under way.
NOT_STARTED = frozenset({S.REQUESTED, S.ACCEPTED, S.SCHEDULED})
UNDER_WAY = frozenset({S.LIVE, S.OPINION_PENDING})
TERMINAL = frozenset({S.ARCHIVED})

TRANSITIONS: dict[Action, Transition] = {
    Action.ACCEPT: Transition(frozenset({S.REQUESTED}), S.ACCEPTED),
    Action.DECLINE: Transition(frozenset({S.REQUESTED}), S.DECLINED, needs_reason=True),
    # Scheduling again from `scheduled` moves the time; from `opinion_pending` it books a
    # follow-up session of the same consultation.
    Action.SCHEDULE: Transition(
        frozenset({S.ACCEPTED, S.SCHEDULED, S.OPINION_PENDING}), S.SCHEDULED
    ),
    Action.START_SESSION: Transition(frozenset({S.SCHEDULED}), S.LIVE),
    Action.END_SESSION: Transition(frozenset({S.LIVE}), S.OPINION_PENDING),
    Action.COMPLETE_SIGNING: Transition(frozenset({S.OPINION_PENDING}), S.SIGNED),
    Action.ARCHIVE: Transition(
        frozenset({S.SIGNED, S.DECLINED, S.CANCELLED, S.ABORTED}), S.ARCHIVED
    ),
    Action.CANCEL: Transition(NOT_STARTED, S.CANCELLED, needs_reason=True),
    Action.ABORT: Transition(frozenset({S.SCHEDULED}) | UNDER_WAY, S.ABORTED, needs_reason=True),
}


def next_status(
    current: ConsultationStatus, action: Action, reason: str | None = None
) -> ConsultationStatus:
    """The state after `action`, or IllegalTransition naming the current state and the action."""
    transition = TRANSITIONS[action]
    if current not in transition.sources:
        raise IllegalTransition(current.value, action.value, frozenset(transition.sources))
    if transition.needs_reason and not (reason and reason.strip()):
        raise InvalidInput(f"{action.value} needs a reason")
    return transition.target


def allowed_actions(current: ConsultationStatus) -> list[Action]:
    return [a for a, t in TRANSITIONS.items() if current in t.sources]
