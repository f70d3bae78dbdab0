"""The relay's lean receive path (RTP handled in the socket's callback, media/rtp_intake.py
and media/receiver_tap.py): what aiortc's receiver did per packet still happens. A packet the
relay lost is asked for (NACK) and used when it comes again over RTX; the publisher gets
receiver reports, REMB and keyframe requests; the statistics the hub reads are counted."""

from __future__ import annotations

from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.codecs.vpx import vp8_depayload
from aiortc.rtp import RTCP_PSFB_APP, RTCP_PSFB_PLI, RtcpPsfbPacket, RtcpRrPacket
from media_peers import LOOPBACK, ColourCounterTrack, ToneTrack, local_description, wait_for

from media.frames import EncodedFrame
from media.peer import IncomingTrack, PeerConfig, PublishConnection
from media.receiver_tap import _vp8_data

SERVER = PeerConfig(host_addresses=LOOPBACK)


def test_the_vp8_descriptor_is_stripped_as_aiortc_does() -> None:
    for descriptor in (
        b"\x10",  # start of partition, no extension
        b"\x90\x80\x05",  # 7-bit picture id
        b"\x90\x80\x85\x01",  # 15-bit picture id
        b"\x90\xe0\x85\x01\x07\x40",  # picture id, TL0PICIDX, TID
        b"\x80\x10\x03",  # KEYIDX only
    ):
        payload = descriptor + b"\x9d\x01\x2a frame data"
        assert _vp8_data(payload) == vp8_depayload(payload)


async def test_loss_feedback_and_statistics_on_the_publish_connection() -> None:
    incoming: dict[str, IncomingTrack] = {}

    def published(track: IncomingTrack) -> None:
        incoming[track.kind] = track

    publish = PublishConnection(SERVER, published)
    publisher = RTCPeerConnection()
    try:
        video = publisher.addTrack(ColourCounterTrack((40, 200, 40)))
        publisher.addTrack(ToneTrack(330.0))
        answer = await publish.answer(await local_description(publisher, offer=True))
        await publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await wait_for(lambda: len(incoming) == 2, what="both tracks published")
        publication = incoming["video"].publication
        frames: list[EncodedFrame] = []
        publication.add_listener(frames.append)
        await wait_for(lambda: len(frames) >= 10, what="10 frames at the relay")

        # What the publisher hears from the relay.
        feedback: list[Any] = []
        handle_rtcp = video._handle_rtcp_packet

        async def noting(packet: Any) -> None:
            feedback.append(packet)
            await handle_rtcp(packet)

        video._handle_rtcp_packet = noting  # type: ignore[method-assign]

        # The relay loses one video packet (its header is readable before decryption).
        (dtls,) = {t.receiver.transport for t in publish.pc.getTransceivers()}
        intake: Any = dtls._telemed_intake  # type: ignore[attr-defined]
        receive = intake.receive
        dropped: list[tuple[int, int]] = []  # sequence number, RTP timestamp
        resent: list[int] = []

        def lossy(data: bytes) -> bool:
            ssrc = int.from_bytes(data[8:12], "big")
            if not dropped and ssrc == video._ssrc and len(frames) >= 20:
                dropped.append((int.from_bytes(data[2:4], "big"), int.from_bytes(data[4:8], "big")))
                return True
            if ssrc == video._rtx_ssrc:
                resent.append(ssrc)
            result: bool = receive(data)
            return result

        intake.receive = lossy
        await wait_for(lambda: bool(dropped) and bool(resent), what="the lost packet resent")
        lost_timestamp = dropped[0][1]
        await wait_for(
            lambda: any(f.timestamp == lost_timestamp for f in frames),
            what="the frame with the lost packet assembled from the retransmission",
        )
        assert publication.keyframe_requests == 0  # recovered without a keyframe

        publication.want_keyframe()
        await wait_for(
            lambda: any(isinstance(p, RtcpPsfbPacket) and p.fmt == RTCP_PSFB_PLI for p in feedback),
            what="the keyframe request at the publisher",
        )
        await wait_for(
            lambda: any(isinstance(p, RtcpRrPacket) for p in feedback), what="a receiver report"
        )
        reports = [r for p in feedback if isinstance(p, RtcpRrPacket) for r in p.reports]
        assert video._ssrc in {r.ssrc for r in reports}
        await wait_for(
            lambda: any(isinstance(p, RtcpPsfbPacket) and p.fmt == RTCP_PSFB_APP for p in feedback),
            what="a REMB",
        )

        for kind, track in incoming.items():
            stats = await track.receiver.getStats()
            inbound = [s for s in stats.values() if s.type == "inbound-rtp"]
            assert inbound and max(s.packetsReceived for s in inbound) > 0, kind
            transport = [s for s in stats.values() if s.type == "transport"]
            assert transport and transport[0].packetsReceived > 0
            assert track.receiver.getSynchronizationSources(), kind
    finally:
        await publisher.close()
        await publish.close()
