"""The pipe between workers (media/pipe.py): two real UDP endpoints on loopback, frames from
an owner's publication arriving whole at the edge's, loss turned into a wait for the next
keyframe, keyframe requests coalesced upstream, foreign datagrams refused."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from media.forwarding import NodeCounters, Publication
from media.frames import EncodedFrame
from media.pipe import FRAGMENT_BYTES, PipeEndpoint, PipeIn, PipeOut, new_key


async def eventually(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Source:
    publication: Publication
    keyframes_asked: int = 0


def source(kind: str) -> Source:
    holder: list[Source] = []

    async def ask() -> None:
        holder[0].keyframes_asked += 1

    made = Source(Publication(kind, ask))
    holder.append(made)
    return made


@pytest.fixture
async def endpoints() -> AsyncIterator[tuple[PipeEndpoint, PipeEndpoint]]:
    owner, edge = PipeEndpoint("127.0.0.1"), PipeEndpoint("127.0.0.1")
    await owner.start()
    await edge.start()
    yield owner, edge
    await owner.stop()
    await edge.stop()


def connect(owner: PipeEndpoint, edge: PipeEndpoint) -> tuple[PipeOut, PipeIn]:
    key = new_key()
    out = owner.open_out(edge.address, key)
    return out, edge.open_in(owner.address, out.pipe_id, key, NodeCounters())


def collect(publication: Publication) -> list[EncodedFrame]:
    frames: list[EncodedFrame] = []
    publication.add_listener(frames.append)
    return frames


async def test_frames_of_every_size_arrive_whole_and_in_order(
    endpoints: tuple[PipeEndpoint, PipeEndpoint],
) -> None:
    owner, edge = endpoints
    out, pipe_in = connect(owner, edge)
    video, audio = source("video"), source("audio")
    video_ssrc, audio_ssrc = out.add(video.publication), out.add(audio.publication)
    got_video = collect(pipe_in.add(video_ssrc, "video"))
    got_audio = collect(pipe_in.add(audio_ssrc, "audio"))
    # Timestamps start near 2**32 and wrap past it: the edge keeps counting up.
    base = (1 << 32) - 7000
    sent_video = [EncodedFrame(os.urandom(60_000), base, True)]  # a keyframe of 50 fragments
    sent_video += [
        EncodedFrame(os.urandom(size), base + 3000 * n, False)
        for n, size in enumerate((1, FRAGMENT_BYTES, FRAGMENT_BYTES + 1, 7000, 500), start=1)
    ]
    sent_audio = [EncodedFrame(os.urandom(120), 960 * n, False) for n in range(10)]
    for frame in sent_video:
        video.publication.push(frame)
    for frame in sent_audio:
        audio.publication.push(frame)
    await eventually(
        lambda: len(got_video) == len(sent_video) and len(got_audio) == len(sent_audio),
        "every frame at the edge",
    )
    assert [(f.data, f.keyframe) for f in got_video] == [(f.data, f.keyframe) for f in sent_video]
    offsets = [f.timestamp - got_video[0].timestamp for f in got_video]
    assert offsets == [f.timestamp - sent_video[0].timestamp for f in sent_video]
    assert [f.data for f in got_audio] == [f.data for f in sent_audio]
    assert out.frames(video_ssrc) == (len(sent_video), 0)
    assert edge.undelivered == 0


async def test_a_lost_fragment_loses_video_until_the_next_keyframe_which_is_asked_for(
    endpoints: tuple[PipeEndpoint, PipeEndpoint],
) -> None:
    owner, edge = endpoints
    out, pipe_in = connect(owner, edge)
    video = source("video")
    got = collect(pipe_in.add(out.add(video.publication), "video"))
    video.publication.push(EncodedFrame(b"k" * 3000, 0, True))
    await eventually(lambda: len(got) == 1, "the first keyframe")
    asked_before = video.keyframes_asked
    # The next frame's second fragment is lost on the way.
    send = owner._send
    datagrams = 0

    def lossy(datagram: bytes, to: tuple[str, int]) -> bool:
        nonlocal datagrams
        datagrams += 1
        return True if datagrams == 2 else send(datagram, to)

    owner._send = lossy  # type: ignore[method-assign]
    video.publication.push(EncodedFrame(b"a" * 3000, 3000, False))
    owner._send = send  # type: ignore[method-assign]
    for n in range(2, 5):
        video.publication.push(EncodedFrame(b"d" * 800, 3000 * n, False))
    await eventually(lambda: video.keyframes_asked > asked_before, "a keyframe asked upstream")
    assert len(got) == 1  # neither the broken frame nor those that depend on it
    video.publication.push(EncodedFrame(b"K" * 5000, 3000 * 5, True))
    video.publication.push(EncodedFrame(b"e" * 800, 3000 * 6, False))
    await eventually(lambda: len(got) == 3, "the keyframe and what follows it")
    assert [f.data[:1] for f in got] == [b"k", b"K", b"e"]
    assert pipe_in.frames_lost(next(iter(pipe_in._tracks))) >= 1


async def test_keyframe_requests_reach_the_owner_at_most_once_a_second(
    endpoints: tuple[PipeEndpoint, PipeEndpoint],
) -> None:
    owner, edge = endpoints
    out, pipe_in = connect(owner, edge)
    video = source("video")
    at_edge = pipe_in.add(out.add(video.publication), "video")
    loop = asyncio.get_running_loop()
    started = loop.time()
    # A storm of subscribers at the edge, each wanting a keyframe to start with.
    for _ in range(200):
        at_edge.subscribe()
        await asyncio.sleep(0.01)
    # The first went at once; the others folded into one per second, the last at the end
    # of its second (so nobody waits longer than that).
    await eventually(lambda: video.keyframes_asked >= 2, "the requests upstream")
    elapsed = loop.time() - started
    assert 2 <= pipe_in.requests_sent <= elapsed + 2
    assert out.keyframe_requests == pipe_in.requests_sent
    assert video.keyframes_asked <= pipe_in.requests_sent


async def test_foreign_datagrams_are_refused_and_the_pipe_carries_on(
    endpoints: tuple[PipeEndpoint, PipeEndpoint],
) -> None:
    owner, edge = endpoints
    out, pipe_in = connect(owner, edge)
    audio = source("audio")
    ssrc = out.add(audio.publication)
    got = collect(pipe_in.add(ssrc, "audio"))
    # Another pipe's key, for the same SSRC; garbage; a packet too short to be RTP.
    intruder = PipeEndpoint("127.0.0.1")
    await intruder.start()
    try:
        stranger = intruder.open_out(edge.address, new_key())
        stranger_source = source("audio")
        stranger.add(stranger_source.publication)
        stranger_source.publication.push(EncodedFrame(b"x" * 100, 0, False))
        intruder._send(b"\x80" + os.urandom(40), edge.address)
        intruder._send(b"\x01\x02", edge.address)
        # A forged keyframe request to the owner, under no key it knows.
        intruder._send(
            b"\x81\xce\x00\x02" + out.pipe_id.to_bytes(4, "big") + bytes(8), owner.address
        )
        await eventually(lambda: edge.undelivered >= 3, "the edge to refuse the strangers")
        await eventually(lambda: owner.undelivered >= 1, "the owner to refuse the forgery")
        assert audio.keyframes_asked == 0
        audio.publication.push(EncodedFrame(b"ok", 960, False))
        await eventually(lambda: len(got) == 1, "the pipe's own frame")
        assert got[0].data == b"ok"
    finally:
        await intruder.stop()


async def test_two_rooms_between_the_same_workers_stay_apart_and_end_apart(
    endpoints: tuple[PipeEndpoint, PipeEndpoint],
) -> None:
    owner, edge = endpoints
    first_out, first_in = connect(owner, edge)
    second_out, second_in = connect(owner, edge)
    one, two = source("audio"), source("audio")
    ssrc_one, ssrc_two = first_out.add(one.publication), second_out.add(two.publication)
    assert ssrc_one != ssrc_two
    got_one = collect(first_in.add(ssrc_one, "audio"))
    second_publication = second_in.add(ssrc_two, "audio")
    got_two = collect(second_publication)
    one.publication.push(EncodedFrame(b"one", 0, False))
    two.publication.push(EncodedFrame(b"two", 0, False))
    await eventually(lambda: len(got_one) == len(got_two) == 1, "a frame in each room")
    assert (got_one[0].data, got_two[0].data) == (b"one", b"two")
    # The second room's pipe closes on both sides: its publication ends, the first's goes on.
    second_out.close()
    second_in.close()
    assert second_publication.ended
    two.publication.push(EncodedFrame(b"late", 960, False))
    one.publication.push(EncodedFrame(b"again", 960, False))
    await eventually(lambda: len(got_one) == 2, "the first room's next frame")
    assert len(got_two) == 1


async def test_after_a_forced_mute_the_edge_waits_for_a_keyframe(
    endpoints: tuple[PipeEndpoint, PipeEndpoint],
) -> None:
    """Frames held back by a mute never reach the edge: what follows refers to them, so the
    edge's video starts again at a keyframe, as the room's worker's own subscribers do."""
    owner, edge = endpoints
    out, pipe_in = connect(owner, edge)
    video = source("video")
    got = collect(pipe_in.add(out.add(video.publication), "video"))
    video.publication.push(EncodedFrame(b"k" * 2000, 0, True))
    await eventually(lambda: len(got) == 1, "the first keyframe")
    video.publication.set_muted(True)
    video.publication.push(EncodedFrame(b"m" * 500, 3000, False))  # held back
    video.publication.set_muted(False)
    video.publication.push(EncodedFrame(b"d" * 500, 6000, False))  # refers to the held one
    video.publication.push(EncodedFrame(b"K" * 2000, 9000, True))
    await eventually(lambda: len(got) == 2, "the keyframe after the mute")
    assert [f.data[:1] for f in got] == [b"k", b"K"]
    assert pipe_in.requests_sent >= 1
