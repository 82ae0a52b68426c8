"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): self-attention with RoPE, cross-attention, FFN.

RoPE is a (cos, sin) pair, each (1, S, 1, head_dim), applied inside the processor, so it is
gathered per kept token. Per-token timesteps (Wan 2.2 TI2V) only touch the block's modulation,
which runs at full size before the merge.
"""

from __future__ import annotations

from vdtome.tome.adapters.base import Adapter, latent_grid
from vdtome.tome.sites import MergeSite, gather_rotary

SITES = (
    MergeSite("self_attn", "attn1", transforms=(("rotary_emb", gather_rotary(token_dim=1, batched=True)),)),
    MergeSite("cross_attn", "attn2"),
    MergeSite("ffn", "ffn"),
)

ADAPTER = Adapter(
    name="wan",
    model_classes=("WanTransformer3DModel",),
    blocks=lambda model: list(model.blocks),
    sites=lambda block: SITES,
    read_grid=lambda model, call: (latent_grid(call["hidden_states"], tuple(model.config.patch_size)), None),
)
