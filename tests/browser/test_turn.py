"""A clinic whose firewall blocks UDP: the village doctor's Chromium, in the lab's "village"
namespace with every UDP packet dropped both ways, reaches the relay only through TURN —
coturn in the server's namespace, over TCP on 3478 or over TLS on 443 — and holds a
consultation with the county physician (UDP allowed) through telemed. coturn relays to the
relay's own UDP host candidate, on the server's network. The page takes the TURN server and
its credentials from `joined` (minted for its seat); telemed is configured with one TURN URL
per run so that the transport used is the one under test.

TLS: the certificate is self-signed (made by the test with openssl, for the server's address)
and Chromium verifies TURN servers' certificates like any other (without trust it gathers no
relay candidate: error 701); the village browser's HOME holds an NSS database that trusts it.

Checked: video decoded and rising both ways; the village page's selected candidate pairs are
relays over the transport asked for (`getStats()`); coturn's log shows the village's seat's
allocations on that listener, and, once closed, the media they relayed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Browsers,
    Party,
    Server,
    assert_video_flows,
    eventually,
    start_server,
    stop_server,
)
from coturn import Coturn, Transport, trust_for_chromium
from labcall import (
    CLINIC,
    PEER,
    heard,
    lab_args,
    no_banner,
    received_tracks,
    stalled,
    telemed_call,
)
from netlab import Impairment, Lab

pytestmark = pytest.mark.browser

# The local candidate of each connection's selected pair (the transport's, as Chromium has it).
_SELECTED = """async (pc) => {
  if (!pc) return null;
  const stats = await pc.getStats();
  let pairId = null;
  stats.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
  });
  const pair = pairId && stats.get(pairId);
  const local = pair && stats.get(pair.localCandidateId);
  return local ? { type: local.candidateType, relayProtocol: local.relayProtocol ?? null,
                   address: local.address, url: local.url ?? null, state: pair.state } : null;
}"""


# RTP payload bytes the page's publish connection sent and its subscribe connection received.
_MEDIA_BYTES = """async () => {
  const { publish, subscribe } = window.telemedDebug.connections();
  let sent = 0, received = 0;
  (await publish.getStats()).forEach((s) => {
    if (s.type === "outbound-rtp") sent += s.bytesSent;
  });
  (await subscribe.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp") received += s.bytesReceived;
  });
  return [sent, received];
}"""


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with Lab([CLINIC, PEER]) as lab:
        await lab.impair(CLINIC, up=Impairment(block_udp=True), down=Impairment(block_udp=True))
        yield lab


@pytest.fixture
async def turn(lab: Lab, tmp_path: Path) -> AsyncIterator[Coturn]:
    # The relay runs beside coturn, on the server's address.
    srv = lab.address("srv")
    async with Coturn(tmp_path, srv, lab.exec_prefix("srv"), relay=srv) as turn:
        yield turn


async def selected(party: Party) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in ("publish", "subscribe"):
        found[name] = await party.page.evaluate(
            f"async () => ({_SELECTED})(window.telemedDebug.connections().{name})"
        )
    return found


async def media_bytes(party: Party) -> tuple[int, int]:
    sent, received = await party.page.evaluate(_MEDIA_BYTES)
    return int(sent), int(received)


async def turn_server(lab: Lab, turn: Coturn, tmp_path: Path, transport: Transport) -> Server:
    """telemed in the server's namespace, telling pages of one TURN URL: `transport`'s."""
    return await start_server(
        tmp_path,
        netns=lab.exec_prefix("srv"),
        address=lab.address("srv"),
        config=f'[turn]\nsecret = "{turn.secret}"\nurls = ["{turn.url(transport)}"]\n',
    )


async def turn_call(
    lab: Lab, turn: Coturn, browsers: Browsers, tmp_path: Path, server: Server
) -> tuple[Party, Party]:
    """The village doctor (no UDP; its browser trusts coturn's certificate) and the county
    physician in a consultation through telemed, video flowing both ways."""
    home = tmp_path / "village-home"
    await trust_for_chromium(home, turn.cert)
    village = await browsers.party(
        CLINIC, executable=lab.chromium(CLINIC), args=lab_args(server), files=False, home=home
    )
    county = await browsers.party(
        PEER, executable=lab.chromium(PEER), args=lab_args(server), files=False
    )
    await telemed_call(server, village, county)
    ids = {await village.participant_id(): CLINIC, await county.participant_id(): PEER}
    await assert_video_flows([village, county], ids)
    return village, county


async def assert_on_relays(village: Party, turn: Coturn, transport: Transport) -> None:
    """The village's media runs on TURN allocations, over the transport under test."""

    async def on_relays() -> bool:
        pairs = await selected(village)
        return all(p is not None and p["state"] == "succeeded" for p in pairs.values())

    await eventually(on_relays, "the village's connections to select their pairs")
    for name, local in (await selected(village)).items():
        assert local["type"] == "relay", (name, local)
        assert local["relayProtocol"] == transport, (name, local)
        assert local["address"] == turn.address, (name, local)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_a_clinic_without_udp_consults_through_turn(
    lab: Lab, turn: Coturn, browsers: Browsers, tmp_path: Path, transport: Transport
) -> None:
    server = await turn_server(lab, turn, tmp_path, transport)
    try:
        village, _ = await turn_call(lab, turn, browsers, tmp_path, server)
        village_id = await village.participant_id()
        await assert_on_relays(village, turn, transport)
        link = (await lab.counters())["links"][CLINIC]
        assert link["up"]["blocked"] > 0, link  # the page did try UDP, and it was dropped

        # coturn: the allocations of the village's seat, on the listener of the transport.
        def village_sessions() -> list[Any]:
            return [s for s in turn.sessions() if s.username.endswith(f":{village_id}")]

        port = 443 if transport == "tls" else 3478
        assert len(village_sessions()) >= 2, turn.log_text()[-3000:]
        assert all(s.tls is (transport == "tls") for s in village_sessions()), village_sessions()
        sent, received = await media_bytes(village)
        assert sent > 20_000 and received > 20_000, (sent, received)
        await village.browser.close()

        async def closed() -> bool:
            return all(s.peer_sent is not None for s in village_sessions())

        await eventually(closed, "coturn to close the village's allocations")
        sessions = village_sessions()
        assert all(s.local_port == port for s in sessions), sessions
        # All the media the page sent and received went through these allocations: coturn
        # relayed at least as many bytes (it counts the packets' headers, RTCP and ICE too).
        assert sum(s.peer_sent or 0 for s in sessions) >= sent, (sent, sessions)
        assert sum(s.peer_received or 0 for s in sessions) >= received, (received, sessions)
        # Neither the shared secret nor a minted password reached telemed's log.
        assert turn.secret not in server.log.read_text(errors="replace")
    finally:
        await stop_server(server)


async def test_a_clinic_on_turn_restarts_ice_through_new_allocations_on_a_new_address(
    lab: Lab, turn: Coturn, browsers: Browsers, tmp_path: Path
) -> None:
    """The village's router gets a new address: its TCP connections to coturn die with the
    old one, and its page restarts ICE on the same peer connections, gathering new relay
    candidates from the new address. The seat and the tracks stay; nobody hears it leave."""
    server = await turn_server(lab, turn, tmp_path, "tcp")
    try:
        village, county = await turn_call(lab, turn, browsers, tmp_path, server)
        await assert_on_relays(village, turn, "tcp")
        seat = await village.participant_id()
        tracks_at_county, churn_at_county = await received_tracks(county), await heard(county)
        restarts = await village.debug("iceRestarts()")
        before = len([s for s in turn.sessions() if s.username.endswith(f":{seat}")])

        async def diagnose() -> str:
            return (
                f"ice {await village.debug('ice()')}; selected {await selected(village)}\n"
                + " | ".join(village.console[-25:])
            )

        await lab.move(CLINIC, "10.99.0.43")
        await eventually(lambda: stalled(county), "the village's video to stop at the county")

        async def restarted() -> bool:
            return bool(await village.debug("iceRestarts()") > restarts)

        await eventually(restarted, "the village's page to restart ICE", diagnose)
        await eventually(lambda: no_banner(village), "the media banner to go", diagnose)
        ids = {seat: CLINIC, await county.participant_id(): PEER}
        await assert_video_flows([village, county], ids)
        await assert_on_relays(village, turn, "tcp")
        assert await village.participant_id() == seat
        assert await heard(county) == churn_at_county, await heard(county)
        assert await received_tracks(county) == tracks_at_county
        # New allocations for the seat's two connections, made from the new address.
        after = [s for s in turn.sessions() if s.username.endswith(f":{seat}")]
        assert len(after) >= before + 2, (before, after)
    finally:
        await stop_server(server)
