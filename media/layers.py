"""Which layer a subscriber gets of each video track: the full picture, the low layer, or none
(audio only). Audio is never dropped.

What the relay hears from a subscriber, once a second: its bandwidth estimate (REMB), and from
its receiver reports the loss and the round-trip time. Chrome's estimate (without transport-cc,
which aiortc lacks) is delay-based and follows what it receives: it rises by about 8 % a second
and never above 1.5x its incoming rate, and when it sees delay grow it falls to 0.85x that rate.
So an estimate below what the subscriber is sent is no proof of congestion on its own: after a
step up it lags for many seconds, and on a busy machine a stalled process makes Chrome see
delay grow now and then on a perfect link. A link that is really too thin also shows a queue
(the round-trip time rises well above its floor), or heavy loss, or the estimate stays low
without recovering; only then does a layer step down, to the best that fits the estimate.

The estimate can never show room for a layer that is not being sent, so after a quiet spell a
layer down tries the next one up (a probe) and watches for a queue; a probe that fails goes
back to where it came from at the first receiver report that shows a queue (or the first
congested second), and makes the next wait twice as long, up to a bound that keeps a lifted
cap from leaving the picture small for long. Random loss (a lossy radio link) is not
congestion: a smaller picture does not help it, and it never steps down alone."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Layer(StrEnum):
    FULL = "full"
    LOW = "low"
    AUDIO_ONLY = "audio_only"


# The low layer's target; also what it is assumed to take before it has been measured.
LOW_BPS = 150_000
DOWN_AFTER = 2  # congested samples (seconds) in a row before a layer steps down
UP_AFTER = 5  # samples in which the better layer fits with room to spare
# "Does not fit" must mean clearly below, since the estimate follows what is received.
FITS = 0.8
HEADROOM = 1.2
# A round-trip time this far above the subscriber's floor is a queue filling on its path
# (a 4G router's buffer holds hundreds of milliseconds; jitter of tens moves it less).
QUEUE_S = 0.15
RTT_FLOOR_WINDOW = 60  # samples over which the floor is the lowest round-trip time
# Loss this heavy, with the estimate below what is sent, is a link dropping what it cannot
# carry; random loss on a radio link (a few per cent, 10 % at worst) is not.
HEAVY_LOSS = 0.2
# An estimate that stays below what is sent this long without climbing back is believed.
INSIST_AFTER = 8
RECOVERING = 1.1
# Quiet samples before a layer down tries the next one up; doubled after a failed probe.
PROBE_AFTER = 8
PROBE_AFTER_MAX = 15
# A probe is on trial this long: any congested second in it undoes the probe at once.
PROBE_TRIAL = 5
_ORDER = [Layer.AUDIO_ONLY, Layer.LOW, Layer.FULL]


def video_budget(remb_bps: float, audio_bps: float, video_tracks: int) -> float:
    """The share of a subscriber's estimated bandwidth each video track may have, once the
    audio it receives is paid for."""
    return max(0.0, remb_bps - audio_bps) / max(1, video_tracks)


@dataclass(frozen=True)
class LinkSample:
    """One second of what a subscriber's link reports."""

    remb_bps: float | None  # its newest estimate, None before the first
    sent_bps: float  # everything the relay sent it over the second
    # The lowest round-trip time measured in the second: a standing queue raises every
    # report, a process that stalls for a moment only some.
    rtt_s: float | None = None
    lost: float | None = None  # the highest fraction lost (0..1) reported in the second


@dataclass(frozen=True)
class Verdict:
    congested: bool  # the link does not carry what it is sent
    quiet: bool  # no queue, no heavy loss: a probe may count this second


@dataclass
class LinkMonitor:
    """One subscriber's downlink, judged a second at a time (see the module's docstring)."""

    _rtts: deque[float] = field(default_factory=lambda: deque(maxlen=RTT_FLOOR_WINDOW))
    # The estimate when it first went below what is sent, and for how many samples since.
    _low_since: float | None = None
    _low_for: int = 0

    def queued(self, rtt_s: float) -> bool:
        """Whether one round-trip time shows a queue on the path (against the floor so far)."""
        return bool(self._rtts) and rtt_s - min(self._rtts) > QUEUE_S

    def update(self, sample: LinkSample) -> Verdict:
        queue = False
        if sample.rtt_s is not None:
            self._rtts.append(sample.rtt_s)
            queue = sample.rtt_s - min(self._rtts) > QUEUE_S
        heavy = (sample.lost or 0.0) > HEAVY_LOSS
        remb = sample.remb_bps
        below = remb is not None and remb < FITS * sample.sent_bps
        insists = False
        if below and remb is not None:
            if self._low_since is None or remb > RECOVERING * self._low_since:
                # Climbing back (an estimate following a step up): it is judged afresh.
                self._low_since, self._low_for = remb, 0
            self._low_for += 1
            insists = self._low_for >= INSIST_AFTER
        else:
            self._low_since, self._low_for = None, 0
        congested = below and (queue or heavy or insists)
        return Verdict(congested=congested, quiet=not (congested or queue or heavy))


@dataclass
class LayerChooser:
    """One video track's layer for one subscriber."""

    current: Layer = Layer.FULL
    _congested: int = 0
    _above: int = 0
    _quiet: int = 0
    _probe_after: int = PROBE_AFTER
    # Samples since the last probe, while it is on trial.
    _since_probe: int | None = None

    def update(
        self, budget_bps: float | None, needs: Mapping[Layer, float], verdict: Verdict
    ) -> Layer:
        """One sample a second. `budget_bps` is this track's share of the estimate (None
        before there is one), `needs` what each layer takes now, `verdict` the subscriber's
        link over the second. Returns the layer."""
        if budget_bps is None:
            return self.current  # no estimate yet: keep what we have
        step = _ORDER.index(self.current)
        on_trial = self._since_probe is not None
        if self._since_probe is not None:
            self._since_probe += 1
            if self._since_probe > PROBE_TRIAL:
                self._since_probe = None  # the probe held
                self._probe_after = PROBE_AFTER
        if step > 0 and verdict.congested and budget_bps < FITS * needs[self.current]:
            self._above = self._quiet = 0
            self._congested += 1
            if self._congested >= (1 if on_trial else DOWN_AFTER):
                self._congested = 0
                if on_trial:
                    self._probe_after = min(2 * self._probe_after, PROBE_AFTER_MAX)
                    self._since_probe = None
                if on_trial:
                    # The layer tried does not fit; the one it came from did, a moment ago.
                    self.current = _ORDER[step - 1]
                    return self.current
                fits = [layer for layer in _ORDER[:step] if budget_bps >= FITS * needs[layer]]
                self.current = fits[-1] if fits else Layer.AUDIO_ONLY
            return self.current
        self._congested = 0
        if step + 1 >= len(_ORDER):
            self._above = self._quiet = 0
            return self.current
        better = _ORDER[step + 1]
        self._quiet = self._quiet + 1 if verdict.quiet else 0
        if verdict.quiet and budget_bps >= HEADROOM * needs[better]:
            self._above += 1
        else:
            self._above = 0
        if self._above >= UP_AFTER:
            self._step_up(better, probe=False)
        elif self._quiet >= self._probe_after:
            self._step_up(better, probe=True)
        return self.current

    @property
    def on_trial(self) -> bool:
        return self._since_probe is not None

    def undo_probe(self) -> Layer:
        """The probe on trial failed (a receiver report showed a queue between two samples):
        back to the layer it came from, and the next probe waits twice as long."""
        if self._since_probe is not None:
            self._since_probe = None
            self._probe_after = min(2 * self._probe_after, PROBE_AFTER_MAX)
            self._congested = self._above = self._quiet = 0
            self.current = _ORDER[_ORDER.index(self.current) - 1]
        return self.current

    def _step_up(self, better: Layer, *, probe: bool) -> None:
        self.current = better
        self._above = self._quiet = 0
        self._since_probe = 0 if probe else None
