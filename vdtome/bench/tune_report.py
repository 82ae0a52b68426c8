"""A tune's files for people: ``trials.csv`` (every trial that ran) and ``report.html`` (the Pareto
plot: every trial a faint dot, the feasible front, the finalists' validation figures with their
intervals as bars, the floor as a line, the chosen point marked; the finalists' table)."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vdtome.bench.report import _STYLE
from vdtome.bench.tune_plan import pareto
from vdtome.measure.environment import environment_line

if TYPE_CHECKING:
    from vdtome.bench.tune_plan import Finalist, Floor, TrialRecord, TuneOutcome, TunePlan

TRIALS_HEADER = ("trial", "stack", "speedup estimate", "PSNR mean (dB)", "PSNR min (dB)", "SSIM min", "judge kept",
                 "meets the floors", "stopped early", "seconds", "fields")


def write_trials_csv(records: Sequence[TrialRecord], plan: TunePlan, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TRIALS_HEADER)
        for r in records:
            fields = "; ".join(f"{name}: " + ", ".join(f"{k}={_typed(v)}" for k, v in values.items())
                               for name, values in r.stack)
            writer.writerow((r.number, r.label, f"{r.speedup:.4f}", f"{r.quality.psnr_mean:.3f}",
                             f"{min(r.quality.psnr):.3f}", f"{min(r.quality.ssim):.4f}", r.quality.kept_text(),
                             r.feasible, r.stopped_early, f"{r.seconds:.1f}", fields))
    return path


def _typed(value) -> str:
    """A field's value as ``--method`` takes it (a list joined by +)."""
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def pareto_png(records: Sequence[TrialRecord], floors: Sequence[Floor], shown: Sequence[Finalist] = (),
               chosen: Finalist | None = None) -> bytes:
    """The Pareto plot as PNG: PSNR and SSIM against the denoising speedup, every trial a faint
    dot, the feasible front, the finalists' validation figures with their intervals, the floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto(r for r in records if r.feasible)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "psnr", "PSNR to the baseline (dB)"), (axes[1], "ssim", "SSIM to the baseline"))
    for ax, measure, label in panels:
        def value(quality, worst: bool = False):
            values = quality.psnr if measure == "psnr" else quality.ssim
            return min(values) if worst else sum(values) / len(values)

        ax.scatter([r.speedup for r in records], [value(r.quality) for r in records], s=14, color="#99a",
                   alpha=0.45, label="trials (tuning prompts, one round)")
        ax.plot([r.speedup for r in front], [value(r.quality) for r in front], "-o", color="#1f6feb", ms=4,
                label="feasible front (tuning)")
        for finalist in shown:
            lows = [p.low if p.low is not None else p.speedup for p in finalist.prompts]
            highs = [p.high if p.high is not None else p.speedup for p in finalist.prompts]
            x = finalist.speedup
            y = value(finalist.quality, worst=True)
            colour = "#d9480f" if finalist is chosen else "#2b8a3e"
            ax.errorbar([x], [y], xerr=[[x - min(lows)], [max(highs) - x]], fmt="s", color=colour, ms=7, capsize=3,
                        label=("chosen" if finalist is chosen else "finalist")
                        + " (validation: median, interval range, worst prompt)")
        for floor in floors:
            if floor.measure == measure:
                ax.axhline(floor.value, color="#b00020", ls="--", lw=1, label=f"floor {floor.text()}")
        ax.axvline(1.0, color="#555", lw=0.8)
        ax.set_xlabel("denoising speedup (baseline time / accelerated)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_report(outcome: TuneOutcome, closest: Finalist | None, path: Path, plot_path: Path) -> Path:
    """``path``: the report (the plot inlined); ``plot_path``: the plot alone (the Tune tab shows it)."""
    e = html.escape
    plan = outcome.plan
    settings = plan.settings()
    shown = list(outcome.finalists) or ([closest] if closest is not None else [])
    plot = pareto_png(outcome.trials, plan.floors, shown, outcome.chosen)
    searched = ", ".join(plan.methods) if plan.methods else "every one the preset takes that buys speed"
    plot_path.write_bytes(plot)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>vdtome tune: {e(plan.preset)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Tune: {e(plan.preset)}</h1>",
        f"<p><b>{e(outcome.message)}</b></p>",
        "<p class='muted'>"
        f"{settings.frames} frames of {settings.height}x{settings.width}, {settings.steps} steps, guidance "
        f"{settings.guidance:g}, seed {plan.seed}. Floors: {e('; '.join(f.describe() for f in plan.floors))}. "
        f"Methods searched: {e(searched)}. "
        f"Prompt set {e(plan.prompt_set())}: tuning on {len(plan.tuning())}, validating on the next "
        f"{len(plan.validation())} (disjoint). {e(outcome.search_text())}.</p>",
        "<h2>How to read it</h2><ul>",
        "<li><b>Trials</b> (faint dots) ran on the tuning prompts with one timing round each: a baseline and an "
        "accelerated call back to back. Their speed is an estimate, good for ranking, not a figure to quote.</li>",
        "<li><b>Finalists</b> (squares) are trials of the feasible front, fastest first, run again with the full "
        "timing protocol (the preset's independent rounds) on prompts the study never saw, until one keeps every "
        "floor there (one under a floor is not run on its remaining prompts): their bars span the per-prompt "
        "intervals, the square sits at the median speedup and the worst prompt's quality.</li>",
        "<li>The <b>chosen</b> recipe is the fastest finalist whose quality on every validation prompt stays above "
        "the floor. Speedups are of the denoising loop; the text encoder and the decoder are untouched.</li></ul>",
        f"<img alt='Pareto plot' src='data:image/png;base64,{base64.b64encode(plot).decode()}'>",
    ]
    if shown:
        parts.append("<h2>Finalists on the validation prompts</h2><div class='scroll'><table><tr><th>trial</th>"
                     "<th>stack</th><th>prompt</th><th>speedup [interval]</th><th>verdict</th><th>end to end</th>"
                     "<th>PSNR (dB)</th><th>SSIM</th><th>judge</th></tr>")
        for finalist in shown:
            css = " class='front'" if finalist is outcome.chosen else ""
            label = finalist.trial.label + ("" if finalist.complete else
                                            f" (under a floor after {len(finalist.prompts)} of {finalist.of} prompts: "
                                            "not run on the rest)")
            for p in finalist.prompts:
                interval = f" [{p.low:.2f}, {p.high:.2f}]" if p.low is not None and p.high is not None else ""
                judge = "" if p.kept is None else \
                    f"{'kept' if p.kept else 'lost'} (baseline {'kept' if p.baseline_kept else 'lost'})"
                parts.append(f"<tr{css}><td>{finalist.trial.number}</td><td>{e(label)}</td>"
                             f"<td>{e(p.prompt)}</td><td class='num'>{p.speedup:.2f}x{interval}</td><td>{e(p.verdict)}"
                             f"{' (busy)' if p.busy else ''}</td><td class='num'>"
                             f"{'' if p.end_to_end is None else f'{p.end_to_end:.2f}x'}</td>"
                             f"<td class='num'>{p.psnr:.1f}</td><td class='num'>{p.ssim:.3f}</td>"
                             f"<td>{e(judge)}</td></tr>")
        parts.append("</table></div>")
    parts.append(f"<details><summary>Every trial ({len(outcome.trials)})</summary><div class='scroll'><table><tr>"
                 + "".join(f"<th>{e(h)}</th>" for h in TRIALS_HEADER[:-1]) + "</tr>")
    for r in outcome.trials:
        cells = (r.number, r.label, f"{r.speedup:.2f}x", f"{r.quality.psnr_mean:.1f}", f"{min(r.quality.psnr):.1f}",
                 f"{min(r.quality.ssim):.3f}", r.quality.kept_text(), "yes" if r.feasible else "no",
                 "yes" if r.stopped_early else "", f"{r.seconds:.0f}")
        parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    parts.append("</table></div></details>")
    parts.append("<p class='muted'>The recipe: <code>recipe.json</code> (load it with <code>vdtome.apply(pipe, "
                 "\"recipe.json\")</code> or <code>python -m vdtome compare --recipe recipe.json</code>); every trial: "
                 f"<code>trials.csv</code>; the study itself: <code>study.db</code> (Optuna). "
                 f"Measured on {e(environment_line(outcome.environment) or 'unknown')}.</p></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
