"""Which layer a subscriber gets of each video track: the full picture, the low layer, or none
(audio only). The subscriber's bandwidth estimate (REMB) is compared with what each layer
actually takes; hysteresis keeps a bursty village uplink from flipping the picture every
second, and audio is never dropped."""

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
_ORDER = [Layer.AUDIO_ONLY, Layer.LOW, Layer.FULL]


def video_budget(remb_bps: float, audio_bps: float, video_tracks: int) -> float:
    """The share of a subscriber's estimated bandwidth each video track may have, once the
    audio it receives is paid for."""
    return max(0.0, remb_bps - audio_bps) / max(1, video_tracks)


@dataclass
class LayerChooser:
    current: Layer = Layer.FULL
    _below: int = 0
    _above: int = 0

    def update(
        self, budget_bps: float | None, fraction_lost: float | None, needs: Mapping[Layer, float]
    ) -> Layer:
        """One sample a second; `needs` is what each layer takes now. Returns the layer."""
        if budget_bps is None:
            return self.current  # no estimate yet: keep what we have
        lost = fraction_lost or 0.0
        step = _ORDER.index(self.current)
        if step > 0 and (budget_bps < FITS * needs[self.current] or lost > LOSSY):
            self._above = 0
            self._below += 1
            if self._below >= DOWN_AFTER:
                self._below = 0
                fits = [layer for layer in _ORDER[:step] if budget_bps >= FITS * needs[layer]]
                # Straight to the best layer that fits; one step at a time when it is loss.
                self.current = fits[-1] if fits and lost <= LOSSY else _ORDER[step - 1]
            return self.current
        self._below = 0
        if step + 1 < len(_ORDER):
            better = _ORDER[step + 1]
            if budget_bps >= HEADROOM * needs[better] and lost < CLEAN:
                self._above += 1
                if self._above >= UP_AFTER:
                    self._above = 0
                    self.current = better
                return self.current
        self._above = 0
        return self.current
