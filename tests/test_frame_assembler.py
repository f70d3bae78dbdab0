"""The relay's replacement for aiortc's jitter buffer, packet by packet: frames leave as soon
as they are complete, large frames are waited for, a lost packet costs one frame and a
keyframe request instead of a stall."""

from __future__ import annotations

from aiortc.rtp import RtpPacket

from media.frame_assembler import AssemblyLimits, FrameAssembler
from media.frames import EncodedFrame

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


def test_a_frame_of_a_hundred_packets_comes_out_whole() -> None:
    # A keyframe at 720p can take a hundred packets; nothing is missing, so nothing is skipped.
    sink = Sink()
    assembler = FrameAssembler("video", sink)
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


# --- loss: audio is never waited for beyond a short reorder window; video waits a bounded time


class Clock:
    """Time for the assembler, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingDict(dict[int, RtpPacket]):
    """A dict that counts what is done to it: the assembler's held packets, to show that a
    long gap costs each packet a bounded number of operations."""

    def __init__(self) -> None:
        super().__init__()
        self.operations = 0

    def __contains__(self, key: object) -> bool:
        self.operations += 1
        return super().__contains__(key)

    def __setitem__(self, key: int, value: RtpPacket) -> None:
        self.operations += 1
        super().__setitem__(key, value)

    def pop(self, key: int, default: RtpPacket | None = None) -> RtpPacket | None:  # type: ignore[override]
        self.operations += 1
        return super().pop(key, default)


def audio(seq: int) -> RtpPacket:
    return packet(seq & 0xFFFF, 960 * seq & 0xFFFFFFFF, marker=False)


def emitted_at(
    assembler: FrameAssembler, sink: Sink, clock: Clock, packets: list[RtpPacket], step: float
) -> dict[int, int]:
    """Feeds packets `step` seconds apart; the index of the packet whose arrival let each
    frame out, by the frame's RTP timestamp."""
    out: dict[int, int] = {}
    for i, p in enumerate(packets):
        clock.now += step
        assembler.add(p)
        for f in sink.frames[len(out) :]:
            out[f.timestamp] = i
    return out


def test_a_lost_audio_packet_costs_that_packet_and_nothing_else() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("audio", sink, clock=clock)
    lost = {50, 51, 120}  # one lost, two in a row, one more
    sent = [audio(s) for s in range(1, 200)]
    out = emitted_at(
        assembler, sink, clock, [p for p in sent if p.sequence_number not in lost], 0.02
    )
    wanted = [p.timestamp for p in sent if p.sequence_number not in lost]
    assert [f.timestamp for f in sink.frames] == wanted  # every other packet, in order
    # Each packet leaves when it arrives or, behind a loss, with the next one (20 ms later).
    arrival = {t: i for i, t in enumerate(wanted)}
    assert all(out[t] - arrival[t] <= 1 for t in wanted)
    assert [out[t] - arrival[t] for t in wanted].count(1) == 2  # 52 and 121 waited
    assert assembler.packets_expected == 199
    assert assembler.packets_received == 196
    assert assembler.packets_lost == 3
    assert assembler.packets_late == 0


def test_audio_behind_a_loss_in_a_burst_leaves_after_three_packets() -> None:
    # Packets that arrive together (after a stall on the path) are not held by time, but no
    # more than three wait behind a gap.
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("audio", sink, clock=clock)
    out = emitted_at(assembler, sink, clock, [audio(s) for s in (1, 3, 4, 5, 6, 7)], 0.0)
    assert [f.timestamp // 960 for f in sink.frames] == [1, 3, 4, 5, 6, 7]
    assert out[960 * 3] == 4  # let out by the fourth held packet


def test_reordered_audio_within_the_window_is_put_back_in_order() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("audio", sink, clock=clock)
    # 3 overtakes 2 by 5 ms; 6 and 7 arrive before 5, together.
    order = [1, 3, 2, 4, 6, 7, 5, 8]
    steps = [0.02, 0.02, 0.005, 0.015, 0.02, 0.0, 0.002, 0.018]
    for seq, step in zip(order, steps, strict=True):
        clock.now += step
        assembler.add(audio(seq))
    assert [f.timestamp // 960 for f in sink.frames] == list(range(1, 9))
    assert assembler.packets_late == 0
    assert assembler.packets_lost == 0


def test_an_audio_packet_later_than_the_window_is_dropped() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("audio", sink, clock=clock)
    emitted_at(assembler, sink, clock, [audio(s) for s in (1, 3, 4)], 0.02)
    assert [f.timestamp // 960 for f in sink.frames] == [1, 3, 4]
    clock.now += 0.001
    assert assembler.add(audio(2)) == (False, None)  # its slot has passed
    assembler.add(audio(5))
    assert [f.timestamp // 960 for f in sink.frames] == [1, 3, 4, 5]
    assert (assembler.packets_lost, assembler.packets_late) == (1, 1)


def test_audio_sequence_numbers_wrap_around() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("audio", sink, clock=clock)
    # 65535 is lost; 1 overtakes 0 across the wrap.
    for seq, step in ((65533, 0.02), (65534, 0.02), (1, 0.04), (0, 0.002), (2, 0.018)):
        clock.now += step
        assembler.add(packet(seq, 960 * (seq if seq > 10 else seq + 65536), marker=False))
    assert [f.timestamp // 960 for f in sink.frames] == [65533, 65534, 65536, 65537, 65538]
    assert (assembler.packets_expected, assembler.packets_lost) == (6, 1)


def test_a_video_packet_is_given_up_after_the_wait_not_after_a_packet_count() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("video", sink, clock=clock)
    wait = assembler.video_wait_s
    assert 0.05 <= wait <= 0.3
    feed(assembler, frame(100, 2, 3000, KEY))
    broken = frame(102, 3, 6000)
    del broken[1]  # lost, and its retransmission too
    # A low-bitrate stream: one packet every 30 ms, far fewer than 64 in the wait.
    later = [p for n in range(10) for p in frame(105 + n, 1, 9000 + 3000 * n)]
    requests, times = [], []
    for p in broken + later:
        clock.now += 0.03
        requests.append(assembler.add(p)[0])
        times.append(clock.now)
    noticed = times[1]  # 104 arrived: 103 is missing
    given_up = requests.index(True)
    assert requests.count(True) == 1
    assert times[given_up] - noticed >= wait > times[given_up - 1] - noticed
    # Delta frames after the gap cannot be decoded: nothing until a keyframe.
    assert [f.timestamp for f in sink.frames] == [3000]
    clock.now += 0.03
    feed(assembler, frame(115, 2, 40000, KEY) + frame(117, 2, 43000))
    assert [f.timestamp for f in sink.frames] == [3000, 40000, 43000]
    # The retransmission arriving after all is dropped.
    assert feed(assembler, [packet(103, 6000, marker=False)]) == [False]
    assert [f.timestamp for f in sink.frames] == [3000, 40000, 43000]
    assert (assembler.packets_lost, assembler.packets_late) == (1, 1)


def test_a_retransmission_in_time_completes_its_frame() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("video", sink, clock=clock)
    packets = frame(100, 3, 3000, KEY) + frame(103, 2, 6000)
    requests = []
    for p in [packets[0], packets[2], packets[3], packets[4], packets[1]]:
        clock.now += 0.01
        requests.append(assembler.add(p)[0])
    assert not any(requests)
    assert [f.timestamp for f in sink.frames] == [3000, 6000]
    assert assembler.packets_lost == 0


def test_the_video_wait_follows_how_long_repairs_take_within_bounds() -> None:
    def wait_after(repair_s: float) -> float:
        sink, clock = Sink(), Clock()
        assembler = FrameAssembler("video", sink, clock=clock)
        seq = 100
        for n in range(40):
            clock.now += 0.01
            p = frame(seq, 3, 3000 * (n + 1), KEY if n == 0 else DELTA)
            feed(assembler, [p[0], p[2]])  # the middle one is missing
            clock.now += repair_s
            feed(assembler, [p[1]])  # ... and comes again repair_s later
            seq += 3
        return assembler.video_wait_s

    assert wait_after(0.001) == 0.05  # loopback: the lower bound
    # The NACK and two asks again, each a repair delay and a quarter apart, and a margin.
    assert 0.14 <= wait_after(0.03) <= 0.155
    # Repairs slower than the wait come too late, but still count: the wait grows to its bound.
    assert wait_after(0.5) == 0.3


def test_a_missing_video_packet_is_asked_for_again_until_it_comes() -> None:
    """Its retransmission is lost once: it is asked for again a retry interval after the NACK
    (not only when another loss happens), and the frame completes when it comes."""
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("video", sink, clock=clock)
    feed(assembler, frame(65533, 2, 3000, KEY))  # across the wrap of sequence numbers
    broken = frame(65535, 3, 6000)  # 65535, 0, 1
    assembler.add(broken[0])
    assembler.add(broken[2])  # 0 is missing: aiortc's NackGenerator asks for it now
    assert assembler.holding and assembler.wanted(0) and not assembler.wanted(1)
    assert assembler.nack_again() == []  # just asked
    asks = []
    for n in range(12):  # a packet of the next frame every 10 ms
        clock.now += 0.01
        assembler.add(packet(2 + n, 9000 + 3000 * n, marker=True))
        asks.append(assembler.nack_again())
    retry = assembler.video_retry_s
    assert asks[int(retry / 0.01)] == [0] and asks.count([0]) == 1
    assembler.add(broken[1])  # the second retransmission comes
    assert not assembler.holding
    assert [f.timestamp for f in sink.frames] == [3000, 6000] + [9000 + 3000 * n for n in range(12)]
    assert assembler.packets_lost == 0


def test_asking_again_stops_after_the_retries_and_at_the_give_up() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("video", sink, AssemblyLimits(video_nack_retries=2), clock)
    feed(assembler, frame(100, 2, 3000, KEY))
    assembler.add(packet(103, 6000, marker=True))  # 102 is lost, for good
    asked_again = 0
    n = 0
    while assembler.holding:
        clock.now += 0.002
        n += 1
        assembler.add(packet(103 + n, 6000 + 3000 * n, marker=True))
        asked_again += assembler.nack_again() == [102]
    assert asked_again == 2
    assert not assembler.wanted(102) and assembler.packets_lost == 1


def test_a_frame_that_never_ends_is_capped_in_packets() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("video", sink, AssemblyLimits(max_frame_packets=16), clock)
    endless = [packet(100 + i, 3000, marker=False, first=KEY if i == 0 else b"") for i in range(40)]
    requests = feed(assembler, endless)
    assert requests.index(True) == 16  # the 17th packet is one too many
    assert len(assembler._frame) < 16  # what was held is gone; the rest is dropped
    feed(assembler, frame(140, 2, 6000, KEY))
    assert [f.timestamp for f in sink.frames] == [6000]


def test_a_frame_is_capped_in_bytes() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("video", sink, AssemblyLimits(max_frame_bytes=1000), clock)
    big = frame(100, 5, 3000, KEY)
    for p in big:
        p._data += bytes(300)  # type: ignore[attr-defined]
    requests = feed(assembler, big)
    assert requests == [False, False, False, True, False]
    feed(assembler, frame(105, 2, 6000, KEY))
    assert [f.timestamp for f in sink.frames] == [6000]


def test_what_is_held_behind_a_gap_is_capped_before_the_wait_ends() -> None:
    sink, clock = Sink(), Clock()
    limits = AssemblyLimits(max_frame_packets=32)
    assembler = FrameAssembler("video", sink, limits, clock)
    feed(assembler, frame(100, 2, 3000, KEY))
    # 102 is lost; a burst of small frames follows, all within one millisecond.
    later = [p for n in range(40) for p in frame(103 + 2 * n, 2, 6000 + 3000 * n)]
    requests = feed(assembler, later)
    assert requests.index(True) == 32  # 33 held: given up, long before the wait
    assert len(assembler._held) == 0


def test_a_long_gap_costs_each_packet_a_bounded_amount_of_work() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("video", sink, clock=clock)
    held = CountingDict()
    assembler._held = held  # type: ignore[assignment]
    feed(assembler, frame(100, 2, 3000, KEY))
    n = 400  # 102 is lost; 400 packets (one big frame and small ones) wait behind it
    later = frame(103, 200, 6000) + [
        p for i in range(100) for p in frame(303 + 2 * i, 2, 9000 + 3000 * i)
    ]
    assert len(later) == n
    feed(assembler, later)
    assert len(held) == n  # all within the wait, and under the caps
    feed(assembler, [packet(102, 6000, marker=False, first=DELTA)])  # the retransmission
    assert len(held) == 0
    assert len(sink.frames) == 102
    # Each packet is stored once, looked at once when the gap closes and taken out once:
    # the old assembler scanned everything held for every packet (n * n / 2 = 80 000).
    assert held.operations <= 4 * n


def test_a_big_frame_in_order_never_touches_the_held_packets() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("video", sink, clock=clock)
    held = CountingDict()
    assembler._held = held  # type: ignore[assignment]
    feed(assembler, frame(100, 300, 3000, KEY))
    assert held.operations == 0
    assert [len(f.data) for f in sink.frames] == [301]


def test_a_keyframe_is_asked_for_again_while_it_does_not_come() -> None:
    sink, clock = Sink(), Clock()
    assembler = FrameAssembler("video", sink, clock=clock)
    feed(assembler, frame(100, 2, 3000, KEY))
    seq, requests = 103, []  # 102 is lost for good
    for n in range(30):  # 30 delta frames, 33 ms apart, and no keyframe
        clock.now += 0.033
        requests += feed(assembler, frame(seq, 2, 6000 + 3000 * n))
        seq += 2
    # The first when the frame is given up, then about every 0.3 s.
    assert 3 <= requests.count(True) <= 4
    assert [f.timestamp for f in sink.frames] == [3000]
