"""Benchmarks: the smoke sweep end to end (rows, summary, plots, report), a killed run resumed, the
same figures on Ray, and groups that raise retried then recorded."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vdtome import cli
from vdtome.bench.report import pareto_front, write_report
from vdtome.bench.runner import (
    DETERMINISTIC_COLUMNS,
    ROW_HEADER,
    SUMMARY_HEADER,
    BenchPlan,
    BenchRow,
    BenchWorker,
    Group,
    RowsFile,
    Speed,
    parse_seeds,
    read_prompts,
    run_bench,
    run_serial,
    summarise,
    summary_cells,
)
from vdtome.bench.sweep import load_sweep, parse_sweep
from vdtome.core.validation import RequestError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a red fox running through snow", "waves crashing on a rocky shore at sunset")
SMOKE_ROWS = 2 * 4  # two prompts x the smoke sweep's four settings


def smoke_plan() -> BenchPlan:
    return BenchPlan("tiny-wan", PROMPTS, (0,), load_sweep("smoke"))


def bench_command(out: Path) -> list[str]:
    prompts = out.parent / "prompts.txt"
    prompts.write_text("# two prompts\n" + "\n".join(PROMPTS) + "\n")
    return [sys.executable, "-m", "vdtome", "bench", "--preset", "tiny-wan", "--prompts", str(prompts),
            "--sweep", "smoke", "--seeds", "0", "--out", str(out)]


def bench_env() -> dict[str, str]:
    # Two torch threads, as the Ray actor below: float reductions then split the same way.
    return os.environ | {"OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}


def deterministic_summary(folder: Path) -> list[dict[str, str]]:
    with (folder / "summary.csv").open() as handle:
        return [{name: row[name] for name in DETERMINISTIC_COLUMNS} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("serial") / "bench"
    run = subprocess.run(bench_command(out), cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout


@pytest.mark.slow
def test_smoke_sweep_writes_rows_summary_plots_and_report(uninterrupted):
    out, stdout = uninterrupted
    rows = RowsFile(out / "rows.jsonl").read()
    assert len(rows) == SMOKE_ROWS and all(row.ok for row in rows)
    assert {(row.prompt, row.seed) for row in rows} == {(p, 0) for p in PROMPTS}
    for row in rows:  # every figure of the comparison, and where it ran
        assert row.denoising.median > 0 and row.end_to_end.median > 0 and row.psnr_mean_db > 20
        assert row.result["schema_version"] == 3 and row.result["timing"]["calls"]
        assert row.environment["torch_num_threads"] == 2 and row.result["settings"]["rounds"] == 3
    stacked = [row for row in rows if "+" in row.setting]
    assert stacked and {e["method"] for e in stacked[0].evidence} == {"tome", "first_block_cache"}
    # The baseline video of a (prompt, seed) is made once: every later setting reused it.
    reused = [row.result["baseline_reused"] for row in rows if row.prompt == PROMPTS[0]]
    assert reused == [False, True, True, True]

    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["setting"] for r in summary] == [s.label for s in load_sweep("smoke").settings]
    assert all(r["rows"] == "2" and r["failed"] == "0" and float(r["denoising_speedup"]) > 0 for r in summary)
    assert "ratio" in summary[0] and summary[0]["ratio"] == "0.25"
    assert "denoising speedup" in stdout and "tome ratio 0.5 stride 1x2x2 + first_block_cache" in stdout
    assert "8 of 8 rows (0 from an earlier run, 8 now; 0 failed)" in stdout

    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["axis-ratio.png", "distributions.png", "pareto.png", "prompt-length.png"]
    assert all((out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in plots)
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4  # self-contained: the plots are inside
    assert "src='http" not in report and 'src="http' not in report and "<link" not in report
    assert "Pareto front" in report and PROMPTS[1] in report


@pytest.mark.slow
def test_a_killed_run_resumes_with_only_the_missing_rows(uninterrupted, tmp_path, capsys):
    out = tmp_path / "bench"
    command = bench_command(out)
    process = subprocess.Popen(command, cwd=ROOT, env=bench_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    rows_file = out / "rows.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if rows_file.exists() and rows_file.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = RowsFile(rows_file).read()
    assert 3 <= len(before) < SMOKE_ROWS, "the run must be killed mid-way for this test to mean anything"
    with rows_file.open("a") as handle:  # a row torn by the kill, mid-write
        handle.write('{"key": "torn row", "prompt": "a red')

    rerun = subprocess.run(command, cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (f"8 of 8 rows ({len(before)} from an earlier run, {SMOKE_ROWS - len(before)} now; 0 failed)"
            in rerun.stdout)
    after = RowsFile(rows_file).read()
    assert [row.key for row in after[:len(before)]] == [row.key for row in before]  # nothing rewritten
    assert len(after) == SMOKE_ROWS and len({row.key for row in after}) == SMOKE_ROWS
    assert "torn row" not in rows_file.read_text()
    assert deterministic_summary(out) == deterministic_summary(uninterrupted[0])

    assert cli.main(command[3:]) == 0  # in-process: a finished run runs nothing again
    assert "(8 from an earlier run, 0 now; 0 failed)" in capsys.readouterr().out
    assert len(RowsFile(rows_file).read()) == SMOKE_ROWS


# ---- retries: groups that raise -----------------------------------------------------------------


class FlakyWorker(BenchWorker):
    """Yields the first setting's row of each group, then raises for the prompts in ``failing``
    (every time: a retry, which skips the finished first row, raises at once); other groups run in full."""

    failing = (PROMPTS[1],)

    def run_group(self, plan, group, skip=frozenset(), progress=None, cancel=None):
        for row in super().run_group(plan, group, skip, progress, cancel):
            if row.setting_key != plan.sweep.settings[0].key and group.prompt in self.failing:
                raise RuntimeError(f"injected failure on {group.prompt!r}")
            yield row


class RecordingWorker(BenchWorker):
    """No model: makes rows from the plan alone, counting how often each group ran."""

    def __init__(self, failing=(), out_of_memory=()):
        self.failing, self.out_of_memory, self.calls = failing, out_of_memory, []

    def run_group(self, plan, group, skip=frozenset(), progress=None, cancel=None):
        self.calls.append(group)
        for index, setting in enumerate(plan.sweep.settings):
            key = plan.row_key(group, setting)
            if key in skip:
                continue
            if index == 2 and group.prompt in self.failing:
                raise RuntimeError("boom")
            if index == 1 and group.prompt in self.out_of_memory:  # a comparison that failed, not raised
                yield BenchRow.failed(key, plan.preset, group, setting, "out of memory during the baseline run")
                continue
            yield BenchRow(key=key, preset=plan.preset, prompt=group.prompt, seed=group.seed, setting=setting.label,
                           setting_key=setting.key, values=dict(setting.values), ok=True,
                           denoising=Speed(1.0 + index, None, None, "too few repeats"), psnr_mean_db=40.0 - index)


def test_a_group_that_raises_is_retried_then_recorded_and_a_rerun_tries_it_again(tmp_path):
    plan = BenchPlan("tiny-wan", ("one", "two", "three"), (0, 1), load_sweep("smoke"))
    worker = RecordingWorker(failing=("two",))
    outcome = run_bench(plan, tmp_path, runner=lambda todo: run_serial(plan, todo, worker), retries=2,
                        show_progress=False, report=None)
    failing = [Group("two", 0), Group("two", 1)]
    assert [g for g in worker.calls if g.prompt == "two"] == failing * 3  # first try + 2 retries each
    rows = RowsFile(tmp_path / "rows.jsonl").read()
    assert len(rows) == len(plan.keys())  # every row is in the file, finished or failed
    bad = [row for row in rows if not row.ok]
    assert len(bad) == 2 * 2 and {row.prompt for row in bad} == {"two"}
    assert all(row.error == "RuntimeError: boom" and row.attempts == 3 for row in bad)
    good_two = [row for row in rows if row.ok and row.prompt == "two"]
    assert len(good_two) == 2 * 2  # rows before the failure were kept, not rerun (each written once)
    assert [s.failed for s in outcome.summaries] == [0, 0, 2, 2]

    healed = RecordingWorker()
    outcome = run_bench(plan, tmp_path, runner=lambda todo: run_serial(plan, todo, healed), show_progress=False,
                        report=None)
    assert healed.calls == failing and outcome.ran == 4 and outcome.skipped == len(plan.keys()) - 4
    assert all(row.ok for row in outcome.rows) and [s.failed for s in outcome.summaries] == [0, 0, 0, 0]


def test_a_failed_row_keeps_its_own_error_when_its_group_later_raises(tmp_path):
    plan = BenchPlan("tiny-wan", ("one",), (0,), load_sweep("smoke"))
    worker = RecordingWorker(failing=("one",), out_of_memory=("one",))
    run_bench(plan, tmp_path, runner=lambda todo: run_serial(plan, todo, worker), retries=1, show_progress=False,
              report=None)
    rows = RowsFile(tmp_path / "rows.jsonl").read()
    assert len(rows) == 4 and len({row.key for row in rows}) == 4  # each row written once, retries included
    assert [row.error for row in rows] == [None, "out of memory during the baseline run", "RuntimeError: boom",
                                           "RuntimeError: boom"]


@pytest.mark.slow
def test_ray_gives_the_serial_figures_and_retries_then_records_a_failing_group(uninterrupted, tmp_path):
    """One Ray sweep whose second prompt fails after its first row: every row that ran has the
    serial run's figures, the failing group is retried once, then recorded failed."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors get this module's workers
    from vdtome.bench.ray_runner import RayRunner

    plan = smoke_plan()
    try:
        flaky = RayRunner(plan, init={"num_cpus": 2}, worker_class=FlakyWorker)
        assert len(flaky.actors) == 1 and flaky.description == "1 Ray actor (2 CPUs each)"
        run_bench(plan, tmp_path / "flaky", runner=flaky, retries=1, show_progress=False, report=write_report)
        rows = RowsFile(tmp_path / "flaky" / "rows.jsonl").read()
        assert len(rows) == SMOKE_ROWS and (tmp_path / "flaky" / "report.html").exists()
        failed = [row for row in rows if not row.ok]
        assert len(failed) == 3 and {row.prompt for row in failed} == {PROMPTS[1]}
        assert all(row.attempts == 2 and row.error.startswith("RuntimeError: injected failure") for row in failed)
        assert sum(row.ok and row.prompt == PROMPTS[1] for row in rows) == 1  # its first row, written once
        serial = {row.key: row for row in RowsFile(uninterrupted[0] / "rows.jsonl").read()}
        ran = [row for row in rows if row.ok]
        assert len(ran) == 5 and sum(row.prompt == PROMPTS[0] for row in ran) == 4
        for row in ran:  # the same videos, figures and evidence as the serial run's
            same = serial[row.key]
            assert (row.psnr_mean_db, row.ssim_mean, row.evidence) == (same.psnr_mean_db, same.ssim_mean, same.evidence)
        flaky.shutdown()
        with pytest.raises(ValueError, match="3 workers x 1 CPUs need 3 CPUs; the cluster has 2"):
            RayRunner(plan, workers=3)  # Ray would wait forever for the third actor's CPU
    finally:
        ray.shutdown()


# ---- pieces --------------------------------------------------------------------------------------


def test_rows_file_cuts_a_torn_line_before_appending(tmp_path):
    rows_file = RowsFile(tmp_path / "rows.jsonl")
    plan = smoke_plan()
    group, setting = Group(PROMPTS[0], 0), plan.sweep.settings[0]
    row = BenchRow.failed(plan.row_key(group, setting), plan.preset, group, setting, "x")
    rows_file.append(row)
    with rows_file.path.open("a") as handle:
        handle.write('{"key": "half a ro')
    assert [r.key for r in rows_file.read()] == [row.key]
    rows_file.append(row)
    assert rows_file.path.read_text().count("\n") == 2 and "half a ro" not in rows_file.path.read_text()
    assert json.loads(rows_file.path.read_text().splitlines()[1])["error"] == "x"


def test_row_keys_follow_everything_the_figures_depend_on():
    plan = smoke_plan()
    group, setting = Group(PROMPTS[0], 0), plan.sweep.settings[0]
    key = plan.row_key(group, setting)
    assert key != plan.row_key(Group(PROMPTS[0], 1), setting)
    assert key != BenchPlan("tiny-wan", PROMPTS, (0,), plan.sweep, rounds=5).row_key(group, setting)
    assert key != BenchPlan("tiny-wan22", PROMPTS, (0,), plan.sweep).row_key(group, setting)
    other = parse_sweep("stacks: [{tome: {ratio: 0.25, matching: per_sample}}]").settings[0]
    assert other.label == setting.label and plan.row_key(group, other) != key  # same label, other config


def test_pareto_front_and_summary_of_failed_rows():
    plan = BenchPlan("tiny-wan", ("p",), (0,), parse_sweep("stacks: [{tome: {ratio: [0.1, 0.2, 0.3]}}]"))
    rows = []
    for setting, (speed, psnr) in zip(plan.sweep.settings, [(1.2, 40.0), (1.1, 35.0), (1.5, 30.0)]):
        rows.append(BenchRow(key=plan.row_key(Group("p", 0), setting), preset="tiny-wan", prompt="p", seed=0,
                             setting=setting.label, setting_key=setting.key, values={}, ok=True,
                             denoising=Speed(speed, None, None, "faster"), psnr_mean_db=psnr))
    summaries = summarise(rows, plan)
    assert [s.setting for s in pareto_front(summaries)] == [summaries[2].setting, summaries[0].setting]
    assert summaries[0].faster_rows == 1 and summaries[0].psnr_worst_db is None


def test_plan_checks_every_request_before_running():
    plan = BenchPlan("tiny-wan", PROMPTS, (0,), parse_sweep("request: {height: 65}\nstacks: [{tome: {ratio: 0.5}}]"))
    with pytest.raises(RequestError, match="height"):
        plan.check()
    with pytest.raises(RequestError, match="seeds must differ"):
        BenchPlan("tiny-wan", PROMPTS, (0, 0), plan.sweep)
    assert parse_seeds("0,2-4") == (0, 2, 3, 4)
    for text, message in (("1.5", "seeds must be whole numbers"), ("0,3-1", "runs backwards: write 1-3"),
                          ("0-100000000", "at most 1000 seeds"), ("1,0-2", "seed 1 is given twice")):
        with pytest.raises(RequestError, match=message):
            parse_seeds(text)
    unavailable = BenchPlan("tiny-wan", PROMPTS, (0,), parse_sweep("stacks: [{pyramid_attention_broadcast: {}}]"))
    with pytest.raises(RequestError, match="pyramid attention broadcast is unavailable for this model"):
        unavailable.check()  # before any weights load, not as a failed row per prompt
    with pytest.raises(RequestError, match="listed twice"):
        BenchPlan("tiny-wan", ("a", "b", "a"), (0,), plan.sweep)
    assert read_prompts("shapes", limit=2)[0].startswith("a ")
    with pytest.raises(RequestError, match="neither a file nor a prompt set"):
        read_prompts("no-such-set")


def test_ray_flags_that_cannot_work_are_refused_before_ray_starts():
    from vdtome.bench.ray_runner import RayRunner

    with pytest.raises(ValueError, match="Ray Client .* cannot stream"):
        RayRunner(smoke_plan(), address="ray://head:10001")
    with pytest.raises(ValueError, match="--ray-workers must be at least 1, got 0"):
        RayRunner(smoke_plan(), workers=0)
    with pytest.raises(ValueError, match="--ray-cpus must be above 0"):
        RayRunner(smoke_plan(), cpus_per_worker=-1)


def test_bad_command_line_input_is_refused_naming_it(tmp_path, capsys):
    code = cli.main(["bench", "--preset", "tiny-wan", "--prompts", "default", "--sweep", "nope", "--out", str(tmp_path)])
    assert code == 2 and "no sweep file 'nope'; shipped sweeps:" in capsys.readouterr().err
    assert not (tmp_path / "rows.jsonl").exists()


def _memory_rows(plan, figures, busy=None):
    from vdtome.bench.runner import Group

    setting = plan.sweep.settings[0]
    return [BenchRow(key=plan.row_key(Group(prompt, 0), setting), preset="tiny-wan", prompt=prompt, seed=0,
                     setting=setting.label, setting_key=setting.key, values={}, ok=True,
                     denoising=Speed(1.3, 1.1, 1.5, "faster"), psnr_mean_db=30.0 + index, psnr_worst_db=25.0 + index,
                     memory_kind=f"{figures.kind}, {figures.scope}", baseline_peak_bytes=figures.baseline,
                     accelerated_peak_bytes=figures.accelerated, memory_within_noise=figures.within_noise,
                     memory_ratio=figures.ratio, busy=busy if index == 0 else None, host="h")
            for index, prompt in enumerate(("p", "q"))]


def test_no_memory_ratio_is_printed_from_an_rss_growth_below_the_floor_and_busy_rows_are_flagged(tmp_path):
    """The summary (the Benchmark tab, `python -m vdtome bench` and the report share its cells): an RSS
    growth of a few MiB is an absolute change within noise, a CUDA peak is a ratio; rows timed on a
    busy machine are counted in the summary and marked among every row, with their own fidelity."""
    from vdtome.bench.report import write_report
    from vdtome.bench.runner import busy_sentence, format_summary, row_cells
    from vdtome.measure.protocol import CUDA_PEAK, RSS_GROWTH, MemoryFigures

    plan = BenchPlan("tiny-wan", ("p", "q"), (0,), parse_sweep("stacks: [{mag_cache: {threshold: 0.06}}]"))
    tiny = MemoryFigures("denoising", RSS_GROWTH, (5_373_952, 5_369_856), (4096, 8192))
    rows = _memory_rows(plan, tiny, busy="other processes kept 1.10 of the 2 cores busy")
    summary = summarise(rows, plan)[0]
    cells = dict(zip(SUMMARY_HEADER, summary_cells(summary)))
    assert cells["peak memory"] == "-5.1 MiB, within noise in every row"
    assert "x of baseline" not in format_summary([summary])
    assert cells["rows run busy"] == "1: their speedups unreliable"
    assert busy_sentence(rows).startswith("1 of 2 rows ran while the machine was busy")
    every = [dict(zip(ROW_HEADER, row_cells(row))) for row in rows]
    assert [row["PSNR mean / worst dB"] for row in every] == ["30.00 / 25.00", "31.00 / 26.00"]
    assert every[0]["machine"] == "h · busy: timing unreliable" and every[1]["machine"] == "h"
    report = (tmp_path / "report.html")
    write_report(plan, rows, [summary], tmp_path)
    html = report.read_text()
    assert "x of baseline" not in html and "1 of 2 rows ran while the machine was busy" in html
    assert "busy: timing unreliable" in html and "31.00 / 26.00" in html
    exact = MemoryFigures("denoising", CUDA_PEAK, (400 * 2**20,), (300 * 2**20,))
    summary = summarise(_memory_rows(plan, exact), plan)[0]
    assert dict(zip(SUMMARY_HEADER, summary_cells(summary)))["peak memory"] == "0.75x of baseline"
