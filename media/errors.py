"""The error the media layer refuses a request with."""

from __future__ import annotations


class MediaError(Exception):
    """A media request that cannot be served. `code` names what was wrong for the client
    (`media_error` when nothing more specific applies); the message says why."""

    def __init__(self, message: str, code: str = "media_error") -> None:
        super().__init__(message)
        self.code = code
