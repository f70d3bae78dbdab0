"""Opus in-band FEC: the relay asks for it in every description it makes (the answer to a
publisher, the offer to a subscriber), reads it in what arrives (media/opus.py, checked against
libopus's own `opus_packet_has_lbrr`), and counts it at its intake.

The publisher's offer is a real one, captured from Chromium 156 (tests/fixtures); the browser
test tests/browser/test_lab_fec.py checks that a live page still offers the same and that a
real Chromium publisher then sends FEC through the relay."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import fractions
import math
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription
from media_client import MediaRoom
from signaling_fixtures import eventually

from media.forwarding import Publication
from media.opus import (
    DOWNSTREAM_LOSS_CAP,
    DOWNSTREAM_REPORT_FRESH_S,
    has_fec,
    loss_to_report_upstream,
)
from media.peer import PeerConfig, PublishConnection, SubscribeConnection
from server.demo import COUNTY, VILLAGE

pytest_plugins = ["signaling_fixtures", "media_client"]

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHROMIUM_OFFER = FIXTURES / "chromium-156-publish-offer.sdp"
LOOPBACK = PeerConfig(host_addresses=["127.0.0.1"])


def chromium_offer() -> str:
    return "\r\n".join(CHROMIUM_OFFER.read_text().splitlines()) + "\r\n"


def opus_parameters(sdp: str) -> list[dict[str, Any]]:
    """The fmtp parameters of every Opus codec in the description's audio sections."""
    return [
        codec.parameters
        for section in SessionDescription.parse(sdp).media
        if section.kind == "audio"
        for codec in section.rtp.codecs
        if codec.mimeType.lower() == "audio/opus"
    ]


async def test_the_answer_to_a_chromium_offer_asks_for_inband_fec() -> None:
    offer = chromium_offer()
    assert opus_parameters(offer) == [{"minptime": 10, "useinbandfec": 1}]
    connection = PublishConnection(LOOPBACK, lambda _: None)
    try:
        answer = await connection.answer(offer)
    finally:
        await connection.close()
    (audio,) = [m for m in SessionDescription.parse(answer).media if m.kind == "audio"]
    (opus,) = audio.rtp.codecs
    assert (opus.mimeType.lower(), opus.payloadType) == ("audio/opus", 111)
    # FEC asked for; DTX not (docs/protocol.md, Audio, says why).
    assert opus.parameters == {"useinbandfec": 1}
    assert "a=fmtp:111 useinbandfec=1\r\n" in answer


async def test_a_subscribers_offer_declares_inband_fec() -> None:
    async def no_keyframe() -> None:
        pass

    connection = SubscribeConnection(LOOPBACK)
    try:
        connection.add(Publication("audio", no_keyframe))
        connection.add(Publication("video", no_keyframe))
        offer = await connection.offer()
    finally:
        await connection.close()
    assert opus_parameters(offer) == [{"useinbandfec": 1}]
    # The video section is untouched.
    video = [m for m in SessionDescription.parse(offer).media if m.kind == "video"]
    assert [c.parameters for c in video[0].rtp.codecs] == [{}, {"apt": 97}]


# --- reading FEC in packets --------------------------------------------------------------


def libopus() -> Any:
    """libopus as PyAV bundles it (1.5 or later has opus_packet_has_lbrr), else the system's."""
    candidates = sorted((Path(av.__file__).parent.parent / "av.libs").glob("libopus*"))
    system = ctypes.util.find_library("opus")
    for path in [*map(str, candidates), *([system] if system else [])]:
        lib = ctypes.CDLL(path)
        if hasattr(lib, "opus_packet_has_lbrr"):
            lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
            return lib
    raise AssertionError("no libopus with opus_packet_has_lbrr (1.5 or later) to check against")


def voice(index: int, samples: int, channels: int) -> np.ndarray:
    """A voice-like signal (harmonics of 180 Hz under a syllable-rate envelope, a little noise)
    as interleaved s16: libopus codes it with SILK, where LBRR lives."""
    t = (np.arange(samples) + index * samples) / 48_000
    wave = sum(np.sin(2 * math.pi * 180 * k * t) / k for k in range(1, 6))
    wave = wave * (0.5 + 0.5 * np.sin(2 * math.pi * 3 * t))
    wave = 0.1 * wave + 0.01 * np.random.default_rng(index).standard_normal(samples)
    mono = (wave * 32767).astype(np.int16)
    return np.repeat(mono, channels).reshape(1, -1)


def encode(options: dict[str, str], *, channels: int = 1, bit_rate: int = 32_000) -> list[bytes]:
    encoder: Any = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = 48_000
    encoder.layout = "mono" if channels == 1 else "stereo"
    encoder.format = "s16"
    encoder.bit_rate = bit_rate
    encoder.options = options
    packets: list[bytes] = []
    for index in range(150):
        frame = av.AudioFrame.from_ndarray(
            voice(index, 960, channels), format="s16", layout=encoder.layout.name
        )
        frame.sample_rate = 48_000
        frame.pts = index * 960
        frame.time_base = fractions.Fraction(1, 48_000)
        packets += [bytes(p) for p in encoder.encode(frame)]
    return packets


FEC_ON = {"application": "voip", "fec": "1", "packet_loss": "10"}


@pytest.mark.parametrize(
    ("options", "channels", "bit_rate"),
    [
        ({"application": "voip"}, 1, 32_000),
        (FEC_ON, 1, 32_000),
        (FEC_ON, 2, 32_000),
        (FEC_ON, 1, 12_000),  # SILK-only
        (FEC_ON, 2, 64_000),
        ({**FEC_ON, "frame_duration": "10"}, 1, 32_000),
        ({**FEC_ON, "frame_duration": "40"}, 2, 32_000),  # two frames a packet
        ({**FEC_ON, "frame_duration": "60"}, 1, 24_000),
        ({"application": "audio", "fec": "1", "packet_loss": "10"}, 1, 96_000),
    ],
)
def test_fec_is_read_as_libopus_reads_it(
    options: dict[str, str], channels: int, bit_rate: int
) -> None:
    lib = libopus()
    packets = encode(options, channels=channels, bit_rate=bit_rate)
    ours = [has_fec(p) for p in packets]
    theirs = [bool(lib.opus_packet_has_lbrr(p, len(p))) for p in packets]
    assert ours == theirs
    if options.get("fec") != "1":
        assert not any(ours)


def test_fec_is_there_when_the_encoder_is_asked_and_sees_loss() -> None:
    with_fec = encode(FEC_ON)
    assert sum(map(has_fec, with_fec)) > len(with_fec) / 2
    assert not any(map(has_fec, encode({**FEC_ON, "packet_loss": "0"})))
    assert not any(map(has_fec, encode({"application": "voip", "packet_loss": "10"})))


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        bytes([0x0B << 3]),  # SILK 60 ms, no frame data (DTX)
        bytes([31 << 3, 0xFF, 0xFF]),  # CELT-only: never LBRR
        bytes([(15 << 3) | 3, 0x41]),  # code 3, padding that runs past the end
        bytes([(15 << 3) | 2, 0xFD]),  # code 2, a two-byte length cut short
    ],
)
def test_packets_without_fec_or_too_short_are_read_safely(packet: bytes) -> None:
    assert not has_fec(packet)


# --- counting FEC at the relay's intake --------------------------------------------------


class EncodedVoice(MediaStreamTrack):
    """Opus packets encoded here (aiortc's sender forwards an av.Packet as it is): 20 ms of the
    voice signal every 20 ms, with libopus options `options`. `sent` keeps what went out."""

    kind = "audio"

    def __init__(self, options: dict[str, str]) -> None:
        super().__init__()
        self._encoder: Any = av.CodecContext.create("libopus", "w")
        self._encoder.sample_rate = 48_000
        self._encoder.layout = "mono"
        self._encoder.format = "s16"
        self._encoder.bit_rate = 32_000
        self._encoder.options = options
        self._pending: list[av.Packet] = []
        self._index = 0
        self._started: float | None = None
        self.sent: list[bytes] = []

    async def recv(self) -> av.Packet:  # type: ignore[override]
        while not self._pending:
            if self._started is None:
                self._started = time.monotonic()
            wait = self._started + self._index * 0.02 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            frame = av.AudioFrame.from_ndarray(
                voice(self._index, 960, 1), format="s16", layout="mono"
            )
            frame.sample_rate = 48_000
            frame.pts = self._index * 960
            frame.time_base = fractions.Fraction(1, 48_000)
            self._index += 1
            self._pending += self._encoder.encode(frame)
        packet = self._pending.pop(0)
        self.sent.append(bytes(packet))
        return packet


@pytest.mark.parametrize("fec", [True, False])
async def test_the_relay_counts_the_fec_packets_it_receives(
    media_room: MediaRoom, fec: bool
) -> None:
    lib = libopus()
    server = media_room.server
    cid = (await server.scheduled()).id
    county = await media_room.seated(COUNTY, cid, label="county")
    village = await media_room.seated(VILLAGE, cid, label="village")
    track = EncodedVoice(FEC_ON if fec else {"application": "voip"})
    assert await county.publish([(track, "microphone")]) == {"ok": True}
    county_pid = county.peer.participant_id
    await eventually(lambda: len(village.offered_from(county_pid, "audio")) == 1, "the offer")
    (audio_id,) = village.offered_from(county_pid, "audio")
    await eventually(lambda: village.frames_of(audio_id) >= 100, "100 packets at the subscriber")
    track.stop()

    async def counted() -> dict[str, Any] | None:
        stats = await media_room.hub.stats(cid)
        intake: dict[str, Any] = next(
            t["intake"] for t in stats["tracks"] if t["track_id"] == audio_id
        )
        # Everything sent was received (loopback): the counts are complete.
        return intake if intake["packets_expected"] == len(track.sent) else None

    intake = await eventually(counted, "the intake to have counted every packet sent")
    carried = sum(1 for p in track.sent if lib.opus_packet_has_lbrr(p, len(p)))
    assert intake["fec_packets"] == carried
    assert (carried > len(track.sent) / 2) if fec else carried == 0


def test_the_loss_told_upstream_is_the_worst_fresh_report_capped() -> None:
    now = 100.0
    stale = now - DOWNSTREAM_REPORT_FRESH_S - 0.1
    assert loss_to_report_upstream([], now) == 0.0
    assert loss_to_report_upstream([(now - 1, 0.02), (now - 0.5, 0.07)], now) == 0.07
    assert loss_to_report_upstream([(stale, 0.15), (now, 0.01)], now) == 0.01
    assert loss_to_report_upstream([(stale, 0.15)], now) == 0.0
    assert loss_to_report_upstream([(now, 0.6)], now) == DOWNSTREAM_LOSS_CAP
