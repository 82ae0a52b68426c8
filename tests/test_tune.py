"""The tuner (``python -m vdtome tune``, vdtome.bench.tune) and its recipe (vdtome.apply, ``compare
--recipe``), on the tiny random Wan: a study that searches a method registered from outside the
package, survives a kill mid-trial without repeating a finished trial, and writes a recipe that
applies and removes bitwise; recipes that are stale, corrupt or made for other settings are refused
naming the field."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import vdtome
from vdtome import cli
from vdtome.bench.tune import Tuner
from vdtome.bench.tune_plan import Floor, Quality, TunePlan
from vdtome.core.validation import RequestError
from vdtome.engine.engine import ComparisonEngine
from vdtome.methods.recipe import Recipe, load_recipe
from vdtome.offline import tiny

from test_method_plugin import registered  # noqa: F401 (a method registered the way a plug-in is)

pytest.importorskip("optuna")

QUICK = dict(preset="tiny-wan", frames=9, height=64, width=64, steps=4, tuning_prompts=1, validation_prompts=1,
             rounds=2, finalists=1)
ROOT = Path(__file__).resolve().parent.parent


def quick_plan(**changes) -> TunePlan:
    return TunePlan(**({"floors": (Floor.parse("psnr=20"),), "trials": 3} | QUICK | changes))


def wan_recipe(**changes) -> Recipe:
    values = {"ratio": 0.4, "stride_t": 1, "stride_y": 2, "stride_x": 2, "strategy": "bipartite",
              "blocks": "all blocks", "targets": ["self-attention"], "reuse_steps": 1, "whole_steps": 1,
              "matching": "shared", "random_destinations": True, "local_window": True, "ratio_schedule": ""}
    fields = dict(preset="tiny-wan", pipeline_class="WanPipeline", frames=9, height=64, width=64, steps=4,
                  guidance=5.0, stack=(("tome", values), ("first_block_cache", {"first_block_cache_threshold": 0.3})))
    return Recipe(**(fields | changes))


def generate(pipe) -> torch.Tensor:
    return pipe("a fox in the snow", num_frames=9, height=64, width=64, num_inference_steps=4,
                generator=torch.Generator().manual_seed(0), output_type="pt").frames


# ---- the recipe ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [("first_block_cache", {"first_block_cache_threshold": 0.3}),
                                   ("mag_cache", {"mag_cache_threshold": 0.5, "mag_cache_max_skip_steps": 2,
                                                  "mag_cache_retention_ratio": 0.0})])
def test_a_recipe_applies_acts_and_removes_bitwise(tmp_path, cache):
    """Beside token merging, a cache as is, and one that calibrates for its calls (MagCache: one
    plain run at the recipe's settings first, as the engine does)."""
    path = wan_recipe(stack=(wan_recipe().stack[0], cache)).save(tmp_path / "recipe.json")
    pipe = tiny.tiny_wan_pipeline()
    baseline = generate(pipe)
    stack = vdtome.apply(pipe, path)
    try:
        assert stack.recipe.call_settings()["num_inference_steps"] == 4
        accelerated = generate(pipe)
        reports = stack.reports()
    finally:
        stack.remove()
    assert all(report.acted for report in reports)  # tokens merged and blocks skipped
    assert not torch.equal(accelerated, baseline)
    assert torch.equal(generate(pipe), baseline)  # removed: the pipeline exactly as before
    saved = json.loads(path.read_text())
    assert saved["stack"][0]["config"]["whole_steps"] == 1  # every field, as config too, for people


@pytest.mark.parametrize("edit, field, words", [
    (lambda d: "{not json", "recipe", "could not be read as JSON"),
    (lambda d: d | {"kind": "sweep"}, "kind", "not a vdtome recipe"),
    (lambda d: d | {"format": 0}, "format", "format 0"),
    (lambda d: d | {"steps": "four"}, "steps", "whole number"),
    (lambda d: d | {"stack": []}, "stack", "non-empty list"),
    (lambda d: d | {"stack": [{"method": "teleport", "fields": {}}]}, "stack[0].method", "unknown method 'teleport'"),
    (lambda d: d | {"stack": [{"method": "tome", "fields": {"ratio": 0.4, "speed": 9}}]}, "stack[0].speed",
     "no field 'speed'"),
    (lambda d: d | {"stack": [{"method": "tome", "fields": {"ratio": 0.99}}]}, "stack[0].ratio",
     "merge ratio must be between 0 and 0.95"),
])
def test_a_corrupt_or_stale_recipe_is_refused_naming_the_field(tmp_path, edit, field, words):
    data = wan_recipe().to_dict()
    edited = edit(data)
    path = tmp_path / "recipe.json"
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(RequestError, match=words.replace("(", r"\(")) as refused:
        load_recipe(path)
    assert refused.value.field == field


def test_a_recipe_made_for_other_settings_or_another_pipeline_is_refused(tmp_path, capsys):
    recipe = wan_recipe()
    path = recipe.save(tmp_path / "recipe.json")
    with pytest.raises(RequestError, match=r"tuned at other settings: steps 8 \(tuned at 4\)") as refused:
        recipe.check_settings("tiny-wan", steps=8)
    assert refused.value.field == "steps"
    with pytest.raises(RequestError, match="tuned on tiny-wan, not tiny-cogvideox"):
        recipe.check_settings("tiny-cogvideox")
    with pytest.raises(RequestError, match="this pipeline is a CogVideoXPipeline") as refused:
        vdtome.apply(tiny.tiny_cogvideox_pipeline(), path)
    assert refused.value.field == "pipeline_class"
    # The command line: the recipe's preset and settings by default; another size is refused before any work.
    assert cli.main(["compare", "--recipe", str(path), "--prompt", "a fox", "--frames", "13"]) == 2
    assert "frames 13 (tuned at 9)" in capsys.readouterr().err
    assert cli.main(["compare", "--recipe", str(path), "--prompt", "a fox", "--ratio", "0.2"]) == 2
    assert "--recipe is the whole stack" in capsys.readouterr().err


def test_a_recipe_calls_the_pipeline_as_the_comparison_did():
    """LTX conditions on the frame rate: the recipe's call passes the rate the comparison passed
    (the preset's video rate), so a calibration and a user's call see the tuned call."""
    from vdtome.core.presets import get_preset

    ltx = wan_recipe(preset="tiny-ltx", pipeline_class="LTXPipeline").call_settings()
    assert ltx["frame_rate"] == get_preset("tiny-ltx").fps
    assert "frame_rate" not in wan_recipe().call_settings()


def test_compare_runs_a_recipe_at_its_own_settings(tmp_path, capsys):
    path = wan_recipe().save(tmp_path / "recipe.json")
    out = tmp_path / "run"
    assert cli.main(["compare", "--recipe", str(path), "--prompt", "a fox", "--rounds", "1", "--out", str(out),
                     "--device", "cpu"]) == 0
    result = json.loads(next(out.glob("*result.json")).read_text())
    assert [m["method"] for m in result["methods"]] == ["tome", "first_block_cache"]
    assert result["methods"][0]["config"]["ratio"] == 0.4 and result["methods"][0]["config"]["whole_steps"] == 1
    assert (result["settings"]["frames"], result["settings"]["steps"]) == (9, 4)


# ---- the tune ----------------------------------------------------------------------------------------


def test_a_plan_refuses_what_it_cannot_tune():
    with pytest.raises(RequestError, match="the judge reads the shapes models' prompts") as refused:
        quick_plan(floors=(Floor.parse("judge"),))
    assert refused.value.field == "floor"
    with pytest.raises(RequestError, match="give a budget"):
        quick_plan(trials=None)
    with pytest.raises(RequestError, match="has 42 prompts; 40 tuning \\+ 6 validation prompts need 46"):
        quick_plan(tuning_prompts=40, validation_prompts=6)
    with pytest.raises(RequestError, match="frames"):
        quick_plan(frames=10)  # refused as the app refuses it, never snapped
    for text, words in (("psnr", "give its value"), ("speed=3", "one of psnr"), ("ssim=2", "between -1 and 1"),
                        ("judge=1.5", "whole number of clips")):
        with pytest.raises(RequestError, match=words):
            Floor.parse(text)


def test_a_method_registered_outside_the_package_is_tuned(registered, tmp_path):  # noqa: F811
    engine = ComparisonEngine(device="cpu", output_root=tmp_path / "runs", noise_dir=None)
    plan = quick_plan(methods=(registered.name,), trials=3, floors=(Floor.parse("psnr=30"),))
    outcome = Tuner(plan, tmp_path / "tune", engine=engine).run()
    drawn = [dict(record.stack)[registered.name]["count_calls_every"] for record in outcome.trials]
    assert len(outcome.trials) == 3 and all(1 <= value <= 5 for value in drawn) and len(set(drawn)) == 3, drawn
    assert all(record.quality.psnr_mean == 100.0 for record in outcome.trials)  # it changes no output
    # Identical output, no faster: never a recipe (speed must beat the baseline), and the tune says so.
    assert "count_calls" in outcome.message and (tmp_path / "tune" / "report.html").is_file()
    rows = (tmp_path / "tune" / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and "count_calls_every=" in rows[1]


def _tune_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vdtome", "tune", "--preset", "tiny-wan", "--floor", "psnr=12", "--trials", "5",
            "--out", str(out), "--frames", "9", "--height", "64", "--width", "64", "--steps", "8",
            "--tuning-prompts", "2", "--validation-prompts", "1", "--finalists", "1", "--rounds", "2",
            "--device", "cpu", *extra]


def _finished(db: Path) -> tuple[list[tuple[int, str]], int]:
    """(number, params) of the trials that ran to the end (a refused stack never runs), and how many
    are RUNNING."""
    with sqlite3.connect(db) as connection:
        done = connection.execute(
            "SELECT t.number, group_concat(p.param_name || '=' || p.param_value, ',') FROM trials t JOIN "
            "trial_params p ON p.trial_id = t.trial_id WHERE t.state = 'COMPLETE' AND EXISTS (SELECT 1 FROM "
            "trial_user_attributes a WHERE a.trial_id = t.trial_id AND a.key = 'speedup') GROUP BY t.trial_id"
        ).fetchall()
        running = connection.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]
    return done, running


def test_a_tune_killed_mid_trial_resumes_without_repeating_a_finished_trial(tmp_path):
    out = tmp_path / "tune"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_tune_command(out), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    started = 0
    for line in process.stderr:  # "trial N: <stack>" starts a trial, "trial N: 1.23x, ..." ends it
        if " trial " in line and "x, PSNR" not in line and "validating" not in line:
            started += 1
            if started == 3:  # two finished (or stopped early), the third under way
                time.sleep(0.3)
                process.send_signal(signal.SIGKILL)
                break
    process.wait(timeout=120)
    done_before, running = _finished(out / "study.db")
    assert running == 1 and len(done_before) == 2, (done_before, running)  # killed mid-trial
    resumed = subprocess.run(_tune_command(out, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode in (0, 1), resumed.stderr[-2000:]
    done, running = _finished(out / "study.db")
    assert running == 0 and len(done) == 5  # the budget an unkilled run of --trials 5 finishes
    assert set(done_before) <= set(done)  # the finished trials kept as they were
    assert len({params for _, params in done}) == 5  # none repeated
    assert (out / "trials.csv").read_text().count("\n") == 6 and (out / "report.html").is_file()
    # A resume with other settings is refused, naming them; a second tune into the folder too.
    plan = TunePlan(preset="tiny-wan", floors=(Floor.parse("psnr=12"),), trials=5, frames=9, height=64, width=64,
                    steps=6, tuning_prompts=2, validation_prompts=1, finalists=1, rounds=2)
    with pytest.raises(RequestError, match="made with other settings: steps") as refused:
        Tuner(plan, out).run(resume=True)
    assert refused.value.field == "steps"
    with pytest.raises(RequestError, match="holds a tune already: --resume continues it"):
        Tuner(plan, out).run()


def test_a_cancelled_tune_stops_within_a_step_and_keeps_its_finished_trials(tmp_path):
    import threading

    engine = ComparisonEngine(device="cpu", output_root=tmp_path / "runs", noise_dir=None)
    cancel = threading.Event()
    steps_after_cancel = []

    def progress(event):
        if event.finished is not None:
            cancel.set()  # as Cancel pressed while the next trial starts

    original = engine.run

    def counting_run(request, *args, **kwargs):
        def step_seen(event):
            if cancel.is_set():
                steps_after_cancel.append(event.label)
        return original(request, *args, progress=step_seen, **{k: v for k, v in kwargs.items() if k != "progress"})

    engine.run = counting_run
    outcome = Tuner(quick_plan(trials=5), tmp_path / "tune", engine=engine, progress=progress, cancel=cancel).run()
    assert outcome.cancelled and len(outcome.trials) == 1 and outcome.chosen is None
    assert "cancelled: 1 finished trials kept" in outcome.message
    assert len(steps_after_cancel) <= 1  # stopped at the first step after the cancel
    assert (tmp_path / "tune" / "trials.csv").read_text().count("\n") == 2


def test_the_shipped_recipes_load_by_name_on_their_preset():
    from vdtome.core.presets import get_preset
    from vdtome.methods.recipe import shipped_recipes

    assert {"tiny-shapes-128", "tiny-shapes-128-tome"} <= set(shipped_recipes())
    for name in shipped_recipes():
        recipe = load_recipe(name)
        preset = get_preset(recipe.preset)
        assert recipe.label() == name and recipe.pipeline_class == preset.pipeline_class
        recipe.check_settings(preset.name, frames=preset.num_frames, height=preset.height, width=preset.width,
                              steps=preset.num_inference_steps, guidance=preset.guidance_scale)  # the preset's own
        assert recipe.validation["passes_floors"] and recipe.validation["speedup_median"] > 1
    assert "tome" in {name for name, _ in load_recipe("tiny-shapes-128-tome").stack}


def test_the_form_lists_the_shipped_recipes_of_its_preset_with_their_figures_and_timing():
    from vdtome.core.presets import get_preset
    from vdtome.web.tune_tab import shipped_recipe_note

    magcache = load_recipe("tiny-shapes-128")
    assert not magcache.steps_alike()  # a skipped step costs next to nothing: whole calls every round
    merging_only = load_recipe({**magcache.to_dict(), "stack": [{"method": "tome", "fields": {"ratio": 0.3}}]})
    assert merging_only.steps_alike()
    note = shipped_recipe_note(get_preset("tiny-shapes-128"))
    for name in ("tiny-shapes-128", "tiny-shapes-128-tome"):
        recipe = load_recipe(name)
        assert f"**{name}**: {recipe.stack_text()}; {recipe.figures_text()}" in note
        assert f"{recipe.validation['speedup_median']:.2f}x denoising (median of 10 validation prompts)" in note
    assert "runs all 20 steps" in note and "3-step rounds" in note
    assert shipped_recipe_note(get_preset("tiny-shapes")) == ""  # nothing tuned for it


def test_a_finished_tune_resumed_runs_nothing_again_and_writes_the_same_choice(tmp_path):
    engine = ComparisonEngine(device="cpu", output_root=tmp_path / "runs", noise_dir=None)
    plan = quick_plan(trials=2, methods=("first_block_cache",), floors=(Floor.parse("psnr=5"),))
    first = Tuner(plan, tmp_path / "tune", engine=engine).run()
    runs = []
    original = engine.run
    engine.run = lambda *args, **kwargs: runs.append(args) or original(*args, **kwargs)
    again = Tuner(plan, tmp_path / "tune", engine=engine).run(resume=True)
    assert runs == []  # every trial and every validation comparison came from the study and validation.jsonl
    assert [r.number for r in again.trials] == [r.number for r in first.trials]
    assert again.message == first.message
    # Validated on more prompts: only the new prompt's comparison runs; no trial, no old comparison.
    wider = Tuner(replace(plan, validation_prompts=2), tmp_path / "tune", engine=engine).run(resume=True)
    assert [request.prompt for request, *_ in runs] == [plan.prompt_list()[2]]
    assert [r.number for r in wider.trials] == [r.number for r in first.trials]
    assert all(finalist.of == 2 for finalist in wider.finalists)
    # Under a floor no trial meets: chosen again from the kept figures, nothing run, and said so.
    runs.clear()
    strict = replace(plan, validation_prompts=2, floors=(Floor.parse("psnr=99"),))
    again = Tuner(strict, tmp_path / "tune", engine=engine).run(resume=True)
    assert all(request.rounds == plan.rounds for request, *_ in runs)  # validations only (a trial runs 1 round)
    assert again.chosen is None and not any(r.feasible for r in again.trials)
    assert not (tmp_path / "tune" / "recipe.json").exists()  # the earlier choice's recipe is gone with it
    assert "no trial met the floor" in again.message
    runs.clear()
    with pytest.raises(RequestError, match="drawn under the floors psnr=5: a resume may change the floors only") \
            as refused:
        Tuner(replace(strict, trials=3), tmp_path / "tune", engine=engine).run(resume=True)  # more trials: refused
    assert refused.value.field == "floor" and runs == []


def test_a_validation_comparison_that_fails_stops_the_tune_saying_so_and_keeps_its_trials(tmp_path):
    from types import SimpleNamespace

    from vdtome.bench.tune_worker import ValidationFailed

    engine = ComparisonEngine(device="cpu", output_root=tmp_path / "runs", noise_dir=None)
    plan = quick_plan(trials=1, methods=("first_block_cache",), floors=(Floor.parse("psnr=5"),))
    original = engine.run

    def failing_validation(request, *args, **kwargs):
        if request.rounds == plan.rounds:  # a validation comparison (a trial runs one round)
            return SimpleNamespace(ok=False, error="the accelerated video holds NaN values")
        return original(request, *args, **kwargs)

    engine.run = failing_validation
    with pytest.raises(ValidationFailed, match="failed: the accelerated video holds NaN values"):
        Tuner(plan, tmp_path / "tune", engine=engine).run()
    rounds = []  # the comparison works again: --resume goes on from the kept trial, validating only
    engine.run = lambda request, *args, **kwargs: rounds.append(request.rounds) or original(request, *args, **kwargs)
    resumed = Tuner(plan, tmp_path / "tune", engine=engine).run(resume=True)
    assert len(resumed.trials) == 1 and rounds == [plan.rounds]  # one validation comparison, no trial again


def test_a_finalist_under_the_floor_puts_the_trials_it_dominated_back_in_the_walk(tmp_path):
    """The fastest front point falls under the floor on the validation prompts; the trial it
    dominated on the tuning prompts (slower, lower mean PSNR) keeps it there and is chosen before a
    slower front point (the walk that missed MagCache's defaults on tiny-shapes-128)."""
    from vdtome.bench.tune_plan import PromptFigures, TrialRecord

    plan = quick_plan(finalists=3, floors=(Floor.parse("psnr=25"),))
    validated = {"fast": 21.0, "dominated": 31.0, "slow": 40.0}  # each one's PSNR on the validation prompt

    class Trials:
        def validate(self, stack, prompt):
            name = stack[0][1]["which"]
            calls.append(name)
            return PromptFigures(prompt, {"fast": 2.0, "dominated": 1.7, "slow": 1.3}[name], None, None, "faster",
                                 None, validated[name], 0.9, None, None, False)

    def record(number, name, speedup, psnr):
        return TrialRecord(number, (("x", {"which": name}),), name, speedup, Quality((psnr,), (0.9,)), (0.0,), 1.0)

    calls: list[str] = []
    records = [record(0, "fast", 2.0, 36.0), record(1, "dominated", 1.7, 33.0), record(2, "slow", 1.3, 40.0)]
    finalists, closest = Tuner(plan, tmp_path, trials=Trials())._validate(records)
    assert closest is None and calls == ["fast", "dominated"]
    assert [f.passes for f in finalists] == [False, True] and finalists[-1].trial.label == "dominated"


def test_the_judge_floor_counts_lost_clips_not_totals():
    """A clip the accelerated run happens to fix never pays for one it broke."""
    judge, tolerant = Floor.parse("judge"), Floor.parse("judge=1")
    swapped = Quality((30.0,) * 3, (0.9,) * 3, kept=(True, False, True), baseline_kept=(False, True, True))
    assert sum(swapped.kept) == sum(swapped.baseline_kept) and swapped.lost == 1
    assert judge.broken(swapped) and not tolerant.broken(swapped)
    assert "1 lost" in swapped.kept_text()
    gained = Quality((30.0,) * 2, (0.9,) * 2, kept=(True, True), baseline_kept=(False, True))
    assert not judge.broken(gained)


@pytest.mark.slow
def test_a_tune_on_a_ray_cluster_at_host_port_gives_the_figures_of_a_tune_run_here(tmp_path):
    """A cluster started by ``ray start --head`` with token authentication (Ray 2.60 turns it on
    once the machine holds a token), joined by ``tune --ray-address HOST:PORT`` (Ray itself sends no
    token to an explicit address): the trials run on its actor, and the same plan run in this
    process draws the same trials with the same figures. An address where nothing listens is
    refused at once, saying what to do."""
    pytest.importorskip("ray")
    import socket
    import uuid

    import optuna

    from vdtome.bench.tune import trial_records
    from vdtome.bench.tune_worker import RayTrials

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"HOME": str(home), "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_MODE", None)
    ray_cli = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]
    plan = quick_plan(trials=2, methods=("first_block_cache",), floors=(Floor.parse("psnr=5"),))
    command = [sys.executable, "-m", "vdtome", "tune", "--preset", "tiny-wan", "--floor", "psnr=5", "--trials", "2",
               "--methods", "first_block_cache", "--frames", "9", "--height", "64", "--width", "64", "--steps", "4",
               "--tuning-prompts", "1", "--validation-prompts", "1", "--finalists", "1", "--rounds", "2",
               "--device", "cpu", "--out", str(tmp_path / "ray")]
    with pytest.raises(ValueError, match="--ray-address 127.0.0.1:1: nothing accepts a connection there"):
        RayTrials(plan, address="127.0.0.1:1")  # at once (Ray itself retries for minutes)
    subprocess.run(ray_cli + ["start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                              "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        tuned = subprocess.run(command + ["--ray-address", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(ray_cli + ["stop", "--force"], env=env, capture_output=True, timeout=120)
    assert tuned.returncode in (0, 1) and "trials on 1 Ray actor (2 CPUs each)" in tuned.stderr, tuned.stderr[-3000:]
    here = Tuner(plan, tmp_path / "here", engine=ComparisonEngine(device="cpu", output_root=tmp_path / "runs",
                                                                   noise_dir=None)).run()
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / 'ray' / 'study.db'}")
    there = trial_records(study, plan.floors)
    assert [r.stack for r in there] == [r.stack for r in here.trials] and len(there) == 2
    for ray_record, record in zip(there, here.trials):  # the same videos: the same quality
        assert ray_record.quality.psnr == pytest.approx(record.quality.psnr, rel=1e-5)
    ran_on = {trial.user_attrs["worker"] for trial in study.trials if "speedup" in trial.user_attrs}
    assert len(ran_on) == 1 and not ran_on.pop().endswith(f":{os.getpid()}")  # in the actor's process
