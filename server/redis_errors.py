"""Redis away (restarting, the network cut) is `unavailable` to clients, not an internal error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rooms.errors import Unavailable

REDIS_AWAY = (RedisConnectionError, RedisTimeoutError, OSError)


@contextlib.contextmanager
def reachable(what: str) -> Iterator[None]:
    """Turns Redis being away into `Unavailable("<what> is unavailable ...")`."""
    try:
        yield
    except REDIS_AWAY as exc:
        raise Unavailable(f"{what} is unavailable ({type(exc).__name__}); try again") from None
