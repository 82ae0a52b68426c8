"""The timing protocol: which calls a comparison makes, in what order, and what may be concluded.

One request makes these calls on one loaded pipeline, in one process, on one device
(:func:`plan_calls` writes the schedule once; the engine, the progress bar, the work limit and
the GPU-time estimate all read it):

1. **Warm-ups, untimed.** Once per loaded pipeline and video size, a short full call (text
   encoder and VAE decoder included). Then, in every request, a short denoiser-only call
   (``output_type="latent"``) of the baseline and one of the accelerated pipeline.
2. **Rounds.** Each round is one baseline and one accelerated call made back to back; the order
   alternates from round to round (baseline first in odd rounds) so neither side always runs
   second. Round 1 holds the calls that decode the videos (the baseline's only when its video is
   not cached); later rounds stop at the latents. A cached baseline gives its video and fidelity
   only: its timing is always measured again in this request's rounds. When every denoising step
   of the stack costs alike (token merging without matching reuse), the later rounds may be
   *short*: a few steps each (``timing_steps``), and every round is then compared by its mean
   step after the first (the first also carries the loop's one-off costs).
3. **Figures.** The denoising speedup is the median of the rounds' paired ratios with a
   distribution-free interval (:mod:`vdtome.measure.stats`). A pair is always a pair of *calls*: the
   steps of one call share its conditions and are never counted as repeats, so fewer than
   :data:`~vdtome.measure.stats.MIN_PAIRS` rounds give no interval and no verdict ("not tested"). The
   noise threshold under which a significant change is still called noise is measured: the
   consecutive calls of one side are identical work, so their ratios are A/A pairs, kept per host
   and preset (:mod:`vdtome.measure.noise`). End-to-end is projected (Amdahl): the denoising times plus
   the untouched time (text encoding, decode, set-up) measured in this request's decoding calls,
   the same on both sides; its interval spans the denoising interval and the range of the
   untouched times measured. Phases the method does not touch are shown as unchanged and double
   as a noise check: when they differ between the sides by more than :data:`BUSY_THRESHOLD`, or
   their paired ratios (or the denoising loop's) spread over more than :data:`BUSY_SPREAD`, or
   other processes used the cores this request needs (:class:`~vdtome.measure.host_load.HostLoad`), the
   machine was busy and the result says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vdtome.core.presets import ModelPreset
from vdtome.measure.host_load import HostLoad
from vdtome.measure.memory import MemoryReport
from vdtome.measure.noise import NoiseThreshold
from vdtome.measure.stats import Ratio, diluted, median, paired_ratio
from vdtome.measure.timing import DENOISING, END_TO_END, TEXT_ENCODING, VAE_DECODE, TimingReport

BASELINE = "baseline"
ACCELERATED = "accelerated"
SIDES = (BASELINE, ACCELERATED)

#: An untouched phase that differs between the two sides by more than this (significantly, when
#: there are enough pairs for an interval) means the machine was not quiet during the request.
BUSY_THRESHOLD = 0.10
#: With a single pair (GPU clocks only) there is no interval: only a difference this large is called busy.
BUSY_THRESHOLD_SINGLE = 0.25
#: On a CPU clock, an untouched phase shorter than this (per call) is not used as a noise check.
MIN_CPU_CHECK_MS = 20.0
#: An untouched phase whose paired ratios spread over more than this factor (interval high / low)
#: was disturbed in some rounds. Single tiny CPU calls vary by up to about +-40 % on a quiet 2-core
#: machine (a spread near 2); a second process spinning on one core gives spreads of 10-40.
BUSY_SPREAD = 2.5

PHASE_LABELS = {
    TEXT_ENCODING: "text encoding",
    DENOISING: "denoising loop",
    VAE_DECODE: "VAE decode",
    END_TO_END: "end-to-end",
}


def round_order(round_number: int) -> tuple[str, str]:
    """Baseline first in odd rounds, accelerated first in even ones (1-based)."""
    return (BASELINE, ACCELERATED) if round_number % 2 else (ACCELERATED, BASELINE)


#: A short timing round needs a step after the first to measure (the first carries one-off costs).
MIN_TIMING_STEPS = 3
PIPELINE_WARMUP, WARMUP, TIMED, METERED = "pipeline warm-up", "warm-up", "timed", "metered"


@dataclass(frozen=True)
class PlannedCall:
    """One pipeline call of a request: ``kind`` (:data:`PIPELINE_WARMUP` with the text encoder and
    decoder, :data:`WARMUP` denoiser only, :data:`TIMED`, :data:`METERED`: untimed, its tensor
    memory counted), side, round (timed calls), steps, whether it decodes a video."""

    kind: str
    side: str
    round: int | None
    steps: int
    decode: bool


@dataclass(frozen=True)
class Schedule:
    """Every call of one request in order (see the module docstring)."""

    calls: tuple[PlannedCall, ...]

    @property
    def total_steps(self) -> int:
        """Denoising steps of every call: the progress bar's total."""
        return sum(call.steps for call in self.calls)

    @property
    def timed_steps(self) -> int:
        return sum(call.steps for call in self.calls if call.kind == TIMED)

    @property
    def warmup_steps(self) -> int:
        return sum(call.steps for call in self.calls if call.kind != TIMED)

    @property
    def decodes(self) -> int:
        return sum(call.decode for call in self.calls)

    def __add__(self, other: "Schedule") -> "Schedule":
        return Schedule(self.calls + other.calls)


def plan_calls(rounds: int, steps: int, timing_steps: int, warmup_steps: int, warm_pipeline: bool,
               decode_baseline: bool = True, meter_memory: bool = False) -> Schedule:
    """The calls of one comparison. ``timing_steps``: steps of the rounds after the first
    (``steps`` for full rounds); ``warm_pipeline``: this pipeline has not run at this size yet;
    ``decode_baseline``: the baseline video is not cached; ``meter_memory``: after the rounds, one
    untimed call per side whose tensor memory is counted (a CPU, where no allocator peak is exact)."""
    warm = min(warmup_steps, steps)
    calls = [PlannedCall(PIPELINE_WARMUP, BASELINE, None, warm, True)] if warm_pipeline else []
    calls.append(PlannedCall(WARMUP, BASELINE, None, warm, False))
    for round_number in range(1, rounds + 1):
        for side in round_order(round_number):
            if side == ACCELERATED and round_number == 1:  # after the baseline video: a failure here keeps it
                calls.append(PlannedCall(WARMUP, ACCELERATED, None, warm, False))
            decode = round_number == 1 and (side == ACCELERATED or decode_baseline)
            calls.append(PlannedCall(TIMED, side, round_number, steps if round_number == 1 else timing_steps, decode))
    if meter_memory:
        # Two steps: the first computes everything, the second holds what a step-reusing method kept.
        calls += [PlannedCall(METERED, side, None, min(2, steps), True) for side in (BASELINE, ACCELERATED)]
    return Schedule(tuple(calls))


@dataclass(frozen=True)
class TimedCall:
    """One timed pipeline call of the protocol."""

    side: str
    round: int  # 1-based
    decoded: bool  # the call decoded a video (else it stopped at the latents)
    timing: TimingReport
    memory: MemoryReport
    started_at: float  # time.time() at the start

    def to_dict(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "round": self.round,
            "decoded": self.decoded,
            "started_at": self.started_at,
            "latency": self.timing.to_dict(),
            "memory": self.memory.to_dict(),
        }


@dataclass(frozen=True)
class PhaseFigures:
    """One phase in both sides: median milliseconds over this request's calls and their ratio.

    ``touched``: the method can change this phase. For an untouched phase, ``check`` says what its
    noise check found, in words, and ``busy`` the reason it says the machine was busy (None when
    the two sides agree within the expected noise, or the phase cannot tell). ``per_step``: the
    milliseconds are the mean step after the first of each call (short timing rounds), not the
    whole loop.
    """

    phase: str
    baseline_ms: float | None
    accelerated_ms: float | None
    ratio: Ratio | None
    touched: bool
    busy: str | None = None
    check: str = ""
    per_step: bool = False

    @property
    def label(self) -> str:
        return PHASE_LABELS.get(self.phase, self.phase)

    def median_text(self, side: str) -> str | None:
        """A side's median as the cards and the players' captions write it (None: not measured)."""
        ms = getattr(self, f"{side}_ms")
        if ms is None:
            return None
        return f"{ms:.1f} ms/step" if self.per_step else f"{ms / 1000:.2f} s"

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "baseline_ms": self.baseline_ms,
            "accelerated_ms": self.accelerated_ms,
            # An untouched phase's ratio is a noise check: numbers without speed words or verdict.
            "ratio": None if self.ratio is None else self.ratio.to_dict(verdict=self.touched),
            "touched": self.touched,
            "busy": self.busy,
            "check": self.check,
            "per_step": self.per_step,
        }


CUDA_PEAK, TENSOR_PEAK, RSS_GROWTH = "peak CUDA allocated", "peak tensor memory", "peak RSS growth"

#: An RSS growth this small on both sides says nothing about the method: it is what the allocator kept
#: or gave back between calls (repeated identical calls of the shipped tiny models grow by 4 KiB to 8 MiB).
#: Below it a change is shown as an absolute figure within noise, never as a ratio.
RSS_FLOOR_BYTES = 32 * 2**20


@dataclass(frozen=True)
class MemoryFigures:
    """Peak memory of one kind of call in both sides, and whether the difference means anything.

    ``scope``: ``"whole call"`` (the calls that decoded the videos) or ``"denoising"`` (the calls
    that stopped at the latents, or a metered call up to its last step). ``kind``: ``"peak CUDA
    allocated"`` or ``"peak tensor memory"`` (exact: any change is real; the second counted per op
    in an untimed call on a CPU, :class:`vdtome.measure.memory.TensorMemoryMeter`), or ``"peak RSS
    growth"`` (a process figure that depends on what the allocator kept from earlier calls: a change
    no larger than the spread of repeated calls of one side is noise).
    ``baseline_from_cache``: the baseline figure comes from the cached run that made its video.
    """

    scope: str
    kind: str
    baseline_bytes: tuple[int, ...]
    accelerated_bytes: tuple[int, ...]
    baseline_from_cache: bool = False

    @property
    def exact(self) -> bool:
        return self.kind in (CUDA_PEAK, TENSOR_PEAK)

    @property
    def baseline(self) -> float | None:
        return _median_or_none(self.baseline_bytes)

    @property
    def accelerated(self) -> float | None:
        return _median_or_none(self.accelerated_bytes)

    @property
    def change_bytes(self) -> float | None:
        if self.baseline is None or self.accelerated is None:
            return None
        return self.accelerated - self.baseline

    @property
    def noise_bytes(self) -> int | None:
        """The largest spread among repeated calls of one side (None with fewer than 2 of each)."""
        if self.exact or self.baseline_from_cache or min(len(self.baseline_bytes), len(self.accelerated_bytes)) < 2:
            return None
        return max(max(v) - min(v) for v in (self.baseline_bytes, self.accelerated_bytes))

    @property
    def comparable(self) -> bool:
        """An exact figure, or two process figures from the same request."""
        return self.exact or not self.baseline_from_cache

    @property
    def below_floor(self) -> bool:
        """An RSS growth under :data:`RSS_FLOOR_BYTES` on both sides: the allocator's noise."""
        return (self.kind == RSS_GROWTH and self.baseline is not None and self.accelerated is not None
                and max(abs(self.baseline), abs(self.accelerated)) < RSS_FLOOR_BYTES)

    @property
    def within_noise(self) -> bool:
        """A comparable change this measurement cannot tell from no change."""
        if self.change_bytes is None or not self.comparable or self.exact:
            return False
        return self.below_floor or self.noise_bytes is None or abs(self.change_bytes) <= self.noise_bytes

    @property
    def ratio(self) -> float | None:
        """Accelerated / baseline peak, where it means something: an exact figure, or a process
        figure above the floor and beyond the spread of repeated calls (None otherwise)."""
        if self.baseline is None or self.accelerated is None or self.baseline <= 0 or not self.comparable:
            return None
        if not self.exact and self.within_noise:
            return None
        return self.accelerated / self.baseline

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "kind": self.kind,
            "baseline_bytes": list(self.baseline_bytes),
            "accelerated_bytes": list(self.accelerated_bytes),
            "change_bytes": self.change_bytes,
            "noise_bytes": self.noise_bytes,
            "within_noise": self.within_noise,
            "below_floor": self.below_floor,
            "ratio": self.ratio,
            "comparable": self.comparable,
            "baseline_from_cache": self.baseline_from_cache,
        }


@dataclass(frozen=True)
class TimingSummary:
    """Everything the protocol lets a comparison claim about time and memory."""

    rounds: int
    denoising: PhaseFigures
    end_to_end: PhaseFigures
    untouched: tuple[PhaseFigures, ...]
    # Median step from the second on where every step costs alike; else the loop's mean step (a
    # step cache computes its first steps in full: a median of the later ones would flatter it).
    seconds_per_step: tuple[float | None, float | None]
    memory: tuple[MemoryFigures, ...]  # whole call, then denoising (each where both sides have one)
    steps_alike: bool = True
    calls: tuple[TimedCall, ...] = field(repr=False, default=())
    noise: NoiseThreshold | None = None  # the verdicts' noise threshold and what it rests on
    host_load: HostLoad | None = None  # what other processes did to the cores meanwhile
    # Phases outside the loop the stack changes (a tiled decode, offloaded weights): each side's
    # decoding call, one per side, so no ratio is drawn.
    changed: tuple[PhaseFigures, ...] = ()

    def _busy_reasons(self) -> list[tuple[str, str]]:
        """(in a few words, in full) for each sign that the machine was busy."""
        reasons = []
        load = self.host_load
        if load is not None and load.busy:
            reasons.append((f"other processes used {load.other_cores:.1f} of its {load.cores} cores", load.busy))
        reasons += [(f"the {phase.label} took different times on the two sides", phase.busy)
                    for phase in self.untouched if phase.busy]
        ratio = self.denoising.ratio
        if ratio is not None and ratio.unit == "rounds" and ratio.has_interval and ratio.spread > BUSY_SPREAD:
            reasons.append((f"the denoising ratio varied {ratio.spread:.1f}x between rounds",
                            f"the denoising ratio itself varied {ratio.spread:.1f}x between rounds "
                            f"({ratio.plain_text()})"))
        return reasons

    @property
    def busy_headline(self) -> str | None:
        """One line: what was busy and what it means for the verdicts (None: nothing was)."""
        reasons = self._busy_reasons()
        if not reasons:
            return None
        return (f"machine busy ({'; '.join(short for short, _ in reasons)}): the speed verdicts are unreliable; "
                "rerun when it is quiet")

    @property
    def busy_warning(self) -> str | None:
        """Why the machine looks busy: other processes used the cores this request needed, an
        untouched phase differs between the sides, or any phase (the denoising loop included) has
        paired ratios spread over :data:`BUSY_SPREAD` between rounds (the same calls repeated
        should give the same ratio)."""
        reasons = [full for _, full in self._busy_reasons()]
        if not reasons:
            return None
        return (
            "the machine was busy during this request: " + "; ".join(reasons) + ". Repeated calls should give "
            "the same ratio and phases the method does not touch the same time, so this request's timing "
            "figures are unreliable; rerun when the machine is quiet."
        )

    def without_claim(self, reason: str) -> "TimingSummary":
        """The same figures with no speed verdict (``reason``: why, e.g. no method acted)."""
        def unclaimed(figures: PhaseFigures) -> PhaseFigures:
            return figures if figures.ratio is None else replace(figures, ratio=figures.ratio.without_claim(reason))

        return replace(self, denoising=unclaimed(self.denoising), end_to_end=unclaimed(self.end_to_end))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "denoising": self.denoising.to_dict(),
            "end_to_end": self.end_to_end.to_dict(),
            "untouched": [phase.to_dict() for phase in self.untouched],
            "changed": [phase.to_dict() for phase in self.changed],
            "seconds_per_step": {"baseline": self.seconds_per_step[0], "accelerated": self.seconds_per_step[1],
                                 "statistic": "median step" if self.steps_alike else "mean step of the loop"},
            "memory": [figures.to_dict() for figures in self.memory],
            "noise": None if self.noise is None else self.noise.to_dict(),
            "host_load": None if self.host_load is None else self.host_load.to_dict(),
            "busy_warning": self.busy_warning,
            "busy_headline": self.busy_headline,
            "calls": [call.to_dict() for call in self.calls],
        }


# ---- summarising the calls of one request --------------------------------------------------------


def _by_round(calls: Iterable[TimedCall]) -> list[tuple[TimedCall, TimedCall]]:
    """(baseline, accelerated) of every round that has both, in round order."""
    rounds: dict[int, dict[str, TimedCall]] = {}
    for call in calls:
        rounds.setdefault(call.round, {})[call.side] = call
    return [(sides[BASELINE], sides[ACCELERATED]) for _, sides in sorted(rounds.items()) if len(sides) == 2]


def _phase_pairs(pairs: Sequence[tuple[TimedCall, TimedCall]], phase: str) -> tuple[list[float], list[float]]:
    base, fast = [], []
    for b, a in pairs:
        tb, ta = b.timing.get(phase), a.timing.get(phase)
        if tb and ta:
            base.append(tb)
            fast.append(ta)
    return base, fast


def call_time(call: TimedCall, per_step: bool) -> float | None:
    """What a call is compared by: its denoising loop, or (``per_step``: rounds of different
    lengths) its mean step after the first, which carries the loop's one-off costs."""
    if not per_step:
        return call.timing.get(DENOISING)
    steps = [t for t in call.timing.steps_ms[1:] if t]
    return sum(steps) / len(steps) if steps else None


def _call_pairs(pairs: Sequence[tuple[TimedCall, TimedCall]], per_step: bool) -> tuple[list[float], list[float]]:
    base, fast = [], []
    for b, a in pairs:
        tb, ta = call_time(b, per_step), call_time(a, per_step)
        if tb and ta:
            base.append(tb)
            fast.append(ta)
    return base, fast


def aa_log_ratios(calls: Iterable[TimedCall], per_step: bool) -> list[float]:
    """A/A measurements of this request: log time ratios of consecutive calls of one side (the
    same work twice), both sides, in round order."""
    out = []
    for side in SIDES:
        times = [call_time(c, per_step) for c in sorted((c for c in calls if c.side == side), key=lambda c: c.round)]
        out += [math.log(a / b) for a, b in zip(times, times[1:]) if a and b]
    return out


def _median_or_none(values: Sequence[float]) -> float | None:
    return median(values) if values else None


def denoising_ratio(pairs: Sequence[tuple[TimedCall, TimedCall]], per_step: bool = False,
                    noise: NoiseThreshold | None = None) -> Ratio | None:
    """The rounds' paired ratio, judged against ``noise``'s threshold (the default without one)."""
    base, fast = _call_pairs(pairs, per_step)
    if not base:
        return None
    if noise is None:
        return paired_ratio(base, fast)
    return paired_ratio(base, fast, threshold=noise.threshold, threshold_source=noise.source)


def _noise_check(phase: str, ratio: Ratio | None, gpu_clock: bool, median_ms: float | None) -> tuple[str, str | None]:
    """What an untouched phase says about the machine: (the check in words, the busy reason or None).

    Differences and spreads are judged on a log scale (10 % slower and 10 % faster weigh alike).
    Without an interval only a GPU's single pair counts: one CPU call of a phase varies by tens of
    percent from call to call (fresh allocations page-fault). A phase of a few milliseconds on a
    CPU clock is at the scale of scheduler jitter and checks nothing.
    """
    if ratio is None:
        return "not measured in both sides", None
    if not gpu_clock and median_ms is not None and median_ms < MIN_CPU_CHECK_MS:
        return (f"too short to be a noise check on a CPU clock ({median_ms:.1f} ms per call; "
                f"under {MIN_CPU_CHECK_MS:.0f} ms is scheduler jitter)"), None
    if not ratio.has_interval and not gpu_clock:
        apart = math.exp(abs(math.log(ratio.value))) - 1
        if ratio.pairs == 1:
            return f"one call per side ({apart:.0%} apart): a single CPU pair is no noise check", None
        return (f"{ratio.pairs} calls per side (median {apart:.0%} apart): too few for an interval, so no noise "
                "check"), None
    label = PHASE_LABELS[phase]
    reason = None
    if ratio.has_interval and ratio.spread > BUSY_SPREAD:
        reason = f"{label} varied {ratio.spread:.1f}x between the rounds' two calls ({ratio.plain_text()})"
    else:
        off = abs(math.log(ratio.value))
        if ratio.has_interval:
            busy = ratio.excludes_one and off > math.log1p(BUSY_THRESHOLD)
        else:
            busy = off > math.log1p(BUSY_THRESHOLD_SINGLE)
        if busy:
            slower_side = BASELINE if ratio.value > 1.0 else ACCELERATED  # ratio = baseline time / accelerated time
            reason = f"{label} took {math.exp(off):.2f}x as long in the {slower_side} runs ({ratio.plain_text()})"
    if reason is not None:
        return f"BUSY MACHINE: {reason}", reason
    return f"noise check passed ({ratio.plain_text()})", None


def _untouched_phase(calls: Sequence[TimedCall], pairs: Sequence[tuple[TimedCall, TimedCall]],
                     phase: str) -> PhaseFigures:
    base, fast = _phase_pairs(pairs, phase)
    ratio = paired_ratio(base, fast) if base else None
    # Each side's median over all its calls (a decode is measured on one side only when the
    # baseline video came from the cache); the check uses the pairs.
    times = {side: [c.timing.get(phase) for c in calls if c.side == side and c.timing.get(phase)] for side in SIDES}
    check, busy = _noise_check(phase, ratio, calls[0].timing.clock == "cuda_event", _median_or_none(base + fast))
    return PhaseFigures(phase, _median_or_none(times[BASELINE]), _median_or_none(times[ACCELERATED]), ratio,
                        touched=False, busy=busy, check=check)


def _untouched_ms(calls: Iterable[TimedCall]) -> list[float]:
    """Time of everything but the denoising loop in each of this request's decoding calls."""
    return [
        c.timing.get(END_TO_END) - c.timing.get(DENOISING)
        for c in calls
        if c.decoded and c.timing.get(END_TO_END) and c.timing.get(DENOISING)
    ]


def _memory(calls: Sequence[TimedCall], decoded: bool, cached_baseline: MemoryReport | None) -> MemoryFigures | None:
    """Peaks of the decoding calls (``decoded``) or of the latent-only calls, per side."""
    chosen = [c for c in calls if c.decoded == decoded and c.memory.peak_bytes is not None]
    peaks = {side: tuple(c.memory.peak_bytes for c in chosen if c.side == side) for side in SIDES}
    from_cache = decoded and not peaks[BASELINE] and cached_baseline is not None and cached_baseline.peak_bytes is not None
    if from_cache:
        peaks[BASELINE] = (cached_baseline.peak_bytes,)
    if not peaks[BASELINE] or not peaks[ACCELERATED]:
        return None
    exact = chosen[0].memory.device.startswith("cuda")
    return MemoryFigures(
        scope="whole call" if decoded else "denoising",
        kind=CUDA_PEAK if exact else RSS_GROWTH,
        baseline_bytes=peaks[BASELINE],
        accelerated_bytes=peaks[ACCELERATED],
        baseline_from_cache=from_cache,
    )


def summarise(
    calls: Sequence[TimedCall],
    touched: Iterable[str] = (DENOISING,),
    steps_alike: bool = True,
    cached_baseline_memory: MemoryReport | None = None,
    per_step: bool = False,
    noise: NoiseThreshold | None = None,
    host_load: HostLoad | None = None,
) -> TimingSummary:
    """The figures of one request's calls (see the module docstring for the rules). ``per_step``:
    the rounds differ in length (short timing rounds) and are compared by their mean step after
    the first; ``noise``: the verdicts' noise threshold (the default without one)."""
    pairs = _by_round(calls)
    if not pairs:
        raise ValueError("no complete round: nothing to compare")
    touched = frozenset(touched)
    base_ms, fast_ms = _call_pairs(pairs, per_step)
    ratio = denoising_ratio(pairs, per_step, noise)
    denoising = PhaseFigures(DENOISING, _median_or_none(base_ms), _median_or_none(fast_ms), ratio, touched=True,
                             per_step=per_step)
    # The loops the end-to-end projection adds the untouched time to: full length (a short round's
    # mean step times the full call's steps).
    full_steps = max((len(c.timing.steps_ms) for c in calls if c.decoded), default=0)
    scale = full_steps if per_step else 1
    rest = _untouched_ms(calls)
    changed = [phase for phase in (TEXT_ENCODING, VAE_DECODE) if phase in touched]
    side_rest = {side: _median_or_none(_untouched_ms(c for c in calls if c.side == side)) for side in SIDES}
    if changed:
        # The method changes a phase outside the loop (a tiled decode, offloaded weights): each
        # side's own rest is added to its loop, measured once per side (its decoding call); no
        # verdict is drawn from one pair of calls.
        known = ratio is not None and denoising.accelerated_ms and scale and None not in side_rest.values()
        end_to_end = PhaseFigures(END_TO_END, denoising.baseline_ms * scale + side_rest[BASELINE] if known else None,
                                  denoising.accelerated_ms * scale + side_rest[ACCELERATED] if known else None,
                                  None, touched=True)
    elif ratio is not None and rest and denoising.accelerated_ms and scale:
        untouched_ms = sum(rest) / len(rest)
        base_loop, fast_loop = denoising.baseline_ms * scale, denoising.accelerated_ms * scale
        whole = diluted(ratio, fast_loop, untouched_ms, (min(rest), max(rest)))
        end_to_end = PhaseFigures(END_TO_END, base_loop + untouched_ms, fast_loop + untouched_ms, whole, touched=True)
    else:
        end_to_end = PhaseFigures(END_TO_END, None, None, None, touched=True)

    untouched = tuple(_untouched_phase(calls, pairs, phase) for phase in (TEXT_ENCODING, VAE_DECODE)
                      if phase not in touched)
    changed_phases = tuple(
        PhaseFigures(phase, *(_median_or_none([c.timing.get(phase) for c in calls if c.side == side and c.decoded
                                               and c.timing.get(phase)]) for side in SIDES), None, touched=True)
        for phase in changed)
    seconds_per_step = []
    for side_index in (0, 1):
        if steps_alike:
            steps = [t for pair in pairs for t in pair[side_index].timing.steps_ms if t]
            seconds_per_step.append(median(steps) / 1000 if steps else None)
            continue
        loops = [(pair[side_index].timing.phases_ms.get(DENOISING), len(pair[side_index].timing.steps_ms))
                 for pair in pairs]
        means = [ms / count / 1000 for ms, count in loops if ms and count]
        seconds_per_step.append(median(means) if means else None)
    return TimingSummary(
        rounds=len(pairs),
        denoising=denoising,
        end_to_end=end_to_end,
        untouched=untouched,
        changed=changed_phases,
        seconds_per_step=(seconds_per_step[0], seconds_per_step[1]),
        steps_alike=steps_alike,
        memory=tuple(m for m in (_memory(calls, True, cached_baseline_memory), _memory(calls, False, None)) if m),
        calls=tuple(calls),
        noise=noise,
        host_load=host_load,
    )


# ---- GPU time a request needs (ZeroGPU asks for it up front) ----------------------------------------

#: ZeroGPU refuses longer tasks; a request estimated above this is refused before it queues.
MAX_GPU_SECONDS = 1800
GPU_TIME_MARGIN = 1.25  # estimates are rough: ask for a quarter more, plus a fixed slack
GPU_TIME_SLACK_S = 10.0


@dataclass(frozen=True)
class GpuEstimate:
    """Seconds of GPU time one request needs, by part (from the preset's ``gpu_time`` figures,
    scaled from its default size to the requested one)."""

    load_s: float  # weights onto the GPU (a fresh ZeroGPU worker loads them again)
    warmup_s: float  # the pipeline warm-up (with a decode) and the per-request denoiser warm-ups
    denoising_s: float  # every round of both sides
    decode_s: float  # the videos: the baseline's once, one accelerated video per point
    text_s: float  # prompt encodings of every call
    margin_s: float
    calibration_s: float = 0.0  # untimed runs a method prepares with (MagCache), warm-up and timed step counts

    @property
    def total_s(self) -> float:
        return (self.load_s + self.warmup_s + self.denoising_s + self.decode_s + self.text_s + self.calibration_s
                + self.margin_s)

    @property
    def seconds(self) -> int:
        """What to ask ZeroGPU for: the total, at least 30 s, at most :data:`MAX_GPU_SECONDS`."""
        return int(min(max(math.ceil(self.total_s), 30), MAX_GPU_SECONDS))

    @property
    def fits(self) -> bool:
        return self.total_s <= MAX_GPU_SECONDS

    def parts(self) -> dict[str, float]:
        parts = {"load": self.load_s, "warm-ups": self.warmup_s, "denoising": self.denoising_s,
                 "decode": self.decode_s, "text encoding": self.text_s, "margin": self.margin_s}
        return parts | ({"calibration": self.calibration_s} if self.calibration_s else {})


def estimate_gpu_time(preset: ModelPreset, steps: int, frames: int, height: int, width: int, rounds: int,
                      points: int = 1, warmup_steps: int = 2, calibrates: bool = False,
                      timing_steps: int | None = None) -> GpuEstimate:
    """GPU seconds for ``points`` comparisons of one sweep (one baseline video, then one accelerated
    video per point), each following :func:`plan_calls` with ``rounds`` timing rounds
    (``timing_steps``: the later rounds' steps; None: full length). ``calibrates``: a method of the
    stack calibrates first (one untimed run at the warm-up's step count and one at the request's; a
    ZeroGPU worker forgets calibrations, so always counted)."""
    gpu = preset.gpu_time
    if gpu is None:
        raise ValueError(f"preset {preset.name!r} has no gpu_time figures")
    volume = frames * height * width / (preset.num_frames * preset.height * preset.width)
    # Attention grows with the square of the token count: above the defaults, scale quadratically.
    step_s = gpu.step_s * (volume**2 if volume > 1 else max(volume, 0.1))
    decode_s = gpu.decode_s * max(volume, 0.1)
    schedule = Schedule(())
    for point in range(points):  # the pipeline warms up and the baseline video is made once
        schedule += plan_calls(rounds, steps, timing_steps or steps, warmup_steps, warm_pipeline=point == 0,
                               decode_baseline=point == 0)
    warm_decodes = sum(call.decode for call in schedule.calls if call.kind == PIPELINE_WARMUP)
    warmup = min(warmup_steps, steps)
    parts = dict(
        load_s=gpu.load_s,
        warmup_s=schedule.warmup_steps * step_s + warm_decodes * decode_s,
        denoising_s=schedule.timed_steps * step_s,
        decode_s=(schedule.decodes - warm_decodes) * decode_s,
        text_s=(len(schedule.calls) + 2 * calibrates) * gpu.text_s,
        calibration_s=calibrates * (warmup + steps) * step_s,
    )
    margin = sum(parts.values()) * (GPU_TIME_MARGIN - 1) + GPU_TIME_SLACK_S
    return GpuEstimate(**parts, margin_s=margin)


__all__ = [
    "ACCELERATED",
    "BASELINE",
    "BUSY_THRESHOLD",
    "GpuEstimate",
    "MAX_GPU_SECONDS",
    "MIN_TIMING_STEPS",
    "MemoryFigures",
    "PhaseFigures",
    "PlannedCall",
    "Schedule",
    "TimedCall",
    "TimingSummary",
    "aa_log_ratios",
    "call_time",
    "denoising_ratio",
    "estimate_gpu_time",
    "plan_calls",
    "round_order",
    "summarise",
]
