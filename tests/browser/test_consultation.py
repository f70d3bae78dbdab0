"""The four-party consultation in four browsers, each with its own fake camera and tone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import (
    Browsers,
    Party,
    Server,
    assert_video_flows,
    audio_by_participant,
    eventually,
    no_missing_strings,
    screenshot,
    sign_in_as,
)

pytestmark = pytest.mark.browser


def token_of(demo: dict[str, Any], role: str) -> str:
    token: str = next(i["token"] for i in demo["identities"] if i["role"] == role)
    return token


async def join_by_link(party: Party, server: Server, cid: str, token: str) -> None:
    await party.page.goto(f"{server.url}/web/room.html?c={cid}#token={token}")
    await party.page.locator("#join").click()


async def seated(party: Party) -> bool:
    return bool(await party.page.evaluate("window.telemedDebug.phase() === 'room'"))


async def four_party_room(server: Server, browsers: Browsers) -> dict[str, Any]:
    """Village doctor (through sign-in and the list), county physician and specialist by link,
    the resident by invite through the waiting room; returns the parties and ids."""
    demo = await server.demo()
    cid = demo["consultation"]["id"]
    village = await browsers.party("village", (200, 30, 30), 330)
    county = await browsers.party("county", (30, 160, 40), 440, locale="zh-CN")
    specialist = await browsers.party("specialist", (30, 60, 200), 550)
    resident = await browsers.party("resident", (220, 200, 30), 660, viewport=(820, 1180))

    await sign_in_as(village, server, "village_doctor")
    card = village.page.locator(f'article[data-consultation="{cid}"]')
    await card.locator("a", has_text="Open the room").click()
    await village.page.locator("#join").click()
    await eventually(lambda: seated(village), "the village doctor to open the session")

    await join_by_link(county, server, cid, token_of(demo, "county_physician"))
    await join_by_link(specialist, server, cid, token_of(demo, "provincial_specialist"))
    await join_by_link(resident, server, cid, token_of(demo, "resident"))
    await resident.page.get_by_text("Waiting room").wait_for()

    admit = village.page.locator(".waiting button.primary")
    await admit.wait_for()
    await admit.click()
    await eventually(lambda: seated(resident), "the resident to be admitted")
    for p in (county, specialist):
        await eventually(lambda p=p: seated(p), f"{p.name} to be seated")
    parties = {"village": village, "county": county, "specialist": specialist, "resident": resident}
    ids = {await p.participant_id(): name for name, p in parties.items()}
    return {"cid": cid, "demo": demo, "parties": parties, "ids": ids}


async def test_four_party_consultation(server: Server, browsers: Browsers) -> None:
    room = await four_party_room(server, browsers)
    parties: dict[str, Party] = room["parties"]
    village, _county, specialist, resident = parties.values()
    ids: dict[str, str] = room["ids"]
    everyone = list(parties.values())

    # The resident is asked for consent on entering. Until recording is consented, the record
    # button is refused with a message saying why.
    dialog = resident.page.locator("dialog[open]")
    await dialog.wait_for()
    await village.page.locator("#record").click()
    await village.page.locator("#toast", has_text="not consented to recording").wait_for()
    assert await village.page.locator("#rec-indicator").is_hidden()
    await resident.page.locator("#consent-consultation").check()
    await resident.page.locator("#consent-recording").check()
    await resident.page.locator("#dialog-ok").click()
    await village.page.locator("#consent-state", has_text="recording: yes").wait_for()

    # Every page decodes every other page's camera, and hears everyone.
    await assert_video_flows(everyone, ids)
    for receiver in everyone:
        mine = await receiver.participant_id()
        others = [pid for pid in ids if pid != mine]
        base = await audio_by_participant(receiver)

        async def hears(
            receiver: Party = receiver, others: list[str] = others, base: dict[str, float] = base
        ) -> bool:
            now = await audio_by_participant(receiver)
            return all(now.get(pid, 0) > base.get(pid, 0) for pid in others)

        await eventually(hears, f"{receiver.name} to receive audio energy from everyone")

    # Now the village doctor records: every page shows the indicator and the recorder.
    await village.page.locator("#record").click()
    recording_since = time.monotonic()
    for p in everyone:
        await p.page.locator("#rec-indicator:not([hidden])").wait_for()
        await p.page.locator('#people li[data-participant="recorder"]').wait_for()

    # Labels: name, role and institution on every tile.
    res_pid = next(pid for pid, name in ids.items() if name == "resident")
    label = village.page.locator(f'figure.tile[data-participant="{res_pid}"] .label')
    assert "Resident" in await label.inner_text()

    # Chat reaches all.
    await village.page.locator("#chat-input").fill("血氧现在是多少？ hello from the village")
    await village.page.locator("#chat-input").press("Enter")
    for p in everyone:
        await p.page.locator("#chat-log", has_text="hello from the village").wait_for()

    # The specialist draws on the resident's video; everyone sees the stroke over that video.
    await specialist.page.locator("#draw").click()
    canvas = specialist.page.locator(f'figure.tile[data-participant="{res_pid}"] canvas')
    box = await canvas.bounding_box()
    assert box is not None
    await specialist.page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    await specialist.page.mouse.down()
    for step in range(1, 11):
        await specialist.page.mouse.move(
            box["x"] + box["width"] * (0.3 + step * 0.03), box["y"] + box["height"] * 0.5
        )
    await specialist.page.mouse.up()
    for p in everyone:
        tile = p.page.locator(f'figure.tile[data-participant="{res_pid}"]')
        await eventually(
            lambda tile=tile: _has_stroke(tile), f"{p.name} to see the stroke on the resident"
        )

    await screenshot(village, "room-village")
    await screenshot(resident, "room-resident-tablet")

    # Enough recorded for the composite to have a middle to seek to.
    await asyncio.sleep(max(0.0, RECORD_AT_LEAST_S - (time.monotonic() - recording_since)))

    # The specialist ends the session; everyone is told.
    await specialist.page.locator("#end").click()
    await specialist.page.locator("#dialog-ok").click()
    for p in everyone:
        await (
            p.page.get_by_role("heading", name="The session has ended")
            .or_(p.page.get_by_role("heading", name="会诊已结束"))
            .wait_for()
        )

    # The record lists the four participants with their times.
    await village.page.get_by_role("link", name="Open the record").click()
    table = village.page.locator("#participants-1")
    await table.wait_for()
    rows = table.locator("tbody tr")
    assert await rows.count() == 4
    text = await table.inner_text()
    for name in ("王村医", "张医生", "陈教授", "Resident"):
        assert name in text, text
    for row in await rows.all():
        cells = await row.locator("td").all_inner_texts()
        assert cells[3] != "—" and cells[4] != "—", cells
    await village.page.locator("#record-chat", has_text="hello from the village").wait_for()
    await village.page.locator("#timeline", has_text="Recording started").wait_for()
    await village.page.locator("#timeline", has_text="Annotation").wait_for()

    # The composite is rendered after the session ended; the page follows it until it is ready.
    play = village.page.locator('#recordings li[data-state="complete"] button.play')
    await play.wait_for(timeout=RENDER_WAIT_S * 1000)
    await play.click()
    await assert_plays_and_seeks(village)
    await screenshot(village, "record-village")
    no_missing_strings(*everyone)


# The composite starts at the first recorded frame: at least this much is recorded.
RECORD_AT_LEAST_S = 8.0
# Rendering four tracks takes a core for a while on a shared two-core machine.
RENDER_WAIT_S = 600


async def assert_plays_and_seeks(party: Party) -> None:
    """The record page's player: time advances from the start, and after a seek from there."""
    video = party.page.locator("#playback")

    async def position() -> float:
        at: float = await video.evaluate("v => v.currentTime")
        return at

    async def diagnose() -> str:
        state = await video.evaluate(
            """v => ({t: v.currentTime, d: v.duration, paused: v.paused, ready: v.readyState,
                      error: v.error && v.error.message, src: v.currentSrc.split('?')[0]})"""
        )
        return f"{state}\n" + " | ".join(party.console[-15:])

    await eventually(lambda: _past(position, 1.0), "the recording to play", diagnose)
    duration: float = await video.evaluate("v => v.duration")
    assert duration > 4, duration
    # The middle of the recording: the cameras' pictures are there.
    target = round(duration / 2, 1)
    # Seeking ahead of what has played needs the server's byte ranges.
    landed: float = await video.evaluate(
        """(v, target) => new Promise(resolve => {
               v.addEventListener('seeked', () => resolve(v.currentTime), {once: true});
               v.currentTime = target; })""",
        target,
    )
    assert abs(landed - target) < 0.5, (landed, target)
    await eventually(lambda: _past(position, landed + 1.0), "playing on from the seek", diagnose)
    # What plays there is the cameras' colours, not black.
    brightness: float = await video.evaluate(
        """v => { const c = document.createElement('canvas'); c.width = 64; c.height = 36;
                  const g = c.getContext('2d'); g.drawImage(v, 0, 0, 64, 36);
                  const d = g.getImageData(0, 0, 64, 36).data; let s = 0;
                  for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
                  return s / (d.length / 4) / 3; }"""
    )
    assert brightness > 30, brightness


async def _past(position: Callable[[], Awaitable[float]], seconds: float) -> bool:
    return await position() > seconds


async def _has_stroke(tile: Any) -> bool:
    """The overlay canvas has drawn (non-transparent) pixels."""
    count: int = await tile.locator("canvas").evaluate(
        """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
    )
    return count > 20
