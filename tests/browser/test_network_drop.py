"""One page of a running room loses its network for a few seconds: its socket.io connection and
its media. It reconnects by itself into the same seat, with the same peer connections (ICE
restarts on them), and video flows both ways again."""

from __future__ import annotations

import asyncio

import pytest
from conftest import (
    Browsers,
    LoopbackCut,
    Party,
    Server,
    assert_video_flows,
    browser_tcp_ports,
    eventually,
    frames_by_participant,
    no_missing_strings,
    sign_in_as,
)

pytestmark = pytest.mark.browser

# How long the page stays cut off once both sides have seen it go. The whole outage must stay
# well within the reconnect grace and the 30 s after which ICE (aioice's consent checks, and
# Chromium's) gives the media connections up; seeing it go takes a few seconds already.
OUTAGE_S = 2.0


async def heard_churn(party: Party) -> dict[str, int]:
    """How many seat and track announcements the page heard."""
    counts: dict[str, int] = await party.debug("heard()")
    names = ("participant_left", "participant_joined", "track_unpublished", "track_published")
    return {name: counts.get(name, 0) for name in names}


async def seated(party: Party) -> bool:
    return bool(await party.page.evaluate("window.telemedDebug.phase() === 'room'"))


async def stalled(party: Party, senders: list[str]) -> bool:
    """No new frame of any of `senders` decoded for a second."""
    before = await frames_by_participant(party)
    await asyncio.sleep(1.0)
    after = await frames_by_participant(party)
    return all(after.get(pid, 0) == before.get(pid, 0) for pid in senders)


async def test_network_drop_and_reconnect(server: Server, browsers: Browsers) -> None:
    demo = await server.demo()
    cid = demo["consultation"]["id"]
    tokens = {i["role"]: i["token"] for i in demo["identities"]}
    village = await browsers.party("village", (200, 30, 30), 330)
    county = await browsers.party("county", (30, 160, 40), 440)
    specialist = await browsers.party("specialist", (30, 60, 200), 550)

    await sign_in_as(village, server, "village_doctor")
    await village.page.goto(f"{server.url}/web/room.html?c={cid}")
    await village.page.locator("#join").click()
    await eventually(lambda: seated(village), "the village doctor to open the session")
    for party, role in ((county, "county_physician"), (specialist, "provincial_specialist")):
        await party.page.goto(f"{server.url}/web/room.html?c={cid}#token={tokens[role]}")
        await party.page.locator("#join").click()
        await eventually(lambda party=party: seated(party), f"{party.name} to be seated")
    everyone = [village, county, specialist]
    for p in everyone:
        await p.page.locator("#layer").select_option("full")
    ids = {await p.participant_id(): p.name for p in everyone}
    await assert_video_flows(everyone, ids)
    churn = {p.name: await heard_churn(p) for p in everyone}

    # Cut the county physician's page off: every packet of its peer connections' ICE ports and
    # of its TCP connections to the server (the socket.io websocket) is dropped, and the
    # browser is offline so that new connections fail too. DevTools' offline mode alone
    # touches neither WebRTC's UDP nor an open websocket, and fires no `offline` event.
    seat = await county.participant_id()
    others = [pid for pid in ids if pid != seat]
    udp: list[int] = await county.debug("mediaPorts()")
    assert len(udp) == 2, udp
    tcp = await browser_tcp_ports(county, server)
    assert tcp, "no TCP connection of the county physician's browser found"
    cut = LoopbackCut()
    try:
        await cut.cut(udp, tcp)
        await county.context.set_offline(True)
        started = asyncio.get_running_loop().time()
        await eventually(lambda: county.debug("reconnecting()"), "the page to notice the drop")
        await eventually(lambda: stalled(county, others), "the cut page's video to stop")
        await eventually(
            lambda: stalled(village, [seat]), "the county physician's video to stop reaching others"
        )
        await asyncio.sleep(OUTAGE_S)
        outage = asyncio.get_running_loop().time() - started
        assert await county.debug("reconnecting()"), "reconnected while offline"
    finally:
        await cut.restore()
        await county.context.set_offline(False)

    # Back by itself, in the same seat (the reconnect grace), and no one else saw it leave.
    async def back() -> bool:
        return not await county.debug("reconnecting()")

    async def diagnose() -> str:
        shown = await county.page.locator("main").inner_text()
        return f"page: {shown[:300]}\nconsole: " + " | ".join(county.console[-20:])

    await eventually(back, "the page to reconnect", diagnose)
    print(f"cut off for {outage:.1f} s")
    assert await county.participant_id() == seat, county.console[-20:]
    for p in (village, specialist):
        await p.page.locator(f'#people li[data-participant="{seat}"]').wait_for()
    await assert_video_flows(everyone, ids)
    # Its peer connections came back with it, ICE restarted on them: the others saw no track
    # of it end or start again (docs/protocol.md, Connection changes).
    assert {p.name: await heard_churn(p) for p in everyone} == churn
    assert await county.debug("iceRestarts()") >= 1
    no_missing_strings(*everyone)
