"""LTX-Video (``LTXVideoTransformer3DModel``): self-attention with RoPE, cross-attention, FFN.

Tokens arrive packed (B, S, C) with the latent grid passed as ``num_frames``, ``height``,
``width``; RoPE is (cos, sin), each (B, S, inner_dim). Tokens before the last T*H*W (conditioning
latents) pass through unmerged.
"""

from __future__ import annotations

from vdtome.tome.adapters.base import Adapter
from vdtome.tome.sites import MergeSite, gather_rotary

SITES = (
    MergeSite("self_attn", "attn1", transforms=(("image_rotary_emb", gather_rotary(token_dim=1, batched=True)),)),
    MergeSite("cross_attn", "attn2"),
    MergeSite("ffn", "ff"),
)


def _grid(model, call):
    if call.get("video_coords") is not None:
        # Callers that pass explicit token coordinates (e.g. long multi-prompt image-to-video) give a
        # dummy grid; merging by it would silently touch only the last tokens.
        raise ValueError(
            "vdtome: LTX-Video token merging reads the latent grid from num_frames / height / width; calls that "
            "pass video_coords (explicit token coordinates) are not supported"
        )
    sizes = (call.get("num_frames"), call.get("height"), call.get("width"))
    if any(size is None for size in sizes):
        raise ValueError(
            "vdtome: LTX-Video token merging needs the latent grid (num_frames, height, width) in the transformer "
            "call, as LTXPipeline and LTXImageToVideoPipeline pass it; this call passed video_coords only"
        )
    return tuple(int(size) for size in sizes), None


ADAPTER = Adapter(
    name="ltx",
    model_classes=("LTXVideoTransformer3DModel",),
    blocks=lambda model: list(model.transformer_blocks),
    sites=lambda block: SITES,
    read_grid=_grid,
)
