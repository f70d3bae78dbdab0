"""PYTEST_DONT_REWRITE
Calls in the network lab, measured the way the issue's table is: two Chromium pages with
Chromium's own fake camera (640x480, 20 fps) and a speaking microphone (conftest.write_voice),
the village doctor in the "village" namespace (the impaired clinic) and the county physician
in "county" (clean), either through telemed (the server in "srv") or calling each other
directly (no server; the same pages, the same impairment on the village's link). Each side's
receiving `getStats()` is read over a window after a warm-up, per direction: audio
concealment, video frames decoded per second, freezes, NACKs, PLIs, resolution and round-trip
time.

Used by the lab's browser tests (margins) and by bench/netlab.py (the figures)."""

from __future__ import annotations

import asyncio
import io
import itertools
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import av
from conftest import Browsers, Party, Server, eventually, sign_in_as
from netlab import Impairment, Lab

CLINIC = "village"
PEER = "county"

# The profiles of issue 11, applied to the village clinic's link: (uplink, downlink).
PROFILES: dict[str, tuple[Impairment, Impairment]] = {
    "clean": (Impairment(), Impairment()),
    "loss 2 %": (Impairment(loss=0.02), Impairment(loss=0.02)),
    "loss 5 %": (Impairment(loss=0.05), Impairment(loss=0.05)),
    "loss 10 %": (Impairment(loss=0.10), Impairment(loss=0.10)),
    "loss 5 %, 60 ± 20 ms": (
        Impairment(loss=0.05, delay_ms=60, jitter_ms=20),
        Impairment(loss=0.05, delay_ms=60, jitter_ms=20),
    ),
    # Gilbert-Elliott: bad for ~4 packets (everything lost) every ~100: about 4 % in bursts.
    "bursty (GE)": (
        Impairment(to_bad=0.01, to_good=0.25, bad_loss=1.0),
        Impairment(to_bad=0.01, to_good=0.25, bad_loss=1.0),
    ),
    "uplink 400 kbit/s": (Impairment(rate_kbps=400, queue_ms=500), Impairment()),
    "downlink 400 kbit/s": (Impairment(), Impairment(rate_kbps=400, queue_ms=500)),
}

# Reads one connection's receiving side: its inbound-rtp entries and the selected pair's RTT.
_STATS = """async (pc) => {
  const out = { inbound: [], rtt: null };
  if (!pc) return out;
  (await pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp") {
      out.inbound.push({
        kind: s.kind, ssrc: s.ssrc, mid: s.mid ?? "",
        concealedSamples: s.concealedSamples ?? 0,
        totalSamplesReceived: s.totalSamplesReceived ?? 0,
        concealmentEvents: s.concealmentEvents ?? 0,
        framesDecoded: s.framesDecoded ?? 0, freezeCount: s.freezeCount ?? 0,
        totalFreezesDuration: s.totalFreezesDuration ?? 0,
        frameWidth: s.frameWidth ?? 0, frameHeight: s.frameHeight ?? 0,
        nackCount: s.nackCount ?? 0, pliCount: s.pliCount ?? 0,
        packetsLost: s.packetsLost ?? 0, packetsReceived: s.packetsReceived ?? 0,
        fecPacketsReceived: s.fecPacketsReceived ?? 0, bytesReceived: s.bytesReceived ?? 0,
      });
    }
    if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") {
      out.rtt = s.currentRoundTripTime ?? out.rtt;
    }
  });
  return out;
}"""

# The direct call's page side: open the fake devices as the web client does, one connection.
_DIRECT_OPEN = """async () => {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: true, video: { width: { ideal: 640 }, height: { ideal: 480 } },
  });
  const pc = new RTCPeerConnection();
  stream.getTracks().forEach((t) => pc.addTrack(t, stream));
  // Rendered as the web client does: audio counts samples only when it plays out.
  pc.ontrack = (e) => {
    const el = document.createElement(e.track.kind);
    el.srcObject = new MediaStream([e.track]);
    el.autoplay = true;
    document.body.append(el);
    el.play().catch(() => {});
  };
  window.labPc = pc;
}"""
_GATHERED = """async (pc) => {
  if (pc.iceGatheringState !== "complete") {
    await new Promise((done) => pc.addEventListener("icegatheringstatechange",
      () => pc.iceGatheringState === "complete" && done()));
  }
  return pc.localDescription.sdp;
}"""


@dataclass
class Direction:
    """What one page received from the other over the window."""

    audio_concealed: float  # concealedSamples / totalSamplesReceived
    concealment_events: int
    fps: float
    freezes: int
    freeze_s: float
    nacks: int
    plis: int
    width: int
    height: int
    rtt_ms: float | None
    packets_lost: int
    fec_packets: int
    kbps: float  # audio and video received

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lab_args(server: Server) -> tuple[str, ...]:
    """Pages on the lab's server address are not `localhost`: let them open the camera."""
    return (f"--unsafely-treat-insecure-origin-as-secure={server.url}",)


async def open_pages(lab: Lab, browsers: Browsers, server: Server) -> tuple[Party, Party]:
    # Chromium's fake camera; microphones that speak, so that Opus is in its speech mode
    # (the fake beep is coded as music, which has no in-band FEC).
    village = await browsers.party(
        CLINIC,
        tone=150,
        executable=lab.chromium(CLINIC),
        args=lab_args(server),
        files=False,
        voice=True,
    )
    county = await browsers.party(
        PEER,
        tone=210,
        executable=lab.chromium(PEER),
        args=lab_args(server),
        files=False,
        voice=True,
    )
    return village, county


async def _seated(party: Party) -> bool:
    return bool(await party.page.evaluate("window.telemedDebug.phase() === 'room'"))


def _token(demo: dict[str, Any], role: str) -> str:
    token: str = next(i["token"] for i in demo["identities"] if i["role"] == role)
    return token


async def telemed_call(server: Server, village: Party, county: Party) -> None:
    """The village doctor opens the session from the list; the county physician joins by link."""
    demo = await server.demo()
    cid = demo["consultation"]["id"]
    token = _token(demo, "county_physician")
    await sign_in_as(village, server, "village_doctor")
    card = village.page.locator(f'article[data-consultation="{cid}"]')
    await card.locator("a", has_text="Open the room").click()
    await village.page.locator("#join").click()
    await eventually(lambda: _seated(village), "the village doctor to open the session")
    await county.page.goto(f"{server.url}/web/room.html?c={cid}#token={token}")
    await county.page.locator("#join").click()
    await eventually(lambda: _seated(county), "the county physician to be seated")


async def direct_call(server: Server, village: Party, county: Party) -> None:
    """The two pages call each other: offer and answer carried by the test (no trickle)."""
    for party in (village, county):
        await party.page.goto(f"{server.url}/healthz")
        await party.page.evaluate(_DIRECT_OPEN)
    await village.page.evaluate("async () => { await window.labPc.setLocalDescription(); }")
    offer = await village.page.evaluate(f"async () => ({_GATHERED})(window.labPc)")
    await county.page.evaluate(
        "async (sdp) => { await window.labPc.setRemoteDescription({type: 'offer', sdp});"
        " await window.labPc.setLocalDescription(); }",
        offer,
    )
    answer = await county.page.evaluate(f"async () => ({_GATHERED})(window.labPc)")
    await village.page.evaluate(
        "async (sdp) => window.labPc.setRemoteDescription({type: 'answer', sdp})", answer
    )


async def snapshot(party: Party, direct: bool, sender: str | None = None) -> dict[str, Any]:
    """`party`'s receiving stats; through telemed only of what `sender` (a participant id)
    sends, by the sections the page says carry it now."""
    if direct:
        stats: dict[str, Any] = await party.page.evaluate(f"async () => ({_STATS})(window.labPc)")
        return stats
    stats = await party.page.evaluate(
        f"async () => ({_STATS})(window.telemedDebug.connections().subscribe)"
    )
    sections = await party.page.evaluate("window.telemedDebug.sections()")
    if sender is not None:
        mids = {s["mid"] for s in sections if s["participant"] == sender}
        stats["inbound"] = [s for s in stats["inbound"] if s["mid"] in mids]
    return stats


def _one(stats: dict[str, Any], kind: str, like: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stream of `kind` that received the most (the other party sends one of each), or the
    same stream as `like`."""
    entries = [s for s in stats["inbound"] if s["kind"] == kind]
    if like is not None:
        entries = [s for s in entries if s["ssrc"] == like.get("ssrc")]
    if not entries:
        return {}
    return max(entries, key=lambda s: s["packetsReceived"])


def direction(before: dict[str, Any], after: dict[str, Any], seconds: float) -> Direction:
    a1, v1 = _one(after, "audio"), _one(after, "video")
    a0, v0 = _one(before, "audio", like=a1), _one(before, "video", like=v1)

    def delta(old: dict[str, Any], new: dict[str, Any], key: str) -> float:
        return float(new.get(key, 0)) - float(old.get(key, 0))

    samples = delta(a0, a1, "totalSamplesReceived")
    return Direction(
        audio_concealed=delta(a0, a1, "concealedSamples") / samples if samples > 0 else 1.0,
        concealment_events=int(delta(a0, a1, "concealmentEvents")),
        fps=delta(v0, v1, "framesDecoded") / seconds,
        freezes=int(delta(v0, v1, "freezeCount")),
        freeze_s=delta(v0, v1, "totalFreezesDuration"),
        nacks=int(delta(v0, v1, "nackCount")),
        plis=int(delta(v0, v1, "pliCount")),
        width=int(v1.get("frameWidth", 0)),
        height=int(v1.get("frameHeight", 0)),
        rtt_ms=None if after["rtt"] is None else after["rtt"] * 1000.0,
        packets_lost=int(delta(a0, a1, "packetsLost") + delta(v0, v1, "packetsLost")),
        fec_packets=int(delta(a0, a1, "fecPacketsReceived")),
        kbps=(delta(a0, a1, "bytesReceived") + delta(v0, v1, "bytesReceived")) * 8 / seconds / 1000,
    )


async def receiving(party: Party, direct: bool, sender: str | None) -> bool:
    """Whether the page decodes video and plays audio from the other side."""
    stats = await snapshot(party, direct, sender)
    return (
        _one(stats, "video").get("framesDecoded", 0) > 0
        and _one(stats, "audio").get("totalSamplesReceived", 0) > 0
    )


async def measure(
    village: Party, county: Party, direct: bool, warmup_s: float, window_s: float
) -> dict[str, Direction]:
    """Both directions over one window: "village→county" is the village's uplink at work,
    "county→village" its downlink."""
    senders: dict[str, str | None] = {CLINIC: None, PEER: None}
    if not direct:
        senders = {CLINIC: await county.participant_id(), PEER: await village.participant_id()}
    parties = (village, county)
    for party in parties:
        await eventually(
            lambda party=party: receiving(party, direct, senders[party.name]),
            f"{party.name} to receive media",
        )
    await asyncio.sleep(warmup_s)
    loop = asyncio.get_running_loop()
    before = {p.name: await snapshot(p, direct, senders[p.name]) for p in parties}
    start = loop.time()
    await asyncio.sleep(window_s)
    after = {p.name: await snapshot(p, direct, senders[p.name]) for p in parties}
    seconds = loop.time() - start
    return {
        "village→county": direction(before[PEER], after[PEER], seconds),
        "county→village": direction(before[CLINIC], after[CLINIC], seconds),
    }


# --- the recording of a lab call ------------------------------------------------------------


async def start_recording(server: Server, browsers: Browsers, village: Party) -> Party:
    """The resident, beside the village doctor (a page without devices in the village's
    browser, so on the village's link), is admitted and consents; the village doctor records."""
    demo = await server.demo()
    cid = demo["consultation"]["id"]
    resident = await browsers.watcher("resident", village)
    await resident.page.goto(f"{server.url}/web/room.html?c={cid}#token={_token(demo, 'resident')}")
    await resident.page.locator("#join").click()
    admit = village.page.locator(".waiting button.primary")
    await admit.wait_for()
    await admit.click()
    await resident.page.locator("dialog[open]").wait_for()
    await resident.page.locator("#consent-consultation").check()
    await resident.page.locator("#consent-recording").check()
    await resident.page.locator("#dialog-ok").click()
    await village.page.locator("#consent-state", has_text="recording: yes").wait_for()
    # Consent given, the resident leaves (it stands): the call measured stays two pages.
    gone = village.page.locator(f'#people li[data-participant="{await resident.participant_id()}"]')
    await resident.page.locator("#leave").click()
    await gone.wait_for(state="detached")
    await village.page.locator("#record").click()
    await village.page.locator("#rec-indicator:not([hidden])").wait_for()
    return resident


@dataclass
class RecordedAudio:
    """The gaps in one recorded Opus track, from its packets' timestamps."""

    seconds: float
    missing_share: float  # 20 ms packets missing / expected
    longest_gap_ms: float


def audio_gaps(webm: bytes) -> RecordedAudio:
    with av.open(io.BytesIO(webm)) as container:
        stream = container.streams.audio[0]
        times = sorted(
            float(p.pts * p.time_base)
            for p in container.demux(stream)
            if p.pts is not None and p.time_base is not None
        )
    steps = [b - a for a, b in itertools.pairwise(times)]
    frame = 0.020
    expected = (times[-1] - times[0]) / frame + 1 if times else 0
    return RecordedAudio(
        seconds=times[-1] - times[0] if times else 0.0,
        missing_share=1 - len(times) / expected if expected else 1.0,
        longest_gap_ms=max(steps, default=0.0) * 1000.0,
    )


async def stop_and_read_audio(server: Server, village: Party) -> dict[str, RecordedAudio]:
    """Stops the recording; each participant's recorded microphone, by role."""
    demo = await server.demo()
    cid = demo["consultation"]["id"]
    token = _token(demo, "village_doctor")
    await village.page.locator("#record").click()
    await village.page.locator("#rec-indicator").wait_for(state="hidden")

    async def complete() -> bool:
        record = await server.api("GET", f"/consultations/{cid}/record", token)
        audio = [r for r in record["recordings"] if r["source"] == "microphone"]
        return bool(audio) and all(r["state"] == "complete" for r in audio)

    async def states() -> str:
        record = await server.api("GET", f"/consultations/{cid}/record", token)
        return str([(r["kind"], r["role"], r["state"]) for r in record["recordings"]])

    await eventually(complete, "the recorded audio to be complete", states)
    record = await server.api("GET", f"/consultations/{cid}/record", token)
    out: dict[str, RecordedAudio] = {}
    async with aiohttp.ClientSession() as http:
        for r in record["recordings"]:
            if r["source"] != "microphone":
                continue
            async with http.get(
                f"{server.url}/api/v1/recordings/{r['id']}/content",
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                assert response.status == 200, response.status
                out[r["role"]] = audio_gaps(await response.read())
    return out


async def media_stats(server: Server) -> Any:
    """The relay's view of the room (per track: intake, each subscriber's layer and rates)."""
    demo = await server.demo()
    cid = demo["consultation"]["id"]
    return await server.api("GET", f"/consultations/{cid}/media", _token(demo, "village_doctor"))


# --- a page's view of the room, for connection changes --------------------------------------

# Events that would show a participant left and came back, or its tracks were renewed.
CHURN = ("participant_left", "participant_joined", "track_unpublished", "track_published")


async def heard(party: Party) -> dict[str, int]:
    """How often the page heard each CHURN event."""
    counts: dict[str, int] = await party.debug("heard()")
    return {name: counts.get(name, 0) for name in CHURN}


async def received_tracks(party: Party) -> set[str]:
    return {s["info"]["track_id"] for s in await party.debug("inbound()")}


async def stalled(party: Party) -> bool:
    """No new video frame decoded for a second."""

    async def frames() -> int:
        return sum(
            s["framesDecoded"]
            for s in await party.debug("inbound()")
            if s["info"]["kind"] == "video"
        )

    before = await frames()
    await asyncio.sleep(1.0)
    return await frames() == before


async def no_banner(party: Party) -> bool:
    return not await party.debug("mediaReconnecting()") and not await party.debug("reconnecting()")
