"""Mochi (``MochiTransformer3DModel``): joint attention (video first, text last) and FFN.

RoPE is (cos, sin), each (S, heads, head_dim / 2); a per-sample matching gives it a batch axis,
which the processor broadcasts correctly. The encoder mask covers text only and stays as is.
"""

from __future__ import annotations

from vdtome.tome.adapters.base import Adapter, latent_grid
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

ADAPTER = Adapter(
    name="mochi",
    model_classes=("MochiTransformer3DModel",),
    blocks=lambda model: list(model.transformer_blocks),
    sites=lambda block: SITES,
    read_grid=lambda model, call: (latent_grid(call["hidden_states"], (1, model.config.patch_size, model.config.patch_size)), None),
    text_after_video=True,
)
