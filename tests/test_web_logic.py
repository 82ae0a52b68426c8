"""The app's logic without a server: request gates, GPU-time budgets, the browser-kept history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vdtome.bench.runner import BenchPlan
from vdtome.bench.sweep import load_sweep, shipped_sweeps
from vdtome.core.presets import get_preset, load_presets
from vdtome.core.validation import RequestError
from vdtome.engine.request import ComparisonRequest
from vdtome.measure.protocol import MAX_GPU_SECONDS
from vdtome.methods import METHODS, method_of
from vdtome.web import history
from vdtome.web.gates import RequestGates
from vdtome.web.gpu_budget import TINY_GPU_SECONDS, benchmark_duration, comparison_duration, comparison_estimate
from vdtome.web.limits import ServiceLimits
from vdtome.web.ui import HISTORY_COLUMNS, VIEW_FILE, api_fields, form_targets, method_defaults

PRESETS = load_presets()
LIMITS = ServiceLimits.from_env(PRESETS, environ={})
CPU = RequestGates(PRESETS, LIMITS, has_gpu=False)


def form(**changes) -> dict:
    """The compare form at its defaults for tiny-wan, as the page sends it."""
    values = {"preset": "tiny-wan", "prompt": "a boat", "negative_prompt": "", "seed": 0, "frames": 9, "height": 64,
              "width": 64, "steps": 4, "guidance": 5.0, "rounds": 2, "custom_model": "", "ratios": "0.3, 0.5",
              "sweep_field": "ratio", **method_defaults()}
    assert set(api_fields(sweep=True)) <= set(values)
    return values | changes


def refusal(call, *args) -> RequestError:
    with pytest.raises(RequestError) as refused:
        call(*args)
    return refused.value


def test_a_good_form_becomes_its_request_and_a_sweep_one_request_per_value():
    (request,), source = CPU.comparison(form())
    assert source is None and request.preset == "tiny-wan" and request.steps == 4 and not request.snap
    assert request.methods[0].ratio == method_defaults()["ratio"]
    requests, _ = CPU.comparison(form(), sweep=True)
    assert [r.methods[0].ratio for r in requests] == [0.3, 0.5]


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"preset": "nope"}, "preset", "model preset must be one of"),
    ({"preset": "cogvideox-2b"}, "preset", "needs a GPU and this machine has none"),
    ({"steps": ""}, "steps", "steps is empty"),
    ({"frames": 10}, "frames", "frames"),
    ({"ratio": 0.9}, "ratio", "merge ratio must be between 0 and 0.75"),
    ({"custom_model": "someone/weights"}, "custom_model", "custom model ids are switched off"),
    ({"custom_model": 3}, "custom_model", "custom weights must be text"),
])
def test_a_bad_form_is_refused_naming_its_field(changes, field, words):
    error = refusal(CPU.comparison, form(**changes))
    assert error.field == field and words in str(error)


def test_the_operators_work_limit_and_the_zero_gpu_budget_are_enforced():
    small = RequestGates(PRESETS, ServiceLimits.from_env(PRESETS, environ={"VDTOME_MAX_WORK": "tiny-wan=1"}), has_gpu=False)
    error = refusal(small.comparison, form())
    assert error.field == "steps"
    zero_gpu = RequestGates(PRESETS, LIMITS, has_gpu=True, on_zero_gpu=True)
    real = form(preset="wan2.1-t2v-1.3b", prompt="a kite", frames=81, height=480, width=832, steps=500, rounds=20)
    error = refusal(zero_gpu.comparison, real)
    assert error.field == "steps" and f"at most {MAX_GPU_SECONDS} s" in str(error)
    CPU.comparison(form())  # a tiny preset carries no GPU figures: never refused for time


def test_gpu_durations_follow_the_protocols_schedule():
    tiny = [ComparisonRequest("tiny-wan", "a boat")]
    assert comparison_duration(PRESETS["tiny-wan"], tiny) == TINY_GPU_SECONDS
    real = [ComparisonRequest("wan2.1-t2v-1.3b", "a kite")]
    one, three = comparison_duration(PRESETS["wan2.1-t2v-1.3b"], real), comparison_estimate(real * 3).seconds
    assert TINY_GPU_SECONDS < one < three
    plan = BenchPlan("tiny-wan", ("one", "two"), (0, 1), load_sweep("smoke"))
    assert benchmark_duration(PRESETS["tiny-wan"], plan) == TINY_GPU_SECONDS * max(1, len(plan.keys()) // 8)


def test_the_benchmark_gate_checks_the_preset_its_size_and_its_sweep():
    values = {"bench_preset": "tiny-wan", "bench_prompts": "one\ntwo", "bench_seeds": "0",
              "bench_sweep": shipped_sweeps()["smoke"].read_text(encoding="utf-8")}  # the form holds the file
    plan = CPU.benchmark(values)
    assert plan.prompts == ("one", "two") and plan.sweep.name == "smoke"
    assert refusal(CPU.benchmark, values | {"bench_preset": "cogvideox-2b"}).field == "bench_preset"
    assert refusal(CPU.benchmark, values | {"bench_sweep": "nope: ["}).field == "bench_sweep"


def entry(run: int, folder: str | None = "run-abc") -> dict:
    cells = {"run": run, "model": "tiny-wan", "prompt": "a boat", "seed": 0, "methods": "tome ratio 0.5 stride 1x2x2",
             "size": "9x64x64"}
    return {"row": [cells.get(column, "") for column in HISTORY_COLUMNS], "point": None, "settings": {}, "series": None,
            "folder": folder}


def test_a_history_kept_before_the_size_column_comes_back_in_todays_columns():
    """A browser keeps the history across app versions: the rows of an earlier page (no size) are moved
    into today's columns, the size read from their settings, rather than dropped."""
    earlier = {"row": [4, "tiny-shapes-128", "a red circle", 0, "tome ratio 0.3 stride 1x2x2", "merged", "1.20x faster",
                       "1.30x faster", 24.5, 0.9, "within noise", "made"],
               "point": {"run": 4, "model": "tiny-shapes-128"}, "settings": {"frames": "17", "size": "128x128"},
               "series": None, "folder": "run-abc"}
    (today,) = history.checked([earlier])
    cells = dict(zip(HISTORY_COLUMNS, today["row"]))
    assert HISTORY_COLUMNS[:6] == ("run", "end-to-end", "denoising", "PSNR dB", "SSIM", "methods")
    assert cells["size"] == "17x128x128" and cells["end-to-end"] == "1.20x faster" and cells["PSNR dB"] == 24.5
    assert today["point"]["size"] == "17x128x128"
    assert history.run_choices([today]) == [("run 4: tome ratio 0.3 stride 1x2x2", 4)]


def test_the_history_drops_what_it_did_not_write_and_caps_its_rows(tmp_path):
    good = [entry(1), entry(2, folder=None)]
    assert history.checked(good) == good
    assert history.checked([*good, {"row": "not a list"}]) == []  # one forged entry: nothing is trusted
    assert history.checked("a string") == [] and history.checked(None) == []
    assert history.run_choices(good) == [("run 1: tome ratio 0.5 stride 1x2x2", 1)]  # only runs with files

    class View:  # what record reads of a ComparisonView
        def __init__(self, folder: str) -> None:
            self.history, self.files = entry(0), {"json": str(tmp_path / folder / "result.json")}

    grown = history.record(good, [View("run-x"), View("run-y")], keep=3, series="ratio")
    assert [e["row"][0] for e in grown] == [2, 3, 4]  # numbered on from the last run; the oldest dropped
    assert grown[-1]["folder"] == "run-y" and grown[-1]["series"] == "sweep from run 3: ratio"


def test_a_past_run_is_found_only_in_a_folder_this_server_could_have_written(tmp_path):
    (tmp_path / "run-abc").mkdir()
    assert history.run_folder([entry(1)], 1, tmp_path) is None  # no saved view (yet, or any more)
    (tmp_path / "run-abc" / VIEW_FILE).write_text("{}")
    assert history.run_folder([entry(1)], 1, tmp_path) == tmp_path / "run-abc"
    assert history.run_folder([entry(1)], 2, tmp_path) is None  # no such run
    for forged in ("../../etc", "run-abc/../..", "/etc"):
        assert history.run_folder([entry(1, folder=forged)], 1, tmp_path) is None
    assert history.run_folder([entry(1)], 1, Path("/nonexistent")) is None


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "assets" / "examples").glob("*/view.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.parent.name)
def test_a_shipped_examples_code_builds_the_request_it_shows(path):
    """The Examples tab's "reproduce it" code runs against today's public API (the call itself is
    left out) and asks for the settings its form records."""
    view = json.loads(path.read_text(encoding="utf-8"))
    code, call = view["code"].rsplit("\n", 1)
    assert call.startswith("print(result.speedup") and code.startswith("import vdtome\n")
    namespace: dict = {}
    exec(code.replace("result = vdtome.compare(", "request = ("), namespace)
    request, form = namespace["request"], view["form"]
    assert (request.preset, request.prompt, request.seed, request.steps) == (form["preset"], form["prompt"],
                                                                           form["seed"], form["steps"])
    assert [method_of(config).name for config in request.methods] == [
        name for name in METHODS if form.get(f"use_{name}")]


def test_a_link_takes_the_form_to_its_values_and_a_new_presets_defaults():
    fields = ("preset", "prompt", "steps", "frames", "ratio")
    problems: list[str] = []
    preset, targets = form_targets({"preset": "tiny-ltx", "steps": 3}, problems, PRESETS, "tiny-wan", fields)
    assert preset.name == "tiny-ltx" and not problems
    assert targets == {"preset": "tiny-ltx", "steps": 3, "frames": PRESETS["tiny-ltx"].num_frames,
                       "ratio": method_defaults(PRESETS["tiny-ltx"])["ratio"]}  # the prompt is left as it is
    # A multiple choice goes to its widget as a list: Gradio would read a tuple as one choice, and the
    # page-made links (which carry the preset) untick every merge target.
    preset, targets = form_targets({"preset": "tiny-shapes-128"}, problems, PRESETS, "tiny-wan", ("targets",))
    assert targets == {"targets": ["self-attention"]}
    preset, targets = form_targets({"prompt": "a kite"}, problems, PRESETS, "tiny-wan", fields)
    assert preset.name == "tiny-wan" and targets == {"prompt": "a kite"}  # same preset: nothing else moves
    preset, targets = form_targets({"preset": "nope", "steps": 3}, problems, PRESETS, "tiny-wan", fields)
    assert problems == ["preset: no preset named 'nope'"] and preset.name == "tiny-wan" and targets == {"steps": 3}


def test_the_chart_holds_one_model_and_size_the_latest_runs_by_default():
    def run(number: int, model: str, size: str) -> dict:
        return entry(number) | {"point": {"run": number, "model": model, "size": size}}

    runs = [run(1, "tiny-wan", "9x64x64"), run(2, "tiny-shapes-128", "17x128x128"), run(3, "tiny-wan", "9x64x64"),
            entry(4) | {"point": None}]  # a failed or identical run: not on the chart
    assert history.chart_groups(runs) == [("tiny-wan · 9x64x64 (2 runs)", "tiny-wan · 9x64x64"),
                                          ("tiny-shapes-128 · 17x128x128 (1 run)", "tiny-shapes-128 · 17x128x128")]
    shown, key = history.chart_runs(runs, None)
    assert key == "tiny-wan · 9x64x64" and [e["row"][0] for e in shown] == [1, 3]
    shown, key = history.chart_runs(runs, "tiny-shapes-128 · 17x128x128")
    assert [e["row"][0] for e in shown] == [2]
    assert history.chart_runs(runs, "gone · 1x1x1")[1] == "tiny-wan · 9x64x64"  # a group no longer there


def test_a_tab_whose_session_state_went_keeps_the_runs_its_browser_kept():
    """An open tab idle past the session TTL (or dropped by the sessions cap) starts its next run from an
    empty server-side history: the browser's runs come first and the new one is numbered on."""
    stored = [entry(1, "run-a"), entry(2, "run-b")]
    fresh = [entry(1, "run-c") | {"point": {"run": 1, "model": "tiny-wan", "size": "9x64x64"}}]
    merged = history.rejoined(stored, fresh, keep=100)
    assert [(e["row"][0], e["folder"]) for e in merged] == [(1, "run-a"), (2, "run-b"), (3, "run-c")]
    assert merged[-1]["point"]["run"] == 3
    assert history.rejoined(stored, stored + [entry(3, "run-d")], keep=100)[-1]["folder"] == "run-d"  # same history
    assert history.rejoined([], fresh, keep=100) == fresh and history.rejoined(None, fresh, keep=100) == fresh
    assert len(history.rejoined(stored, fresh, keep=2)) == 2  # capped as the history is


# ---- the Tune tab's gate ---------------------------------------------------------------------------

TUNE_FORM = {"tune_preset": "tiny-shapes-128", "tune_floors": "judge, psnr=20", "tune_methods": ["tome", "mag_cache"],
             "tune_minutes": 5, "tune_require": ""}


def test_the_tune_form_becomes_a_plan_and_each_bad_field_is_named():
    plan = CPU.tune(TUNE_FORM)
    assert [f.text() for f in plan.floors] == ["judge", "psnr=20"] and plan.methods == ("tome", "mag_cache")
    assert plan.minutes == 5 and set(plan.tuning()).isdisjoint(plan.validation())  # held-out validation prompts
    assert CPU.tune(TUNE_FORM | {"tune_require": "tome"}).require == ("tome",)
    for change, field, words in (
        ({"tune_minutes": LIMITS.tune_minutes + 1}, "tune_minutes", f"at most {LIMITS.tune_minutes} on this server"),
        ({"tune_minutes": "5"}, "tune_minutes", "minutes must be above 0"),
        ({"tune_floors": " "}, "tune_floors", "give at least one floor"),
        ({"tune_floors": "psnr=fast"}, "tune_floors", "'fast' is not a number"),
        ({"tune_preset": "tiny-wan", "tune_floors": "judge"}, "tune_floors", "the judge reads the shapes models"),
        ({"tune_methods": []}, "tune_methods", "choose at least one method"),
        ({"tune_methods": ["vae_tiling"]}, "tune_methods", "cannot be tuned"),
        ({"tune_require": "first_block_cache"}, "tune_require", "required method 'first_block_cache'"),
    ):
        with pytest.raises(RequestError, match=words) as refused:
            CPU.tune(TUNE_FORM | change)
        assert refused.value.field == field, (change, refused.value)
    with pytest.raises(RequestError, match="ZeroGPU lends a GPU"):
        RequestGates(PRESETS, LIMITS, has_gpu=True, on_zero_gpu=True).tune(TUNE_FORM)


def test_a_recipe_sets_the_form_to_its_preset_settings_and_stack():
    from vdtome.methods.recipe import Recipe
    from vdtome.web.ui import recipe_form, stack_from_form

    recipe = Recipe("tiny-shapes-128", "WanPipeline", 17, 128, 128, 20, 5.0,
                    (("mag_cache", {"mag_cache_threshold": 0.08, "mag_cache_max_skip_steps": 2}),))
    form = recipe_form(recipe)
    assert (form["preset"], form["frames"], form["steps"]) == ("tiny-shapes-128", 17, 20)
    assert form["use_mag_cache"] and not form["use_tome"]
    full = method_defaults(get_preset("tiny-shapes-128")) | form
    assert stack_from_form(full) == recipe.configs()  # the form runs exactly the recipe's stack
