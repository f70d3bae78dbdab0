"""/metrics: real counters, incremented where the event happens, that never go down when
someone leaves; gauges for what is current; the text parses with prometheus_client's parser;
each app has its own registry."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from signaling_fixtures import SPECIALIST, VILLAGE, ServerFactory, SignalingServer

from rooms.roles import Role

pytest_plugins = ["signaling_fixtures"]


async def scrape(server: SignalingServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_count_events_and_do_not_go_down_when_people_leave(
    start_sig_server: ServerFactory,
) -> None:
    server = await start_sig_server()
    other = await start_sig_server()
    cid = (await server.scheduled()).id
    village = await server.seated(VILLAGE, cid, label="village")
    specialist = await server.seated(SPECIALIST, cid, label="specialist")
    token, _ = await server.invite(cid, Role.RESIDENT)
    resident = await server.admitted(token, cid, village, label="resident")
    await resident.ok("chat", {"text": "你好"})
    await village.ok("chat", {"text": "请坐"})
    assert (await resident.refused("start_recording"))["code"] == "forbidden"

    before = await scrape(server)
    assert value(before, "telemed_seats_taken_total") == 3
    assert value(before, "telemed_chat_messages_total") == 2
    assert value(before, "telemed_signaling_connections") == 3
    assert value(before, "telemed_signaling_events_total", event="chat", result="ok") == 2
    assert (
        value(before, "telemed_signaling_events_total", event="start_recording", result="refused")
        == 1
    )

    await specialist.ok("leave")
    await specialist.close()
    after = await scrape(server)
    # What happened stays counted; what is current goes down.
    assert value(after, "telemed_seats_taken_total") == 3
    assert value(after, "telemed_chat_messages_total") == 2
    assert value(after, "telemed_participants_left_total") == 1
    assert value(after, "telemed_signaling_connections") == 2

    await village.ok("end_session")
    ended = await scrape(server)
    assert value(ended, "telemed_sessions_ended_total") == 1
    assert value(ended, "telemed_seats_taken_total") == 3
    # Another app in the same process has its own registry: nothing of this one's.
    elsewhere = await scrape(other)
    assert value(elsewhere, "telemed_seats_taken_total") == 0
    assert value(elsewhere, "telemed_sessions_ended_total") == 0
