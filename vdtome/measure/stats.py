"""Paired timing statistics: is the accelerated run faster than the baseline, and by how much?

Pure arithmetic (no torch, no diffusers), so the rules can be read and tested on their own.

* A **ratio** is baseline time / accelerated time, taken from runs made back to back in one
  request (a *pair*): > 1 means faster. The estimate is the median of the pairs' ratios.
* Its **interval** is the distribution-free confidence interval of that median: the order
  statistics ``[x_(k), x_(n+1-k)]`` cover the true median with probability
  ``1 - 2 P(Binomial(n, 1/2) <= k - 1)`` whatever the noise distribution, so no normality is
  assumed and one wild pair (a busy machine) cannot drag it. With 95 % it needs at least 6 pairs
  (then it is the range of the 6 ratios); with fewer the ratio is reported without a verdict.
* A **verdict** says "faster" or "slower" only when the interval excludes 1 *and* the estimate
  is further from 1 than a noise threshold (as criterion.rs and asv have): a consistent but small
  change is reported as within the noise threshold, not as a speedup. The threshold is measured
  (:func:`aa_threshold`: how far the median of that many A/A pairs strays from 1 on this host),
  :data:`NOISE_THRESHOLD` only until enough A/A pairs exist.
* A ratio whose method did nothing (no evidence that it acted) makes no claim at all
  (:meth:`Ratio.without_claim`): what it measured is the noise of two identical computations.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")
CONFIDENCE = 0.95
#: The noise threshold until this host has measured its own (:func:`aa_threshold`): an A/A
#: comparison (ratio 0) of the 2-core CPU tiny models gave medians from 0.95 to 1.04.
NOISE_THRESHOLD = 0.05
#: A measured threshold is never below this: a change under 1 % is never claimed.
MIN_NOISE_THRESHOLD = 0.01
#: A/A pairs needed before the threshold is measured rather than :data:`NOISE_THRESHOLD`.
MIN_AA_PAIRS = 12
#: Pairs needed before an interval at :data:`CONFIDENCE` exists (the range of 6 covers 96.9 %).
MIN_PAIRS = 6


class Verdict(str, Enum):
    FASTER = "faster"
    SLOWER = "slower"
    NO_DIFFERENCE = "no significant difference"
    TOO_FEW_REPEATS = "not tested"  # fewer than MIN_PAIRS independent pairs: no interval, no claim
    DID_NOTHING = "did nothing"  # no method acted: the two sides computed the same thing

    @property
    def tested(self) -> bool:
        """A verdict backed by an interval (faster, slower or no significant difference)."""
        return self in (Verdict.FASTER, Verdict.SLOWER, Verdict.NO_DIFFERENCE)

    @property
    def claims_change(self) -> bool:
        return self in (Verdict.FASTER, Verdict.SLOWER)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of no values")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _binomial_cdf_half(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float] | None:
    """The narrowest order-statistic interval for the median with coverage >= ``confidence``.

    Returns ``(low, high, coverage)``, or None when ``values`` are too few for that confidence.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ordered = sorted(values)
    n = len(ordered)
    best = None
    for k in range(1, n // 2 + 1):  # k-th smallest to k-th largest
        coverage = 1.0 - 2.0 * _binomial_cdf_half(k - 1, n)
        if coverage < confidence:
            break
        best = (ordered[k - 1], ordered[n - k], coverage)
    return best


def pareto_front(points: Iterable[T], speed: Callable[[T], float], quality: Callable[[T], float]) -> list[T]:
    """The points faster than the baseline (speed above 1) that no other such point beats on both
    ``speed`` and ``quality``, fastest first: the settings worth choosing between."""
    faster = [p for p in points if speed(p) > 1.0]
    front = [p for p in faster if not any(
        speed(o) >= speed(p) and quality(o) >= quality(p) and (speed(o) > speed(p) or quality(o) > quality(p))
        for o in faster)]
    return sorted(front, key=lambda p: -speed(p))


def speed_phrase(ratio: float) -> str:
    """``1.84x faster`` / ``1.41x slower``: a slowdown is never written as a speedup below 1."""
    if round(ratio, 2) == 1.0 and round(1.0 / ratio, 2) == 1.0:
        return "1.00x"
    if ratio >= 1.0:
        return f"{ratio:.2f}x faster"
    return f"{1.0 / ratio:.2f}x slower"


def range_phrase(low: float, high: float) -> str:
    """An interval of ratios in words: ``1.71-1.95x faster``, ``1.45-1.79x slower`` or
    ``1.28x slower to 1.06x faster``."""
    if low >= 1.0:
        return f"{low:.2f}-{high:.2f}x faster"
    if high <= 1.0:
        return f"{1.0 / high:.2f}-{1.0 / low:.2f}x slower"
    return f"{speed_phrase(low)} to {speed_phrase(high)}"


@dataclass(frozen=True)
class Ratio:
    """Baseline time / accelerated time over paired measurements (> 1: the accelerated run is faster).

    ``low`` / ``high``: the interval of the median ratio at ``coverage`` (None with too few pairs);
    ``pairs``: how many paired measurements; ``unit``: what a pair is (``"rounds"``: one baseline and
    one accelerated call made back to back, each an independent repeat). ``threshold``: the noise
    threshold the verdict used and ``threshold_source`` where it came from (measured A/A pairs on
    this host, or the default). ``no_claim``: why no speed is claimed although it was measured
    (the method did nothing), else None.
    """

    value: float
    low: float | None
    high: float | None
    coverage: float | None
    pairs: int
    unit: str
    verdict: Verdict
    threshold: float = NOISE_THRESHOLD
    threshold_source: str = "default"
    no_claim: str | None = None

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def excludes_one(self) -> bool:
        """The interval lies wholly on one side of "no change"."""
        return self.has_interval and (self.low > 1.0 or self.high < 1.0)

    @property
    def spread(self) -> float | None:
        """How many times wider the interval's top is than its bottom (None without an interval)."""
        return self.high / self.low if self.has_interval else None

    def _pairs_text(self) -> str:
        return f"{self.pairs} {self.unit[:-1] if self.pairs == 1 else self.unit}"

    def interval_text(self) -> str:
        if not self.has_interval:
            return f"{self._pairs_text()}: no interval ({MIN_PAIRS} or more give one)"
        return f"{math.floor(self.coverage * 100)}% interval {range_phrase(self.low, self.high)}; {self._pairs_text()}"

    def threshold_text(self) -> str:
        return f"{self.threshold:.0%} noise threshold ({self.threshold_source})"

    def _threshold_name(self) -> str:
        return f"{self.threshold:.0%} noise threshold"

    def plain_text(self) -> str:
        """The numbers without speed words, for phases that are not meant to change."""
        if not self.has_interval:
            return f"ratio {self.value:.2f}; {self.interval_text()}"
        return (f"ratio {self.value:.2f}, {math.floor(self.coverage * 100)}% interval {self.low:.2f}-{self.high:.2f}; "
                f"{self._pairs_text()}")

    def text(self) -> str:
        """What the page prints: the verdict first, the number and its interval after."""
        if self.verdict is Verdict.DID_NOTHING:
            return f"no speed claim: {self.no_claim} (measured {self.plain_text()}, the noise of identical work)"
        if self.verdict is Verdict.NO_DIFFERENCE and self.excludes_one:
            return (f"within the {self._threshold_name()} ({self.threshold_source}; median {speed_phrase(self.value)}; "
                    f"{self.interval_text()})")
        if self.verdict is Verdict.NO_DIFFERENCE:
            return f"no significant difference (median {speed_phrase(self.value)}; {self.interval_text()})"
        if self.verdict is Verdict.TOO_FEW_REPEATS:
            return (f"not tested: {self._pairs_text()}, too few for an interval ({MIN_PAIRS} or more give one); "
                    f"measured {speed_phrase(self.value)}, which may be noise between calls")
        return f"{speed_phrase(self.value)} ({self.interval_text()})"

    def short(self) -> str:
        """A table cell: the verdict in a few words."""
        if self.verdict is Verdict.NO_DIFFERENCE:
            return "within noise" if self.excludes_one else "no significant difference"
        if self.verdict is Verdict.TOO_FEW_REPEATS:
            return f"not tested ({self._pairs_text()})"
        if self.verdict is Verdict.DID_NOTHING:
            return "did nothing"
        return speed_phrase(self.value)

    def without_claim(self, reason: str) -> "Ratio":
        """The same measurement with no verdict: ``reason`` says why nothing is claimed."""
        return replace(self, verdict=Verdict.DID_NOTHING, no_claim=reason)

    def to_dict(self, verdict: bool = True) -> dict[str, Any]:
        """JSON-safe; ``verdict=False`` (a phase that is not meant to change) drops the verdict
        and words the numbers without speed words."""
        out = asdict(self)
        out["verdict"] = self.verdict.value if verdict else None
        out["text"] = self.text() if verdict else self.plain_text()
        if not verdict:  # no verdict, so no threshold to judge it by
            for key in ("threshold", "threshold_source", "no_claim"):
                del out[key]
        return out


def decide(value: float, interval: tuple[float, float, float] | None, threshold: float = NOISE_THRESHOLD) -> Verdict:
    if interval is None:
        return Verdict.TOO_FEW_REPEATS
    low, high, _ = interval
    if low > 1.0 and value > 1.0 + threshold:
        return Verdict.FASTER
    if high < 1.0 and value < 1.0 / (1.0 + threshold):
        return Verdict.SLOWER
    return Verdict.NO_DIFFERENCE


def paired_ratio(
    baseline: Sequence[float],
    accelerated: Sequence[float],
    unit: str = "rounds",
    confidence: float = CONFIDENCE,
    threshold: float = NOISE_THRESHOLD,
    threshold_source: str = "default",
) -> Ratio:
    """The ratio of paired times (``baseline[i]`` was measured next to ``accelerated[i]``; each
    pair an independent repeat: calls, never the steps of one call)."""
    if len(baseline) != len(accelerated):
        raise ValueError(f"unpaired times: {len(baseline)} baseline vs {len(accelerated)} accelerated")
    if not baseline:
        raise ValueError("no paired times")
    if any(not (t > 0 and math.isfinite(t)) for t in (*baseline, *accelerated)):
        raise ValueError("times must be positive and finite")
    ratios = [b / a for b, a in zip(baseline, accelerated)]
    value = median(ratios)
    interval = median_interval(ratios, confidence)
    low, high, coverage = interval if interval is not None else (None, None, None)
    return Ratio(value, low, high, coverage, len(ratios), unit, decide(value, interval, threshold), threshold,
                 threshold_source)


def diluted(ratio: Ratio, accelerated_part: float, untouched: float,
            untouched_range: tuple[float, float] | None = None) -> Ratio:
    """Amdahl: the speedup of a whole whose accelerated part (``accelerated_part`` long after
    acceleration) sped up by ``ratio`` while ``untouched`` stayed the same.

    The map is monotone in the speedup and in the untouched time, so the interval is the extreme
    corners of (ratio interval) x (``untouched_range``, the untouched times seen; default the one
    value): how far apart the measured untouched times were widens it. The verdict is decided
    again (with the ratio's own noise threshold), as a diluted change can fall below it.
    """
    low_u, high_u = untouched_range or (untouched, untouched)
    if accelerated_part <= 0 or min(untouched, low_u) < 0:
        raise ValueError("accelerated part must be positive and the untouched part non-negative")

    def whole(speedup: float, rest: float) -> float:
        return (speedup * accelerated_part + rest) / (accelerated_part + rest)

    value = whole(ratio.value, untouched)
    if not ratio.has_interval:
        return replace(ratio, value=value, verdict=decide(value, None, ratio.threshold))
    corners = [whole(s, u) for s in (ratio.low, ratio.high) for u in (low_u, high_u)]
    low, high = min(corners), max(corners)
    return replace(ratio, value=value, low=low, high=high,
                   verdict=decide(value, (low, high, ratio.coverage), ratio.threshold))


def aa_threshold(log_ratios: Sequence[float], pairs: int, confidence: float = CONFIDENCE,
                 draws: int = 4000, seed: int = 0) -> float | None:
    """The noise threshold for the median of ``pairs`` paired ratios, from A/A log ratios (two
    identical calls; here, consecutive calls of one side): the change that the median of
    ``pairs`` A/A ratios, drawn from those measured, exceeds with probability ``1 - confidence``
    (a seeded bootstrap, so the same measurements give the same threshold). None with fewer than
    :data:`MIN_AA_PAIRS` measurements; never below :data:`MIN_NOISE_THRESHOLD`."""
    values = [float(v) for v in log_ratios if math.isfinite(v)]
    if len(values) < MIN_AA_PAIRS:
        return None
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    rng = random.Random(seed)
    deviations = sorted(abs(median(rng.choices(values, k=pairs))) for _ in range(draws))
    quantile = deviations[min(len(deviations) - 1, math.ceil(confidence * len(deviations)) - 1)]
    return max(MIN_NOISE_THRESHOLD, math.expm1(quantile))
