"""The layer choice, sample by sample: what REMB and loss make a subscriber's layer do."""

from __future__ import annotations

from media.layers import (
    LOW_BPS,
    PROBE_AFTER,
    Layer,
    LayerChooser,
    congested,
    video_budget,
)

AUDIO = 32_000
FULL = 1_000_000
NEEDS = {Layer.FULL: FULL, Layer.LOW: LOW_BPS, Layer.AUDIO_ONLY: 0.0}


def run(
    chooser: LayerChooser, samples: int, remb: float, sent: float, lost: float = 0.0
) -> list[Layer]:
    budget = video_budget(remb, AUDIO, 1)
    return [chooser.update(budget, lost, NEEDS, congested(remb, sent)) for _ in range(samples)]


def test_an_estimate_that_follows_a_small_stream_keeps_the_picture() -> None:
    # Chrome's estimate stays near what it receives: a 20 kbit/s picture and the audio give
    # about 60 kbit/s. Not congestion: the picture stays.
    small = {Layer.FULL: 20_000.0, Layer.LOW: 20_000.0, Layer.AUDIO_ONLY: 0.0}
    chooser = LayerChooser()
    layers = [
        chooser.update(video_budget(55_000, AUDIO, 1), 0.0, small, congested(55_000, 52_000))
        for _ in range(30)
    ]
    assert set(layers) == {Layer.FULL}


def test_a_capped_estimate_steps_down_to_what_fits() -> None:
    chooser = LayerChooser()
    sent = FULL + AUDIO
    layers = run(chooser, 3, remb=AUDIO + 160_000, sent=sent)
    assert layers == [Layer.FULL, Layer.LOW, Layer.LOW]  # after two samples, not one
    # Too little even for the low layer: audio only, audio never dropped.
    assert run(chooser, 2, remb=AUDIO + 20_000, sent=LOW_BPS + AUDIO)[-1] is Layer.AUDIO_ONLY


def test_heavy_loss_steps_down_one_layer_at_a_time() -> None:
    chooser = LayerChooser()
    assert run(chooser, 2, remb=5 * FULL, sent=FULL, lost=0.3)[-1] is Layer.LOW
    assert run(chooser, 2, remb=5 * FULL, sent=LOW_BPS, lost=0.3)[-1] is Layer.AUDIO_ONLY


def test_room_in_the_estimate_steps_back_up_after_five_clean_samples() -> None:
    chooser = LayerChooser(current=Layer.LOW)
    layers = run(chooser, 5, remb=2 * FULL, sent=LOW_BPS + AUDIO)
    assert layers == [Layer.LOW] * 4 + [Layer.FULL]


def test_a_layer_down_probes_up_when_the_estimate_cannot_show_room() -> None:
    # In audio only, the estimate follows the audio: it can never show room for video.
    chooser = LayerChooser(current=Layer.AUDIO_ONLY)
    remb = 1.5 * AUDIO
    layers = run(chooser, PROBE_AFTER, remb=remb, sent=AUDIO)
    assert layers[:-1] == [Layer.AUDIO_ONLY] * (PROBE_AFTER - 1)
    assert layers[-1] is Layer.LOW  # the probe
    # The probe fails (congestion at once): back down, and the next probe waits twice as long.
    assert run(chooser, 2, remb=remb, sent=LOW_BPS + AUDIO)[-1] is Layer.AUDIO_ONLY
    layers = run(chooser, 2 * PROBE_AFTER, remb=remb, sent=AUDIO)
    assert layers.index(Layer.LOW) == 2 * PROBE_AFTER - 1


def test_a_probe_that_holds_keeps_the_better_layer() -> None:
    chooser = LayerChooser(current=Layer.LOW)
    assert run(chooser, PROBE_AFTER, remb=LOW_BPS * 1.5, sent=LOW_BPS + AUDIO)[-1] is Layer.FULL
    # The link turns out to carry it: the estimate follows what is now sent.
    assert set(run(chooser, 30, remb=1.1 * (FULL + AUDIO), sent=FULL + AUDIO)) == {Layer.FULL}


def test_lossy_samples_do_not_count_towards_a_probe() -> None:
    chooser = LayerChooser(current=Layer.AUDIO_ONLY)
    for _ in range(3):
        run(chooser, PROBE_AFTER - 1, remb=AUDIO, sent=AUDIO)
        run(chooser, 1, remb=AUDIO, sent=AUDIO, lost=0.05)
    assert chooser.current is Layer.AUDIO_ONLY


def test_no_estimate_keeps_the_layer() -> None:
    chooser = LayerChooser(current=Layer.LOW)
    assert chooser.update(None, 0.5, NEEDS, True) is Layer.LOW
