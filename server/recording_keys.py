"""The keys recordings are sealed with at rest (media/sealed.py), read from the files the
configuration names; in development mode, generated once into data_dir when none is set."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from media.sealed import KEY_BYTES, SealKeys, parse_key
from server.config import Config, ConfigError

log = logging.getLogger(__name__)

DEV_KEY_FILE = "recording-dev.key"


def load_recording_keys(config: Config) -> SealKeys:
    """The current key and the previous ones; ConfigError if one is missing or unreadable."""
    settings = config.recording
    if settings.key_file is not None:
        current = _read(settings.key_file)
    elif config.dev:
        current = _development_key(config.data_dir)
    else:
        raise ConfigError(
            "set TELEMED_RECORDING_KEY_FILE (or run with --dev): recordings are encrypted at "
            "rest with its key (32 random bytes, raw or base64)"
        )
    return SealKeys(current, [_read(path) for path in settings.previous_key_files])


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the recording key file {path}: {exc.strerror}") from None
    try:
        return parse_key(data)
    except ValueError as exc:
        raise ConfigError(f"recording key file {path}: {exc}") from None


def _development_key(data_dir: Path) -> bytes:
    path = data_dir / DEV_KEY_FILE
    if path.exists():
        return _read(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    key = os.urandom(KEY_BYTES)
    # Readable by this user only, and never overwritten: the recordings need it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    log.warning(
        "development mode: generated a recording key at %s; recordings sealed with it are "
        "readable only with that file",
        path,
    )
    return key
