"""Attachment files: what an upload is, told from its first bytes (never its name or declared
type), and its bytes sealed at rest like a recording's (media/sealed.py), hashed (SHA-256 of
the plaintext) as they stream in, under `{data_dir}/attachments/{consultation}/{attachment}`.

A file is written to `<path>.part` and renamed into place only once it is whole and of an
accepted kind, so that the path in the record never names a half-written file."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from media.sealed import SealedReader, SealedWriter, SealKeys
from rooms.model import AttachmentFormat

# DICOM Part 10: a 128-byte preamble, then "DICM".
DICOM_OFFSET = 128
SNIFF_BYTES = DICOM_OFFSET + 4

_SIGNATURES: tuple[tuple[bytes, AttachmentFormat], ...] = (
    (b"\xff\xd8\xff", AttachmentFormat.JPEG),
    (b"\x89PNG\r\n\x1a\n", AttachmentFormat.PNG),
    (b"%PDF-", AttachmentFormat.PDF),
)
# Kinds that are refused, named so the 415 says what was sent.
_KNOWN_OTHERS: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x7fELF", "an ELF executable"),
    (b"MZ", "a Windows executable"),
    (b"\x1a\x45\xdf\xa3", "a WebM/Matroska file"),
    (b"<?xml", "an XML document"),
    (b"<svg", "an SVG image"),
    (b"<!DOCTYPE", "an HTML document"),
    (b"<html", "an HTML document"),
)
ACCEPTED = "JPEG (FF D8 FF), PNG, PDF (%PDF-) or DICOM (DICM at byte 128)"


def sniff(head: bytes) -> AttachmentFormat | None:
    """The format of a file starting with `head` (at least SNIFF_BYTES of it, or all of it)."""
    for signature, found in _SIGNATURES:
        if head.startswith(signature):
            return found
    if head[DICOM_OFFSET:SNIFF_BYTES] == b"DICM":
        return AttachmentFormat.DICOM
    return None


def describe(head: bytes) -> str:
    """What a refused file looks like, for the 415 (never its bytes beyond a short hex)."""
    if not head:
        return "an empty file"
    if head[4:8] == b"ftyp":
        return "an MP4/HEIF file"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    for signature, name in _KNOWN_OTHERS:
        if head.lower().startswith(signature.lower()):
            return name
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return "text"
    return "unknown content starting with " + head[:8].hex(" ")


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the file is larger than the limit of {limit} bytes")
        self.limit = limit


class Unsupported(Exception):
    def __init__(self, detected: str) -> None:
        super().__init__(f"the file is {detected}, not {ACCEPTED}")
        self.detected = detected


@dataclass(frozen=True)
class WrittenFile:
    format: AttachmentFormat
    size_bytes: int
    sha256: str
    # Where it is (the .part file until place()), absolute.
    path: Path


class AttachmentFiles:
    def __init__(self, data_dir: Path, keys: SealKeys | None) -> None:
        self._data_dir = data_dir.resolve()
        self._keys = keys

    @property
    def available(self) -> bool:
        return self._keys is not None

    def absolute(self, relative: str) -> Path:
        path = (self._data_dir / relative).resolve()
        # The path comes from the record (ids of the server's own); still, never leave data_dir.
        if not path.is_relative_to(self._data_dir):
            raise ValueError(f"{relative} is outside the data directory")
        return path

    async def write(
        self, relative: str, chunks: AsyncIterator[bytes], max_bytes: int
    ) -> WrittenFile:
        """Streams `chunks` into `<relative>.part`, sealed, refusing (and removing it) past
        `max_bytes` (TooLarge) or when its first bytes are no accepted kind (Unsupported)."""
        assert self._keys is not None, "checked by the caller (available)"
        final = self.absolute(relative)
        part = final.with_name(final.name + ".part")
        await asyncio.to_thread(part.parent.mkdir, parents=True, exist_ok=True)
        writer = await asyncio.to_thread(SealedWriter, part, self._keys)
        digest = hashlib.sha256()
        size = 0
        head = b""
        found: AttachmentFormat | None = None
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(max_bytes)
                if found is None:
                    head += chunk
                    if len(head) >= SNIFF_BYTES:
                        found = _accepted(head)
                digest.update(chunk)
                await asyncio.to_thread(writer.write, chunk)
            if found is None:
                found = _accepted(head)
            await asyncio.to_thread(writer.close)
        except BaseException:
            await asyncio.to_thread(writer.close)
            await asyncio.to_thread(part.unlink, True)
            raise
        return WrittenFile(found, size, digest.hexdigest(), part)

    async def place(self, written: WrittenFile) -> None:
        """The whole, accepted file into its place."""
        final = written.path.with_name(written.path.name.removesuffix(".part"))
        await asyncio.to_thread(written.path.replace, final)

    async def discard(self, written: WrittenFile) -> None:
        final = written.path.with_name(written.path.name.removesuffix(".part"))
        for path in (written.path, final):
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(path.unlink)

    async def read_written(self, written: WrittenFile) -> bytes:
        """The plaintext of a file just written (to check it before it is placed)."""
        assert self._keys is not None, "checked by the caller (available)"
        keys = self._keys

        def read() -> bytes:
            with SealedReader(written.path, keys) as reader:
                return reader.read_span(0, reader.size)

        return await asyncio.to_thread(read)

    def open(self, relative: str) -> SealedReader:
        """Raises FileNotFoundError, SealError (media.sealed)."""
        assert self._keys is not None, "checked by the caller (available)"
        return SealedReader(self.absolute(relative), self._keys)

    def read_all(self, relative: str, sha256: str) -> bytes:
        """The whole plaintext, checked against the record's hash (raises ValueError)."""
        with self.open(relative) as reader:
            data = reader.read_span(0, reader.size)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"{relative} does not match the SHA-256 in the record")
        return data


def _accepted(head: bytes) -> AttachmentFormat:
    found = sniff(head)
    if found is None:
        raise Unsupported(describe(head[:SNIFF_BYTES]))
    return found


def strip_image_metadata(data: bytes, fmt: AttachmentFormat) -> bytes:
    """The picture alone, re-encoded: EXIF (a camera's GPS position, an owner's name) and PNG
    text chunks dropped, for de-identified readers."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        pixels = image.copy()
    out = io.BytesIO()
    if fmt is AttachmentFormat.JPEG:
        pixels.convert("RGB").save(out, "JPEG", quality=92)
    else:
        pixels.save(out, "PNG")
    return out.getvalue()
