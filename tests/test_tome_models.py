"""ToMe on tiny random-weight instances of the real diffusers video models.

Token counts are checked where attention really happens: every call of
``torch.nn.functional.scaled_dot_product_attention`` is recorded (all diffusers processors used
here end there), so a patch on the wrong module cannot pass unnoticed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from vdtome.core.steps import StepContext
from vdtome.offline import tiny
from vdtome.tome import SUPPORTED_MODELS, ToMeConfig, apply_tome, remove_tome
from vdtome.tome.hooks import BlockMatcher, is_registered

TEXT = 6  # text tokens in direct transformer calls


@dataclass
class AttentionCall:
    batch: int
    queries: int
    keys: int
    mask: tuple | None
    mask_value: torch.Tensor | None = None


@pytest.fixture
def attention_calls(monkeypatch):
    calls: list[AttentionCall] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, *args, **kwargs):
        mask = None if attn_mask is None else tuple(attn_mask.shape)
        mask_value = None if attn_mask is None else attn_mask.detach().clone()
        calls.append(AttentionCall(query.shape[0], query.shape[-2], key.shape[-2], mask, mask_value))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


@dataclass
class Case:
    """A tiny transformer, one call's inputs, and the video token count of that call."""

    name: str
    model: torch.nn.Module
    kwargs: dict
    video_tokens: int
    text_tokens: int
    joint: bool  # text and video share the self-attention call

    def run(self):
        with torch.no_grad():
            out = self.model(**self.kwargs, return_dict=False)[0]
        return out


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_case(name: str, batch: int = 2) -> Case:
    if name == "wan":
        model = tiny.tiny_wan_transformer()
        cfg = model.config
        frames, height, width = 3, 16, 16
        kwargs = dict(
            hidden_states=_randn(batch, cfg.in_channels, frames, height, width),
            timestep=torch.full((batch,), 700.0),
            encoder_hidden_states=_randn(batch, TEXT, cfg.text_dim, seed=1),
        )
        pt, ph, pw = cfg.patch_size
        return Case(name, model, kwargs, frames // pt * (height // ph) * (width // pw), TEXT, joint=False)
    if name in ("cogvideox", "cogvideox_rotary"):
        model = tiny.tiny_cogvideox_transformer(rotary=name.endswith("rotary"))
        cfg = model.config
        frames, height, width = 3, 8, 12
        kwargs = dict(
            hidden_states=_randn(batch, frames, cfg.in_channels, height, width),
            encoder_hidden_states=_randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, seed=1),
            timestep=torch.full((batch,), 700, dtype=torch.long),
        )
        if cfg.use_rotary_positional_embeddings:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed

            p = cfg.patch_size
            kwargs["image_rotary_emb"] = get_3d_rotary_pos_embed(
                cfg.attention_head_dim, ((0, 0), (height // p, width // p)), (height // p, width // p), frames
            )
        tokens = frames * (height // cfg.patch_size) * (width // cfg.patch_size)
        return Case(name, model, kwargs, tokens, cfg.max_text_seq_length, joint=True)
    if name == "ltx":
        model = tiny.tiny_ltx_transformer()
        cfg = model.config
        frames, height, width = 3, 4, 6
        kwargs = dict(
            hidden_states=_randn(batch, frames * height * width, cfg.in_channels),
            encoder_hidden_states=_randn(batch, TEXT, cfg.caption_channels, seed=1),
            timestep=torch.full((batch,), 700.0),
            encoder_attention_mask=torch.ones(batch, TEXT),
            num_frames=frames,
            height=height,
            width=width,
        )
        return Case(name, model, kwargs, frames * height * width, TEXT, joint=False)
    if name == "hunyuan_video":
        model = tiny.tiny_hunyuan_video_transformer()
        cfg = model.config
        frames, height, width = 3, 8, 8
        mask = torch.ones(batch, TEXT)
        mask[0, -2:] = 0  # padded prompt: the mask matters
        kwargs = dict(
            hidden_states=_randn(batch, cfg.in_channels, frames, height, width),
            timestep=torch.full((batch,), 700, dtype=torch.long),
            encoder_hidden_states=_randn(batch, TEXT, cfg.text_embed_dim, seed=1),
            encoder_attention_mask=mask,
            pooled_projections=_randn(batch, cfg.pooled_projection_dim, seed=2),
            guidance=torch.full((batch,), 6000.0),
        )
        p, pt = cfg.patch_size, cfg.patch_size_t
        return Case(name, model, kwargs, frames // pt * (height // p) * (width // p), TEXT, joint=True)
    if name == "mochi":
        model = tiny.tiny_mochi_transformer()
        cfg = model.config
        frames, height, width = 3, 8, 8
        kwargs = dict(
            hidden_states=_randn(batch, cfg.in_channels, frames, height, width),
            encoder_hidden_states=_randn(batch, TEXT, cfg.text_embed_dim, seed=1),
            timestep=torch.full((batch,), 700, dtype=torch.long),
            encoder_attention_mask=torch.ones(batch, TEXT),
        )
        p = cfg.patch_size
        return Case(name, model, kwargs, frames * (height // p) * (width // p), TEXT, joint=True)
    if name == "animatediff":
        model = tiny.tiny_unet_motion_model()
        cfg = model.config
        frames, height, width = 3, 8, 8
        kwargs = dict(
            sample=_randn(batch, cfg.in_channels, frames, height, width),
            timestep=torch.tensor(700),
            # AnimateDiffPipeline passes one copy of the prompt per frame.
            encoder_hidden_states=_randn(batch, TEXT, cfg.cross_attention_dim, seed=1).repeat_interleave(frames, 0),
        )
        return Case(name, model, kwargs, height * width, TEXT, joint=False)
    raise KeyError(name)


MODELS = ["wan", "cogvideox", "cogvideox_rotary", "ltx", "hunyuan_video", "mochi", "animatediff"]


def self_attention_lengths(calls: list[AttentionCall], case: Case) -> list[int]:
    """Video tokens that entered each self-attention call."""
    if case.joint:
        # Mochi drops padded text per sample; count the video part only.
        return [c.queries - case.text_tokens for c in calls if c.queries == c.keys and c.queries > case.text_tokens]
    return [c.queries for c in calls if c.queries == c.keys and c.queries > case.text_tokens]


@pytest.mark.parametrize("name", MODELS)
def test_ratio_zero_and_removal_reproduce_the_baseline(name):
    case = make_case(name)
    baseline = case.run()
    handle = apply_tome(case.model, ToMeConfig(ratio=0.0))
    # Ratio 0 merges nothing, so nothing is patched: the model runs its own code (an A/A comparison).
    assert not is_registered(case.model) and handle.stats().blocks_patched == 0
    assert torch.equal(case.run(), baseline)
    handle.remove()
    assert torch.equal(case.run(), baseline)
    # A merging run, then removal: bitwise the baseline again, and no hook is left behind.
    handle = apply_tome(case.model, ToMeConfig(ratio=0.5))
    assert not torch.equal(case.run(), baseline)
    remove_tome(case.model)
    assert torch.equal(case.run(), baseline)
    assert all(
        not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in case.model.modules()
    )


@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuan_video"])
def test_a_ratio_too_small_to_merge_one_token_runs_the_sub_layers_untouched(name, monkeypatch):
    case = make_case(name)
    baseline = case.run()
    ratio = 0.99 / case.video_tokens  # r = int(ratio * N) = 0
    monkeypatch.setattr(BlockMatcher, "_compute", lambda *a, **k: pytest.fail("computed a matching to merge nothing"))
    with apply_tome(case.model, ToMeConfig(ratio=ratio)) as handle:
        assert torch.equal(case.run(), baseline)
        sites = handle.stats().sites
    assert sites and all(site.calls > 0 and site.tokens_in == site.tokens_out == case.video_tokens for site in sites)


@pytest.mark.parametrize("name", MODELS)
def test_merging_reduces_the_tokens_that_reach_attention(name, attention_calls):
    case = make_case(name)
    baseline = case.run()
    full = self_attention_lengths(attention_calls, case)
    attention_calls.clear()
    config = ToMeConfig(ratio=0.5, match_window=None if name == "animatediff" else "auto")
    with apply_tome(case.model, config) as handle:
        merged_out = case.run()
        merged = self_attention_lengths(attention_calls, case)
        stats = handle.stats()
    assert full and len(merged) == len(full)
    n = case.video_tokens
    if name == "animatediff":
        # Every UNet level merges its own per-frame grid; the largest level has h * w tokens.
        assert max(full) == n and all(m < f for m, f in zip(merged, full))
    else:
        assert set(full) == {n}
        assert set(merged) == {n - n // 2}, f"attention saw {set(merged)} video tokens, expected {n - n // 2}"
    assert stats.effective_ratio == pytest.approx(0.5, abs=0.05)
    assert all(site.tokens_out < site.tokens_in for site in stats.sites)
    assert merged_out.shape == baseline.shape
    assert torch.isfinite(merged_out).all()
    assert not torch.allclose(merged_out, baseline, atol=1e-4)


def run_steps(case: Case, timesteps) -> list[torch.Tensor]:
    """One output per denoising step, the timestep varied as a sampler would."""
    outputs = []
    for t in timesteps:
        timestep = case.kwargs["timestep"]
        case.kwargs["timestep"] = torch.full_like(timestep, t)
        try:
            outputs.append(case.run())
        finally:
            case.kwargs["timestep"] = timestep
    return outputs


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_gives_bitwise_identical_outputs(name):
    case = make_case(name)
    steps = (900, 600, 300)
    with apply_tome(case.model, ToMeConfig(ratio=0.5, seed=3)) as handle:
        first = run_steps(case, steps)
        second = run_steps(case, steps)  # a new run is detected from the timesteps turning back
        handle.reset()
        third = run_steps(case, steps)
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)
    with apply_tome(case.model, ToMeConfig(ratio=0.5, seed=4)):
        other_seed = run_steps(case, steps)
    assert not torch.equal(first[0], other_seed[0])


@pytest.mark.parametrize("name", MODELS)
def test_tome_does_not_touch_the_global_rng(name):
    case = make_case(name)
    with apply_tome(case.model, ToMeConfig(ratio=0.5)):
        state = torch.get_rng_state()
        case.run()
        assert torch.equal(torch.get_rng_state(), state)


def test_text_tokens_are_never_merged_in_joint_attention(attention_calls):
    case = make_case("cogvideox")
    with apply_tome(case.model, ToMeConfig(ratio=0.5, merge_ffn=True)):
        case.run()
    n, text = case.video_tokens, case.text_tokens
    assert {c.queries for c in attention_calls} == {text + n - n // 2}


def test_hunyuan_attention_mask_is_rebuilt_for_the_reduced_sequence(attention_calls):
    case = make_case("hunyuan_video")
    with apply_tome(case.model, ToMeConfig(ratio=0.5)):
        case.run()
    n = case.video_tokens
    reduced = n - n // 2 + case.text_tokens
    masked = [c for c in attention_calls if c.mask is not None and c.queries > case.text_tokens]  # not the text refiner
    assert masked and all(c.queries == reduced and c.mask[-1] == reduced for c in masked)
    # Sample 0's prompt has 2 padding tokens: exactly those keys stay masked, every video key is kept.
    padded = torch.tensor([True] * (reduced - 2) + [False] * 2)
    for call in masked:
        keys = call.mask_value.reshape(call.mask_value.shape[0], -1)[:, -reduced:].bool()
        assert torch.equal(keys[0], padded) and bool(keys[1].all())


def test_every_other_block_and_explicit_blocks(attention_calls):
    case = make_case("wan")
    blocks = len(case.model.blocks)
    assert blocks >= 2
    n = case.video_tokens
    with apply_tome(case.model, ToMeConfig(ratio=0.5, blocks="every_other")) as handle:
        case.run()
        assert sorted({site.block for site in handle.stats().sites}) == list(range(0, blocks, 2))
    lengths = self_attention_lengths(attention_calls, case)
    assert lengths == [n - n // 2 if i % 2 == 0 else n for i in range(blocks)]
    with pytest.raises(ValueError, match="out of range"):
        apply_tome(case.model, ToMeConfig(blocks=(blocks,)))


def test_cross_attention_and_ffn_targets(attention_calls):
    case = make_case("wan")
    n, text = case.video_tokens, case.text_tokens
    seen_by_ffn = []
    # A plain torch hook inside the FFN (its first projection) sees what the FFN really computes on.
    probe = case.model.blocks[0].ffn.net[0].register_forward_pre_hook(
        lambda module, args: seen_by_ffn.append(args[0].shape[1])
    )
    try:
        config = ToMeConfig(ratio=0.5, merge_self_attn=False, merge_cross_attn=True, merge_ffn=True)
        with apply_tome(case.model, config) as handle:
            case.run()
            targets = {site.target for site in handle.stats().sites}
    finally:
        probe.remove()
    assert targets == {"cross_attn", "ffn"}
    cross = [c for c in attention_calls if c.keys == text]
    selfs = [c for c in attention_calls if c.keys != text]
    assert {c.queries for c in cross} == {n - n // 2}
    assert {c.queries for c in selfs} == {n}
    assert seen_by_ffn == [n - n // 2]


@pytest.mark.parametrize("strategy", ["bipartite", "attnbin"])
def test_per_sample_matching_where_supported(strategy):
    config = ToMeConfig(ratio=0.5, matching="per_sample", strategy=strategy)
    for name in ("wan", "ltx", "mochi"):
        case = make_case(name)
        with apply_tome(case.model, config) as handle:
            out = case.run()
            kept = {site.tokens_out for site in handle.stats().sites}
        assert torch.isfinite(out).all() and kept == {case.video_tokens - case.video_tokens // 2}
        # Each sample is matched on its own tokens: it comes out as it would alone in the batch.
        for index in range(out.shape[0]):
            alone = make_case(name, batch=1)
            alone.kwargs = {
                key: value[index : index + 1] if isinstance(value, torch.Tensor) and value.dim() else value
                for key, value in case.kwargs.items()
            }
            with apply_tome(alone.model, config):
                torch.testing.assert_close(alone.run(), out[index : index + 1], rtol=1e-4, atol=1e-5)
        shared = make_case(name)
        with apply_tome(shared.model, ToMeConfig(ratio=0.5, strategy=strategy)):
            assert not torch.allclose(shared.run(), out, atol=1e-4)
    for name in ("cogvideox_rotary", "hunyuan_video"):
        case = make_case(name)
        with pytest.raises(ValueError, match="matching='shared'"):
            apply_tome(case.model, ToMeConfig(matching="per_sample"))


def test_unsupported_models_and_bad_configs_fail_loudly():
    with pytest.raises(TypeError) as error:
        apply_tome(torch.nn.Linear(4, 4))
    assert "Linear" in str(error.value) and all(name in str(error.value) for name in SUPPORTED_MODELS)
    case = make_case("cogvideox")
    with pytest.raises(ValueError, match="nothing to patch"):
        apply_tome(case.model, ToMeConfig(merge_self_attn=False, merge_cross_attn=True))
    with apply_tome(case.model, ToMeConfig()):
        with pytest.raises(RuntimeError, match="already applied"):
            apply_tome(case.model, ToMeConfig())
    for bad in (dict(ratio=1.0), dict(ratio=-0.1), dict(stride=(1, 0, 2)), dict(blocks="odd"),
                dict(reuse_steps=0), dict(strategy="attnbin", match_window=(2, 2, 2)),
                dict(merge_self_attn=False)):
        with pytest.raises(ValueError):
            ToMeConfig(**bad)


def test_attnbin_strategy_runs_and_merges(attention_calls):
    case = make_case("wan")
    with apply_tome(case.model, ToMeConfig(ratio=0.5, strategy="attnbin")) as handle:
        out = case.run()
        assert handle.config.match_window is None
    n = case.video_tokens
    assert set(self_attention_lengths(attention_calls, case)) == {n - n // 2}
    assert torch.isfinite(out).all()


def test_grid_is_read_from_the_latent_at_run_time(attention_calls):
    case = make_case("wan")
    with apply_tome(case.model, ToMeConfig(ratio=0.5)):
        case.run()
        bigger = dict(case.kwargs, hidden_states=_randn(2, case.model.config.in_channels, 5, 16, 32))
        with torch.no_grad():
            case.model(**bigger)
    n_big = 5 * 8 * 16
    lengths = self_attention_lengths(attention_calls, case)
    assert set(lengths) == {case.video_tokens - case.video_tokens // 2, n_big - n_big // 2}


# ---- full pipelines ------------------------------------------------------------------------------

PIPELINES = {
    "wan": (lambda: tiny.tiny_wan_pipeline(), dict(num_frames=9, height=32, width=32)),
    "cogvideox": (lambda: tiny.tiny_cogvideox_pipeline(rotary=False), dict(num_frames=9, height=32, width=32)),
    "cogvideox_rotary": (lambda: tiny.tiny_cogvideox_pipeline(rotary=True), dict(num_frames=9, height=32, width=32)),
    # LTX compresses 32x in space: 128 px gives a 4 x 4 latent per frame.
    "ltx": (lambda: tiny.tiny_ltx_pipeline(), dict(num_frames=9, height=128, width=128)),
}


def run_pipeline(pipe, size, seed=0, steps=3):
    first_latent = []

    def remember(module, args, kwargs):
        if not first_latent:
            first_latent.append(kwargs.get("hidden_states", args[0] if args else None).clone())

    hook = pipe.transformer.register_forward_pre_hook(remember, with_kwargs=True)
    try:
        frames = pipe(
            prompt="a red fox runs through fresh snow",
            negative_prompt="blurry",
            guidance_scale=5.0,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            **size,
        ).frames
    finally:
        hook.remove()
    return frames, first_latent[0]


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_full_pipeline_with_cfg_runs_with_tome(name, attention_calls):
    build, size = PIPELINES[name]
    pipe = build()
    baseline, base_latent = run_pipeline(pipe, size)
    attention_calls.clear()
    with apply_tome(pipe, ToMeConfig(ratio=0.5)) as handle:
        first, first_latent = run_pipeline(pipe, size)
        stats = handle.stats()
        second, _ = run_pipeline(pipe, size)
    assert torch.equal(first_latent, base_latent), "ToMe changed the sampled initial latents"
    assert torch.equal(first, second), "same seed, different accelerated videos"
    assert first.shape == baseline.shape and torch.isfinite(first).all()
    assert not torch.equal(first, baseline)
    assert stats.effective_ratio == pytest.approx(0.5, abs=0.05) and all(s.calls > 0 for s in stats.sites)
    after, _ = run_pipeline(pipe, size)
    assert torch.equal(after, baseline)


def test_wan22_patches_both_experts():
    pipe = tiny.tiny_wan22_pipeline()
    size = PIPELINES["wan"][1]
    with apply_tome(pipe, ToMeConfig(ratio=0.5)) as handle:
        run_pipeline(pipe, size, steps=4)
        assert {id(m) for m in handle.models} == {id(pipe.transformer), id(pipe.transformer_2)}
        per_model = [sum(site.calls for site in p.sites) for p in handle.patched]
    assert all(calls > 0 for calls in per_model), f"an expert never merged: {per_model}"


@pytest.fixture
def computed(monkeypatch) -> list[tuple[int, int]]:
    """(block, step) of every matching computed (not reused) while the test runs."""
    seen = []
    original = BlockMatcher._compute

    def counting(self, video, grid, step):
        seen.append((self.block_index, step))
        return original(self, video, grid, step)

    monkeypatch.setattr(BlockMatcher, "_compute", counting)
    return seen


def test_reuse_steps_recomputes_matching_every_k_steps(monkeypatch, computed):
    pipe = tiny.tiny_wan_pipeline()

    def no_host_reads(*args):
        raise AssertionError("a pipeline's steps come from its scheduler: no timestep is read on the host")

    monkeypatch.setattr(StepContext, "_advance_by_value", no_host_reads)
    size = PIPELINES["wan"][1]
    blocks = len(pipe.transformer.blocks)
    with apply_tome(pipe, ToMeConfig(ratio=0.5, reuse_steps=1)):
        run_pipeline(pipe, size, steps=4)
    every_call = len(computed)
    # Wan calls the transformer twice per step (cond, uncond): 4 steps x 2 calls x blocks.
    assert every_call == 4 * 2 * blocks
    computed.clear()
    with apply_tome(pipe, ToMeConfig(ratio=0.5, reuse_steps=2)):
        reused, _ = run_pipeline(pipe, size, steps=4)
    # Steps 0 and 2 compute, for cond and uncond separately.
    assert sorted({step for _, step in computed}) == [0, 2]
    assert len(computed) == 2 * 2 * blocks
    assert torch.isfinite(reused).all()
    # Removed with the last user: the scheduler's own methods and no hook left.
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    assert not pipe.transformer._forward_pre_hooks and not hasattr(pipe, "_vdtome_step_context")


def test_whole_first_steps_run_every_token_then_merging_starts(computed):
    """``whole_steps=k``: the first k steps match and merge nothing, the later steps do; k at the
    steps' count reproduces the baseline bitwise."""
    pipe = tiny.tiny_wan_pipeline()
    size = PIPELINES["wan"][1]
    baseline, _ = run_pipeline(pipe, size, steps=4)
    with apply_tome(pipe, ToMeConfig(ratio=0.5)) as handle:
        run_pipeline(pipe, size, steps=4)
        every_step = handle.stats().effective_ratio
    computed.clear()
    with apply_tome(pipe, ToMeConfig(ratio=0.5, whole_steps=2)) as handle:
        merged_late, _ = run_pipeline(pipe, size, steps=4)
        late = handle.stats().effective_ratio
    assert sorted({step for _, step in computed}) == [2, 3]  # steps 0 and 1 whole
    assert late == pytest.approx(every_step / 2, abs=0.02)  # half the sub-layer calls merged
    with apply_tome(pipe, ToMeConfig(ratio=0.5, whole_steps=4)) as handle:
        whole, _ = run_pipeline(pipe, size, steps=4)
        assert handle.stats().effective_ratio == 0
    assert torch.equal(whole, baseline) and not torch.equal(merged_late, baseline)


def _track(timesteps) -> list[tuple[int, int, int]]:
    """(run, step, call in step) a bare model's step context assigns to a sequence of calls."""
    context = StepContext(torch.nn.Identity())
    seen = []
    for t in timesteps:
        context._advance_by_value(torch.tensor([t, t]))
        seen.append((context.state.run, context.state.step, context.state.call_in_step))
    return seen


def test_step_tracking_follows_timesteps_in_either_direction():
    # Falling timesteps with CFG as two calls per step, then the same schedule again: a new run.
    assert _track([900, 900, 500, 500, 100, 100, 900, 900]) == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0), (1, 0, 1),
    ]
    # Mochi's timesteps rise; a rerun turns back to the first value.
    assert _track([100, 400, 700, 100, 400]) == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0)]
    # A shorter rerun that starts mid-schedule still turns against the direction of travel.
    assert _track([900, 600, 300, 600]) == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0)]


def test_reuse_steps_with_rising_timesteps(computed):
    """Mochi's sampler feeds rising timesteps: reuse must still count steps, not restart each call."""
    case = make_case("mochi")
    with apply_tome(case.model, ToMeConfig(ratio=0.5, reuse_steps=2)):
        run_steps(case, (100, 300, 500, 700))
        run_steps(case, (100, 300))
    blocks = len(case.model.transformer_blocks)
    assert [step for _, step in computed] == [0] * blocks + [2] * blocks + [0] * blocks


def test_model_cpu_offload_keeps_tome_until_removed(attention_calls):
    """accelerate re-installs ``forward`` after every offloaded pipeline call; ToMe must survive it."""
    build, size = PIPELINES["wan"]
    reference = build()
    with apply_tome(reference, ToMeConfig(ratio=0.5)):
        expected, _ = run_pipeline(reference, size, steps=2)
    baseline, _ = run_pipeline(reference, size, steps=2)
    pipe = build()
    pipe.enable_model_cpu_offload(device="cpu")
    handle = apply_tome(pipe, ToMeConfig(ratio=0.5))
    for _ in range(2):
        attention_calls.clear()
        out, _ = run_pipeline(pipe, size, steps=2)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        site = handle.stats().sites[0]
        assert site.tokens_out < site.tokens_in
        # Transformer self-attention (the VAE's attention has other lengths) saw merged tokens only.
        video = {c.queries for c in attention_calls if c.queries == c.keys} & {site.tokens_in, site.tokens_out}
        assert video == {site.tokens_out}
    handle.remove()
    torch.testing.assert_close(run_pipeline(pipe, size, steps=2)[0], baseline, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_keeps_matching_eager():
    case = make_case("wan")
    with apply_tome(case.model, ToMeConfig(ratio=0.5)):
        eager = case.run()
    compiled = torch.compile(case.model, backend="eager", fullgraph=False)
    with apply_tome(compiled, ToMeConfig(ratio=0.5)) as handle:
        with torch.no_grad():
            out = compiled(**case.kwargs, return_dict=False)[0]
        assert handle.models == [case.model]
        assert all(site.tokens_out < site.tokens_in for site in handle.stats().sites)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_ltx_explicit_video_coords_are_refused():
    case = make_case("ltx")
    batch, tokens = case.kwargs["hidden_states"].shape[:2]
    case.kwargs["video_coords"] = torch.zeros(batch, 3, tokens)
    with apply_tome(case.model, ToMeConfig(ratio=0.5)):
        with pytest.raises(ValueError, match="video_coords"):
            case.run()


def test_animatediff_level_grids_match_the_unet_at_every_size_its_preset_accepts():
    """Every (height, width) of the AnimateDiff preset: the level grids the adapter infers from a
    token count are the shapes the UNet's stride-2 downsampling convolutions really produce."""
    from vdtome.core.presets import get_preset
    from vdtome.tome.adapters.animatediff import _level_grid
    from vdtome.tome.hooks import DenoiserState

    rules = get_preset("animatediff").constraints
    downsample = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1, device="meta")  # diffusers' Downsample2D
    sides = range(rules.valid_side_range[0], rules.valid_side_range[1] + 1, rules.side_multiple)
    checked = 0
    for height in sides:
        for width in sides:
            latent = torch.empty(1, 1, height // 8, width // 8, device="meta")
            state = DenoiserState(latent_size=(1, latent.shape[2], latent.shape[3]))
            for _ in range(4):  # SD 1.5: four resolution levels
                grid = (1, latent.shape[2], latent.shape[3])
                assert _level_grid(state, math.prod(grid)) == grid, (height, width, grid)
                latent = downsample(latent)
            checked += 1
    assert checked == len(sides) ** 2 == 4225


def test_animatediff_with_four_levels_merges_at_264x288(attention_calls):
    """264x288 px = a 33x36 latent: levels 33x36, 17x18, 9x9 and 5x5 (ToMe for SD's shortcut
    placed 25 tokens on a 5x6 grid and failed)."""
    model = tiny.tiny_unet_motion_model(block_out_channels=(8, 8, 16, 16))
    frames = 2
    kwargs = dict(
        sample=_randn(2, model.config.in_channels, frames, 33, 36),
        timestep=torch.tensor(700),
        encoder_hidden_states=_randn(2, TEXT, model.config.cross_attention_dim, seed=1).repeat_interleave(frames, 0),
    )
    with torch.no_grad():
        model(**kwargs)
        full = {c.queries for c in attention_calls if c.queries == c.keys and c.queries > frames}
        attention_calls.clear()
        with apply_tome(model, ToMeConfig(ratio=0.5, match_window=None)) as handle:
            out = model(**kwargs).sample
            stats = handle.stats()
    assert {33 * 36, 17 * 18, 9 * 9, 5 * 5} <= full
    assert {site.tokens_in for site in stats.sites} == {33 * 36, 17 * 18, 9 * 9, 5 * 5} & full
    assert all(site.tokens_out < site.tokens_in for site in stats.sites)
    assert torch.isfinite(out).all()
