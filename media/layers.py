"""Which layer a subscriber gets of each video track: the full picture, the low layer, or none
(audio only). Audio is never dropped.

A receiver's bandwidth estimate (REMB) follows what it receives: Chrome's stays within about
1.5x its incoming rate, so a small picture yields a small estimate although the link has room.
The estimate therefore only says "step down" when it falls below what the subscriber is
being sent (congestion), or when loss is high; it then picks the best layer that fits. It can
never show room for a layer that is not being sent, so after a clean spell a layer down tries
the next one up (a probe); a probe that fails makes the next wait twice as long. Hysteresis
keeps a bursty village uplink from flipping the picture every second."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Layer(StrEnum):
    FULL = "full"
    LOW = "low"
    AUDIO_ONLY = "audio_only"


# The low layer's target; also what it is assumed to take before it has been measured.
LOW_BPS = 150_000
DOWN_AFTER = 2  # samples (seconds) in which the current layer does not fit
UP_AFTER = 5  # samples in which the better layer fits with room to spare
# REMB follows what is being received, so "does not fit" must mean clearly below it.
FITS = 0.8
HEADROOM = 1.2
LOSSY = 0.10
CLEAN = 0.02
# Clean samples before a layer down tries the next one up; doubled after a failed probe.
PROBE_AFTER = 15
PROBE_AFTER_MAX = 120
# A step down this soon after a probe means the probe failed.
PROBE_TRIAL = 5
_ORDER = [Layer.AUDIO_ONLY, Layer.LOW, Layer.FULL]


def video_budget(remb_bps: float, audio_bps: float, video_tracks: int) -> float:
    """The share of a subscriber's estimated bandwidth each video track may have, once the
    audio it receives is paid for."""
    return max(0.0, remb_bps - audio_bps) / max(1, video_tracks)


def congested(remb_bps: float, sent_bps: float) -> bool:
    """The receiver estimates less than it is being sent."""
    return remb_bps < FITS * sent_bps


@dataclass
class LayerChooser:
    current: Layer = Layer.FULL
    _below: int = 0
    _above: int = 0
    _clean: int = 0
    _probe_after: int = PROBE_AFTER
    # Samples since the last probe, while it is on trial.
    _since_probe: int | None = None

    def update(
        self,
        budget_bps: float | None,
        fraction_lost: float | None,
        needs: Mapping[Layer, float],
        congested: bool,
    ) -> Layer:
        """One sample a second. `budget_bps` is this track's share of the estimate, `needs`
        what each layer takes now, `congested` whether the subscriber's estimate is below what
        it is sent. Returns the layer."""
        if budget_bps is None:
            return self.current  # no estimate yet: keep what we have
        lost = fraction_lost or 0.0
        step = _ORDER.index(self.current)
        if self._since_probe is not None:
            self._since_probe += 1
            if self._since_probe > PROBE_TRIAL:
                self._since_probe = None  # the probe held
                self._probe_after = PROBE_AFTER
        over = budget_bps < FITS * needs[self.current] and congested
        if step > 0 and (over or lost > LOSSY):
            self._above = self._clean = 0
            self._below += 1
            if self._below >= DOWN_AFTER:
                self._below = 0
                if self._since_probe is not None:
                    self._probe_after = min(2 * self._probe_after, PROBE_AFTER_MAX)
                    self._since_probe = None
                fits = [layer for layer in _ORDER[:step] if budget_bps >= FITS * needs[layer]]
                # Straight to the best layer that fits; one step at a time when it is loss.
                self.current = fits[-1] if fits and lost <= LOSSY else _ORDER[step - 1]
            return self.current
        self._below = 0
        if step + 1 >= len(_ORDER):
            self._above = self._clean = 0
            return self.current
        better = _ORDER[step + 1]
        self._clean = self._clean + 1 if lost < CLEAN else 0
        if budget_bps >= HEADROOM * needs[better] and lost < CLEAN:
            self._above += 1
        else:
            self._above = 0
        if self._above >= UP_AFTER:
            self._step_up(better, probe=False)
        elif self._clean >= self._probe_after:
            self._step_up(better, probe=True)
        return self.current

    def _step_up(self, better: Layer, *, probe: bool) -> None:
        self.current = better
        self._above = self._clean = 0
        self._since_probe = 0 if probe else None
