"""diffusers' step caches as method plug-ins, on the tiny random-weight pipelines (CPU, offline).

For every cache and every tiny preset diffusers can serve it on: a setting that must skip really
skips (a spy of its own counts fewer computations than in a plain run), a setting that never skips
leaves the output bitwise unchanged, two generations in a row (reset between) are identical, and
removal leaves no hook and the output exactly as before. The pairs diffusers cannot serve are
listed with the reason the method gives.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch

from vdtome.core.denoisers import DenoiserType, denoisers_of, pipeline_denoiser_types
from vdtome.core.presets import get_preset
from vdtome.core.validation import RequestError
from vdtome.methods import METHODS, CallPlan, apply_stack, check_stack, method_of
from vdtome.methods.base import REUSES_ATTENTION, REUSES_BLOCKS
from vdtome.methods.evidence import ComputeSpy
from vdtome.methods.faster_cache import FasterCache
from vdtome.methods.first_block_cache import FirstBlockCache
from vdtome.methods.mag_cache import CALIBRATIONS, MagCache
from vdtome.methods.pyramid_attention_broadcast import PyramidAttentionBroadcast
from vdtome.methods.sea_cache import SeaCache
from vdtome.methods.taylorseer_cache import TaylorSeerCache
from vdtome.offline import tiny
from vdtome.tome import ToMeConfig
from vdtome.tome.hooks import is_registered

# diffusers' FasterCache calls torch.meshgrid without ``indexing``.
pytestmark = [pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

STEPS = 8
TRANSFORMERS = ("tiny-wan", "tiny-wan22", "tiny-cogvideox", "tiny-cogvideox-rotary", "tiny-ltx")

# method -> (tiny presets diffusers serves it on, a config that must skip, a config that never skips)
CACHES = {
    "first_block_cache": (TRANSFORMERS, FirstBlockCache(threshold=1.0), FirstBlockCache(threshold=0.0)),
    "pyramid_attention_broadcast": (
        ("tiny-cogvideox", "tiny-cogvideox-rotary", "tiny-ltx"),
        PyramidAttentionBroadcast(spatial_skip_range=2, cross_skip_range=3, timestep_range=(0, 1000)),
        PyramidAttentionBroadcast(spatial_skip_range=1, timestep_range=(0, 1000)),
    ),
    "faster_cache": (
        ("tiny-cogvideox", "tiny-cogvideox-rotary"),
        FasterCache(spatial_skip_range=2, spatial_timestep_range=(-1, 1000), uncond_skip_range=2,
                    uncond_timestep_range=(-1, 1000)),
        FasterCache(spatial_skip_range=1, spatial_timestep_range=(-1, 1000), uncond_skip_range=1,
                    uncond_timestep_range=(-1, 1000)),
    ),
    "taylorseer_cache": (TRANSFORMERS, TaylorSeerCache(cache_interval=2, disable_cache_before_step=2),
                         TaylorSeerCache(cache_interval=1, disable_cache_before_step=1)),
    "mag_cache": (TRANSFORMERS, MagCache(threshold=0.5), MagCache(threshold=0.5, retention_ratio=1.0)),
    "sea_cache": (("tiny-wan", "tiny-wan22"), SeaCache(threshold=2.0), SeaCache(threshold=0.0)),
}

# (method, preset, a fragment of the reason it gives) for the pairs diffusers cannot serve.
UNAVAILABLE = [
    *((name, "tiny-animatediff", "no enable_cache") for name in CACHES),  # UNetMotionModel is no CacheMixin
    ("pyramid_attention_broadcast", "tiny-wan", "once per CFG branch"),
    ("pyramid_attention_broadcast", "tiny-wan22", "once per CFG branch"),
    ("faster_cache", "tiny-wan", "once per CFG branch"),
    ("faster_cache", "tiny-wan22", "once per CFG branch"),
    ("faster_cache", "tiny-ltx", "packed tokens"),
    ("sea_cache", "tiny-cogvideox", "no adapter"),
    ("sea_cache", "tiny-cogvideox-rotary", "no adapter"),
    ("sea_cache", "tiny-ltx", "no adapter"),
]

PAIRS = [(name, preset) for name, (presets, _, _) in CACHES.items() for preset in presets]


def build(preset_name: str):
    pipe = tiny.build_tiny(get_preset(preset_name))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, preset_name: str) -> torch.Tensor:
    preset = get_preset(preset_name)
    output = pipe(prompt="a red fox", num_frames=preset.num_frames, height=preset.height, width=preset.width,
                  num_inference_steps=STEPS, guidance_scale=preset.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    return output.frames if hasattr(output, "frames") else output[0]


def prepared(pipe, preset_name: str, config):
    """``config`` as the engine applies it: filled in by the method's ``prepare`` if it has one."""
    method = method_of(config)
    if method.prepare is None:
        return config
    return method.prepare(pipe, config, plan(preset_name), lambda: generate(pipe, preset_name))


def plan(preset_name: str) -> CallPlan:
    """The calls ``generate`` makes."""
    preset = get_preset(preset_name)
    return CallPlan(STEPS, preset.num_frames, preset.height, preset.width, preset.guidance_scale)


def counted(pipe, preset_name: str) -> tuple[torch.Tensor, ComputeSpy]:
    spy = ComputeSpy(denoisers_of(pipe))
    try:
        return generate(pipe, preset_name), spy
    finally:
        spy.remove()


def leftover_hooks(pipe) -> list[str]:
    """Every diffusers hook and torch forward (pre-)hook left under the pipeline's denoisers."""
    found = []
    for model in denoisers_of(pipe):
        for path, module in model.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.hooks:
                found.append(f"{path or 'denoiser'}: {', '.join(registry.hooks)}")
            if module._forward_pre_hooks or module._forward_hooks:
                found.append(f"{path or 'denoiser'}: torch hooks")
    return found


@pytest.mark.parametrize(("name", "preset"), PAIRS)
def test_a_skipping_setting_skips(name, preset):
    pipe = build(preset)
    _, plain = counted(pipe, preset)
    config = prepared(pipe, preset, CACHES[name][1])
    applied = METHODS[name].apply(pipe, config)
    try:
        _, spy = counted(pipe, preset)
        report = applied.report()
    finally:
        applied.remove()
    assert report.acted and report.method == name
    assert (spy.expected_blocks, spy.expected_attention) == (plain.expected_blocks, plain.expected_attention)
    if METHODS[name].reuses_across_steps == REUSES_ATTENTION:
        assert spy.attention_run < plain.attention_run
    else:
        assert spy.blocks_run < plain.blocks_run
    assert report.summary["blocks skipped"] == round(1 - spy.blocks_run / spy.expected_blocks, 3)
    assert report.summary["attention skipped"] == round(1 - spy.attention_run / spy.expected_attention, 3)


@pytest.mark.parametrize(("name", "preset"), PAIRS)
def test_a_setting_that_never_skips_changes_nothing(name, preset):
    pipe = build(preset)
    baseline, plain = counted(pipe, preset)
    applied = METHODS[name].apply(pipe, prepared(pipe, preset, CACHES[name][2]))
    try:
        output, spy = counted(pipe, preset)
        report = applied.report()
    finally:
        applied.remove()
    assert torch.equal(output, baseline)
    assert not report.acted
    assert (spy.blocks_run, spy.attention_run) == (plain.blocks_run, plain.attention_run)


@pytest.mark.parametrize(("name", "preset"), PAIRS)
def test_two_generations_in_a_row_are_identical(name, preset):
    pipe = build(preset)
    applied = METHODS[name].apply(pipe, prepared(pipe, preset, CACHES[name][1]))
    try:
        first = generate(pipe, preset)
        first_report = applied.report()
        applied.reset()
        second = generate(pipe, preset)
        second_report = applied.report()
    finally:
        applied.remove()
    assert torch.equal(first, second)
    assert first_report == second_report


@pytest.mark.parametrize(("name", "preset"), PAIRS)
def test_removal_leaves_no_hook_and_the_output_as_before(name, preset):
    pipe = build(preset)
    before = generate(pipe, preset)
    applied = METHODS[name].apply(pipe, prepared(pipe, preset, CACHES[name][1]))
    assert all(model.is_cache_enabled for model in denoisers_of(pipe))
    accelerated = generate(pipe, preset)
    applied.remove()
    assert leftover_hooks(pipe) == []
    assert not any(model.is_cache_enabled for model in denoisers_of(pipe))
    assert not torch.equal(accelerated, before)  # it did act
    assert torch.equal(generate(pipe, preset), before)


@pytest.mark.parametrize(("name", "preset", "fragment"), UNAVAILABLE)
def test_unavailable_pairs_give_a_reason(name, preset, fragment):
    pipeline_class = get_preset(preset).pipeline_class
    reason = METHODS[name].unavailable(pipeline_denoiser_types(pipeline_class))
    assert reason and fragment in reason


@pytest.mark.parametrize(("name", "preset"), PAIRS)
def test_supported_pairs_are_available(name, preset):
    assert METHODS[name].unavailable(pipeline_denoiser_types(get_preset(preset).pipeline_class)) is None


@pytest.mark.parametrize("name", list(CACHES))
def test_applying_where_unavailable_is_refused_and_leaves_nothing(name):
    pipe = build("tiny-animatediff")
    config = CACHES[name][1]
    if method_of(config).prepare is not None:  # as if calibrated: the refusal must come from the model
        config = dataclasses.replace(config, num_inference_steps=STEPS, mag_ratios=((1.0,),))
    with pytest.raises(ValueError, match="no enable_cache"):
        METHODS[name].apply(pipe, config)
    assert leftover_hooks(pipe) == []


def test_block_level_caches_need_diffusers_to_know_the_blocks():
    from diffusers import AllegroTransformer3DModel  # a CacheMixin whose block class diffusers has not registered

    allegro = (DenoiserType.of(AllegroTransformer3DModel),)
    block_level = [name for name in CACHES if METHODS[name].reuses_across_steps == REUSES_BLOCKS]
    assert len(block_level) >= 2
    for name in block_level:
        assert "TransformerBlockRegistry" in METHODS[name].unavailable(allegro)
    assert METHODS["pyramid_attention_broadcast"].unavailable(allegro) is None


def test_faster_cache_on_wan_is_refused_before_any_hook():
    pipe = build("tiny-wan")
    with pytest.raises(ValueError, match="once per CFG branch"):
        METHODS["faster_cache"].apply(pipe, FasterCache())
    assert leftover_hooks(pipe) == [] and not pipe.transformer.is_cache_enabled


# -- the form: names, ranges, parsing, validation


def test_every_cache_has_prefixed_fields_one_sweepable_and_valid_defaults():
    for name in CACHES:
        method = METHODS[name]
        assert method.diffusers_cache and method.docs and method.reuses_across_steps
        assert all(f.name.startswith(f"{name}_") and f.label for f in method.fields)
        assert sum(f.sweepable for f in method.fields) == 1
        assert all(f.minimum < f.maximum for f in method.fields if f.kind in ("number", "integer"))
        config = method.from_form(method.form_defaults())
        assert type(config) is method.config_type and method.summary(config)


@pytest.mark.parametrize(("config_type", "bad"), [
    (FirstBlockCache, {"threshold": -0.1}),
    (PyramidAttentionBroadcast, {"spatial_skip_range": 0}),
    (PyramidAttentionBroadcast, {"timestep_range": (800, 100)}),
    (FasterCache, {"uncond_skip_range": 1.5}),
    (FasterCache, {"attention_weight": 2.0}),
    (TaylorSeerCache, {"disable_cache_before_step": 0}),  # diffusers would forecast before any full step
    (TaylorSeerCache, {"factors_dtype": "int8"}),
    (MagCache, {"mag_ratios": ((1.0, 0.9),)}),  # without its step count
    (MagCache, {"num_inference_steps": 1, "mag_ratios": ((1.0, 0.9),)}),  # more ratios than steps
    (SeaCache, {"residual_order": 2}),
    (SeaCache, {"max_consecutive_cached": True}),
])
def test_configs_are_validated(config_type, bad):
    with pytest.raises(ValueError):
        config_type(**bad)


@pytest.mark.parametrize("name", ["pyramid_attention_broadcast", "faster_cache"])
def test_an_empty_timestep_range_is_refused_naming_its_field(name):
    method = METHODS[name]
    values = method.form_defaults()
    to_field = next(f.name for f in method.fields if f.name.endswith("_to"))
    values[to_field] = values[to_field.replace("_to", "_from")]
    with pytest.raises(RequestError, match="empty") as error:
        method.from_form(values)
    assert error.value.field == to_field


# -- MagCache's calibration


def test_mag_cache_calibrates_once_per_step_count_and_reports_it():
    pipe = build("tiny-wan22")
    runs = []

    def run_untimed():
        runs.append(generate(pipe, "tiny-wan22"))

    calls = plan("tiny-wan22")
    config = METHODS["mag_cache"].prepare(pipe, MagCache(), calls, run_untimed)
    again = METHODS["mag_cache"].prepare(pipe, MagCache(threshold=0.2), calls, run_untimed)
    assert len(runs) == 1 and again.mag_ratios == config.mag_ratios and again.threshold == 0.2
    # Other settings (here: no CFG) are calibrated on their own, never given another's ratios.
    METHODS["mag_cache"].prepare(pipe, MagCache(), dataclasses.replace(calls, guidance=1.0), run_untimed)
    assert len(runs) == 2
    assert leftover_hooks(pipe) == [] and not pipe.transformer.is_cache_enabled
    assert torch.equal(runs[0], generate(pipe, "tiny-wan22"))  # calibration mode never skips
    high, low = config.mag_ratios  # one row per expert, one ratio per step it served
    assert len(high) + len(low) == STEPS and len(high) > 0 and len(low) > 0
    assert high[0] == low[0] == 1.0  # diffusers' neutral first ratio
    assert all(CALIBRATIONS[model][calls][0] == row for model, row in zip(denoisers_of(pipe), config.mag_ratios))
    assert config.calibrated_on.startswith(f"{STEPS} steps, 9 frames, 64x64, guidance 5 (made at ")
    applied = METHODS["mag_cache"].apply(pipe, config)
    try:
        generate(pipe, "tiny-wan22")
        report = applied.report()
    finally:
        applied.remove()
    assert report.detail["calibration"]["num_inference_steps"] == STEPS
    assert report.detail["calibration"]["mag_ratios"] == [list(high), list(low)]


def test_mag_cache_refuses_an_uncalibrated_config():
    pipe = build("tiny-wan")
    with pytest.raises(ValueError, match="calibrated"):
        METHODS["mag_cache"].apply(pipe, MagCache())
    assert leftover_hooks(pipe) == []


# -- stacks


def test_token_merging_stacks_with_first_block_cache():
    pipe = build("tiny-wan")
    before = generate(pipe, "tiny-wan")
    stack = apply_stack(pipe, [ToMeConfig(ratio=0.5), FirstBlockCache(threshold=1.0)])
    try:
        first = generate(pipe, "tiny-wan")
        first_reports = stack.reports()
        stack.reset()
        second = generate(pipe, "tiny-wan")
        second_reports = stack.reports()
    finally:
        stack.remove()
    assert [report.method for report in first_reports] == ["tome", "first_block_cache"]
    assert all(report.acted for report in first_reports)
    assert first_reports == second_reports
    assert torch.equal(first, second) and not torch.equal(first, before)
    assert leftover_hooks(pipe) == []
    assert torch.equal(generate(pipe, "tiny-wan"), before)


def test_two_diffusers_caches_do_not_stack():
    with pytest.raises(RequestError, match="diffusers keeps one cache per model"):
        check_stack([FirstBlockCache(), MagCache()])


@pytest.mark.parametrize("name", list(CACHES))
def test_only_block_level_caches_stack_with_token_merging(name):
    stack = [ToMeConfig(ratio=0.5), CACHES[name][1]]
    if METHODS[name].reuses_across_steps == REUSES_ATTENTION:
        with pytest.raises(RequestError, match="reuses attention outputs across steps"):
            check_stack(stack)
    else:
        assert [method.name for method in check_stack(stack)] == ["tome", name]


def test_a_stack_that_fails_to_apply_is_rolled_back():
    pipe = build("tiny-wan")
    before = generate(pipe, "tiny-wan")
    applied = []
    original = METHODS["tome"].apply

    def spied(pipe, config):
        applied.append(original(pipe, config))
        return applied[-1]

    tome = dataclasses.replace(METHODS["tome"], apply=spied)
    with mock.patch.dict(METHODS, {"tome": tome}):
        # MagCache without its calibration refuses to apply, after token merging was applied.
        with pytest.raises(ValueError, match="needs magnitude ratios"):
            apply_stack(pipe, [ToMeConfig(ratio=0.5), MagCache()])
    assert len(applied) == 1 and not applied[0].handle.active  # token merging was applied, then removed
    assert leftover_hooks(pipe) == [] and not is_registered(pipe.transformer)
    assert torch.equal(generate(pipe, "tiny-wan"), before)
    with pytest.raises(RequestError, match="no enable_cache"):  # availability is checked before any apply
        apply_stack(build("tiny-animatediff"), [ToMeConfig(ratio=0.5), FirstBlockCache(threshold=1.0)])


def test_apply_stack_refuses_a_cache_the_model_cannot_take_before_touching_it():
    pipe = build("tiny-cogvideox")
    before = generate(pipe, "tiny-cogvideox")
    with pytest.raises(RequestError, match="SeaCache is unavailable for this model"):
        apply_stack(pipe, [SeaCache(threshold=2.0)])  # diffusers would only warn and run in full
    assert leftover_hooks(pipe) == [] and torch.equal(generate(pipe, "tiny-cogvideox"), before)


def test_a_compiled_cache_compiles_once_and_counts_what_eager_counts():
    """The evidence spy counts in a tensor: a compiled denoiser with a cache on compiles in its first
    calls and never again while the counts grow call after call (Python ints on the spy were values
    dynamo guards on: two new graphs at every call, 8x slower per call on tiny-wan), and each call
    counts what the eager call counts."""
    from torch._dynamo.utils import counters

    pipe = build("tiny-wan")
    with apply_stack(pipe, [FirstBlockCache(threshold=1.0)]) as stack:  # skips whenever it may: no borderline call
        spy = stack.applied[0].spy

        def one_call() -> tuple[int, ...]:
            """What one call adds to the counts (the cache's own state reset, the spy's kept)."""
            for model in denoisers_of(pipe):
                model._reset_stateful_cache()
            before = (spy.expected_blocks, spy.blocks_run, spy.expected_attention, spy.attention_run)
            generate(pipe, "tiny-wan")
            after = (spy.expected_blocks, spy.blocks_run, spy.expected_attention, spy.attention_run)
            return tuple(b - a for a, b in zip(before, after))

        eager = one_call()
        torch._dynamo.reset()
        counters.clear()
        pipe.transformer.compile(backend="eager")  # dynamo's guards and graphs, without inductor's code generation
        try:
            one_call(), one_call()
            graphs = counters["stats"]["unique_graphs"]
            compiled = one_call()
            assert counters["stats"]["unique_graphs"] == graphs  # no new graph at the third call
        finally:
            pipe.transformer._compiled_call_impl = None
            torch._dynamo.reset()
    assert eager[1] < eager[0] and compiled == eager
