"""The server's opinion-signing key: Ed25519 from a PEM file (rooms.opinion.OpinionSigner).

A key's id is "ed25519:" and the first 16 bytes (hex) of the SHA-256 of its raw public key;
every signature stores it, so that after a rotation the old public key (configured in
signing.previous_public_keys) still verifies what it signed. In development mode without a
key file a key is made for the process: its signatures are "unknown_key" after a restart."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from server.config import ConfigError, SigningConfig

log = logging.getLogger(__name__)

DEV_KEY_FILE = "signing-dev.pem"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


class OpinionKeys:
    """Signs with one private key; verifies with its public key and the previous ones."""

    def __init__(
        self, private: Ed25519PrivateKey, previous: Iterable[Ed25519PublicKey] = ()
    ) -> None:
        self._private = private
        self._key_id = key_id(private.public_key())
        self._public = {key_id(p): p for p in previous}
        self._public[self._key_id] = private.public_key()

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def verify(self, key_id: str, data: bytes, signature: bytes) -> bool | None:
        public = self._public.get(key_id)
        if public is None:
            return None
        try:
            public.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def public_key_pem(self, key_id: str) -> str | None:
        public = self._public.get(key_id)
        if public is None:
            return None
        return public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")


def load_opinion_keys(config: SigningConfig, *, dev: bool) -> OpinionKeys:
    """The configured keys; without a key file, a key made for this process (said in the log,
    the key itself never shown). `telemed serve` refuses to start without a key file outside
    development mode (Config.check_safe_to_serve)."""
    previous = [_public_key(path) for path in config.previous_public_keys]
    if config.key_file is None:
        keys = OpinionKeys(Ed25519PrivateKey.generate(), previous)
        level = logging.INFO if dev else logging.WARNING
        log.log(
            level,
            "no signing.key_file: opinions are signed with a key made for this process "
            "(key id %s); set TELEMED_SIGNING_KEY_FILE so that they verify after a restart",
            keys.key_id,
        )
        return keys
    return OpinionKeys(_private_key(config.key_file), previous)


def development_key_file(data_dir: Path) -> Path:
    """The key file every worker of `telemed serve --dev --workers N` signs with: a key made
    per process would leave each worker reading the others' signatures as unknown_key. Made
    once into data_dir (readable by this user only, never overwritten), as recording-dev.key."""
    path = data_dir / DEV_KEY_FILE
    if path.exists():
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    log.info("development mode: generated the workers' opinion signing key at %s", path)
    return path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "signing key file"), password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"signing key file {path} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key file {path} holds a {type(key).__name__}, not Ed25519")
    return key


def _public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path, "previous public key"))
    except (ValueError, TypeError):
        raise ConfigError(f"previous public key {path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"previous public key {path} is not an Ed25519 key")
    return key
