"""`attachment_added` over socket.io: a file added over the REST API while the session is live is
announced to the room (real server, real socket.io clients), without its name."""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
from attachment_helpers import form, jpeg, pdf
from signaling_fixtures import COUNTY, VILLAGE, SignalingServer

from rooms.roles import Role

pytest_plugins = ["signaling_fixtures"]


async def post_file(
    server: SignalingServer, cid: str, token: str, body: aiohttp.FormData
) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.url}/api/v1/consultations/{cid}/attachments",
            data=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


async def test_an_upload_during_the_session_is_announced_to_the_room(
    sig_server: SignalingServer,
) -> None:
    server = sig_server
    consultation = await server.scheduled()
    cid = consultation.id
    # Before the call: in the record, announced to nobody (there is no room yet).
    await post_file(server, cid, server.token(VILLAGE), form(pdf(), filename="ecg.pdf"))
    village = await server.seated(VILLAGE, cid, label="village")
    county = await server.seated(COUNTY, cid, label="county")
    resident_token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(resident_token, cid, village, label="resident")

    photo = jpeg()
    added = await post_file(
        server, cid, resident_token, form(photo, filename="伤口.jpg", description="右小腿")
    )
    for peer in (village, county, resident):
        heard = await peer.wait_for("attachment_added")
        assert heard["attachment"] == added["id"]
        assert heard["sha256"] == hashlib.sha256(photo).hexdigest()
        assert heard["media_type"] == "image/jpeg" and heard["kind"] == "document"
        assert heard["added_by_role"] == "resident"
        assert heard["session_id"] == village.snapshot["session_id"]
        assert "filename" not in heard and "description" not in heard
    assert len(village.events("attachment_added")) == 1
    kinds = await server.event_kinds(cid)
    assert kinds.count("attachment_added") == 1
