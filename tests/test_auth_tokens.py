"""Tokens: round trips for each algorithm, and the known JWT attacks each refused precisely."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Literal

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from rooms.model import ConsultationId, UserId
from rooms.policy import Actor
from rooms.roles import Role
from server.auth import (
    AuthError,
    Claims,
    SigningKeyMissing,
    TokenService,
    bearer_token,
    check_not_revoked,
    check_scope,
)
from server.config import JwtConfig

# At least 32 bytes: pyjwt warns about shorter HMAC keys, and warnings are errors here.
SECRET = "test-secret-0123456789abcdef0123456789abcdef"
OTHER_SECRET = "another-secret-0123456789abcdef0123456789abcd"
CID = ConsultationId("c-42")

Algorithm = Literal["HS256", "RS256", "ES256"]


# --- keys and configs --------------------------------------------------------------------


def _new_private_pem(algorithm: Algorithm) -> str:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


# The server's key pair per algorithm; cached because RSA generation is slow to repeat.
_private_pem = cache(_new_private_pem)


def _public_pem(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _config(algorithm: Algorithm = "HS256", *, signing: bool = True, **kw: Any) -> JwtConfig:
    if algorithm == "HS256":
        return JwtConfig(secret=SecretStr(SECRET), **kw)
    private = _private_pem(algorithm)
    return JwtConfig(
        algorithm=algorithm,
        public_key=SecretStr(_public_pem(private)),
        private_key=SecretStr(private) if signing else None,
        **kw,
    )


def _clock(shift_s: float) -> Callable[[], datetime]:
    """A minting clock `shift_s` seconds away from the wall clock pyjwt verifies against."""
    return lambda: datetime.now(UTC) + timedelta(seconds=shift_s)


def _service(algorithm: Algorithm = "HS256", *, shift_s: float = 0, **kw: Any) -> TokenService:
    return TokenService(_config(algorithm, **kw), now=_clock(shift_s))


def _mint(service: TokenService, **kw: Any) -> str:
    args: dict[str, Any] = {
        "user_id": UserId("u-1"),
        "name": "Dr. Li",
        "role": Role.COUNTY_PHYSICIAN,
        "org": "county-hospital",
    }
    return service.mint(**(args | kw))


# --- hand-built tokens -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _payload(**overrides: Any) -> dict[str, Any]:
    """Valid claims for the default HS256 config; an override of None drops the claim."""
    now = int(datetime.now(UTC).timestamp())
    claims: dict[str, Any] = {
        "sub": "u-1",
        "name": "Dr. Li",
        "role": "county_physician",
        "org": "county-hospital",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "iss": "telemed",
        "aud": "telemed",
        "jti": "jti-1",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _signed(**overrides: Any) -> str:
    return jwt.encode(_payload(**overrides), SECRET, algorithm="HS256")


def _refused(
    service: TokenService, token: str, message: str, status: Literal[401, 403] = 401
) -> None:
    with pytest.raises(AuthError) as info:
        service.verify(token)
    assert (info.value.status, info.value.message) == (status, message)
    # Neither the token nor the key material may leak through the error.
    assert not token or token not in str(info.value)
    assert SECRET not in str(info.value)


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["HS256", "RS256", "ES256"])
def test_round_trip(algorithm: Algorithm) -> None:
    service = _service(algorithm)
    token = _mint(service, consultation=CID, jti="jti-7", ttl_s=300)
    assert jwt.get_unverified_header(token)["alg"] == algorithm

    claims = service.verify(token)

    assert claims.user_id == "u-1"
    assert claims.name == "Dr. Li"
    assert claims.role is Role.COUNTY_PHYSICIAN
    assert claims.org == "county-hospital"
    assert claims.consultation == CID
    assert claims.jti == "jti-7"
    assert claims.is_invite is False
    assert claims.expires_at.tzinfo is UTC
    remaining = (claims.expires_at - datetime.now(UTC)).total_seconds()
    assert 290 <= remaining <= 300


def test_mint_defaults_access_ttl_and_random_jti() -> None:
    service = _service(access_ttl_s=3600)
    first, second = service.verify(_mint(service)), service.verify(_mint(service))
    assert first.consultation is None
    assert first.jti is not None and len(first.jti) == 32
    assert first.jti != second.jti
    remaining = (first.expires_at - datetime.now(UTC)).total_seconds()
    assert 3590 <= remaining <= 3600


def test_claims_to_actor_carries_scope() -> None:
    service = _service()
    claims = service.verify(_mint(service, role=Role.TRAINEE, consultation=CID))
    assert claims.to_actor() == Actor(
        user_id=UserId("u-1"),
        name="Dr. Li",
        role=Role.TRAINEE,
        org="county-hospital",
        scope=CID,
    )


def test_org_may_be_absent() -> None:
    assert _service().verify(_signed(org=None)).org == ""


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_verify_only_server_accepts_identity_provider_tokens(algorithm: Algorithm) -> None:
    service = _service(algorithm, signing=False)
    # The identity provider holds the private key; telemed only has the public half.
    token = jwt.encode(_payload(), _private_pem(algorithm), algorithm=algorithm)
    assert service.verify(token).role is Role.COUNTY_PHYSICIAN


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_verify_only_server_refuses_to_mint(algorithm: Algorithm) -> None:
    service = _service(algorithm, signing=False)
    assert service.can_mint is False
    with pytest.raises(SigningKeyMissing) as info:
        _mint(service)
    assert str(info.value) == (
        "this server only verifies tokens; mint them with your identity provider"
    )


# --- invites -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.RESIDENT, Role.GUARDIAN, Role.TRAINEE])
def test_invite_is_scoped_and_short_lived(role: Role) -> None:
    service = _service(invite_ttl_s=1800)
    token, expires_at = service.mint_invite(
        user_id=UserId("p-1"), name="Wang", role=role, org="", consultation=CID, jti="inv-1"
    )
    claims = service.verify(token)
    assert (claims.is_invite, claims.consultation, claims.jti, claims.role) == (
        True,
        CID,
        "inv-1",
        role,
    )
    assert claims.expires_at == expires_at
    assert 1790 <= (expires_at - datetime.now(UTC)).total_seconds() <= 1800


@pytest.mark.parametrize(("asked", "granted"), [(600, 600), (99_999, 1800)])
def test_invite_ttl_is_capped(asked: int, granted: int) -> None:
    service = _service(invite_ttl_s=1800)
    _, expires_at = service.mint_invite(
        user_id=UserId("p-1"),
        name="Wang",
        role=Role.RESIDENT,
        org="",
        consultation=CID,
        ttl_s=asked,
        jti="inv-1",
    )
    assert granted - 10 <= (expires_at - datetime.now(UTC)).total_seconds() <= granted


@pytest.mark.parametrize(
    "role", [r for r in Role if r not in {Role.RESIDENT, Role.GUARDIAN, Role.TRAINEE}]
)
def test_invite_refused_for_other_roles(role: Role) -> None:
    with pytest.raises(ValueError, match=rf"^role {role.value} may not be invited"):
        _service().mint_invite(
            user_id=UserId("u-1"), name="X", role=role, org="o", consultation=CID, jti="j"
        )


def test_invite_without_cid_is_refused() -> None:
    _refused(_service(), _signed(inv=True), "invite token is missing claim 'cid'")


# --- forged algorithms -------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
@pytest.mark.parametrize("algorithm", ["HS256", "RS256"])
def test_alg_none_is_refused(alg: str, algorithm: Algorithm) -> None:
    token = f"{_segment({'alg': alg, 'typ': 'JWT'})}.{_segment(_payload())}."
    _refused(_service(algorithm), token, "token algorithm is not allowed")


def test_alg_header_missing_is_refused() -> None:
    token = f"{_segment({'typ': 'JWT'})}.{_segment(_payload())}."
    _refused(_service(), token, "token algorithm is not allowed")


def _hmac_token(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    # Built by hand: pyjwt refuses a PEM as an HMAC key, an attacker's tooling does not.
    signing_input = f"{_segment(header)}.{_segment(payload)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def test_hs256_signed_with_rs256_public_key_is_refused() -> None:
    """Key confusion: the public key is public, so an HMAC over it is forgeable by anyone."""
    config = _config("RS256", signing=False)
    assert config.public_key is not None
    public_pem = config.public_key.get_secret_value().encode()
    token = _hmac_token({"alg": "HS256", "typ": "JWT"}, _payload(role="admin"), public_pem)
    _refused(TokenService(config), token, "token algorithm is not allowed")


def test_rs256_header_over_hmac_signature_is_refused() -> None:
    """The same forgery claiming RS256: the public key must never be used as an HMAC key."""
    config = _config("RS256", signing=False)
    assert config.public_key is not None
    public_pem = config.public_key.get_secret_value().encode()
    token = _hmac_token({"alg": "RS256", "typ": "JWT"}, _payload(role="admin"), public_pem)
    _refused(TokenService(config), token, "token signature is invalid")


def test_token_of_other_algorithm_is_refused() -> None:
    rs_token = _mint(_service("RS256"))
    _refused(_service("ES256"), rs_token, "token algorithm is not allowed")


# --- signatures --------------------------------------------------------------------------


def test_tampered_payload_is_refused() -> None:
    service = _service()
    header, payload, signature = _mint(service, role=Role.RESIDENT).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "provincial_specialist"
    _refused(service, f"{header}.{_segment(claims)}.{signature}", "token signature is invalid")


@pytest.mark.parametrize("algorithm", ["HS256", "RS256", "ES256"])
def test_signature_by_another_key_is_refused(algorithm: Algorithm) -> None:
    if algorithm == "HS256":
        token = jwt.encode(_payload(), OTHER_SECRET, algorithm="HS256")
    else:
        foreign = _new_private_pem(algorithm)  # a key pair unknown to the server
        token = jwt.encode(_payload(), foreign, algorithm=algorithm)
    _refused(_service(algorithm), token, "token signature is invalid")


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "a.b", f"{_b64(b'[]')}.{_b64(b'{}')}.x"])
def test_malformed_token_is_refused(token: str) -> None:
    _refused(_service(), token, "token is malformed")


def test_payload_not_json_object_is_refused() -> None:
    # A correctly signed token whose payload is a JSON list, not a claim set.
    header = _segment({"alg": "HS256", "typ": "JWT"})
    signing_input = f"{header}.{_b64(b'[1]')}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    _refused(_service(), f"{signing_input}.{_b64(signature)}", "token is malformed")


# --- time --------------------------------------------------------------------------------


def test_expired_token_is_refused() -> None:
    # Minted 100 s ago for 60 s: expired 40 s ago, beyond the 30 s leeway.
    token = _mint(_service(shift_s=-100), ttl_s=60)
    _refused(_service(leeway_s=30), token, "token expired")


@pytest.mark.parametrize(("leeway_s", "accepted"), [(30, True), (0, False)])
def test_leeway_is_honoured_for_expiry(leeway_s: int, accepted: bool) -> None:
    # Expired 10 s ago.
    token = _mint(_service(shift_s=-70), ttl_s=60)
    service = _service(leeway_s=leeway_s)
    if accepted:
        assert service.verify(token).user_id == "u-1"
    else:
        _refused(service, token, "token expired")


def test_not_yet_valid_token_is_refused() -> None:
    # nbf (and iat) two minutes ahead, beyond the 30 s leeway.
    token = _mint(_service(shift_s=120))
    _refused(_service(leeway_s=30), token, "token not yet valid")


def test_nbf_alone_in_future_is_refused() -> None:
    now = int(datetime.now(UTC).timestamp())
    _refused(_service(leeway_s=30), _signed(nbf=now + 120), "token not yet valid")


def test_clock_skew_within_leeway_is_accepted() -> None:
    token = _mint(_service(shift_s=10))
    assert _service(leeway_s=30).verify(token).user_id == "u-1"


# --- issuer and audience -----------------------------------------------------------------


def test_wrong_audience_is_refused() -> None:
    token = _mint(_service(audience="billing"))
    _refused(_service(), token, "token audience is wrong")


def test_wrong_issuer_is_refused() -> None:
    token = _mint(_service(issuer="someone-else"))
    _refused(_service(), token, "token issuer is wrong")


# --- claims ------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf", "iss", "aud", "sub", "jti", "role", "name"])
def test_missing_required_claim_is_refused(claim: str) -> None:
    _refused(_service(), _signed(**{claim: None}), f"token is missing claim '{claim}'")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"role": "surgeon"}, "unknown role 'surgeon'"),
        ({"role": "ADMIN"}, "unknown role 'ADMIN'"),
        ({"role": 7}, "token claim 'role' must be a string"),
        ({"name": ["Li"]}, "token claim 'name' must be a string"),
        ({"org": 1}, "token claim 'org' must be a string"),
        ({"cid": 42}, "token claim 'cid' must be a non-empty string"),
        ({"cid": ""}, "token claim 'cid' must be a non-empty string"),
        ({"inv": "yes", "cid": "c-1"}, "token claim 'inv' must be a boolean"),
        ({"sub": 12}, "token claim 'sub' must be a string"),
        ({"sub": ""}, "token claim 'sub' must not be empty"),
        ({"jti": 5}, "token claim 'jti' must be a string"),
        ({"iat": "yesterday"}, "token claim 'iat' must be an integer"),
        ({"exp": "never"}, "token is malformed"),
    ],
)
def test_badly_typed_claim_is_refused(overrides: dict[str, Any], message: str) -> None:
    _refused(_service(), _signed(**overrides), message)


def test_unknown_role_message_is_bounded() -> None:
    _refused(_service(), _signed(role="x" * 500), f"unknown role {'x' * 40!r}")


# --- revocation, scope, header parsing ---------------------------------------------------


async def test_revoked_invite_is_refused() -> None:
    service = _service()
    token, _ = service.mint_invite(
        user_id=UserId("p-1"), name="Wang", role=Role.RESIDENT, org="", consultation=CID, jti="r1"
    )
    claims = service.verify(token)
    seen: list[str] = []

    async def is_revoked(jti: str) -> bool:
        seen.append(jti)
        return jti == "r1"

    with pytest.raises(AuthError) as info:
        await check_not_revoked(claims, is_revoked)
    assert (info.value.status, info.value.message) == (401, "invite has been revoked")
    assert seen == ["r1"]


async def test_unrevoked_token_passes() -> None:
    service = _service()
    claims = service.verify(_mint(service, jti="fine"))

    async def is_revoked(jti: str) -> bool:
        return False

    await check_not_revoked(claims, is_revoked)
    await TokenService.check_not_revoked(claims, is_revoked)


def _claims(consultation: ConsultationId | None) -> Claims:
    service = _service()
    return service.verify(_mint(service, consultation=consultation))


def test_scoped_token_elsewhere_is_forbidden() -> None:
    with pytest.raises(AuthError) as info:
        check_scope(_claims(CID), ConsultationId("c-other"))
    assert (info.value.status, info.value.message) == (
        403,
        "token is scoped to another consultation",
    )


@pytest.mark.parametrize("consultation", [CID, None])
def test_scope_allows_own_consultation_and_unscoped_tokens(
    consultation: ConsultationId | None,
) -> None:
    check_scope(_claims(consultation), CID)


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc.def.ghi", "abc.def.ghi"), ("bearer  abc.def.ghi ", "abc.def.ghi")],
)
def test_bearer_token_is_extracted(header: str, token: str) -> None:
    assert bearer_token(header) == token
    assert TokenService.bearer_token(header) == token


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing bearer token"),
        ("", "missing bearer token"),
        ("   ", "missing bearer token"),
        ("Bearer", "missing bearer token"),
        ("Bearer   ", "missing bearer token"),
        ("Basic dXNlcjpwYXNz", "authorization must be a Bearer token"),
        ("Token abc", "authorization must be a Bearer token"),
        ("abc.def.ghi", "authorization must be a Bearer token"),
        # Header bytes that are not UTF-8 reach us as surrogates; none is a token's.
        ("Bearer \udcff\udcfe", "authorization header must be printable ASCII"),
        ("Bearer é.x.y", "authorization header must be printable ASCII"),
        ("Bearer abc\tdef", "authorization header must be printable ASCII"),
    ],
)
def test_bad_authorization_header_is_refused(header: str | None, message: str) -> None:
    with pytest.raises(AuthError) as info:
        bearer_token(header)
    assert (info.value.status, info.value.message) == (401, message)


# --- configuration -----------------------------------------------------------------------


def test_public_key_of_wrong_type_is_refused() -> None:
    ec_public = _public_pem(_private_pem("ES256"))
    config = JwtConfig(algorithm="RS256", public_key=SecretStr(ec_public))
    with pytest.raises(ValueError, match=r"^jwt\.public_key is not a RSA public key$"):
        TokenService(config)


def test_unparseable_public_key_is_refused() -> None:
    config = JwtConfig(algorithm="ES256", public_key=SecretStr("not a pem"))
    with pytest.raises(ValueError, match=r"^jwt\.public_key is not a PEM public key"):
        TokenService(config)


def test_private_key_must_match_public_key() -> None:
    private = _private_pem("RS256")
    other_public = _public_pem(_new_private_pem("RS256"))
    config = JwtConfig(
        algorithm="RS256", public_key=SecretStr(other_public), private_key=SecretStr(private)
    )
    with pytest.raises(ValueError, match=r"^jwt\.private_key does not belong to jwt\.public_key$"):
        TokenService(config)


def test_public_key_may_be_a_certificate() -> None:
    # Identity providers often publish a certificate rather than a bare public key.
    private_pem = _private_pem("ES256")
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    service = TokenService(JwtConfig(algorithm="ES256", public_key=SecretStr(pem)))
    token = jwt.encode(_payload(), private_pem, algorithm="ES256")
    assert service.verify(token).user_id == "u-1"


# --- times and text no token holds ---------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": 10**12}, "token claim 'exp' is out of range"),
        ({"exp": -(10**12)}, "token expired"),
        ({"exp": 1e300}, "token claim 'exp' is out of range"),
        ({"exp": 10**400}, "token claim 'exp' is out of range"),
        ({"exp": "4102444800"}, "token claim 'exp' must be a number"),
        ({"nbf": 10**12}, "token not yet valid"),
        ({"iat": "0"}, "token claim 'iat' must be a number"),
    ],
)
def test_time_claims_outside_the_datetime_range_raise_only_auth_error(
    claims: dict[str, Any], message: str
) -> None:
    _refused(_service(), _signed(**claims), message)


@pytest.mark.parametrize("token", ["\udcff.\udcfe.x", "é.é.é", "a.b.c\x00"])
def test_a_token_that_is_not_ascii_is_malformed(token: str) -> None:
    _refused(_service(), token, "token is malformed")
