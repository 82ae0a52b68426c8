"""A benchmark's plots (PNG, matplotlib) and its one-file HTML report (the plots inlined).

Plots: speedup and fidelity against each swept axis (one line per combination of the other
settings, bars spanning the rows), the speedup / fidelity Pareto front over all settings, the
per-prompt distributions of every setting, and speedup and fidelity against prompt length.
"""

from __future__ import annotations

import base64
import html
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vdtome.bench.runner import (
    ROW_HEADER,
    SUMMARY_HEADER,
    BenchPlan,
    BenchRow,
    SettingSummary,
    busy_sentence,
    row_cells,
    summary_cells,
)
from vdtome.bench.sweep import axis_label, field_label
from vdtome.engine.fidelity import PSNR_CAP_DB
from vdtome.measure.environment import environment_line
from vdtome.measure.stats import pareto_front as stats_pareto_front
from vdtome.methods import method_of

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
MAX_LINES = 12  # lines (or boxes) one plot draws before it says how many it left out


def pareto_front(summaries: Sequence[SettingSummary]) -> list[SettingSummary]:
    """Settings nothing beats on both denoising speedup and mean PSNR, fastest first. The baseline
    itself (1x, identical) takes part: a setting no faster than not accelerating is never a choice."""
    measured = [s for s in summaries if s.denoising_speedup is not None and s.psnr_mean_db is not None]
    return stats_pareto_front(measured, lambda s: s.denoising_speedup, lambda s: s.psnr_mean_db)


def write_plots(plan: BenchPlan, rows: Sequence[BenchRow], summaries: Sequence[SettingSummary],
                folder: Path) -> dict[str, Path]:
    """Every plot as PNG under ``folder``; returns {title: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}

    def save(fig, name: str, title: str) -> None:
        path = folder / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots[title] = path

    by_key = {s.setting_key: s for s in summaries}
    for axis in plan.sweep.axes:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        _axis_lines(plan, axis, by_key, left, right)
        save(fig, "axis-" + re.sub(r"[^a-z0-9]+", "-", "-".join(axis).lower()), f"against {axis_label(axis)}")

    fig, ax = plt.subplots(figsize=(8, 5))
    _pareto(summaries, ax)
    save(fig, "pareto", "speedup / fidelity Pareto front")

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.45 * min(len(summaries), MAX_LINES) + 1.5)))
    _distributions(rows, summaries, left, right)
    save(fig, "distributions", "per-prompt distributions")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _prompt_length(rows, summaries, left, right)
    save(fig, "prompt-length", "against prompt length")
    return plots


def _psnr(value: float | None) -> float | None:
    return None if value is None else min(value, PSNR_CAP_DB)


def _axis_lines(plan: BenchPlan, axis: tuple[str, ...], by_key: dict[str, SettingSummary], left, right) -> None:
    """One line per combination of the other settings, across this axis's values."""
    sweep = plan.sweep
    lines: dict[str, list[tuple[Any, SettingSummary]]] = {}
    for setting in sweep.settings:
        value = sweep.axis_value(setting, axis)
        summary = by_key.get(setting.key)
        if value is None or summary is None:
            continue
        methods = " + ".join(method_of(config).name for config in setting.configs)
        others = ", ".join(f"{field_label(name).lower()} {v}" for name, v in setting.values if name not in axis)
        others = f"{methods}: {others}" if others else methods
        lines.setdefault(others, []).append((value, summary))
    values = [value for points in lines.values() for value, _ in points]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    order = sorted(set(values), key=lambda v: (v if numeric else str(v)))
    position = {v: (v if numeric else i) for i, v in enumerate(order)}
    shown = list(lines.items())[:MAX_LINES]
    for name, points in shown:
        points.sort(key=lambda p: position[p[0]])
        xs = [position[v] for v, _ in points]
        speed = [s.denoising_speedup for _, s in points]
        if all(v is not None for v in speed):
            lows = [s.denoising_speedup - s.denoising_low for _, s in points]
            highs = [s.denoising_high - s.denoising_speedup for _, s in points]
            left.errorbar(xs, speed, yerr=[lows, highs], marker="o", capsize=3, label=name[:60])
        psnr = [_psnr(s.psnr_mean_db) for _, s in points]
        if all(v is not None for v in psnr):
            worst = [p - _psnr(s.psnr_worst_db) for p, (_, s) in zip(psnr, points)]
            right.errorbar(xs, psnr, yerr=[worst, [0] * len(worst)], marker="o", capsize=3, label=name[:60])
    left.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    left.set_ylabel("denoising speedup (x; below 1 = slower)")
    right.set_ylabel("PSNR to the baseline, dB (mean; bar to the worst)")
    for ax in (left, right):
        ax.set_xlabel(axis_label(axis))
        if not numeric:
            ax.set_xticks(range(len(order)), [str(v) for v in order])
        ax.grid(alpha=0.3)
    left.set_title("speedup (bars: range over prompts and seeds)", fontsize=9)
    right.set_title("fidelity to the baseline", fontsize=9)
    if len(shown) > 1:
        right.legend(fontsize=7, loc="best")
    if len(lines) > MAX_LINES:
        left.text(0.01, 0.01, f"{len(lines) - MAX_LINES} more lines not drawn", transform=left.transAxes, fontsize=7)


def _pareto(summaries: Sequence[SettingSummary], ax) -> None:
    points = [s for s in summaries if s.denoising_speedup is not None and s.psnr_mean_db is not None]
    front = pareto_front(summaries)
    ax.scatter([s.denoising_speedup for s in points], [_psnr(s.psnr_mean_db) for s in points], color="#999",
               label="setting")
    ax.plot([s.denoising_speedup for s in front], [_psnr(s.psnr_mean_db) for s in front], "o-", color="#d62728",
            label="Pareto front (beside the baseline: 1x, identical)")
    for s in front[:MAX_LINES]:
        ax.annotate(s.setting[:48], (s.denoising_speedup, _psnr(s.psnr_mean_db)), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1, label="1x: the baseline (left of it: slower)")
    ax.set_xlabel("denoising speedup (median over prompts and seeds; below 1 = slower)")
    ax.set_ylabel(f"mean PSNR to the baseline, dB (capped at {PSNR_CAP_DB:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _distributions(rows: Sequence[BenchRow], summaries: Sequence[SettingSummary], left, right) -> None:
    shown = list(summaries)[:MAX_LINES]
    speed = [[r.denoising.median for r in rows if r.ok and r.setting_key == s.setting_key and r.denoising] for s in shown]
    psnr = [[_psnr(r.psnr_mean_db) for r in rows if r.ok and r.setting_key == s.setting_key
             and r.psnr_mean_db is not None] for s in shown]
    labels = [s.setting[:40] for s in shown]
    for ax, data, xlabel in ((left, speed, "denoising speedup per prompt and seed (x)"),
                             (right, psnr, "mean PSNR per prompt and seed (dB)")):
        positions = list(range(1, len(data) + 1))
        kept = [(p, d) for p, d in zip(positions, data) if d]
        if kept:
            ax.boxplot([d for _, d in kept], positions=[p for p, _ in kept], orientation="horizontal", widths=0.6)
            for p, d in kept:
                ax.scatter(d, [p] * len(d), s=10, alpha=0.6, color="#1f77b4")
        ax.set_yticks(positions, labels, fontsize=7)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, axis="x")
    left.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    right.set_yticks([])
    for ax in (left, right):
        ax.invert_yaxis()  # the first setting on top, as in the table
    if len(summaries) > MAX_LINES:
        left.set_title(f"first {MAX_LINES} of {len(summaries)} settings", fontsize=8)


def _prompt_length(rows: Sequence[BenchRow], summaries: Sequence[SettingSummary], left, right) -> None:
    for summary in list(summaries)[:MAX_LINES]:
        mine = [r for r in rows if r.ok and r.setting_key == summary.setting_key]
        words = [r.prompt_words for r in mine]
        left.scatter(words, [r.denoising.median if r.denoising else math.nan for r in mine], s=14,
                     label=summary.setting[:40])
        right.scatter(words, [_psnr(r.psnr_mean_db) if r.psnr_mean_db is not None else math.nan for r in mine], s=14)
    left.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    left.set_ylabel("denoising speedup (x)")
    right.set_ylabel("mean PSNR to the baseline (dB)")
    for ax in (left, right):
        ax.set_xlabel("prompt length (words)")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)


# ---- the HTML report -----------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;
color:#1d2433;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:4px}
table{border-collapse:collapse;font-size:.85rem;margin:8px 0;width:100%}
th,td{border:1px solid #dde;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f3f4f8}tr.front td{background:#fff6e0}td.num{text-align:right;white-space:nowrap}
img{max-width:100%;border:1px solid #eee;margin:6px 0}.scroll{overflow-x:auto}.muted{color:#667}.bad{color:#b00020}
details{margin:8px 0}code{background:#f3f4f8;padding:1px 4px;border-radius:3px}
@media (max-width:700px){table{font-size:.75rem}}
"""


def write_report(plan: BenchPlan, rows: Sequence[BenchRow], summaries: Sequence[SettingSummary],
                 out: Path) -> dict[str, str]:
    """Plots under ``out/plots`` and ``out/report.html`` (self-contained: plots inlined as data)."""
    plots = write_plots(plan, rows, summaries, out / PLOTS_DIR)
    front = {s.setting_key for s in pareto_front(summaries)}
    e = html.escape
    environment = next((r.environment for r in rows if r.environment), {})

    hosts = sorted({r.host for r in rows if r.host})
    failed = [r for r in rows if not r.ok]
    missing = len(plan.keys()) - len(rows)
    busy = busy_sentence(rows)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>vdtome benchmark: {e(plan.sweep.name)} on {e(plan.preset)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Benchmark: {e(plan.sweep.name)} on {e(plan.preset)}</h1>",
        f"<p>{e(plan.sweep.description)}</p>",
        "<p class='muted'>"
        f"{len(plan.sweep.settings)} settings x {len(plan.prompts)} prompts x {len(plan.seeds)} seeds "
        f"({', '.join(map(str, plan.seeds))}) = {len(plan.keys())} comparisons; {len(rows) - len(failed)} finished, "
        f"{len(failed)} failed, {missing} not run. Request: "
        f"{e(', '.join(f'{k} {v}' for k, v in plan.request_fields.items()) or 'the preset defaults')}. "
        f"Made {time.strftime('%Y-%m-%d %H:%M')}.<br>Measured on {e(environment_line(environment) or 'unknown')}"
        f"{' · hosts: ' + e(', '.join(hosts)) if len(hosts) > 1 else ''}</p>",
        "<h2>How to read it</h2><ul>",
        "<li>Each row of the benchmark is one comparison: the baseline and the setting on the same prompt and "
        "seed, timed in alternating rounds within that comparison (the baseline video is made once per prompt "
        "and seed and reused; its timing is measured again next to each setting).</li>",
        "<li><b>Speedup</b>: baseline time / accelerated time of the denoising loop, the median of each row's "
        "paired ratios; the table gives the median over rows and, in brackets, the range over rows, written "
        "as faster or slower (summary.csv keeps the ratios: below 1 is a slowdown). <b>faster / slower "
        "rows</b>: rows whose own interval excludes 1 (the rest are within noise or had too few rounds to tell). End-to-end adds the text encoder and decoder, which no method "
        "touches (projected from the same calls).</li>",
        "<li><b>Fidelity</b>: PSNR / SSIM of the accelerated video to the baseline's, frame by frame; mean over "
        f"rows and the worst frame of any row. {PSNR_CAP_DB:g} dB means identical. <b>Warp error</b>: "
        "flow-compensated difference between consecutive frames (lower is steadier), baseline / accelerated.</li>",
        "<li><b>Pareto front</b> (highlighted): settings nothing beats on both median speedup and mean PSNR, "
        "the baseline itself (1x, identical) included, so a setting slower than not accelerating is never on "
        "it: the choices worth considering.</li>",
        "</ul>",
    ]
    if busy:
        parts.append(f"<p class='bad'>{e(busy)}</p>")
    parts.append("<h2>Summary per setting</h2><div class='scroll'><table><tr>"
                 + "".join(f"<th>{e(h)}</th>" for h in SUMMARY_HEADER) + "</tr>")
    for summary in summaries:
        cells = summary_cells(summary)
        css = " class='front'" if summary.setting_key in front else ""
        parts.append(f"<tr{css}><td>{e(cells[0])}</td>" + "".join(f"<td class='num'>{e(c)}</td>" for c in cells[1:])
                     + "</tr>")
    parts.append("</table></div>")
    parts.append("<h2>Plots</h2>")
    for title, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h3>{e(title[:1].upper() + title[1:])}</h3><img alt='{e(title)}' src='data:image/png;base64,{data}'>")
    if failed:
        parts.append(f"<h2 class='bad'>Failed rows ({len(failed)})</h2><div class='scroll'><table><tr><th>setting</th><th>prompt</th>"
                     "<th>seed</th><th>attempts</th><th>error</th></tr>")
        parts += [f"<tr><td>{e(r.setting)}</td><td>{e(r.prompt)}</td><td>{r.seed}</td><td>{r.attempts}</td>"
                  f"<td>{e(r.error or '')}</td></tr>" for r in failed]
        parts.append("</table></div>")
    parts.append(f"<details><summary>Every row ({len(rows)})</summary><div class='scroll'><table><tr>"
                 + "".join(f"<th>{e(h)}</th>" for h in ROW_HEADER) + "</tr>")
    for r in rows:
        cells = row_cells(r)
        css = " class='bad'" if r.busy else ""
        parts.append(f"<tr{css}>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table></div></details>")
    parts.append("<p class='muted'>Every figure, every timed call and the environment of each row: "
                 "<code>rows.jsonl</code> beside this file; the summary as numbers: <code>summary.csv</code>.</p>")
    parts.append("</body></html>")
    report = out / REPORT_FILE
    report.write_text("\n".join(parts), encoding="utf-8")
    return {"report": str(report)} | {f"plot: {title}": str(path) for title, path in plots.items()}
