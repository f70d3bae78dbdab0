"""Opus in-band FEC with real Chromium pages in the network lab: the village clinic's uplink
loses 5 % of its packets, the county physician's link is clean.

- The live page offers Opus as the captured offer of tests/fixtures does (which
  tests/test_opus_fec.py answers), and the relay's answer and its subscribe offer carry
  useinbandfec=1.
- The village publisher then sends FEC: the relay reads the LBRR flag in the Opus packets that
  arrive (its intake's fec_packets), and the county page's NetEQ counts the FEC packets the
  relay forwards (inbound-rtp fecPacketsReceived). The encoder adds FEC only when receiver
  reports show loss, so the clean-linked county publisher is the control.

Both microphones speak (conftest.write_voice): Opus codes the pure tone of the other browser
tests as music, in CELT mode, which carries no FEC whatever is negotiated."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Browsers, Party, Server, eventually, start_server, stop_server
from netlab import Impairment, Lab

pytestmark = [pytest.mark.browser, pytest.mark.lab]

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "chromium-156-publish-offer.sdp"
# Packets with FEC seen at the relay before the test is satisfied: about 4 s of audio.
FEC_PACKETS = 200


def opus_fmtp(sdp: str) -> list[str]:
    """The fmtp parameters of Opus in every audio section, as written."""
    found = []
    for section in re.split(r"\r?\n(?=m=)", sdp):
        if not section.startswith("m=audio"):
            continue
        payload_types = re.findall(r"a=rtpmap:(\d+) opus/48000/2", section)
        for pt in payload_types:
            match = re.search(rf"a=fmtp:{pt} (\S+)", section)
            found.append(match.group(1) if match else "")
    return found


async def seated(party: Party) -> bool:
    return bool(await party.page.evaluate("window.telemedDebug.phase() === 'room'"))


async def join(party: Party, server: Server, cid: str, token: str) -> None:
    await party.page.goto(f"{server.url}/web/room.html?c={cid}#token={token}")
    await party.page.locator("#join").click()
    await eventually(lambda: seated(party), f"{party.name} to be seated")


async def descriptions(party: Party, connection: str) -> dict[str, str | None]:
    """The page's `connection` ("publish" or "subscribe") as negotiated now (SDP)."""
    found: dict[str, str | None] = await party.page.evaluate(
        """(name) => {
          const pc = window.telemedDebug.connections()[name];
          return { local: pc?.localDescription?.sdp ?? null,
                   remote: pc?.remoteDescription?.sdp ?? null };
        }""",
        connection,
    )
    return found


async def received_audio(party: Party) -> dict[str, Any]:
    """The page's inbound audio stream that received the most (a two-party call has one)."""
    streams: list[dict[str, Any]] = await party.page.evaluate(
        """async () => {
          const out = [];
          const pc = window.telemedDebug.connections().subscribe;
          if (!pc) return out;
          (await pc.getStats()).forEach((s) => {
            if (s.type === "inbound-rtp" && s.kind === "audio") out.push({
              packetsReceived: s.packetsReceived ?? 0, packetsLost: s.packetsLost ?? 0,
              totalSamplesReceived: s.totalSamplesReceived ?? 0,
              concealedSamples: s.concealedSamples ?? 0,
              fecPacketsReceived: s.fecPacketsReceived ?? 0,
              fecPacketsDiscarded: s.fecPacketsDiscarded ?? 0,
            });
          });
          return out;
        }"""
    )
    return max(streams, key=lambda s: s["packetsReceived"], default={})


@dataclass
class FecCall:
    """The village doctor and the county physician in a call through the relay, both
    speaking (Opus codes a pure tone as music, CELT, which has no in-band FEC)."""

    server: Server
    cid: str
    token: str
    village: Party
    county: Party
    village_pid: str
    county_pid: str

    async def audio_tracks(self) -> dict[str, dict[str, Any]]:
        """The relay's figures of each participant's audio, by participant."""
        stats = await self.server.api("GET", f"/consultations/{self.cid}/media", self.token)
        return {t["participant"]: t for t in stats["tracks"] if t["kind"] == "audio"}

    async def diagnose(self) -> str:
        return (
            f"relay: {await self.audio_tracks()}\n"
            f"village receives: {await received_audio(self.village)}\n"
            f"county receives: {await received_audio(self.county)}"
        )


async def fec_call(lab: Lab, server: Server, browsers: Browsers) -> FecCall:
    demo = await server.demo()
    cid = demo["consultation"]["id"]
    tokens = {i["role"]: i["token"] for i in demo["identities"]}
    # The server's address is no secure context to Chromium (no microphone otherwise).
    secure = (f"--unsafely-treat-insecure-origin-as-secure={server.url}",)
    village = await browsers.party(
        "village", (200, 30, 30), 150, executable=lab.chromium("village"), args=secure, voice=True
    )
    county = await browsers.party(
        "county", (30, 160, 40), 210, executable=lab.chromium("county"), args=secure, voice=True
    )
    await join(village, server, cid, tokens["village_doctor"])
    await join(county, server, cid, tokens["county_physician"])
    return FecCall(
        server,
        cid,
        tokens["county_physician"],
        village,
        county,
        await village.participant_id(),
        await county.participant_id(),
    )


async def test_a_chromium_publisher_on_a_lossy_link_sends_fec_through_the_relay(
    tmp_path: Path, browsers: Browsers
) -> None:
    async with Lab(["village", "county"], seed=4) as lab:
        server = await start_server(
            tmp_path, netns=lab.exec_prefix("srv"), address=lab.address("srv")
        )
        try:
            await lab.impair("village", up=Impairment(loss=0.05))
            await check_fec(await fec_call(lab, server, browsers))
        finally:
            # The browsers run in the lab's namespaces: they go before the lab does.
            await browsers.close()
            await stop_server(server)


async def check_fec(call: FecCall) -> None:
    village, county = call.village, call.county

    async def negotiated(party: Party, connection: str) -> dict[str, str]:
        async def both() -> bool:
            d = await descriptions(party, connection)
            return bool(d["local"] and d["remote"] and opus_fmtp(d["remote"]))

        await eventually(both, f"{party.name}'s {connection} connection negotiated")
        return {k: v or "" for k, v in (await descriptions(party, connection)).items()}

    # The live page offers Opus as the fixture does; the relay's answer asks for FEC.
    publish = await negotiated(village, "publish")
    assert opus_fmtp(publish["local"]) == opus_fmtp(FIXTURE.read_text()), publish["local"]
    assert opus_fmtp(publish["remote"]) == ["useinbandfec=1"], publish["remote"]
    # The relay's offer to a subscriber declares FEC in every audio section.
    subscribe = await negotiated(county, "subscribe")
    assert opus_fmtp(subscribe["remote"]), subscribe["remote"]
    assert set(opus_fmtp(subscribe["remote"])) == {"useinbandfec=1"}, subscribe["remote"]

    async def fec_through() -> bool:
        tracks = await call.audio_tracks()
        at_relay = tracks.get(call.village_pid, {}).get("intake", {}).get("fec_packets", 0)
        heard = await received_audio(county)
        return at_relay >= FEC_PACKETS and heard.get("fecPacketsReceived", 0) > 0

    await eventually(
        fec_through, "FEC from the lossy publisher at the relay and beyond", call.diagnose
    )
    tracks = await call.audio_tracks()
    heard = await received_audio(county)
    village_in, county_in = tracks[call.village_pid]["intake"], tracks[call.county_pid]["intake"]
    print(
        f"village (5 % up): intake {village_in}; county (clean): intake {county_in}; "
        f"county page receives village's audio: {heard}"
    )
    # The loss FEC answers is on the village's link, and shows at the relay's intake; the
    # county's encoder, told of no loss, adds none.
    assert village_in["packets_lost"] > 0.02 * village_in["packets_expected"], village_in
    assert county_in["packets_lost"] <= 2, county_in
    assert county_in["fec_packets"] < 0.1 * village_in["fec_packets"], (county_in, village_in)


async def test_a_subscribers_lossy_downlink_gets_fec_from_a_clean_publisher(
    tmp_path: Path, browsers: Browsers
) -> None:
    """The relay forwards Opus packets as they come: the FEC a subscriber's lossy downlink
    needs is added by the publisher, whose link is clean, once the relay's receiver reports
    to it carry the subscriber's loss (media/opus.py). libwebrtc's encoder smooths the loss
    it is told over about ten seconds, hence the patience."""
    async with Lab(["village", "county"], seed=6) as lab:
        server = await start_server(
            tmp_path, netns=lab.exec_prefix("srv"), address=lab.address("srv")
        )
        try:
            await lab.impair("village", down=Impairment(loss=0.10))
            call = await fec_call(lab, server, browsers)

            async def fec_to_the_village() -> bool:
                tracks = await call.audio_tracks()
                from_county = tracks.get(call.county_pid, {}).get("intake", {})
                heard = await received_audio(call.village)
                return (
                    from_county.get("fec_packets", 0) >= FEC_PACKETS
                    and heard.get("fecPacketsReceived", 0) > 0
                )

            await eventually(
                fec_to_the_village,
                "FEC from the clean publisher for the lossy subscriber",
                call.diagnose,
            )
            tracks = await call.audio_tracks()
            county_in = tracks[call.county_pid]["intake"]
            (village_gets,) = [
                s
                for s in tracks[call.county_pid]["subscribers"]
                if s["participant"] == call.village_pid
            ]
            print(f"county (clean) intake {county_in}; the village receives it: {village_gets}")
            assert county_in["packets_lost"] <= 2, county_in  # the publisher's link is clean
            assert village_gets["fraction_lost"] is not None, village_gets
        finally:
            await browsers.close()
            await stop_server(server)
