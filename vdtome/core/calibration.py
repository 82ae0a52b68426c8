"""What a per-layer search measures: relative errors of candidate outputs against the dense one."""

from __future__ import annotations

from collections import defaultdict

import torch


class ErrorTally:
    """Per candidate: the mean and the largest relative error (L2 of the difference over L2 of the
    reference, in float32) over the calls measured. The search chooses by the mean: the largest
    comes from the first, pure-noise steps, where every candidate errs most and matters least."""

    def __init__(self) -> None:
        self.sums: dict = defaultdict(float)
        self.counts: dict = defaultdict(int)
        self.maxima: dict = defaultdict(float)

    def add(self, candidate, output: torch.Tensor, reference: torch.Tensor) -> None:
        reference = reference.float()
        error = float((output.float() - reference).norm()) / (float(reference.norm()) or 1.0)
        self.sums[candidate] += error
        self.counts[candidate] += 1
        self.maxima[candidate] = max(self.maxima[candidate], error)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def mean(self, candidate) -> float:
        return self.sums[candidate] / self.counts[candidate]

    def within(self, threshold: float) -> list:
        """The candidates whose mean error is at most ``threshold``, in their order."""
        return [candidate for candidate in sorted(self.counts) if self.mean(candidate) <= threshold]

    def figures(self, name=str) -> dict[str, dict[str, float]]:
        """JSON-safe: each candidate's mean and largest error, keyed by ``name(candidate)``."""
        return {name(c): {"mean": round(self.mean(c), 6), "max": round(self.maxima[c], 6)} for c in sorted(self.counts)}
