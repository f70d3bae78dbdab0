"""Attachments under a consultation: upload (multipart, streamed, size-capped, its kind told
from its bytes), list, metadata, download, and for DICOM its metadata and its image as PNG.
Every action is checked by rooms/attachments.py and audited there; files are addressed by id
and their paths never leave the server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from pydantic import ValidationError

from media.sealed import SealedReader, SealError
from rooms.attachments import (
    AttachmentRead,
    AttachmentService,
    NewAttachment,
    new_attachment_id,
    stored_path,
)
from rooms.errors import Conflict, NotFound
from rooms.model import AttachmentFormat, AttachmentId, ConsultationId
from rooms.outcome import Outcome
from rooms.text import reject_control_characters_or_line_breaks
from server import dicom
from server.api.attachment_schemas import (
    AttachmentForm,
    AttachmentList,
    AttachmentOut,
    DicomOut,
    role_table,
)
from server.api.framework import Call, Endpoint, Upload
from server.api.problems import BadRequest, problem_response, validation_problem
from server.api.recording_routes import send_sealed
from server.attachment_files import (
    ACCEPTED,
    AttachmentFiles,
    TooLarge,
    Unsupported,
    WrittenFile,
    strip_image_metadata,
)

log = logging.getLogger(__name__)

PREFIX = "/api/v1/consultations/{consultation_id}/attachments"
ONE = PREFIX + "/{attachment_id}"
# A text field of the form is short; more is not a field but a mistake.
_MAX_FIELD_BYTES = 4096
_MAX_PARTS = 8
_CHUNK = 64 * 1024
_TEXT_FIELDS = frozenset(AttachmentForm.model_fields)
_MAX_ID = 64

Announce = Callable[[Outcome], Awaitable[None]]


class AttachmentDamaged(Conflict):
    """The sealed file does not read back as it was uploaded."""

    code = "attachment_damaged"


class NotRenderable(Conflict):
    """A file the server cannot show as an image: DICOM it cannot make a PNG of, a picture it
    cannot re-encode without its metadata (for a trainee)."""

    code = "attachment_not_renderable"


class AttachmentRoutes:
    def __init__(
        self,
        service: AttachmentService,
        files: AttachmentFiles,
        max_bytes: int,
        announce: Announce | None = None,
    ) -> None:
        self._service = service
        self._files = files
        self.max_bytes = max_bytes
        self._announce = announce

    def endpoints(self) -> list[Endpoint]:
        tags = ("attachments",)
        limits = (
            f"Files up to {self.max_bytes} bytes; {ACCEPTED}, told from the file's first "
            "bytes (never its name or declared type).\n\n" + role_table()
        )
        return [
            Endpoint(
                "POST",
                PREFIX,
                self.add_attachment,
                "Add a file to the consultation (multipart/form-data: one `file` part; audited; "
                "announced to the room as `attachment_added` during a session)",
                AttachmentOut,
                status=201,
                tags=tags,
                errors=(400, 401, 403, 404, 409, 413, 415),
                upload=Upload(AttachmentForm, self.max_bytes, limits),
            ),
            Endpoint(
                "GET",
                PREFIX,
                self.list_attachments,
                "The consultation's attachments, oldest first (audited)",
                AttachmentList,
                tags=tags,
            ),
            Endpoint(
                "GET",
                ONE,
                self.attachment_metadata,
                "One attachment's metadata (audited)",
                AttachmentOut,
                tags=tags,
            ),
            Endpoint(
                "GET",
                f"{ONE}/content",
                self.attachment_content,
                "The file as uploaded (audited); for trainees images without their metadata, "
                "and never a DICOM file",
                None,
                tags=tags,
                errors=(400, 401, 403, 404, 409),
                binary=tuple(f.value for f in AttachmentFormat),
                ranges=False,
            ),
            Endpoint(
                "GET",
                f"{ONE}/dicom",
                self.dicom_metadata,
                "A DICOM attachment's metadata (audited); for trainees without patient identifiers",
                DicomOut,
                tags=tags,
                errors=(400, 401, 403, 404, 409),
            ),
            Endpoint(
                "GET",
                f"{ONE}/image.png",
                self.dicom_image,
                "A DICOM attachment's first frame as PNG (uncompressed DICOM; audited)",
                None,
                tags=tags,
                errors=(400, 401, 403, 404, 409),
                binary=("image/png",),
                ranges=False,
            ),
        ]

    # -- upload -----------------------------------------------------------------------------

    async def add_attachment(self, call: Call[None, None]) -> AttachmentOut | web.StreamResponse:
        cid = _cid(call)
        if not self._files.available:
            raise Conflict("attachments cannot be stored here: no recording key is configured")
        # Refused before a byte of the file is read.
        await self._service.check_may_add(call.ctx, cid)
        request = call.request
        attachment_id = new_attachment_id()
        try:
            written, filename, fields = await self._read_form(request, cid, attachment_id)
        except TooLarge as exc:
            return _closing(
                problem_response(
                    413,
                    f"the file is larger than the limit of {exc.limit} bytes "
                    f"({exc.limit / (1024 * 1024):g} MiB)",
                    request,
                    code="attachment_too_large",
                )
            )
        except Unsupported as exc:
            return _unsupported(request, f"it is {exc.detected}; accepted are {ACCEPTED}")
        except UnsupportedUpload as exc:
            return _unsupported(request, str(exc))
        if written.format is AttachmentFormat.DICOM:
            try:
                await asyncio.to_thread(dicom.check, await self._files.read_written(written))
            except dicom.DicomUnreadable as exc:
                await self._files.discard(written)
                return _unsupported(
                    request, f"it has the DICOM marker (DICM at byte 128) but is not DICOM: {exc}"
                )
        try:
            await self._files.place(written)
            added = await self._service.add(
                call.ctx,
                cid,
                NewAttachment(
                    id=attachment_id,
                    kind=fields.kind,
                    format=written.format,
                    size_bytes=written.size_bytes,
                    sha256=written.sha256,
                    filename=filename,
                    description=fields.description,
                    taken_at=fields.taken_at,
                    track=fields.track,
                ),
            )
        except BaseException:
            await self._files.discard(written)
            raise
        if self._announce is not None and added.outcome.announcements:
            await self._announce(added.outcome)
        return AttachmentOut.of(added.attachment)

    async def _read_form(
        self, request: web.Request, cid: ConsultationId, attachment_id: AttachmentId
    ) -> tuple[WrittenFile, str | None, AttachmentForm]:
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError, KeyError):
            raise UnsupportedUpload(
                "an upload is multipart/form-data (with its boundary), holding one `file` part"
            ) from None
        written: WrittenFile | None = None
        filename: str | None = None
        texts: dict[str, str] = {}
        try:
            for _ in range(_MAX_PARTS + 1):
                part = await _next_part(reader)
                if part is None:
                    break
                if not isinstance(part, BodyPartReader):
                    raise BadRequest("nested multipart parts are not accepted")
                if part.headers.get(hdrs.CONTENT_TRANSFER_ENCODING) or part.headers.get(
                    hdrs.CONTENT_ENCODING
                ):
                    raise BadRequest("parts are sent as they are, without a transfer encoding")
                name = part.name
                if name == "file":
                    if written is not None:
                        raise BadRequest("the form holds more than one `file` part: send one")
                    filename = _clean_filename(part.filename)
                    written = await self._files.write(
                        stored_path(cid, attachment_id), _chunks(part), self.max_bytes
                    )
                elif name in _TEXT_FIELDS:
                    if name in texts:
                        raise BadRequest(f"the form field {name!r} is given more than once")
                    texts[name] = await _text(part, name)
                else:
                    shown = (name or "")[:40].encode("ascii", "backslashreplace").decode()
                    raise BadRequest(
                        f"unknown form field {shown!r}: the form takes `file` and "
                        f"{', '.join(sorted(_TEXT_FIELDS))}"
                    )
            else:
                raise BadRequest(f"the form has more than {_MAX_PARTS} parts")
            if written is None:
                raise BadRequest("the form has no `file` part: send the file as `file`")
            try:
                fields = AttachmentForm.model_validate(texts)
            except ValidationError as exc:
                raise validation_problem(exc, "form") from None
        except BaseException:
            if written is not None:
                await self._files.discard(written)
            raise
        return written, filename, fields

    # -- reading ----------------------------------------------------------------------------

    async def list_attachments(self, call: Call[None, None]) -> AttachmentList:
        found = await self._service.list(call.ctx, _cid(call))
        return AttachmentList(items=[AttachmentOut.of(r.attachment, r.deidentified) for r in found])

    async def attachment_metadata(self, call: Call[None, None]) -> AttachmentOut:
        read = await self._open(call, "metadata")
        return AttachmentOut.of(read.attachment, read.deidentified)

    async def attachment_content(self, call: Call[None, None]) -> web.StreamResponse:
        read = await self._open(call, "content")
        fmt = read.attachment.format
        headers = {
            hdrs.CONTENT_TYPE: fmt.value,
            hdrs.CONTENT_DISPOSITION: f'attachment; filename="{read.attachment.id}{_SUFFIX[fmt]}"',
            "X-Content-Type-Options": "nosniff",
        }
        if not read.deidentified:
            # As uploaded, decrypted a step at a time, the whole checked against its SHA-256
            # before its last bytes go out (as a recording's).
            reader = await self._reader(read)
            try:
                return await send_sealed(
                    call.request, reader, headers, None, read.attachment.sha256, ranges=False
                )
            finally:
                reader.close()
        data = await self._bytes(read)
        try:
            data = await asyncio.to_thread(strip_image_metadata, data, fmt)
        except Exception as exc:
            # Pillow refuses what it cannot decode or what is too large to (a bomb).
            raise NotRenderable(
                f"attachment {read.attachment.id} cannot be shown without its metadata: "
                f"{type(exc).__name__}"
            ) from None
        return web.Response(body=data, headers=headers)

    async def dicom_metadata(self, call: Call[None, None]) -> DicomOut:
        read = await self._open(call, "dicom")
        data = await self._dicom_bytes(read)
        try:
            elements = await asyncio.to_thread(dicom.metadata, data, deidentified=read.deidentified)
        except dicom.DicomUnreadable as exc:
            raise AttachmentDamaged(f"attachment {read.attachment.id}: {exc}") from None
        return DicomOut(
            attachment=read.attachment.id, deidentified=read.deidentified, elements=elements
        )

    async def dicom_image(self, call: Call[None, None]) -> web.StreamResponse:
        read = await self._open(call, "image")
        data = await self._dicom_bytes(read)
        try:
            png = await asyncio.to_thread(dicom.render_png, data)
        except (dicom.NotRenderable, dicom.DicomUnreadable) as exc:
            raise NotRenderable(
                f"attachment {read.attachment.id} cannot be shown as PNG: {exc}"
            ) from None
        return web.Response(body=png, content_type="image/png")

    async def _open(self, call: Call[None, None], use: str) -> AttachmentRead:
        raw = call.path("attachment_id")
        if len(raw) > _MAX_ID or not raw.isascii():
            raise NotFound(f"no attachment with that id in consultation {_cid(call)}")
        return await self._service.open(call.ctx, _cid(call), AttachmentId(raw), use)

    async def _dicom_bytes(self, read: AttachmentRead) -> bytes:
        if read.attachment.format is not AttachmentFormat.DICOM:
            raise Conflict(
                f"attachment {read.attachment.id} is {read.attachment.format.value}, not DICOM"
            )
        return await self._bytes(read)

    async def _reader(self, read: AttachmentRead) -> SealedReader:
        if not self._files.available:
            raise Conflict("attachments cannot be read here: no recording key is configured")
        assert read.path is not None  # set by open()
        try:
            return await asyncio.to_thread(self._files.open, read.path)
        except FileNotFoundError:
            raise NotFound(f"the file of attachment {read.attachment.id} is gone") from None
        except (SealError, ValueError) as exc:
            raise self._damaged(read, exc) from None

    def _damaged(self, read: AttachmentRead, exc: Exception) -> AttachmentDamaged:
        log.error("attachment %s cannot be read: %s", read.attachment.id, exc)
        return AttachmentDamaged(
            f"attachment {read.attachment.id} does not read back as it was uploaded "
            "(altered, truncated, or sealed with a key that is not configured)"
        )

    async def _bytes(self, read: AttachmentRead) -> bytes:
        if not self._files.available:
            raise Conflict("attachments cannot be read here: no recording key is configured")
        assert read.path is not None  # set by open()
        try:
            return await asyncio.to_thread(self._files.read_all, read.path, read.attachment.sha256)
        except FileNotFoundError:
            raise NotFound(f"the file of attachment {read.attachment.id} is gone") from None
        except (SealError, ValueError) as exc:
            raise self._damaged(read, exc) from None


class UnsupportedUpload(Exception):
    """A body that is no multipart form (415)."""


def _unsupported(request: web.Request, detail: str) -> web.Response:
    return _closing(
        problem_response(415, f"unsupported file: {detail}", request, code="unsupported_attachment")
    )


_SUFFIX = {
    AttachmentFormat.JPEG: ".jpg",
    AttachmentFormat.PNG: ".png",
    AttachmentFormat.PDF: ".pdf",
    AttachmentFormat.DICOM: ".dcm",
}


def _cid(call: Call[Any, Any]) -> ConsultationId:
    return ConsultationId(call.path("consultation_id"))


async def _next_part(reader: MultipartReader) -> Any:
    try:
        return await reader.next()
    except (ValueError, AssertionError) as exc:
        raise _malformed(exc) from None


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        try:
            chunk = await part.read_chunk(_CHUNK)
        except (ValueError, AssertionError) as exc:
            raise _malformed(exc) from None
        if not chunk:
            return
        yield chunk


def _malformed(exc: BaseException) -> BadRequest:
    if "EOF" in str(exc):
        return BadRequest(
            "the multipart body ends before its closing boundary (cut short, or the "
            "boundary in Content-Type is not the one in the body)"
        )
    return BadRequest(f"the multipart body is malformed: {_reason(exc)}")


async def _text(part: BodyPartReader, name: str) -> str:
    data = b""
    while True:
        try:
            chunk = await part.read_chunk(_MAX_FIELD_BYTES)
        except (ValueError, AssertionError) as exc:
            raise _malformed(exc) from None
        if not chunk:
            break
        data += chunk
        if len(data) > _MAX_FIELD_BYTES:
            raise BadRequest(f"the form field {name!r} is longer than {_MAX_FIELD_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"the form field {name!r} is not UTF-8 text") from None


def _clean_filename(name: str | None) -> str | None:
    """The uploader's name for the file, for people to read: its last path component, one
    line of at most 200 characters; anything else is dropped, never an error."""
    if not name:
        return None
    # Some clients (aiohttp's) percent-encode a name that is not ASCII; browsers send UTF-8.
    base = unquote(name).replace("\\", "/").rsplit("/", 1)[-1].strip()[:200]
    try:
        reject_control_characters_or_line_breaks(base)
    except ValueError:
        return None
    return base or None


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120].encode("ascii", "backslashreplace").decode()


def _closing(response: web.Response) -> web.Response:
    # What is left of the body is not read: the connection ends with this answer.
    response.force_close()
    return response
