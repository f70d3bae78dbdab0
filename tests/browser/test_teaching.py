"""A teaching session: a presenter and three trainees who come in through the waiting room,
watch and listen, and cannot publish."""

from __future__ import annotations

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
)

pytestmark = pytest.mark.browser


async def teaching_consultation(server: Server, demo: dict[str, Any]) -> str:
    """Requested by the village doctor with the county physician and the specialist on the team,
    accepted and scheduled by the county physician (the REST API, as tests/test_api.py does)."""
    ident = {i["role"]: i for i in demo["identities"]}
    team = [
        {"user_id": m["user_id"], "name": m["name"], "role": m["role"], "institution": m["org"]}
        for m in (ident["county_physician"], ident["provincial_specialist"])
    ]
    created = await server.api(
        "POST",
        "/consultations",
        ident["village_doctor"]["token"],
        {
            "kind": "teaching",
            "specialty": "respiratory",
            "resident": {
                "pseudonym": "r-0100",
                "display_name": "示教病例",
                "age": 66,
                "sex": "male",
            },
            "reason": "慢阻肺查体示教",
            "purpose": "教学",
            "requested_specialty": "respiratory",
            "requested_title": "主任医师",
            "team": team,
        },
    )
    cid: str = created["id"]
    county = ident["county_physician"]["token"]
    await server.api("POST", f"/consultations/{cid}/accept", county)
    await server.api(
        "POST",
        f"/consultations/{cid}/schedule",
        county,
        {"scheduled_time": "2026-12-01T09:00:00+08:00"},
    )
    return cid


async def seated(party: Party) -> bool:
    return bool(await party.page.evaluate("window.telemedDebug.phase() === 'room'"))


async def network_checked(party: Party) -> None:
    """The pre-join page's network check: the server answered and ICE gathered a candidate."""
    check = party.page.locator('#net-check[data-state="done"]')
    await check.wait_for()
    rtt = await check.get_attribute("data-rtt")
    assert rtt and float(rtt) > 0, await check.inner_text()
    assert int(await check.get_attribute("data-candidates") or 0) >= 1, await check.inner_text()
    assert "Network ready" in await check.inner_text()


async def test_teaching_session(server: Server, browsers: Browsers) -> None:
    demo = await server.demo()
    cid = await teaching_consultation(server, demo)
    specialist = next(i for i in demo["identities"] if i["role"] == "provincial_specialist")
    village = next(i for i in demo["identities"] if i["role"] == "village_doctor")

    presenter = await browsers.party("presenter", (30, 60, 200), 550)
    await presenter.page.goto(f"{server.url}/web/room.html?c={cid}#token={specialist['token']}")
    await network_checked(presenter)
    await screenshot(presenter, "prejoin-presenter")
    await presenter.page.locator("#join").click()
    await eventually(lambda: seated(presenter), "the presenter to open the session")

    trainees: list[Party] = []
    host = await browsers.party("trainee-browser")
    for n in range(3):
        invite = await server.api(
            "POST",
            f"/consultations/{cid}/invites",
            village["token"],
            {"role": "trainee", "name": f"学员{n}"},
        )
        trainee = await browsers.watcher(f"trainee{n}", host)
        await trainee.page.goto(f"{server.url}/web/room.html?c={cid}#token={invite['token']}")
        await trainee.page.get_by_text("You will watch and listen").wait_for()
        await network_checked(trainee)
        await trainee.page.locator("#join").click()
        await trainee.page.get_by_text("Waiting room").wait_for()
        admit = presenter.page.locator(".waiting button.primary")
        await admit.wait_for()
        await admit.click()
        await eventually(lambda trainee=trainee: seated(trainee), f"trainee {n} to be admitted")
        await trainee.page.locator("#layer").select_option("full")
        trainees.append(trainee)

    # No publish controls for trainees; everyone else's controls are there for the presenter.
    for control in ("#mic", "#cam", "#second"):
        assert await presenter.page.locator(control).count() == 1, control
        for trainee in trainees:
            assert await trainee.page.locator(control).count() == 0, (trainee.name, control)
    for trainee in trainees:
        assert await trainee.debug("publishing()") == []

    # Each trainee decodes the presenter's camera and hears the presenter.
    presenter_id = await presenter.participant_id()
    await assert_video_flows(trainees, {presenter_id: "presenter"})
    for trainee in trainees:
        base = await audio_by_participant(trainee)

        async def hears(trainee: Party = trainee, base: dict[str, float] = base) -> bool:
            now = await audio_by_participant(trainee)
            return now.get(presenter_id, 0) > base.get(presenter_id, 0)

        await eventually(hears, f"{trainee.name} to hear the presenter")

    # A publish forced through the page's library is refused by the server.
    for trainee in trainees:
        assert await trainee.debug("tryPublish()") == "forbidden"
    # And the presenter receives nothing from trainees.
    assert await presenter.debug("inbound()") == []
    no_missing_strings(presenter, *trainees)
