"""A comparison result as rows of human-readable figures (shared by the CLI table and the app).

Every row has its unit and says which direction is better; speedups come from the timing
protocol (:mod:`vdtome.measure.protocol`) with their interval and verdict, slowdowns read as slowdowns,
phases the method does not touch are shown as unchanged, and memory changes within the
measurement's noise are labelled so.
"""

from __future__ import annotations

import time

from vdtome.engine.fidelity import PSNR_CAP_DB
from vdtome.engine.request import ComparisonResult
from vdtome.measure.environment import environment_line
from vdtome.measure.protocol import RSS_FLOOR_BYTES, TENSOR_PEAK, MemoryFigures, PhaseFigures

COLUMNS = ("metric", "baseline", "accelerated", "change", "better")
END_TO_END_LABEL = "end-to-end (projected: denoising + untouched phases measured here)"
NA = "n/a"


def _seconds(ms: float | None) -> str:
    return NA if ms is None else f"{ms / 1000:.3f} s"


def _milliseconds(ms: float | None) -> str:
    return NA if ms is None else f"{ms:.1f} ms / step"


def _mib(value: float | None) -> str:
    return NA if value is None else f"{value / 2**20:.1f} MiB"


def method_label(result: ComparisonResult) -> str:
    """The stack as people read it: "token merging (ToMe) + First Block Cache"."""
    return " + ".join(method.label for method in result.methods) or "no method"


def _timing_rows(result: ComparisonResult) -> list[tuple[str, str, str, str, str]]:
    timing = result.timing
    if timing is None:
        return [("denoising loop", NA, NA, "not measured: the comparison did not finish", "lower")]
    rounds = f"{timing.rounds} round{'s' if timing.rounds != 1 else ''}"

    def touched(figures: PhaseFigures, label: str) -> tuple[str, str, str, str, str]:
        change = NA if figures.ratio is None else figures.ratio.text()
        if figures.per_step:
            return (label, _milliseconds(figures.baseline_ms), _milliseconds(figures.accelerated_ms), change, "lower")
        return (label, _seconds(figures.baseline_ms), _seconds(figures.accelerated_ms), change, "lower")

    denoising = (f"denoising, mean step after the first (median of {rounds}: the first of "
                 f"{result.settings.steps} steps, the others of {result.settings.round_steps})"
                 if timing.denoising.per_step else f"denoising loop (median of {rounds})")
    rows = [touched(timing.denoising, denoising)]
    whole = timing.end_to_end
    if timing.changed:  # each side's own other phases, measured once: no verdict
        change = NA
        if whole.baseline_ms and whole.accelerated_ms:
            change = f"{whole.accelerated_ms / whole.baseline_ms:.2f}x the baseline's time; not tested"
        rows.append(("end-to-end (projected: each side's loop + its own other phases, one call per side)",
                     _seconds(whole.baseline_ms), _seconds(whole.accelerated_ms), change, "lower"))
    else:
        rows.append(touched(whole, END_TO_END_LABEL))
    base_step, fast_step = timing.seconds_per_step
    per_step = "seconds per step (median)" if timing.steps_alike else "seconds per step (mean: the method's steps differ)"
    rows.append((per_step, NA if base_step is None else f"{base_step:.4f} s",
                 NA if fast_step is None else f"{fast_step:.4f} s", "", "lower"))
    label = method_label(result)
    for phase in timing.changed:
        change = NA
        if phase.baseline_ms and phase.accelerated_ms:
            change = (f"{phase.accelerated_ms / phase.baseline_ms:.2f}x the baseline's time; one call per side, "
                      "not tested")
        base = _seconds(phase.baseline_ms) if phase.baseline_ms or not result.baseline_reused else "from cache, not re-timed"
        rows.append((f"{phase.label} (changed by {label})", base, _seconds(phase.accelerated_ms), change, "lower"))
    for phase in timing.untouched:
        if phase.ratio is None:
            base = "from cache, not re-timed" if result.baseline_reused else NA
            rows.append((f"{phase.label} (not touched by {label})", base, _seconds(phase.accelerated_ms),
                         "unchanged by design", "lower"))
            continue
        rows.append((f"{phase.label} (not touched by {label})", _seconds(phase.baseline_ms),
                     _seconds(phase.accelerated_ms), f"unchanged by design; {phase.check}", "lower"))
    return rows


def _memory_row(figures: MemoryFigures) -> tuple[str, str, str, str, str]:
    label = f"{figures.kind}, {figures.scope}"
    change = figures.change_bytes
    if change is None:
        text = ""
    elif figures.exact:
        text = f"{change / 2**20:+.1f} MiB"
    elif not figures.comparable:
        text = f"{change / 2**20:+.1f} MiB (not comparable: the baseline ran in another request)"
    elif figures.below_floor:
        text = (f"{change / 2**20:+.1f} MiB (within noise: both sides grew less than "
                f"{RSS_FLOOR_BYTES / 2**20:.0f} MiB, what the allocator keeps or returns between calls)")
    elif figures.noise_bytes is None:
        text = f"{change / 2**20:+.1f} MiB (within noise: one sample per side, RSS growth cannot tell)"
    elif figures.within_noise:
        text = (f"{change / 2**20:+.1f} MiB (within sampling noise: repeated calls of one side vary by "
                f"{figures.noise_bytes / 2**20:.1f} MiB)")
    else:
        text = f"{change / 2**20:+.1f} MiB (beyond the {figures.noise_bytes / 2**20:.1f} MiB spread of repeated calls)"
    return (label, _mib(figures.baseline), _mib(figures.accelerated), text, "lower")


def _plan_rows(result: ComparisonResult) -> list[tuple[str, str, str, str, str]]:
    """The memory plan's estimate next to the measured peak (weights included in both)."""
    check = result.memory_plan
    if check is None:
        return []
    base, fast = check.baseline.peak_bytes, check.accelerated.peak_bytes
    unmodelled = f" ({', '.join(check.accelerated.unmodelled)}: not modelled, taken as unchanged)" \
        if check.accelerated.unmodelled else ""
    rows = [("estimated peak, weights included (memory plan)", _mib(base), _mib(fast),
             f"{(fast - base) / 2**20:+.1f} MiB{unmodelled}", "lower")]
    if check.measured_baseline_bytes and check.measured_accelerated_bytes:
        off = [estimate / measured - 1 for estimate, measured in ((base, check.measured_baseline_bytes),
                                                                  (fast, check.measured_accelerated_bytes))]
        rows.append((f"measured peak, weights included ({check.measured})", _mib(check.measured_baseline_bytes),
                     _mib(check.measured_accelerated_bytes),
                     f"the estimate is off by {off[0]:+.0%} / {off[1]:+.0%}", "lower"))
    return rows


def _compile_rows(result: ComparisonResult) -> list[tuple[str, str, str, str, str]]:
    """What torch.compile did: the compile phase apart from the timed rounds, graph breaks, and
    compiling in the timed rounds (which withdraws the verdict)."""
    report = result.compilation
    if report is None:
        return []
    rows = []
    if report.compile_phase is not None:
        phase = report.compile_phase
        rows.append(("compile phase (untimed, both sides)", _seconds(1000 * phase.seconds), "",
                     f"{report.phase_rounds} round(s) of both sides, {phase.graphs} graph(s)" +
                     ("" if report.earlier is None else ", the others made by an earlier request on this pipeline") +
                     ("" if report.settled else f"; still compiling in its last round ({phase.frames} compiles "
                      "in all)"), ""))
    total = report.graph_breaks
    if total is None:
        rows.append(("graph breaks", "", NA, "counted when compiled: the graphs came from an earlier request with "
                     "another stack", "fewer"))
    else:
        rows.append(("graph breaks", "", str(total.break_count),
                     "; ".join(f"{reason} (x{count})" for reason, count in total.graph_breaks[:3]), "fewer"))
    timed = report.timed
    note = report.timing_problem() or "the timed calls ran what the compile phase made"
    rows.append(("compiles during the timed rounds", "", str(timed.frames), note, "0"))
    return rows


def metric_rows(result: ComparisonResult) -> list[tuple[str, str, str, str, str]]:
    base, fast = result.baseline, result.accelerated
    rows = _timing_rows(result)
    if result.timing is not None:
        rows.extend(_memory_row(figures) for figures in result.timing.memory)
    rows.extend(_plan_rows(result))
    rows.extend(_compile_rows(result))
    for method in result.methods:
        prefix = f"{method.label}: " if len(result.methods) > 1 else ""
        report = method.report
        rows.extend((prefix + metric, "", value, note, "") for metric, value, note in report.rows)
        verdict = "evidence that it acted" if report.acted else "it did nothing in this run"
        rows.extend((prefix + item.label, "", item.text(), verdict, "") for item in report.evidence)
    fid = result.fidelity
    if fid is not None:
        psnr = "identical" if fid.identical else f"{fid.psnr_mean:.2f} dB"
        if not fid.identical and fid.psnr_mean >= PSNR_CAP_DB:
            psnr = f">= {PSNR_CAP_DB:.0f} dB"
        rows.append(("PSNR vs baseline", "reference", psnr, "", "higher"))
        rows.append(("SSIM vs baseline", "reference", f"{fid.ssim_mean:.4f}", "", "higher (1 = same)"))
        rows.append(("MSE vs baseline", "reference", f"{fid.mse_mean:.3g}", "", "lower"))
    for label, attribute in (("warp error (optical flow)", "warp_error_mean"),
                             ("frame-to-frame difference", "frame_diff_mean")):
        values = [
            None if run is None or run.temporal is None else getattr(run.temporal, attribute) for run in (base, fast)
        ]
        rows.append((label, *(NA if v is None else f"{v:.4f}" for v in values), "", "closer to baseline"))
    if result.baseline_reused and base is not None:
        made = time.strftime("%H:%M:%S", time.localtime(base.measured_at))
        rows.append(("baseline video", f"from cache (made {made})", "", "timing measured again in this request", ""))
    else:
        rows.append(("baseline video", "made in this request", "", "", ""))
    return rows


def protocol_line(result: ComparisonResult) -> str:
    """How the figures were taken, in one sentence the page and the CLI print under the table."""
    timing = result.timing
    if timing is None:
        return ""
    s = result.settings
    rounds = (f"{timing.rounds} round(s) of baseline and accelerated calls made back to back in this request "
              "(order alternating, after untimed warm-ups)")
    if timing.denoising.per_step:
        rounds += (f", the first of {s.steps} steps, the others of {s.round_steps} (the stack's steps all cost alike: "
                   "calls compared by their mean step after the first)")
    ratio = timing.denoising.ratio
    threshold = "" if ratio is None else f"changes under the {ratio.threshold_text()} or "
    projection = ("end-to-end adds each side's own other phases to its loop (the stack changes "
                  f"{' and '.join(phase.label for phase in timing.changed)}: measured in one call per side, not "
                  "tested)" if timing.changed else
                  "end-to-end is projected from the denoising times and this request's measured untouched phases")
    memory = ("; memory on this CPU is the most tensor bytes held at once, counted per operation in one untimed "
              "call per side" if any(f.kind == TENSOR_PEAK for f in timing.memory) else "")
    return (
        f"Timing: {rounds}; a change is the median of paired ratios over the rounds, each pair two calls (the steps "
        "of one call are never counted as repeats; so it need not equal the ratio of the two medians shown) with "
        f"a distribution-free interval, and fewer than 6 rounds are not tested; {projection}; {threshold}with an "
        f"interval that includes 1 are not called faster or slower{memory}."
    )


def format_table(result: ComparisonResult, width: int | None = None) -> str:
    """The result as text: settings, environment, every metric row, how it was timed, warnings, notes
    and files. ``width``: at most this many columns, one block per metric (its name, then its figures
    indented, each labelled by its column) and the prose wrapped (file paths stay whole); None: the
    wide table, one line per metric in aligned columns, however long."""
    import textwrap

    def wrapped(text: str, indent: str = "", later: str = "  ") -> list[str]:
        return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=later, break_long_words=False,
                             break_on_hyphens=False) or [indent.rstrip()]

    s = result.settings
    head = [
        f"{s.preset}: {s.frames} frames, {s.height}x{s.width}, {s.steps} steps, guidance {s.guidance:g}, seed {s.seed}",
        environment_line(result.environment),
    ]
    prose = [protocol_line(result)] if result.timing is not None else []
    prose += [f"warning: {warning}" for warning in result.warnings]
    prose += [f"note: {note}" for note in result.notes]
    if result.error:
        prose.append(f"error: {result.error}")
    files = [f"{name}: {path}" for name, path in result.files.items()]
    if width is None:
        rows = [COLUMNS, *metric_rows(result)]
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
        lines = [" | ".join(str(cell).ljust(size) for cell, size in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-+-".join("-" * size for size in widths))
        return "\n".join(head + [""] + lines + [""] + prose + files)
    lines = []
    for metric, *cells in metric_rows(result):
        named = dict(zip(COLUMNS[1:], cells))
        lines += wrapped(metric)
        figures = " | ".join(f"{column}: {named[column]}" for column in ("baseline", "accelerated", "better")
                             if named[column])
        if figures:
            lines += wrapped(figures, "    ", "      ")
        if named["change"]:
            lines += wrapped(f"change: {named['change']}", "    ", "      ")
    text = [line for part in head for line in wrapped(part)]
    text += [""] + lines + [""] + [line for part in prose for line in wrapped(part)] + files
    return "\n".join(text)
