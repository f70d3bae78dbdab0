"""Every error leaves as application/problem+json (RFC 9457), naming what was wrong."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web
from pydantic import ValidationError

from rooms.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound
from server.api.schemas import Problem, ProblemField
from server.auth import AuthError

log = logging.getLogger(__name__)

PROBLEM_TYPE = "application/problem+json"

_DOMAIN_STATUS: list[tuple[type[DomainError], int]] = [
    (NotFound, 404),
    (Forbidden, 403),
    (Conflict, 409),
    (InvalidInput, 400),
]


# The `code` of problems that do not come from a domain error.
_STATUS_CODE = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    500: "internal",
}


class BadRequest(Exception):
    """A request that could not be read (bad JSON, wrong query values)."""

    def __init__(self, detail: str, errors: list[ProblemField] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors


def problem_response(
    status: int,
    detail: str,
    request: web.Request,
    errors: list[ProblemField] | None = None,
    code: str | None = None,
) -> web.Response:
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request.path,
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
async def problem_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        return problem_response(400, str(exc), request, exc.errors)
    except AuthError as exc:
        response = problem_response(exc.status, exc.message, request)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="telemed"'
        return response
    except DomainError as exc:
        status = next((s for kind, s in _DOMAIN_STATUS if isinstance(exc, kind)), 400)
        return problem_response(status, str(exc), request, code=exc.code)
    except web.HTTPRequestEntityTooLarge as exc:
        return problem_response(413, f"request body too large: {exc.text}", request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return problem_response(exc.status, detail or exc.reason, request)
    except Exception:
        # Logged with the request id; the client learns nothing of the internals.
        log.exception("unhandled error")
        return problem_response(500, "internal error; the request id is in the server log", request)
