"""Authentication: bearer tokens (JWT) for clinicians, patients and trainees."""

from server.auth.tokens import (
    INVITE_ROLES,
    AuthError,
    Claims,
    SigningKeyMissing,
    TokenService,
    bearer_token,
    check_not_revoked,
    check_scope,
)

__all__ = [
    "INVITE_ROLES",
    "AuthError",
    "Claims",
    "SigningKeyMissing",
    "TokenService",
    "bearer_token",
    "check_not_revoked",
    "check_scope",
]
