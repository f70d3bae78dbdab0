"""Recordings: playback links and the files themselves, with byte ranges so a browser can
seek. Recordings are addressed by id; the path on disk never leaves the server. Every access
is checked (the caller may download recordings of that consultation) and audited.

Files are sealed at rest (media/sealed.py): what is served is the plaintext, decrypted chunk
by chunk, and ranges are ranges of the plaintext. A whole download is also checked against
the SHA-256 in the record before its last bytes go out."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from stat import S_ISREG
from typing import Any, Literal

import jwt
from aiohttp import hdrs, web

from media.sealed import SealedReader, SealError, SealKeys
from rooms.consultations import ConsultationService, RequestContext
from rooms.errors import Conflict, NotFound
from rooms.model import ConsultationId, RecordingId, RecordingState, UserId
from rooms.policy import Actor
from rooms.roles import Role
from rooms.store import StoredRecording
from server.api.framework import Authenticate, Call, Endpoint
from server.api.problems import problem_response
from server.api.schemas import NoBody, ResponseBody
from server.auth import AuthError

log = logging.getLogger(__name__)

PREFIX = "/api/v1/recordings/{recording_id}"
# What can be played: closed files (a crash-closed segment holds what was written).
_PLAYABLE = {RecordingState.COMPLETE.value, RecordingState.INTERRUPTED.value}
PLAYBACK_TTL_S = 600
_LINK_AUDIENCE = "telemed-playback"
# Plaintext bytes decrypted per step of a response (four chunks).
_SEND_STEP = 256 * 1024


class RecordingDamaged(Conflict):
    """The file is there but does not read back as sealed: altered, truncated, or sealed
    with a key that is not configured."""

    code = "recording_damaged"


class PlaybackLink(ResponseBody):
    """A link a `<video>` element can load (it cannot send an Authorization header): it grants
    its holder this one recording, as the caller, until `expires_at`."""

    url: str
    expires_at: datetime


class PlaybackGrants:
    """Signed grants (JWT, HS256) for one recording and one person, short-lived. Signed with
    `key`, from the configuration (`link_key`), so that a link made on one node plays on
    every node and after a restart; without one, with a key of this process's own."""

    def __init__(self, ttl_s: int = PLAYBACK_TTL_S, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def grant(self, actor: Actor, recording_id: str, now: float | None = None) -> tuple[str, float]:
        expires = (time.time() if now is None else now) + self.ttl_s
        claims = {
            "aud": _LINK_AUDIENCE,
            "rec": recording_id,
            "sub": actor.user_id,
            "name": actor.name,
            "role": actor.role.value,
            "org": actor.org,
            "cid": actor.scope,
            "exp": expires,
        }
        return jwt.encode(claims, self._key, algorithm="HS256"), expires

    def check(self, token: str, recording_id: str, now: float | None = None) -> Actor:
        # Links are base64url; anything else is not one of ours.
        if not token.isascii() or not token.isprintable():
            raise AuthError(401, "the playback link is not valid")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                audience=_LINK_AUDIENCE,
                # Expiry against `now` below (the caller's clock, for tests).
                options={"verify_exp": False, "require": ["exp", "rec", "sub", "role"]},
            )
        except jwt.InvalidTokenError:
            raise AuthError(401, "the playback link is not valid") from None
        if claims["rec"] != recording_id:
            raise AuthError(403, "the playback link is for another recording")
        if claims["exp"] < (time.time() if now is None else now):
            raise AuthError(401, "the playback link has expired; ask for a new one")
        cid = claims.get("cid")
        return Actor(
            UserId(claims["sub"]),
            claims["name"],
            Role(claims["role"]),
            claims["org"],
            ConsultationId(cid) if cid else None,
        )


def link_key(secret: str) -> bytes:
    """The playback links' key from configured secret material (TELEMED_LINK_SECRET, or the
    JWT secret or private key): a key of their own, so a link is never an access token nor
    an access token a link."""
    return hmac.new(secret.encode(), b"telemed playback links v1", hashlib.sha256).digest()


_RangePlan = Literal["serve", "ignore", "unsatisfiable"]
# One byte range, as aiohttp's FileResponse parses it (no spaces, one range).
_ONE_BYTE_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)
# More digits than any file size has; int() of thousands of digits is refused anyway.
_MAX_DIGITS = 18


def _range_plan(header: str, size: int) -> _RangePlan:
    """What to do with a Range header (RFC 9110 section 14), consistently:
    - a unit other than bytes: ignored (MUST), the whole file, 200;
    - several byte ranges: ignored (MAY; no multipart answers), the whole file, 200;
    - one byte range inside the file: 206 (aiohttp's FileResponse serves it);
    - one byte range that is malformed (`bytes=5-2`, `bytes=x`) or outside the file
      (`bytes=999999999-`, `bytes=-0`, any range of an empty file): 416."""
    unit, equals, ranges = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return "ignore"
    if "," in ranges:
        return "ignore"
    match = _ONE_BYTE_RANGE.fullmatch(header)
    if match is None:
        return "unsatisfiable"
    first, last = match.groups()
    if len(first) > _MAX_DIGITS or len(last) > _MAX_DIGITS or not (first or last):
        return "unsatisfiable"
    if not first:  # a suffix: the last N bytes, N > 0
        return "serve" if int(last) > 0 and size > 0 else "unsatisfiable"
    if int(first) >= size or (last and int(last) < int(first)):
        return "unsatisfiable"
    return "serve"


def _byte_span(header: str, size: int) -> tuple[int, int]:
    """[start, end) of a range `_range_plan` said to serve."""
    match = _ONE_BYTE_RANGE.fullmatch(header)
    assert match is not None
    first, last = match.groups()
    if not first:
        return max(0, size - int(last)), size
    return int(first), min(size, int(last) + 1) if last else size


def _range_applies(request: web.Request, mtime: float) -> bool:
    """If-Range as aiohttp's FileResponse evaluates it: a date the file is not newer than."""
    if_range = request.if_range
    return if_range is None or mtime <= if_range.timestamp()


def _audited_range(header: str | None) -> str | None:
    """The Range header as the audit log keeps it: a client's bytes, so printable ASCII and
    short, or a note that it was not."""
    if header is None:
        return None
    if header.isascii() and header.isprintable() and len(header) <= 100:
        return header
    return "(not printable ASCII or too long)"


def _regular_file_stat(path: Path) -> os.stat_result | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat if S_ISREG(stat.st_mode) else None


async def send_sealed(
    request: web.Request,
    reader: SealedReader,
    headers: dict[str, str],
    span: tuple[int, int] | None,
    sha256: str | None,
    *,
    ranges: bool = True,
) -> web.StreamResponse:
    """The plaintext, whole (200) or one span (206), decrypted a step at a time off the
    event loop. A chunk that fails authentication midway, or a whole file whose SHA-256 is
    not the record's, ends the connection before the last bytes: the client sees a broken
    download, never a complete-looking wrong one."""
    start, end = span or (0, reader.size)
    response = web.StreamResponse(status=206 if span else 200, headers=headers)
    response.headers[hdrs.ACCEPT_RANGES] = "bytes" if ranges else "none"
    if span is not None:
        response.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{end - 1}/{reader.size}"
    response.content_length = end - start
    await response.prepare(request)
    digest = hashlib.sha256() if span is None and sha256 is not None else None
    position = start
    try:
        while position < end:
            stop = min(end, position + _SEND_STEP)
            data = await asyncio.to_thread(reader.read_span, position, stop)
            if digest is not None:
                digest.update(data)
                if stop == end and digest.hexdigest() != sha256:
                    raise SealError(f"{reader.path} does not match the SHA-256 in the record")
            await response.write(data)
            position = stop
    except SealError as exc:
        log.error("download broken off: %s", exc)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


class RecordingRoutes:
    def __init__(
        self,
        service: ConsultationService,
        data_dir: Path,
        authenticate: Authenticate,
        keys: SealKeys | None,
        grants: PlaybackGrants | None = None,
    ) -> None:
        self._service = service
        self._data_dir = data_dir.resolve()
        self._keys = keys
        self._bearer = authenticate
        self._grants = grants or PlaybackGrants()

    def endpoints(self) -> list[Endpoint]:
        tags = ("recordings",)
        return [
            Endpoint(
                "POST",
                f"{PREFIX}/playback",
                self.playback,
                "A short-lived link to play or download the recording (audited)",
                PlaybackLink,
                body=NoBody,
                tags=tags,
                errors=(400, 401, 403, 404, 409),
            ),
            Endpoint(
                "GET",
                f"{PREFIX}/content",
                self.content,
                "The recording's file, with byte ranges (bearer token, or the `token` of a "
                "playback link; audited)",
                None,
                tags=tags,
                errors=(400, 401, 403, 404, 409, 416),
                authenticate=self._bearer_or_link,
                binary=("video/webm", "audio/webm", "video/mp4"),
            ),
        ]

    async def playback(self, call: Call[NoBody, None]) -> PlaybackLink:
        recording_id = RecordingId(call.path("recording_id"))
        await self._playable(call, {"playback_link": True})
        token, expires = self._grants.grant(call.ctx.actor, recording_id)
        return PlaybackLink(
            url=f"/api/v1/recordings/{recording_id}/content?token={token}",
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    async def content(self, call: Call[None, None]) -> web.StreamResponse:
        recording_id = RecordingId(call.path("recording_id"))
        request = call.request
        asked = request.headers.get(hdrs.RANGE)
        stored = await self._playable(call, {"range": _audited_range(asked)})
        recording = stored.recording
        file = (self._data_dir / stored.path).resolve() if stored.path else None
        # The path comes from the record, never from the client; still, never leave data_dir.
        stat = await asyncio.to_thread(_regular_file_stat, file) if file is not None else None
        if file is None or not file.is_relative_to(self._data_dir) or stat is None:
            raise NotFound(f"the file of recording {recording_id} is gone")
        reader = await self._open(recording_id, file, recording.state)
        try:
            headers = {
                "Content-Type": recording.media_type,
                "Cache-Control": "no-store",
                "Content-Disposition": f'inline; filename="{recording_id}{file.suffix}"',
                "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
            }
            span: tuple[int, int] | None = None
            if asked is not None and _range_applies(request, stat.st_mtime):
                plan = _range_plan(asked, reader.size)
                if plan == "unsatisfiable":
                    response = problem_response(
                        416,
                        f"the range is not satisfiable: the file has {reader.size} bytes; ask "
                        "for one byte range that overlaps them (see Content-Range)",
                        request,
                    )
                    response.headers[hdrs.CONTENT_RANGE] = f"bytes */{reader.size}"
                    return response
                if plan == "serve":
                    span = _byte_span(asked, reader.size)
            return await send_sealed(request, reader, headers, span, recording.sha256)
        finally:
            reader.close()

    async def _open(self, recording_id: str, file: Path, state: str) -> SealedReader:
        if self._keys is None:
            raise Conflict("recordings cannot be read here: no recording key is configured")
        try:
            return await asyncio.to_thread(
                SealedReader,
                file,
                self._keys,
                # A crash-closed segment holds what was sealed before the crash.
                unfinished_ok=state == RecordingState.INTERRUPTED.value,
            )
        except SealError as exc:
            log.error("recording %s cannot be read: %s", recording_id, exc)
            raise RecordingDamaged(
                f"recording {recording_id} does not read back as it was recorded (altered, "
                "truncated, or sealed with a key that is not configured)"
            ) from None

    async def _playable(self, call: Call[Any, None], detail: dict[str, Any]) -> StoredRecording:
        """The recording, if the caller may have it (audited) and it is closed."""
        recording_id = RecordingId(call.path("recording_id"))
        stored = await self._service.open_recording(call.ctx, recording_id, detail)
        state = stored.recording.state
        if state not in _PLAYABLE:
            raise Conflict(f"recording {recording_id} is {state}, not playable yet")
        return stored

    async def _bearer_or_link(self, request: web.Request) -> RequestContext:
        token = request.query.get("token")
        if token is None:
            return await self._bearer(request)
        actor = self._grants.check(token, request.match_info["recording_id"])
        return RequestContext(actor, request.remote)
