"""The memory plan: estimates traced on the meta device, checked against what a real call holds.

On the tiny presets the estimate of each candidate that can run here (no offloading on a CPU) must
be within 25 % of the measured peak: the weights plus the most tensor bytes a real pipeline call
held at once (:class:`TensorMemoryMeter`), with that candidate's methods applied.
"""

from __future__ import annotations

import pytest
import torch

from vdtome.cli import main
from vdtome.core.denoisers import pipeline_weight_bytes
from vdtome.core.phases import DENOISING
from vdtome.core.presets import get_preset, load_presets
from vdtome.core.validation import RequestError
from vdtome.engine.pipelines import load_pipeline
from vdtome.engine.plan import GIB, make_plan, parse_budget
from vdtome.measure.memory import TensorMemoryMeter
from vdtome.methods import apply_stack, method_spec, parse_method_spec
from vdtome.methods.layerwise_casting import LayerwiseCasting
from vdtome.methods.offload import Offload
from vdtome.methods.slicing import Slicing
from vdtome.methods.vae_tiling import VaeTiling
from vdtome.tome import ToMeConfig


def measured_peak(preset_name: str, configs, frames: int, height: int, width: int) -> int:
    """The weights the pipeline holds with ``configs`` applied (as a GPU would hold them: layerwise
    casting's float8 copies, not the originals it keeps on the host) plus the call's tensor peak."""
    preset = get_preset(preset_name)
    pipe = load_pipeline(preset, "cpu")
    extra = {"max_sequence_length": preset.extras["max_sequence_length"]} if "max_sequence_length" in preset.extras else {}
    with apply_stack(pipe, list(configs)):
        weights = pipeline_weight_bytes(pipe)
        with TensorMemoryMeter() as meter:
            pipe(prompt="a red circle", num_frames=frames, height=height, width=width, num_inference_steps=2,
                 guidance_scale=preset.guidance_scale, generator=torch.Generator().manual_seed(0), output_type="np",
                 **extra)
    return weights + meter.peak_bytes


@pytest.mark.parametrize(("preset", "size"), [
    ("tiny-shapes-128", (17, 128, 128)),
    ("tiny-wan", (9, 64, 64)),
    ("tiny-cogvideox", (17, 128, 128)),
    ("tiny-ltx", (17, 128, 128)),
    ("tiny-animatediff", (16, 64, 64)),
])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(preset, size):
    plan = make_plan(preset, *size)
    for candidate in plan.candidates:
        if any(isinstance(config, Offload) for config in candidate.configs):
            continue  # nothing to offload to on a CPU
        measured = measured_peak(preset, candidate.configs, *size)
        assert 0.75 <= candidate.peak_bytes / measured <= 1.25, (candidate.name, candidate.peak_bytes, measured)


def test_slicing_and_tiling_lower_the_estimate_where_they_lower_the_measured_peak():
    plan = make_plan("tiny-animatediff", 16, 128, 128)
    by_name = {c.name: c for c in plan.candidates}
    assert by_name["slicing"].peak_bytes < 0.7 * by_name["as loaded"].peak_bytes
    assert plan.denoise_activation["sliced"] < plan.denoise_activation["plain"]
    assert plan.decode_activation["sliced"] < plan.decode_activation["plain"]


def test_each_budget_gets_the_largest_feed_forward_chunks_that_fit():
    """Larger chunks cost less time: with a budget between the sliced call's peak and the plain
    denoiser call's, the plan picks chunks larger than the auto ones that still fit, and says them
    as ``--method`` reads them back."""
    size = (9, 64, 64)
    by_name = {c.name: c for c in make_plan("tiny-animatediff", *size).candidates}
    plain, sliced = by_name["as loaded"], by_name["slicing"]
    between = (plain.phases[DENOISING] + sliced.peak_bytes) // 2
    assert sliced.peak_bytes < between < plain.phases[DENOISING]
    plan = make_plan("tiny-animatediff", *size, budgets=(plain.peak_bytes, between))
    roomy, tight = (choice.candidate for choice in plan.choices)
    assert roomy.configs == () and roomy.specs == ()
    (slicing,) = tight.configs
    assert slicing.chunk_tokens > 0 and tight.peak_bytes <= between
    assert [parse_method_spec(spec) for spec in tight.specs] == [slicing]
    assert plan.to_dict()["choices"][1]["choice"]["methods"] == [f"slicing:chunk_tokens={slicing.chunk_tokens}"]


def test_method_specs_read_back_as_the_same_configs():
    for config in (Slicing(chunk_tokens=512, attention=False), Offload(mode="group_leaf"), VaeTiling(tile_px=192),
                   LayerwiseCasting(), parse_method_spec("first_block_cache:threshold=0.2")):
        assert parse_method_spec(method_spec(config)) == config


def test_a_real_preset_is_sized_from_its_published_architecture():
    """Wan 2.1 1.3B (at a small request, to keep the trace short): the weights are the model's
    (1.42 B parameters in bf16, the VAE in float32, UMT5-XXL's published size), the choices follow
    the budgets. ``python -m vdtome plan`` prints the default request (benchmarks/memory_plan.py)."""
    plan = make_plan("wan2.1-t2v-1.3b", 17, 256, 256)
    assert plan.weights["denoiser"] == pytest.approx(2 * 1.419e9, rel=0.01)
    assert plan.weights["vae"] == pytest.approx(4 * 126.9e6, rel=0.01)
    assert plan.weights["text_encoder"] == 11_360_000_000
    as_loaded = plan.candidates[0]
    assert sum(plan.weights.values()) < as_loaded.peak_bytes < sum(plan.weights.values()) + 2 * GIB
    assert plan.choose(80 * GIB) is as_loaded
    smaller = plan.choose(12 * GIB)
    assert smaller is not None and smaller.peak_bytes <= 12 * GIB and "offload" in smaller.name
    assert plan.choose(1 * GIB) is None


def test_every_real_preset_has_a_memory_description():
    for preset in load_presets().values():
        if preset.hub_id is not None:
            assert preset.memory.get("denoiser") and preset.memory.get("vae"), preset.name


@pytest.mark.parametrize(("text", "size"), [("24GB", 24 * GIB), ("24 GiB", 24 * GIB), ("7.5gb", int(7.5 * GIB)),
                                            ("80", 80 * GIB)])
def test_budgets_are_read_as_gpus_are_sold(text, size):
    assert parse_budget(text) == size


@pytest.mark.parametrize("text", ["", "0GB", "-4GB", "24TB", "lots"])
def test_a_bad_budget_is_refused_naming_the_field(text):
    with pytest.raises(RequestError, match="budget must be a size such as 24GB") as caught:
        parse_budget(text)
    assert caught.value.field == "budget"


def test_the_plan_command_prints_the_table_and_a_choice_per_budget(capsys):
    assert main(["plan", "--preset", "tiny-wan", "--budget", "1GB", "--budget", "0.001GB"]) == 0
    out = capsys.readouterr().out
    assert "tiny-wan at 9 frames, 64x64" in out and "estimated peak by phase" in out
    assert "budget 1 GB: as loaded (estimated peak" in out and "(no memory method)" in out
    assert "budget 0.001 GB: nothing fits; the smallest is" in out


def test_the_plan_command_refuses_a_size_the_model_cannot_take(capsys):
    assert main(["plan", "--preset", "tiny-wan", "--frames", "10"]) == 2
    assert "frames" in capsys.readouterr().err


def test_a_request_that_cannot_fit_even_with_every_method_is_refused_naming_the_numbers(monkeypatch):
    from vdtome.engine import engine as engine_module
    from vdtome.engine.engine import check_fits
    from vdtome.engine.request import ComparisonRequest, resolve

    preset = get_preset("tiny-wan")
    settings, _ = resolve(ComparisonRequest(preset="tiny-wan", prompt="a red fox"), preset)
    pipe = load_pipeline(preset, "cpu")
    check_fits(preset, settings, torch.device("cpu"), pipe)  # this machine holds it
    monkeypatch.setattr(engine_module, "device_memory_bytes", lambda device: 2**10)  # a 1 KiB machine
    with pytest.raises(RequestError, match=r"needs at least .* GB even with every memory method .* this machine has "
                                           r"0\.0 GB; choose fewer frames or a smaller size") as caught:
        check_fits(preset, settings, torch.device("cpu"), pipe)
    assert caught.value.field == "frames"


def test_a_comparison_with_a_memory_method_counts_both_sides_and_shows_the_plan(tmp_path):
    from vdtome.engine.engine import ComparisonEngine
    from vdtome.engine.report import metric_rows
    from vdtome.engine.request import ComparisonRequest
    from vdtome.measure.protocol import TENSOR_PEAK

    engine = ComparisonEngine(device="cpu", output_root=tmp_path, noise_dir=None)
    request = dict(preset="tiny-animatediff", prompt="a red fox", frames=16, height=64, width=64, rounds=2)
    result = engine.run(ComparisonRequest(**request, methods=(Slicing(),)), write=False)
    whole = result.timing.memory[0]
    assert whole.kind == TENSOR_PEAK and whole.exact and whole.accelerated < 0.5 * whole.baseline
    check = result.memory_plan
    assert check.accelerated.peak_bytes < check.baseline.peak_bytes
    assert 0.75 < check.accelerated.peak_bytes / check.measured_accelerated_bytes < 1.25
    assert [phase.phase for phase in result.timing.changed] == ["vae_decode"]  # measured per side, no verdict
    assert any(row[0].startswith("estimated peak, weights included") for row in metric_rows(result))
    # A stack that changes no memory pays for no extra calls and shows no plan on a CPU.
    merged = engine.run(ComparisonRequest(**request, methods=(ToMeConfig(ratio=0.5),)), write=False)
    assert merged.memory_plan is None and all(f.kind != TENSOR_PEAK for f in merged.timing.memory)


def test_the_loader_offloads_hunyuanvideo_only_on_a_gpu_below_its_threshold():
    from vdtome.engine.pipelines import loader_offloads

    preset = get_preset("hunyuanvideo")
    assert preset.offload_below_gb == 46 and preset.vae_tiling
    cuda = torch.device("cuda")
    assert loader_offloads(preset, cuda, total_bytes=40 * GIB)
    assert not loader_offloads(preset, cuda, total_bytes=80 * GIB)
    assert not loader_offloads(preset, torch.device("cpu"), total_bytes=1)
    assert not loader_offloads(get_preset("wan2.1-t2v-1.3b"), cuda, total_bytes=8 * GIB)


def test_offloading_is_refused_where_the_loader_offloads_already():
    from vdtome.methods.offload import OffloadedPipeline, apply_offload

    pipe = load_pipeline(get_preset("tiny-wan"), "cpu")
    loaded = OffloadedPipeline(pipe, Offload(mode="group_block"), torch.device("cpu"))  # as a loader would
    try:
        with pytest.raises(TypeError, match="offloads already"):
            apply_offload(pipe, Offload())
    finally:
        loaded.remove()
