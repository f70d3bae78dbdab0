"""Two telemed nodes behind one nginx (tests/nginx.py, running docs/deploy/nginx.conf): REST
and socket.io through the one address reach both nodes, what nginx forwards about the client,
and a node stopped behind it.

The nodes are those of test_multinode.py (real aiohttp servers on 127.0.0.1, one SQLite file,
one private redis-server), each with a middleware of this test's that records every request
it receives: which node answered is what the nodes saw, not what nginx claims."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from aiohttp import web
from api_helpers import consultation_body
from nginx import DEPLOY_CONF, ConfigShapeError, Nginx, site_config
from test_multinode import (
    NS,
    SPECIALIST,
    TIMEOUT_S,
    VILLAGE,
    Cluster,
    Node,
    Peer,
    eventually,
    node_config,
    stop_node,
)

from rooms.roles import Role
from server.app import CONFIG, SERVICE, TOKENS, create_app
from server.config import Config
from server.demo import ensure_demo
from server.presence_redis import RedisPresence

pytest_plugins = ["redis_fixtures"]

# The client's own loopback address, apart from nginx's (127.0.0.1) towards the nodes.
CLIENT_ADDRESS = "127.0.0.2"
ADMIN = Role.ADMIN


@dataclass(frozen=True)
class Arrival:
    """One request as a node received it."""

    node: str
    method: str
    path: str
    remote: str | None
    headers: dict[str, str]


def recording(name: str, arrivals: list[Arrival]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        arrivals.append(Arrival(name, request.method, request.path, request.remote, headers))
        return await handler(request)

    return record


async def start_recorded_node(name: str, config: Config, arrivals: list[Arrival]) -> Node:
    """test_multinode.start_node, with the recording middleware first: it must be in place
    before runner.setup() freezes the app."""
    app = create_app(config)
    app.middlewares.insert(0, recording(name, arrivals))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    return Node(name, app, runner, f"http://127.0.0.1:{port}")


class ProxiedPeer(Peer):
    async def connect_to(self, url: str, token: str, headers: dict[str, str] | None = None) -> None:
        await self.client.connect(
            url,
            namespaces=[NS],
            auth={"token": token},
            headers=headers or {},
            transports=["websocket"],
            wait_timeout=TIMEOUT_S,
        )


@dataclass
class Front:
    cluster: Cluster
    proxy: Nginx
    arrivals: list[Arrival]
    running: list[Node]
    peers: list[Peer] = field(default_factory=list)

    def answered_by(self, path: str) -> list[str]:
        """The nodes that received requests for `path`, in order."""
        return [a.node for a in self.arrivals if a.path == path]

    def node_of(self, peer: Peer) -> Node:
        """The node holding `peer`'s connection (the engine.io session lives on one node)."""
        holders = [n for n in self.running if peer.client.eio.sid in n.sio.environ]
        assert len(holders) == 1, f"{peer.label} is held by {[n.name for n in holders]}"
        return holders[0]

    async def connect(self, role: Role, label: str, **kwargs: Any) -> ProxiedPeer:
        peer = ProxiedPeer(label)
        self.peers.append(peer)
        await peer.connect_to(self.proxy.url, self.cluster.tokens[role], **kwargs)
        return peer

    async def stop(self, node: Node) -> None:
        self.running.remove(node)
        await stop_node(node)


@contextlib.asynccontextmanager
async def front_of_two(tmp_path: Path, redis_url: str) -> AsyncIterator[Front]:
    """Nodes A and B (running_cluster's), linked, the demo consultation made, nginx in front;
    every peer closed, nginx and the nodes still running stopped afterwards."""
    config = node_config(tmp_path, redis_url)
    arrivals: list[Arrival] = []
    running: list[Node] = []
    presence = RedisPresence(redis_url)
    peers: list[Peer] = []
    try:
        # One after the other: the second node's start-up migration finds the schema at head.
        running.append(await start_recorded_node("A", config, arrivals))
        running.append(await start_recorded_node("B", config, arrivals))
        a, b = running
        demo = await ensure_demo(a.app[SERVICE], a.app[TOKENS])
        tokens = {who.role: token for who, token in demo.tokens}
        cluster = Cluster(a, b, redis_url, demo.consultation.id, tokens, presence, peers)
        await cluster.wait_linked()
        arrivals.clear()  # the probes' direct connections: only what comes through nginx counts
        backends = [node.url.removeprefix("http://") for node in running]
        async with Nginx(tmp_path, backends) as proxy:
            try:
                yield Front(cluster, proxy, arrivals, running, peers)
            finally:
                for peer in peers:
                    await peer.close()
                # pytest shows a test's captured output only when it failed.
                print(proxy.diagnostics())
    finally:
        try:
            for peer in peers:
                await peer.close()
            for node in running:
                await eventually(node.idle, f"node {node.name} to finish its disconnects")
        finally:
            for node in reversed(running):
                await stop_node(node)
            await presence.stop()


@pytest.fixture
async def front(tmp_path: Path, redis_url: str) -> AsyncIterator[Front]:
    async with front_of_two(tmp_path, redis_url) as started:
        yield started


@contextlib.asynccontextmanager
async def http_client(local_address: str = "127.0.0.1") -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(local_addr=(local_address, 0))
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


def bearer(front: Front, role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {front.cluster.tokens[role]}"}


async def get_json(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, Any]:
    """The status and the JSON body (the text, if it is not JSON: nginx's own error pages)."""
    async with http.get(url, headers=headers) as response:
        if response.content_type.endswith("json"):
            return response.status, await response.json(content_type=None)
        return response.status, await response.text()


# --- the configuration under test ------------------------------------------------------------


def test_the_fixture_runs_the_documented_file_with_only_addresses_changed(tmp_path: Path) -> None:
    documented = DEPLOY_CONF.read_text(encoding="utf-8").splitlines()
    backends = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
    tested = site_config(
        "\n".join(documented), "127.0.0.1:7000", backends, tmp_path / "access.log"
    ).splitlines()

    removed = [line.strip() for line in documented if line not in tested]
    added = [line.strip() for line in tested if line not in documented]
    assert removed == [
        "server 10.0.0.11:8080 max_fails=1 fail_timeout=10s;",
        "server 10.0.0.12:8080 max_fails=1 fail_timeout=10s;",
        "listen 80;",
        "access_log /var/log/nginx/telemed.access.log telemed;",
    ]
    assert added == [
        *(f"server {b} max_fails=1 fail_timeout=10s;" for b in backends),
        "listen 127.0.0.1:7000;",
        f"access_log {tmp_path / 'access.log'} telemed;",
    ]
    with pytest.raises(ConfigShapeError):
        site_config("server { listen 80; }", "127.0.0.1:7000", backends, tmp_path / "a.log")


# --- REST ------------------------------------------------------------------------------------


async def test_rest_through_the_proxy_reaches_both_nodes(front: Front) -> None:
    url = front.proxy.url
    village = bearer(front, VILLAGE)
    async with http_client() as http:
        async with http.post(
            f"{url}/api/v1/consultations", json=consultation_body(), headers=village
        ) as created:
            assert created.status == 201, await created.text()
            cid = (await created.json())["id"]
        path = f"/api/v1/consultations/{cid}"
        # Round-robin: consecutive requests alternate, so a few reach both nodes.
        bodies = [await get_json(http, url + path, village) for _ in range(4)]

    assert [status for status, _ in bodies] == [200] * 4
    assert all(body == bodies[0][1] for _, body in bodies), "both nodes read one record"
    assert bodies[0][1]["id"] == cid
    assert bodies[0][1]["status"] == "requested"
    assert sorted(set(front.answered_by(path))) == ["A", "B"]
    assert len(front.answered_by(path)) == 4, "each request reached exactly one node"
    assert len(front.answered_by("/api/v1/consultations")) == 1, "the POST was sent once"


async def test_what_nginx_forwards_about_the_client(front: Front) -> None:
    """The node sees the client's address in X-Forwarded-For (a forged one dropped), the scheme
    and the public Host; telemed itself keeps the proxy's address (docs/deploy/nginx.conf)."""
    url = front.proxy.url
    host = url.removeprefix("http://")
    forged = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    async with http_client(CLIENT_ADDRESS) as http:
        async with http.post(
            f"{url}/api/v1/consultations",
            json=consultation_body(),
            headers={**bearer(front, VILLAGE), **forged},
        ) as created:
            assert created.status == 201, await created.text()
            cid = (await created.json())["id"]
            answered_as = created.headers["X-Request-Id"]
        status, audit = await get_json(
            http, f"{url}/api/v1/audit?consultation={cid}", bearer(front, ADMIN)
        )

    [arrival] = [a for a in front.arrivals if a.path == "/api/v1/consultations"]
    assert arrival.headers["x-forwarded-for"] == CLIENT_ADDRESS
    assert arrival.headers["x-forwarded-proto"] == "http"
    assert arrival.headers["host"] == host
    assert arrival.remote == "127.0.0.1", "the node's peer is nginx"
    # What telemed records as the client's address is nginx's: it does not read the header.
    assert status == 200, audit
    [entry] = [e for e in audit["items"] if e["action"] == "create_consultation"]
    assert entry["remote_addr"] == "127.0.0.1"
    # The client's own address is in nginx's access log, with the request id the node used.
    posts = [line for line in front.proxy.access_log() if "POST /api/v1/consultations" in line]
    assert len(posts) == 1
    assert posts[0].startswith(f"{CLIENT_ADDRESS} ")
    assert arrival.headers["x-request-id"] == answered_as
    assert f"request_id={answered_as}" in posts[0]


async def test_body_limits_are_telemeds_own(front: Front) -> None:
    """Bodies above telemed's REST limit but within nginx's are refused by telemed itself (a
    problem+json), so clients get the same answer with or without the proxy."""
    limit = front.cluster.a.app[CONFIG].max_body_bytes
    too_large = json.dumps({"padding": "x" * (limit + 1)})
    async with (
        http_client() as http,
        http.post(
            f"{front.proxy.url}/api/v1/consultations",
            data=too_large,
            headers={**bearer(front, VILLAGE), "Content-Type": "application/json"},
        ) as refused,
    ):
        assert refused.status == 413, await refused.text()
        assert refused.content_type == "application/problem+json"
        problem = await refused.json(content_type=None)
    assert str(limit) in problem["detail"]


async def test_no_link_token_in_the_access_log(front: Front) -> None:
    """A playback link carries its token in the query; nginx's log keeps the path alone."""
    token = front.cluster.tokens[VILLAGE]
    path = "/api/v1/recordings/no-such-recording/content"
    async with http_client() as http, http.get(f"{front.proxy.url}{path}?token={token}") as got:
        # Not a playback link's token (a JWT): refused, but logged all the same.
        assert got.status == 401, await got.text()
    # nginx writes the access log line after the response is out: wait for it.
    for _ in range(100):  # 10 s of polls at most
        logged = [line for line in front.proxy.access_log() if path in line]
        if logged:
            break
        await asyncio.sleep(0.1)
    [line] = logged
    assert "token" not in line
    assert token[:16] not in "\n".join(front.proxy.access_log())


# --- socket.io -------------------------------------------------------------------------------


async def test_websockets_through_the_proxy_land_on_both_nodes_and_chat_crosses(
    front: Front,
) -> None:
    cid = front.cluster.consultation_id
    village = await front.connect(VILLAGE, "village@proxy")
    specialist = await front.connect(SPECIALIST, "specialist@proxy")
    # Consecutive upgrades alternate between the nodes like any request.
    assert {front.node_of(village).name, front.node_of(specialist).name} == {"A", "B"}
    upgrades = [a for a in front.arrivals if a.path == "/socket.io/"]
    assert len(upgrades) == 2
    assert all(a.headers.get("upgrade", "").lower() == "websocket" for a in upgrades)
    assert all(a.headers["x-forwarded-for"] == "127.0.0.1" for a in upgrades)

    for peer in (village, specialist):
        await peer.ok("join", {"consultation_id": cid})
        joined = await peer.wait_for("joined")
        peer.participant_id = joined["you"]["participant_id"]
    await village.ok("chat", {"text": "请看胸片"})
    heard = await specialist.wait_for("chat_message", lambda d: d["text"] == "请看胸片")
    assert heard["participant"] == village.participant_id
    await specialist.ok("chat", {"text": "看到了"})
    answer = await village.wait_for("chat_message", lambda d: d["text"] == "看到了")
    assert answer["participant"] == specialist.participant_id


async def test_browser_origin_check_works_through_the_proxy(front: Front) -> None:
    """socket.io admits a browser's connection only from the page's own origin, which it
    computes from Host and X-Forwarded-Proto: nginx must pass both as the browser sent them."""
    page = await front.connect(VILLAGE, "page@proxy", headers={"Origin": front.proxy.url})
    assert page.client.connected

    foreign = ProxiedPeer("foreign@proxy")
    front.peers.append(foreign)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await foreign.connect_to(
            front.proxy.url,
            front.cluster.tokens[VILLAGE],
            headers={"Origin": "http://telemed.example.org.evil.test"},
        )


# --- a node stopped ---------------------------------------------------------------------------


async def test_a_stopped_node_is_skipped(front: Front) -> None:
    a, b = front.cluster.a, front.cluster.b
    b_address = b.url.removeprefix("http://")
    await front.stop(b)
    front.arrivals.clear()

    url = front.proxy.url
    village = bearer(front, VILLAGE)
    async with http_client() as http:
        statuses = [
            (await get_json(http, f"{url}/api/v1/consultations", village))[0] for _ in range(4)
        ]
        # A POST as well: never sent to a node that refuses connections, it goes on to A.
        async with http.post(
            f"{url}/api/v1/consultations", json=consultation_body(), headers=village
        ) as created:
            assert created.status == 201, await created.text()

    assert statuses == [200] * 4
    assert {arrival.node for arrival in front.arrivals} == {"A"}
    assert len(front.answered_by("/api/v1/consultations")) == 5
    # nginx did try B and went on to A, rather than never trying it.
    refused = [
        line
        for line in front.proxy.error_log().splitlines()
        if "Connection refused" in line and f"http://{b_address}/" in line
    ]
    assert refused, front.proxy.error_log()

    # New socket.io connections too: two in a row, which round-robin would have split.
    peers = [await front.connect(VILLAGE, f"village{i}@proxy") for i in range(2)]
    assert [front.node_of(peer) for peer in peers] == [a, a]


# --- socket.io's HTTP long-polling ----------------------------------------------------------


def short_polls(front: Front) -> None:
    """A node holds a long-poll for up to ping_interval + ping_timeout (45 s), even after its
    session closed, and shuts down only after the last one ended: shorten both, so that the
    polls a client leaves behind end soon after it."""
    for node in front.running:
        node.sio.eio.ping_interval = 1
        node.sio.eio.ping_timeout = 3


async def connect_polling(url: str, token: str) -> socketio.AsyncClient:
    client = socketio.AsyncClient(reconnection=False)
    await client.connect(
        url, namespaces=[NS], auth={"token": token}, transports=["polling"], wait_timeout=TIMEOUT_S
    )
    return client


async def test_polling_fails_under_round_robin(front: Front) -> None:
    """Why the web client must use WebSocket behind this proxy: a polling session's requests
    go to both nodes, and the one not holding the session refuses them."""
    short_polls(front)
    client = socketio.AsyncClient(reconnection=False)
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.connect(
                front.proxy.url,
                namespaces=[NS],
                auth={"token": front.cluster.tokens[VILLAGE]},
                transports=["polling"],
                wait_timeout=TIMEOUT_S,
            )
        polls = [a for a in front.arrivals if a.path == "/socket.io/"]
        assert {a.node for a in polls} == {"A", "B"}, "the handshake and the next request split"
        refused = [line for line in front.proxy.access_log() if '/socket.io/ HTTP/1.1" 400' in line]
        assert refused, "a node answered 400 Invalid session"
    finally:
        await client.disconnect()
        # The client gave up on its session without closing it: close it as it would have,
        # with an engine.io close packet to the node holding it.
        async with http_client() as http:
            for node in front.running:
                for sid in list(node.sio.eio.sockets):
                    params = {"EIO": "4", "transport": "polling", "sid": sid}
                    async with http.post(f"{node.url}/socket.io/", params=params, data="1") as r:
                        assert r.status == 200, await r.text()


async def test_polling_works_with_the_documented_sticky_upstream(
    tmp_path: Path, front: Front
) -> None:
    """docs/deploy/nginx.conf's commented `ip_hash;`, uncommented: one client, one node."""
    short_polls(front)
    documented = DEPLOY_CONF.read_text(encoding="utf-8")
    assert "    # ip_hash;" in documented
    sticky = tmp_path / "sticky.conf"
    sticky.write_text(documented.replace("    # ip_hash;", "    ip_hash;", 1), encoding="utf-8")
    backends = [node.url.removeprefix("http://") for node in front.running]
    async with Nginx(tmp_path / "sticky", backends, template=sticky) as proxy:
        client = await connect_polling(proxy.url, front.cluster.tokens[VILLAGE])
        try:
            reply = await client.call(
                "join",
                {"consultation_id": front.cluster.consultation_id},
                namespace=NS,
                timeout=TIMEOUT_S,
            )
            assert reply == {"ok": True}
        finally:
            await client.disconnect()
    polls = [a for a in front.arrivals if a.path == "/socket.io/"]
    assert len(polls) >= 3, "handshake, connect packet, then polls"
    assert len({a.node for a in polls}) == 1
