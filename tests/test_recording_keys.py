"""The recording keys from configuration (server/recording_keys.py): a key file raw or base64,
previous keys for files sealed before a rotation, refused without one outside development
mode, generated once (and kept) in it."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from media.sealed import SealedReader, SealedWriter, SealError, key_id_of
from server.config import ConfigError, load_config
from server.recording_keys import DEV_KEY_FILE, load_recording_keys


def test_a_rotation_keeps_files_of_the_previous_key_readable(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    (tmp_path / "old.key").write_bytes(old)
    (tmp_path / "new.key").write_text(base64.b64encode(new).decode() + "\n")
    before = load_config(env={"TELEMED_RECORDING_KEY_FILE": str(tmp_path / "old.key")})
    sealed = tmp_path / "before.webm"
    with SealedWriter(sealed, load_recording_keys(before)) as writer:
        writer.write(b"recorded before the rotation")

    after = load_config(
        env={
            "TELEMED_RECORDING_KEY_FILE": str(tmp_path / "new.key"),
            "TELEMED_RECORDING_PREVIOUS_KEY_FILES": str(tmp_path / "old.key"),
        }
    )
    keys = load_recording_keys(after)
    assert keys.current_id == key_id_of(new)
    assert sorted(keys.ids) == sorted([key_id_of(old), key_id_of(new)])
    with SealedReader(sealed, keys) as reader:
        assert reader.read_span(0, reader.size) == b"recorded before the rotation"
    # Without the previous key, the old file says which key it needs.
    only_new = load_config(env={"TELEMED_RECORDING_KEY_FILE": str(tmp_path / "new.key")})
    with pytest.raises(SealError, match=key_id_of(old)):
        SealedReader(sealed, load_recording_keys(only_new))


def test_no_key_outside_development_mode_is_refused(tmp_path: Path) -> None:
    config = load_config(env={"TELEMED_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="set TELEMED_RECORDING_KEY_FILE"):
        load_recording_keys(config)
    assert list(tmp_path.iterdir()) == []


def test_development_mode_generates_one_key_and_keeps_it(tmp_path: Path) -> None:
    config = load_config(env={"TELEMED_DATA_DIR": str(tmp_path / "data"), "TELEMED_DEV": "1"})
    first = load_recording_keys(config)
    again = load_recording_keys(config)
    assert first.current_id == again.current_id
    key_file = tmp_path / "data" / DEV_KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert first.current_id == key_id_of(key_file.read_bytes())
