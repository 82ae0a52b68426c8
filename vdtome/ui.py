"""The web app's logic that does not need Gradio: form values to configs, session history, sweeps.

``app.py`` stays a thin layer of widgets over these functions, so what a user can type is checked
here (and tested) with messages that name the rule that was broken.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .compare import ComparisonRequest, ComparisonResult, RequestError, resolve, shown, whole_number
from .metrics import PSNR_CAP_DB
from .presets import ModelPreset, get_preset
from .protocol import GpuEstimate, estimate_gpu_time
from .report import environment_line, metric_rows, protocol_line
from .stats import Ratio
from .tome import ToMeConfig

RATIO_STEP = 0.05
MAX_SWEEP_POINTS = 8
MAX_REUSE_STEPS = 10
MAX_STRIDE = 4

# The chart's y axis: baseline time / accelerated time (a ratio axis; the table says "x slower").
PLOT_SPEEDUP = "end-to-end speedup (below 1 = slower)"

# Labels of the merge-target checkboxes and the config field each one sets.
TARGETS = {
    "self-attention": "merge_self_attn",
    "cross-attention queries": "merge_cross_attn",
    "feed-forward": "merge_ffn",
}
BLOCK_CHOICES = {"all blocks": "all", "every other block": "every_other"}

HISTORY_COLUMNS = (
    "run",
    "model",
    "ratio",
    "effective",
    "stride",
    "strategy",
    "blocks",
    "end-to-end",
    "denoising",
    "PSNR dB",
    "SSIM",
    "peak memory change",
    "baseline video",
)


def stride_ratio_cap(stride: tuple[int, int, int]) -> float:
    """Largest ratio a stride allows, rounded down to the slider step: 1 - 1 / (st * sy * sx).

    Only non-destination tokens can merge; one token per cell is the destination.
    """
    cells = math.prod(stride)
    # Rounded to the step's digits: 19 * 0.05 is 0.9500000000000001, not what anyone would type.
    return round(math.floor((1.0 - 1.0 / cells) / RATIO_STEP + 1e-9) * RATIO_STEP, 2)


def tome_config(
    ratio: float,
    stride: tuple[Any, Any, Any],
    strategy: str = "bipartite",
    blocks: str = "all blocks",
    targets: list[str] | tuple[str, ...] = ("self-attention",),
    reuse_steps: Any = 1,
    matching: str = "shared",
    random_destinations: bool = True,
    local_window: bool = True,
) -> ToMeConfig:
    """A :class:`ToMeConfig` from the app's controls; bad values raise :class:`RequestError`
    naming the field. Values arrive as clients sent them: nothing is coerced ("false" is not a
    boolean, 1.5 is not a stride)."""
    st, sy, sx = (whole_number(f"stride {axis}", v, 1, MAX_STRIDE, f"stride_{axis}")
                  for axis, v in zip(("t", "y", "x"), stride))
    cap = stride_ratio_cap((st, sy, sx))
    if cap <= 0:
        raise RequestError(f"stride ({st}, {sy}, {sx}) makes every token a destination: nothing can merge", "stride_x")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise RequestError(f"merge ratio must be a number, got {shown(ratio)}", "ratio")
    if not 0.0 <= ratio <= cap + 1e-9:
        raise RequestError(
            f"merge ratio must be between 0 and {cap:.2f} for stride ({st}, {sy}, {sx}) "
            f"(one token in every {st * sy * sx} is a destination and cannot merge), got {ratio:g}", "ratio"
        )
    strategy = choice("strategy", strategy, ("bipartite", "attnbin"), "strategy")
    blocks = choice("blocks", blocks, tuple(BLOCK_CHOICES), "blocks")
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise RequestError(f"merge targets must be a list of names such as [\"self-attention\"], got {shown(targets)}",
                           "targets")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise RequestError(f"unknown merge target {unknown[0]!r}; choose from {', '.join(TARGETS)}", "targets")
    if not targets:
        raise RequestError("choose at least one merge target (self-attention, cross-attention queries, feed-forward)",
                           "targets")
    matching = choice("matching", matching, ("shared", "per_sample"), "matching")
    return ToMeConfig(
        ratio=float(ratio),
        stride=(st, sy, sx),
        strategy=strategy,
        blocks=BLOCK_CHOICES[blocks],
        reuse_steps=whole_number("matching reuse (steps)", reuse_steps, 1, MAX_REUSE_STEPS, "reuse_steps"),
        matching=matching,
        random_destinations=boolean("random destinations", random_destinations, "random_destinations"),
        match_window="auto" if boolean("local matching window", local_window, "local_window") else None,
        **{field: label in targets for label, field in TARGETS.items()},
    )


def choice(name: str, value: Any, options: tuple[str, ...], field: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise RequestError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {shown(value)}", field)
    return value


def boolean(name: str, value: Any, field: str) -> bool:
    """Only true and false: the string "false" is not a boolean (it would read as true)."""
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {shown(value)}", field)
    return value


# A ratio as a person types it: 0.25, .5, 1 (no exponents, underscores, other digit sets or nan).
PLAIN_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def parse_ratios(text: Any, cap: float) -> tuple[float, ...]:
    """Sweep ratios from "0, 0.25, 0.5" (commas, semicolons or spaces), sorted; a ratio listed twice
    is refused rather than silently run once."""
    if not isinstance(text, str):
        raise RequestError(f"sweep ratios must be text such as \"0, 0.25, 0.5\", got {shown(text)}", "ratios")
    parts = [p for p in re.split(r"[,\s;]+", text.strip()) if p]
    if not parts:
        raise RequestError("sweep ratios are empty: list ratios such as 0, 0.25, 0.5", "ratios")
    ratios: dict[float, str] = {}
    for part in parts:
        if not PLAIN_DECIMAL.fullmatch(part):
            raise RequestError(f"sweep ratio {part[:40]!r} is not a number written like 0.25", "ratios")
        value = round(float(part), 4) + 0.0  # -0 is 0
        if not 0.0 <= value <= cap + 1e-9:
            raise RequestError(f"sweep ratio {part} is outside [0, {cap:.2f}] (the cap of the chosen stride)", "ratios")
        if value in ratios:
            also = "" if ratios[value] == part else f" (also as {ratios[value]})"
            raise RequestError(f"sweep ratio {part} is listed twice{also}", "ratios")
        ratios[value] = part
    if len(ratios) > MAX_SWEEP_POINTS:
        raise RequestError(f"a sweep takes at most {MAX_SWEEP_POINTS} ratios, got {len(ratios)}", "ratios")
    return tuple(sorted(ratios))


def preset_choice_label(preset: ModelPreset, has_gpu: bool) -> str:
    if preset.requires_gpu and not has_gpu:
        return f"{preset.label} (unavailable: needs a GPU)"
    return preset.label


def preset_info(preset: ModelPreset, has_gpu: bool) -> str:
    """Markdown shown under the model picker: hardware note and the model's input rules."""
    lines = [f"**{preset.label}**", f"Hardware: {preset.hardware}", f"Inputs: {preset.constraints.describe()}.",
             f"Timing rounds by default: {preset.timing_rounds}."]
    if preset.requires_gpu and not has_gpu:
        lines.insert(1, "**Unavailable here: this machine has no GPU.**")
    if not preset.is_builtin:
        lines.append(f"Weights: `{preset.hub_id}` (loaded from the local Hugging Face cache or the hub).")
    return "\n\n".join(lines)


@dataclass(frozen=True)
class HistoryEntry:
    """One finished comparison, as the session's history table and plot show it."""

    run: int
    model: str
    ratio: float
    effective: float | None
    stride: str
    strategy: str
    blocks: str
    end_to_end: Ratio | None
    denoising: Ratio | None
    psnr_db: float | None
    ssim: float | None
    memory_change: str
    baseline_cached: bool

    def row(self) -> list[Any]:
        def rounded(value: float | None, digits: int) -> Any:
            return None if value is None else round(value, digits)

        return [
            self.run,
            self.model,
            self.ratio,
            rounded(self.effective, 3),
            self.stride,
            self.strategy,
            self.blocks,
            "n/a" if self.end_to_end is None else self.end_to_end.short(),
            "n/a" if self.denoising is None else self.denoising.short(),
            rounded(self.psnr_db, 2),
            rounded(self.ssim, 4),
            self.memory_change,
            "from cache" if self.baseline_cached else "made",
        ]

    def point(self) -> dict[str, Any] | None:
        """The run on the speedup / fidelity chart (None without both figures)."""
        if self.end_to_end is None or self.psnr_db is None:
            return None
        ratio = self.end_to_end
        return {
            "run": self.run,
            "PSNR vs baseline (dB)": self.psnr_db,
            PLOT_SPEEDUP: round(ratio.value, 4),
            "interval": "n/a" if not ratio.has_interval else f"{ratio.low:.2f}-{ratio.high:.2f}",
            "verdict": ratio.verdict.value,
            "merge ratio": self.ratio,
            "settings": f"{self.model} · {self.strategy} · stride {self.stride}",
        }


def _memory_change(result: ComparisonResult) -> str:
    if result.timing is None or not result.timing.memory:
        return "n/a"
    figures = result.timing.memory[0]  # the whole call: what a user's GPU must hold
    change = figures.change_bytes
    if change is None:
        return "n/a"
    if not figures.comparable:
        return "not comparable (cached baseline)"
    return "within noise" if figures.within_noise else f"{change / 2**20:+.1f} MiB"


def history_entry(result: ComparisonResult, run: int) -> HistoryEntry:
    config = result.acceleration
    report = result.method_report
    fid = result.fidelity
    # Identical videos have infinite PSNR: the table shows them at the cap (its cells must be JSON);
    # the speedup/fidelity chart leaves them out.
    psnr = None if fid is None else min(fid.psnr_mean, PSNR_CAP_DB)
    return HistoryEntry(
        run=run,
        model=result.settings.preset,
        ratio=float(config.get("ratio", 0.0)),
        effective=report.get("effective_ratio"),
        stride="x".join(str(s) for s in config.get("stride", ())),
        strategy=str(config.get("strategy", "")),
        blocks=str(config.get("blocks", "")),
        end_to_end=result.speedup("end_to_end"),
        denoising=result.speedup("denoising"),
        psnr_db=psnr,
        ssim=None if fid is None else fid.ssim_mean,
        memory_change=_memory_change(result),
        baseline_cached=result.baseline_reused,
    )


@dataclass(frozen=True)
class ComparisonView:
    """What the page shows of one comparison: small and picklable (no frames), so it can cross
    the process boundary of a ZeroGPU worker."""

    files: dict[str, str]
    rows: list[tuple[str, str, str, str, str]]
    environment: str
    notes: tuple[str, ...]
    warnings: tuple[str, ...]
    error: str | None
    entry: HistoryEntry | None  # None when the comparison failed


# Below this many video tokens per block, attention is a small share of a forward and the cost of
# matching can outweigh what merging saves (see benchmarks/tome_speed.py for where it pays off).
FEW_TOKENS = 1024


def comparison_view(result: ComparisonResult) -> ComparisonView:
    notes = list(result.notes)
    protocol = protocol_line(result)
    if protocol:
        notes.insert(0, protocol)
    sites = result.method_report.get("tokens_per_block") or []
    tokens = max((site["tokens_in"] for site in sites), default=0)
    if 0 < tokens < FEW_TOKENS:
        notes.append(
            f"only {tokens} video tokens per block: attention is a small part of this model's work, so merging "
            "can cost more than it saves; speedups show on real models at real sizes (thousands of tokens)"
        )
    return ComparisonView(
        files=dict(result.files),
        rows=metric_rows(result),
        environment=environment_line(result),
        notes=tuple(notes),
        warnings=result.warnings,
        error=result.error,
        entry=history_entry(result, run=0) if result.ok else None,
    )


def gpu_estimate(requests: list[ComparisonRequest]) -> GpuEstimate:
    """GPU time for a list of requests that share a baseline (one comparison or one sweep);
    validates the first request (a :class:`RequestError` names the broken rule)."""
    preset = get_preset(requests[0].preset)
    settings, _ = resolve(requests[0], preset)
    return estimate_gpu_time(preset, settings.steps, settings.frames, settings.height, settings.width,
                             settings.rounds, points=len(requests), warmup_steps=settings.warmup_steps)
