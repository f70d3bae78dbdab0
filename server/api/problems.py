"""Every error leaves as application/problem+json (RFC 9457), naming what was wrong: those of
the application, those aiohttp meets reading a request body, and those of aiohttp's own parser,
answered before any handler runs. None of them quotes the request back: an error about a header
must not echo a token in the body or the log."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

from aiohttp import hdrs, web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from pydantic import ValidationError

from rooms.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Gone,
    InvalidInput,
    NotFound,
    Unavailable,
)
from server.api.schemas import Problem, ProblemField
from server.auth import AuthError

log = logging.getLogger(__name__)

PROBLEM_TYPE = "application/problem+json"

_DOMAIN_STATUS: list[tuple[type[DomainError], int]] = [
    (NotFound, 404),
    (Forbidden, 403),
    (Conflict, 409),
    (Gone, 410),
    (InvalidInput, 400),
    (Unavailable, 503),
]
# What a 503 asks the client to wait before trying again, in seconds.
RETRY_AFTER_S = 2


# The `code` of problems that do not come from a domain error.
_STATUS_CODE = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_content_encoding",
    416: "range_not_satisfiable",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}

# Every response says only this much about the software (aiohttp's default names the Python
# and aiohttp versions).
SERVER_NAME = "telemed"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """A request that could not be read (bad JSON, wrong query values)."""

    def __init__(self, detail: str, errors: list[ProblemField] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors


def problem_response(
    status: int,
    detail: str,
    request: web.Request | None,
    errors: list[ProblemField] | None = None,
    code: str | None = None,
) -> web.Response:
    """`request` None: a request aiohttp could not parse, whose path is not known."""
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request.path if request is not None else None,
        code=code or _STATUS_CODE.get(status, "error"),
        errors=errors,
    )
    return web.Response(
        status=status,
        body=body.model_dump_json(exclude_none=True),
        content_type=PROBLEM_TYPE,
    )


def validation_problem(exc: ValidationError, where: str) -> BadRequest:
    fields = [
        ProblemField(
            path=".".join(str(p) for p in err["loc"]) or where,
            message=err["msg"],
        )
        for err in exc.errors(include_url=False)
    ]
    summary = "; ".join(f"{f.path}: {f.message}" for f in fields[:5])
    return BadRequest(f"invalid {where}: {summary}", fields)


@web.middleware
async def problem_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (HttpProcessingError, RequestPayloadError) as exc:
        # Raised while reading the body: it is not in its Content-Encoding, its chunks are
        # malformed, or it ended before what Content-Length promised.
        return _unreadable_body(request, exc)
    except ConnectionResetError as exc:
        # The client left while its body was read; the same error from a database connection
        # is ours, and a 500.
        if request.transport is None or request.transport.is_closing():
            return _unreadable_body(request, exc)
        return _internal_error(request)
    except BadRequest as exc:
        return problem_response(400, str(exc), request, exc.errors)
    except AuthError as exc:
        response = problem_response(exc.status, exc.message, request)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="telemed"'
        return response
    except DomainError as exc:
        status = next((s for kind, s in _DOMAIN_STATUS if isinstance(exc, kind)), 400)
        response = problem_response(status, str(exc), request, code=exc.code)
        if status == 503:
            response.headers[hdrs.RETRY_AFTER] = str(RETRY_AFTER_S)
        return response
    except web.HTTPRequestEntityTooLarge as exc:
        return problem_response(413, f"request body too large: {exc.text}", request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return problem_response(exc.status, detail or exc.reason, request)
    except Exception:
        return _internal_error(request)


def _unreadable_body(request: web.Request, exc: BaseException) -> web.Response:
    code, detail = describe_request_error(exc)
    log.info("request body refused: %s", detail)
    response = problem_response(400, detail, request, code=code)
    # What follows the body on this connection cannot be parsed: tell the client it ends here.
    response.force_close()
    return response


def _internal_error(request: web.Request) -> web.Response:
    """Called inside an except block: the traceback is logged with the request id; the client
    learns nothing of the internals."""
    log.exception("unhandled error")
    return problem_response(500, "internal error; the request id is in the server log", request)


def request_body_middleware(
    max_bytes: int, prefix: str = "/api/", larger: Mapping[str, int] | None = None
) -> Middleware:
    """Refuse, before reading it, a body that cannot be read: 413 when Content-Length already
    says it is too large (aiohttp would only notice after reading max_bytes of it), 415 for a
    Content-Encoding aiohttp does not decode (it would hand the coded bytes on as they are).
    Only under `prefix`, the routes that read bodies against this limit; socket.io polling has
    its own, engine.io's frame limit. `larger` gives routes (by their path pattern) that
    stream a bigger body themselves a limit of their own (an attachment's upload)."""
    own_limits = dict(larger or {})

    @web.middleware
    async def request_body(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if not request.path.startswith(prefix):
            return await handler(request)
        resource = request.match_info.route.resource
        limit = own_limits.get(resource.canonical, max_bytes) if resource else max_bytes
        length = request.content_length
        if length is not None and length > limit:
            detail = f"request body too large: Content-Length {length}, the limit is {limit}"
            response = problem_response(413, detail, request)
            # Do not wait for the rest of a body that will not be read.
            response.force_close()
            return response
        encoding = request.headers.get(hdrs.CONTENT_ENCODING)
        if encoding is not None and encoding.strip().lower() not in _DECODED_ENCODINGS:
            detail = "unsupported Content-Encoding: send gzip, deflate or an unencoded body"
            response = problem_response(415, detail, request)
            response.force_close()
            return response
        return await handler(request)

    return request_body


# What aiohttp's parser decodes (br and zstd only with their libraries; without, it refuses
# the body, which answers 400 bad_content_encoding).
_DECODED_ENCODINGS = frozenset({"identity", "gzip", "deflate", "br", "zstd"})


def describe_request_error(exc: BaseException | None) -> tuple[str, str]:
    """The code and detail of a request aiohttp could not read, naming the kind of error only:
    aiohttp's own messages quote the offending bytes (a whole Authorization header, say)."""
    if isinstance(exc, RequestPayloadError) and exc.__cause__ is not None:
        exc = exc.__cause__  # aiohttp wraps the parser's error for the body's reader
    if isinstance(exc, ContentEncodingError):
        return "bad_content_encoding", (
            "the request body could not be decoded as its Content-Encoding says "
            "(gzip and deflate are accepted)"
        )
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        size = f" than {limit} bytes" if isinstance(limit, int) else ""
        return (
            "malformed_request",
            f"malformed HTTP request: a request line or header is longer{size}",
        )
    if isinstance(exc, RequestPayloadError | ConnectionResetError):
        return "incomplete_body", "the request body ended before its declared length"
    if isinstance(exc, HttpProcessingError):
        phrase = _SAFE_PHRASE.match(exc.message)
        what = phrase.group().strip() if phrase else "it could not be parsed"
        return "malformed_request", f"malformed HTTP request: {what}"
    return "malformed_request", "malformed HTTP request"


# The leading words of a parser message ("Invalid header value char", "Bad status line"):
# they stop before the quote, colon or digits where aiohttp appends the request's bytes.
_SAFE_PHRASE = re.compile(r"[A-Za-z][A-Za-z ,()-]{0,78}[A-Za-z)]")


def install_protocol_errors() -> None:
    """Route aiohttp's own error responses through the problem format, and keep its log quiet
    about bad requests.

    aiohttp answers requests its parser refuses, and handler failures outside the middleware,
    in RequestHandler.handle_error: a text/plain body and an ERROR log line with a traceback,
    both quoting the bytes it refused, under its own Server header. It has no hook for that
    response (aio-libs/aiohttp#9882, #3140), so the method is replaced. The replacement and the
    filter are the same for every app, so installing them again changes nothing."""
    RequestHandler.handle_error = _handle_protocol_error  # type: ignore[method-assign]
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientErrorsWithoutTraceback) for f in server_log.filters):
        server_log.addFilter(_ClientErrorsWithoutTraceback())


class _ClientErrorsWithoutTraceback(logging.Filter):
    """aiohttp.server logs "Unhandled exception" with a traceback when, after the response, it
    drains a request body that failed to decode: that is the client's error, already answered
    with a 400. One line instead, naming only the kind of error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | RequestPayloadError | ConnectionError):
            record.msg, record.args = "after the response: %s", (describe_request_error(exc)[1],)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _handle_protocol_error(
    self: RequestHandler,
    request: BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    # As aiohttp's own: once bytes are out, the connection can only be dropped.
    if request.writer.output_size > 0:
        raise ConnectionError("response already started; cannot send an error instead")
    if status >= 500:
        if exc is not None:
            log.error("unhandled error outside the application", exc_info=exc)
        code = _STATUS_CODE.get(status, "error")
        detail = HTTPStatus(status).description
    else:
        code, detail = describe_request_error(exc)
        log.warning("refused a request from %s: %s", request.remote, detail)
    response = problem_response(status, detail, None, code=code)
    response.headers[hdrs.SERVER] = SERVER_NAME
    response.headers[hdrs.CACHE_CONTROL] = "no-store"
    response.force_close()
    return response
