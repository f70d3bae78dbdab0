"""The ICE servers of the configuration reach the clients: a seated client gets them in
`joined`, with TURN credentials, for its own peer connections."""

from __future__ import annotations

from pathlib import Path

from signaling_fixtures import start_signaling_server

from server.config import load_config
from server.demo import VILLAGE

pytest_plugins = ["signaling_fixtures"]


async def test_joined_hands_out_the_configured_ice_servers(tmp_path: Path) -> None:
    config = load_config(
        env={},
        overrides={
            "dev": True,
            "data_dir": str(tmp_path),
            "ice_servers": [
                {"urls": ["stun:127.0.0.1:3478"]},
                {
                    "urls": ["turn:127.0.0.1:3478?transport=udp", "turns:127.0.0.1:443"],
                    "username": "telemed",
                    "credential": "turn-secret",
                },
            ],
        },
    )
    server = await start_signaling_server(config)
    try:
        cid = (await server.scheduled()).id
        village = await server.seated(VILLAGE, cid, label="village")
        assert village.snapshot["ice_servers"] == [
            {"urls": ["stun:127.0.0.1:3478"]},
            {
                "urls": ["turn:127.0.0.1:3478?transport=udp", "turns:127.0.0.1:443"],
                "username": "telemed",
                "credential": "turn-secret",
            },
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
