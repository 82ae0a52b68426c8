"""CogVideoX (``CogVideoXTransformer3DModel``): joint [text, video] attention and FFN.

The processor concatenates text before video, so the block's attention gets video-only
``hidden_states`` (merged) and text ``encoder_hidden_states`` (never merged). The FFN runs on
cat([text, video]): the text prefix passes through. CogVideoX-2b adds a 3D sin-cos position
embedding at patchify (nothing to gather); 5b and 1.5 pass RoPE (cos, sin), each (S, head_dim),
broadcast over the batch, hence a shared matching.
"""

from __future__ import annotations

from vdtome.tome.adapters.base import Adapter
from vdtome.tome.sites import MergeSite, gather_rotary

SITES = (
    MergeSite(
        "self_attn",
        "attn1",
        output_index=0,
        transforms=(("image_rotary_emb", gather_rotary(token_dim=0, batched=False)),),
    ),
    MergeSite("ffn", "ff"),
)


def _grid(model, call):
    latent = call["hidden_states"]  # (B, F, C, H, W)
    patch, patch_t = model.config.patch_size, model.config.patch_size_t or 1
    frames, height, width = latent.shape[1], latent.shape[-2], latent.shape[-1]
    return (-(-frames // patch_t), height // patch, width // patch), None


def _shared_only(model):
    if model.config.use_rotary_positional_embeddings:
        return "its rotary tables (S, head_dim) are broadcast over the batch"
    return None


ADAPTER = Adapter(
    name="cogvideox",
    model_classes=("CogVideoXTransformer3DModel",),
    blocks=lambda model: list(model.transformer_blocks),
    sites=lambda block: SITES,
    read_grid=_grid,
    shared_only=_shared_only,
)
