"""Invites: issuing one (a token, its link and QR code, a short code to read out), revoking
it, and redeeming a short code for the invite, the one endpoint here that needs no token."""

from __future__ import annotations

import hashlib
import io
import re
import secrets
from datetime import timedelta
from typing import Protocol
from urllib.parse import quote

import segno
from aiohttp import web

from rooms.clock import utc_now
from rooms.consultations import ConsultationService, RequestContext
from rooms.errors import Unavailable
from rooms.invite_codes import InviteCodes
from rooms.model import ConsultationId, UserId
from rooms.policy import Actor
from rooms.roles import Role
from server.api.framework import Call, Endpoint
from server.api.problems import BadRequest, problem_response
from server.api.schemas import InviteIn, InviteOut, RedeemIn, RedeemOut
from server.auth import TokenService
from server.guess_limits import GuessLimits, TooManyAttempts

PREFIX = "/api/v1"
ONE = PREFIX + "/consultations/{consultation_id}"
_JTI = re.compile(r"[\w-]{1,128}")
# Who redeems a code: nobody yet, confined to no consultation (the handler uses no actor).
_NOBODY = Actor(UserId("anonymous"), "anonymous", Role.RESIDENT, "", ConsultationId("-"))


class Revocations(Protocol):
    """Ends the live connections that presented a token (signaling, on every node)."""

    async def revoked(self, token_id: str) -> None: ...


def code_key(secret_material: str | None) -> bytes:
    """The HMAC key of stored codes: from the configured secret, so every node shares it, or
    this process's own (codes then redeem only here)."""
    if secret_material is None:
        return secrets.token_bytes(32)
    return hashlib.sha256(b"telemed invite codes\0" + secret_material.encode()).digest()


def invite_link(base: str, consultation_id: str, token: str) -> str:
    """The landing page; the token rides in the fragment, which no server ever sees."""
    return f"{base}/web/room.html?c={quote(consultation_id, safe='')}#token={token}"


def qr_svg(link: str) -> str:
    """The link as a QR code: a standalone SVG document (an <img> shows it; no script). The
    link holds a JWT, so the symbol is large (version 16 or so): level L, which segno raises
    where that costs no size, keeps it as small as it can be for a phone held to a screen."""
    out = io.BytesIO()
    segno.make(link, error="l", micro=False).save(
        out, kind="svg", xmldecl=False, scale=4, border=4, title="QR"
    )
    return out.getvalue().decode("utf-8")


async def _anyone(request: web.Request) -> RequestContext:
    return RequestContext(_NOBODY, request.remote)


class InviteRoutes:
    def __init__(
        self,
        service: ConsultationService,
        tokens: TokenService,
        invite_ttl_s: int,
        revocations: Revocations | None,
        codes: InviteCodes | None,
        limits: GuessLimits,
        public_url: str = "",
    ) -> None:
        """`codes` is None in an API built only to be described. `public_url`, when set, is
        the base of links (else the request's own origin)."""
        self._service = service
        self._tokens = tokens
        self._invite_ttl_s = invite_ttl_s
        self._revocations = revocations
        self._codes = codes
        self._limits = limits
        self._public_url = public_url.rstrip("/")

    def endpoints(self) -> list[Endpoint]:
        tags = ("invites",)
        return [
            Endpoint(
                "POST",
                f"{ONE}/invites",
                self.invite,
                "Invite a resident, guardian or trainee: a link, its QR code and a short code",
                InviteOut,
                body=InviteIn,
                status=201,
                tags=tags,
                errors=(400, 401, 403, 404, 409),
            ),
            Endpoint(
                "DELETE",
                f"{ONE}/invites/{{jti}}",
                self.revoke,
                "Revoke an invite (its short code too)",
                None,
                status=204,
                tags=tags,
            ),
            Endpoint(
                "POST",
                f"{PREFIX}/invites/redeem",
                self.redeem,
                "Exchange a short invite code for the invite (no token needed; rate-limited)",
                RedeemOut,
                body=RedeemIn,
                tags=tags,
                errors=(400, 404, 410, 429),
                authenticate=_anyone,
                public=True,
            ),
        ]

    def _codes_or_fail(self) -> InviteCodes:
        if self._codes is None:
            raise Unavailable("invite codes are not set up on this server")
        return self._codes

    def _base(self, request: web.Request) -> str:
        return self._public_url or str(request.url.origin())

    async def invite(self, call: Call[InviteIn, None]) -> InviteOut:
        codes = self._codes_or_fail()
        ttl_s = min(call.body.ttl_s or self._invite_ttl_s, self._invite_ttl_s)
        cid = ConsultationId(call.path("consultation_id"))
        invite = await self._service.prepare_invite(
            call.ctx, cid, Role(call.body.role), call.body.name, timedelta(seconds=ttl_s)
        )
        token, expires_at = self._tokens.mint_invite(
            user_id=invite.user_id,
            name=invite.name,
            role=invite.role,
            org=invite.org,
            consultation=invite.consultation_id,
            ttl_s=ttl_s,
            jti=invite.jti,
        )
        short_code = await codes.issue(
            invite.consultation_id,
            invite.jti,
            invite.user_id,
            invite.name,
            invite.role,
            invite.org,
            expires_at,
        )
        link = invite_link(self._base(call.request), invite.consultation_id, token)
        return InviteOut(
            token=token,
            jti=invite.jti,
            user_id=invite.user_id,
            role=invite.role,
            expires_at=expires_at,
            link=link,
            qr_svg=qr_svg(link),
            short_code=short_code,
        )

    async def revoke(self, call: Call[None, None]) -> None:
        jti = call.path("jti")
        if not _JTI.fullmatch(jti):
            raise BadRequest("jti must be 1-128 letters, digits, '-' or '_'")
        await self._service.revoke_invite(
            call.ctx,
            ConsultationId(call.path("consultation_id")),
            jti,
            timedelta(seconds=self._invite_ttl_s),
        )
        if self._revocations is not None:
            # Stored first, so a reconnect with the token is refused before its sockets end.
            await self._revocations.revoked(jti)

    async def redeem(self, call: Call[RedeemIn, None]) -> RedeemOut | web.Response:
        codes = self._codes_or_fail()
        try:
            self._limits.attempt(call.request.remote or "unknown")
        except TooManyAttempts as exc:
            response = problem_response(
                429, f"too many attempts: {exc.limit}", call.request, code="too_many_requests"
            )
            response.headers["Retry-After"] = str(exc.retry_after_s)
            return response
        found = await codes.redeem(call.body.code)
        # The same jti and (to the second) the same expiry as the invite the code stands for.
        remaining = int((found.expires_at - utc_now()).total_seconds())
        token, expires_at = self._tokens.mint_invite(
            user_id=found.user_id,
            name=found.name,
            role=found.role,
            org=found.org,
            consultation=found.consultation_id,
            ttl_s=max(1, remaining),
            jti=found.jti,
        )
        return RedeemOut(
            token=token,
            link=invite_link(self._base(call.request), found.consultation_id, token),
            consultation_id=found.consultation_id,
            role=found.role,
            expires_at=expires_at,
        )
