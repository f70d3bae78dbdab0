"""The two peer connections of a participant: the client publishes on one (the client offers),
and receives everyone else on the other (the server offers and renegotiates). One connection
per direction, so offers never collide."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription

from media.forwarding import ForwardedTrack, NodeCounters, Publication
from media.frame_sender import ReceiverReport, prepare_forwarding_sender
from media.frames import EncodedFrame, FrameSend
from media.ice_hosts import offer_host_addresses
from media.ice_restart import (
    IceRestartRefused,
    restart_on_next_offer,
    set_local_description,
    set_remote_description,
)
from media.layers import Layer, LayerChooser
from media.offer_sections import PublishLimits
from media.receiver_tap import request_keyframe, tap_receiver
from media.rtp_intake import demux_media_first

log = logging.getLogger(__name__)

# Every connection speaks the same codecs, so encoded frames pass through unchanged.
CODEC_OF_KIND = {"video": "video/VP8", "audio": "audio/opus"}
# Opus format parameters (RFC 7587) the relay declares in every answer and offer. A browser's
# encoder adds in-band FEC (each packet also carries the frame before it at a lower rate) only
# when the far end's fmtp says useinbandfec=1, and then only while receiver reports show loss.
# aiortc writes no fmtp for Opus, so without this a publisher sends no FEC at all. No usedtx:
# see docs/protocol.md (Media, Audio).
OPUS_PARAMETERS: dict[str, int] = {"useinbandfec": 1}


@dataclass(frozen=True)
class IceServer:
    urls: list[str]
    username: str | None = None
    credential: str | None = None

    def client_form(self) -> dict[str, Any]:
        """As a browser's RTCIceServer dictionary."""
        return {
            "urls": list(self.urls),
            **({"username": self.username} if self.username is not None else {}),
            **({"credential": self.credential} if self.credential is not None else {}),
        }


@dataclass(frozen=True)
class PeerConfig:
    # Empty by default: never a public STUN server unless configured.
    ice_servers: Sequence[IceServer] = ()
    # Host addresses to offer; None lets aioice choose (every interface but loopback).
    host_addresses: Sequence[str] | None = None
    # How much one participant may publish (sections per offer, tracks in all).
    publish_limits: PublishLimits = field(default_factory=PublishLimits)


def create_peer_connection(config: PeerConfig) -> RTCPeerConnection:
    return RTCPeerConnection(
        RTCConfiguration(
            iceServers=[
                RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
                for s in config.ice_servers
            ],
            # Every section on one transport from the start. aiortc's default (balanced) puts
            # each kind's first section on a transport of its own and later sections of that
            # kind on the same one; when the BUNDLE group then moves the first onto the main
            # transport, the later ones stay on the transport it stops. A subscribe offer with
            # two audio (or two video) sections at once lost the second.
            bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
        )
    )


def prefer_codec(transceiver: RTCRtpTransceiver, kind: str) -> None:
    wanted = CODEC_OF_KIND[kind]
    capabilities = RTCRtpSender.getCapabilities(kind)
    assert capabilities is not None
    codecs = [c for c in capabilities.codecs if c.mimeType == wanted]
    # Retransmission (rtx) stays available for the chosen video codec.
    codecs += [c for c in capabilities.codecs if c.mimeType == f"{kind}/rtx"]
    transceiver.setCodecPreferences(codecs)


class OfferRefused(ValueError):
    """An offer the relay cannot take; the message says why."""


def only_relay_codecs(offer_sdp: str) -> str:
    """The offer with every media section narrowed to the one codec the relay forwards (VP8,
    Opus, plus VP8's retransmission): the answer can then only pick those, whatever order the
    client preferred. Refuses text that is not SDP and sections without such a codec."""
    if not offer_sdp.lstrip().startswith("v=0"):
        raise OfferRefused("the offer is not SDP (it must start with v=0)")
    description = SessionDescription.parse(offer_sdp)
    media = [m for m in description.media if m.kind in CODEC_OF_KIND]
    if not media:
        raise OfferRefused("the offer has no audio or video section")
    for section in media:
        wanted = CODEC_OF_KIND[section.kind].lower()
        kept = [c for c in section.rtp.codecs if c.mimeType.lower() == wanted]
        if not kept:
            raise OfferRefused(
                f"section {section.rtp.muxId or '?'} offers no {CODEC_OF_KIND[section.kind]}"
            )
        chosen = {c.payloadType for c in kept}
        kept += [
            c
            for c in section.rtp.codecs
            if c.mimeType.lower() == f"{section.kind}/rtx" and c.parameters.get("apt") in chosen
        ]
        section.rtp.codecs = kept
        section.fmt = [c.payloadType for c in kept]
    return str(description)


def with_opus_parameters(sdp: str) -> str:
    """The description with OPUS_PARAMETERS on every Opus codec of its audio sections."""
    description = SessionDescription.parse(sdp)
    for section in description.media:
        if section.kind != "audio":
            continue
        for codec in section.rtp.codecs:
            if codec.mimeType.lower() == CODEC_OF_KIND["audio"]:
                codec.parameters = {**codec.parameters, **OPUS_PARAMETERS}
    return str(description)


async def set_local(pc: RTCPeerConnection, config: PeerConfig, offer: bool) -> str:
    if config.host_addresses is not None:
        offer_host_addresses(pc, config.host_addresses)
    description = await (pc.createOffer() if offer else pc.createAnswer())
    # aiortc takes back the description it made, with the Opus parameters added; what it sends
    # is unaffected (the relay packs frames itself).
    description = RTCSessionDescription(with_opus_parameters(description.sdp), description.type)
    await set_local_description(pc, description)
    demux_media_first(pc)
    return pc.localDescription.sdp


@dataclass
class IncomingTrack:
    """A track a client publishes, as the publish connection received it."""

    mid: str
    kind: str
    publication: Publication
    receiver: RTCRtpReceiver


class PublishConnection:
    """The connection a participant publishes on. Each received track becomes a Publication."""

    def __init__(
        self,
        config: PeerConfig,
        on_track: Callable[[IncomingTrack], None],
        counters: NodeCounters | None = None,
    ) -> None:
        self._config = config
        self._on_track = on_track
        self._counters = counters
        self.pc = create_peer_connection(config)
        self.tracks: dict[str, IncomingTrack] = {}
        self.pc.on("track", self._track)

    def _track(self, track: MediaStreamTrack) -> None:
        transceiver = next(t for t in self.pc.getTransceivers() if t.receiver.track is track)
        receiver = transceiver.receiver

        async def ask_for_keyframe() -> None:
            await request_keyframe(receiver)

        publication = Publication(track.kind, ask_for_keyframe, counters=self._counters)

        def forward(frame: EncodedFrame) -> None:
            publication.push(frame)

        tap_receiver(receiver, track.kind, forward)
        incoming = IncomingTrack(transceiver.mid or "", track.kind, publication, receiver)
        self.tracks[incoming.mid] = incoming
        self._on_track(incoming)

    async def answer(self, offer_sdp: str) -> str:
        """The answer to the client's offer; an offer with new ICE credentials (the client's
        network changed) restarts ICE on this connection, everything else carries on."""
        if self.pc.connectionState == "closed":
            raise OfferRefused(
                "the publish connection has closed (its network was gone for too long); "
                "publish on a new connection"
            )
        offer = RTCSessionDescription(only_relay_codecs(offer_sdp), "offer")
        try:
            await set_remote_description(self.pc, offer)
        except IceRestartRefused as exc:
            raise OfferRefused(f"the offer restarts ICE, which cannot be done now: {exc}") from None
        return await set_local(self.pc, self._config, offer=False)

    async def close(self) -> None:
        for incoming in self.tracks.values():
            incoming.publication.end()
        await self.pc.close()


# Receiver reports kept between two layer decisions (a browser sends a few a second).
REPORTS_KEPT = 32


@dataclass
class OutgoingTrack:
    # The published track this is (its full layer), and the track the sender reads now.
    publication: Publication
    track: ForwardedTrack
    transceiver: RTCRtpTransceiver
    remb_bps: int | None = None
    # The subscriber's receiver reports on this stream since the hub last took them.
    reports: list[ReceiverReport] = field(default_factory=list)
    layer: Layer = Layer.FULL
    chooser: LayerChooser = field(default_factory=LayerChooser)
    # Set by the subscriber; None lets the chooser decide.
    fixed_layer: Layer | None = None
    # Hears each receiver report as it comes (the hub undoes a failing probe at once).
    on_report: Callable[[OutgoingTrack, ReceiverReport], None] | None = None
    # The newest receiver report's (time.monotonic(), fraction lost), kept past take_reports.
    latest_loss: tuple[float, float] | None = None
    # What the layers fed before the current one sent.
    _frames_before: int = 0
    _bytes_before: int = 0
    _dropped_before: int = 0

    def _remb(self, bps: int) -> None:
        self.remb_bps = bps

    def _report(self, report: ReceiverReport) -> None:
        if len(self.reports) >= REPORTS_KEPT:
            del self.reports[0]
        self.reports.append(report)
        self.latest_loss = (time.monotonic(), report.fraction_lost)
        if self.on_report is not None:
            self.on_report(self, report)

    def take_reports(self) -> list[ReceiverReport]:
        reports, self.reports = self.reports, []
        return reports

    def _started(self, send: FrameSend) -> None:
        # The sender is up: the track it carries now pushes its frames to it.
        self.track.attach(send)

    @property
    def frames_out(self) -> int:
        """Frames sent to the subscriber, whichever layers they came from."""
        return self._frames_before + self.track.frames_out

    @property
    def bytes_out(self) -> int:
        return self._bytes_before + self.track.bytes_out

    @property
    def frames_dropped(self) -> int:
        return self._dropped_before + self.track.frames_dropped

    def feed_from(self, source: Publication) -> None:
        """Switches the sender to another layer of the same picture, without renegotiating."""
        if self.track.publication is source:
            return
        # Counted across layers: a rate must not restart from nothing at each switch.
        self._frames_before += self.track.frames_out
        self._bytes_before += self.track.bytes_out
        self._dropped_before += self.track.frames_dropped
        successor = source.subscribe()
        prepare_forwarding_sender(
            self.transceiver.sender,
            successor.request_keyframe,
            self._remb,
            self._started,
            self._report,
        )
        self.track.hand_over(successor)
        self.transceiver.sender.replaceTrack(successor)
        self.track = successor


@dataclass
class SubscribeConnection:
    """The connection a participant receives on. The server offers; adding or removing a track
    renegotiates, one negotiation at a time."""

    config: PeerConfig
    pc: RTCPeerConnection = field(init=False)
    tracks: dict[int, OutgoingTrack] = field(default_factory=dict)
    # Sections whose track went, waiting to carry the next track of their kind.
    _idle: list[OutgoingTrack] = field(default_factory=list)
    _negotiating: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.pc = create_peer_connection(self.config)

    def add(self, publication: Publication) -> OutgoingTrack:
        track = publication.subscribe()
        idle = next((o for o in self._idle if o.transceiver.kind == publication.kind), None)
        if idle is not None:
            # A section freed by a track that went: the sender's pending read moves on to the
            # new track, so the session description does not grow with every visitor.
            self._idle.remove(idle)
            transceiver = idle.transceiver
            idle.track.hand_over(track)
            transceiver.direction = "sendonly"
        else:
            transceiver = self.pc.addTransceiver(publication.kind, direction="sendonly")
            prefer_codec(transceiver, publication.kind)
        outgoing = OutgoingTrack(publication, track, transceiver)
        prepare_forwarding_sender(
            transceiver.sender,
            track.request_keyframe,
            outgoing._remb,
            outgoing._started,
            outgoing._report,
        )
        transceiver.sender.replaceTrack(track)
        self.tracks[id(publication)] = outgoing
        return outgoing

    def remove(self, publication: Publication) -> OutgoingTrack | None:
        outgoing = self.tracks.pop(id(publication), None)
        if outgoing is None:
            return None
        # Not ended: aiortc stops a sender for good when its track ends, and this section is
        # to carry the next track of its kind.
        outgoing.track.publication.detach(outgoing.track)
        outgoing.transceiver.direction = "inactive"
        self._idle.append(outgoing)
        return outgoing

    def restartable(self) -> bool:
        """Whether ICE can restart on this connection (it was established and is open);
        otherwise a restart needs a new connection."""
        return self.pc.connectionState != "closed" and self.pc.iceConnectionState == "completed"

    async def offer(self, restart_ice: bool = False) -> str:
        """The next offer; with `restart_ice`, one that restarts ICE (IceRestartRefused when
        the connection cannot, see `restartable`)."""
        await self._negotiating.acquire()
        try:
            if restart_ice:
                restart_on_next_offer(self.pc)
            return await set_local(self.pc, self.config, offer=True)
        except BaseException:
            self._negotiating.release()
            raise

    async def accept_answer(self, answer_sdp: str) -> None:
        try:
            await set_remote_description(self.pc, RTCSessionDescription(answer_sdp, "answer"))
        finally:
            if self._negotiating.locked():
                self._negotiating.release()

    async def close(self) -> None:
        for outgoing in [*self.tracks.values(), *self._idle]:
            outgoing.track.publication.unsubscribe(outgoing.track)
        self.tracks.clear()
        self._idle.clear()
        await self.pc.close()
