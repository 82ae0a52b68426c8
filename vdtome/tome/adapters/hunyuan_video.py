"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): dual-stream then single-stream blocks.

Both block kinds call their attention with video-only ``hidden_states`` and text
``encoder_hidden_states``; the processor puts video first, text last. The attention mask
(B, 1, 1, S_video + L_text) is rebuilt for the reduced video length; RoPE (cos, sin), each
(S_video, head_dim), is broadcast over the batch, hence a shared matching. The single-stream
block's MLP runs in parallel with attention on the full sequence and is left alone.
"""

from __future__ import annotations

from vdtome.tome.adapters.base import Adapter, latent_grid
from vdtome.tome.sites import MergeSite, gather_mask_head, gather_rotary

_ATTENTION = (
    ("image_rotary_emb", gather_rotary(token_dim=0, batched=False)),
    ("attention_mask", gather_mask_head(dim=-1)),
)
DUAL_SITES = (
    MergeSite("self_attn", "attn", output_index=0, transforms=_ATTENTION),
    MergeSite("ffn", "ff"),
)
SINGLE_SITES = (MergeSite("self_attn", "attn", output_index=0, transforms=_ATTENTION),)
_SITES_BY_BLOCK = {
    "HunyuanVideoTransformerBlock": DUAL_SITES,
    "HunyuanVideoSingleTransformerBlock": SINGLE_SITES,
}


def _blocks(model):
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    unknown = sorted({type(b).__name__ for b in blocks} - set(_SITES_BY_BLOCK))
    if unknown:
        raise TypeError(
            f"vdtome: HunyuanVideo blocks {unknown} (e.g. image-to-video token replacement) are not supported; "
            f"supported blocks: {sorted(_SITES_BY_BLOCK)}"
        )
    return blocks


def _grid(model, call):
    patch, patch_t = model.config.patch_size, model.config.patch_size_t
    return latent_grid(call["hidden_states"], (patch_t, patch, patch)), None


ADAPTER = Adapter(
    name="hunyuan_video",
    model_classes=("HunyuanVideoTransformer3DModel",),
    blocks=_blocks,
    sites=lambda block: _SITES_BY_BLOCK[type(block).__name__],
    read_grid=_grid,
    shared_only=lambda model: "its rotary tables (S, head_dim) are broadcast over the batch",
    text_after_video=True,
)
