"""Links that cannot be used say so in words: an expired token, another consultation's invite."""

from __future__ import annotations

import time

import jwt
import pytest
from conftest import Browsers, Server, no_missing_strings

from server.config import DEV_JWT_SECRET

pytestmark = pytest.mark.browser


def expired_copy(token: str) -> str:
    """The same claims, signed with the development secret, expired an hour ago."""
    claims = jwt.decode(token, options={"verify_signature": False})
    now = int(time.time())
    claims.update(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    return jwt.encode(claims, DEV_JWT_SECRET, algorithm="HS256")


async def test_bad_links_give_a_clear_message(server: Server, browsers: Browsers) -> None:
    demo = await server.demo()
    cid = demo["consultation"]["id"]
    invite = next(i["token"] for i in demo["identities"] if i["role"] == "resident")
    village = next(i["token"] for i in demo["identities"] if i["role"] == "village_doctor")
    other = await server.api(
        "POST",
        "/consultations",
        village,
        {
            "specialty": "respiratory",
            "resident": {"pseudonym": "r-0099", "display_name": "王大爷", "age": 70, "sex": "male"},
            "reason": "胸闷",
            "purpose": "会诊",
            "requested_specialty": "respiratory",
            "requested_title": "主任医师",
        },
    )
    party = await browsers.party("links")
    page = party.page

    # An expired invite: the page reads the expiry before connecting (the server would refuse).
    await page.goto(f"{server.url}/web/room.html?c={cid}#token={expired_copy(invite)}")
    await page.get_by_role("alert").get_by_text("The link has expired").wait_for()
    assert "token=" not in page.url  # the fragment is wiped from the address bar

    # An invite opened for another consultation.
    await page.goto(f"{server.url}/web/room.html?c={other['id']}#token={invite}")
    await page.get_by_role("alert").get_by_text("belongs to another consultation").wait_for()

    # An expired staff token on the list page: the REST API's 401 becomes a message too.
    await page.goto(f"{server.url}/web/#token={expired_copy(village)}")
    await page.get_by_role("alert").get_by_text("The link has expired").wait_for()
    no_missing_strings(party)
