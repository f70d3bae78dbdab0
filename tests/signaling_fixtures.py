"""Fixtures for the signaling tests: the real app on an ephemeral 127.0.0.1 port and real
socket.io clients on the `/consult` namespace that record every event the server sends them.

Use with `pytest_plugins = ["signaling_fixtures"]` at the top of a test module and import the
helpers (`Peer`, `SignalingServer`, ...) from here. PYTEST_DONT_REWRITE: there are no asserts
worth rewriting here (helpers raise AssertionError with their own messages), and this marker
lets test modules import the module before pytest registers it as a plugin without a (fatal)
rewrite warning.

Waiting is always polling with a deadline (`Peer.wait_for`, `eventually`), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import socketio
from aiohttp import web

from rooms.consultations import (
    ConsultationService,
    Invite,
    NewConsultation,
    NewTeamMember,
    RequestContext,
)
from rooms.lifecycle import Action
from rooms.live import RoomState
from rooms.model import (
    Consultation,
    ConsultationId,
    ConsultationKind,
    ConsultationStatus,
    EventKind,
    Resident,
    SessionEvent,
    SessionRecord,
    Sex,
    UserId,
)
from rooms.roles import Role
from server.app import NAMESPACE, ROOMS, SERVICE, STORE, TOKENS, create_app
from server.auth import TokenService
from server.config import Config, load_config
from server.demo import COORDINATOR, COUNTY, SPECIALIST, TOWNSHIP, VILLAGE, DemoIdentity
from signaling.namespace import ConsultNamespace

__all__ = [
    "COORDINATOR",
    "COUNTY",
    "NS",
    "OUTSIDER",
    "SPECIALIST",
    "STANDARD_TEAM",
    "TOWNSHIP",
    "VILLAGE",
    "DemoIdentity",
    "Peer",
    "Received",
    "ServerFactory",
    "SignalingServer",
    "error_of",
    "eventually",
    "http_record",
    "kinds",
    "signaling_config",
    "start_signaling_server",
]

NS = "/consult"
# Every wait has a deadline; generous, because a failing wait should fail, not hang, and a
# loaded CI machine should not make a passing one fail.
DEFAULT_TIMEOUT = 5.0
_POLL_S = 0.005

# A county physician who is on no team in these tests.
OUTSIDER = DemoIdentity(UserId("outsider-county"), "吴医生", Role.COUNTY_PHYSICIAN, "邻县人民医院")

# Who is on a consultation's team besides the inviting village doctor and the resident.
STANDARD_TEAM = (TOWNSHIP, COUNTY, SPECIALIST)


@dataclass(frozen=True)
class Received:
    """One event the server sent to a client."""

    event: str
    data: Any


class Peer:
    """One socket.io client on `/consult` that records what it is sent.

    Every server event lands in `received` (a catch-all handler); the reason of a refused
    connection lands in `connect_errors` and each disconnect's reason in `disconnects`.
    """

    def __init__(self, url: str, label: str) -> None:
        self.url = url
        self.label = label
        # No automatic reconnection: a test decides when and how a client comes back.
        self.sio = socketio.AsyncClient(reconnection=False)
        self.received: list[Received] = []
        self.connect_errors: list[Any] = []
        self.disconnects: list[str] = []
        self.sio.on("*", self._on_any, namespace=NS)
        self.sio.on("connect_error", self._on_connect_error, namespace=NS)
        self.sio.on("disconnect", self._on_disconnect, namespace=NS)

    def __repr__(self) -> str:
        return f"Peer({self.label!r})"

    async def _on_any(self, event: str, *args: Any) -> None:
        self.received.append(Received(event, args[0] if len(args) == 1 else list(args)))

    async def _on_connect_error(self, data: Any = None) -> None:
        self.connect_errors.append(data)

    async def _on_disconnect(self, reason: str = "") -> None:
        self.disconnects.append(str(reason))

    # --- connecting ---------------------------------------------------------------------------

    async def connect(self, auth: Any) -> None:
        """Connects (websocket only: faster, and what the web client uses where it can).
        Raises socketio.exceptions.ConnectionError when the server refuses."""
        await self.sio.connect(
            self.url,
            auth=auth,
            namespaces=[NS],
            transports=["websocket"],
            wait_timeout=DEFAULT_TIMEOUT,
        )

    @property
    def connected(self) -> bool:
        return bool(self.sio.connected)

    async def close(self) -> None:
        """Disconnects if still connected; safe to call more than once."""
        if self.sio.connected:
            await self.sio.disconnect()
        elif self.sio.eio.state == "connected":
            await self.sio.eio.disconnect()

    async def drop(self) -> None:
        """The connection goes away without a socket.io goodbye, as after a lost network: the
        engine.io transport is torn down at once (the server learns of it straight away, where
        a silent drop would take the 25 s heartbeat)."""
        await self.sio.eio.disconnect(abort=True)
        await eventually(lambda: not self.sio.connected, f"{self.label} dropped")

    # --- talking ------------------------------------------------------------------------------

    async def call(self, event: str, data: Any = None, *, within: float = DEFAULT_TIMEOUT) -> Any:
        """Sends an event and returns the server's ack (socketio.exceptions.TimeoutError if none
        arrives `within` seconds)."""
        return await self.sio.call(event, data, namespace=NS, timeout=within)

    async def ok(
        self, event: str, data: Any = None, *, within: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Sends an event that must succeed; returns the ack."""
        ack = await self.call(event, data, within=within)
        if not (isinstance(ack, dict) and ack.get("ok") is True):
            raise AssertionError(f"{self.label}: {event} {data!r} was refused: {ack!r}")
        return ack

    async def refused(
        self, event: str, data: Any = None, *, within: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Sends an event that must be refused; returns the ack's error object after checking
        that the same error also arrived as an `error` event naming the event."""
        before = len(self.received)
        ack = await self.call(event, data, within=within)
        error = error_of(ack)
        if error["event"] != event[:64]:
            raise AssertionError(f"{self.label}: error names {error['event']!r}, not {event!r}")
        # The `error` event is emitted before the ack on the same connection: already here.
        errors = [r.data for r in self.received[before:] if r.event == "error"]
        if error not in errors:
            raise AssertionError(f"{self.label}: no `error` event matching the ack {ack!r}")
        return error

    async def join(self, consultation_id: str, device: str = "default") -> dict[str, Any]:
        return await self.ok("join", {"consultation_id": consultation_id, "device": device})

    # --- what arrived -------------------------------------------------------------------------

    @property
    def snapshot(self) -> dict[str, Any]:
        """The newest `joined` snapshot this client received."""
        joined = self.events("joined")
        if not joined:
            raise AssertionError(f"{self.label} has not joined")
        snapshot: dict[str, Any] = joined[-1]
        return snapshot

    @property
    def participant_id(self) -> str:
        """This client's participant id, from its newest `joined` snapshot."""
        pid: str = self.snapshot["you"]["participant_id"]
        return pid

    def events(self, name: str) -> list[Any]:
        """The payloads of every `name` event received so far, oldest first."""
        return [r.data for r in self.received if r.event == name]

    def names(self) -> list[str]:
        return [r.event for r in self.received]

    async def wait_for(
        self,
        name: str,
        where: Callable[[Any], bool] | None = None,
        *,
        within: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """The payload of the first `name` event (matching `where`) received, waiting for it."""

        def found() -> Any:
            for r in self.received:
                if r.event == name and (where is None or where(r.data)):
                    return r
            return None

        hit = await eventually(found, f"{self.label} receives {name!r}", within=within)
        return hit.data

    async def wait_disconnected(self, *, within: float = DEFAULT_TIMEOUT) -> None:
        await eventually(
            lambda: not self.sio.connected and bool(self.disconnects),
            f"{self.label} is disconnected by the server",
            within=within,
        )


async def eventually(
    condition: Callable[[], Any], what: str, *, within: float = DEFAULT_TIMEOUT
) -> Any:
    """Polls `condition` until it returns something truthy (which is returned) or the deadline
    passes (AssertionError naming `what`). Works for sync and async conditions."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting until {what}")
        await asyncio.sleep(_POLL_S)


def error_of(ack: Any) -> dict[str, Any]:
    """The error object of a refusing ack: `{"ok": false, "error": {code, message, event}}`."""
    if not (isinstance(ack, dict) and ack.get("ok") is False and isinstance(ack["error"], dict)):
        raise AssertionError(f"expected a refusal, got {ack!r}")
    error: dict[str, Any] = ack["error"]
    if set(error) != {"code", "message", "event"} or not error["message"]:
        raise AssertionError(f"malformed error object {error!r}")
    return error


def kinds(events: Iterable[SessionEvent]) -> list[str]:
    return [e.kind.value for e in events]


class SignalingServer:
    """A started app: its services for setting up consultations and tokens, and peers."""

    def __init__(
        self, app: web.Application, runner: web.AppRunner, url: str, config: Config
    ) -> None:
        self.app = app
        self.runner = runner
        self.url = url
        self.config = config
        self.peers: list[Peer] = []

    @property
    def service(self) -> ConsultationService:
        return self.app[SERVICE]

    @property
    def tokens(self) -> TokenService:
        return self.app[TOKENS]

    @property
    def namespace(self) -> ConsultNamespace:
        return self.app[NAMESPACE]

    # --- identities ---------------------------------------------------------------------------

    def token(self, who: DemoIdentity, **claims: Any) -> str:
        """An access token for a staff identity (keyword arguments go to TokenService.mint)."""
        return self.tokens.mint(
            user_id=who.user_id, name=who.name, role=who.role, org=who.org, **claims
        )

    async def invite(
        self,
        consultation_id: str,
        role: Role,
        name: str | None = None,
        *,
        by: DemoIdentity = VILLAGE,
    ) -> tuple[str, Invite]:
        """An invite token (resident, guardian, trainee) made the way the API makes one."""
        invite = await self.service.prepare_invite(
            RequestContext(by.actor()),
            ConsultationId(consultation_id),
            role,
            name,
            timedelta(hours=1),
        )
        token, _ = self.tokens.mint_invite(
            user_id=invite.user_id,
            name=invite.name,
            role=invite.role,
            org=invite.org,
            consultation=invite.consultation_id,
            jti=invite.jti,
        )
        return token, invite

    # --- consultations ------------------------------------------------------------------------

    async def requested(
        self,
        *,
        kind: ConsultationKind = ConsultationKind.CONSULTATION,
        team: tuple[DemoIdentity, ...] = STANDARD_TEAM,
        inviter: DemoIdentity = VILLAGE,
        age: int = 72,
    ) -> Consultation:
        """A fresh consultation request with its own resident."""
        pseudonym = f"res-{uuid.uuid4().hex[:10]}"
        return await self.service.create(
            RequestContext(inviter.actor()),
            NewConsultation(
                kind=kind,
                specialty="respiratory",
                resident=Resident(pseudonym, "刘奶奶", age, Sex.FEMALE),
                reason="反复咳嗽、气短两个月",
                purpose="明确诊断并调整治疗方案",
                case_summary="COPD 病史 8 年；近两月活动后气短加重，SpO2 92%。",
                requested_specialty="respiratory",
                requested_title="主任医师",
                preferred_time=None,
                team=[NewTeamMember(m.user_id, m.name, m.role, m.org) for m in team],
            ),
        )

    async def scheduled(
        self,
        *,
        kind: ConsultationKind = ConsultationKind.CONSULTATION,
        team: tuple[DemoIdentity, ...] = STANDARD_TEAM,
        inviter: DemoIdentity = VILLAGE,
        age: int = 72,
    ) -> Consultation:
        """A fresh consultation, accepted by the county physician and scheduled: joinable."""
        consultation = await self.requested(kind=kind, team=team, inviter=inviter, age=age)
        county = RequestContext(COUNTY.actor())
        await self.service.transition(county, consultation.id, Action.ACCEPT)
        return await self.service.transition(
            county,
            consultation.id,
            Action.SCHEDULE,
            scheduled_time=datetime.now(UTC) + timedelta(minutes=5),
        )

    async def status(self, consultation_id: str) -> ConsultationStatus:
        async with self.app[STORE].transaction() as tx:
            found = await tx.get_consultation(ConsultationId(consultation_id))
        if found is None:
            raise AssertionError(f"no consultation {consultation_id}")
        return found.status

    async def record(self, consultation_id: str, who: DemoIdentity = VILLAGE) -> SessionRecord:
        return await self.service.record(
            RequestContext(who.actor()), ConsultationId(consultation_id)
        )

    async def events(self, consultation_id: str) -> list[SessionEvent]:
        """The session event log, straight from the store (no audit entry)."""
        async with self.app[STORE].transaction() as tx:
            return await tx.list_events(ConsultationId(consultation_id))

    async def event_kinds(self, consultation_id: str) -> list[str]:
        return kinds(await self.events(consultation_id))

    async def wait_for_event(
        self,
        consultation_id: str,
        kind: EventKind,
        where: Callable[[SessionEvent], bool] | None = None,
        *,
        within: float = DEFAULT_TIMEOUT,
    ) -> SessionEvent:
        """The first recorded event of `kind` (matching `where`), waiting for it."""

        async def found() -> SessionEvent | None:
            for e in await self.events(consultation_id):
                if e.kind is kind and (where is None or where(e)):
                    return e
            return None

        hit: SessionEvent = await eventually(
            found, f"{consultation_id} records {kind.value}", within=within
        )
        return hit

    async def presence(self, consultation_id: str) -> RoomState | None:
        """Who the server thinks is in the room right now (the service exposes no reader of
        its presence store, so this reaches into it)."""
        rooms = self.app[ROOMS]
        return await rooms._presence.get(ConsultationId(consultation_id))

    # --- clients ------------------------------------------------------------------------------

    def peer(self, label: str) -> Peer:
        """A client that is not connected yet (closed with the server)."""
        peer = Peer(self.url, label)
        self.peers.append(peer)
        return peer

    async def connect(
        self, who: DemoIdentity | str, *, label: str = "", auth: dict[str, Any] | None = None
    ) -> Peer:
        """A connected client for an identity (a fresh access token) or a raw token."""
        token = who if isinstance(who, str) else self.token(who)
        peer = self.peer(label or (who if isinstance(who, str) else who.role.value)[:24])
        await peer.connect({"token": token, **(auth or {})})
        return peer

    async def seated(
        self,
        who: DemoIdentity | str,
        consultation_id: str,
        *,
        device: str = "default",
        label: str = "",
    ) -> Peer:
        """Connected and joined; for those who may admit, that is in the room at once."""
        peer = await self.connect(who, label=label)
        await peer.join(consultation_id, device)
        await peer.wait_for("joined")
        return peer

    async def waiting(
        self, token: str, consultation_id: str, *, device: str = "default", label: str = ""
    ) -> tuple[Peer, str]:
        """Connected and joined into the waiting room; returns the peer and its participant id."""
        peer = await self.connect(token, label=label)
        await peer.join(consultation_id, device)
        waiting = await peer.wait_for("waiting")
        participant_id: str = waiting["participant"]["participant_id"]
        return peer, participant_id

    async def admitted(
        self,
        token: str,
        consultation_id: str,
        admitter: Peer,
        *,
        device: str = "default",
        label: str = "",
    ) -> Peer:
        """Through the waiting room into the room, admitted by `admitter`."""
        peer, participant_id = await self.waiting(
            token, consultation_id, device=device, label=label
        )
        await admitter.ok("admit", {"participant": participant_id})
        await peer.wait_for("joined")
        return peer

    async def close(self) -> None:
        for peer in self.peers:
            # A broken client must not keep the server running.
            with contextlib.suppress(Exception):
                await peer.close()
        await self.runner.cleanup()


class ServerFactory(Protocol):
    def __call__(self, **signaling: Any) -> Awaitable[SignalingServer]: ...


def signaling_config(data_dir: Path, **signaling: Any) -> Config:
    """A development config on a fresh SQLite file; keyword arguments set `signaling.*`."""
    overrides: dict[str, Any] = {"dev": True, "data_dir": str(data_dir)}
    overrides.update({f"signaling.{key}": value for key, value in signaling.items()})
    return load_config(env={}, overrides=overrides)


async def start_signaling_server(config: Config) -> SignalingServer:
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
    except BaseException:
        await runner.cleanup()
        raise
    return SignalingServer(app, runner, f"http://{host}:{port}", config)


@pytest.fixture
async def start_sig_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Starts servers with `signaling.*` settings given as keyword arguments; each is stopped
    (clients first) after the test."""
    started: list[SignalingServer] = []

    async def start(**signaling: Any) -> SignalingServer:
        data_dir = tmp_path / f"server{len(started)}"
        data_dir.mkdir()
        server = await start_signaling_server(signaling_config(data_dir, **signaling))
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.close()


@pytest.fixture
async def sig_server(start_sig_server: ServerFactory) -> SignalingServer:
    """A server with the default signaling settings."""
    return await start_sig_server()


async def http_record(server: SignalingServer, consultation_id: str, token: str) -> Any:
    """GET /api/v1/consultations/{id}/record over HTTP, as the token's bearer."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{server.url}/api/v1/consultations/{consultation_id}/record",
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        if resp.status != 200:
            raise AssertionError(f"record: {resp.status} {await resp.text()}")
        return await resp.json()
