"""Helpers for tests that talk to the real HTTP server: identities, a small client wrapper that
mints tokens and parses replies, request bodies, and problem+json checks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDictProxy

from rooms.consultations import RequestContext
from rooms.model import Consultation, ConsultationId, Session, SessionId, UserId
from rooms.roles import Role
from server.app import SERVICE, TOKENS
from server.demo import ADMIN, COORDINATOR, COUNTY, SPECIALIST, TOWNSHIP, VILLAGE
from server.demo import DemoIdentity as Identity

__all__ = [
    "ADMIN",
    "COORDINATOR",
    "COUNTY",
    "OTHER_VILLAGE",
    "OUTSIDER",
    "SPECIALIST",
    "TOWNSHIP",
    "TOWNSHIP_COORDINATOR",
    "VILLAGE",
    "Api",
    "Identity",
    "Reply",
    "assert_problem",
    "consultation_body",
    "member_body",
    "one",
    "opinion_body",
]

# The demo team (server/demo.py) plus people who are on no team of theirs.
OUTSIDER = Identity(UserId("outsider-county"), "吴医生", Role.COUNTY_PHYSICIAN, "邻县人民医院")
OTHER_VILLAGE = Identity(
    UserId("other-village-doctor"), "孙村医", Role.VILLAGE_DOCTOR, "杏花村卫生室"
)
TOWNSHIP_COORDINATOR = Identity(
    UserId("township-coordinator"), "钱协调员", Role.COORDINATOR, TOWNSHIP.org
)

PROBLEM_JSON = "application/problem+json"
STANDARD_TEAM = (TOWNSHIP, COUNTY, SPECIALIST)


def one(cid: str, tail: str = "") -> str:
    """The path of one consultation, or of `tail` under it."""
    return f"/api/v1/consultations/{cid}{tail}"


def member_body(who: Identity) -> dict[str, str]:
    return {
        "user_id": who.user_id,
        "name": who.name,
        "role": who.role.value,
        "institution": who.org,
    }


def consultation_body(
    members: tuple[Identity, ...] = STANDARD_TEAM, **overrides: Any
) -> dict[str, Any]:
    """A valid POST /api/v1/consultations body with `members` as the team (besides the inviting
    clinician and the resident); keyword arguments replace top-level fields."""
    body: dict[str, Any] = {
        "kind": "consultation",
        "specialty": "respiratory",
        "resident": {
            "pseudonym": "res-0001",
            "display_name": "刘奶奶",
            "age": 72,
            "sex": "female",
        },
        "reason": "反复咳嗽、气短两个月",
        "purpose": "明确诊断并调整治疗方案",
        "case_summary": "COPD 病史 8 年；近两月活动后气短加重，SpO2 92%。",
        "requested_specialty": "respiratory",
        "requested_title": "主任医师",
        "preferred_time": "2025-03-01T09:00:00+08:00",
        "team": [member_body(m) for m in members],
    }
    body.update(overrides)
    return body


def opinion_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "findings": "双肺散在哮鸣音，SpO2 92%",
        "assessment": "慢性阻塞性肺疾病急性加重",
        "recommendations": "调整吸入治疗，两周后复查",
        "referral_advice": "如症状加重转县医院",
    }
    body.update(overrides)
    return body


@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    raw: bytes
    body: Any = field(default=None)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip()

    def __repr__(self) -> str:  # what a failed `assert reply.status == ...` shows
        return f"Reply({self.status}, {self.raw[:500]!r})"


_NO_JSON = object()


class Api:
    """The test client plus the app's token service: requests as a named identity."""

    def __init__(self, client: TestClient[web.Request, web.Application]) -> None:
        self.client = client
        self.app: web.Application = client.app
        self._tokens: dict[Identity, str] = {}

    def token(self, who: Identity) -> str:
        if who not in self._tokens:
            self._tokens[who] = self.app[TOKENS].mint(
                user_id=who.user_id, name=who.name, role=who.role, org=who.org
            )
        return self._tokens[who]

    def auth(self, who: Identity | str | None) -> dict[str, str]:
        """Headers for `who`: an identity (a fresh access token), a raw token, or nobody."""
        if who is None:
            return {}
        token = who if isinstance(who, str) else self.token(who)
        return {"Authorization": f"Bearer {token}"}

    async def request(
        self,
        method: str,
        path: str,
        who: Identity | str | None,
        *,
        json_body: Any = _NO_JSON,
        data: bytes | str | None = None,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        all_headers = {**self.auth(who), **(headers or {})}
        if json_body is not _NO_JSON:
            data = json.dumps(json_body, ensure_ascii=False)
            all_headers.setdefault("Content-Type", "application/json")
        async with self.client.request(
            method, path, data=data, params=params, headers=all_headers
        ) as resp:
            raw = await resp.read()
            content_type = resp.headers.get("Content-Type", "")
            body = json.loads(raw) if raw and "json" in content_type else None
            return Reply(resp.status, resp.headers, raw, body)

    async def get(self, path: str, who: Identity | str | None, **kwargs: Any) -> Reply:
        return await self.request("GET", path, who, **kwargs)

    async def post(
        self, path: str, who: Identity | str | None, body: Any = _NO_JSON, **kwargs: Any
    ) -> Reply:
        return await self.request("POST", path, who, json_body=body, **kwargs)

    async def delete(self, path: str, who: Identity | str | None, **kwargs: Any) -> Reply:
        return await self.request("DELETE", path, who, **kwargs)

    # -- steps of the consultation's life -----------------------------------------------------

    async def create(self, who: Identity = VILLAGE, **body: Any) -> str:
        """POST a consultation (the standard team unless `members=` says otherwise); its id."""
        reply = await self.post("/api/v1/consultations", who, consultation_body(**body))
        assert reply.status == 201, reply
        cid: str = reply.body["id"]
        return cid

    async def act(self, cid: str, action: str, who: Identity, body: Any = None) -> Any:
        reply = await self.post(f"/api/v1/consultations/{cid}/{action}", who, body or {})
        assert reply.status == 200, reply
        return reply.body

    async def scheduled(self, who: Identity = VILLAGE, **body: Any) -> str:
        """A consultation accepted by the county physician and scheduled."""
        cid = await self.create(who, **body)
        await self.act(cid, "accept", COUNTY)
        await self.act(cid, "schedule", COUNTY, {"scheduled_time": "2025-03-02T10:00:00+08:00"})
        return cid

    async def start_session(self, cid: str, who: Identity = VILLAGE) -> Session:
        """Go live. There is no REST endpoint: the socket layer calls this use case."""
        return await self.app[SERVICE].start_session(
            RequestContext(who.actor()), ConsultationId(cid)
        )

    async def end_session(
        self, cid: str, session: Session, who: Identity = VILLAGE
    ) -> Consultation:
        return await self.app[SERVICE].end_session(
            RequestContext(who.actor()), ConsultationId(cid), SessionId(session.id)
        )

    async def live(self, who: Identity = VILLAGE, **body: Any) -> tuple[str, Session]:
        cid = await self.scheduled(who, **body)
        return cid, await self.start_session(cid)

    async def audit(self, **params: str) -> list[dict[str, Any]]:
        reply = await self.get("/api/v1/audit", ADMIN, params={"limit": "1000", **params})
        assert reply.status == 200, reply
        items: list[dict[str, Any]] = reply.body["items"]
        return items


def assert_problem(reply: Reply, status: int, *detail_contains: str) -> dict[str, Any]:
    """The reply is an RFC 9457 problem with `status`, whose detail names each fragment."""
    assert reply.status == status, reply
    assert reply.content_type == PROBLEM_JSON, reply.headers
    problem: dict[str, Any] = reply.body
    assert problem["status"] == status
    assert problem["title"] == HTTPStatus(status).phrase
    assert isinstance(problem["detail"], str) and problem["detail"]
    for fragment in detail_contains:
        assert fragment in problem["detail"], problem
    return problem


def error_paths(reply: Reply) -> list[str]:
    """The `errors[].path` of a 400 problem."""
    return [e["path"] for e in reply.body.get("errors", [])]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)
