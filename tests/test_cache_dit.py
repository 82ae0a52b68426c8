"""cache-dit's DBCache as a peer method (``vdtome[peers]``) on the tiny random-weight pipelines.

It caches (its own count and vdtome's spy agree that blocks were skipped), it is removed without a
trace (no instance attribute, no class patch, the output bitwise the baseline's), its class-level
patch never reaches another pipeline of the same class (the app keeps several), and the stacks
that would make it cache nothing are refused naming why.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from vdtome.core.denoisers import denoisers_of, pipeline_denoiser_types
from vdtome.core.presets import get_preset
from vdtome.core.validation import RequestError
from vdtome.methods import METHODS, apply_stack, check_stack
from vdtome.methods.cache_dit import INSTALL, CacheDiT
from vdtome.methods.cache_dit_hooks import InstanceState
from vdtome.methods.evidence import ComputeSpy, transformer_blocks
from vdtome.methods.mag_cache import MagCache
from vdtome.offline import tiny
from vdtome.tome import ToMeConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 8
CACHES = CacheDiT(compute_first=1, threshold=1.0, warmup_steps=2)  # a threshold every step passes


def build(preset_name: str = "tiny-wan"):
    pipe = tiny.build_tiny(get_preset(preset_name))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, preset_name: str = "tiny-wan") -> torch.Tensor:
    preset = get_preset(preset_name)
    return pipe(prompt="a red fox", num_frames=preset.num_frames, height=preset.height, width=preset.width,
                num_inference_steps=STEPS, guidance_scale=preset.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(0), output_type="latent").frames


def counted(pipe, preset_name: str = "tiny-wan") -> tuple[torch.Tensor, ComputeSpy]:
    spy = ComputeSpy(denoisers_of(pipe))
    try:
        return generate(pipe, preset_name), spy
    finally:
        spy.remove()


def everything(pipe) -> InstanceState:
    return InstanceState([pipe, *(m for model in denoisers_of(pipe) for m in model.modules())])


@pytest.mark.parametrize("preset_name", ["tiny-wan", "tiny-wan22", "tiny-cogvideox", "tiny-ltx"])
def test_it_caches_steps_and_is_removed_without_a_trace(preset_name):
    pipe = build(preset_name)
    pipeline_class, call = type(pipe), type(pipe).__call__
    before, plain = counted(pipe, preset_name)
    state = everything(pipe)
    applied = METHODS["cache_dit"].apply(pipe, CACHES)
    accelerated, spy = counted(pipe, preset_name)
    report = applied.report()
    applied.remove()
    assert report.acted
    cached = report.summary["steps cached"]
    assert 0 < cached <= STEPS - CACHES.warmup_steps  # cache-dit's own count, after its warm-up
    assert spy.blocks_run < plain.blocks_run  # and vdtome's spy saw blocks skipped
    assert not torch.equal(accelerated, before)
    # No trace: the class as it was, no attribute added or replaced anywhere, the output bitwise.
    assert type(pipe) is pipeline_class and pipeline_class.__call__ is call
    assert not hasattr(pipeline_class, "_original_call") and not hasattr(pipeline_class, "_is_cached")
    assert state.changed() == []
    assert not any("forward" in vars(model) for model in denoisers_of(pipe))
    assert torch.equal(generate(pipe, preset_name), before)


def test_its_class_patch_never_reaches_another_pipeline_of_the_same_class():
    """The app keeps several pipelines: while one has cache-dit on, another of the same class runs
    untouched, and a cache on each is its own."""
    first, second = build(), build()
    second_before = generate(second)
    call = type(second).__call__
    on_first = METHODS["cache_dit"].apply(first, CACHES)
    try:
        assert type(second).__call__ is call and not hasattr(type(second), "_is_cached")
        assert torch.equal(generate(second), second_before)
        on_second = METHODS["cache_dit"].apply(second, CacheDiT(compute_first=1, threshold=0.0))  # never skips
        try:
            assert torch.equal(generate(second), second_before)
            generate(first)
            assert on_first.report().acted and not on_second.report().summary["steps cached"]
        finally:
            on_second.remove()
    finally:
        on_first.remove()
    assert torch.equal(generate(second), second_before)


def test_blocks_computed_every_step_beyond_the_model_are_refused_naming_the_field():
    pipe = build()
    blocks = len(transformer_blocks(denoisers_of(pipe)[0]))
    state = everything(pipe)
    pipeline_class = type(pipe)
    for config, field in ((CacheDiT(compute_first=blocks + 1), "cache_dit_compute_first"),
                          (CacheDiT(compute_first=blocks, compute_last=1), "cache_dit_compute_last")):
        with pytest.raises(RequestError, match=f"more than the {blocks} transformer blocks") as refused:
            METHODS["cache_dit"].apply(pipe, config)
        assert refused.value.field == field
    assert type(pipe) is pipeline_class and state.changed() == []


def test_without_cache_dit_it_is_listed_and_refused_with_the_install_line():
    types = pipeline_denoiser_types("WanPipeline")
    assert METHODS["cache_dit"].unavailable(types) is None
    with mock.patch("importlib.util.find_spec", return_value=None):
        reason = METHODS["cache_dit"].unavailable(types)
    assert reason == f"cache-dit is not installed: {INSTALL}"
    assert "no adapter for UNet2DConditionModel" in METHODS["cache_dit"].unavailable(
        pipeline_denoiser_types("AnimateDiffPipeline"))


def test_with_token_merging_in_the_blocks_it_measures_the_stack_is_refused_and_kept_off_them_it_caches():
    pipe = build()
    blocks = len(transformer_blocks(denoisers_of(pipe)[0]))
    with pytest.raises(RequestError, match="changes block 0, one of the first 1 whose residual") as refused:
        check_stack([ToMeConfig(ratio=0.3), CACHES])
    assert refused.value.field == "use_tome"
    with pytest.raises(RequestError, match="changes block 1"):
        check_stack([ToMeConfig(block_ratios=(0.0,) + (0.3,) * (blocks - 1)), CacheDiT(compute_first=2)])
    kept_off = ToMeConfig(block_ratios=(0.0,) + (0.3,) * (blocks - 1))
    with apply_stack(pipe, [kept_off, CACHES]) as stack:
        generate(pipe)
        merging, caching = stack.reports()
    assert merging.acted and caching.summary["steps cached"] > 0


def test_it_stacks_with_no_other_step_cache():
    with pytest.raises(RequestError, match="cannot stack with MagCache") as refused:
        check_stack([CACHES, MagCache(threshold=0.5)])
    assert refused.value.field == "use_cache_dit"
