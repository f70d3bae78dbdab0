"""One typed configuration: defaults, overlaid by an optional TOML file, then TELEMED_*
variables."""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rooms.retention import LEGAL_MINIMUM, Period, RetentionPeriods

# The secret a fresh checkout runs with in development mode; refused anywhere else.
DEV_JWT_SECRET = "telemed-development-secret-do-not-use-in-production"


class _Section(BaseModel):
    # Inputs never appear in errors: they may hold the JWT secret or a private key.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class JwtConfig(_Section):
    algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    # HS256: the shared secret. RS256/ES256: tokens are verified with public_key (PEM) and,
    # where telemed mints tokens itself (invites, the CLI), signed with private_key (PEM).
    secret: SecretStr = SecretStr(DEV_JWT_SECRET)
    public_key: SecretStr | None = None
    private_key: SecretStr | None = None
    issuer: str = "telemed"
    audience: str = "telemed"
    leeway_s: int = Field(default=30, ge=0, le=300)
    access_ttl_s: int = Field(default=8 * 3600, gt=0)
    invite_ttl_s: int = Field(default=2 * 3600, gt=0, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _keys_match_algorithm(self) -> JwtConfig:
        if self.algorithm != "HS256" and self.public_key is None:
            raise ValueError(f"jwt.public_key is required with {self.algorithm}")
        return self


class IceServer(_Section):
    urls: list[str]
    username: str | None = None
    credential: SecretStr | None = None


def _split_list(value: Any) -> Any:
    """A list given as one string (a TELEMED_* variable): items between commas or spaces."""
    if isinstance(value, str):
        return [part for part in re.split(r"[\s,]+", value) if part]
    return value


# turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT][?transport=tcp] (RFC 7065); HOST a
# name, an IPv4 address or a bracketed IPv6 one.
_TURN_URL = re.compile(
    r"^(?P<scheme>turns?):(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?"
    r"(?:\?transport=(?P<transport>udp|tcp))?$"
)
# Below this a shared secret is guessable offline from one credential (HMAC-SHA1 of a known
# username): refuse it.
TURN_SECRET_MIN_CHARS = 16


class TurnConfig(_Section):
    """TURN with short-lived credentials: the TURN REST API scheme coturn implements with
    `use-auth-secret`. telemed shares `secret` with the TURN server (its `static-auth-secret`)
    and mints each seated participant a username and password valid for `ttl_s`; no password
    is ever configured in a client."""

    secret: SecretStr | None = None
    urls: list[str] = []
    # coturn checks the expiry when an allocation is made, not when it is refreshed: a call
    # outlives its credentials, and this bounds how long a leaked one opens new allocations.
    # Long enough for the ICE restarts of a long consultation; a resumed seat gets fresh ones.
    ttl_s: int = Field(default=4 * 3600, ge=60, le=7 * 24 * 3600)

    _urls_from_one_string = field_validator("urls", mode="before")(_split_list)

    @field_validator("urls")
    @classmethod
    def _turn_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            match = _TURN_URL.match(url)
            if match is None:
                raise ValueError(
                    f"{url!r} is not a TURN URL: turn:HOST[:PORT][?transport=udp|tcp] or "
                    "turns:HOST[:PORT][?transport=tcp]"
                )
            if match["scheme"] == "turns" and match["transport"] == "udp":
                raise ValueError(f"{url!r}: turns: runs over TLS, which needs transport=tcp")
            if match["port"] is not None and not 0 < int(match["port"]) < 65536:
                raise ValueError(f"{url!r}: the port must be within 1..65535")
        return urls

    @model_validator(mode="after")
    def _secret_and_urls_together(self) -> TurnConfig:
        if self.urls and self.secret is None:
            raise ValueError(
                "turn.secret is required with turn.urls (the TURN server's static-auth-secret)"
            )
        if self.secret is not None:
            if not self.urls:
                raise ValueError("turn.urls is required with turn.secret")
            if len(self.secret.get_secret_value()) < TURN_SECRET_MIN_CHARS:
                raise ValueError(f"turn.secret must be at least {TURN_SECRET_MIN_CHARS} characters")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.urls)


class SignalingConfig(_Section):
    max_payload_bytes: int = Field(default=64 * 1024, gt=0)
    # Token bucket per connection: sustained rate and burst.
    events_per_second: float = Field(default=20.0, gt=0)
    event_burst: int = Field(default=40, gt=0)
    max_participants: int = Field(default=100, gt=0)
    reconnect_grace_s: float = Field(default=30.0, ge=0)
    # How long a live session waits for a clinician to come back before the server ends it.
    empty_room_grace_s: float = Field(default=120.0, ge=0)
    chat_max_chars: int = Field(default=2000, gt=0)
    annotation_max_points: int = Field(default=500, gt=0)


class MediaConfig(_Section):
    # Host addresses the relay offers in ICE; unset, every interface but loopback.
    host_addresses: list[str] | None = None
    _addresses_from_one_string = field_validator("host_addresses", mode="before")(_split_list)
    # Where this worker's pipe socket listens (tracks of a room larger than one worker,
    # media/pipe.py): an address the other workers reach. Unset: the first host address,
    # else 127.0.0.1 (enough for the workers of one machine).
    pipe_address: str | None = None
    # Media sections in one publish offer (the whole publish connection: a renegotiation
    # offer holds every section). Every subscriber is offered each published track.
    max_sections_per_connection: int = Field(default=8, gt=0, le=64)
    # Tracks one participant publishes at once. At most 8: a publish_offer names at most 8
    # sections, and every sending section must be named in each offer.
    max_tracks_per_participant: int = Field(default=6, gt=0, le=8)

    @model_validator(mode="after")
    def _tracks_fit_in_sections(self) -> MediaConfig:
        if self.max_tracks_per_participant > self.max_sections_per_connection:
            raise ValueError(
                "media.max_tracks_per_participant cannot exceed media.max_sections_per_connection"
            )
        return self


class RetentionConfig(_Section):
    """How long each kind of artifact is kept: "15y", "6mo", "180d", "1y 6mo". Shorter than
    the legal minimum is refused, so a typo cannot destroy records early."""

    records: str = "15y"
    recordings: str = "3y"
    access_logs: str = "6mo"

    @field_validator("records", "recordings", "access_logs")
    @classmethod
    def _a_lawful_period(cls, value: str, info: ValidationInfo) -> str:
        period = Period.parse(value)
        minimum: Period = getattr(LEGAL_MINIMUM, info.field_name or "")
        if not period.at_least(minimum):
            raise ValueError(
                f"{value!r} is shorter than the legal minimum of {minimum} for "
                f"{(info.field_name or '').replace('_', ' ')}"
            )
        return value

    @property
    def periods(self) -> RetentionPeriods:
        return RetentionPeriods(
            records=Period.parse(self.records),
            recordings=Period.parse(self.recordings),
            access_logs=Period.parse(self.access_logs),
        )


class SigningConfig(_Section):
    """The key that signs opinion versions (server/signing.py)."""

    # PEM file of the Ed25519 private key; required outside development mode (--dev makes a
    # key for the process). Its public key's id is stored with every signature.
    key_file: Path | None = None
    # PEM files of public keys signed with before a rotation, so their signatures still verify.
    previous_public_keys: list[Path] = []

    _keys_from_one_string = field_validator("previous_public_keys", mode="before")(_split_list)


class RecordingConfig(_Section):
    """Recordings are sealed at rest (media/sealed.py) with the key in `key_file`: 32 random
    bytes, raw or as base64. Files sealed with a key in `previous_key_files` stay readable
    after a rotation. Required outside development mode; in it, one is generated into
    data_dir when none is set (server/recording_keys.py)."""

    key_file: Path | None = None
    previous_key_files: list[Path] = []

    _files_from_one_string = field_validator("previous_key_files", mode="before")(_split_list)


DEFAULT_ATTACHMENT_MAX_BYTES = 64 * 1024 * 1024


class AttachmentConfig(_Section):
    """Files in the record (server/api/attachment_routes.py): the largest one accepted."""

    max_bytes: int = Field(default=DEFAULT_ATTACHMENT_MAX_BYTES, gt=0, le=2**40)


class Config(_Section):
    dev: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    data_dir: Path = Path("data")
    # Empty: an SQLite file under data_dir.
    database_url: str = ""
    redis_url: str | None = None
    # Worker processes of `telemed serve` (--workers overrides); unset: one per core with
    # Redis, else one.
    workers: int | None = Field(default=None, ge=1, le=256)
    # This node's name in the record (who writes a recording, whose to recover after a
    # crash); empty: host name and port. Each node behind one Redis needs its own.
    node_id: str = Field(default="", max_length=128)
    # Signs playback links on every node; empty: derived from the JWT secret or private key.
    link_secret: SecretStr | None = None
    public_url: str = ""
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    max_body_bytes: int = Field(default=256 * 1024, gt=0)
    jwt: JwtConfig = JwtConfig()
    signaling: SignalingConfig = SignalingConfig()
    media: MediaConfig = MediaConfig()
    retention: RetentionConfig = RetentionConfig()
    signing: SigningConfig = SigningConfig()
    recording: RecordingConfig = RecordingConfig()
    attachments: AttachmentConfig = AttachmentConfig()
    # Static STUN/TURN servers, for the relay and the clients; [turn] mints credentials instead.
    ice_servers: list[IceServer] = []
    turn: TurnConfig = TurnConfig()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'telemed.db').resolve()}"

    @property
    def effective_node_id(self) -> str:
        return self.node_id or f"{socket.gethostname()}:{self.port}"

    @property
    def link_secret_material(self) -> str | None:
        """What playback links are signed with: the same on every node and across restarts,
        or None where nothing secret is configured (a key of the process's own then)."""
        if self.link_secret is not None:
            return self.link_secret.get_secret_value()
        if self.jwt.algorithm == "HS256":
            return self.jwt.secret.get_secret_value()
        return self.jwt.private_key.get_secret_value() if self.jwt.private_key else None

    @property
    def effective_public_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    def check_safe_to_serve(self) -> None:
        """Outside development mode the built-in secret would let anyone mint tokens."""
        if not self.dev and self.jwt.algorithm == "HS256":
            if self.jwt.secret.get_secret_value() == DEV_JWT_SECRET:
                raise ConfigError(
                    "set TELEMED_JWT_SECRET (or run with --dev): "
                    "the default secret is for development only"
                )
            if len(self.jwt.secret.get_secret_value()) < 32:
                raise ConfigError("TELEMED_JWT_SECRET must be at least 32 characters")
        if self.link_secret is not None and len(self.link_secret.get_secret_value()) < 32:
            raise ConfigError("TELEMED_LINK_SECRET must be at least 32 characters")
        if not self.dev and self.signing.key_file is None:
            raise ConfigError(
                "set TELEMED_SIGNING_KEY_FILE (or signing.key_file) to the PEM file of an "
                "Ed25519 private key, or run with --dev: opinions are signed with it"
            )


class ConfigError(Exception):
    pass


# Environment variables that map onto nested fields.
_ENV_FIELDS: dict[str, tuple[str, ...]] = {
    "DEV": ("dev",),
    "HOST": ("host",),
    "PORT": ("port",),
    "DATA_DIR": ("data_dir",),
    "DATABASE_URL": ("database_url",),
    "REDIS_URL": ("redis_url",),
    "WORKERS": ("workers",),
    "NODE_ID": ("node_id",),
    "LINK_SECRET": ("link_secret",),
    "PUBLIC_URL": ("public_url",),
    "LOG_FORMAT": ("log_format",),
    "LOG_LEVEL": ("log_level",),
    "MAX_BODY_BYTES": ("max_body_bytes",),
    "JWT_ALGORITHM": ("jwt", "algorithm"),
    "JWT_SECRET": ("jwt", "secret"),
    "JWT_PUBLIC_KEY": ("jwt", "public_key"),
    "JWT_PRIVATE_KEY": ("jwt", "private_key"),
    "JWT_ISSUER": ("jwt", "issuer"),
    "JWT_AUDIENCE": ("jwt", "audience"),
    "JWT_LEEWAY_S": ("jwt", "leeway_s"),
    "JWT_ACCESS_TTL_S": ("jwt", "access_ttl_s"),
    "JWT_INVITE_TTL_S": ("jwt", "invite_ttl_s"),
    "RECONNECT_GRACE_S": ("signaling", "reconnect_grace_s"),
    "EMPTY_ROOM_GRACE_S": ("signaling", "empty_room_grace_s"),
    "MAX_PARTICIPANTS": ("signaling", "max_participants"),
    "MEDIA_HOST_ADDRESSES": ("media", "host_addresses"),
    "MEDIA_PIPE_ADDRESS": ("media", "pipe_address"),
    "TURN_SECRET": ("turn", "secret"),
    "TURN_URLS": ("turn", "urls"),
    "TURN_TTL_S": ("turn", "ttl_s"),
    "RETENTION_RECORDS": ("retention", "records"),
    "RETENTION_RECORDINGS": ("retention", "recordings"),
    "RETENTION_ACCESS_LOGS": ("retention", "access_logs"),
    "SIGNING_KEY_FILE": ("signing", "key_file"),
    "SIGNING_PREVIOUS_PUBLIC_KEYS": ("signing", "previous_public_keys"),
    "RECORDING_KEY_FILE": ("recording", "key_file"),
    "RECORDING_PREVIOUS_KEY_FILES": ("recording", "previous_key_files"),
    "ATTACHMENT_MAX_BYTES": ("attachments", "max_bytes"),
}


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < TOML file (`path` or TELEMED_CONFIG) < TELEMED_* environment < overrides."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = path or (Path(env["TELEMED_CONFIG"]) if env.get("TELEMED_CONFIG") else None)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    for name, field_path in _ENV_FIELDS.items():
        value = env.get(f"TELEMED_{name}")
        if value is not None:
            _set_nested(data, field_path, value)
    for key, value in (overrides or {}).items():
        _set_nested(data, tuple(key.split(".")), value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc


def _set_nested(data: dict[str, Any], field_path: tuple[str, ...], value: Any) -> None:
    *parents, leaf = field_path
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
