"""The media side of live rooms: who publishes what, who receives it, and the renegotiation
that follows. Ids are plain strings; what a participant may do is decided before the hub is
called (signaling asks rooms/), so the hub only moves media."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from media.errors import MediaError as MediaError
from media.forwarding import NodeCounters, Publication
from media.frame_sender import ReceiverReport, subscriber_figures
from media.ice_restart import IceRestartRefused
from media.layers import LOW_BPS, Layer, LayerChooser, LinkMonitor, LinkSample, video_budget
from media.low_layer import LowLayer
from media.offer_sections import offered_sections, publishing_sources
from media.opus import loss_to_report_upstream
from media.peer import (
    IncomingTrack,
    OfferRefused,
    OutgoingTrack,
    PeerConfig,
    PublishConnection,
    SubscribeConnection,
)
from media.receiver_tap import intake_figures, report_downstream_loss, uplink_estimate_bps
from media.stats import LossBook, RateBook

log = logging.getLogger(__name__)

# The once-a-second sampler woke this much late: the relay's event loop was held up.
HELD_UP_S = 0.25
# A low layer nobody receives is kept this long (longer than a probe's trial).
LOW_LINGER_S = 8.0


@dataclass(frozen=True)
class TrackInfo:
    """A published track as others are told about it."""

    track_id: str
    participant: str
    kind: str
    source: str

    def public(self) -> dict[str, str]:
        return {
            "track_id": self.track_id,
            "participant": self.participant,
            "kind": self.kind,
            "source": self.source,
        }


@dataclass
class _Published:
    info: TrackInfo
    publication: Publication
    # The publisher's section on this worker's publish connection; None for a track piped
    # from the room's worker (media/pipe.py), whose publisher's link that worker watches.
    incoming: IncomingTrack | None


@dataclass
class _Member:
    participant: str
    may_subscribe: bool
    publish: PublishConnection | None = None
    subscribe: SubscribeConnection | None = None
    published: dict[str, _Published] = field(default_factory=dict)  # by track id
    # Tracks the publish connection received during the current negotiation.
    arrived: list[IncomingTrack] = field(default_factory=list)
    offer_in_flight: bool = False
    offer_again: bool = False
    # The next subscribe offer restarts ICE (the subscriber's network changed).
    restart_wanted: bool = False
    # The subscribe offer in flight, as sent: sent again when the seat moves to a new
    # signaling connection before its answer came.
    pending_offer: tuple[str, dict[str, TrackInfo]] | None = None
    # Which outgoing transceiver (mid) carries which track, as last offered.
    mids: dict[str, str] = field(default_factory=dict)
    # The subscriber's own choice for every video track it receives, those that come later
    # included; None lets the bandwidth estimate decide.
    layer_choice: Layer | None = None
    # What its downlink reports, judged once a second for the layer decisions.
    link: LinkMonitor = field(default_factory=LinkMonitor)


INTAKE = "intake"
SUBSCRIBER = "subscriber"
CLOCK_RATE = {"video": 90_000, "audio": 48_000}


@dataclass(frozen=True)
class HopFigures:
    """Loss on one hop of one track: the publisher's link into the relay (`direction`
    INTAKE, `participant` the publisher) or the relay's link to one subscriber (SUBSCRIBER,
    `participant` the subscriber). `counts` are cumulative for the track's life on that hop
    (counted where each event happens); `gauges` are current values. Either is None while
    unknown (before the subscriber's first receiver report). The names are those of
    media/receiver_tap.py's IntakeFigures and media/frame_sender.py's SubscriberFigures."""

    consultation: str
    participant: str
    track: TrackInfo
    direction: str
    counts: dict[str, int | None]
    gauges: dict[str, float | None]

    def public(self) -> dict[str, Any]:
        return {**self.counts, **self.gauges}


# Per kind, what is counted on the publisher's hop: the rest never happens to that kind
# (audio is never repaired nor asked for keyframes; only Opus carries in-band FEC).
_INTAKE_COUNTS = {
    "audio": (
        "packets_expected",
        "packets_received",
        "packets_lost",
        "packets_given_up",
        "packets_late",
        "fec_packets",
    ),
    "video": (
        "packets_expected",
        "packets_received",
        "packets_lost",
        "packets_given_up",
        "packets_late",
        "packets_retransmitted",
        "frames_given_up",
        "frames_skipped",
        "nacks_sent",
        "plis_sent",
    ),
}
_SUBSCRIBER_COUNTS = {
    "audio": ("packets_sent",),
    "video": ("packets_sent", "retransmitted", "keyframe_requests"),
}


# Called with (room, participant, sdp, tracks by mid) when a subscriber must take a new offer.
OfferSink = Callable[[str, str, str, dict[str, TrackInfo]], Awaitable[None]]
# Called with (room, subscriber, track info, layer) when a subscriber's layer of a track changes.
LayerSink = Callable[[str, str, TrackInfo, Layer], Awaitable[None]]
# A room's watcher (a recorder) hears of each track published (with what carries its frames)
# and each track that ends.
TrackPublished = Callable[[TrackInfo, Publication], None]
TrackUnpublished = Callable[[TrackInfo], None]


class MediaHub:
    def __init__(self, config: PeerConfig, send_offer: OfferSink, tell_layer: LayerSink) -> None:
        self._config = config
        self._send_offer = send_offer
        self._tell_layer = tell_layer
        self._rooms: dict[str, dict[str, _Member]] = {}
        self._rates = RateBook()
        self._intake_loss = LossBook()
        self._counters = NodeCounters()
        self._sampler: asyncio.Task[None] | None = None
        # Low layers by id of their source publication; each exists while someone receives it
        # (and for LOW_LINGER_S after).
        self._low: dict[int, LowLayer] = {}
        # Since when (event loop time) each low layer has had no subscriber.
        self._low_unused_since: dict[int, float] = {}
        self._watchers: dict[str, tuple[TrackPublished, TrackUnpublished]] = {}
        # Announcements of layer changes made outside the sampler (a probe undone at once).
        self._telling: set[asyncio.Future[None]] = set()

    def members(self, room: str) -> list[str]:
        return list(self._rooms.get(room, {}))

    def tracks(self, room: str) -> list[TrackInfo]:
        return [p.info for m in self._rooms.get(room, {}).values() for p in m.published.values()]

    @property
    def counters(self) -> NodeCounters:
        return self._counters

    def publications(self, room: str) -> list[tuple[TrackInfo, Publication]]:
        """The tracks published on this worker's connections in `room` (not those piped
        here), with what carries their frames."""
        return [
            (p.info, p.publication)
            for m in self._rooms.get(room, {}).values()
            for p in m.published.values()
            if p.incoming is not None
        ]

    async def enter(self, room: str, participant: str, may_subscribe: bool) -> None:
        """A participant is seated: they will receive every track of the room (if allowed)."""
        if self._sampler is None:
            self._sampler = asyncio.ensure_future(self._sample_every_second())
        members = self._rooms.setdefault(room, {})
        if participant in members:
            return
        member = _Member(participant, may_subscribe)
        members[participant] = member
        if may_subscribe and self.tracks(room):
            self._subscribe_all(room, member)
            await self._negotiate(room, member)

    def offered_sources(self, offer_sdp: str, sources: dict[str, str]) -> dict[str, str]:
        """The source (by mid) of every section of a publish offer that would publish, if the
        offer meets the rules that depend on it alone (media/offer_sections.py): what the
        publisher's permissions must cover. MediaError, with a code, otherwise."""
        return publishing_sources(offered_sections(offer_sdp), sources, self._config.publish_limits)

    async def publish(
        self, room: str, participant: str, offer_sdp: str, sources: dict[str, str]
    ) -> tuple[str, list[TrackInfo]]:
        """Answers the participant's publish offer. `sources` names each offered media section
        (by mid) as camera, microphone, screen or field_camera; every section that would
        publish must be named (see `offered_sources`), and a section published before keeps
        its source. Returns the answer and the tracks that are new."""
        member = self._member(room, participant)
        wanted = self.offered_sources(offer_sdp, sources)
        kept = {p.incoming.mid: p.info for p in member.published.values() if p.incoming}
        for mid, source in wanted.items():
            if mid in kept and kept[mid].source != source:
                raise MediaError(
                    f"section {mid} is published as {kept[mid].source}; it cannot become {source}",
                    "source_mismatch",
                )
        new = [mid for mid in wanted if mid not in kept]
        limit = self._config.publish_limits.max_tracks
        if len(member.published) + len(new) > limit:
            raise MediaError(
                f"you publish {len(member.published)} tracks and the offer adds {len(new)}; "
                f"a participant publishes at most {limit}",
                "too_many_tracks",
            )
        if member.publish is None:
            member.publish = PublishConnection(self._config, member.arrived.append, self._counters)
        member.arrived.clear()
        try:
            answer = await member.publish.answer(offer_sdp)
        except OfferRefused as exc:
            raise MediaError(str(exc)) from None
        except Exception as exc:
            raise MediaError(f"the offer could not be accepted: {exc}") from None
        added: list[TrackInfo] = []
        for incoming in member.arrived:
            named = wanted.get(incoming.mid)
            if named is None or incoming.mid in kept:
                # Not a section the rules let through: never published under a guessed name.
                log.warning(
                    "unexpected %s track on mid %r ignored", incoming.kind, incoming.mid[:32]
                )
                continue
            info = TrackInfo(f"t_{uuid.uuid4().hex[:12]}", participant, incoming.kind, named)
            member.published[info.track_id] = _Published(info, incoming.publication, incoming)
            added.append(info)
            self._tell_watcher(room, info, incoming.publication)
        if added:
            await self._fan_out(room, participant)
        return answer, added

    async def accept_answer(self, room: str, participant: str, answer_sdp: str) -> None:
        member = self._member(room, participant)
        if member.subscribe is None or not member.offer_in_flight:
            raise MediaError("there is no subscribe offer waiting for an answer")
        try:
            await member.subscribe.accept_answer(answer_sdp)
        except Exception as exc:
            raise MediaError(f"the answer could not be accepted: {exc}") from None
        finally:
            member.offer_in_flight = False
            member.pending_offer = None
        if member.offer_again:
            member.offer_again = False
            await self._negotiate(room, member)

    def pause(self, room: str, participant: str, kind: str, paused: bool) -> int:
        """Stops (or resumes) forwarding a participant's tracks of one kind to everyone, at once.
        Returns how many tracks it touched."""
        member = self._member(room, participant)
        touched = [p for p in member.published.values() if p.info.kind == kind]
        for published in touched:
            published.publication.set_muted(paused)
        return len(touched)

    async def restart_subscribe(self, room: str, participant: str) -> str:
        """The subscriber's network changed: ICE restarts on its subscribe connection with the
        next offer ("restarted"), or, where the connection is gone or never came up, a new
        subscribe connection carries the same tracks ("replaced"; the client sees a new
        certificate in the offer). "none" when it receives nothing yet. No one else notices."""
        member = self._member(room, participant)
        subscribe = member.subscribe
        if subscribe is None:
            return "none"
        if not subscribe.restartable():
            await self._replace_subscribe(room, member)
            return "replaced"
        await self._negotiate(room, member, restart_ice=True)
        return "restarted"

    def media_alive(self, room: str, participant: str) -> bool:
        """Whether the participant's peer connections can carry on (none has closed): a seat
        resumed on a new signaling connection then keeps them, and the client restarts ICE."""
        member = self._rooms.get(room, {}).get(participant)
        if member is None:
            return False
        connections = [c.pc for c in (member.publish, member.subscribe) if c is not None]
        return all(pc.connectionState != "closed" for pc in connections)

    async def resend_offer(self, room: str, participant: str) -> None:
        """The subscribe offer still waiting for its answer, again: its seat moved to a new
        signaling connection, and the old one may have lost it."""
        member = self._rooms.get(room, {}).get(participant)
        if member is not None and member.offer_in_flight and member.pending_offer is not None:
            sdp, by_mid = member.pending_offer
            await self._send_offer(room, participant, sdp, by_mid)

    async def _replace_subscribe(self, room: str, member: _Member) -> None:
        old = member.subscribe
        member.subscribe = None
        member.offer_in_flight = member.offer_again = member.restart_wanted = False
        member.pending_offer = None
        if old is not None:
            await old.close()
            self._release_unused_low_layers()
        self._subscribe_all(room, member)
        await self._negotiate(room, member)

    async def leave(
        self, room: str, participant: str, *, renegotiate: bool = True
    ) -> list[TrackInfo]:
        """Closes the participant's connections; their tracks end everywhere. Returns them."""
        members = self._rooms.get(room, {})
        member = members.pop(participant, None)
        if member is None:
            return []
        gone = [p.info for p in member.published.values()]
        for info in gone:
            self._tell_watcher(room, info, None)
        for published in member.published.values():
            self._unsubscribe_everyone(members, published)
        if member.publish is not None:
            await member.publish.close()
        if member.subscribe is not None:
            await member.subscribe.close()
        self._release_unused_low_layers()
        if not members:
            self._rooms.pop(room, None)
        elif gone and renegotiate:
            for other in members.values():
                if other.subscribe is not None:
                    await self._negotiate(room, other)
        return gone

    def _unsubscribe_everyone(self, members: dict[str, _Member], published: _Published) -> None:
        for other in members.values():
            if other.subscribe is not None:
                other.subscribe.remove(published.publication)
        low = self._low.pop(id(published.publication), None)
        self._low_unused_since.pop(id(published.publication), None)
        if low is not None:
            low.close()

    # --- tracks piped from the room's worker (a room larger than one worker) ---------------

    async def add_piped(self, room: str, info: TrackInfo, publication: Publication) -> None:
        """A track of a room whose worker is another, piped here (media/pipe.py) for the
        receive-only seats this worker serves: they receive it like any other. Its publisher
        is a member here with no connection of its own."""
        if self._sampler is None:
            self._sampler = asyncio.ensure_future(self._sample_every_second())
        members = self._rooms.setdefault(room, {})
        publisher = members.get(info.participant)
        if publisher is None:
            publisher = members[info.participant] = _Member(info.participant, may_subscribe=False)
        publisher.published[info.track_id] = _Published(info, publication, None)
        await self._fan_out(room, info.participant)

    async def remove_piped(self, room: str, track_id: str) -> None:
        """The piped track ended on the room's worker: it ends here too."""
        members = self._rooms.get(room, {})
        for member in list(members.values()):
            published = member.published.get(track_id)
            if published is None or published.incoming is not None:
                continue
            del member.published[track_id]
            self._unsubscribe_everyone(members, published)
            published.publication.end()
            self._release_unused_low_layers()
            if not member.published and member.publish is None and member.subscribe is None:
                del members[member.participant]
            if not members:
                self._rooms.pop(room, None)
                return
            for other in members.values():
                if other.subscribe is not None:
                    await self._negotiate(room, other)
            return

    async def close_room(self, room: str) -> None:
        for participant in list(self._rooms.get(room, {})):
            await self.leave(room, participant, renegotiate=False)

    async def stop(self) -> None:
        for task in list(self._telling):
            task.cancel()
        await asyncio.gather(*self._telling, return_exceptions=True)
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        for room in list(self._rooms):
            await self.close_room(room)

    # --- watching a room's tracks (recording) ----------------------------------------------

    def watch_tracks(
        self, room: str, on_published: TrackPublished, on_unpublished: TrackUnpublished
    ) -> None:
        """`on_published` is called at once for each track the room has, then for each track
        published until `unwatch_tracks(room)`; `on_unpublished` for each that ends. One
        watcher per room; both are called synchronously and must not block."""
        if room in self._watchers:
            raise MediaError("the room's tracks are already watched")
        self._watchers[room] = (on_published, on_unpublished)
        for member in list(self._rooms.get(room, {}).values()):
            for published in list(member.published.values()):
                self._tell_watcher(room, published.info, published.publication)

    def unwatch_tracks(self, room: str) -> None:
        self._watchers.pop(room, None)

    def _tell_watcher(self, room: str, info: TrackInfo, publication: Publication | None) -> None:
        """Tells the room's watcher that `info` was published (with its publication) or, with
        None, that it ended."""
        watcher = self._watchers.get(room)
        if watcher is None:
            return
        try:
            if publication is not None:
                watcher[0](info, publication)
            else:
                watcher[1](info)
        except Exception:
            # A watcher's fault must not break publishing or leaving.
            log.exception("track watcher of %s failed", room)

    # --- layers ------------------------------------------------------------------------------

    def set_layer(
        self, room: str, participant: str, track_id: str | None, layer: Layer | None
    ) -> int:
        """The subscriber's own choice for one video track, or (without `track_id`) for every
        video track it receives now and every one it receives later; None hands the choice
        back to the bandwidth estimate. Returns how many tracks it applies to now."""
        member = self._member(room, participant)
        if track_id is None:
            member.layer_choice = layer
        if member.subscribe is None:
            if track_id is not None:
                raise MediaError(f"you receive no video track {track_id}")
            return 0
        ids = {
            id(p.publication): p.info
            for m in self._rooms[room].values()
            for p in m.published.values()
        }
        chosen = [
            o
            for key, o in member.subscribe.tracks.items()
            if o.publication.kind == "video"
            and key in ids
            and (track_id is None or ids[key].track_id == track_id)
        ]
        if track_id is not None and not chosen:
            raise MediaError(f"you receive no video track {track_id}")
        for outgoing in chosen:
            self._fix_layer(outgoing, layer)
        return len(chosen)

    def _fix_layer(self, outgoing: OutgoingTrack, layer: Layer | None) -> None:
        outgoing.fixed_layer = layer
        if layer is None:
            # The estimate decides again, from what is being sent now.
            outgoing.chooser = LayerChooser(current=outgoing.layer)
        else:
            self._apply_layer(outgoing, layer)

    def _info(self, room: str, publication: Publication) -> TrackInfo | None:
        return next(
            (
                p.info
                for m in self._rooms.get(room, {}).values()
                for p in m.published.values()
                if p.publication is publication
            ),
            None,
        )

    def _apply_layer(self, outgoing: OutgoingTrack, layer: Layer) -> None:
        if outgoing.publication.kind != "video" or layer is outgoing.layer:
            return
        if layer is Layer.LOW:
            outgoing.feed_from(self._low_layer(outgoing.publication).publication)
            outgoing.track.pause(False)
        else:
            # Audio only keeps the full layer's track, paused: nothing is transcoded for it.
            outgoing.feed_from(outgoing.publication)
            outgoing.track.pause(layer is Layer.AUDIO_ONLY)
        outgoing.layer = layer
        self._release_unused_low_layers()

    def _low_layer(self, source: Publication) -> LowLayer:
        low = self._low.get(id(source))
        if low is None:
            low = LowLayer(source)
            self._low[id(source)] = low
        return low

    def _release_unused_low_layers(self) -> None:
        """Closes the low layers nobody has received for LOW_LINGER_S: a probe of the full
        picture that fails comes back to a running low layer (its next frame a keyframe),
        not to a new one that must first wait for a keyframe of the publisher's."""
        now = asyncio.get_running_loop().time()
        for key, low in list(self._low.items()):
            if low.publication.subscriber_count:
                self._low_unused_since.pop(key, None)
                continue
            if now - self._low_unused_since.setdefault(key, now) >= LOW_LINGER_S:
                del self._low[key]
                del self._low_unused_since[key]
                low.close()

    def _pass_downstream_loss_upstream(self, members: list[tuple[str, _Member]]) -> None:
        """Each audio publisher's receiver reports say the worst loss among its subscribers
        (media/opus.py), so its encoder adds the in-band FEC their links need."""
        reports: dict[int, list[tuple[float, float]]] = {}
        for _, member in members:
            if member.subscribe is None:
                continue
            for key, outgoing in member.subscribe.tracks.items():
                if outgoing.latest_loss is not None:
                    reports.setdefault(key, []).append(outgoing.latest_loss)
        now = time.monotonic()
        for _, member in members:
            for published in member.published.values():
                if published.publication.kind == "audio" and published.incoming is not None:
                    worst = loss_to_report_upstream(reports.get(id(published.publication), []), now)
                    report_downstream_loss(published.incoming.receiver, worst)

    async def _choose_layers(self, room: str, member: _Member, held_up: bool) -> None:
        """Once a second: how the subscriber's link fares (media/layers.py), then each video
        track's layer from its share of the estimate. A second in which the relay itself was
        held up says nothing of the links: what it delayed looks like a queue on every one."""
        if member.subscribe is None:
            return
        outgoing = list(member.subscribe.tracks.values())
        reports = [r for o in outgoing for r in o.take_reports()]
        if held_up:
            return
        rtts = [r.rtt_s for r in reports if r.rtt_s is not None]
        estimates = [o.remb_bps for o in outgoing if o.remb_bps is not None]
        remb = max(estimates) if estimates else None
        sent_bps = sum(self._rates.rate(id(o)).bitrate_bps for o in outgoing)
        verdict = member.link.update(
            LinkSample(
                remb_bps=remb,
                sent_bps=sent_bps,
                rtt_s=min(rtts) if rtts else None,
                lost=max((r.fraction_lost for r in reports), default=None),
            )
        )
        videos = [o for o in outgoing if o.publication.kind == "video"]
        if not videos:
            return
        budget = None
        if remb is not None:
            audio_bps = sum(
                self._rates.rate(id(o)).bitrate_bps
                for o in outgoing
                if o.publication.kind == "audio"
            )
            budget = video_budget(remb, audio_bps, len(videos))
        for o in videos:
            before = o.layer
            if o.fixed_layer is not None:
                self._apply_layer(o, o.fixed_layer)
                continue
            full_bps = self._rates.rate(id(o.publication)).bitrate_bps or LOW_BPS
            needs = {
                Layer.FULL: full_bps,
                Layer.LOW: min(LOW_BPS, full_bps),
                Layer.AUDIO_ONLY: 0.0,
            }
            self._apply_layer(o, o.chooser.update(budget, needs, verdict))
            info = self._info(room, o.publication)
            if o.layer is not before and info is not None:
                await self._tell_layer(room, member.participant, info, o.layer)

    def _report_arrived(
        self, room: str, member: _Member, _: OutgoingTrack, report: ReceiverReport
    ) -> None:
        """A receiver report between two samples: if it shows a queue while a probe is on
        trial, the probe caused it, and every second it stays costs the subscriber's audio (a
        capped link's buffer fills within a second). Undone at once."""
        if report.rtt_s is None or member.subscribe is None or not member.link.queued(report.rtt_s):
            return
        for o in list(member.subscribe.tracks.values()):
            if o.fixed_layer is not None or not o.chooser.on_trial:
                continue
            self._apply_layer(o, o.chooser.undo_probe())
            info = self._info(room, o.publication)
            if info is not None:
                task = asyncio.ensure_future(
                    self._tell_layer(room, member.participant, info, o.layer)
                )
                self._telling.add(task)
                task.add_done_callback(self._telling.discard)

    # --- statistics --------------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        """Node-wide figures, for /metrics: how many of each there are now, and the counts
        since the hub started (they never go down)."""
        members = [m for room in self._rooms.values() for m in room.values()]
        publications = [p for m in members for p in m.published.values()]
        subscriptions = [o for m in members if m.subscribe for o in m.subscribe.tracks.values()]
        counters = self._counters
        return {
            "rooms": len(self._rooms),
            "participants": len(members),
            "publications": len(publications),
            "subscriptions": len(subscriptions),
            "frames_received": counters.frames_received,
            "frames_forwarded": counters.frames_forwarded,
            "frames_dropped": counters.frames_dropped,
            "keyframe_requests": counters.keyframe_requests,
        }

    async def stats(self, room: str) -> dict[str, Any]:
        """Per track and per participant: rates, loss, jitter, round-trip time, layer."""
        members = self._rooms.get(room, {})
        tracks: list[dict[str, Any]] = []
        participants: dict[str, dict[str, Any]] = {
            m.participant: {"participant": m.participant, "sent_bps": 0.0, "received_bps": 0.0}
            for m in members.values()
        }
        for member in members.values():
            for published in member.published.values():
                pub = published.publication
                rate = self._rates.rate(id(pub))
                intake = self._intake(room, member.participant, published)
                participants[member.participant]["sent_bps"] += rate.bitrate_bps
                subscribers = []
                for other in members.values():
                    outgoing = other.subscribe.tracks.get(id(pub)) if other.subscribe else None
                    if outgoing is None:
                        continue
                    out_rate = self._rates.rate(id(outgoing))
                    participants[other.participant]["received_bps"] += out_rate.bitrate_bps
                    subscribers.append(
                        {
                            "participant": other.participant,
                            "layer": outgoing.layer,
                            "fps": round(out_rate.fps, 1),
                            "bitrate_bps": round(out_rate.bitrate_bps),
                            "frames": outgoing.frames_out,
                            "frames_dropped": outgoing.frames_dropped,
                            "remb_bps": outgoing.remb_bps,
                            **self._subscriber(
                                room, other.participant, published.info, outgoing
                            ).public(),
                        }
                    )
                tracks.append(
                    {
                        **published.info.public(),
                        "fps": round(rate.fps, 1),
                        "bitrate_bps": round(rate.bitrate_bps),
                        "frames": pub.frames_in,
                        "muted": pub.muted,
                        "keyframe_requests": pub.keyframe_requests,
                        "uplink_estimate_bps": (
                            uplink_estimate_bps(published.incoming.receiver)
                            if published.incoming is not None
                            else None
                        ),
                        "intake": intake.public(),
                        "subscribers": subscribers,
                    }
                )
        return {"tracks": tracks, "participants": list(participants.values())}

    def hops(self) -> list[HopFigures]:
        """Every hop of every track on this node: each publisher's intake and each
        subscriber's link, for /metrics. A hop's figures go when its track or subscriber
        does."""
        hops: list[HopFigures] = []
        for room, members in self._rooms.items():
            for member in members.values():
                for published in member.published.values():
                    if published.incoming is not None:  # a piped track's is the owner's
                        hops.append(self._intake(room, member.participant, published))
                    for other in members.values():
                        subscribe = other.subscribe
                        outgoing = (
                            subscribe.tracks.get(id(published.publication)) if subscribe else None
                        )
                        if outgoing is not None:
                            hops.append(
                                self._subscriber(room, other.participant, published.info, outgoing)
                            )
        return hops

    def _intake(self, room: str, participant: str, published: _Published) -> HopFigures:
        kind = published.info.kind
        figures = (
            intake_figures(published.incoming.receiver) if published.incoming is not None else None
        )
        values = vars(figures) if figures is not None else {}
        return HopFigures(
            room,
            participant,
            published.info,
            INTAKE,
            {name: values.get(name) for name in _INTAKE_COUNTS[kind]},
            {
                "fraction_lost": self._intake_loss.fraction(id(published.publication)),
                "jitter_s": values.get("jitter_s"),
            },
        )

    def _subscriber(
        self, room: str, participant: str, info: TrackInfo, outgoing: OutgoingTrack
    ) -> HopFigures:
        figures = subscriber_figures(outgoing.transceiver.sender, CLOCK_RATE[info.kind])
        counts: dict[str, int | None] = {
            name: getattr(figures, name) for name in _SUBSCRIBER_COUNTS[info.kind]
        }
        counts["packets_lost"] = figures.packets_lost
        return HopFigures(
            room,
            participant,
            info,
            SUBSCRIBER,
            counts,
            {
                "fraction_lost": figures.fraction_lost,
                "jitter_s": figures.jitter_s,
                "rtt_s": figures.rtt_s,
            },
        )

    async def _sample_every_second(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(1.0)
            try:
                await self._sample(held_up=loop.time() - started - 1.0 > HELD_UP_S)
            except Exception:
                log.exception("media statistics sampling failed")

    async def _sample(self, held_up: bool = False) -> None:
        keys: set[int] = set()
        members = [(room, m) for room, ms in self._rooms.items() for m in ms.values()]
        for _, member in members:
            for published in member.published.values():
                pub = published.publication
                keys.add(id(pub))
                self._rates.sample(id(pub), pub.frames_in, pub.bytes_in)
                incoming = published.incoming
                intake = intake_figures(incoming.receiver) if incoming is not None else None
                if intake is not None:
                    self._intake_loss.sample(id(pub), intake.packets_expected, intake.packets_lost)
            if member.subscribe is not None:
                for outgoing in member.subscribe.tracks.values():
                    keys.add(id(outgoing))
                    self._rates.sample(id(outgoing), outgoing.frames_out, outgoing.bytes_out)
        self._rates.keep_only(keys)
        self._intake_loss.keep_only(keys)
        self._pass_downstream_loss_upstream(members)
        self._release_unused_low_layers()
        # Layer choices await statistics: the rooms may change meanwhile.
        for room, member in members:
            await self._choose_layers(room, member, held_up)

    # --- helpers -----------------------------------------------------------------------------

    def _member(self, room: str, participant: str) -> _Member:
        member = self._rooms.get(room, {}).get(participant)
        if member is None:
            raise MediaError("join the room before sending media")
        return member

    async def _fan_out(self, room: str, publisher: str) -> None:
        for other in list(self._rooms[room].values()):
            if other.participant != publisher and other.may_subscribe:
                self._subscribe_all(room, other)
                await self._negotiate(room, other)

    def _subscribe_all(self, room: str, member: _Member) -> None:
        if member.subscribe is None:
            member.subscribe = SubscribeConnection(self._config)
        elif member.subscribe.pc.connectionState == "closed":
            # Gone (its seat goes, or it joins again and gets a new one): nothing can be added,
            # and it must not stop the others from receiving.
            return
        for other in self._rooms[room].values():
            if other.participant == member.participant:
                continue
            for published in other.published.values():
                if id(published.publication) not in member.subscribe.tracks:
                    outgoing = member.subscribe.add(published.publication)
                    outgoing.on_report = functools.partial(self._report_arrived, room, member)
                    if member.layer_choice is not None:
                        self._fix_layer(outgoing, member.layer_choice)

    async def _negotiate(self, room: str, member: _Member, *, restart_ice: bool = False) -> None:
        """Offers the subscribe connection's current tracks; one offer at a time, and any
        change while an offer is out is offered once the answer is in. With `restart_ice`,
        that offer (this one or the next) restarts ICE."""
        if member.subscribe is None or member.subscribe.pc.connectionState == "closed":
            return
        member.restart_wanted = member.restart_wanted or restart_ice
        if member.offer_in_flight:
            member.offer_again = True
            return
        member.offer_in_flight = True
        restart, member.restart_wanted = member.restart_wanted, False
        try:
            sdp = await member.subscribe.offer(restart_ice=restart)
        except IceRestartRefused:
            # The connection went down since it was asked for: a new one instead.
            member.offer_in_flight = False
            await self._replace_subscribe(room, member)
            return
        except Exception:
            # The subscriber's connection failed; its seat will go with it.
            log.warning("offer to %s in %s failed", member.participant, room, exc_info=True)
            member.offer_in_flight = False
            return
        by_mid = self._tracks_by_mid(room, member)
        member.mids = {mid: info.track_id for mid, info in by_mid.items()}
        member.pending_offer = (sdp, by_mid)
        await self._send_offer(room, member.participant, sdp, by_mid)

    def _tracks_by_mid(self, room: str, member: _Member) -> dict[str, TrackInfo]:
        assert member.subscribe is not None
        infos = {
            id(p.publication): p.info
            for m in self._rooms[room].values()
            for p in m.published.values()
        }
        return {
            outgoing.transceiver.mid or "": infos[key]
            for key, outgoing in member.subscribe.tracks.items()
            if key in infos
        }
