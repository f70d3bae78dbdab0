"""The app factory: wires config, store, auth and the API. All live state hangs off the app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import version

import socketio
from aiohttp import hdrs, web

from media.internals import check_internals
from media.offer_sections import PublishLimits
from media.peer import IceServer, PeerConfig
from media.pipe import PipeEndpoint
from media.sealed import SealKeys
from rooms.attachments import AttachmentService
from rooms.consultations import ConsultationService, RequestContext
from rooms.invite_codes import InviteCodes
from rooms.live import InMemoryPresence
from rooms.model import ConsultationId
from rooms.room_service import LiveRoomService, RoomLimits
from server.api.attachment_routes import PREFIX as ATTACHMENTS_PATH
from server.api.invite_routes import code_key
from server.api.openapi import build_openapi
from server.api.problems import (
    SERVER_NAME,
    install_protocol_errors,
    problem_middleware,
    request_body_middleware,
)
from server.api.recording_routes import link_key
from server.api.routes import build_api
from server.api.schemas import Health
from server.auth import AuthError, TokenService, bearer_token, check_not_revoked, check_scope
from server.composites import Composites
from server.config import Config
from server.db.migrate import upgrade
from server.db.store import SqlRecordStore
from server.logs import redact_aiohttp_access_log, request_id_middleware
from server.metrics import ServerMetrics, metrics_handler
from server.placement import MediaLoad, RedisPlacement
from server.presence_redis import RedisPresence
from server.recorder_relay import RedisRecorderRelay
from server.recording import SessionRecordings
from server.recording_keys import load_recording_keys
from server.recovery import CrashRecovery
from server.revocations import LocalRevocations, RedisRevocations
from server.signing import OpinionKeys, load_opinion_keys
from server.takeover import attach_cleanup
from server.turn import TurnCredentials, ice_servers_for_clients
from server.verify import verify_consultation
from server.web_routes import register_web
from server.worker_link import RedisWorkerLink
from signaling.connection import Identity, Limits, Refused
from signaling.fanout import DirectEmit, DirectRedisEmit
from signaling.namespace import ConsultNamespace
from signaling.packets import CheckedServer
from signaling.routing import Routing

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", SqlRecordStore)
SERVICE = web.AppKey("consultations", ConsultationService)
TOKENS = web.AppKey("tokens", TokenService)
ROOMS = web.AppKey("rooms", LiveRoomService)
SIO = web.AppKey("sio", socketio.AsyncServer)
NAMESPACE = web.AppKey("namespace", ConsultNamespace)
RECORDINGS = web.AppKey("recordings", SessionRecordings)
COMPOSITES = web.AppKey("composites", Composites)
METRICS = web.AppKey("metrics", ServerMetrics)
RECOVERY = web.AppKey("recovery", CrashRecovery)
PLACEMENT = web.AppKey("placement", RedisPlacement)
SIGNER = web.AppKey("signer", OpinionKeys)
# What recordings are sealed with at rest (media/sealed.py): downloads, composites, verify.
RECORDING_KEYS = web.AppKey("recording_keys", SealKeys)
# An upload's form fields and multipart framing beside its file.
_FORM_OVERHEAD = 64 * 1024
# The engine.io frame limit guards the transport; per-event limits are the namespace's.
_MAX_FRAME_BYTES = 1024 * 1024


def create_app(config: Config, *, migrate: bool = True) -> web.Application:
    """`migrate=False` for the workers of `telemed serve --workers N`: their supervisor has
    migrated once before starting them, and N processes migrating one database at once would
    race each other (server/supervisor.py).

    Raises AiortcInternalsChanged, before anything is opened, when the installed aiortc,
    aioice or pylibsrtp lacks what the media relay reaches into."""
    check_internals()
    install_protocol_errors()
    redact_aiohttp_access_log()
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[
            request_id_middleware,
            problem_middleware,
            request_body_middleware(
                config.max_body_bytes,
                # An upload's file and its form around it (the handler caps the file itself).
                larger={ATTACHMENTS_PATH: config.attachments.max_bytes + _FORM_OVERHEAD},
            ),
        ],
    )
    app.on_response_prepare.append(_response_headers)
    store = SqlRecordStore(config.effective_database_url)
    tokens = TokenService(config.jwt)
    signer = load_opinion_keys(config.signing, dev=config.dev)
    service = ConsultationService(store, signer)
    app[SIGNER] = signer
    app[RECORDING_KEYS] = load_recording_keys(config)
    app[CONFIG] = config
    app[STORE] = store
    app[TOKENS] = tokens
    app[SERVICE] = service

    async def authenticate(request: web.Request) -> RequestContext:
        claims = tokens.verify(bearer_token(request.headers.get("Authorization")))
        await check_not_revoked(claims, _is_revoked(store))
        return RequestContext(claims.to_actor(), request.remote)

    revocations = _attach_signaling(app, config, store, service, tokens)
    api = build_api(
        service,
        tokens,
        config.jwt.invite_ttl_s,
        authenticate,
        app[NAMESPACE].media,
        public_url=config.effective_public_url,
        data_dir=config.data_dir,
        recording_keys=app[RECORDING_KEYS],
        revocations=revocations,
        live=app[NAMESPACE],
        link_key=_link_key(config),
        verifier=lambda cid: verify_consultation(
            store, signer, config.data_dir, app[RECORDING_KEYS], cid
        ),
        attachments=AttachmentService(store),
        attachment_max_bytes=config.attachments.max_bytes,
        announce=app[NAMESPACE].deliver,
        invite_codes=InviteCodes(store, code_key(config.link_secret_material)),
        invite_base_url=config.public_url,
    )
    api.register(app)
    openapi = json.dumps(build_openapi(api.endpoints, version("telemed")))

    async def get_openapi(_: web.Request) -> web.Response:
        return web.Response(text=openapi, content_type="application/json")

    async def healthz(_: web.Request) -> web.Response:
        # The node tells which process answered: with workers, any of them may (SO_REUSEPORT).
        body = Health(status="ok", node=config.effective_node_id)
        return web.json_response(body.model_dump(exclude_none=True))

    async def readyz(_: web.Request) -> web.Response:
        try:
            await store.ping()
        except Exception as exc:
            body = Health(status="unavailable", detail=f"database: {type(exc).__name__}")
            return web.json_response(body.model_dump(), status=503)
        return web.json_response(Health(status="ok").model_dump(exclude_none=True))

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    metrics = app[METRICS]
    metrics.watch(app[NAMESPACE], app[NAMESPACE].media)
    app.router.add_get("/metrics", metrics_handler(metrics))
    app.router.add_get("/api/v1/openapi.json", get_openapi)
    register_web(app, config, service, tokens)
    app.cleanup_ctx.append(_store_lifecycle(migrate))
    # After the store (it needs it at startup), before signaling stops (its media).
    app.cleanup_ctx.append(_recording_lifecycle)
    # Behind Redis, what dead workers left is cleaned up after here (server/takeover.py).
    if PLACEMENT in app:
        grace_s = config.signaling.empty_room_grace_s
        rooms, recordings, composites = app[ROOMS], app[RECORDINGS], app[COMPOSITES]
        attach_cleanup(app, app[PLACEMENT], store, rooms, recordings, composites, grace_s)
    return app


# Every /api/v1 response may hold personal data; only the OpenAPI document is public.
_API_PREFIX = "/api/v1/"
_CACHEABLE_API = frozenset({"/api/v1/openapi.json"})


async def _response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response the app prepares (static files and socket.io included; aiohttp's own
    parser errors get the same from problems.install_protocol_errors)."""
    response.headers[hdrs.SERVER] = SERVER_NAME
    if request.path.startswith(_API_PREFIX) and request.path not in _CACHEABLE_API:
        response.headers[hdrs.CACHE_CONTROL] = "no-store"


def _attach_signaling(
    app: web.Application,
    config: Config,
    store: SqlRecordStore,
    service: ConsultationService,
    tokens: TokenService,
) -> LocalRevocations | RedisRevocations:
    """Without a Redis URL everything stays in this process; with one, presence and
    socket.io fan-out are shared by every node. Returns what ends a revoked token's
    connections, for the API."""
    sig = config.signaling
    metrics = ServerMetrics()
    app[METRICS] = metrics
    presence: InMemoryPresence | RedisPresence
    if config.redis_url:
        presence = RedisPresence(config.redis_url)
        manager: socketio.AsyncManager = DirectRedisEmit(config.redis_url)
    else:
        presence = InMemoryPresence()
        manager = DirectEmit()
    # Reads every packet so that a malformed one is answered, not dropped (signaling/packets.py).
    sio = CheckedServer(
        async_mode="aiohttp",
        client_manager=manager,
        max_http_buffer_size=_MAX_FRAME_BYTES,
        logger=False,
        engineio_logger=False,
    )
    limits = RoomLimits(max_participants=sig.max_participants)
    peer_config = _peer_config(config)
    for kept in (s for s in peer_config.ice_servers if s.credential is not None):
        log.info(
            "ICE server %s has a password: the relay uses it, clients are not given it", kept.urls
        )
    rooms = LiveRoomService(
        store,
        service,
        presence,
        limits,
        ice_servers=ice_servers_for_clients(
            # A static password would be handed to every client for good: servers configured
            # with one are the relay's own; clients get TURN credentials minted for them.
            [s.client_form() for s in peer_config.ice_servers if s.credential is None],
            TurnCredentials(config.turn) if config.turn.enabled else None,
        ),
    )
    is_revoked = _is_revoked(store)

    async def authenticate(token: str, consultation: ConsultationId | None) -> Identity:
        try:
            claims = tokens.verify(token)
            await check_not_revoked(claims, is_revoked)
            if consultation is not None and claims.consultation is not None:
                # An invite names its consultation: refuse the wrong one before anything else.
                check_scope(claims, consultation)
        except AuthError as exc:
            raise Refused(exc.message) from None
        return Identity(claims.to_actor(), claims.expires_at, claims.jti)

    # Behind Redis each room has one owning worker, and the others relay to it.
    placement = link = None
    if config.redis_url:
        # The heartbeat reads the media hub and the rooms, which come with the namespace below.
        placement = RedisPlacement(
            config.redis_url,
            config.effective_node_id,
            MediaLoad(lambda: namespace.media),
            held=lambda: namespace.rooms_served(),
        )
        link = RedisWorkerLink(config.redis_url, placement.worker_id)
    namespace = ConsultNamespace(
        rooms,
        authenticate,
        Limits(
            max_payload_bytes=sig.max_payload_bytes,
            events_per_second=sig.events_per_second,
            event_burst=sig.event_burst,
            reconnect_grace_s=sig.reconnect_grace_s,
            empty_room_grace_s=sig.empty_room_grace_s,
            chat_max_chars=sig.chat_max_chars,
            annotation_max_points=sig.annotation_max_points,
        ),
        peer_config,
        counts=metrics,
        routing=Routing(placement, link) if placement and link else None,
        pipe=PipeEndpoint(_pipe_address(config)) if placement else None,
    )
    if placement is not None:
        app[PLACEMENT] = placement
    # Behind Redis, recording rows name the worker's incarnation: a restarted worker must not
    # take its previous life's open segments for its own (server/takeover.py).
    node = placement.worker_id if placement is not None else config.effective_node_id
    keys = app[RECORDING_KEYS]
    composites = Composites(store, config.data_dir, keys, node=node)
    recordings = SessionRecordings(
        store,
        namespace.media,
        presence,
        config.data_dir,
        keys,
        on_session_ended=composites.render_later,
        node=node,
        on_failure=namespace.recording_failed,
    )
    relay = RedisRecorderRelay(config.redis_url, recordings, node) if config.redis_url else None
    rooms.use_recorders(relay or recordings)

    async def end_revoked_meanwhile() -> None:
        for token_id in namespace.token_ids():
            if await is_revoked(token_id):
                await namespace.end_token(token_id)

    revocations = (
        RedisRevocations(config.redis_url, namespace.end_token, end_revoked_meanwhile)
        if config.redis_url
        else LocalRevocations(namespace.end_token)
    )
    app[RECORDINGS] = recordings
    app[COMPOSITES] = composites
    # Alone, this node knows that nothing it left open is still being served; behind Redis,
    # dead workers are cleaned up after by the live ones (server/takeover.py).
    alone = isinstance(presence, InMemoryPresence)
    app[RECOVERY] = CrashRecovery(
        store,
        service,
        presence,
        recordings,
        composites,
        sig.empty_room_grace_s,
        alone=alone,
    )
    sio.register_namespace(namespace)
    sio.attach(app)
    app[ROOMS] = rooms
    app[SIO] = sio
    app[NAMESPACE] = namespace

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await revocations.start()
        if relay is not None:
            await relay.start_listening()
        if isinstance(presence, RedisPresence):
            await presence.start(namespace.holds)
        if isinstance(manager, socketio.AsyncRedisManager) and not sio.manager_initialized:
            # python-socketio starts its Redis listener at the first local connection, and
            # the listener replaces the client a publish may have used before (leaking its
            # connection); a room's worker publishes for relayed clients before it may have
            # any socket of its own.
            sio.manager_initialized = True
            manager.initialize()
        if placement is not None and link is not None:
            await link.start(namespace.relayed)
            await placement.start()
        await namespace.start()
        yield
        if placement is not None and link is not None:
            await placement.stop()
            await link.stop()
        await revocations.stop()
        if relay is not None:
            await relay.stop_listening()
        await namespace.stop()
        await sio.shutdown()
        if isinstance(manager, socketio.AsyncRedisManager):
            await _stop_redis_manager(manager)
        if isinstance(presence, RedisPresence):
            await presence.stop()

    app.cleanup_ctx.append(lifecycle)
    return revocations


def _link_key(config: Config) -> bytes | None:
    material = config.link_secret_material
    if material is None:
        if config.redis_url:
            log.warning(
                "playback links play only on the node that made them: set TELEMED_LINK_SECRET"
            )
        return None
    return link_key(material)


def _pipe_address(config: Config) -> str:
    media = config.media
    if media.pipe_address:
        return media.pipe_address
    return media.host_addresses[0] if media.host_addresses else "127.0.0.1"


def _peer_config(config: Config) -> PeerConfig:
    return PeerConfig(
        ice_servers=[
            IceServer(
                urls=s.urls,
                username=s.username,
                credential=s.credential.get_secret_value() if s.credential else None,
            )
            for s in config.ice_servers
        ],
        host_addresses=config.media.host_addresses,
        publish_limits=PublishLimits(
            max_sections=config.media.max_sections_per_connection,
            max_tracks=config.media.max_tracks_per_participant,
        ),
    )


async def _stop_redis_manager(manager: socketio.AsyncRedisManager) -> None:
    """python-socketio has no stop for its Redis listener; without this its task and
    connections outlive the app."""
    listener: asyncio.Future[None] | None = getattr(manager, "thread", None)
    if listener is not None:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    if manager.pubsub is not None:
        await manager.pubsub.aclose()
    if manager.redis is not None:
        await manager.redis.aclose()


def _store_lifecycle(migrate: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if migrate:
            await upgrade(app[CONFIG].effective_database_url)
        store = app[STORE]
        await store.start()
        yield
        await store.stop()

    return lifecycle


async def _recording_lifecycle(app: web.Application) -> AsyncIterator[None]:
    recordings, composites = app[RECORDINGS], app[COMPOSITES]
    recovery = app[RECOVERY]
    await recovery.start()
    yield
    await recovery.stop()
    await recordings.close()
    await composites.stop()


def _is_revoked(store: SqlRecordStore) -> Callable[[str], Awaitable[bool]]:
    async def is_revoked(jti: str) -> bool:
        return await store.is_token_revoked(jti)

    return is_revoked
