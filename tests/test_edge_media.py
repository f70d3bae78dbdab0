"""The edge-media messages between workers (signaling/edge_media.py): what the room's worker
tells an edge, in what order, and an edge that refuses what it cannot read and carries on."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from media.forwarding import Publication
from media.hub import MediaHub, TrackInfo
from media.peer import PeerConfig
from media.pipe import PipeEndpoint
from rooms.outcome import Seat
from signaling.edge_media import EdgeMedia
from signaling.routing import Message


class RecordingLink:
    """A WorkerLink that keeps what is told (the owner's side needs nothing else)."""

    def __init__(self) -> None:
        self.told: list[tuple[str, Message]] = []

    async def call(self, worker: str, message: Message) -> Message:
        raise AssertionError("edge media only tells")

    async def tell(self, worker: str, message: Message) -> None:
        self.told.append((worker, message))


async def _offer_sink(*_: Any) -> None:
    pass


@pytest.fixture
async def edge_media() -> AsyncIterator[tuple[EdgeMedia, RecordingLink, MediaHub]]:
    hub = MediaHub(PeerConfig(host_addresses=["127.0.0.1"]), _offer_sink, _offer_sink)
    link = RecordingLink()
    media = EdgeMedia(hub, PipeEndpoint("127.0.0.1"), link, "host/w1#abc", {})
    await media.start()
    yield media, link, hub
    await media.stop()
    await hub.stop()


async def _nothing() -> None:
    pass


async def eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def seat(may_publish: bool = False, may_subscribe: bool = True) -> Seat:
    return Seat("c_1", "p_trainee", "sid-1", may_subscribe, may_publish)


def test_only_receive_only_seats_that_reached_another_worker_go_to_an_edge() -> None:
    pipe = ("127.0.0.1", 4000)
    assert EdgeMedia.served_at_edge(seat(), "host/w2#x", pipe)
    assert not EdgeMedia.served_at_edge(seat(may_publish=True), "host/w2#x", pipe)
    assert not EdgeMedia.served_at_edge(seat(may_subscribe=False), "host/w2#x", pipe)
    assert not EdgeMedia.served_at_edge(seat(), None, None)  # its socket is here
    assert not EdgeMedia.served_at_edge(seat(), "host/w2#x", None)  # an edge with no pipe


async def test_the_owner_pipes_before_it_seats_and_closes_after_the_last_seat(
    edge_media: tuple[EdgeMedia, RecordingLink, MediaHub],
) -> None:
    media, link, _ = edge_media
    edge = "host/w2#def"
    await media.seat("c_1", "p_a", "sid-a", edge, ("127.0.0.1", 40000))
    await media.seat("c_1", "p_b", "sid-b", edge, ("127.0.0.1", 40000))
    info = TrackInfo("t_1", "p_presenter", "video", "camera")
    await media.track_published("c_1", info, Publication("video", _nothing))
    await media.track_unpublished("c_1", info)
    assert await media.unseat("c_1", "p_a")
    assert await media.unseat("c_1", "p_b")
    assert not await media.unseat("c_1", "p_b")  # no edge serves it any more
    ops = [(worker, m["op"]) for worker, m in link.told]
    assert ops == [
        (edge, "edge_open"),
        (edge, "edge_enter"),
        (edge, "edge_enter"),
        (edge, "edge_track"),
        (edge, "edge_untrack"),
        (edge, "edge_leave"),
        (edge, "edge_leave"),
        (edge, "edge_close"),
    ]
    opened = link.told[0][1]
    assert len(base64.b64decode(opened["key"])) == 30
    assert opened["address"] == list(media.pipe_address)
    assert media._out == {}


async def test_an_edge_refuses_unreadable_messages_and_carries_on(
    edge_media: tuple[EdgeMedia, RecordingLink, MediaHub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    media, _, hub = edge_media
    good_open = {
        "op": "edge_open",
        "room": "c_9",
        "owner": "host/w1#zzz",
        "pipe_id": 7,
        "key": base64.b64encode(bytes(30)).decode(),
        "address": ["127.0.0.1", 40001],
    }
    bad = [
        {"op": "edge_open"},  # no room
        {**good_open, "key": "not base64!"},
        {**good_open, "key": base64.b64encode(bytes(5)).decode()},
        {**good_open, "address": "127.0.0.1:40001"},
        {**good_open, "pipe_id": True},
        {**good_open, "pipe_id": 1 << 40},
    ]
    with caplog.at_level(logging.ERROR, logger="signaling.edge_media"):
        for message in bad:
            media.received(message)
        media.received(good_open)
        track = {"track_id": "t_9", "participant": "p_9", "kind": "video", "source": "camera"}
        smell = {**track, "kind": "smell"}
        media.received({"op": "edge_track", "room": "c_9", "track": smell, "ssrc": 1})
        media.received({"op": "edge_track", "room": "c_9", "track": {"kind": "audio"}, "ssrc": 2})
        media.received({"op": "edge_track", "room": "c_9", "track": track, "ssrc": 3})
        await eventually(lambda: hub.tracks("c_9") != [], "the valid track piped")
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == len(bad) + 2, refusals
    assert any("key must be 30 bytes" in r for r in refusals)
    assert any("track kind must be audio or video" in r for r in refusals)
    assert hub.tracks("c_9") == [TrackInfo("t_9", "p_9", "video", "camera")]
    # Messages about a room it does not serve are dropped.
    media.received({"op": "edge_enter", "room": "c_other", "participant": "p", "sid": "s"})
    media.received({"op": "edge_close", "room": "c_9"})
    await eventually(lambda: hub.tracks("c_9") == [], "the room closed")
    assert media.seat_of("s") is None
