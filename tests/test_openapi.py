"""The OpenAPI document is kept true: it is valid OpenAPI 3.1, it lists exactly the routes the
app serves, and what the server really answers validates against it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import pytest
from api_helpers import (
    ADMIN,
    COUNTY,
    OUTSIDER,
    SPECIALIST,
    VILLAGE,
    Api,
    Reply,
    consultation_body,
    member_body,
    opinion_body,
)
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from rooms.consultations import RequestContext
from rooms.model import (
    CloseReason,
    Consent,
    ConsentKind,
    ConsultationId,
    ParticipantId,
    Participation,
    Recording,
    RecordingId,
    SessionId,
    UserId,
)
from rooms.roles import Role
from server.api.routes import build_api
from server.app import CONFIG, NAMESPACE, SERVICE, STORE, TOKENS

DOC = "/api/v1/openapi.json"
# Served but not documented: the document does not describe itself. (HEAD, which aiohttp adds
# to every GET, and socket.io's own protocol under /socket.io/ are left out of the comparison.)
UNDOCUMENTED = {("GET", DOC)}
HEALTH = {"/healthz", "/readyz"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
async def doc(api: Api) -> dict[str, Any]:
    reply = await api.get(DOC, None)
    assert (reply.status, reply.content_type) == (200, "application/json")
    body: dict[str, Any] = reply.body
    return body


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                yield method.upper(), path, op


def served_routes(api: Api) -> set[tuple[str, str]]:
    """The app's routes under /api/v1 and the health checks."""
    routes = set()
    for route in api.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method != "HEAD" and (path.startswith("/api/v1/") or path in HEALTH):
            routes.add((route.method, path))
    return routes


async def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"] == {"title": "telemed", "version": version("telemed")}
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    operation_ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(operation_ids) == len(set(operation_ids)), operation_ids


async def test_the_document_lists_exactly_the_served_routes(api: Api, doc: dict[str, Any]) -> None:
    documented = {(method, path) for method, path, _ in operations(doc)}
    served = served_routes(api) - UNDOCUMENTED
    assert ("POST", "/api/v1/consultations") in served  # the filter sees the API
    assert served == documented


async def test_every_api_operation_is_described_completely(api: Api, doc: dict[str, Any]) -> None:
    # The endpoint declarations the document is generated from, straight from the routes.
    async def no_auth(_: Any) -> RequestContext:
        raise AssertionError("not called")

    endpoints = build_api(
        api.app[SERVICE], api.app[TOKENS], 60, no_auth, api.app[NAMESPACE].media
    ).endpoints
    assert {(e.method, e.path) for e in endpoints} == {
        (m, p) for m, p, _ in operations(doc) if p.startswith("/api/v1")
    }
    schemas = doc["components"]["schemas"]
    for e in endpoints:
        op = doc["paths"][e.path][e.method.lower()]
        where = f"{e.method} {e.path}"
        # Only redeeming an invite code needs no token (it is how an invitee gets one).
        assert op["security"] == ([] if e.public else [{"bearer": []}]), where
        assert e.public == (e.path == "/api/v1/invites/redeem"), where
        assert [p["name"] for p in op["parameters"] if p["in"] == "path"] == re.findall(
            r"{(\w+)}", e.path
        ), where
        if e.upload is not None:
            form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
            assert form["required"] == ["file"], where
            assert form["properties"]["file"]["format"] == "binary", where
            assert op["requestBody"]["x-max-file-bytes"] == e.upload.max_bytes, where
            assert {"413", "415"} <= set(op["responses"]), where
            assert "| `trainee` |" in op["description"], where
        elif e.body is None:
            assert "requestBody" not in op, where
        else:
            body = op["requestBody"]
            assert body["required"] is True, where
            ref = body["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[-1].startswith(e.body.__name__), where
            assert ref.rsplit("/", 1)[-1] in schemas, where
            assert "413" in op["responses"], where
            unsupported = op["responses"]["415"]["content"]["application/problem+json"]
            assert unsupported["schema"]["$ref"].endswith("/Problem"), where
        if e.query is not None:
            documented = {p["name"] for p in op["parameters"] if p["in"] == "query"}
            assert documented == set(e.query.model_fields), where
        assert str(e.status) in op["responses"], where
        for status in ("400", "404", "410", "429") if e.public else ("400", "401", "403"):
            problem = op["responses"][status]["content"]["application/problem+json"]
            assert problem["schema"]["$ref"].endswith("/Problem"), where
    # Every POST takes a JSON body (actions without input take `{}`), or a file upload.
    assert all(e.body is not None or e.upload for e in endpoints if e.method == "POST")


# --- real replies validate against the document -----------------------------------------------


class Checker:
    """Validates each reply against the document's schema for its operation and status."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.checked: list[tuple[str, str, int]] = []
        self._templates: list[tuple[re.Pattern[str], str]] = [
            (re.compile("^" + re.sub(r"{\w+}", r"[^/]+", path) + "$"), path)
            for path in doc["paths"]
        ]

    def template(self, path: str) -> str:
        bare = path.split("?", 1)[0]
        # Literal paths win over templated ones (…/opinions/sign vs …/invites/{jti}).
        matches = sorted((t for rx, t in self._templates if rx.match(bare)), key=lambda t: "{" in t)
        assert matches, f"{path} is not in the document"
        return matches[0]

    def schema(self, ref_holder: dict[str, Any]) -> Draft202012Validator:
        schema = {**ref_holder, "components": self.doc["components"]}
        return Draft202012Validator(schema)

    def check(self, method: str, path: str, reply: Reply) -> Reply:
        template = self.template(path)
        op = self.doc["paths"][template][method.lower()]
        responses = op["responses"]
        assert str(reply.status) in responses, (method, template, reply)
        response = responses[str(reply.status)]
        if "content" not in response:
            assert reply.raw == b"", (method, template, reply)
        else:
            assert reply.content_type in response["content"], (method, template, reply.headers)
            validator = self.schema(response["content"][reply.content_type]["schema"])
            errors = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(reply.body)
            ]
            assert errors == [], (method, template, errors)
        self.checked.append((method, template, reply.status))
        return reply

    def request_schema(self, method: str, template: str) -> Draft202012Validator:
        op = self.doc["paths"][template][method.lower()]
        return self.schema(op["requestBody"]["content"]["application/json"]["schema"])


class CheckedApi:
    """An Api whose every reply is checked against the document."""

    def __init__(self, api: Api, checker: Checker) -> None:
        self.api = api
        self.checker = checker

    async def request(self, method: str, path: str, who: Any, **kwargs: Any) -> Reply:
        reply = await self.api.request(method, path, who, **kwargs)
        return self.checker.check(method, path, reply)

    async def post(self, path: str, who: Any, body: Any) -> Reply:
        return await self.request("POST", path, who, json_body=body)

    async def get(self, path: str, who: Any, **kwargs: Any) -> Reply:
        return await self.request("GET", path, who, **kwargs)


async def test_real_replies_validate_against_the_document(api: Api, doc: dict[str, Any]) -> None:
    checker = Checker(doc)
    http = CheckedApi(api, checker)
    base = "/api/v1/consultations"

    created = await http.post(base, VILLAGE, consultation_body())
    assert created.status == 201
    cid = created.body["id"]
    one = f"{base}/{cid}"
    assert (await http.get(base, VILLAGE, params={"status": "requested"})).status == 200
    assert (await http.get(one, COUNTY)).status == 200
    assert (await http.post(f"{one}/accept", COUNTY, {})).status == 200
    scheduled = await http.post(
        f"{one}/schedule", COUNTY, {"scheduled_time": "2025-03-02T10:00:00+08:00"}
    )
    assert scheduled.status == 200
    assert (await http.post(f"{one}/team", VILLAGE, member_body(OUTSIDER))).status == 201
    invite = await http.post(f"{one}/invites", VILLAGE, {"role": "guardian", "name": "刘女儿"})
    assert invite.status == 201
    revoked = await http.request("DELETE", f"{one}/invites/{invite.body['jti']}", VILLAGE)
    assert revoked.status == 204

    session = await api.start_session(cid)
    await _fill_the_record(api, cid, session.id)
    assert (await http.post(f"{one}/opinions", COUNTY, opinion_body())).status == 201
    for signer in (COUNTY, SPECIALIST):
        assert (await http.post(f"{one}/opinions/sign", signer, {"version": 1})).status == 200
    await api.end_session(cid, session)
    assert (await http.post(f"{one}/decision", VILLAGE, {"decision": "转诊"})).status == 201

    record = await http.get(f"{one}/record", VILLAGE)
    assert record.status == 200
    for part in ("sessions", "participations", "events", "consents", "recordings", "audit"):
        assert record.body[part], part  # every part of the record was validated non-empty
    fhir = await http.get(f"{one}/fhir", VILLAGE)
    assert (fhir.status, fhir.content_type) == (200, "application/fhir+json")
    assert (await http.get("/api/v1/audit", ADMIN, params={"consultation": cid})).status == 200
    for path in ("/healthz", "/readyz"):
        assert (await http.get(path, None)).status == 200

    # Errors, each a documented problem.
    assert (await http.post(base, VILLAGE, {"specialty": 1})).status == 400
    assert (await http.get(base, VILLAGE, params={"limit": "0"})).status == 400
    assert (await http.get(one, None)).status == 401
    assert (await http.get(f"{one}/record", ADMIN)).status == 403
    assert (await http.get(f"{base}/c_nope", VILLAGE)).status == 404
    assert (await http.post(f"{one}/accept", COUNTY, {})).status == 409
    big = consultation_body(case_summary="x" * api.app[CONFIG].max_body_bytes)
    assert (await http.post(base, VILLAGE, big)).status == 413

    statuses = {status for _, _, status in checker.checked}
    assert statuses == {200, 201, 204, 400, 401, 403, 404, 409, 413}


async def _fill_the_record(api: Api, cid: str, session_id: str) -> None:
    """Parts of the record only the live room writes; put one of each in via the store."""
    now = datetime.now(UTC)
    sid = SessionId(session_id)
    async with api.app[STORE].transaction() as tx:
        await tx.add_participation(
            Participation(
                sid,
                ParticipantId("p1"),
                VILLAGE.user_id,
                VILLAGE.name,
                Role.VILLAGE_DOCTOR,
                "web",
                now,
                None,
                None,
            )
        )
        await tx.close_participation(sid, ParticipantId("p1"), now, CloseReason.LEFT)
        await tx.add_consent(
            Consent(
                ConsultationId(cid),
                sid,
                ConsentKind.RECORDING,
                True,
                UserId("res-0001"),
                "本人",
                now,
            )
        )
        await tx.add_recording(
            Recording(
                RecordingId("r1"),
                sid,
                "composite",
                "composite",
                "video/webm",
                "0" * 64,
                1.5,
                10,
                "complete",
                now,
                now,
            )
        )


async def test_request_schemas_agree_with_the_server(doc: dict[str, Any]) -> None:
    checker = Checker(doc)
    create = checker.request_schema("POST", "/api/v1/consultations")
    assert create.is_valid(consultation_body())
    assert not create.is_valid(consultation_body(colour="red"))  # extra fields are refused
    assert not create.is_valid({k: v for k, v in consultation_body().items() if k != "resident"})
    sign = checker.request_schema("POST", "/api/v1/consultations/{consultation_id}/opinions/sign")
    assert sign.is_valid({"version": 1})
    assert not sign.is_valid({"version": 0})
    # Strict types, as the server reads them: no coerced number or time, times in the window.
    resident = consultation_body()["resident"]
    assert not create.is_valid(consultation_body(resident={**resident, "age": "72"}))
    assert not create.is_valid(consultation_body(preferred_time=12345))
    for when in ("0001-01-01T00:00:00+08:00", "9999-12-31T23:59:59-08:00", "2025-03-01T09:00"):
        assert not create.is_valid(consultation_body(preferred_time=when)), when
    assert create.is_valid(consultation_body(preferred_time="2200-12-31T23:59:59-12:00"))
    assert not sign.is_valid({"version": "1"})
    schedule = "/api/v1/consultations/{consultation_id}/schedule"
    assert not checker.request_schema("POST", schedule).is_valid({"scheduled_time": 1})
    accept = checker.request_schema("POST", "/api/v1/consultations/{consultation_id}/accept")
    assert accept.is_valid({})
    assert not accept.is_valid({"note": "x"})


async def test_the_checker_catches_a_reply_that_breaks_the_document(
    api: Api, doc: dict[str, Any]
) -> None:
    # Guards the validation above against passing vacuously.
    created = await api.post("/api/v1/consultations", VILLAGE, consultation_body())
    checker = Checker(doc)
    checker.check("POST", "/api/v1/consultations", created)
    broken = {**created.body, "status": "pending"}
    del broken["team"]
    bad = Reply(created.status, created.headers, created.raw, broken)
    with pytest.raises(AssertionError) as caught:
        checker.check("POST", "/api/v1/consultations", bad)
    assert "status: 'pending' is not one of" in str(caught.value)
    assert "'team' is a required property" in str(caught.value)
    undocumented = Reply(418, created.headers, created.raw, created.body)
    with pytest.raises(AssertionError):
        checker.check("POST", "/api/v1/consultations", undocumented)
