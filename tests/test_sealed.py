"""The sealed file format (media/sealed.py): round trips, byte ranges, and every kind of
tampering refused with an error that says what is wrong; real WebM recordings sealed as the
muxer writes them, read back through PyAV, and recovered after a writer is killed."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from media_peers import close_to, dominant_frequency, mean_colour
from recording_helpers import decode, opus_frames, record_track, vp8_frames

from media.recording import DiskWriter, SegmentState, recover_segment
from media.sealed import (
    OVERHEAD,
    SealedReader,
    SealedWriter,
    SealError,
    SealKeys,
    key_id_of,
    parse_key,
    plaintext_sha256,
)

KEY = bytes(range(32))
KEYS = SealKeys(KEY)
CHUNK = 1024
RED = (200, 40, 40)


def seal(path: Path, data: bytes, keys: SealKeys = KEYS, chunk: int = CHUNK) -> None:
    with SealedWriter(path, keys, chunk_size=chunk) as writer:
        writer.write(data)


def unseal(path: Path, keys: SealKeys = KEYS) -> bytes:
    with SealedReader(path, keys) as reader:
        return b"".join(reader.read_range(0, reader.size))


@pytest.mark.parametrize("length", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 7])
def test_round_trip_keeps_every_byte_and_hashes_the_plaintext(tmp_path: Path, length: int) -> None:
    data = os.urandom(length)
    path = tmp_path / "f.sealed"
    seal(path, data)
    assert unseal(path) == data
    assert plaintext_sha256(path, KEYS) == (hashlib.sha256(data).hexdigest(), length)


def test_writes_anywhere_before_the_end_are_sealed_again(tmp_path: Path) -> None:
    # What the WebM muxer does on close: back to the header, then on at the end.
    data = bytearray(os.urandom(3 * CHUNK + 100))
    path = tmp_path / "f.sealed"
    with SealedWriter(path, KEYS, chunk_size=CHUNK) as writer:
        writer.write(bytes(data))
        writer.seek(10)
        writer.write(b"0123456789")
        writer.seek(CHUNK - 3)
        writer.write(b"across")
        writer.seek(0, os.SEEK_END)
        writer.write(b"tail")
    data[10:20] = b"0123456789"
    data[CHUNK - 3 : CHUNK + 3] = b"across"
    data += b"tail"
    assert unseal(path) == bytes(data)


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=6 * CHUNK),
    ranges=st.lists(
        st.tuples(st.integers(0, 7 * CHUNK), st.integers(0, 7 * CHUNK)), min_size=1, max_size=8
    ),
)
def test_any_byte_range_reads_the_plaintext_slice(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, ranges: list[tuple[int, int]]
) -> None:
    path = tmp_path_factory.mktemp("ranges") / "f.sealed"
    seal(path, data)
    with SealedReader(path, KEYS) as reader:
        assert reader.size == len(data)
        for start, end in ranges:
            assert b"".join(reader.read_range(start, end)) == data[start:end]
            reader.seek(start)
            assert reader.read(max(0, end - start)) == data[start:end]


def test_the_file_on_disk_holds_no_plaintext(tmp_path: Path) -> None:
    data = b"a patient's name, said out loud " * 200
    path = tmp_path / "f.sealed"
    seal(path, data)
    raw = path.read_bytes()
    assert b"patient" not in raw
    assert raw.startswith(b"TMSEAL")


def _sealed(tmp_path: Path, chunks: int = 4) -> tuple[Path, bytes, int]:
    data = os.urandom(chunks * CHUNK + 100)
    path = tmp_path / "f.sealed"
    seal(path, data)
    head = path.stat().st_size - chunks * (CHUNK + OVERHEAD) - (100 + OVERHEAD)
    return path, data, head


def test_a_flipped_byte_is_refused_naming_its_chunk(tmp_path: Path) -> None:
    path, _, head = _sealed(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[head + 2 * (CHUNK + OVERHEAD) + 50] ^= 1
    path.write_bytes(bytes(raw))
    with SealedReader(path, KEYS) as reader:
        assert reader.chunk(1)  # the others still read
        with pytest.raises(SealError, match="chunk 2 fails authentication"):
            reader.chunk(2)
    with pytest.raises(SealError, match="chunk 2"):
        plaintext_sha256(path, KEYS)


def test_a_changed_header_is_refused(tmp_path: Path) -> None:
    path, _, _ = _sealed(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[15] ^= 1  # inside the file id
    path.write_bytes(bytes(raw))
    with pytest.raises(SealError, match="fails authentication"):
        plaintext_sha256(path, KEYS)


@pytest.mark.parametrize(
    ("cut", "error"),
    [
        ("at_a_chunk_boundary", "ends without its final chunk: it is truncated"),
        ("inside_a_chunk", "chunk 3 fails authentication"),
        ("the_final_record", "chunk 4 fails authentication"),
    ],
)
def test_a_truncated_file_is_refused(tmp_path: Path, cut: str, error: str) -> None:
    path, data, head = _sealed(tmp_path)
    keep = {
        "at_a_chunk_boundary": head + 3 * (CHUNK + OVERHEAD),
        "inside_a_chunk": head + 3 * (CHUNK + OVERHEAD) + 200,
        "the_final_record": path.stat().st_size - 1,
    }[cut]
    with path.open("r+b") as f:
        f.truncate(keep)
    with pytest.raises(SealError, match=error):
        SealedReader(path, KEYS)
    # As an interrupted recording it opens, up to its last whole chunk.
    with SealedReader(path, KEYS, unfinished_ok=True) as reader:
        assert not reader.complete
        whole = b"".join(reader.read_range(0, reader.size))
    assert data.startswith(whole) and len(whole) >= 3 * CHUNK


def test_swapped_chunks_are_refused(tmp_path: Path) -> None:
    path, _, head = _sealed(tmp_path)
    raw = bytearray(path.read_bytes())
    size = CHUNK + OVERHEAD
    one = raw[head + size : head + 2 * size]
    raw[head + size : head + 2 * size] = raw[head + 2 * size : head + 3 * size]
    raw[head + 2 * size : head + 3 * size] = one
    path.write_bytes(bytes(raw))
    with pytest.raises(SealError, match="chunk 1 fails authentication"):
        plaintext_sha256(path, KEYS)


def test_a_chunk_from_another_file_is_refused(tmp_path: Path) -> None:
    path, _, head = _sealed(tmp_path)
    other = tmp_path / "other.sealed"
    seal(other, os.urandom(4 * CHUNK + 100))
    raw = bytearray(path.read_bytes())
    size = CHUNK + OVERHEAD
    raw[head : head + size] = other.read_bytes()[head : head + size]
    path.write_bytes(bytes(raw))
    with pytest.raises(SealError, match="chunk 0 fails authentication"):
        plaintext_sha256(path, KEYS)


def test_a_file_sealed_with_a_key_not_configured_is_refused(tmp_path: Path) -> None:
    path, _, _ = _sealed(tmp_path)
    other = SealKeys(os.urandom(32))
    with pytest.raises(SealError, match=f"sealed with key '{key_id_of(KEY)}', which is not among"):
        SealedReader(path, other)


def test_a_rotated_key_still_reads_files_of_the_previous_one(tmp_path: Path) -> None:
    old = tmp_path / "old.sealed"
    seal(old, b"before the rotation")
    rotated = SealKeys(os.urandom(32), previous=[KEY])
    new = tmp_path / "new.sealed"
    seal(new, b"after the rotation", keys=rotated)
    assert unseal(old, rotated) == b"before the rotation"
    assert unseal(new, rotated) == b"after the rotation"
    with pytest.raises(SealError, match="not among the configured"):
        unseal(new, KEYS)
    assert SealKeys.from_json(rotated.to_json()).ids == rotated.ids


def test_not_a_sealed_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.webm"
    path.write_bytes(b"\x1a\x45\xdf\xa3 plain webm")
    with pytest.raises(SealError, match="is not a sealed recording"):
        SealedReader(path, KEYS)


def test_key_files_hold_raw_bytes_or_base64() -> None:
    import base64

    assert parse_key(KEY) == KEY
    assert parse_key(base64.b64encode(KEY) + b"\n") == KEY
    with pytest.raises(ValueError, match="32 bytes"):
        parse_key(b"too short")


# --- WebM recordings, sealed as they are written ---------------------------------------------


async def test_a_sealed_webm_recording_decodes_to_its_colour_and_tone(tmp_path: Path) -> None:
    writer = DiskWriter()
    writer.start()
    try:
        video = await record_track(
            writer, tmp_path / "v.webm", "video", vp8_frames(RED, 3.0, noise=True), keys=KEYS
        )
        audio = await record_track(
            writer, tmp_path / "a.webm", "audio", opus_frames(440.0, 3.0), keys=KEYS
        )
    finally:
        await writer.stop()
    for info in (video, audio):
        assert info.state is SegmentState.COMPLETE
        raw = info.path.read_bytes()
        # No EBML magic, no codec names: nothing of the WebM is readable on disk.
        assert b"\x1a\x45\xdf\xa3" not in raw and b"webm" not in raw
        plain = unseal(info.path)
        assert plain.startswith(b"\x1a\x45\xdf\xa3")
        assert info.sha256 == hashlib.sha256(plain).hexdigest()
        assert info.size_bytes == len(plain)
    seen = decode(video.path, KEYS)
    assert (seen.codec, len(seen.video)) == ("vp8", 90)
    assert all(close_to(mean_colour(f), RED) for f in seen.video)
    heard = decode(audio.path, KEYS)
    assert heard.codec == "opus"
    assert abs(dominant_frequency(heard.audio) - 440.0) < 10
    assert heard.duration_s == pytest.approx(3.0, abs=0.1)


async def test_a_sealed_segment_cut_short_is_recovered_up_to_its_last_chunk(
    tmp_path: Path,
) -> None:
    writer = DiskWriter()
    writer.start()
    try:
        info = await record_track(
            writer, tmp_path / "v.webm", "video", vp8_frames(RED, 4.0, noise=True), keys=KEYS
        )
    finally:
        await writer.stop()
    # As a kill -9 leaves it: no final record, the open last chunk torn.
    with info.path.open("r+b") as f:
        f.truncate(info.path.stat().st_size - 500)
    recovered = await asyncio.to_thread(recover_segment, info.path, KEYS)
    assert recovered.state is SegmentState.INTERRUPTED
    assert recovered.kind == "video" and recovered.frames > 30
    assert recovered.sha256 == plaintext_sha256(info.path, KEYS, unfinished_ok=True)[0]
