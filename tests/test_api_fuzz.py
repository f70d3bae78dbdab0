"""Property-based fuzzing of the REST API from its own OpenAPI document (schemathesis), against a
real server on an ephemeral port: for every operation, requests that fit the document and
requests that do not, sent as several roles (and as nobody), sometimes at real consultations,
invites and recordings. Whatever comes, the answer is never a 500, its status is one the
document lists for the operation, its body matches the documented schema (problem documents
included), and a request the document says is invalid is refused with a 4xx."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import schemathesis
from aiohttp import web
from api_helpers import (
    ADMIN,
    COORDINATOR,
    COUNTY,
    OUTSIDER,
    SPECIALIST,
    VILLAGE,
    Identity,
    consultation_body,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from rooms.consultations import RequestContext
from rooms.model import ConsultationId, RecordingId, SessionId
from rooms.model import Recording as RecordingRow
from server.app import SERVICE, STORE, TOKENS, create_app
from server.config import load_config

T = TypeVar("T")

# Examples per operation and generation mode: about 25 operations x 2 modes, each a real round
# trip, keeps the test to well under a minute; set TELEMED_FUZZ_EXAMPLES for a longer hunt.
EXAMPLES = int(os.environ.get("TELEMED_FUZZ_EXAMPLES", "20"))
CALLERS: tuple[Identity | None, ...] = (
    VILLAGE,
    COUNTY,
    SPECIALIST,
    COORDINATOR,
    ADMIN,
    OUTSIDER,
    None,
)
# aiohttp's limit on the request line (its `max_line_size`), in bytes.
MAX_REQUEST_LINE = 8190
STREAMED_UPLOADS = frozenset({"/api/v1/consultations/{consultation_id}/attachments"})
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]
SCHEMA_CHECKS = [response_schema_conformance]


class LiveServer:
    """The app on its own event loop in a thread, so the synchronous HTTP client of the fuzzer
    can call it; `run` executes a coroutine on that loop (seeding the store)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner = web.AppRunner(app, handle_signals=False)
        self.url = ""

    def start(self) -> None:
        self._thread.start()

        async def start() -> str:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            host, port = self._runner.addresses[0][:2]
            return f"http://{host}:{port}"

        self.url = self.run(start)

    def run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(make(), self.loop)
        return future.result(timeout=60)

    def stop(self) -> None:
        self.run(self._runner.cleanup)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=60)
        self.loop.close()


@dataclass(frozen=True)
class Seeded:
    """Real objects the path parameters sometimes name."""

    consultations: tuple[str, ...]
    invites: tuple[str, ...]
    recordings: tuple[str, ...]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("fuzz")
    shutil.copyfile(migrated_sqlite, data_dir / "telemed.db")
    # A development config that ignores the machine's TELEMED_* environment.
    config = load_config(env={}, overrides={"dev": True, "data_dir": str(data_dir)})
    live = LiveServer(create_app(config))
    live.start()
    try:
        yield live
    finally:
        live.stop()


def token(server: LiveServer, who: Identity) -> str:
    return server.app[TOKENS].mint(user_id=who.user_id, name=who.name, role=who.role, org=who.org)


def headers(server: LiveServer, who: Identity | None) -> dict[str, str]:
    return {} if who is None else {"Authorization": f"Bearer {token(server, who)}"}


@pytest.fixture(scope="module")
def seeded(server: LiveServer) -> Seeded:
    http = requests.Session()
    base = server.url + "/api/v1/consultations"

    def post(path: str, who: Identity, body: dict[str, Any]) -> dict[str, Any]:
        reply = http.post(path, json=body, headers=headers(server, who), timeout=30)
        assert reply.status_code in (200, 201), reply.text
        answer: dict[str, Any] = reply.json()
        return answer

    requested = post(base, VILLAGE, consultation_body())["id"]
    live = post(base, VILLAGE, consultation_body())["id"]
    post(f"{base}/{live}/accept", COUNTY, {})
    post(f"{base}/{live}/schedule", COUNTY, {"scheduled_time": "2025-03-02T10:00:00+08:00"})
    invite = post(f"{base}/{live}/invites", VILLAGE, {"role": "guardian", "name": "刘女儿"})

    async def go_live_with_a_recording() -> None:
        service = server.app[SERVICE]
        session = await service.start_session(RequestContext(VILLAGE.actor()), ConsultationId(live))
        now = datetime.now(UTC)
        async with server.app[STORE].transaction() as tx:
            await tx.add_recording(
                RecordingRow(
                    RecordingId("rec-fuzz"),
                    SessionId(session.id),
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

    server.run(go_live_with_a_recording)
    return Seeded((requested, live), (invite["jti"],), ("rec-fuzz",))


@pytest.fixture(scope="module")
def schema(server: LiveServer) -> Any:
    document = requests.get(server.url + "/api/v1/openapi.json", timeout=30).json()
    # Who calls is the test's choice (a real token of one of several roles, or none), so the
    # fuzzer is not told about the bearer scheme: it would send "missing token" cases that the
    # test's own token then fills in.
    for item in document["paths"].values():
        for operation in item.values():
            operation.pop("security", None)
    # A request the document calls invalid is refused: malformed (400), too large (413), not
    # JSON (415), naming nothing that exists (404), or by nobody (401) - never acted upon.
    refused = [400, 401, 404, 413, 415]
    config = SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": refused}}}
    )
    return schemathesis.openapi.from_dict(document, config=config)


def _aim(case: Any, seeded: Seeded, draw: st.DrawFn) -> None:
    """Point path parameters at real objects about half the time."""
    real = {
        "consultation_id": seeded.consultations,
        "jti": seeded.invites,
        "recording_id": seeded.recordings,
    }
    for name in list(case.path_parameters or {}):
        if name in real and draw(st.booleans()):
            case.path_parameters[name] = draw(st.sampled_from(real[name]))


def fuzzer(
    operation: Any,
    mode: GenerationMode,
    server: LiveServer,
    seeded: Seeded,
    session: requests.Session,
    seen: set[tuple[str, int]],
) -> Callable[[], None]:
    """A hypothesis test of one operation in one generation mode."""
    # An upload is refused by who sends it before a byte of its file is read (a body of tens
    # of megabytes is not streamed in for someone who may not add it): its invalid requests
    # may meet a 403 or 409 before their invalidity is seen.
    streamed = operation.path in STREAMED_UPLOADS and not mode.is_positive
    checks = CHECKS + (
        SCHEMA_CHECKS if mode.is_positive else [] if streamed else [negative_data_rejection]
    )

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        case = data.draw(operation.as_strategy(generation_mode=mode))
        _aim(case, seeded, data.draw)
        who = data.draw(st.sampled_from(CALLERS))
        response = case.call(
            base_url=server.url, session=session, headers=headers(server, who), timeout=30
        )
        target = str(response.request.url).removeprefix(server.url)
        if len(target) > MAX_REQUEST_LINE:
            # aiohttp's parser refuses the request line before any route or middleware sees it
            # (a plain-text 400): never a 500, but not a documented problem either.
            assert response.status_code in (400, 414), (response.status_code, target[:200])
            return
        case.validate_response(response, checks=checks)
        if streamed:
            assert response.status_code in (400, 401, 403, 404, 409, 413, 415), response.text
        seen.add((operation.label, response.status_code))

    return fuzz


def test_no_request_breaks_the_document(server: LiveServer, seeded: Seeded, schema: Any) -> None:
    session = requests.Session()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20
    seen: set[tuple[str, int]] = set()
    for operation in operations:
        # What can be wrong is a body or a query; a path parameter is any string.
        wrongable = any(p.location == "query" for p in operation.iter_parameters()) or bool(
            operation.get_request_payload_content_types()
        )
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if wrongable else [])
        for mode in modes:
            fuzzer(operation, mode, server, seeded, session, seen)()
    statuses = {status for _, status in seen}
    # The fuzzer got past authentication and validation into the use cases.
    assert {200, 201, 400, 401, 403, 404} <= statuses, sorted(seen)


def test_the_checks_catch_an_undocumented_answer(server: LiveServer, schema: Any) -> None:
    # Guards the test above against passing vacuously: the same checks, on a document that
    # leaves out the 400 the server really answers, fail.
    document = copy.deepcopy(schema.raw_schema)
    responses = document["paths"]["/api/v1/consultations"]["post"]["responses"]
    del responses["400"]
    narrowed = schemathesis.openapi.from_dict(document)
    case = narrowed["/api/v1/consultations"]["POST"].Case(body={})
    response = case.call(base_url=server.url, headers=headers(server, VILLAGE), timeout=30)
    assert response.status_code == 400
    with pytest.raises(FailureGroup, match="Undocumented status code"):
        case.validate_response(response, checks=CHECKS)
