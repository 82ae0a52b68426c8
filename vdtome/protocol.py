"""The timing protocol: which calls a comparison makes, in what order, and what may be concluded.

One request makes these calls on one loaded pipeline, in one process, on one device:

1. **Warm-ups, untimed.** Once per loaded pipeline and video size, a short full call (text
   encoder and VAE decoder included). Then, in every request, a short denoiser-only call
   (``output_type="latent"``) of the baseline and one of the accelerated pipeline.
2. **Rounds.** Each round is one baseline and one accelerated call made back to back; the order
   alternates from round to round (baseline first in odd rounds) so neither side always runs
   second. Round 1 holds the calls that decode the videos (the baseline's only when its video is
   not cached); later rounds stop at the latents. A cached baseline gives its video and fidelity
   only: its timing is always measured again in this request's rounds.
3. **Figures.** The denoising speedup is the median of paired ratios with a distribution-free
   interval (:mod:`vdtome.stats`): a pair is a round when there are at least
   :data:`~vdtome.stats.MIN_PAIRS` rounds; with fewer rounds, and a method whose steps all cost
   alike, a pair is one denoising step of the two calls of a round (the steps are the repeats).
   End-to-end is projected (Amdahl): the denoising times plus the untouched time (text encoding,
   decode, set-up) measured in this request's decoding calls, the same on both sides; its interval
   spans the denoising interval and the range of the untouched times measured. Phases the method
   does not touch are shown as unchanged and double as a noise check: when they differ between
   the sides by more than :data:`BUSY_THRESHOLD`, or their paired ratios (or the denoising
   loop's) spread over more than :data:`BUSY_SPREAD`, the machine was busy and the result says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .measure import DENOISING, END_TO_END, TEXT_ENCODING, VAE_DECODE, MemoryReport, TimingReport
from .presets import ModelPreset
from .stats import MIN_PAIRS, Ratio, diluted, median, paired_ratio

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
    the two sides agree within the expected noise, or the phase cannot tell).
    """

    phase: str
    baseline_ms: float | None
    accelerated_ms: float | None
    ratio: Ratio | None
    touched: bool
    busy: str | None = None
    check: str = ""

    @property
    def label(self) -> str:
        return PHASE_LABELS.get(self.phase, self.phase)

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
        }


@dataclass(frozen=True)
class MemoryFigures:
    """Peak memory of one kind of call in both sides, and whether the difference means anything.

    ``scope``: ``"whole call"`` (the calls that decoded the videos) or ``"denoising"`` (the calls
    that stopped at the latents). ``kind``: ``"peak CUDA allocated"`` (exact: any change is real)
    or ``"peak RSS growth"`` (a process figure that depends on what the allocator kept from earlier
    calls: a change no larger than the spread of repeated calls of one side is noise).
    ``baseline_from_cache``: the baseline figure comes from the cached run that made its video.
    """

    scope: str
    kind: str
    baseline_bytes: tuple[int, ...]
    accelerated_bytes: tuple[int, ...]
    baseline_from_cache: bool = False

    @property
    def exact(self) -> bool:
        return self.kind == "peak CUDA allocated"

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
    def within_noise(self) -> bool:
        """A comparable change this measurement cannot tell from no change."""
        if self.change_bytes is None or not self.comparable or self.exact:
            return False
        return self.noise_bytes is None or abs(self.change_bytes) <= self.noise_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "kind": self.kind,
            "baseline_bytes": list(self.baseline_bytes),
            "accelerated_bytes": list(self.accelerated_bytes),
            "change_bytes": self.change_bytes,
            "noise_bytes": self.noise_bytes,
            "within_noise": self.within_noise,
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

    @property
    def busy_warning(self) -> str | None:
        """Why the machine looks busy: an untouched phase that differs between the sides, or any
        phase (the denoising loop included) whose paired ratios spread over :data:`BUSY_SPREAD`
        between rounds (the same calls repeated should give the same ratio)."""
        reasons = [phase.busy for phase in self.untouched if phase.busy]
        ratio = self.denoising.ratio
        if ratio is not None and ratio.unit == "rounds" and ratio.has_interval and ratio.spread > BUSY_SPREAD:
            reasons.append(f"the denoising ratio itself varied {ratio.spread:.1f}x between rounds "
                           f"({ratio.plain_text()})")
        if not reasons:
            return None
        return (
            "the machine was busy during this request: " + "; ".join(reasons) + ". Repeated calls should give "
            "the same ratio and phases the method does not touch the same time, so the figures above are "
            "unreliable; rerun when the machine is quiet."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "denoising": self.denoising.to_dict(),
            "end_to_end": self.end_to_end.to_dict(),
            "untouched": [phase.to_dict() for phase in self.untouched],
            "seconds_per_step": {"baseline": self.seconds_per_step[0], "accelerated": self.seconds_per_step[1],
                                 "statistic": "median step" if self.steps_alike else "mean step of the loop"},
            "memory": [figures.to_dict() for figures in self.memory],
            "busy_warning": self.busy_warning,
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


def _step_pairs(pairs: Sequence[tuple[TimedCall, TimedCall]]) -> tuple[list[float], list[float]]:
    """Step i of a round's baseline call with step i of its accelerated call, from step 1 on:
    step 0 also carries the loop's one-off costs, so it is not like the others."""
    base, fast = [], []
    for b, a in pairs:
        for tb, ta in zip(b.timing.steps_ms[1:], a.timing.steps_ms[1:]):
            if tb and ta:
                base.append(tb)
                fast.append(ta)
    return base, fast


def _median_or_none(values: Sequence[float]) -> float | None:
    return median(values) if values else None


def denoising_ratio(pairs: Sequence[tuple[TimedCall, TimedCall]], steps_alike: bool) -> Ratio | None:
    """Rounds as the repeats when there are enough; else the steps, when they all cost alike."""
    base, fast = _phase_pairs(pairs, DENOISING)
    if not base:
        return None
    if len(base) < MIN_PAIRS and steps_alike:
        step_base, step_fast = _step_pairs(pairs)
        if len(step_base) >= MIN_PAIRS:
            return paired_ratio(step_base, step_fast, unit="steps")
    return paired_ratio(base, fast, unit="rounds")


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
        return f"one call per side ({apart:.0%} apart): a single CPU pair is no noise check", None
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
        kind="peak CUDA allocated" if exact else "peak RSS growth",
        baseline_bytes=peaks[BASELINE],
        accelerated_bytes=peaks[ACCELERATED],
        baseline_from_cache=from_cache,
    )


def summarise(
    calls: Sequence[TimedCall],
    touched: Iterable[str] = (DENOISING,),
    steps_alike: bool = True,
    cached_baseline_memory: MemoryReport | None = None,
) -> TimingSummary:
    """The figures of one request's calls (see the module docstring for the rules)."""
    pairs = _by_round(calls)
    if not pairs:
        raise ValueError("no complete round: nothing to compare")
    touched = frozenset(touched)
    base_ms, fast_ms = _phase_pairs(pairs, DENOISING)
    ratio = denoising_ratio(pairs, steps_alike)
    denoising = PhaseFigures(DENOISING, _median_or_none(base_ms), _median_or_none(fast_ms), ratio, touched=True)

    rest = _untouched_ms(calls)
    if ratio is not None and rest and denoising.accelerated_ms:
        untouched_ms = sum(rest) / len(rest)
        whole = diluted(ratio, denoising.accelerated_ms, untouched_ms, (min(rest), max(rest)))
        end_to_end = PhaseFigures(
            END_TO_END, denoising.baseline_ms + untouched_ms, denoising.accelerated_ms + untouched_ms, whole, touched=True
        )
    else:
        end_to_end = PhaseFigures(END_TO_END, None, None, None, touched=True)

    untouched = tuple(_untouched_phase(calls, pairs, phase) for phase in (TEXT_ENCODING, VAE_DECODE)
                      if phase not in touched)
    per_step = []
    for side_index in (0, 1):
        if steps_alike:
            steps = [t for pair in pairs for t in pair[side_index].timing.steps_ms if t]
            per_step.append(median(steps) / 1000 if steps else None)
            continue
        loops = [(pair[side_index].timing.phases_ms.get(DENOISING), len(pair[side_index].timing.steps_ms))
                 for pair in pairs]
        means = [ms / count / 1000 for ms, count in loops if ms and count]
        per_step.append(median(means) if means else None)
    return TimingSummary(
        rounds=len(pairs),
        denoising=denoising,
        end_to_end=end_to_end,
        untouched=untouched,
        seconds_per_step=(per_step[0], per_step[1]),
        steps_alike=steps_alike,
        memory=tuple(m for m in (_memory(calls, True, cached_baseline_memory), _memory(calls, False, None)) if m),
        calls=tuple(calls),
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
                      points: int = 1, warmup_steps: int = 2, calibrates: bool = False) -> GpuEstimate:
    """GPU seconds for ``points`` comparisons of one sweep (one baseline video, then one accelerated
    video per point), each with ``rounds`` timing rounds, following the protocol's plan.
    ``calibrates``: a method of the stack calibrates first (one untimed run at the warm-up's step
    count and one at the request's; a ZeroGPU worker forgets calibrations, so always counted)."""
    gpu = preset.gpu_time
    if gpu is None:
        raise ValueError(f"preset {preset.name!r} has no gpu_time figures")
    volume = frames * height * width / (preset.num_frames * preset.height * preset.width)
    # Attention grows with the square of the token count: above the defaults, scale quadratically.
    step_s = gpu.step_s * (volume**2 if volume > 1 else max(volume, 0.1))
    decode_s = gpu.decode_s * max(volume, 0.1)
    warmup = min(warmup_steps, steps)
    calls = points * (2 + 2 * rounds) + 1  # warm-ups and timed calls, plus the pipeline warm-up
    parts = dict(
        load_s=gpu.load_s,
        warmup_s=(warmup + points * 2 * warmup) * step_s + decode_s,
        denoising_s=points * rounds * 2 * steps * step_s,
        decode_s=(1 + points) * decode_s,
        text_s=(calls + 2 * calibrates) * gpu.text_s,
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
    "MemoryFigures",
    "PhaseFigures",
    "TimedCall",
    "TimingSummary",
    "denoising_ratio",
    "estimate_gpu_time",
    "round_order",
    "summarise",
]
