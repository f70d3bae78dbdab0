"""Prometheus metrics at /metrics, read from the live objects at scrape time (a registry per
app, nothing process-global)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from media.hub import MediaHub
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
        yield GaugeMetricFamily(
            "telemed_signaling_connections",
            "Authenticated socket.io connections on this node",
            value=self._namespace.connection_count,
        )


def metrics_handler(
    namespace: ConsultNamespace, hub: MediaHub
) -> Callable[[web.Request], Awaitable[web.Response]]:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_TelemedCollector(namespace, hub))

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return metrics
