"""The ICE servers reach the clients: a seated client gets the configured static ones in
`joined`, then a TURN server with credentials minted for its own seat at that moment (fresh
ones when it resumes its seat), for its own peer connections."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, hmac
from signaling_fixtures import VILLAGE, eventually, start_signaling_server

from rooms.roles import Role
from server.config import load_config

pytest_plugins = ["signaling_fixtures"]

SECRET = "a-turn-secret-shared-with-coturn"
TURN_URLS = ["turn:127.0.0.1:3478?transport=udp", "turns:turn.example.org:443?transport=tcp"]
STATIC = [{"urls": ["stun:127.0.0.1:3478"]}]


def expected_password(username: str) -> str:
    # Computed apart from server/turn.py (the `cryptography` package, not the standard library).
    mac = hmac.HMAC(SECRET.encode(), hashes.SHA1())
    mac.update(username.encode())
    return base64.b64encode(mac.finalize()).decode()


def check_minted(turn: dict[str, Any], participant: str, ttl_s: int, before: float) -> int:
    """The minted entry is for `participant`, expires `ttl_s` from when it was made (between
    `before` and now) and its password is the HMAC of its username; returns the expiry."""
    assert turn["urls"] == TURN_URLS
    expiry, user = turn["username"].split(":")
    assert user == participant
    assert int(before) + ttl_s <= int(expiry) <= int(time.time()) + ttl_s
    assert turn["credential"] == expected_password(turn["username"])
    return int(expiry)


async def test_joined_hands_out_static_servers_and_fresh_turn_credentials(tmp_path: Path) -> None:
    config = load_config(
        env={},
        overrides={
            "dev": True,
            "data_dir": str(tmp_path),
            "ice_servers": STATIC,
            "turn": {"secret": SECRET, "urls": TURN_URLS, "ttl_s": 600},
            "signaling.reconnect_grace_s": 30,
        },
    )
    server = await start_signaling_server(config)
    try:
        cid = (await server.scheduled()).id
        before = time.time()
        village = await server.seated(VILLAGE, cid, label="village")
        static, turn = village.snapshot["ice_servers"]
        assert static == STATIC[0]
        first = check_minted(turn, village.participant_id, 600, before)

        # Another participant, its own username and password.
        token, _ = await server.invite(cid, Role.RESIDENT)
        resident = await server.admitted(token, cid, village, device="phone", label="resident")
        theirs = resident.snapshot["ice_servers"][1]
        check_minted(theirs, resident.participant_id, 600, before)
        assert theirs["credential"] != turn["credential"]

        # A resumed seat is handed credentials minted when it resumes: once the clock's second
        # has moved on, a later expiry.
        await resident.drop()
        await eventually(lambda: int(time.time()) > first - 600, "the next second")
        resumed_at = time.time()
        back = await server.connect(token, label="resident back")
        await back.join(cid, "phone")
        snapshot = await back.wait_for("joined")
        assert snapshot["you"]["participant_id"] == resident.participant_id
        again = check_minted(snapshot["ice_servers"][1], resident.participant_id, 600, resumed_at)
        assert again > first
    finally:
        await server.close()


async def test_a_static_password_stays_with_the_relay(tmp_path: Path) -> None:
    """A configured server with a username and password is the relay's (docs/protocol.md):
    handing it to clients would give every client the password for good."""
    with_password = {"urls": ["turn:127.0.0.1:3478"], "username": "u", "credential": "static"}
    config = load_config(
        env={},
        overrides={"dev": True, "data_dir": str(tmp_path), "ice_servers": [*STATIC, with_password]},
    )
    server = await start_signaling_server(config)
    try:
        cid = (await server.scheduled()).id
        village = await server.seated(VILLAGE, cid, label="village")
        assert village.snapshot["ice_servers"] == STATIC
        assert [s.urls for s in server.namespace.media._config.ice_servers] == [
            STATIC[0]["urls"],
            with_password["urls"],
        ]
    finally:
        await server.close()


async def test_no_ice_servers_unless_configured(tmp_path: Path) -> None:
    config = load_config(env={}, overrides={"dev": True, "data_dir": str(tmp_path)})
    server = await start_signaling_server(config)
    try:
        cid = (await server.scheduled()).id
        village = await server.seated(VILLAGE, cid, label="village")
        assert village.snapshot["ice_servers"] == []
    finally:
        await server.close()
