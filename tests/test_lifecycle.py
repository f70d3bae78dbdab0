"""The consultation life cycle: every (state, action) pair, and random walks through it.

EXPECTED is typed in from docs/domain.md and the agreed table, not derived from TRANSITIONS.
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from rooms.errors import Conflict, IllegalTransition, InvalidInput
from rooms.lifecycle import TRANSITIONS, Action, allowed_actions, next_status
from rooms.model import ConsultationStatus

S = ConsultationStatus
A = Action

EXPECTED: dict[tuple[ConsultationStatus, Action], ConsultationStatus] = {
    (S.REQUESTED, A.ACCEPT): S.ACCEPTED,
    (S.REQUESTED, A.DECLINE): S.DECLINED,
    (S.REQUESTED, A.CANCEL): S.CANCELLED,
    (S.ACCEPTED, A.SCHEDULE): S.SCHEDULED,
    (S.ACCEPTED, A.CANCEL): S.CANCELLED,
    (S.SCHEDULED, A.SCHEDULE): S.SCHEDULED,  # moves the time
    (S.SCHEDULED, A.START_SESSION): S.LIVE,
    (S.SCHEDULED, A.CANCEL): S.CANCELLED,
    (S.SCHEDULED, A.ABORT): S.ABORTED,
    (S.LIVE, A.END_SESSION): S.OPINION_PENDING,
    (S.LIVE, A.ABORT): S.ABORTED,
    (S.OPINION_PENDING, A.SCHEDULE): S.SCHEDULED,  # a follow-up session
    (S.OPINION_PENDING, A.COMPLETE_SIGNING): S.SIGNED,
    (S.OPINION_PENDING, A.ABORT): S.ABORTED,
    (S.SIGNED, A.ARCHIVE): S.ARCHIVED,
    (S.DECLINED, A.ARCHIVE): S.ARCHIVED,
    (S.CANCELLED, A.ARCHIVE): S.ARCHIVED,
    (S.ABORTED, A.ARCHIVE): S.ARCHIVED,
}

NEEDS_REASON = {A.DECLINE, A.CANCEL, A.ABORT}
BLANK_REASONS = [None, "", "   ", "\t\n"]
REASON = "家属要求转诊 / family asked for referral"

ALL_PAIRS = [(state, action) for state in S for action in A]
LEGAL = [pair for pair in ALL_PAIRS if pair in EXPECTED]
ILLEGAL = [pair for pair in ALL_PAIRS if pair not in EXPECTED]


def _reason_for(action: Action) -> str | None:
    return REASON if action in NEEDS_REASON else None


def _expected_outcome(
    state: ConsultationStatus, action: Action, reason: str | None
) -> ConsultationStatus | type[Exception]:
    """What the hand-written table says should happen: a new state or an error type."""
    if (state, action) not in EXPECTED:
        return IllegalTransition
    if action in NEEDS_REASON and not (reason and reason.strip()):
        return InvalidInput
    return EXPECTED[(state, action)]


def test_table_sizes() -> None:
    assert len(ALL_PAIRS) == 10 * 9
    assert len(LEGAL) == 18
    assert len(ILLEGAL) == 72


def test_expected_table_matches_transitions() -> None:
    from_table = {
        (source, action): transition.target
        for action, transition in TRANSITIONS.items()
        for source in transition.sources
    }
    assert from_table == EXPECTED


def test_needs_reason_flags() -> None:
    assert {a for a, t in TRANSITIONS.items() if t.needs_reason} == NEEDS_REASON


@pytest.mark.parametrize(("state", "action"), LEGAL, ids=str)
def test_legal_transition_gives_the_target(state: ConsultationStatus, action: Action) -> None:
    assert next_status(state, action, _reason_for(action)) is EXPECTED[(state, action)]


@pytest.mark.parametrize(("state", "action"), ILLEGAL, ids=str)
@pytest.mark.parametrize("reason", [None, REASON], ids=["no-reason", "reason"])
def test_illegal_transition_is_a_clear_error(
    state: ConsultationStatus, action: Action, reason: str | None
) -> None:
    with pytest.raises(IllegalTransition) as excinfo:
        next_status(state, action, reason)
    error = excinfo.value
    message = str(error)
    assert f"cannot {action.value}" in message
    assert f"is {state.value}" in message
    assert error.current == state.value
    assert error.action == action.value
    assert isinstance(error, Conflict)


def test_illegal_transition_lists_where_the_action_is_allowed() -> None:
    with pytest.raises(IllegalTransition, match=r"allowed from: aborted, cancelled, declined"):
        next_status(S.LIVE, A.ARCHIVE)


@pytest.mark.parametrize(
    ("state", "action"), [pair for pair in LEGAL if pair[1] in NEEDS_REASON], ids=str
)
@pytest.mark.parametrize("reason", BLANK_REASONS, ids=repr)
def test_action_needing_a_reason_refuses_a_blank_one(
    state: ConsultationStatus, action: Action, reason: str | None
) -> None:
    with pytest.raises(InvalidInput, match=f"{action.value} needs a reason"):
        next_status(state, action, reason)


@pytest.mark.parametrize(
    ("state", "action"), [pair for pair in LEGAL if pair[1] not in NEEDS_REASON], ids=str
)
def test_action_without_reason_needs_none(state: ConsultationStatus, action: Action) -> None:
    assert next_status(state, action) is EXPECTED[(state, action)]
    assert next_status(state, action, "") is EXPECTED[(state, action)]


@pytest.mark.parametrize("state", list(S), ids=str)
def test_allowed_actions_agree_with_the_table(state: ConsultationStatus) -> None:
    expected = {action for (source, action) in EXPECTED if source is state}
    actions = allowed_actions(state)
    assert set(actions) == expected
    assert len(actions) == len(set(actions))
    for action in A:
        if action in expected:
            next_status(state, action, REASON)
        else:
            with pytest.raises(IllegalTransition):
                next_status(state, action, REASON)


def test_archived_is_absorbing() -> None:
    assert allowed_actions(S.ARCHIVED) == []
    for action in A:
        with pytest.raises(IllegalTransition):
            next_status(S.ARCHIVED, action, REASON)


def _reachable_from(start: ConsultationStatus) -> set[ConsultationStatus]:
    seen = {start}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        for transition in TRANSITIONS.values():
            if state in transition.sources and transition.target not in seen:
                seen.add(transition.target)
                queue.append(transition.target)
    return seen


def test_every_status_is_reachable_from_requested() -> None:
    assert _reachable_from(S.REQUESTED) == set(S)


@pytest.mark.parametrize("state", list(S), ids=str)
def test_every_consultation_can_end_archived(state: ConsultationStatus) -> None:
    assert S.ARCHIVED in _reachable_from(state)


def test_happy_path_with_a_follow_up_session() -> None:
    state = S.REQUESTED
    for action in [
        A.ACCEPT,
        A.SCHEDULE,
        A.START_SESSION,
        A.END_SESSION,
        A.SCHEDULE,
        A.START_SESSION,
        A.END_SESSION,
        A.COMPLETE_SIGNING,
        A.ARCHIVE,
    ]:
        state = next_status(state, action)
    assert state is S.ARCHIVED


_reasons = st.one_of(
    st.sampled_from([None, "", " ", "\t", "\n  ", "patient unwell", "家属要求转诊"]),
    st.text(max_size=20),
)
# The way forward from each state: requested ... signed, then archived.
FORWARD: dict[ConsultationStatus, Action] = {
    S.REQUESTED: A.ACCEPT,
    S.ACCEPTED: A.SCHEDULE,
    S.SCHEDULED: A.START_SESSION,
    S.LIVE: A.END_SESSION,
    S.OPINION_PENDING: A.COMPLETE_SIGNING,
    S.SIGNED: A.ARCHIVE,
    S.DECLINED: A.ARCHIVE,
    S.CANCELLED: A.ARCHIVE,
    S.ABORTED: A.ARCHIVE,
    S.ARCHIVED: A.ARCHIVE,  # illegal: nothing leaves archived
}
# A step is any action, "forward", or "the n-th action the table allows from here" (an int),
# so that walks get past the first states often enough to reach signed, aborted and archived.
_any_action = st.sampled_from(list(A))
_choices = st.one_of(_any_action, _any_action, st.just("forward"), st.integers(0, 3))
_steps = st.lists(st.tuples(_choices, _reasons), max_size=40)


def _pick(state: ConsultationStatus, choice: Action | str | int) -> Action:
    if isinstance(choice, Action):
        return choice
    if isinstance(choice, str):
        return FORWARD[state]
    legal = [action for (source, action) in EXPECTED if source is state]
    return legal[choice % len(legal)] if legal else A.ARCHIVE


@settings(max_examples=500)
@given(steps=_steps)
def test_random_walk_follows_the_table(steps: list[tuple[Action | str | int, str | None]]) -> None:
    state = S.REQUESTED
    for choice, reason in steps:
        before = state
        action = _pick(state, choice)
        expected = _expected_outcome(before, action, reason)
        try:
            state = next_status(state, action, reason)
        except (IllegalTransition, InvalidInput) as error:
            # A failed action leaves the state as it was, and fails for the right reason.
            assert state is before
            assert type(error) is expected
        else:
            assert state is expected
        assert isinstance(state, ConsultationStatus)
        if before is S.ARCHIVED:
            assert state is S.ARCHIVED
        event(f"reached {state.value}")
