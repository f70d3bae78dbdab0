"""The layer choice, second by second: what a subscriber's estimate (REMB), round-trip time and
loss make its layer do. The traces are shaped like what Chromium and the relay were seen to do
in the network lab (media/layers.py's docstring): an estimate that follows what it receives and
lags after a step up, dips when a busy machine stalls, and a queue that shows as round-trip
time when a link is capped."""

from __future__ import annotations

from media.layers import (
    DOWN_AFTER,
    INSIST_AFTER,
    LOW_BPS,
    PROBE_AFTER,
    PROBE_AFTER_MAX,
    PROBE_TRIAL,
    Layer,
    LayerChooser,
    LinkMonitor,
    LinkSample,
    video_budget,
)

AUDIO = 32_000
FULL = 800_000
NEEDS = {Layer.FULL: FULL, Layer.LOW: LOW_BPS, Layer.AUDIO_ONLY: 0.0}
FLOOR = 0.005  # round-trip time of an idle link
QUEUED = 0.45  # a 400 kbit/s cap's 500 ms buffer, most of it full


class Subscriber:
    """One subscriber receiving one video track and one audio track."""

    def __init__(self, layer: Layer = Layer.FULL) -> None:
        self.link = LinkMonitor()
        self.chooser = LayerChooser(current=layer)

    @property
    def sent(self) -> float:
        return NEEDS[self.chooser.current] + AUDIO

    def second(self, remb: float | None, rtt: float | None = FLOOR, lost: float = 0.0) -> Layer:
        verdict = self.link.update(LinkSample(remb, self.sent, rtt, lost))
        budget = None if remb is None else video_budget(remb, AUDIO, 1)
        return self.chooser.update(budget, NEEDS, verdict)

    def seconds(
        self, count: int, remb: float | None, rtt: float | None = FLOOR, lost: float = 0.0
    ) -> list[Layer]:
        return [self.second(remb, rtt, lost) for _ in range(count)]

    def following(self, count: int, remb: float, rtt: float | None = FLOOR) -> list[Layer]:
        """An estimate that climbs as Chrome's does (8 % a second, at most 1.5x what it gets)."""
        layers = []
        for _ in range(count):
            remb = min(remb * 1.08, 1.5 * self.sent + 10_000)
            layers.append(self.second(remb, rtt))
        return layers


def test_no_estimate_keeps_the_layer() -> None:
    subscriber = Subscriber(Layer.LOW)
    assert set(subscriber.seconds(30, remb=None, rtt=QUEUED, lost=0.5)) == {Layer.LOW}


def test_an_estimate_that_follows_a_small_stream_keeps_the_picture() -> None:
    # A 20 kbit/s picture and the audio give Chrome an estimate of about 60 kbit/s: not
    # congestion, although far below what the full picture of another publisher would take.
    small = {Layer.FULL: 20_000.0, Layer.LOW: 20_000.0, Layer.AUDIO_ONLY: 0.0}
    link, chooser = LinkMonitor(), LayerChooser()
    for _ in range(30):
        verdict = link.update(LinkSample(55_000, 52_000, FLOOR, 0.0))
        assert chooser.update(video_budget(55_000, AUDIO, 1), small, verdict) is Layer.FULL


def test_a_dip_in_the_estimate_without_a_queue_keeps_the_picture() -> None:
    # A stalled process on a clean link: Chromium's estimate drops to a third for a few
    # seconds, the round-trip time stays at its floor, nothing is lost.
    subscriber = Subscriber()
    subscriber.seconds(10, remb=1.2 * FULL)
    assert set(subscriber.seconds(4, remb=0.35 * FULL)) == {Layer.FULL}
    assert set(subscriber.following(40, remb=0.35 * FULL)) == {Layer.FULL}


def test_loss_alone_is_the_link_not_congestion() -> None:
    # A radio link losing 10 % of its packets: a smaller picture would not help.
    subscriber = Subscriber()
    assert set(subscriber.seconds(60, remb=1.3 * FULL, lost=0.10)) == {Layer.FULL}


def test_a_queue_behind_a_falling_estimate_steps_down_to_what_fits() -> None:
    subscriber = Subscriber()
    subscriber.seconds(10, remb=1.2 * FULL)
    # The link is capped at 400 kbit/s: its buffer fills, the estimate falls to 0.85x it.
    layers = subscriber.seconds(DOWN_AFTER + 1, remb=340_000, rtt=QUEUED)
    assert layers == [Layer.FULL] * (DOWN_AFTER - 1) + [Layer.LOW, Layer.LOW]
    # The queue drains on the low layer: it stays.
    assert set(subscriber.seconds(5, remb=340_000, rtt=0.2)) == {Layer.LOW}
    assert set(subscriber.seconds(PROBE_AFTER - 1, remb=290_000)) == {Layer.LOW}


def test_too_little_even_for_the_low_layer_leaves_audio_only() -> None:
    subscriber = Subscriber()
    subscriber.seconds(5, remb=1.2 * FULL)
    assert subscriber.seconds(DOWN_AFTER, remb=AUDIO + 40_000, rtt=QUEUED)[-1] is Layer.AUDIO_ONLY


def test_heavy_loss_below_the_estimate_steps_down_without_a_queue() -> None:
    # A link that polices instead of queueing: half of what it is sent is dropped.
    subscriber = Subscriber()
    subscriber.seconds(5, remb=1.2 * FULL)
    assert subscriber.seconds(DOWN_AFTER, remb=500_000, lost=0.5)[-1] is Layer.LOW


def test_an_estimate_that_insists_is_believed() -> None:
    # No queue and no loss seen, but the estimate stays far below what is sent and does not
    # climb back (a receiver that says so, over and over).
    subscriber = Subscriber()
    subscriber.seconds(5, remb=1.2 * FULL)
    layers = subscriber.seconds(INSIST_AFTER + DOWN_AFTER, remb=AUDIO + 160_000)
    assert layers.index(Layer.LOW) == INSIST_AFTER + DOWN_AFTER - 2
    assert layers[-1] is Layer.LOW


def test_a_probe_that_the_link_carries_holds_while_the_estimate_catches_up() -> None:
    # On the low layer Chrome's estimate can never show room for the full picture: 1.5x what
    # it gets at most. After a quiet spell the full picture is tried; on a link that carries
    # it, the estimate lags for many seconds without a queue, and the picture stays.
    subscriber = Subscriber(Layer.LOW)
    remb = 1.5 * (LOW_BPS + AUDIO) + 10_000
    layers = subscriber.seconds(PROBE_AFTER, remb=remb)
    assert layers == [Layer.LOW] * (PROBE_AFTER - 1) + [Layer.FULL]
    assert set(subscriber.following(60, remb=remb)) == {Layer.FULL}


def test_a_probe_into_a_capped_link_comes_down_at_once_and_waits_longer() -> None:
    subscriber = Subscriber(Layer.LOW)
    remb = 290_000
    assert subscriber.seconds(PROBE_AFTER, remb=remb)[-1] is Layer.FULL
    # The first second on trial shows the queue: straight back to the low layer.
    assert subscriber.second(remb=340_000, rtt=QUEUED) is Layer.LOW
    subscriber.seconds(2, remb=340_000, rtt=0.3)  # the queue drains
    layers = subscriber.seconds(PROBE_AFTER_MAX, remb=remb)
    assert layers.index(Layer.FULL) == min(2 * PROBE_AFTER, PROBE_AFTER_MAX) - 1


def test_probes_never_wait_so_long_that_a_lifted_cap_is_missed() -> None:
    subscriber = Subscriber(Layer.LOW)
    waits = []
    for _ in range(6):  # the cap stays: every probe fails
        waits.append(1)
        while subscriber.second(remb=290_000) is Layer.LOW:
            waits[-1] += 1
        assert subscriber.second(remb=340_000, rtt=QUEUED) is Layer.LOW
        subscriber.second(remb=340_000, rtt=0.3)
    assert waits[0] == PROBE_AFTER
    assert waits[1] == min(2 * PROBE_AFTER, PROBE_AFTER_MAX)
    assert waits[2:] == [PROBE_AFTER_MAX] * 4
    # The cap lifts: the next probe holds, within the longest wait and a trial.
    layers = subscriber.seconds(PROBE_AFTER_MAX + PROBE_TRIAL + 1, remb=290_000)
    assert layers[-1] is Layer.FULL
    # A probe that held makes the next wait short again.
    assert subscriber.chooser._probe_after == PROBE_AFTER


def test_seconds_with_a_queue_do_not_count_towards_a_probe() -> None:
    subscriber = Subscriber(Layer.AUDIO_ONLY)
    for _ in range(4):
        subscriber.seconds(PROBE_AFTER - 1, remb=1.5 * AUDIO)
        subscriber.second(remb=1.5 * AUDIO, rtt=QUEUED)
    assert subscriber.chooser.current is Layer.AUDIO_ONLY


def test_room_in_the_estimate_steps_up_without_a_probe() -> None:
    # The full picture is small (its publisher's own uplink is thin): it fits the estimate
    # that the low layer gets.
    small = {Layer.FULL: 200_000.0, Layer.LOW: LOW_BPS, Layer.AUDIO_ONLY: 0.0}
    link, chooser = LinkMonitor(), LayerChooser(current=Layer.LOW)
    layers = []
    for _ in range(5):
        verdict = link.update(LinkSample(300_000, LOW_BPS + AUDIO, FLOOR, 0.0))
        layers.append(chooser.update(video_budget(300_000, AUDIO, 1), small, verdict))
    assert layers == [Layer.LOW] * 4 + [Layer.FULL]


def test_the_round_trip_floor_is_the_links_own() -> None:
    # A long link (200 ms) is no queue; the same link with 200 ms more is.
    link = LinkMonitor()
    for _ in range(5):
        assert not link.update(LinkSample(300_000, FULL, 0.2, 0.0)).congested
    assert link.update(LinkSample(300_000, FULL, 0.4, 0.0)).congested
    assert not link.update(LinkSample(300_000, FULL, None, 0.0)).congested


def test_a_failed_probe_goes_back_where_it_came_from() -> None:
    # The estimate is lower than the low layer's share would need (a stall made Chrome cut
    # it), but not below what the low layer sends: the probe fails, and the low layer, which
    # the link carried a moment ago, comes back, not audio only.
    subscriber = Subscriber(Layer.LOW)
    remb = 150_000
    assert video_budget(remb, AUDIO, 1) < 0.8 * LOW_BPS
    assert subscriber.seconds(PROBE_AFTER, remb=remb)[-1] is Layer.FULL
    assert subscriber.second(remb=remb, rtt=QUEUED) is Layer.LOW


def test_a_report_that_shows_a_queue_undoes_a_probe_between_samples() -> None:
    subscriber = Subscriber(Layer.LOW)
    assert subscriber.seconds(PROBE_AFTER, remb=290_000)[-1] is Layer.FULL
    assert subscriber.chooser.on_trial
    # Judged against the link's own floor: jitter is no queue, a filling buffer is.
    assert not subscriber.link.queued(FLOOR + 0.05)
    assert subscriber.link.queued(QUEUED)
    assert subscriber.chooser.undo_probe() is Layer.LOW
    assert not subscriber.chooser.on_trial
    assert subscriber.chooser.undo_probe() is Layer.LOW  # nothing on trial: nothing undone
    layers = subscriber.seconds(PROBE_AFTER_MAX, remb=290_000)
    assert layers.index(Layer.FULL) == min(2 * PROBE_AFTER, PROBE_AFTER_MAX) - 1
