"""Benchmarks: every setting of a sweep on every prompt and seed, one comparison per row.

``python -m vdtome bench --preset P --prompts FILE --sweep SWEEP.yaml --out DIR [--seeds 0,1]``.
A *group* is one (prompt, seed): its settings run one after another on the same loaded pipeline,
so the baseline video is made once and reused by every setting of the group (the engine's baseline
cache), while the baseline is timed again inside each comparison's own rounds, adjacent to the
accelerated calls it is compared with (a ratio of timings taken minutes apart is not a speedup).

Each finished row is appended to ``DIR/rows.jsonl`` at once (one JSON object a line, flushed and
synced), so a crash or kill loses at most the row in flight; running the same command again skips
the rows that finished (rows that failed are tried again). A group that raises is retried a bounded
number of times, then its missing rows are recorded with the error. The same driver runs the
groups in this process or on Ray actors (:mod:`vdtome.bench.ray_runner`); it alone writes the files.
Summaries, plots and the HTML report are made from the rows file (:mod:`vdtome.bench.report`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vdtome.bench.sweep import Setting, Sweep, parse_sweep
from vdtome.core.denoisers import pipeline_denoiser_types
from vdtome.core.presets import get_preset, load_prompts
from vdtome.core.validation import RequestError, text
from vdtome.engine.engine import Cancelled, ComparisonEngine
from vdtome.engine.pipelines import ModelUnavailableError
from vdtome.engine.request import ComparisonRequest, resolve
from vdtome.measure.stats import Verdict, median, range_phrase, speed_phrase
from vdtome.methods import check_available, check_stack

ROWS_FILE = "rows.jsonl"
SUMMARY_FILE = "summary.csv"
PLAN_FILE = "plan.json"
DEFAULT_RETRIES = 2
FORM_TEXT_CHARS = 20_000  # the app's prompt list and sweep editor
# Summary columns that do not depend on timing: equal in every rerun on the same machine and
# software (fidelity, temporal consistency, what the methods did), whatever the machine's load.
DETERMINISTIC_COLUMNS = ("setting", "rows", "failed", "psnr_mean_db", "psnr_worst_db", "ssim_mean", "ssim_worst",
                         "warp_error_baseline", "warp_error_accelerated")


@dataclass(frozen=True)
class Group:
    """One (prompt, seed): the unit of work, run on one device so its baseline is shared."""

    prompt: str
    seed: int


@dataclass(frozen=True)
class BenchPlan:
    """What a benchmark runs: every setting of ``sweep`` for every prompt and seed on ``preset``.
    ``rounds`` (when given) overrides the sweep file's and the preset's timing rounds."""

    preset: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    sweep: Sweep
    rounds: int | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise RequestError("the benchmark needs at least one prompt", "prompts")
        if not self.seeds:
            raise RequestError("the benchmark needs at least one seed", "seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise RequestError(f"seeds must differ, got {list(self.seeds)}", "seeds")
        twice = first_repeat(self.prompts)
        if twice is not None:
            raise RequestError(f"the prompt {twice[:80]!r} is listed twice", "prompts")

    @property
    def request_fields(self) -> dict[str, Any]:
        fixed = dict(self.sweep.request)
        if self.rounds is not None:
            fixed["rounds"] = self.rounds
        return fixed

    def groups(self) -> tuple[Group, ...]:
        return tuple(Group(prompt, seed) for prompt in self.prompts for seed in self.seeds)

    def request(self, group: Group, setting: Setting):

        return ComparisonRequest(preset=self.preset, prompt=group.prompt, seed=group.seed, methods=setting.configs,
                                 snap=False, **self.request_fields)

    def row_key(self, group: Group, setting: Setting) -> str:
        """Everything a row's figures depend on: a rerun with other steps or rounds runs again."""
        identity = [self.preset, group.prompt, group.seed, sorted(self.request_fields.items()), setting.key]
        return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:20]

    def keys(self) -> dict[str, tuple[Group, Setting]]:
        return {self.row_key(group, setting): (group, setting) for group in self.groups()
                for setting in self.sweep.settings}

    def check(self) -> None:
        """Every request valid before anything runs: each setting's stack on this model (its
        availability, the stacking rules, the sweep's request fields) and each prompt. A bad size
        or a method the model cannot take is named now, not after an hour of rows."""

        try:
            preset = get_preset(self.preset)
        except KeyError as error:
            raise RequestError(str(error.args[0]) if error.args else str(error), "preset") from None
        denoisers = pipeline_denoiser_types(preset.pipeline_class)
        first = self.groups()[0]
        for setting in self.sweep.settings:
            try:
                check_available(check_stack(setting.configs), denoisers)
                resolve(self.request(first, setting), preset)
            except RequestError as error:
                field_name = "prompts" if error.field in ("prompt", "negative_prompt") else "sweep"
                raise RequestError(f"{self.sweep.name}: {setting.label}: {error}", field_name) from None
        for prompt in self.prompts:  # the prompt is the only part of a request that differs between groups
            try:
                resolve(self.request(Group(prompt, self.seeds[0]), self.sweep.settings[0]), preset)
            except RequestError as error:
                raise RequestError(f"prompt {prompt[:60]!r}: {error}", "prompts") from None

    def describe(self) -> dict[str, Any]:
        return {"preset": self.preset, "prompts": list(self.prompts), "seeds": list(self.seeds),
                "sweep": self.sweep.name, "description": self.sweep.description, "request": self.request_fields,
                "settings": [setting.label for setting in self.sweep.settings], "axes": [list(a) for a in self.sweep.axes]}


@dataclass(frozen=True)
class Speed:
    """One row's paired speedup (baseline / accelerated time): the median over its rounds, the
    interval of that median (None with too few rounds) and the protocol's verdict."""

    median: float
    low: float | None
    high: float | None
    verdict: str


@dataclass(frozen=True)
class BenchRow:
    """One comparison of a benchmark: who, what, every figure, where it ran; or why it failed."""

    key: str
    preset: str
    prompt: str
    seed: int
    setting: str
    setting_key: str
    values: dict[str, Any]
    ok: bool
    error: str | None = None
    attempts: int = 1
    denoising: Speed | None = None
    end_to_end: Speed | None = None
    baseline_denoising_s: float | None = None
    accelerated_denoising_s: float | None = None
    memory_kind: str | None = None
    baseline_peak_bytes: float | None = None
    accelerated_peak_bytes: float | None = None
    # The change is no larger than repeated calls of one side differ, or below the floor.
    memory_within_noise: bool = False
    memory_ratio: float | None = None  # accelerated / baseline peak where it means something (MemoryFigures.ratio)
    psnr_mean_db: float | None = None
    psnr_worst_db: float | None = None
    ssim_mean: float | None = None
    ssim_worst: float | None = None
    warp_error_baseline: float | None = None
    warp_error_accelerated: float | None = None
    evidence: tuple[dict[str, Any], ...] = ()
    busy: str | None = None
    host: str = ""
    finished_at: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None  # the comparison's whole result.json (every timed call)

    @property
    def prompt_words(self) -> int:
        return len(self.prompt.split())

    @classmethod
    def from_result(cls, key: str, group: Group, setting: Setting, result) -> BenchRow:
        timing, fid = result.timing, result.fidelity
        # The same scope in every row: the denoising-only calls, which both sides make in every
        # request (with 2+ rounds); whole calls only where there are none. Whole calls would
        # compare the first setting of a group (its baseline decoded here) on another scope than
        # the rest (their baseline video cached).
        figures = [m for m in (timing.memory if timing is not None else ()) if m.comparable]
        memory = next((m for m in figures if m.scope == "denoising"), figures[0] if figures else None)
        base, fast = result.baseline, result.accelerated
        return cls(
            key=key, preset=result.settings.preset, prompt=group.prompt, seed=group.seed, setting=setting.label,
            setting_key=setting.key, values=dict(setting.values), ok=result.ok, error=result.error,
            denoising=None if timing is None else _speed(timing.denoising.ratio),
            end_to_end=None if timing is None else _speed(timing.end_to_end.ratio),
            baseline_denoising_s=None if timing is None else _seconds(timing.denoising.baseline_ms),
            accelerated_denoising_s=None if timing is None else _seconds(timing.denoising.accelerated_ms),
            memory_kind=None if memory is None else f"{memory.kind}, {memory.scope}",
            baseline_peak_bytes=None if memory is None else memory.baseline,
            accelerated_peak_bytes=None if memory is None else memory.accelerated,
            memory_within_noise=memory is not None and memory.within_noise,
            memory_ratio=None if memory is None else memory.ratio,
            psnr_mean_db=None if fid is None else fid.psnr_mean,
            psnr_worst_db=None if fid is None else min(fid.psnr),
            ssim_mean=None if fid is None else fid.ssim_mean,
            ssim_worst=None if fid is None else min(fid.ssim),
            warp_error_baseline=None if base is None or base.temporal is None else base.temporal.warp_error_mean,
            warp_error_accelerated=None if fast is None or fast.temporal is None else fast.temporal.warp_error_mean,
            evidence=tuple({"method": m.method, "label": e.label, "count": e.count, "of": e.of}
                           for m in result.methods for e in m.report.evidence),
            busy=result.warnings[0] if result.warnings else None,
            host=socket.gethostname(), finished_at=time.time(), environment=result.environment,
            result=result.to_dict(),
        )

    @classmethod
    def failed(cls, key: str, preset: str, group: Group, setting: Setting, error: str, attempts: int = 1) -> BenchRow:
        return cls(key=key, preset=preset, prompt=group.prompt, seed=group.seed, setting=setting.label,
                   setting_key=setting.key, values=dict(setting.values), ok=False, error=error, attempts=attempts,
                   host=socket.gethostname(), finished_at=time.time())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchRow:
        known = {f.name for f in fields(cls)}
        data = {key: value for key, value in data.items() if key in known}
        for name in ("denoising", "end_to_end"):
            if data.get(name) is not None:
                data[name] = Speed(**data[name])
        data["evidence"] = tuple(data.get("evidence") or ())
        return cls(**data)


def _speed(ratio) -> Speed | None:
    if ratio is None:
        return None
    return Speed(ratio.value, ratio.low, ratio.high, ratio.verdict.value)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


# ---- the rows file -------------------------------------------------------------------------------


class RowsFile:
    """``rows.jsonl``: one row a line, appended as rows finish. A line torn by a kill (the last
    one, without its newline) is cut off before the next append and never read as a row."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[BenchRow]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # the torn last line of a killed run
            try:
                rows.append(BenchRow.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError):
                continue  # a line another program wrote; not ours
        return rows

    def append(self, row: BenchRow) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        line = json.dumps(_finite(row.to_dict()), allow_nan=False, default=str) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def _repair(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a figure is written as null (it was not measurable)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def latest_rows(rows: Iterable[BenchRow], keys: Iterable[str]) -> list[BenchRow]:
    """The newest row of each key in ``keys`` (a failed row is replaced by a later success), in
    ``keys`` order."""
    newest: dict[str, BenchRow] = {}
    for row in rows:
        newest[row.key] = row
    return [newest[key] for key in keys if key in newest]


# ---- running groups ------------------------------------------------------------------------------


class BenchWorker:
    """One device's engine (a loaded pipeline, its cached baselines) running groups: the unit the
    in-process runner and each Ray actor share. ``threads``: torch's CPU threads (a Ray worker
    starts with one; the driver passes its own so the figures match a serial run's)."""

    def __init__(self, device: str | None = None, threads: int | None = None, engine: Any = None) -> None:
        import torch


        if threads:
            torch.set_num_threads(threads)
        self.engine = engine or ComparisonEngine(device=device)

    def run_group(self, plan: BenchPlan, group: Group, skip: frozenset[str] = frozenset(),
                  progress: Callable | None = None, cancel: Any = None) -> Iterator[BenchRow]:
        """The group's rows not in ``skip``, each as soon as its comparison finished. A request the
        engine refuses is a failed row (no retry helps); anything else raised ends the group."""
        for setting in plan.sweep.settings:
            key = plan.row_key(group, setting)
            if key in skip:
                continue
            try:
                result = self.engine.run(plan.request(group, setting), progress=progress, cancel=cancel, write=False)
            except RequestError as error:
                yield BenchRow.failed(key, plan.preset, group, setting, f"refused: {error}")
                continue
            yield BenchRow.from_result(key, group, setting, result)


@dataclass(frozen=True)
class GroupFailure:
    """A group that raised: the driver retries it (its finished rows are kept) up to its bound."""

    group: Group
    error: str


Event = tuple[Group, "BenchRow | GroupFailure"]


def run_serial(plan: BenchPlan, todo: Sequence[tuple[Group, frozenset[str]]], worker: BenchWorker,
               progress: Callable | None = None, cancel: Any = None) -> Iterator[Event]:
    """Groups one after another in this process. A cancel and a model that cannot load (no retry
    helps either) end the whole benchmark."""

    for group, skip in todo:
        try:
            for row in worker.run_group(plan, group, skip, progress=progress, cancel=cancel):
                yield group, row
        except (Cancelled, ModelUnavailableError):
            raise
        except Exception as error:  # noqa: BLE001 - recorded with its type, retried by the driver
            yield group, GroupFailure(group, error_text(error))


def error_text(error: BaseException) -> str:
    """"RuntimeError: its first line" (at most 300 characters), as a failed row records it."""
    first = (str(error).splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


Runner = Callable[[Sequence[tuple[Group, frozenset[str]]]], Iterator[Event]]


@dataclass(frozen=True)
class BenchOutcome:
    plan: BenchPlan
    rows: tuple[BenchRow, ...]  # the plan's rows, newest per key
    summaries: tuple[SettingSummary, ...]
    files: dict[str, str]
    ran: int  # rows this call added
    skipped: int  # rows a previous run had finished


# Writes the plots and HTML report of a finished run: (plan, rows, summaries, folder) -> {name: path}.
ReportWriter = Callable[["BenchPlan", Sequence["BenchRow"], Sequence["SettingSummary"], Path], dict[str, str]]


def run_bench(plan: BenchPlan, out_dir: str | Path, runner: Runner | None = None, retries: int = DEFAULT_RETRIES,
              show_progress: bool = True, on_row: Callable[[BenchRow, int, int], None] | None = None,
              report: ReportWriter | None = None, device: str | None = None) -> BenchOutcome:
    """Run what ``out_dir`` is missing, then write the summary (and with ``report``, e.g.
    :func:`vdtome.bench.report.write_report`, the plots and HTML report, whose files it returns).

    ``runner``: runs groups and streams their rows (default: in this process, on one engine on
    ``device``); ``retries``: how many times a group that raised runs again before its missing
    rows are recorded as failed; ``on_row(row, done, total)``: called after each row is written.
    """
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise RequestError(f"retries must be a whole number of at least 0, got {retries!r}", "retries")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(json.dumps(plan.describe(), indent=2))
    rows_file = RowsFile(out / ROWS_FILE)
    keys = plan.keys()
    group_keys: dict[Group, list[str]] = {}
    for key, (group, _) in keys.items():
        group_keys.setdefault(group, []).append(key)
    finished = {row.key for row in rows_file.read() if row.ok and row.key in keys}
    written = set(finished)  # a row written in this run (finished or failed) is not run again in it

    def with_skip(groups: Iterable[Group]) -> list[tuple[Group, frozenset[str]]]:
        return [(group, frozenset(k for k in group_keys[group] if k in written)) for group in groups]

    todo = with_skip(group for group in plan.groups() if not written.issuperset(group_keys[group]))
    total, done, ran, skipped = len(keys), len(finished), 0, len(finished)
    bar = _ProgressBar(total, done, plan) if show_progress else None
    if runner is None:
        worker = BenchWorker(device=device)

        def runner(groups):
            return run_serial(plan, groups, worker, progress=bar.stage if bar else None)
    attempts: dict[Group, int] = {}
    pending = todo

    def write(row: BenchRow) -> None:
        nonlocal done, ran
        rows_file.append(row)
        written.add(row.key)
        if row.ok:
            finished.add(row.key)
        done, ran = done + 1, ran + 1
        if bar:
            bar.advance(row)
        if on_row:
            on_row(row, done, total)

    try:
        while pending:
            again = []
            for group, item in runner(pending):
                if not isinstance(item, GroupFailure):
                    write(item)
                    continue
                attempts[group] = attempts.get(group, 1) + 1
                if attempts[group] <= retries + 1:
                    message = (f"group {group.prompt!r} seed {group.seed} failed ({item.error}); attempt "
                               f"{attempts[group]} of {retries + 1}")
                    if bar:
                        bar.note(message)
                    else:
                        print(message, file=sys.stderr)
                    again.append(group)
                    continue
                for key in group_keys[group]:  # out of attempts: its missing rows say why
                    if key not in written:
                        write(BenchRow.failed(key, plan.preset, group, keys[key][1], item.error, attempts[group] - 1))
            pending = with_skip(again)
    finally:
        if bar:
            bar.close()
    rows = tuple(latest_rows(rows_file.read(), keys))
    summaries = tuple(summarise(rows, plan))
    files = {"rows": str(rows_file.path), "plan": str(out / PLAN_FILE),
             "summary": str(write_summary_csv(summaries, plan, out / SUMMARY_FILE))}
    if report:
        files |= report(plan, rows, summaries, out)
    return BenchOutcome(plan, rows, summaries, files, ran, skipped)


class _ProgressBar:
    """tqdm over rows, with the comparison's own stage as the postfix."""

    def __init__(self, total: int, done: int, plan: BenchPlan) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="row", desc=f"bench {plan.sweep.name} on {plan.preset}",
                        file=sys.stderr, dynamic_ncols=True)

    def stage(self, event) -> None:
        self.bar.set_postfix_str(event.label[:60], refresh=False)

    def note(self, message: str) -> None:
        self.bar.write(message)  # above the bar, which stays at the bottom

    def advance(self, row: BenchRow) -> None:
        self.bar.update(1)
        if not row.ok:
            self.note(f"failed: {row.setting} on {row.prompt!r} seed {row.seed}: {row.error}")

    def close(self) -> None:
        self.bar.close()


# ---- summary -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingSummary:
    """One setting over every prompt and seed. Speedups: the median of the rows' medians and
    their range over rows (each row's own interval is in the rows file); fidelity: the mean over
    rows and the worst row (its worst frame); memory: the median ratio of the accelerated to the
    baseline peak of the denoising calls over the rows where a ratio means something (an exact
    figure, or an RSS growth above the floor and beyond the spread of repeated calls), and the
    median change in bytes over every row; temporal: mean warp error of each side's videos (lower is
    steadier)."""

    setting: str
    setting_key: str
    values: dict[str, Any]
    rows: int
    failed: int
    denoising_speedup: float | None
    denoising_low: float | None
    denoising_high: float | None
    end_to_end_speedup: float | None
    end_to_end_low: float | None
    end_to_end_high: float | None
    faster_rows: int
    slower_rows: int
    did_nothing_rows: int  # rows where no method acted: their measured ratio is noise, left out above
    peak_memory_ratio: float | None
    memory_change_bytes: float | None  # the median accelerated - baseline peak over the rows
    memory_noise_rows: int  # rows whose memory change was within noise (the spread of repeated calls, or the floor)
    memory_kind: str | None
    psnr_mean_db: float | None
    psnr_worst_db: float | None
    ssim_mean: float | None
    ssim_worst: float | None
    warp_error_baseline: float | None
    warp_error_accelerated: float | None
    busy_rows: int

    def deterministic(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in DETERMINISTIC_COLUMNS}


def summarise(rows: Sequence[BenchRow], plan: BenchPlan) -> list[SettingSummary]:
    out = []
    for setting in plan.sweep.settings:
        mine = [row for row in rows if row.setting_key == setting.key]
        good = [row for row in mine if row.ok]
        idle = [row for row in good if row.denoising is not None and row.denoising.verdict == Verdict.DID_NOTHING.value]
        acted = [row for row in good if row not in idle]  # a method that did nothing gets no speed figure
        denoising = [row.denoising.median for row in acted if row.denoising is not None]
        end_to_end = [row.end_to_end.median for row in acted if row.end_to_end is not None]
        changes = [row.accelerated_peak_bytes - row.baseline_peak_bytes for row in good
                   if row.baseline_peak_bytes is not None and row.accelerated_peak_bytes is not None]
        out.append(SettingSummary(
            setting=setting.label, setting_key=setting.key, values=dict(setting.values), rows=len(good),
            failed=len(mine) - len(good),
            denoising_speedup=_median(denoising), denoising_low=_min(denoising), denoising_high=_max(denoising),
            end_to_end_speedup=_median(end_to_end), end_to_end_low=_min(end_to_end), end_to_end_high=_max(end_to_end),
            faster_rows=sum(row.denoising is not None and row.denoising.verdict == "faster" for row in good),
            slower_rows=sum(row.denoising is not None and row.denoising.verdict == "slower" for row in good),
            did_nothing_rows=len(idle),
            peak_memory_ratio=_median(row.memory_ratio for row in good if not row.memory_within_noise),
            memory_change_bytes=_median(changes),
            memory_noise_rows=sum(row.memory_within_noise for row in good),
            memory_kind=next((row.memory_kind for row in good if row.memory_kind), None),
            psnr_mean_db=_mean(row.psnr_mean_db for row in good),
            psnr_worst_db=_min(row.psnr_worst_db for row in good),
            ssim_mean=_mean(row.ssim_mean for row in good),
            ssim_worst=_min(row.ssim_worst for row in good),
            warp_error_baseline=_mean(row.warp_error_baseline for row in good),
            warp_error_accelerated=_mean(row.warp_error_accelerated for row in good),
            busy_rows=sum(row.busy is not None for row in good),
        ))
    return out


def _present(values: Iterable[float | None]) -> list[float]:
    return [value for value in values if value is not None and math.isfinite(value)]


def _median(values: Iterable[float | None]) -> float | None:
    values = _present(values)
    return median(values) if values else None


def _mean(values: Iterable[float | None]) -> float | None:
    values = _present(values)
    return statistics.fmean(values) if values else None


def _min(values: Iterable[float | None]) -> float | None:
    values = _present(values)
    return min(values) if values else None


def _max(values: Iterable[float | None]) -> float | None:
    values = _present(values)
    return max(values) if values else None


SUMMARY_HEADER = ("setting", "rows", "failed", "denoising speedup (median, range over rows)", "faster / slower rows",
                  "rows run busy", "end-to-end speedup (projected)", "peak memory", "PSNR mean / worst dB",
                  "SSIM mean / worst", "warp error base / acc.")


def speed_cell(median: float | None, low: float | None, high: float | None) -> str:
    """"1.42x faster (1.30-1.51x faster)", "1.30x slower (...)": the protocol's own phrases (a
    slowdown is never written as a speedup below 1); the CSV keeps the ratios."""
    if median is None:
        return "-"
    if low is None or high is None or low == high:
        return speed_phrase(median)
    return f"{speed_phrase(median)} ({range_phrase(low, high)})"


def summary_cells(summary: SettingSummary) -> tuple[str, ...]:
    """The summary's printed row (the CSV keeps the numbers)."""
    def pair(a: float | None, b: float | None, digits: int) -> str:
        return "-" if a is None else f"{a:.{digits}f} / {b:.{digits}f}"

    memory = "-" if summary.peak_memory_ratio is None else f"{summary.peak_memory_ratio:.2f}x of baseline"
    if summary.memory_noise_rows == summary.rows > 0:
        # a ratio of two noisy (or tiny) figures would read as a change: the change itself, said to be noise
        change = "" if summary.memory_change_bytes is None else f"{summary.memory_change_bytes / 2**20:+.1f} MiB, "
        memory = f"{change}within noise in every row"
    elif summary.memory_noise_rows:
        memory += f" ({summary.rows - summary.memory_noise_rows} rows; {summary.memory_noise_rows} within noise)"
    def speed(median: float | None, low: float | None, high: float | None) -> str:
        if summary.did_nothing_rows and summary.did_nothing_rows == summary.rows:
            return "did nothing (no claim)"
        cell = speed_cell(median, low, high)
        return cell + (f"; {summary.did_nothing_rows} rows did nothing" if summary.did_nothing_rows else "")

    return (
        summary.setting, str(summary.rows), str(summary.failed),
        speed(summary.denoising_speedup, summary.denoising_low, summary.denoising_high),
        f"{summary.faster_rows} / {summary.slower_rows}",
        f"{summary.busy_rows}: their speedups unreliable" if summary.busy_rows else "none",
        speed(summary.end_to_end_speedup, summary.end_to_end_low, summary.end_to_end_high),
        memory, pair(summary.psnr_mean_db, summary.psnr_worst_db, 1), pair(summary.ssim_mean, summary.ssim_worst, 3),
        pair(summary.warp_error_baseline, summary.warp_error_accelerated, 4),
    )


def busy_sentence(rows: Sequence[BenchRow]) -> str | None:
    """What the report, the app and the command line say of rows timed on a busy machine (None: none)."""
    busy = sum(row.ok and row.busy is not None for row in rows)
    if not busy:
        return None
    return (f"{busy} of {sum(row.ok for row in rows)} rows ran while the machine was busy (their own noise checks "
            "said so): their speedups are unreliable; rerun them on a quiet machine.")


ROW_HEADER = ("setting", "prompt", "seed", "denoising speedup (interval)", "verdict", "PSNR mean / worst dB",
              "SSIM mean", "machine")


def row_cells(row: BenchRow) -> tuple[str, ...]:
    """One comparison of a benchmark as the report and the app list it: per-prompt speed and fidelity,
    and whether its machine was busy."""
    speed = "-" if row.denoising is None else speed_cell(row.denoising.median, row.denoising.low, row.denoising.high)
    if row.denoising is not None and row.denoising.verdict in (Verdict.DID_NOTHING.value,
                                                               Verdict.TOO_FEW_REPEATS.value):
        speed = f"no claim (measured ratio {row.denoising.median:.2f})"  # noise, never written as a speed
    verdict = "failed" if not row.ok else ("-" if row.denoising is None else row.denoising.verdict)
    psnr = "-" if row.psnr_mean_db is None else f"{row.psnr_mean_db:.2f} / {row.psnr_worst_db:.2f}"
    ssim = "-" if row.ssim_mean is None else f"{row.ssim_mean:.4f}"
    machine = row.host + (" · busy: timing unreliable" if row.busy else "")
    return (row.setting, row.prompt, str(row.seed), speed, verdict, psnr, ssim, machine)


def format_summary(summaries: Sequence[SettingSummary]) -> str:
    table = [SUMMARY_HEADER] + [summary_cells(s) for s in summaries]
    widths = [max(len(row[i]) for row in table) for i in range(len(SUMMARY_HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_summary_csv(summaries: Sequence[SettingSummary], plan: BenchPlan, path: Path) -> Path:
    names = [f.name for f in fields(SettingSummary) if f.name != "values"]
    axes = [name for axis in plan.sweep.axes for name in axis]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(names + axes)
        for summary in summaries:
            writer.writerow([_csv_value(getattr(summary, name)) for name in names]
                            + [_csv_value(summary.values.get(name)) for name in axes])
    return path


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return value


def first_repeat(items: Iterable[Any]) -> Any:
    """The first item that came before (None if each is new)."""
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def read_prompts(source: str, limit: int | None = None) -> tuple[str, ...]:
    """Prompts from a text file (one a line, ``#`` comments) or a shipped prompt set's name."""

    path = Path(source)
    if path.is_file():
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip() and not line.strip().startswith("#")]
    else:
        try:
            prompts = load_prompts(source)
        except KeyError as error:
            raise RequestError(f"--prompts {source!r} is neither a file nor a prompt set ({error.args[0]})",
                               "prompts") from None
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise RequestError(f"--limit must be a whole number of at least 1, got {limit!r}", "limit")
        prompts = prompts[:limit]
    if not prompts:
        raise RequestError(f"no prompts in {source!r}", "prompts")
    twice = first_repeat(prompts)
    if twice is not None:
        raise RequestError(f"the prompt {twice[:80]!r} is listed twice in {source}", "prompts")
    return tuple(prompts)


MAX_SEEDS = 1000


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0,1,2" or a range "0-3" -> seeds (at most :data:`MAX_SEEDS`, each once)."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        first, sep, last = part.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise RequestError(f"seeds must be whole numbers like 0,1,2 or 0-3, got {part!r}", "seeds")
        if sep and int(last) < int(first):
            raise RequestError(f"seed range {part} runs backwards: write {last}-{first}", "seeds")
        if (int(last) - int(first) + 1 if sep else 1) + len(seeds) > MAX_SEEDS:
            raise RequestError(f"at most {MAX_SEEDS} seeds, got more with {part}", "seeds")
        seeds += range(int(first), int(last) + 1) if sep else [int(first)]
    if not seeds:
        raise RequestError("give at least one seed", "seeds")
    twice = first_repeat(seeds)
    if twice is not None:
        raise RequestError(f"seed {twice} is given twice", "seeds")
    return tuple(seeds)


# The app's Benchmark form: which of its fields a plan's error belongs to.
FORM_FIELDS = {"preset": "bench_preset", "prompts": "bench_prompts", "prompt": "bench_prompts", "seeds": "bench_seeds",
               "sweep": "bench_sweep"}


def plan_from_form(preset: Any, prompts: Any, seeds: Any, sweep_text: Any, origin: str = "the sweep") -> BenchPlan:
    """A plan from the app's Benchmark form (prompts one a line, seeds "0,1", the sweep's YAML);
    errors name the form's field. Its requests are checked by :meth:`BenchPlan.check`."""

    lines = text("prompts", prompts, "bench_prompts", limit=FORM_TEXT_CHARS).splitlines()
    chosen = tuple(line.strip() for line in lines if line.strip())
    if not chosen:
        raise RequestError("prompts is empty: one prompt a line", "bench_prompts")
    try:
        seed_list = parse_seeds(text("seeds", seeds, "bench_seeds"))
        sweep = parse_sweep(text("sweep", sweep_text, "bench_sweep", limit=FORM_TEXT_CHARS), origin=origin)
        return BenchPlan(preset=preset, prompts=chosen, seeds=seed_list, sweep=sweep)
    except RequestError as error:
        raise RequestError(str(error), FORM_FIELDS.get(error.field, error.field)) from None
