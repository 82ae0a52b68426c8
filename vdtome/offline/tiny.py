"""Tiny random-weight instances of the real ``diffusers`` video models and pipelines, built in code.

Why: the tests and the offline demo need the *real* classes (so the token-merging hooks meet the
same modules, attention processors and shape logic as on the full checkpoints) but cannot download
anything and must run in seconds on a small CPU. Everything here is constructed from configs in
this file: no hub call, no file read, no network.

Every builder takes ``seed: int = 0`` and builds its weights under
``torch.random.fork_rng(devices=[])`` + ``torch.manual_seed(seed)``, so the same seed always gives
the same weights and the caller's global RNG state is left exactly as it was.

Sizes mirror the real layouts where it costs nothing (VAE compression factors, patch sizes, text
encoder families, Wan 2.2's two experts, CogVideoX 2b vs 5b position embeddings) and are tiny
everywhere else (2 layers, 2 heads, 8-32 channels). ``TINY_CONSTRAINTS`` lists, per model, the
facts its input rules follow from (VAE factors, patch sizes, sequence lengths) and a call that is
known to work. The rules themselves (frame rule, side multiple, bounds) are stated once, as the tiny
presets' ``constraints`` in ``vdtome/data/presets/models.json``; tests/test_tiny.py checks them against the built
pipelines.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = [
    "TEXT_DIM",
    "TINY_CONSTRAINTS",
    "tiny_tokenizer",
    "tiny_clip_tokenizer",
    "tiny_t5_encoder",
    "tiny_umt5_encoder",
    "tiny_clip_text_encoder",
    "tiny_wan_transformer",
    "tiny_cogvideox_transformer",
    "tiny_ltx_transformer",
    "tiny_hunyuan_video_transformer",
    "tiny_mochi_transformer",
    "tiny_unet2d_condition_model",
    "tiny_motion_adapter",
    "tiny_unet_motion_model",
    "tiny_wan_vae",
    "tiny_cogvideox_vae",
    "tiny_ltx_vae",
    "tiny_sd_vae",
    "tiny_wan_pipeline",
    "tiny_wan22_pipeline",
    "tiny_cogvideox_pipeline",
    "tiny_ltx_pipeline",
    "tiny_animatediff_pipeline",
    "tiny_transformer_inputs",
]

#: Hidden size of every tiny text encoder; the transformers' text/caption/cross-attention dims match it.
TEXT_DIM = 32

#: What each tiny model's input rules follow from. ``call`` is a pipeline call known to work (add a
#: prompt, a negative prompt, ``guidance_scale`` > 1, ``num_inference_steps`` and a ``generator``).
#: ``presets``: the presets in ``vdtome/data/presets/models.json`` whose ``constraints`` state the pipeline's input
#: rules (frames k * multiple + offset, sides a multiple of ..., bounds); they are not repeated here.
TINY_CONSTRAINTS: dict[str, dict[str, Any]] = {
    "wan": {
        "pipeline": "WanPipeline (Wan 2.1 layout)",
        "presets": ("tiny-wan",),
        # frames 4k+1 (temporal factor 4; other counts are rounded down with a warning); sides a
        # multiple of 8 x patch 2 = 16 (check_inputs rejects anything else)
        "vae_scale_factor": {"spatial": 8, "temporal": 4},
        "patch_size": (1, 2, 2),
        "max_post_patch_side": 1024,  # rope_max_seq_len bounds latent frames, height / 16, width / 16
        "max_sequence_length": "any (default 512)",
        "call": {"num_frames": 9, "height": 64, "width": 64},  # 3 x 4 x 4 = 48 video tokens
    },
    "wan22": {
        "pipeline": "WanPipeline with transformer + transformer_2 (Wan 2.2 A14B layout)",
        "presets": ("tiny-wan22",),
        "vae_scale_factor": {"spatial": 8, "temporal": 4},
        "patch_size": (1, 2, 2),
        "max_post_patch_side": 1024,
        "boundary_ratio": 0.875,  # t >= 875 -> transformer (high noise), t < 875 -> transformer_2
        "min_steps_for_both_experts": 2,  # with flow_shift 3: 2 steps -> t = 999, 750
        "max_sequence_length": "any (default 512)",
        "call": {"num_frames": 9, "height": 64, "width": 64},
    },
    "cogvideox": {
        "pipeline": "CogVideoXPipeline (rotary=False: 2b layout, rotary=True: 5b layout)",
        "presets": ("tiny-cogvideox", "tiny-cogvideox-rotary"),
        # frames 8k+1: latent frames (temporal factor 4) must be odd, otherwise the VAE decodes
        # 4 * latent_frames frames, not num_frames; sides a multiple of 8 x patch 2 = 16
        "vae_scale_factor": {"spatial": 8, "temporal": 4},
        "patch_size": 2,
        # rotary=False: the sin-cos table covers exactly max_text_seq_length text tokens, so the call's
        # max_sequence_length must equal the transformer's max_text_seq_length (the pipeline's default).
        "max_sequence_length": 226,
        "attention_head_dim": "multiple of 16 when rotary=True (3D RoPE splits it 1/4, 3/8, 3/8)",
        "call": {"num_frames": 9, "height": 64, "width": 64},  # 3 x 4 x 4 = 48 video tokens
    },
    "ltx": {
        "pipeline": "LTXPipeline (LTX-Video 0.9.0 layout)",
        "presets": ("tiny-ltx",),
        # frames 8k+1 (temporal factor 8); sides a multiple of 32 (VAE patch 4 x 2^3; check_inputs
        # rejects anything else); at least 2 steps (1 step gives an empty schedule with shift_terminal)
        "vae_scale_factor": {"spatial": 32, "temporal": 8},
        "patch_size": 1,
        "max_sequence_length": "any (default 128)",
        "call": {"num_frames": 9, "height": 128, "width": 128},  # 2 x 4 x 4 = 32 video tokens
    },
    "animatediff": {
        "pipeline": "AnimateDiffPipeline (UNet2DConditionModel + MotionAdapter -> UNetMotionModel)",
        "presets": ("tiny-animatediff",),
        # any frames up to the motion adapter's motion_max_seq_length (32); sides a multiple of 8 (VAE
        # spatial 8, check_inputs; the UNet copes with odd latent sides)
        "vae_scale_factor": {"spatial": 8, "temporal": 1},
        "max_sequence_length": 77,  # CLIP tokenizer model_max_length, fixed by the pipeline
        "call": {"num_frames": 9, "height": 64, "width": 64},  # 8 x 8 latent per frame
    },
    "hunyuan_video": {
        "model": "HunyuanVideoTransformer3DModel (bare transformer, no pipeline)",
        "latent_frames": "any (patch_size_t 1)",
        "latent_side_multiple": 2,  # patch_size
        "rope_axes_dim": "sums to attention_head_dim",
        "inputs": "see tiny_transformer_inputs",
    },
    "mochi": {
        "model": "MochiTransformer3DModel (bare transformer, no pipeline)",
        "latent_frames": "any",
        "latent_side_multiple": 2,  # patch_size
        "text_dim": "multiple of 8 (attention pool over the caption uses 8 heads)",
        "inputs": "see tiny_transformer_inputs",
    },
}

# A fixed, deterministic vocabulary: a few hundred common English words, enough for demo prompts.
_WORDS = """
a about above across after again against air all almost alone along already also always am among an
and animal another any are arm around art as at autumn away baby back bad ball bank be beach bear
beautiful because bed been before behind below best between big bird black blue boat body book both
bottom box boy bridge bright brown building but by cake call camera can car castle cat city clear
close cloud cold color come cool could country cow dance dancing dark day deep desert did do dog
door down dragon dream drink drive during each early earth east eat empty end evening every eye
face fall family far farm fast father field fire fish flower fly flying food for forest free
friend from front fruit full game garden girl give glass go gold good grass gray great green ground
group hair hand happy hard has hat have he head heart heavy her here high hill him his home horse
hot house how i ice in inside into is it its jump jumping just keep kid king kitchen lake land
large last late leaf left light like line lion little long look low man many map may me moon more
morning mother mountain mouse move moving much music my near new next night no north not now
ocean of off old on one only open or orange other our out over painting paper park people person
photo pink place plane play playing please quality queen quick quiet rain red rich right river
road rock room round run running sand say sea see shadow she ship short side sky slow small smile
snow so soft some song south space spring star still stone street strong summer sun swim table
tall tea that the their them then there these they thing this through time to together top tower
town train tree under up us video view village walk walking wall warm water wave way we west wet
what when where white who wind window winter with without woman wood world worst yellow you young
""".split()

_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in the T5 family
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a build under a private CPU RNG stream: deterministic weights, caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _ready(module):
    """Eval mode, as ``from_pretrained`` returns models (direct construction starts in training mode)."""
    return module.eval()


# --------------------------------------------------------------------------------------------- text


def tiny_tokenizer(model_max_length: int = 32, words: Sequence[str] = _WORDS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer standing in for the T5 / UMT5 tokenizers (which need downloaded files).

    Lowercases, splits on whitespace and punctuation, maps unknown words to ``<unk>`` and appends
    ``</s>`` like T5 does. Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the words. It is a plain
    ``tokenizer.json`` on save, so it survives ``save_pretrained`` / ``from_pretrained``.
    """
    vocab = {token: i for i, token in enumerate((*_T5_SPECIALS, *words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-character table (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """CLIP-style BPE tables in which every word of the fixed list is a single token.

    Words are added in order: tokenize the word with the merges so far, then append the merges that
    join its pieces left to right. Merges added later rank lower, so they never split an earlier word.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        bpe = models.BPE(vocab=dict(vocab), merges=list(merges), end_of_word_suffix="</w>")
        pieces = [token.value for token in bpe.tokenize(word)]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
            pieces = [left + right, *pieces[2:]]
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    return tuple(vocab.items()), tuple(merges)


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` (byte-level BPE, ``</w>`` word ends) with a tiny vocabulary, no files.

    Laid out like CLIP's: the 256 byte characters, the same with ``</w>``, merges that make every
    word of the fixed list one token (other text still tokenizes, in smaller pieces), then
    ``<|startoftext|>`` / ``<|endoftext|>`` (also the pad token, as in CLIP).
    """
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def tiny_t5_encoder(seed: int = 0, vocab_size: int | None = None, **overrides: Any) -> T5EncoderModel:
    """T5 v1.1-style encoder (gated-GELU, as in T5-XXL used by CogVideoX and LTX): 2 layers, d_model 32."""
    config = T5Config(**_t5_config_kwargs(vocab_size, overrides))
    with _seeded(seed):
        return _ready(T5EncoderModel(config))


def tiny_umt5_encoder(seed: int = 0, vocab_size: int | None = None, **overrides: Any) -> UMT5EncoderModel:
    """UMT5 encoder (Wan's text encoder family): 2 layers, d_model 32, per-layer relative bias."""
    config = UMT5Config(**_t5_config_kwargs(vocab_size, overrides))
    with _seeded(seed):
        return _ready(UMT5EncoderModel(config))


def _t5_config_kwargs(vocab_size: int | None, overrides: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(
        vocab_size=vocab_size or len(_T5_SPECIALS) + len(_WORDS),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,  # no dropout: outputs must not depend on (or consume) the global RNG
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_clip_text_encoder(seed: int = 0, **overrides: Any) -> CLIPTextModel:
    """CLIP text encoder matching ``tiny_clip_tokenizer`` (vocab, special ids, 77 positions)."""
    tokenizer = tiny_clip_tokenizer()
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        # Not 2: CLIP then pools at the first eos token, as the released checkpoints do.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
        dropout=0.0,
    )
    kwargs.update(overrides)
    with _seeded(seed):
        return _ready(CLIPTextModel(CLIPTextConfig(**kwargs)))


# -------------------------------------------------------------------------------------- transformers


def tiny_wan_transformer(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    in_channels: int = 16,
    rope_max_seq_len: int = 1024,
    **overrides: Any,
) -> WanTransformer3DModel:
    """``WanTransformer3DModel`` with Wan 2.1's layout (patch (1, 2, 2), cross-attention to UMT5).

    ``rope_max_seq_len`` bounds every post-patch axis (latent frames, and the video's pixel height
    and width / 16); 1024 as released, it only sizes a small table.
    """
    config = dict(
        patch_size=tuple(patch_size),
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=TEXT_DIM,
        freq_dim=64,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=rope_max_seq_len,
    )
    config.update(overrides)
    with _seeded(seed):
        return _ready(WanTransformer3DModel(**config))


def tiny_cogvideox_transformer(
    rotary: bool = False,
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    patch_size: int = 2,
    patch_size_t: int | None = None,
    in_channels: int = 4,
    sample_frames: int = 9,
    sample_height: int = 8,
    sample_width: int = 8,
    max_text_seq_length: int = 226,
    **overrides: Any,
) -> CogVideoXTransformer3DModel:
    """``CogVideoXTransformer3DModel``: 2b layout (rotary=False) or 5b layout (rotary=True).

    rotary=False: fixed 3D sin-cos position table added to the joint [text, video] sequence; its
    text part has exactly ``max_text_seq_length`` rows, so the pipeline must be called with
    ``max_sequence_length == max_text_seq_length`` (226 is the pipeline's default).
    rotary=True: 3D RoPE computed by the pipeline, no learned positional embedding (``attention_head_dim``
    must be a multiple of 16). Pass ``patch_size_t=2`` for the CogVideoX 1.5 layout.
    ``sample_height`` / ``sample_width`` are latent sizes, ``sample_frames`` counts video frames (so the
    defaults mean 64 x 64 px, 9 frames); other sizes just re-derive the position tables per call.
    """
    config = dict(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        time_embed_dim=16,
        text_embed_dim=TEXT_DIM,
        num_layers=num_layers,
        sample_width=sample_width,
        sample_height=sample_height,
        sample_frames=sample_frames,
        patch_size=patch_size,
        patch_size_t=patch_size_t,
        temporal_compression_ratio=4,
        max_text_seq_length=max_text_seq_length,
        use_rotary_positional_embeddings=rotary,
        use_learned_positional_embeddings=False,
    )
    config.update(overrides)
    with _seeded(seed):
        return _ready(CogVideoXTransformer3DModel(**config))


def tiny_ltx_transformer(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    patch_size: int = 1,
    patch_size_t: int = 1,
    in_channels: int = 8,
    **overrides: Any,
) -> LTXVideoTransformer3DModel:
    """``LTXVideoTransformer3DModel`` (LTX-Video layout: patch 1, tokens are packed latents)."""
    inner_dim = num_attention_heads * attention_head_dim
    config = dict(
        in_channels=in_channels,
        out_channels=in_channels,
        patch_size=patch_size,
        patch_size_t=patch_size_t,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        cross_attention_dim=inner_dim,  # captions are projected to inner_dim before cross-attention
        num_layers=num_layers,
        caption_channels=TEXT_DIM,
    )
    config.update(overrides)
    with _seeded(seed):
        return _ready(LTXVideoTransformer3DModel(**config))


def tiny_hunyuan_video_transformer(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_refiner_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    rope_axes_dim: tuple[int, int, int] = (4, 6, 6),
    patch_size: int = 2,
    patch_size_t: int = 1,
    in_channels: int = 4,
    **overrides: Any,
) -> HunyuanVideoTransformer3DModel:
    """``HunyuanVideoTransformer3DModel``: dual-stream then single-stream blocks, guidance-distilled.

    ``rope_axes_dim`` (frames, height, width) must sum to ``attention_head_dim``.
    """
    if sum(rope_axes_dim) != attention_head_dim:
        raise ValueError(f"rope_axes_dim {rope_axes_dim} must sum to attention_head_dim {attention_head_dim}")
    config = dict(
        in_channels=in_channels,
        out_channels=in_channels,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=num_refiner_layers,
        patch_size=patch_size,
        patch_size_t=patch_size_t,
        guidance_embeds=True,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=16,
        rope_axes_dim=tuple(rope_axes_dim),
    )
    config.update(overrides)
    with _seeded(seed):
        return _ready(HunyuanVideoTransformer3DModel(**config))


def tiny_mochi_transformer(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    patch_size: int = 2,
    in_channels: int = 4,
    **overrides: Any,
) -> MochiTransformer3DModel:
    """``MochiTransformer3DModel`` (asymmetric joint attention, learned RoPE frequencies).

    The class initialises ``pos_frequencies`` to zero (RoPE would be the identity); they are drawn at
    random here, like any other weight, so that position actually matters in the tiny model.
    """
    config = dict(
        patch_size=patch_size,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        num_layers=num_layers,
        pooled_projection_dim=16,
        in_channels=in_channels,
        qk_norm="rms_norm",
        text_embed_dim=TEXT_DIM,
        time_embed_dim=16,
        activation_fn="swiglu",
        max_sequence_length=32,
    )
    config.update(overrides)
    with _seeded(seed):
        model = MochiTransformer3DModel(**config)
        torch.nn.init.normal_(model.pos_frequencies, std=0.5)
        return _ready(model)


def tiny_unet2d_condition_model(
    seed: int = 0,
    *,
    block_out_channels: tuple[int, ...] = (16, 32),
    layers_per_block: int = 1,
    attention_head_dim: int = 2,
    **overrides: Any,
) -> UNet2DConditionModel:
    """SD-1.5-shaped image UNet: cross-attention at both of its 2 resolution levels.

    ``attention_head_dim`` is the number of heads (the config name is a historical misnomer).
    """
    levels = len(block_out_channels)
    config = dict(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=attention_head_dim,
        norm_num_groups=4,
    )
    config.update(overrides)
    with _seeded(seed):
        return _ready(UNet2DConditionModel(**config))


def tiny_motion_adapter(
    seed: int = 0,
    *,
    block_out_channels: tuple[int, ...] = (16, 32),
    motion_layers_per_block: int = 1,
    **overrides: Any,
) -> MotionAdapter:
    """AnimateDiff ``MotionAdapter`` fitting ``tiny_unet2d_condition_model`` (same channels / layers)."""
    config = dict(
        block_out_channels=tuple(block_out_channels),
        motion_layers_per_block=motion_layers_per_block,
        motion_num_attention_heads=2,
        motion_norm_num_groups=4,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )
    config.update(overrides)
    with _seeded(seed):
        return _ready(MotionAdapter(**config))


def tiny_unet_motion_model(
    seed: int = 0,
    *,
    block_out_channels: tuple[int, ...] = (16, 32),
    layers_per_block: int = 1,
) -> UNetMotionModel:
    """AnimateDiff ``UNetMotionModel`` = tiny image UNet + tiny motion adapter, merged the official way."""
    unet = tiny_unet2d_condition_model(seed, block_out_channels=block_out_channels, layers_per_block=layers_per_block)
    adapter = tiny_motion_adapter(
        seed + 1, block_out_channels=block_out_channels, motion_layers_per_block=layers_per_block
    )
    with _seeded(seed):  # from_unet2d initialises a fresh model before copying the weights in
        return _ready(UNetMotionModel.from_unet2d(unet, adapter))


# ---------------------------------------------------------------------------------------------- VAEs


def tiny_wan_vae(seed: int = 0) -> AutoencoderKLWan:
    """Wan 2.1 VAE layout (z 16, 8x spatial, 4x causal temporal) with 8 base channels."""
    with _seeded(seed):
        return _ready(
            AutoencoderKLWan(
                base_dim=8,
                z_dim=16,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
            )
        )


def tiny_cogvideox_vae(seed: int = 0, latent_channels: int = 4) -> AutoencoderKLCogVideoX:
    """CogVideoX VAE layout (4 levels: 8x spatial, 4x temporal) with 8 channels per level."""
    with _seeded(seed):
        return _ready(
            AutoencoderKLCogVideoX(
                block_out_channels=(8, 8, 8, 8),
                latent_channels=latent_channels,
                layers_per_block=1,
                norm_num_groups=2,
                temporal_compression_ratio=4,
            )
        )


def tiny_ltx_vae(seed: int = 0, latent_channels: int = 8) -> AutoencoderKLLTXVideo:
    """LTX-Video 0.9.0 VAE layout (patch 4 x 3 down levels: 32x spatial, 8x temporal), 8 channels."""
    with _seeded(seed):
        return _ready(
            AutoencoderKLLTXVideo(
                latent_channels=latent_channels,
                block_out_channels=(8, 8, 8, 8),
                decoder_block_out_channels=(8, 8, 8, 8),
                layers_per_block=(1, 1, 1, 1, 1),
                decoder_layers_per_block=(1, 1, 1, 1, 1),
                spatio_temporal_scaling=(True, True, True, False),
                decoder_spatio_temporal_scaling=(True, True, True, False),
                patch_size=4,
                patch_size_t=1,
                encoder_causal=True,
                decoder_causal=False,
            )
        )


def tiny_sd_vae(seed: int = 0) -> AutoencoderKL:
    """Stable Diffusion image VAE layout (4 levels: 8x spatial, 4 latent channels), 8 channels."""
    with _seeded(seed):
        return _ready(
            AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 8, 8, 8),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=2,
                sample_size=32,
            )
        )


# ----------------------------------------------------------------------------------------- pipelines


def _assemble(pipeline_cls, seed: int, **components: Any):
    """Construct a pipeline, also under the seed: some constructors build modules themselves
    (AnimateDiff turns the image UNet + motion adapter into a fresh ``UNetMotionModel``)."""
    with _seeded(seed):
        pipe = pipeline_cls(**components)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            _ready(module)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def _wan_flow_scheduler() -> UniPCMultistepScheduler:
    # Wan's released scheduler config: UniPC on flow-matching sigmas, shift 3 (480p).
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """Wan 2.1 text-to-video: tiny ``AutoencoderKLWan`` + UMT5 + ``WanTransformer3DModel`` + UniPC (flow).

    Valid inputs: the ``tiny-wan`` preset's constraints (frames 4k+1, sides multiple of 16).
    """
    return _assemble(
        WanPipeline,
        seed,
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_umt5_encoder(seed),
        vae=tiny_wan_vae(seed),
        scheduler=_wan_flow_scheduler(),
        transformer=tiny_wan_transformer(seed),
    )


def tiny_wan22_pipeline(seed: int = 0, boundary_ratio: float = 0.875) -> WanPipeline:
    """Wan 2.2 A14B text-to-video: two experts with different weights switched at ``boundary_ratio``.

    ``transformer`` denoises timesteps >= boundary_ratio * 1000 (high noise), ``transformer_2`` the
    rest; with the UniPC flow schedule (shift 3) any run of >= 2 steps calls both.
    Valid inputs: the ``tiny-wan22`` preset's constraints.
    """
    return _assemble(
        WanPipeline,
        seed,
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_umt5_encoder(seed),
        vae=tiny_wan_vae(seed),
        scheduler=_wan_flow_scheduler(),
        transformer=tiny_wan_transformer(seed),
        transformer_2=tiny_wan_transformer(seed + 1),
        boundary_ratio=boundary_ratio,
    )


def tiny_cogvideox_pipeline(rotary: bool = False, seed: int = 0) -> CogVideoXPipeline:
    """CogVideoX text-to-video: 2b layout (rotary=False, DDIM) or 5b layout (rotary=True, DPM).

    Schedulers follow the releases: v-prediction, zero-terminal-SNR, trailing spacing; 2b uses
    ``snr_shift_scale`` 3, 5b uses 1. Valid inputs: the ``tiny-cogvideox`` preset's constraints
    (frames 8k+1, sides multiple of 16); with rotary=False ``max_sequence_length`` must stay 226.
    """
    scheduler_kwargs = dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        snr_shift_scale=1.0 if rotary else 3.0,
    )
    scheduler_cls = CogVideoXDPMScheduler if rotary else CogVideoXDDIMScheduler
    return _assemble(
        CogVideoXPipeline,
        seed,
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_t5_encoder(seed),
        vae=tiny_cogvideox_vae(seed),
        transformer=tiny_cogvideox_transformer(rotary, seed),
        scheduler=scheduler_cls(**scheduler_kwargs),
    )


def tiny_ltx_pipeline(seed: int = 0) -> LTXPipeline:
    """LTX-Video text-to-video: tiny ``AutoencoderKLLTXVideo`` (32x / 8x) + T5 + flow-matching Euler.

    Valid inputs: the ``tiny-ltx`` preset's constraints (frames 8k+1, sides multiple of 32), 2+ steps.
    """
    scheduler = FlowMatchEulerDiscreteScheduler(  # LTX-Video's released scheduler config
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return _assemble(
        LTXPipeline,
        seed,
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_t5_encoder(seed),
        vae=tiny_ltx_vae(seed),
        transformer=tiny_ltx_transformer(seed),
        scheduler=scheduler,
    )


def tiny_animatediff_pipeline(seed: int = 0) -> AnimateDiffPipeline:
    """AnimateDiff: tiny SD VAE + CLIP text encoder/tokenizer + image UNet + motion adapter, DDIM.

    The pipeline turns the ``UNet2DConditionModel`` + ``MotionAdapter`` into a ``UNetMotionModel``
    itself (``pipe.unet``). Valid inputs: the ``tiny-animatediff`` preset's constraints.
    """
    scheduler = DDIMScheduler(  # the scheduler AnimateDiff's examples use
        beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False, steps_offset=1
    )
    return _assemble(
        AnimateDiffPipeline,
        seed,
        vae=tiny_sd_vae(seed),
        text_encoder=tiny_clip_text_encoder(seed),
        tokenizer=tiny_clip_tokenizer(),
        unet=tiny_unet2d_condition_model(seed),
        motion_adapter=tiny_motion_adapter(seed + 1),
        scheduler=scheduler,
        feature_extractor=None,
        image_encoder=None,
    )


# -------------------------------------------------------------------------------------------- inputs


def tiny_transformer_inputs(
    model: torch.nn.Module,
    *,
    batch_size: int = 2,
    latent_frames: int = 3,
    latent_height: int = 4,
    latent_width: int = 4,
    text_len: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for ``model(**inputs)`` on a tiny transformer / motion UNet, as its pipeline
    would pass them (layouts differ: CogVideoX is frames-first, LTX takes packed tokens, the motion
    UNet repeats the text per frame). Drawn from a private generator: the global RNG is untouched.

    For CogVideoX without RoPE, ``text_len`` is forced to the model's ``max_text_seq_length``; with
    ``patch_size_t`` (1.5 layout), ``latent_frames`` is padded up to a multiple of it.
    """
    g = torch.Generator().manual_seed(seed)
    config = model.config
    b, f, h, w = batch_size, latent_frames, latent_height, latent_width

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    timestep = torch.full((b,), 500.0)
    if isinstance(model, WanTransformer3DModel):
        return {
            "hidden_states": randn(b, config.in_channels, f, h, w),
            "timestep": timestep,
            "encoder_hidden_states": randn(b, text_len, config.text_dim),
        }
    if isinstance(model, CogVideoXTransformer3DModel):
        if config.patch_size_t:  # CogVideoX 1.5: the pipeline pads latent frames to a multiple of p_t
            f = -(-f // config.patch_size_t) * config.patch_size_t
        inputs = {"hidden_states": randn(b, f, config.in_channels, h, w), "timestep": timestep.long()}
        if config.use_rotary_positional_embeddings:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            p = config.patch_size
            grid = (h // p, w // p)
            if config.patch_size_t is None:
                crops = get_resize_crop_region_for_grid(grid, config.sample_width // p, config.sample_height // p)
                rope = get_3d_rotary_pos_embed(config.attention_head_dim, crops, grid, f)
            else:
                rope = get_3d_rotary_pos_embed(
                    config.attention_head_dim,
                    None,
                    grid,
                    f // config.patch_size_t,
                    grid_type="slice",
                    max_size=(config.sample_height // p, config.sample_width // p),
                )
            inputs["image_rotary_emb"] = rope
        else:
            text_len = config.max_text_seq_length
        inputs["encoder_hidden_states"] = randn(b, text_len, config.text_embed_dim)
        return inputs
    if isinstance(model, LTXVideoTransformer3DModel):
        return {
            "hidden_states": randn(b, f * h * w, config.in_channels),
            "encoder_hidden_states": randn(b, text_len, config.caption_channels),
            "timestep": timestep,
            "encoder_attention_mask": torch.ones(b, text_len, dtype=torch.bool),
            "num_frames": f,
            "height": h,
            "width": w,
            "rope_interpolation_scale": (8 / 25, 32, 32),  # (temporal / frame_rate, spatial, spatial)
        }
    if isinstance(model, HunyuanVideoTransformer3DModel):
        return {
            "hidden_states": randn(b, config.in_channels, f, h, w),
            "timestep": timestep,
            "encoder_hidden_states": randn(b, text_len, config.text_embed_dim),
            "encoder_attention_mask": torch.ones(b, text_len),
            "pooled_projections": randn(b, config.pooled_projection_dim),
            "guidance": torch.full((b,), 6000.0),  # embedded guidance scale x 1000, as the pipeline does
        }
    if isinstance(model, MochiTransformer3DModel):
        return {
            "hidden_states": randn(b, config.in_channels, f, h, w),
            "encoder_hidden_states": randn(b, text_len, config.text_embed_dim),
            "timestep": timestep,
            "encoder_attention_mask": torch.ones(b, text_len, dtype=torch.bool),
        }
    if isinstance(model, UNetMotionModel):
        text = randn(b, text_len, config.cross_attention_dim)
        return {
            "sample": randn(b, config.in_channels, f, h, w),
            "timestep": timestep,
            "encoder_hidden_states": text.repeat_interleave(f, dim=0),  # one copy per frame
        }
    raise TypeError(f"no tiny inputs for {type(model).__name__}")


def build_tiny(preset, seed: int = 0):
    """Build a built-in preset's pipeline from its builder here (no download). Others raise."""
    if preset.builtin is None:
        where = f"the folder {Path(preset.local).name!r}" if preset.local else f"{preset.hub_id!r} from the hub"
        raise ValueError(f"preset {preset.name!r} loads {where}; it is not built in code")
    return globals()[preset.builtin](seed=seed, **preset.builtin_kwargs)
