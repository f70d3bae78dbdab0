"""Recordings sealed at rest: AES-256-GCM in fixed-size chunks, so any byte range can be read
by decrypting only the chunks it touches (HTTP Range, PyAV seeking) and a file cut short by a
crash still opens up to its last whole chunk.

A sealed file (facts in docs/domain.md, "Recordings at rest"):

    header   magic "TMSEAL", version 1, chunk size (u32), file id (16 random bytes),
             key id length (u8), key id (ASCII)
    records  nonce (12 random bytes) || AES-GCM(chunk plaintext) || tag (16 bytes)

Every chunk holds `chunk_size` plaintext bytes but the last, which is shorter (possibly empty)
and flagged final: a closed file always ends in a final record, so a file cut at a chunk
boundary is detected. The associated data of chunk i is header || i (u64) || final (u8): a
record moved to another place or another file, or a changed header, fails authentication.

Nonces are random per record, not derived from the index, because a record is sealed more
than once: the writer re-seals the open last chunk after every write (what a `kill -9` can
lose is that one chunk), and the WebM muxer seeks back on close to fill in the header."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"TMSEAL"
VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
DEFAULT_CHUNK_SIZE = 64 * 1024
_FIXED = struct.Struct(">6sBI16sB")  # magic, version, chunk size, file id, key id length
_MAX_CHUNK_SIZE = 16 * 1024 * 1024


class SealError(Exception):
    """A sealed file that cannot be read as sealed: not one, sealed with a key that is not
    configured, altered, reordered or truncated. The message says which, and where."""


def key_id_of(key: bytes) -> str:
    """A key's id: written into every file it seals, so the right key is found after a
    rotation. A hash of the key (it reveals nothing of a random 256-bit key), so an id can
    never name the wrong key."""
    return hashlib.sha256(b"telemed recording key id\0" + key).hexdigest()[:16]


class SealKeys:
    """The current key (seals new files) and previous ones (still read old files)."""

    def __init__(self, current: bytes, previous: Sequence[bytes] = ()) -> None:
        for key in (current, *previous):
            if len(key) != KEY_BYTES:
                raise ValueError(f"a recording key is {KEY_BYTES} bytes, not {len(key)}")
        self.current_id = key_id_of(current)
        self._keys = {key_id_of(k): k for k in previous} | {self.current_id: current}

    @property
    def ids(self) -> list[str]:
        return list(self._keys)

    def cipher(self, key_id: str) -> AESGCM:
        key = self._keys.get(key_id)
        if key is None:
            raise SealError(
                f"sealed with key {key_id!r}, which is not among the configured recording keys"
            )
        return AESGCM(key)

    def to_json(self) -> str:
        """For a child process (the composite renderer), over a pipe, never a file."""
        current = self._keys[self.current_id]
        previous = [k for i, k in self._keys.items() if i != self.current_id]
        return json.dumps(
            {"current": _b64(current), "previous": [_b64(k) for k in previous]},
        )

    @classmethod
    def from_json(cls, text: str) -> SealKeys:
        raw: Mapping[str, Any] = json.loads(text)
        return cls(base64.b64decode(raw["current"]), [base64.b64decode(k) for k in raw["previous"]])


def parse_key(data: bytes) -> bytes:
    """A key as a key file holds it: 32 raw bytes, or their base64 text."""
    if len(data) == KEY_BYTES:
        return data
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a recording key file holds {KEY_BYTES} bytes, raw or as base64")
    return key


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class _Header:
    raw: bytes
    chunk_size: int
    key_id: str

    @property
    def record_size(self) -> int:
        return self.chunk_size + OVERHEAD

    def aad(self, index: int, final: bool) -> bytes:
        return self.raw + struct.pack(">QB", index, final)

    @classmethod
    def new(cls, key_id: str, chunk_size: int) -> _Header:
        ident = key_id.encode("ascii")
        raw = _FIXED.pack(MAGIC, VERSION, chunk_size, os.urandom(16), len(ident)) + ident
        return cls(raw, chunk_size, key_id)

    @classmethod
    def read(cls, f: io.BufferedIOBase, name: str) -> _Header:
        fixed = f.read(_FIXED.size)
        if len(fixed) < _FIXED.size or not fixed.startswith(MAGIC):
            raise SealError(f"{name} is not a sealed recording")
        _, version, chunk_size, _, id_len = _FIXED.unpack(fixed)
        if version != VERSION:
            raise SealError(f"{name} is sealed in format version {version}, not {VERSION}")
        if not 0 < chunk_size <= _MAX_CHUNK_SIZE:
            raise SealError(f"{name} has a damaged header (chunk size {chunk_size})")
        ident = f.read(id_len)
        if len(ident) < id_len or not ident.isascii():
            raise SealError(f"{name} has a damaged header (key id)")
        return cls(fixed + ident, chunk_size, ident.decode("ascii"))


def _seal(cipher: AESGCM, header: _Header, index: int, plain: bytes, final: bool) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + cipher.encrypt(nonce, plain, header.aad(index, final))


def _open(cipher: AESGCM, header: _Header, index: int, record: bytes, final: bool) -> bytes:
    if len(record) < OVERHEAD:
        raise InvalidTag
    return cipher.decrypt(record[:NONCE_BYTES], record[NONCE_BYTES:], header.aad(index, final))


class SealedWriter(io.RawIOBase):
    """A writable, seekable file that seals what is written to it: hand it to `av.open`.

    Whole chunks are sealed once full; the open last chunk is re-sealed at the end of every
    `write`, so the file on disk always holds everything written but the final flag. A write
    into an earlier chunk (the muxer filling in its header on close) decrypts, patches and
    re-seals that chunk. `close()` seals the last chunk as final."""

    def __init__(self, path: Path, keys: SealKeys, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.path = path
        self._cipher = keys.cipher(keys.current_id)
        self._header = _Header.new(keys.current_id, chunk_size)
        self._file = path.open("w+b")
        self._file.write(self._header.raw)
        self._pos = 0
        # Chunks before `_tail_index` are full and sealed; `_tail` is the open one.
        self._tail_index = 0
        self._tail = bytearray()

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        return self._tail_index * self._header.chunk_size + len(self._tail)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("cannot seek before the start")
        self._pos = base + offset
        return self._pos

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed sealed file")
        view = memoryview(data).cast("B")
        if self._pos > self.size:
            raise ValueError("a sealed file is written without holes")
        size = self._header.chunk_size
        written = 0
        tail_changed = False
        while written < len(view):
            index, offset = divmod(self._pos, size)
            take = min(size - offset, len(view) - written)
            piece = view[written : written + take]
            if index < self._tail_index:
                chunk = bytearray(self._read_chunk(index))
                chunk[offset : offset + take] = piece
                self._write_record(index, bytes(chunk), final=False)
            else:
                self._tail[offset : offset + take] = piece
                tail_changed = True
                if len(self._tail) == size:
                    self._write_record(index, bytes(self._tail), final=False)
                    self._tail_index += 1
                    self._tail = bytearray()
                    tail_changed = False
            written += take
            self._pos += take
        if tail_changed:
            self._write_record(self._tail_index, bytes(self._tail), final=False)
        return written

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._write_record(self._tail_index, bytes(self._tail), final=True)
        finally:
            self._file.close()
            super().close()

    def _offset(self, index: int) -> int:
        return len(self._header.raw) + index * self._header.record_size

    def _write_record(self, index: int, plain: bytes, final: bool) -> None:
        self._file.seek(self._offset(index))
        self._file.write(_seal(self._cipher, self._header, index, plain, final))
        # To the kernel now: a `kill -9` keeps what the muxer was told is written.
        self._file.flush()

    def _read_chunk(self, index: int) -> bytes:
        self._file.seek(self._offset(index))
        record = self._file.read(self._header.record_size)
        try:
            return _open(self._cipher, self._header, index, record, final=False)
        except InvalidTag:
            raise SealError(f"{self.path}: chunk {index} changed while being written") from None


class SealedReader(io.RawIOBase):
    """The plaintext of a sealed file: `read_range` for byte ranges, and a readable, seekable
    file for `av.open`. Every chunk read is authenticated; a failure raises SealError.

    A closed file must end with its final record. `unfinished_ok` opens a file a dead process
    left (an interrupted recording) up to its last whole, authentic chunk instead."""

    def __init__(self, path: Path, keys: SealKeys, *, unfinished_ok: bool = False) -> None:
        super().__init__()
        self.path = path
        self._file = path.open("rb")
        try:
            self._header = _Header.read(self._file, str(path))
            self._cipher = keys.cipher(self._header.key_id)
            self._layout(unfinished_ok)
        except BaseException:
            self._file.close()
            raise
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    def _layout(self, unfinished_ok: bool) -> None:
        header = self._header
        body = os.fstat(self._file.fileno()).st_size - len(header.raw)
        full, rest = divmod(body, header.record_size)
        self._full = full
        self._last = b""
        self.complete = False
        if rest >= OVERHEAD:
            record = self._record(full, rest)
            try:
                self._last = _open(self._cipher, header, full, record, final=True)
                self.complete = True
            except InvalidTag:
                if not unfinished_ok:
                    raise self._failed(full) from None
                try:  # the open last chunk of a recording cut short
                    self._last = _open(self._cipher, header, full, record, final=False)
                except InvalidTag:
                    self._last = b""  # torn by the crash: it ends at the chunk before
        elif rest and not unfinished_ok:
            raise SealError(f"{self.path} is truncated inside chunk {full}")
        if not self.complete and not unfinished_ok:
            raise SealError(f"{self.path} ends without its final chunk: it is truncated")
        self.size = full * header.chunk_size + len(self._last)

    def _record(self, index: int, length: int) -> bytes:
        self._file.seek(len(self._header.raw) + index * self._header.record_size)
        return self._file.read(length)

    def _failed(self, index: int) -> SealError:
        return SealError(
            f"{self.path}: chunk {index} fails authentication "
            "(altered, moved, or sealed with another key)"
        )

    def chunk(self, index: int) -> bytes:
        """The plaintext of chunk `index` (authenticated)."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        if index == self._full:
            plain = self._last
        elif 0 <= index < self._full:
            record = self._record(index, self._header.record_size)
            try:
                plain = _open(self._cipher, self._header, index, record, final=False)
            except InvalidTag:
                raise self._failed(index) from None
        else:
            raise IndexError(index)
        self._cached = (index, plain)
        return plain

    def read_range(self, start: int, end: int) -> Iterator[bytes]:
        """The plaintext bytes [start, end), chunk by chunk."""
        size = self._header.chunk_size
        start, end = max(0, start), min(end, self.size)
        while start < end:
            index, offset = divmod(start, size)
            piece = self.chunk(index)[offset : offset + end - start]
            yield piece
            start += len(piece)

    def read_span(self, start: int, end: int) -> bytes:
        """The plaintext bytes [start, end) at once."""
        return b"".join(self.read_range(start, end))

    # --- a file for PyAV ---------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self._pos + n)
        data = self.read_span(self._pos, end)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def plaintext_sha256(path: Path, keys: SealKeys, *, unfinished_ok: bool = False) -> tuple[str, int]:
    """SHA-256 (hex) and size of what was recorded into a sealed file, every chunk checked on
    the way (SealError if one fails). `unfinished_ok`: the file of an interrupted recording."""
    digest = hashlib.sha256()
    with SealedReader(path, keys, unfinished_ok=unfinished_ok) as reader:
        for piece in reader.read_range(0, reader.size):
            digest.update(piece)
        return digest.hexdigest(), reader.size


@contextmanager
def media_input(path: Path, keys: SealKeys | None, *, unfinished_ok: bool = False) -> Iterator[Any]:
    """A PyAV input container reading a recording: through the seal given keys, else the
    plain file. Raises av.FFmpegError if it holds no media PyAV can open."""
    if keys is None:
        with av.open(str(path)) as container:
            yield container
        return
    with (
        SealedReader(path, keys, unfinished_ok=unfinished_ok) as reader,
        av.open(reader) as container,
    ):
        yield container
