"""A small declarative layer over aiohttp routes: each endpoint names its body, query and
response models, so validation, authentication and the OpenAPI document come from one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from rooms.consultations import RequestContext
from server.api.problems import BadRequest, problem_response, validation_problem
from server.api.strict_json import parse_json_object

BodyT = TypeVar("BodyT", bound=BaseModel | None)
QueryT = TypeVar("QueryT", bound=BaseModel | None)

Authenticate = Callable[[web.Request], Awaitable[RequestContext]]


@dataclass(frozen=True)
class Call(Generic[BodyT, QueryT]):
    request: web.Request
    ctx: RequestContext
    body: BodyT
    query: QueryT

    def path(self, name: str) -> str:
        return self.request.match_info[name]


# A handler answers with a model (serialised as JSON), nothing, or a response of its own (a
# file, with ranges).
Handler = Callable[[Call[Any, Any]], Awaitable[BaseModel | web.StreamResponse | None]]


@dataclass(frozen=True)
class Upload:
    """A multipart/form-data body the handler streams itself (a file): its text fields'
    model, the file's size limit and what the document says of both."""

    form: type[BaseModel]
    max_bytes: int
    description: str


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    response: type[BaseModel] | None
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    status: int = 200
    tags: tuple[str, ...] = ()
    errors: tuple[int, ...] = (400, 401, 403, 404)
    # The response's media type (a FHIR export is application/fhir+json).
    content_type: str = "application/json"
    # Instead of the API's bearer authentication (a playback link carries its own grant).
    authenticate: Authenticate | None = None
    # A binary response (a recording file): its media types, for the document.
    binary: tuple[str, ...] = ()
    # Whether a binary response answers byte ranges (206).
    ranges: bool = True
    # A body read by the handler, not by the framework.
    upload: Upload | None = None
    # Needs no credentials at all (redeeming an invite code); `authenticate` says who it is.
    public: bool = False


@dataclass
class Api:
    authenticate: Authenticate
    endpoints: list[Endpoint] = field(default_factory=list)

    def add(self, endpoint: Endpoint) -> None:
        self.endpoints.append(endpoint)

    def register(self, app: web.Application) -> None:
        for endpoint in self.endpoints:
            app.router.add_route(endpoint.method, endpoint.path, self._wrap(endpoint))

    def _wrap(self, endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            ctx = await (endpoint.authenticate or self.authenticate)(request)
            try:
                body = await _read_body(request, endpoint.body)
            except UnsupportedMediaType as exc:
                return problem_response(415, str(exc), request, code="unsupported_media_type")
            query = _read_query(request, endpoint.query)
            result = await endpoint.handler(Call(request, ctx, body, query))
            if isinstance(result, web.StreamResponse):
                return result
            if result is None:
                return web.Response(status=endpoint.status)
            return web.Response(
                status=endpoint.status,
                body=result.model_dump_json(),
                content_type=endpoint.content_type,
            )

        return handle


# Exactly what the document lists for every body (a +json type would claim other semantics).
_JSON_MEDIA_TYPE = "application/json"


class UnsupportedMediaType(Exception):
    """A body that does not say it is JSON (415)."""


async def _read_body(request: web.Request, model: type[BaseModel] | None) -> Any:
    if model is None:
        return None
    # A body that does not decode (gzip that is not gzip, a short body) raises aiohttp's
    # errors here; problem_middleware answers them by kind.
    raw = await request.read()
    if not raw.strip():
        # No body says nothing, so needs no Content-Type: it reads as `{}` (the actions that
        # take nothing are sent without one), and a model with required fields names them.
        data: dict[str, Any] = {}
    else:
        _check_content_type(request)
        data = parse_json_object(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc, "body") from None


def _check_content_type(request: web.Request) -> None:
    if "Content-Type" not in request.headers:
        raise UnsupportedMediaType("a request body needs Content-Type: application/json")
    if request.content_type != _JSON_MEDIA_TYPE:
        shown = request.content_type.encode("ascii", "backslashreplace").decode()[:100]
        raise UnsupportedMediaType(f"the request body must be application/json, not {shown!r}")
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        shown = charset.encode("ascii", "backslashreplace").decode()[:40]
        raise UnsupportedMediaType(f"a JSON body must be UTF-8, not charset {shown!r}")


def _read_query(request: web.Request, model: type[BaseModel] | None) -> Any:
    if model is None:
        return None
    params: dict[str, str] = {}
    for key in request.query:
        values = request.query.getall(key)
        if len(values) > 1:
            raise BadRequest(f"query parameter {key!r} is given more than once")
        params[key] = values[0]
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise validation_problem(exc, "query") from None
