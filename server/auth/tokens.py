"""JWT access and invite tokens: minting, verification, and the errors a client may see.

Verification trusts exactly one algorithm (the configured one) and the key that goes with it;
every failure becomes an `AuthError` whose message names the problem but never echoes the
token or the key.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from rooms.model import ConsultationId, UserId
from rooms.policy import Actor
from rooms.roles import Role
from server.config import JwtConfig

# Patients and trainees hold no standing account; they reach one consultation through an invite.
INVITE_ROLES = frozenset({Role.RESIDENT, Role.GUARDIAN, Role.TRAINEE})

# Registered claims every token must carry; pyjwt checks presence, we check the rest.
_REQUIRED_CLAIMS = ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]

_NO_PRIVATE_KEY = "this server only verifies tokens; mint them with your identity provider"

_PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class AuthError(Exception):
    """A request's credentials were refused.

    401: the token itself is missing, malformed, forged, expired or revoked.
    403: the token is valid but does not reach what was asked for (its scope).
    """

    def __init__(self, status: Literal[401, 403], message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"AuthError({self.status}, {self.message!r})"


class SigningKeyMissing(RuntimeError):
    """Minting was asked of a server that holds only the public half of an asymmetric key."""


@dataclass(frozen=True)
class Claims:
    """What a verified token says about its bearer."""

    user_id: UserId
    name: str
    role: Role
    org: str
    # Claim `cid`: the one consultation this token may touch (always set on invites).
    consultation: ConsultationId | None
    jti: str | None
    expires_at: datetime
    is_invite: bool

    def to_actor(self) -> Actor:
        return Actor(
            user_id=self.user_id,
            name=self.name,
            role=self.role,
            org=self.org,
            scope=self.consultation,
        )


class TokenService:
    """Mints and verifies telemed's JWTs according to one `JwtConfig`.

    `now` is the clock used when minting (iat, nbf, exp, invite expiry); tests shift it to
    produce expired or not-yet-valid tokens. Verification checks times with pyjwt against the
    wall clock, so a service built with a shifted clock still verifies like production does.
    """

    def __init__(self, config: JwtConfig, *, now: Callable[[], datetime] | None = None) -> None:
        self._config = config
        self._now = now or (lambda: datetime.now(UTC))
        self._verify_key: bytes | _PublicKey
        self._sign_key: bytes | _PrivateKey | None
        if config.algorithm == "HS256":
            secret = config.secret.get_secret_value().encode()
            # Fail at start-up, not on the first request, if the secret is unusable for HMAC
            # (pyjwt refuses PEM-looking secrets, the classic HS/RS confusion vector).
            try:
                jwt.get_algorithm_by_name("HS256").prepare_key(secret)
            except jwt.InvalidKeyError as exc:
                raise ValueError("jwt.secret is not usable as an HMAC secret") from exc
            self._verify_key = secret
            self._sign_key = secret
        else:
            # Loaded key objects (not PEM text) can never be mistaken for an HMAC secret.
            public_key = _load_public_key(config)
            private_key = _load_private_key(config)
            if private_key is not None and not _same_key_pair(private_key, public_key):
                raise ValueError("jwt.private_key does not belong to jwt.public_key")
            self._verify_key = public_key
            self._sign_key = private_key

    @property
    def can_mint(self) -> bool:
        return self._sign_key is not None

    def mint(
        self,
        *,
        user_id: UserId,
        name: str,
        role: Role,
        org: str,
        consultation: ConsultationId | None = None,
        ttl_s: int | None = None,
        jti: str | None = None,
        invite: bool = False,
    ) -> str:
        token, _ = self._mint(
            user_id=user_id,
            name=name,
            role=role,
            org=org,
            consultation=consultation,
            ttl_s=self._config.access_ttl_s if ttl_s is None else ttl_s,
            jti=jti,
            invite=invite,
        )
        return token

    def mint_invite(
        self,
        *,
        user_id: UserId,
        name: str,
        role: Role,
        org: str,
        consultation: ConsultationId,
        ttl_s: int | None = None,
        jti: str,
    ) -> tuple[str, datetime]:
        """A short-lived token scoped to one consultation; returns it with its expiry.

        The caller stores `jti` so the invite can be revoked before it expires.
        """
        if role not in INVITE_ROLES:
            allowed = ", ".join(sorted(r.value for r in INVITE_ROLES))
            raise ValueError(f"role {role.value} may not be invited (only {allowed})")
        if not consultation:
            raise ValueError("an invite must name its consultation")
        if not jti:
            raise ValueError("an invite needs a jti so it can be revoked")
        # An invite never outlives the configured invite lifetime, whatever the caller asks.
        limit = self._config.invite_ttl_s
        ttl = limit if ttl_s is None else min(ttl_s, limit)
        return self._mint(
            user_id=user_id,
            name=name,
            role=role,
            org=org,
            consultation=consultation,
            ttl_s=ttl,
            jti=jti,
            invite=True,
        )

    def verify(self, token: str) -> Claims:
        """The claims of a genuine, current token for this server, or AuthError(401).

        Nothing else escapes: the REST API and the socket connect both turn AuthError into a
        refusal, so any other exception would be a 500 or a connect left unanswered."""
        algorithm = self._config.algorithm
        if not _is_token_text(token):
            raise AuthError(401, "token is malformed")
        # Refuse foreign algorithms (`none`, HS256 on an RS256 server, ...) before pyjwt sees
        # the token; `algorithms=[...]` below enforces the same, this makes the reason exact.
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError(401, "token is malformed") from None
        if header.get("alg") != algorithm:
            raise AuthError(401, "token algorithm is not allowed")
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                self._verify_key,
                algorithms=[algorithm],
                options={"require": _REQUIRED_CLAIMS},
                leeway=self._config.leeway_s,
                issuer=self._config.issuer,
                audience=self._config.audience,
            )
        except jwt.InvalidTokenError as exc:
            # `from None`: the pyjwt exception adds nothing the message lacks.
            raise AuthError(401, _describe(exc)) from None
        except (ValueError, TypeError, OverflowError):
            # pyjwt converts time claims with int(); a value no integer holds lands here.
            raise AuthError(401, "token time claims are out of range") from None
        return _claims_from(payload)

    def _mint(
        self,
        *,
        user_id: UserId,
        name: str,
        role: Role,
        org: str,
        consultation: ConsultationId | None,
        ttl_s: int,
        jti: str | None,
        invite: bool,
    ) -> tuple[str, datetime]:
        if self._sign_key is None:
            raise SigningKeyMissing(_NO_PRIVATE_KEY)
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if invite and not consultation:
            raise ValueError("an invite must name its consultation")
        # Whole seconds: JWT times are NumericDate and expires_at must match the token exactly.
        issued = self._now().astimezone(UTC).replace(microsecond=0)
        expires = issued + timedelta(seconds=ttl_s)
        payload: dict[str, Any] = {
            "sub": user_id,
            "name": name,
            "role": role.value,
            "org": org,
            "iat": issued,
            "nbf": issued,
            "exp": expires,
            "iss": self._config.issuer,
            "aud": self._config.audience,
            "jti": jti or uuid.uuid4().hex,
        }
        if consultation is not None:
            payload["cid"] = consultation
        if invite:
            payload["inv"] = True
        token = jwt.encode(payload, self._sign_key, algorithm=self._config.algorithm)
        return token, expires

    # Stateless helpers, also reachable through the service for callers that hold only it.
    @staticmethod
    def bearer_token(header_value: str | None) -> str:
        return bearer_token(header_value)

    @staticmethod
    async def check_not_revoked(
        claims: Claims, is_revoked: Callable[[str], Awaitable[bool]]
    ) -> None:
        await check_not_revoked(claims, is_revoked)

    @staticmethod
    def check_scope(claims: Claims, consultation: ConsultationId) -> None:
        check_scope(claims, consultation)


def bearer_token(header_value: str | None) -> str:
    """The token from an `Authorization: Bearer <token>` header value."""
    if header_value is None or not header_value.strip():
        raise AuthError(401, "missing bearer token")
    # aiohttp hands undecodable header bytes over as surrogates; no JWT holds them.
    if not _is_token_text(header_value):
        raise AuthError(401, "authorization header must be printable ASCII")
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError(401, "authorization must be a Bearer token")
    token = token.strip()
    if not token:
        raise AuthError(401, "missing bearer token")
    return token


async def check_not_revoked(claims: Claims, is_revoked: Callable[[str], Awaitable[bool]]) -> None:
    """Refuse a token whose jti the database lists as revoked (invites are revoked by jti)."""
    if claims.jti is not None and await is_revoked(claims.jti):
        raise AuthError(401, "invite has been revoked")


def check_scope(claims: Claims, consultation: ConsultationId) -> None:
    """A token scoped to one consultation is valid, but has no right to any other (403)."""
    if claims.consultation is not None and claims.consultation != consultation:
        raise AuthError(403, "token is scoped to another consultation")


def _is_token_text(value: str) -> bool:
    return isinstance(value, str) and value.isascii() and value.isprintable()


def _describe(exc: jwt.InvalidTokenError) -> str:
    # Subclasses before their bases: InvalidSignatureError is a DecodeError.
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience is wrong"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token issuer is wrong"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token algorithm is not allowed"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "token signature is invalid"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token is missing claim '{exc.claim}'"
    if isinstance(exc, InvalidSubjectError):
        return "token claim 'sub' must be a string"
    if isinstance(exc, InvalidJTIError):
        return "token claim 'jti' must be a string"
    if isinstance(exc, jwt.InvalidIssuedAtError):
        return "token claim 'iat' must be an integer"
    if isinstance(exc, jwt.DecodeError):
        return "token is malformed"
    return "token is invalid"


def _claims_from(payload: dict[str, Any]) -> Claims:
    """Type-check the private claims pyjwt knows nothing about."""
    # pyjwt has checked that sub and jti are strings; an empty one identifies nothing.
    sub: str = payload["sub"]
    jti: str = payload["jti"]
    for claim, value in (("sub", sub), ("jti", jti)):
        if not value:
            raise AuthError(401, f"token claim '{claim}' must not be empty")
    role_value = _string_claim(payload, "role")
    try:
        role = Role(role_value)
    except ValueError:
        # Truncated and repr'd: the value is attacker-controlled and may end up in logs.
        raise AuthError(401, f"unknown role {role_value[:40]!r}") from None
    name = _string_claim(payload, "name")
    org = _string_claim(payload, "org", default="")
    cid = payload.get("cid")
    if cid is not None and (not isinstance(cid, str) or not cid):
        raise AuthError(401, "token claim 'cid' must be a non-empty string")
    inv = payload.get("inv", False)
    if not isinstance(inv, bool):
        raise AuthError(401, "token claim 'inv' must be a boolean")
    if inv and cid is None:
        # An unscoped invite would be a free-standing account for someone who has none.
        raise AuthError(401, "invite token is missing claim 'cid'")
    return Claims(
        user_id=UserId(sub),
        name=name,
        role=role,
        org=org,
        consultation=ConsultationId(cid) if cid is not None else None,
        jti=jti,
        expires_at=_expiry(payload),
        is_invite=inv,
    )


def _expiry(payload: dict[str, Any]) -> datetime:
    """`exp` as a datetime. pyjwt accepts any value int() takes ("5", true, 1e300) and
    compares it with the clock; the times must be real numbers, and `exp` a representable
    date (a far-future `exp` would otherwise be a token that never expires, or an overflow)."""
    for claim in ("exp", "nbf", "iat"):
        value = payload[claim]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AuthError(401, f"token claim '{claim}' must be a number")
    try:
        return datetime.fromtimestamp(int(payload["exp"]), UTC)
    except (OverflowError, OSError, ValueError):
        raise AuthError(401, "token claim 'exp' is out of range") from None


def _string_claim(payload: dict[str, Any], claim: str, *, default: str | None = None) -> str:
    value = payload.get(claim)
    if value is None:
        if default is not None:
            return default
        raise AuthError(401, f"token is missing claim '{claim}'")
    if not isinstance(value, str):
        raise AuthError(401, f"token claim '{claim}' must be a string")
    return value


def _load_public_key(config: JwtConfig) -> _PublicKey:
    if config.public_key is None:  # JwtConfig already refuses this; kept for the type checker.
        raise ValueError(f"jwt.public_key is required with {config.algorithm}")
    pem = config.public_key.get_secret_value().encode()
    try:
        # Identity providers often publish a certificate rather than a bare key.
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: object = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError("jwt.public_key is not a PEM public key or certificate") from exc
    return _check_public_key(config.algorithm, key)


def _load_private_key(config: JwtConfig) -> _PrivateKey | None:
    if config.private_key is None:
        return None
    pem = config.private_key.get_secret_value().encode()
    try:
        key: object = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # No detail from the exception: it must not help reconstruct the key in a log.
        raise ValueError("jwt.private_key is not an unencrypted PEM private key") from exc
    if config.algorithm == "RS256" and isinstance(key, rsa.RSAPrivateKey):
        return key
    if (
        config.algorithm == "ES256"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise ValueError(f"jwt.private_key is not a {_KEY_KINDS[config.algorithm]} private key")


_KEY_KINDS = {"RS256": "RSA", "ES256": "P-256 EC"}


def _check_public_key(algorithm: str, key: object) -> _PublicKey:
    if algorithm == "RS256" and isinstance(key, rsa.RSAPublicKey):
        return key
    if (
        algorithm == "ES256"
        and isinstance(key, ec.EllipticCurvePublicKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise ValueError(f"jwt.public_key is not a {_KEY_KINDS[algorithm]} public key")


def _same_key_pair(private_key: _PrivateKey, public_key: _PublicKey) -> bool:
    derived = private_key.public_key()
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return derived.public_bytes(enc, fmt) == public_key.public_bytes(enc, fmt)
