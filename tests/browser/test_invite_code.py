"""An invitation on a phone: the village doctor invites from the list and sees the link, its QR
code, the short code and the expiry; the resident, on a 360×740 phone in Chinese, types the
code (in small letters, with spaces), is asked only for the camera and microphone, waits, is
let in, and reaches the consent step."""

from __future__ import annotations

import re

import pytest
from conftest import Browsers, Party, Server, eventually, no_missing_strings, screenshot, sign_in_as

from rooms.invite_codes import ALPHABET

pytestmark = pytest.mark.browser

PHONE = (360, 740)


async def no_horizontal_scroll(party: Party) -> bool:
    return bool(
        await party.page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
    )


async def test_a_resident_joins_by_short_code_on_a_phone(
    server: Server, browsers: Browsers
) -> None:
    demo = await server.demo()
    cid = demo["consultation"]["id"]
    village = await browsers.party("village", (200, 30, 30), 330)
    resident = await browsers.party("resident", (220, 200, 30), 660, locale="zh-CN", viewport=PHONE)

    # The village doctor invites the resident from the list.
    await sign_in_as(village, server, "village_doctor")
    card = village.page.locator(f'article[data-consultation="{cid}"]')
    await card.get_by_role("button", name="Create link").click()
    shown = card.locator(".invite")
    await shown.wait_for()
    code = (await shown.locator(".invite-code").inner_text()).strip()
    assert re.fullmatch(rf"[{ALPHABET}]{{4}}-[{ALPHABET}]{{4}}", code), code
    link = await shown.locator("input.invite-link").input_value()
    assert link.startswith(f"{server.url}/web/room.html?c={cid}#token=")
    qr = shown.locator("img.invite-qr")
    await eventually(
        lambda: qr.evaluate("img => img.complete && img.naturalWidth > 100"), "the QR code drawn"
    )
    assert "Link and code for a Resident, valid until" in await shown.inner_text()
    await screenshot(village, "invite-issued")

    # The village doctor opens the session.
    await card.locator("a", has_text="Open the room").click()
    await village.page.locator("#join").click()
    await eventually(
        lambda: village.page.evaluate("window.telemedDebug.phase() === 'room'"),
        "the village doctor to open the session",
    )

    # The resident types the code as heard: small letters, a space for the dash. A wrong code
    # first: the page says so in words and keeps the form.
    page = resident.page
    await page.goto(f"{server.url}/join")
    assert page.url.endswith("/web/join.html")
    await page.locator("#code").fill("kkkk kkkk" if code != "KKKK-KKKK" else "mmmm mmmm")
    await page.locator("#code-submit").click()
    await page.get_by_role("alert").get_by_text("没有与此邀请码对应的邀请").wait_for()
    assert await no_horizontal_scroll(resident)
    await screenshot(resident, "join-code-phone")
    await page.locator("#code").fill(code.lower().replace("-", " "))
    await page.locator("#code-submit").click()

    # The landing page: the camera and microphone, nothing else to fill in.
    await page.locator("#pre-invitee").wait_for()
    assert "token=" not in page.url
    assert page.url.startswith(f"{server.url}/web/room.html?c={cid}")
    assert await page.locator("#camera-select").is_hidden()  # folded away, not asked
    assert await page.locator("form input:visible, textarea:visible").count() == 0
    assert await no_horizontal_scroll(resident)
    await screenshot(resident, "invitee-prejoin-phone")
    await page.locator("#join").click()
    await page.get_by_text("候诊室").wait_for()

    admit = village.page.locator(".waiting button.primary")
    await admit.wait_for()
    await admit.click()

    # Let in, the resident is asked for consent.
    await page.locator("dialog[open] #consent-consultation").wait_for()
    assert await no_horizontal_scroll(resident)
    await screenshot(resident, "invitee-consent-phone")
    no_missing_strings(village, resident)
