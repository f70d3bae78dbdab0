"""Short-lived TURN credentials, the TURN REST API scheme coturn implements with
`use-auth-secret`: the username is "<unix expiry>:<participant id>", the password
base64(HMAC-SHA1(shared secret, username)). coturn recomputes the password from the username
and refuses it once the expiry has passed, so nothing but the secret is shared with it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from server.config import TurnConfig


def turn_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


class TurnCredentials:
    """Mints one RTCIceServer dictionary (the configured TURN URLs, a username, a password)
    per call, valid for the configured TTL from now."""

    def __init__(self, config: TurnConfig, clock: Callable[[], float] = time.time) -> None:
        if config.secret is None or not config.urls:
            raise ValueError("TURN credentials need turn.secret and turn.urls")
        self._secret = config.secret
        self._urls = list(config.urls)
        self._ttl_s = config.ttl_s
        self._clock = clock

    def mint(self, user: str) -> dict[str, Any]:
        # coturn reads the expiry up to the first ':' (its rest-api-separator); a ':' in the
        # user part would still authenticate but make the username ambiguous in its logs.
        if not user or ":" in user:
            raise ValueError(f"a TURN user must be non-empty and hold no ':', not {user!r}")
        username = f"{int(self._clock()) + self._ttl_s}:{user}"
        return {
            "urls": list(self._urls),
            "username": username,
            "credential": turn_password(self._secret.get_secret_value(), username),
        }


def ice_servers_for_clients(
    static: Sequence[Mapping[str, Any]], turn: TurnCredentials | None
) -> Callable[[str], list[dict[str, Any]]]:
    """What `joined.ice_servers` holds for a participant: the configured static servers, then
    a TURN server with credentials minted for that participant at that moment."""
    fixed = [dict(s) for s in static]

    def for_participant(participant: str) -> list[dict[str, Any]]:
        return [*fixed, *([turn.mint(participant)] if turn is not None else [])]

    return for_participant
