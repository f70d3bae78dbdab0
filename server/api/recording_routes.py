"""Recordings: playback links and the files themselves, with byte ranges so a browser can
seek. Recordings are addressed by id; the path on disk never leaves the server. Every access
is checked (the caller may download recordings of that consultation) and audited."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from rooms.consultations import ConsultationService, RequestContext
from rooms.errors import Conflict, NotFound
from rooms.model import ConsultationId, RecordingId, RecordingState, UserId
from rooms.policy import Actor
from rooms.roles import Role
from rooms.store import StoredRecording
from server.api.framework import Authenticate, Call, Endpoint
from server.api.schemas import NoBody, ResponseBody
from server.auth import AuthError

PREFIX = "/api/v1/recordings/{recording_id}"
# What can be played: closed files (a crash-closed segment holds what was written).
_PLAYABLE = {RecordingState.COMPLETE.value, RecordingState.INTERRUPTED.value}
PLAYBACK_TTL_S = 600


class PlaybackLink(ResponseBody):
    """A link a `<video>` element can load (it cannot send an Authorization header): it grants
    its holder this one recording, as the caller, until `expires_at`."""

    url: str
    expires_at: datetime


class PlaybackGrants:
    """Signed grants for one recording and one person, short-lived. The key is this process's
    own: a link works on the node that made it, which is the node holding the files."""

    def __init__(self, ttl_s: int = PLAYBACK_TTL_S) -> None:
        self._key = secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def grant(self, actor: Actor, recording_id: str, now: float | None = None) -> tuple[str, float]:
        expires = (time.time() if now is None else now) + self.ttl_s
        claims = {
            "rec": recording_id,
            "sub": actor.user_id,
            "name": actor.name,
            "role": actor.role.value,
            "org": actor.org,
            "cid": actor.scope,
            "exp": expires,
        }
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}", expires

    def check(self, token: str, recording_id: str, now: float | None = None) -> Actor:
        payload, _, signature = token.partition(".")
        if not payload or not hmac.compare_digest(signature, self._sign(payload)):
            raise AuthError(401, "the playback link is not valid")
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (binascii.Error, ValueError):
            raise AuthError(401, "the playback link is not valid") from None
        if claims["rec"] != recording_id:
            raise AuthError(403, "the playback link is for another recording")
        if claims["exp"] < (time.time() if now is None else now):
            raise AuthError(401, "the playback link has expired; ask for a new one")
        cid = claims["cid"]
        return Actor(
            UserId(claims["sub"]),
            claims["name"],
            Role(claims["role"]),
            claims["org"],
            ConsultationId(cid) if cid else None,
        )

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class RecordingRoutes:
    def __init__(
        self,
        service: ConsultationService,
        data_dir: Path,
        authenticate: Authenticate,
        grants: PlaybackGrants | None = None,
    ) -> None:
        self._service = service
        self._data_dir = data_dir.resolve()
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
        stored = await self._playable(call, {"range": call.request.headers.get("Range")})
        recording = stored.recording
        file = (self._data_dir / stored.path).resolve() if stored.path else None
        # The path comes from the record, never from the client; still, never leave data_dir.
        if (
            file is None
            or not file.is_relative_to(self._data_dir)
            or not await asyncio.to_thread(file.is_file)
        ):
            raise NotFound(f"the file of recording {recording_id} is gone")
        # aiohttp answers Range (206), If-Range and unsatisfiable ranges (416) itself.
        return web.FileResponse(
            file,
            headers={
                "Content-Type": recording.media_type,
                "Cache-Control": "private, no-store",
                "Content-Disposition": f'inline; filename="{recording_id}{file.suffix}"',
            },
        )

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
