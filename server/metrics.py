"""Prometheus metrics at /metrics, in a registry per app (nothing process-global): counters
incremented where things happen (ServerMetrics, fed by the signaling namespace; the media
hub's own node counters), gauges read from the live objects at scrape time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from media.hub import HopFigures, MediaHub
from signaling.namespace import ConsultNamespace

_GAUGES = {
    "rooms": "Rooms with media on this node",
    "participants": "Participants with media connections on this node",
    "publications": "Tracks being published",
    "subscriptions": "Tracks being forwarded to a subscriber",
}
_COUNTERS = {
    "frames_received": "Encoded frames received from publishers",
    "frames_forwarded": "Encoded frames handed to subscribers' senders",
    "frames_dropped": "Frames dropped for subscribers that fell behind",
    "keyframe_requests": "Keyframe requests sent to publishers",
}

# Per-hop loss, per track and direction ("intake": the publisher's link into the relay;
# "subscriber": the relay's link to one subscriber). Counts are counted where they happen and
# last as long as the track on that hop; the series go with it.
_HOP_LABELS = ("consultation", "participant", "track", "kind", "direction")
_HOP_COUNTERS = {
    "packets_expected": "Packets the publisher sent, from their sequence numbers (intake)",
    "packets_received": "Packets that came in time to be used, repairs included (intake)",
    "packets_sent": "Packets the relay sent to the subscriber",
    "packets_lost": "Packets lost on the hop before any repair: by sequence numbers (intake), "
    "as the subscriber's receiver reports say (subscriber)",
    "packets_given_up": "Packets that never came in time, repair included (intake)",
    "packets_late": "Packets that came after their slot had passed, or twice (intake)",
    "packets_retransmitted": "Packets that arrived over RTX (intake)",
    "retransmitted": "Packets the relay sent again on the subscriber's NACK",
    "frames_given_up": "Video frames that could not be completed (intake)",
    "frames_skipped": "Video frames dropped while waiting for a keyframe (intake)",
    "nacks_sent": "NACK packets sent to the publisher (intake)",
    "plis_sent": "Keyframe requests (PLI) sent to the publisher (intake)",
    "keyframe_requests": "Keyframe requests (PLI/FIR) from the subscriber",
    "fec_packets": "Opus packets carrying in-band FEC (intake)",
}
_HOP_GAUGES = {
    "fraction_lost": (
        "fraction_lost",
        "Share of packets lost on the hop over the last second (intake) or since the "
        "subscriber's previous receiver report (subscriber)",
    ),
    "jitter_s": ("jitter_seconds", "Interarrival jitter (RFC 3550) on the hop"),
    "rtt_s": ("rtt_seconds", "Round-trip time between the relay and the subscriber"),
}


def _hop_families(hops: list[HopFigures]) -> Iterator[Metric]:
    counters = {
        name: CounterMetricFamily(f"telemed_media_hop_{name}", text, labels=_HOP_LABELS)
        for name, text in _HOP_COUNTERS.items()
    }
    gauges = {
        key: GaugeMetricFamily(f"telemed_media_hop_{name}", text, labels=_HOP_LABELS)
        for key, (name, text) in _HOP_GAUGES.items()
    }
    for hop in hops:
        labels = [
            hop.consultation,
            hop.participant,
            hop.track.track_id,
            hop.track.kind,
            hop.direction,
        ]
        for name, value in hop.counts.items():
            if value is not None:
                counters[name].add_metric(labels, value)
        for key, gauge_value in hop.gauges.items():
            if gauge_value is not None:
                gauges[key].add_metric(labels, gauge_value)
    yield from counters.values()
    yield from gauges.values()


class _TelemedCollector(Collector):
    def __init__(self, namespace: ConsultNamespace, hub: MediaHub) -> None:
        self._namespace = namespace
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        totals = self._hub.totals()
        for name, text in _GAUGES.items():
            yield GaugeMetricFamily(f"telemed_media_{name}", text, value=totals[name])
        for name, text in _COUNTERS.items():
            yield CounterMetricFamily(f"telemed_media_{name}", text, value=totals[name])
        yield from _hop_families(self._hub.hops())
        yield GaugeMetricFamily(
            "telemed_signaling_connections",
            "Authenticated socket.io connections on this node",
            value=self._namespace.connection_count,
        )


# What happened in rooms (signaling.namespace.EventCounts.happened) -> counter and help.
_HAPPENINGS = {
    "seat_taken": ("telemed_seats_taken", "Seats taken in live rooms (a seat resumed is not new)"),
    "participant_left": ("telemed_participants_left", "Seats closed (left, removed, lost)"),
    "chat_message": ("telemed_chat_messages", "Chat messages sent"),
    "recording_started": ("telemed_recordings_started", "Recordings started"),
    "recording_failed": ("telemed_recordings_failed", "Recordings that could not start"),
    "session_ended": ("telemed_sessions_ended", "Live sessions ended, for any reason"),
}


class ServerMetrics:
    """The app's registry and its counters (signaling.namespace.EventCounts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._events = Counter(
            "telemed_signaling_events",
            "Client events handled, by event and result (ok or refused)",
            ["event", "result"],
            registry=self.registry,
        )
        self._happenings = {
            what: Counter(name, text, registry=self.registry)
            for what, (name, text) in _HAPPENINGS.items()
        }

    def event(self, name: str, ok: bool) -> None:
        self._events.labels(event=name, result="ok" if ok else "refused").inc()

    def happened(self, what: str) -> None:
        self._happenings[what].inc()

    def watch(self, namespace: ConsultNamespace, hub: MediaHub) -> None:
        """Adds the figures read at scrape time (gauges, the hub's node counters)."""
        self.registry.register(_TelemedCollector(namespace, hub))


def metrics_handler(metrics: ServerMetrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    registry = metrics.registry

    async def scrape(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return scrape
