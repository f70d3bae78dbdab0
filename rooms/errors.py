"""Domain errors. Each maps to one HTTP status / socket error code in the layers above."""

from __future__ import annotations


class DomainError(Exception):
    """Base of all errors the domain raises on purpose."""

    code = "domain_error"


class NotFound(DomainError):
    code = "not_found"


class Forbidden(DomainError):
    code = "forbidden"


class Conflict(DomainError):
    """The request is well-formed but conflicts with the current state."""

    code = "conflict"


class IllegalTransition(Conflict):
    code = "illegal_transition"

    def __init__(self, current: str, action: str, allowed_from: frozenset[str]) -> None:
        allowed = ", ".join(sorted(allowed_from)) or "no state"
        super().__init__(
            f"cannot {action} a consultation that is {current} (allowed from: {allowed})"
        )
        self.current = current
        self.action = action


class InvalidInput(DomainError):
    """Input that passed schema validation but breaks a domain rule."""

    code = "invalid_input"


class RoomRefused(DomainError):
    """A live-room action refused for a reason the client can act on; `code` names it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Unavailable(DomainError):
    """A store the action needs cannot be reached (the database restarting, a full disk).

    Nothing of the action was kept; the caller may try again."""

    code = "unavailable"


class Gone(DomainError):
    """What was asked for existed but is no more (an expired or withdrawn invite)."""

    code = "gone"
