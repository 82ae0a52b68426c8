"""Memory methods on the tiny random-weight pipelines and at real widths (CPU, offline).

Slicing must compute exactly what the model computes (bitwise for the feed-forward chunks) while
the tensors held at once really shrink (counted by :class:`TensorMemoryMeter`); step rehash must
really skip deep UNet blocks, say how many, and change nothing when it may not reuse. Removal
leaves no hook and the output as before.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vdtome.core.phases import DENOISING, VAE_DECODE
from vdtome.core.presets import get_preset
from vdtome.core.validation import RequestError
from vdtome.measure.memory import TensorMemoryMeter
from vdtome.methods import METHODS, apply_stack, check_stack
from vdtome.core.chunks import attention_in_query_chunks, feed_forward_chunk
from vdtome.methods.slicing import Slicing
from vdtome.core.diffusers_compat import hooks_under
from vdtome.methods.layerwise_casting import LayerwiseCasting
from vdtome.methods.offload import Offload, OffloadedPipeline
from vdtome.methods.step_rehash import StepRehash, deep_blocks
from vdtome.methods.vae_tiling import VaeTiling
from vdtome.offline import tiny
from vdtome.tome import ToMeConfig

TRANSFORMERS = ("tiny-wan", "tiny-wan22", "tiny-cogvideox", "tiny-cogvideox-rotary", "tiny-ltx")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(preset_name: str):
    pipe = tiny.build_tiny(get_preset(preset_name))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, preset_name: str, steps: int = 4, output_type: str = "latent", **size) -> torch.Tensor:
    preset = get_preset(preset_name)
    call = dict(num_frames=preset.num_frames, height=preset.height, width=preset.width) | size
    output = pipe(prompt="a red fox", num_inference_steps=steps, guidance_scale=preset.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(0), output_type=output_type, **call)
    return output.frames


def leftover_hooks(*models) -> list[str]:
    found = []
    for model in models:
        for path, module in model.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.hooks:
                found.append(f"{path or 'model'}: {', '.join(registry.hooks)}")
            if module._forward_pre_hooks or module._forward_hooks:
                found.append(f"{path or 'model'}: torch hooks")
    return found


# ---- the meter


def test_the_tensor_meter_counts_what_is_held_at_once_and_what_is_freed():
    with TensorMemoryMeter() as meter:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more
        view = b.view(-1)  # shares b's storage: nothing more
        del a
        held = meter.current_bytes
        c = view + 1  # 4 MB while b is alive: the peak stays 8 MB
        meter.mark("first")
        del b, view, c
    assert held == 4_000_000
    assert meter.peak_bytes == 8_000_000 and meter.peaks["first"] == 8_000_000
    assert meter.current_bytes == 0


# ---- slicing


def test_a_section_of_the_meter_closes_at_a_modules_first_call():
    """The denoising loop's peak leaves out what the text encoding held before it (its section closes
    at the denoiser's first call); the hook goes with the block."""
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad(), TensorMemoryMeter() as meter, meter.section_before("text encoding", [layer]):
        transient = torch.zeros(1000)
        del transient
        for _ in range(3):
            layer(torch.zeros(1, 4))
        meter.mark("denoising")
    assert meter.peaks["text encoding"] == 4000 and meter.peaks["denoising"] < 100
    assert meter.peak_bytes == 4000 and not layer._forward_pre_hooks


@pytest.mark.parametrize("preset", (*TRANSFORMERS, "tiny-animatediff"))
def test_slicing_computes_exactly_what_the_model_computes(preset):
    pipe = build(preset)
    before = generate(pipe, preset)
    with apply_stack(pipe, [Slicing(chunk_tokens=16)]) as stack:
        sliced = generate(pipe, preset)
        report = stack.reports()[0]
    assert torch.equal(sliced, before)
    calls = report.evidence[0]
    assert calls.label == "feed-forward calls run in chunks" and calls.count == calls.of > 0
    assert report.detail["chunks"] > calls.count  # more than one chunk per call
    assert leftover_hooks(*[m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]) == []
    assert torch.equal(generate(pipe, preset), before)


def test_auto_chunks_keep_the_inner_activation_no_wider_than_the_input():
    assert feed_forward_chunk(rows=10_000, width=1536, inner=8960, chunk_tokens=0) == 1714
    assert feed_forward_chunk(rows=10_000, width=1536, inner=8960, chunk_tokens=512) == 512
    assert 1714 * 8960 <= 10_000 * 1536


def real_width_wan_block():
    """Wan 2.1 1.3B's widths (1536 wide, 12 heads of 128, feed-forward 8960), one block, 768 tokens."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=64, freq_dim=256, ffn_dim=8960, num_layers=1,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                  rope_max_seq_len=1024).eval()
    inputs = dict(hidden_states=torch.randn(1, 16, 3, 32, 32), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 16, 64), return_dict=False)

    def forward() -> tuple[torch.Tensor, int]:
        with torch.no_grad(), TensorMemoryMeter() as meter:
            out = model(**inputs)[0]
        return out, meter.peak_bytes

    return model, forward


def test_slicing_lowers_the_peak_of_a_real_width_wan_block_and_changes_no_value():
    """The feed-forward's 8960-wide activation (and GELU's copy of it) is the largest thing a block
    of Wan 2.1 1.3B holds (PyTorch's fused attention never holds the scores)."""
    model, forward = real_width_wan_block()

    torch.set_num_threads(2)  # as the engine runs: bitwise must hold with intra-op threads too

    plain, plain_peak = forward()
    with apply_stack(model, [Slicing()]) as stack:
        sliced, sliced_peak = forward()
        report = stack.reports()[0]
    assert torch.equal(sliced, plain)
    inner = 768 * 8960 * 4
    assert report.detail["widest_unsliced_bytes"] == inner
    assert report.detail["widest_sliced_bytes"] <= 768 * 1536 * 4
    # Two full-width activations (the linear's output and GELU's) are gone.
    assert plain_peak - sliced_peak > 1.5 * inner * (1 - 1536 / 8960)
    assert leftover_hooks(model) == []


@pytest.mark.parametrize("mask", ["none", "per_query", "per_key", "bool_2d", "causal"])
def test_attention_over_query_chunks_equals_one_call(mask):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 8)
    kwargs = {"none": {}, "per_query": {"attn_mask": torch.randn(2, 1, 50, 40)},
              "per_key": {"attn_mask": torch.randn(2, 1, 1, 40)},
              "bool_2d": {"attn_mask": torch.rand(50, 40) > 0.3}, "causal": {"is_causal": True}}[mask]
    with sdpa_kernel(SDPBackend.MATH):
        whole = F.scaled_dot_product_attention(q, k, v, **kwargs)
        chunked = attention_in_query_chunks(7, q, k, v, **kwargs)
    # The same math per query; a matrix product over 7 rows may round differently from one over 50.
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-6)


def test_attention_slicing_lowers_the_peak_on_the_math_path_and_leaves_fused_kernels_alone():
    """The same real-width block: where PyTorch would run attention on its math path (forced here),
    the 12 x 768 x 768 score matrix is held in chunks of 128 queries, bitwise equal; with PyTorch's
    own choice on a CPU (a fused kernel) every call is left alone and the report says so."""
    model, forward = real_width_wan_block()
    scores = 12 * 768 * 768 * 4
    with sdpa_kernel(SDPBackend.MATH):
        plain, plain_peak = forward()
        with apply_stack(model, [Slicing(feed_forward=False)]) as stack:
            sliced, sliced_peak = forward()
            report = stack.reports()[0]
    assert torch.equal(sliced, plain)
    assert report.detail["math_path_calls"] == report.detail["attention_calls"] == 2  # self and cross
    assert [(e.label, e.count, e.of) for e in report.evidence] == [
        ("math-path attention calls run over query chunks", 1, 2)]  # 16 text keys: the cross-attention's fit
    assert report.detail["widest_scores_bytes"] == scores
    assert report.detail["widest_sliced_scores_bytes"] == 12 * 128 * 768 * 4
    assert plain_peak - sliced_peak > 0.3 * scores  # the scores and softmax's copy went; the FFN is the peak now
    with apply_stack(model, [Slicing(feed_forward=False)]) as stack:
        fused, _ = forward()
        report = stack.reports()[0]
    assert torch.allclose(fused, plain, atol=1e-5)
    assert report.evidence == () and report.detail["math_path_calls"] == 0
    assert any("ran on a fused kernel" in note for note in report.notes)
    assert leftover_hooks(model) == []


@pytest.mark.parametrize("preset", ["tiny-ltx", "tiny-cogvideox", "tiny-animatediff"])
def test_attention_slicing_computes_exactly_what_the_math_path_computes(preset):
    """LTX (a text mask), CogVideoX (text and video in one attention), AnimateDiff (spatial, cross
    and temporal attention): chunks of 16 queries on the math path give the same video within float
    rounding (bitwise on LTX and AnimateDiff here; CogVideoX's products over fewer rows round
    differently in the last bit: 1.8e-6 on values of 1.9 after two steps)."""
    pipe = build(preset)
    with sdpa_kernel(SDPBackend.MATH):
        before = generate(pipe, preset, steps=2)
        with apply_stack(pipe, [Slicing(chunk_tokens=16, feed_forward=False)]) as stack:
            sliced = generate(pipe, preset, steps=2)
            report = stack.reports()[0]
    assert torch.allclose(sliced, before, rtol=0, atol=1e-5 * before.abs().max().item())
    calls = next(e for e in report.evidence if e.label == "math-path attention calls run over query chunks")
    assert 0 < calls.count <= calls.of
    assert leftover_hooks(*[m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]) == []


def test_slicing_decodes_animatediff_frame_by_frame_with_a_lower_peak():
    pipe = build("tiny-animatediff")
    size = dict(num_frames=16, height=128, width=128)

    def video() -> tuple[torch.Tensor, int]:
        with TensorMemoryMeter() as meter:
            frames = generate(pipe, "tiny-animatediff", steps=2, output_type="pt", **size)
        return frames, meter.peak_bytes

    plain, plain_peak = video()
    with apply_stack(pipe, [Slicing()]) as stack:
        sliced, sliced_peak = video()
        report = stack.reports()[0]
    assert report.phases == {DENOISING, VAE_DECODE}
    decoded = report.evidence[1]
    assert decoded.label == "VAE decoder calls on one frame" and decoded.count == decoded.of == 16
    assert sliced_peak < 0.8 * plain_peak
    # A convolution over a batch of 16 and over one frame may round differently: float tolerance.
    assert torch.allclose(sliced, plain, atol=1e-4)
    assert pipe.vae.use_slicing is False
    assert leftover_hooks(pipe.unet, pipe.vae) == []


def test_slicing_says_a_video_vae_is_left_as_it_was():
    pipe = build("tiny-wan")
    with apply_stack(pipe, [Slicing()]) as stack:
        generate(pipe, "tiny-wan", steps=1, output_type="np")
        report = stack.reports()[0]
    assert report.phases == {DENOISING}
    assert any("AutoencoderKLWan as it was" in note for note in report.notes)


def test_slicing_stacks_with_token_merging():
    pipe = build("tiny-wan")
    merged = apply_stack(pipe, [ToMeConfig(ratio=0.5)])
    try:
        expected = generate(pipe, "tiny-wan")
    finally:
        merged.remove()
    with apply_stack(pipe, [ToMeConfig(ratio=0.5), Slicing(chunk_tokens=16)]) as stack:
        both = generate(pipe, "tiny-wan")
        reports = stack.reports()
    assert torch.equal(both, expected)
    assert [r.method for r in reports] == ["tome", "slicing"] and all(r.acted for r in reports)


def test_slicing_fields_are_checked_naming_the_form_field():
    with pytest.raises(RequestError, match="tokens per chunk") as caught:
        Slicing(chunk_tokens=-1)
    assert caught.value.field == "slicing_chunk_tokens"
    assert METHODS["slicing"].from_form({"slicing_chunk_tokens": 512}) == Slicing(chunk_tokens=512)


# ---- step rehash


STEPS = 10


def test_step_rehash_in_interval_mode_skips_the_deep_blocks_between_full_steps():
    pipe = build("tiny-animatediff")
    before = generate(pipe, "tiny-animatediff", steps=STEPS)
    deep = len(deep_blocks(pipe.unet))
    with apply_stack(pipe, [StepRehash(mode="interval", interval=3)]) as stack:
        reused = generate(pipe, "tiny-animatediff", steps=STEPS)
        report = stack.reports()[0]
    # Full steps 0, 3, 6, 9 (one CFG-batched UNet call each); the other six reuse every deep block.
    assert report.detail["reused_calls"] == 6 and report.detail["calls"] == STEPS
    assert report.evidence[0].count == 6 * deep and report.evidence[0].of == STEPS * deep
    assert not torch.equal(reused, before)
    assert leftover_hooks(pipe.unet) == []
    assert torch.equal(generate(pipe, "tiny-animatediff", steps=STEPS), before)


def test_step_rehash_by_similarity_reuses_only_below_its_threshold():
    pipe = build("tiny-animatediff")
    before = generate(pipe, "tiny-animatediff", steps=STEPS)
    with apply_stack(pipe, [StepRehash(threshold=0.0)]) as stack:
        never = generate(pipe, "tiny-animatediff", steps=STEPS)
        never_report = stack.reports()[0]
    with apply_stack(pipe, [StepRehash(threshold=1.0, interval=3)]) as stack:
        often = generate(pipe, "tiny-animatediff", steps=STEPS)
        stack_report = stack.reports()[0]
        stack.reset()
        again = generate(pipe, "tiny-animatediff", steps=STEPS)
    assert torch.equal(never, before) and not never_report.acted
    assert len(never_report.detail["changes"]) == STEPS - 1  # every step after the first was measured
    assert any("never reused" in note for note in never_report.notes)
    # At most interval - 1 = 2 reused steps in a row: steps 1, 2, 4, 5, 7, 8 reuse.
    assert stack_report.detail["reused_calls"] == 6 and stack_report.acted
    assert torch.equal(often, again) and not torch.equal(often, before)


def test_step_rehash_stacks_with_token_merging_on_animatediff():
    pipe = build("tiny-animatediff")
    with apply_stack(pipe, [ToMeConfig(ratio=0.5), StepRehash(mode="interval", interval=2)]) as stack:
        generate(pipe, "tiny-animatediff", steps=4)
        reports = stack.reports()
    assert [r.method for r in reports] == ["tome", "step_rehash"] and all(r.acted for r in reports)
    assert leftover_hooks(pipe.unet) == []


@pytest.mark.parametrize("preset", TRANSFORMERS)
def test_step_rehash_is_refused_for_transformers_with_the_reason(preset):
    pipe = build(preset)
    with pytest.raises(RequestError, match="is a transformer: step rehash reuses a UNet's deep"):
        apply_stack(pipe, [StepRehash()])
    assert leftover_hooks(*[m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]) == []


# ---- diffusers' weight and decode placement


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("preset", ["tiny-wan", "tiny-wan22", "tiny-animatediff"])
def test_layerwise_casting_stores_fp8_weights_and_removal_restores_them_bitwise(preset):
    pipe = build(preset)
    models = [m for m in (getattr(pipe, n, None) for n in ("transformer", "transformer_2", "unet")) if m is not None]
    states = [state_of(m) for m in models]
    before = generate(pipe, preset, steps=2)
    with apply_stack(pipe, [LayerwiseCasting()]) as stack:
        cast = generate(pipe, preset, steps=2)
        report = stack.reports()[0]
        dtypes = {p.dtype for m in models for p in m.parameters()}
    assert torch.float8_e4m3fn in dtypes
    assert report.acted and 0 < report.detail["weight_bytes_after"] < report.detail["weight_bytes_before"]
    assert report.detail["denoiser_calls"] > 0
    # Slightly different (float8 weights), not broken.
    assert not torch.equal(cast, before) and (cast - before).abs().mean() < 0.1 * before.abs().mean()
    assert leftover_hooks(*models) == []
    for model, state in zip(models, states):
        after = model.state_dict()
        assert all(torch.equal(after[name], tensor) and after[name].dtype == tensor.dtype for name, tensor in state.items())
    assert torch.equal(generate(pipe, preset, steps=2), before)


def test_vae_tiling_decodes_in_tiles_with_a_lower_peak_and_removal_restores_the_vae():
    pipe = build("tiny-wan")
    size = dict(num_frames=9, height=256, width=256)
    saved = {name: getattr(pipe.vae, name) for name in ("use_tiling", "tile_sample_min_height",
                                                         "tile_sample_stride_height")}

    def video() -> tuple[torch.Tensor, int]:
        with TensorMemoryMeter() as meter:
            frames = generate(pipe, "tiny-wan", steps=1, output_type="pt", **size)
        return frames, meter.peak_bytes

    plain, plain_peak = video()
    with apply_stack(pipe, [VaeTiling(tile_px=128)]) as stack:
        tiled, tiled_peak = video()
        report = stack.reports()[0]
    assert report.phases == {VAE_DECODE}
    assert report.detail["tiled_decodes"] == 1 and report.evidence[0].count > 0
    assert tiled_peak < 0.9 * plain_peak
    assert tiled.shape == plain.shape and not torch.equal(tiled, plain)
    assert {name: getattr(pipe.vae, name) for name in saved} == saved
    assert "tiled_decode" not in vars(pipe.vae) and leftover_hooks(pipe.vae) == []
    assert torch.equal(video()[0], plain)


def test_vae_tiling_says_when_the_preset_tiles_already():
    pipe = build("tiny-wan")
    pipe.vae.enable_tiling(tile_sample_min_height=128, tile_sample_min_width=128)
    with apply_stack(pipe, [VaeTiling()]) as stack:
        generate(pipe, "tiny-wan", steps=1, output_type="pt", num_frames=5, height=256, width=256)
        report = stack.reports()[0]
    assert not report.acted and report.detail["tile_decoder_calls"] > 0
    assert any("decodes in tiles of the VAE's default size already" in note for note in report.notes)
    assert pipe.vae.use_tiling is True


def test_a_tile_size_cogvideox_cannot_take_is_refused_and_leaves_nothing():
    pipe = build("tiny-cogvideox")
    with pytest.raises(TypeError, match="decodes in tiles of its own size only"):
        apply_stack(pipe, [VaeTiling(tile_px=128)])
    assert pipe.vae.use_tiling is False and leftover_hooks(pipe.vae) == []
    with pytest.raises(RequestError, match="at least 32 px") as caught:
        VaeTiling(tile_px=16)
    assert caught.value.field == "vae_tiling_tile_px"


def test_offloading_is_refused_on_a_cpu_pipeline_naming_the_reason():
    pipe = build("tiny-wan")
    with pytest.raises(TypeError, match="computes on the CPU, where there is nothing to offload to"):
        apply_stack(pipe, [Offload()])
    assert leftover_hooks(pipe.transformer, pipe.vae, pipe.text_encoder) == []


@pytest.mark.parametrize("mode", ["model", "group_block", "group_leaf"])
@pytest.mark.parametrize("preset", ["tiny-wan", "tiny-animatediff"])
def test_offloading_hooks_apply_and_remove_exactly(preset, mode):
    """On the CPU nothing moves, but diffusers' hooks are attached and taken off as on a GPU: the
    output is unchanged while they run and nothing of them is left after."""
    pipe = build(preset)
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    before = generate(pipe, preset, steps=2, output_type="pt")
    offloaded = OffloadedPipeline(pipe, Offload(mode=mode), torch.device("cpu"))
    try:
        if mode == "model":
            assert any(hasattr(m, "_hf_hook") for m in modules)
        else:
            assert all(hooks_under(m) for m in modules if list(m.parameters()))
        during = generate(pipe, preset, steps=2, output_type="pt")
        report = offloaded.report()
    finally:
        offloaded.remove()
    assert torch.equal(during, before)
    assert not report.acted and report.notes == ("computing on the CPU: nothing moved",)
    assert report.phases == {"text_encoding", "denoising", "vae_decode"}
    assert not any(hasattr(sub, "_hf_hook") for m in modules for sub in m.modules())
    assert leftover_hooks(*modules) == []
    assert torch.equal(generate(pipe, preset, steps=2, output_type="pt"), before)


def test_offloading_must_come_last_in_a_stack():
    with pytest.raises(RequestError, match="offloading must come last in the stack") as caught:
        check_stack([Offload(), LayerwiseCasting()])
    assert caught.value.field == "use_offload"
    check_stack([LayerwiseCasting(), Offload()])
