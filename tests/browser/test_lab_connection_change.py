"""A clinic's network changes under a consultation, in the network lab: the village doctor's
link first goes silent for a few seconds (every packet lost, both ways), then the clinic gets a
new address (`Lab.move`: the old one goes from its device, connections bound to it are dead).
Each time its page keeps its seat and, on the same two peer connections, ICE restarts and video
flows both ways again: the seat id is the same, the county physician's page heard no
participant leave or join and no track end or start, and receives the same track ids
(docs/protocol.md, Connection changes)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from conftest import (
    Browsers,
    Server,
    assert_video_flows,
    eventually,
)
from labcall import (
    CLINIC,
    heard,
    no_banner,
    open_pages,
    received_tracks,
    stalled,
    telemed_call,
)
from netlab import Impairment, Lab

pytestmark = pytest.mark.browser

SILENT_S = 6.0
NEW_ADDRESS = "10.99.0.42"


async def test_a_clinic_keeps_its_seat_and_media_through_silence_and_a_new_address(
    lab: Lab, lab_server: Server, browsers: Browsers
) -> None:
    village, county = await open_pages(lab, browsers, lab_server)
    await telemed_call(lab_server, village, county)
    ids = {await p.participant_id(): p.name for p in (village, county)}
    await assert_video_flows([village, county], ids)
    seat = await village.participant_id()
    tracks_at_county = await received_tracks(county)
    tracks_at_village = await received_tracks(village)
    churn_at_county = await heard(county)
    # The page's own peer connections, to tell a restart on them from new ones.
    await village.page.evaluate("window.connectionsBefore = window.telemedDebug.connections()")
    ufrags = await village.debug("ice()")

    async def diagnose() -> str:
        lines = [f"counters: {json.dumps((await lab.counters())['links'][CLINIC])}"]
        for p in (village, county):
            lines.append(f"{p.name} ice: {await p.debug('ice()')}")
            lines.append(f"{p.name} console: " + " | ".join(p.console[-25:]))
        return "\n".join(lines)

    async def same_connections() -> bool:
        return bool(
            await village.page.evaluate(
                "(() => { const now = window.telemedDebug.connections();"
                " return now.publish === window.connectionsBefore.publish"
                " && now.subscribe === window.connectionsBefore.subscribe; })()"
            )
        )

    async def check_unchanged(what: str) -> None:
        await assert_video_flows([village, county], ids)
        assert await village.participant_id() == seat, what
        assert await heard(county) == churn_at_county, (what, await heard(county))
        assert await received_tracks(county) == tracks_at_county, what
        assert await received_tracks(village) == tracks_at_village, what
        assert await same_connections(), what
        restarts = await village.debug("iceRestarts()")
        print(f"{what}: ice {await village.debug('ice()')}, restarts {restarts}")

    # 1. A few seconds of silence: nothing gets through either way.
    silent = Impairment(loss=1.0)
    await lab.impair(CLINIC, up=silent, down=silent)
    try:
        await eventually(
            lambda: stalled(county), "the village's video to stop at the county", diagnose
        )
        await asyncio.sleep(SILENT_S)
    finally:
        await lab.impair(CLINIC)
    await eventually(lambda: no_banner(village), "the media banner to go", diagnose)
    await check_unchanged("after the silence")

    # 2. A new address: the old one goes, with everything bound to it (the websocket too).
    restarts = await village.debug("iceRestarts()")
    await lab.move(CLINIC, NEW_ADDRESS)
    await eventually(lambda: stalled(county), "the village's video to stop at the county", diagnose)

    async def restarted() -> bool:
        return bool(await village.debug("iceRestarts()") > restarts)

    await eventually(restarted, "the village's page to restart ICE", diagnose)
    await eventually(lambda: no_banner(village), "the media banner to go", diagnose)
    await check_unchanged("after the move")
    now = await village.debug("ice()")
    # ICE restarted on both connections: each now carries new credentials.
    assert now["publish"]["ufrag"] != ufrags["publish"]["ufrag"], (ufrags, now)
    assert now["subscribe"]["ufrag"] != ufrags["subscribe"]["ufrag"], (ufrags, now)
    candidates: list[dict[str, Any]] = await village.page.evaluate(
        """async () => {
          const out = [];
          const report = await window.telemedDebug.connections().publish.getStats();
          report.forEach((s) => {
            if (s.type !== "transport" || !s.selectedCandidatePairId) return;
            const pair = report.get(s.selectedCandidatePairId);
            out.push(report.get(pair.localCandidateId));
          });
          return out;
        }"""
    )
    assert [c["address"] for c in candidates] == [NEW_ADDRESS], candidates
