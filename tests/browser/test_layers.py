"""The video-quality menu applies to every video a page receives, those that arrive later
included: the county physician chooses "Low bandwidth", then the provincial specialist joins,
and the specialist's camera reaches the county page as the low layer from its first frame
while the village doctor (Automatic) gets it in full. Chromium's own fake camera (640x480), so
the low layer (at most 320x240) and the full picture (Chromium sends 480x360 or 640x480, as
its estimate allows) differ in size."""

from __future__ import annotations

import json

import pytest
from conftest import Browsers, Party, Server, eventually, sign_in_as

from media.low_layer import MAX_WIDTH

pytestmark = pytest.mark.browser


async def seated(party: Party) -> bool:
    return bool(await party.page.evaluate("window.telemedDebug.phase() === 'room'"))


async def cameras(party: Party) -> dict[str, tuple[int, int]]:
    """(frames decoded, frame width) of each camera the page receives, by participant."""
    return {
        s["info"]["participant"]: (s["framesDecoded"], s["frameWidth"])
        for s in await party.debug("inbound()")
        if s["info"]["kind"] == "video" and s["info"]["source"] == "camera"
    }


async def widths_while_decoding(party: Party, sender: str, frames: int) -> set[int]:
    """The widths the page shows of `sender`'s camera from its first decoded frame until
    `frames` more have been decoded."""
    seen: set[int] = set()
    first: int | None = None

    async def enough() -> bool:
        nonlocal first
        decoded, width = (await cameras(party)).get(sender, (0, 0))
        if decoded > 0:
            seen.add(width)
            first = decoded if first is None else first
        return first is not None and decoded > first + frames

    async def diagnose() -> str:
        return json.dumps(await party.debug("inbound()")) + "\n" + " | ".join(party.console[-15:])

    await eventually(enough, f"{party.name} to decode {frames} frames of {sender}", diagnose)
    return seen


async def test_a_chosen_quality_applies_to_cameras_that_arrive_later(
    server: Server, browsers: Browsers
) -> None:
    demo = await server.demo()
    cid = demo["consultation"]["id"]
    tokens = {i["role"]: i["token"] for i in demo["identities"]}
    village = await browsers.party("village", files=False)
    county = await browsers.party("county", files=False)
    specialist = await browsers.party("specialist", files=False)

    await sign_in_as(village, server, "village_doctor")
    await village.page.goto(f"{server.url}/web/room.html?c={cid}")
    await village.page.locator("#join").click()
    await eventually(lambda: seated(village), "the village doctor to open the session")
    await county.page.goto(f"{server.url}/web/room.html?c={cid}#token={tokens['county_physician']}")
    await county.page.locator("#join").click()
    await eventually(lambda: seated(county), "the county physician to be seated")
    village_id = await village.participant_id()

    await county.page.locator("#layer").select_option("low")

    # What the county page already receives turns small.
    async def village_small() -> bool:
        decoded, width = (await cameras(county)).get(village_id, (0, 0))
        return decoded > 0 and 0 < width <= MAX_WIDTH

    async def diagnose() -> str:
        stats = await server.api("GET", f"/consultations/{cid}/media", tokens["county_physician"])
        inbound = await county.debug("inbound()")
        return f"relay: {json.dumps(stats)}\ncounty: {json.dumps(inbound)}\n" + " | ".join(
            county.console[-15:]
        )

    await eventually(village_small, "the village doctor's camera as the low layer", diagnose)

    # A camera that arrives later: the specialist joins.
    await specialist.page.goto(
        f"{server.url}/web/room.html?c={cid}#token={tokens['provincial_specialist']}"
    )
    await specialist.page.locator("#join").click()
    await eventually(lambda: seated(specialist), "the specialist to be seated")
    specialist_id = await specialist.participant_id()
    seen = await widths_while_decoding(county, specialist_id, frames=40)
    assert seen and max(seen) <= MAX_WIDTH, seen
    # Not the publisher's doing: the village doctor, on Automatic, gets it in full.
    seen_by_village = await widths_while_decoding(village, specialist_id, frames=20)
    assert max(seen_by_village) > MAX_WIDTH, seen_by_village
    # The menu still says what the page receives, after the toolbar was drawn again.
    assert await county.page.locator("#layer").input_value() == "low"

    # Automatic again: on this clean link, both cameras come back in full.
    await county.page.locator("#layer").select_option("auto")

    async def both_full() -> bool:
        now = await cameras(county)
        return all(now.get(pid, (0, 0))[1] > MAX_WIDTH for pid in (village_id, specialist_id))

    await eventually(both_full, "both cameras in full on Automatic")
