"""The tiny random-weight pipelines and models (vdtome.offline.tiny): they run, are deterministic and offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers / huggingface_hub read it

import numpy as np
import pytest
import torch

from vdtome.core.presets import load_presets
from vdtome.offline import tiny
from vdtome.offline.tiny import TINY_CONSTRAINTS

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")  # Mochi RoPE, harmless

PROMPT, NEGATIVE = "a cat dancing on the beach at night", "blurry, low quality"

# pipeline id -> (builder, TINY_CONSTRAINTS key)
PIPELINES = {
    "wan": (tiny.tiny_wan_pipeline, "wan"),
    "wan22": (tiny.tiny_wan22_pipeline, "wan22"),
    "cogvideox-2b": (lambda seed=0: tiny.tiny_cogvideox_pipeline(rotary=False, seed=seed), "cogvideox"),
    "cogvideox-5b": (lambda seed=0: tiny.tiny_cogvideox_pipeline(rotary=True, seed=seed), "cogvideox"),
    "ltx": (tiny.tiny_ltx_pipeline, "ltx"),
    "animatediff": (tiny.tiny_animatediff_pipeline, "animatediff"),
}

TRANSFORMERS = {
    "wan": tiny.tiny_wan_transformer,
    "cogvideox-2b": lambda: tiny.tiny_cogvideox_transformer(rotary=False),
    "cogvideox-5b": lambda: tiny.tiny_cogvideox_transformer(rotary=True),
    "cogvideox-1.5": lambda: tiny.tiny_cogvideox_transformer(rotary=True, patch_size_t=2),
    "ltx": tiny.tiny_ltx_transformer,
    "hunyuan_video": tiny.tiny_hunyuan_video_transformer,
    "mochi": tiny.tiny_mochi_transformer,
    "unet_motion": tiny.tiny_unet_motion_model,
}


def generate(pipe, key, seed=0, steps=2, **overrides):
    """One CFG run at the constraint table's known-good size, as a (frames, height, width, 3) array."""
    kwargs = dict(TINY_CONSTRAINTS[key]["call"])
    kwargs.update(overrides)
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        guidance_scale=5.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    )
    frames = np.asarray(out.frames)
    assert frames.shape[0] == 1  # one prompt, one video
    return frames[0]


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def built(request):
    builder, key = PIPELINES[request.param]
    state = torch.get_rng_state()
    pipe = builder()
    assert torch.equal(torch.get_rng_state(), state), "building must not touch the global RNG"
    return request.param, pipe, key


def test_pipeline_runs_with_cfg_and_is_deterministic(built):
    name, pipe, key = built
    call = TINY_CONSTRAINTS[key]["call"]
    first = generate(pipe, key, seed=0)
    assert first.shape == (call["num_frames"], call["height"], call["width"], 3), name
    assert first.dtype == np.float32
    assert np.isfinite(first).all()
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert first.std() > 1e-3, "output should not be constant"
    np.testing.assert_array_equal(generate(pipe, key, seed=0), first)
    assert not np.array_equal(generate(pipe, key, seed=1), first), "the generator must matter"


def test_pipeline_components_are_tiny_real_classes_in_eval_mode(built):
    name, pipe, _ = built
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert modules, name
    for component, module in modules.items():
        assert not module.training, f"{name}.{component} left in training mode"
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())
    total = sum(p.numel() for m in modules.values() for p in m.parameters())
    assert total < 2_000_000, f"{name} has {total} parameters"


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_same_seed_same_weights_other_seed_other_weights(name):
    builder, _ = PIPELINES[name]
    a, b, c = builder(seed=0), builder(seed=0), builder(seed=1)
    for component, module in a.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        sa, sb, sc = module.state_dict(), b.components[component].state_dict(), c.components[component].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), component
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point()), component


def test_wan22_switches_experts_at_the_boundary():
    pipe = tiny.tiny_wan22_pipeline()
    assert pipe.config.boundary_ratio == TINY_CONSTRAINTS["wan22"]["boundary_ratio"]
    params_1 = dict(pipe.transformer.named_parameters())
    params_2 = dict(pipe.transformer_2.named_parameters())
    assert any(not torch.equal(params_1[k], params_2[k]) for k in params_1), "experts should differ"
    calls = []
    pipe.transformer.register_forward_hook(lambda *_: calls.append("high"))
    pipe.transformer_2.register_forward_hook(lambda *_: calls.append("low"))
    generate(pipe, "wan22", steps=TINY_CONSTRAINTS["wan22"]["min_steps_for_both_experts"])
    # Each step runs its expert twice (cond + uncond): step 1 (t=999) high noise, step 2 (t=750) low.
    assert calls == ["high", "high", "low", "low"]


def test_wan_survives_save_and_from_pretrained(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = tiny.tiny_wan_pipeline()
    before = generate(pipe, "wan")
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)  # a local path: no hub access
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    assert loaded.tokenizer(PROMPT).input_ids == pipe.tokenizer(PROMPT).input_ids
    for component, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            sa, sb = module.state_dict(), loaded.components[component].state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), component
    # Safetensors weights are memory-mapped at addresses that are not 64-byte aligned, so CPU matmuls
    # take other vector paths and round differently in the last bit.
    np.testing.assert_allclose(generate(loaded, "wan"), before, rtol=0, atol=1e-5)
    # Copied into ordinary (aligned) memory, the loaded weights give the very same output.
    for module in loaded.components.values():
        if isinstance(module, torch.nn.Module):
            for param in module.parameters():
                param.data = param.data.clone()
    np.testing.assert_array_equal(generate(loaded, "wan"), before)


def test_cogvideox_frame_rule_is_real():
    """Frames must be 8k+1: an even number of latent frames decodes to 4 per latent frame."""
    pipe = tiny.tiny_cogvideox_pipeline()
    assert generate(pipe, "cogvideox", num_frames=17, height=32, width=48).shape == (17, 32, 48, 3)
    assert generate(pipe, "cogvideox", num_frames=13, height=32, width=32).shape[0] == 16


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_bare_transformer_forward(name):
    state = torch.get_rng_state()
    model = TRANSFORMERS[name]()
    inputs = tiny.tiny_transformer_inputs(model)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
        again = model(**inputs, return_dict=False)[0]
    latents = inputs.get("hidden_states", inputs.get("sample"))
    assert out.shape == latents.shape  # every one predicts noise / velocity in the input's layout
    assert torch.isfinite(out).all() and out.std() > 1e-3
    assert torch.equal(out, again)


def test_hunyuan_video_has_dual_and_single_stream_blocks():
    model = tiny.tiny_hunyuan_video_transformer()
    assert len(model.transformer_blocks) >= 2 and len(model.single_transformer_blocks) >= 2
    assert sum(model.config.rope_axes_dim) == model.config.attention_head_dim
    with pytest.raises(ValueError):
        tiny.tiny_hunyuan_video_transformer(rope_axes_dim=(2, 4, 4))


def test_cogvideox_positional_layouts():
    two_b = tiny.tiny_cogvideox_transformer(rotary=False)
    five_b = tiny.tiny_cogvideox_transformer(rotary=True)
    assert not two_b.config.use_rotary_positional_embeddings and two_b.patch_embed.use_positional_embeddings
    assert five_b.config.use_rotary_positional_embeddings and not five_b.patch_embed.use_positional_embeddings
    assert not five_b.config.use_learned_positional_embeddings
    assert two_b.config.max_text_seq_length == TINY_CONSTRAINTS["cogvideox"]["max_sequence_length"]


def test_word_level_tokenizer_behaves_like_t5_for_the_pipelines(tmp_path):
    from transformers import AutoTokenizer

    tok = tiny.tiny_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    batch = tok(
        [PROMPT, "Zyzzyva!"],
        padding="max_length",
        max_length=16,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = batch.input_ids, batch.attention_mask
    assert ids.shape == mask.shape == (2, 16)
    words = PROMPT.split()
    assert mask[0].sum() == len(words) + 1 and ids[0, len(words)] == tok.eos_token_id
    assert tok.unk_token_id not in ids[0].tolist()  # every prompt word is in the vocabulary
    assert ids[1, :3].tolist() == [tok.unk_token_id, tok.unk_token_id, tok.eos_token_id]  # word + "!"
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert tok("A CAT").input_ids == tok("a cat").input_ids  # lowercased
    long = tok(" ".join(["cat"] * 100), max_length=16, truncation=True).input_ids
    assert len(long) == 16 and long[-1] == tok.eos_token_id
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(PROMPT).input_ids == tok(PROMPT).input_ids
    assert tiny.tiny_t5_encoder().config.vocab_size == len(tok) == tiny.tiny_umt5_encoder().config.vocab_size


def test_clip_tokenizer_is_real_bpe_with_whole_words(tmp_path):
    from transformers import CLIPTokenizer

    tok = tiny.tiny_clip_tokenizer()
    assert isinstance(tok, CLIPTokenizer) and tok.model_max_length == 77
    pieces = tok.convert_ids_to_tokens(tok(PROMPT).input_ids)
    assert pieces == ["<|startoftext|>", *(w + "</w>" for w in PROMPT.split()), "<|endoftext|>"]
    assert len(tok("zyzzyva").input_ids) > 3  # unknown words still tokenize, in pieces
    assert tiny.tiny_clip_text_encoder().config.vocab_size == len(tok)
    tok.save_pretrained(tmp_path)
    assert CLIPTokenizer.from_pretrained(tmp_path)(PROMPT).input_ids == tok(PROMPT).input_ids


# The tiny presets' constraints (vdtome/data/presets/models.json) are the one statement of the builders' input
# rules; TINY_CONSTRAINTS names, per pipeline, the presets and the facts those rules follow from.
TINY_PRESETS = {name: preset for name, preset in load_presets().items() if preset.is_builtin}
RULES_KEY = {name: key for key, spec in TINY_CONSTRAINTS.items() for name in spec.get("presets", ())}


def implied_rules(pipe, key):
    """(frames_multiple, frames_offset, side_multiple) implied by the built pipeline's own factors."""
    if key in ("wan", "wan22"):
        patch = pipe.transformer.config.patch_size
        return pipe.vae_scale_factor_temporal, 1, pipe.vae_scale_factor_spatial * patch[1]
    if key == "cogvideox":  # latent frames must be odd: 2 x the temporal factor, plus one
        return 2 * pipe.vae_scale_factor_temporal, 1, pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size
    if key == "ltx":
        return pipe.vae_temporal_compression_ratio, 1, pipe.vae_spatial_compression_ratio * pipe.transformer.config.patch_size
    assert key == "animatediff", key
    return 1, 0, pipe.vae_scale_factor


def test_every_tiny_preset_is_a_tiny_pipeline():
    assert set(RULES_KEY) == set(TINY_PRESETS)
    builders = {key: builder for builder, key in PIPELINES.values()}
    assert set(RULES_KEY.values()) <= set(builders)


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_preset_rules_follow_from_the_pipeline(name):
    preset, key = TINY_PRESETS[name], RULES_KEY[name]
    rules, facts, pipe = preset.constraints, TINY_CONSTRAINTS[key], tiny.build_tiny(preset)
    assert (rules.frames_multiple, rules.frames_offset, rules.side_multiple) == implied_rules(pipe, key)
    vae = facts["vae_scale_factor"]
    if key == "ltx":
        assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (vae["spatial"], vae["temporal"])
    elif key == "animatediff":
        assert pipe.vae_scale_factor == vae["spatial"] == 8
        assert type(pipe.unet).__name__ == "UNetMotionModel"
        assert rules.max_frames <= pipe.unet.config.motion_max_seq_length == 32
    else:
        assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (vae["spatial"], vae["temporal"])
    call = facts["call"]
    assert not rules.check(call["num_frames"], call["height"], call["width"])


def honoured(pipe, key, frames, height, width):
    """Whether the pipeline makes a video of exactly this size (False: it refused, or made another)."""
    try:
        video = generate(pipe, key, num_frames=frames, height=height, width=width)  # 2 steps: LTX needs 2
    except (ValueError, RuntimeError):
        return False
    return video.shape[:3] == (frames, height, width)


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_pipeline_accepts_exactly_what_its_preset_allows(name):
    """Runs at the rules' extremes give the size asked for; one step off a rule does not."""
    preset, key = TINY_PRESETS[name], RULES_KEY[name]
    rules, pipe = preset.constraints, tiny.build_tiny(preset)
    (f_lo, f_hi), (s_lo, s_hi), m = rules.valid_frame_range, rules.valid_side_range, rules.side_multiple
    for size in ((f_lo, s_lo, s_lo + m), (f_hi, s_lo, s_lo), (f_lo, s_hi, s_lo)):
        assert not rules.check(*size)
        assert honoured(pipe, key, *size), (name, size)
    off_rule = [(f_lo, s_lo + m // 2, s_lo), (f_lo, s_lo, s_lo + m // 2)]
    if rules.frames_multiple > 1:
        off_rule.append((f_lo + 1, s_lo, s_lo))
    for size in off_rule:
        assert rules.check(*size)
        assert not honoured(pipe, key, *size), (name, size)
