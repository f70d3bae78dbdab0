"""The relay's replacement for aiortc's jitter buffer, packet by packet: frames leave as soon
as they are complete, large frames are waited for, a lost packet costs one frame and a
keyframe request instead of a stall."""

from __future__ import annotations

from aiortc.rtp import RtpPacket

from media.aiortc_hooks import EncodedFrame, FrameAssembler

KEY = b"\x00"  # VP8: bit 0 of the first payload byte clear = keyframe
DELTA = b"\x01"


def packet(seq: int, timestamp: int, *, marker: bool, first: bytes = DELTA) -> RtpPacket:
    p = RtpPacket(payload_type=96, marker=int(marker), sequence_number=seq, timestamp=timestamp)
    # The depayloaded data aiortc's receiver leaves on the packet; a frame's first packet
    # carries the byte that tells keyframes apart.
    p._data = first + bytes([seq & 0xFF])  # type: ignore[attr-defined]
    return p


def frame(start: int, count: int, timestamp: int, first: bytes = DELTA) -> list[RtpPacket]:
    return [
        packet(start + i, timestamp, marker=i == count - 1, first=first if i == 0 else b"")
        for i in range(count)
    ]


class Sink:
    def __init__(self) -> None:
        self.frames: list[EncodedFrame] = []

    def __call__(self, frame: EncodedFrame) -> None:
        self.frames.append(frame)


def feed(assembler: FrameAssembler, packets: list[RtpPacket]) -> list[bool]:
    return [assembler.add(p)[0] for p in packets]


def test_a_frame_leaves_the_moment_its_last_packet_arrives() -> None:
    sink = Sink()
    assembler = FrameAssembler("video", sink)
    first = frame(100, 3, 9000, KEY)
    feed(assembler, first[:2])
    assert sink.frames == []
    feed(assembler, first[2:])
    assert [(f.timestamp, f.keyframe) for f in sink.frames] == [(9000, True)]
    assert sink.frames[0].data == b"".join(p._data for p in first)  # type: ignore[attr-defined]


def test_a_frame_larger_than_the_give_up_window_comes_out_whole() -> None:
    # A keyframe at 720p can take a hundred packets; nothing is missing, so nothing is skipped.
    sink = Sink()
    assembler = FrameAssembler("video", sink, give_up_after=64)
    requests = feed(assembler, frame(100, 100, 9000, KEY) + frame(200, 2, 12000))
    assert not any(requests)
    assert [(f.timestamp, f.keyframe, len(f.data)) for f in sink.frames] == [
        (9000, True, 101),
        (12000, False, 3),
    ]


def test_reordered_packets_are_put_back_in_order() -> None:
    sink = Sink()
    assembler = FrameAssembler("video", sink)
    packets = frame(100, 4, 9000, KEY)
    feed(assembler, [packets[0], packets[2], packets[3], packets[1]])
    assert len(sink.frames) == 1
    assert sink.frames[0].data == b"".join(p._data for p in packets)  # type: ignore[attr-defined]


def test_a_lost_packet_costs_its_frame_and_asks_for_a_keyframe() -> None:
    sink = Sink()
    assembler = FrameAssembler("video", sink, give_up_after=8)
    feed(assembler, frame(100, 2, 3000, KEY))
    broken = frame(102, 3, 6000)
    del broken[1]  # lost, and its retransmission too
    later = [p for n in range(5) for p in frame(105 + 2 * n, 2, 9000 + 3000 * n)]
    requests = feed(assembler, broken + later)
    assert requests.count(True) == 1  # once, when the window overflowed
    # Delta frames after the gap cannot be decoded: nothing until the keyframe.
    assert [f.timestamp for f in sink.frames] == [3000]
    feed(assembler, frame(115, 2, 30000, KEY) + frame(117, 2, 33000))
    assert [f.timestamp for f in sink.frames] == [3000, 30000, 33000]
    # The retransmission arriving after all is ignored.
    assert feed(assembler, [packet(103, 6000, marker=False)]) == [False]
    assert [f.timestamp for f in sink.frames] == [3000, 30000, 33000]


def test_a_gap_with_no_frame_start_after_it_starts_afresh() -> None:
    sink = Sink()
    assembler = FrameAssembler("video", sink, give_up_after=8)
    feed(assembler, frame(100, 2, 3000, KEY))
    # A frame whose second packet never comes, and nothing after it ends a frame.
    held = [packet(102, 6000, marker=False)] + [
        packet(104 + i, 6000, marker=False) for i in range(8)
    ]
    assert feed(assembler, held)[-1] is True
    feed(assembler, frame(200, 2, 40000, KEY))
    assert [f.timestamp for f in sink.frames] == [3000, 40000]


def test_audio_packets_leave_one_by_one_in_order() -> None:
    sink = Sink()
    assembler = FrameAssembler("audio", sink)
    packets = [packet(10 + i, 960 * i, marker=False) for i in range(4)]
    feed(assembler, [packets[0], packets[2], packets[1], packets[3]])
    assert [f.timestamp for f in sink.frames] == [0, 960, 1920, 2880]


def test_timestamps_keep_increasing_past_the_wrap() -> None:
    sink = Sink()
    assembler = FrameAssembler("audio", sink)
    feed(assembler, [packet(1, 0xFFFFFC40, marker=False), packet(2, 0x200, marker=False)])
    assert [f.timestamp for f in sink.frames] == [0xFFFFFC40, (1 << 32) + 0x200]
