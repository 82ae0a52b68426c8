"""Exact activation slicing (Streamlined Inference's feature slicer): the same outputs, a lower peak.

A feed-forward network is token-wise (linear, activation, linear), so running it over chunks of
tokens and writing each chunk's output into one preallocated tensor computes exactly what one call
computes, while its widest activation (tokens x inner width, 4x the model width in most video DiTs,
and the activation makes a second one) only ever exists for one chunk. Every ``FeedForward`` of the
denoiser is sliced: the DiT blocks', the UNet's spatial transformers' and its motion modules' (which
see (batch x height x width, frames, channels): slicing over all their rows is slicing over space).

Attention (self and cross) runs over chunks of queries where PyTorch would run it on its math path,
the only kernel that holds the whole score matrix (queries x keys per head: at 30k tokens, 3.6 GB a
head in fp32); flash, memory-efficient and PyTorch's CPU attention never hold it, so there slicing
leaves the call alone and says so. The motion modules' attention over frames holds frames x frames
scores per position, no larger than its queries while frames <= head width: the auto rule leaves it
whole and its feed-forward carries the spatial chunks.

Where the pipeline decodes frames as a batch of images (AnimateDiff's image VAE), the decode runs
one frame at a time (diffusers' VAE slicing), also exact.

Feed-forward chunks are bitwise equal on CPU (each output row is computed by the same kernel
whatever the number of rows); attention chunks are equal within float rounding (a matrix product
over fewer query rows may round the last bit differently), as is everything on CUDA, where a GEMM
may pick another tiling for another row count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.methods.base import Deferred, Method
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "slicing"


@dataclass(frozen=True)
class Slicing:
    """``chunk_tokens``: rows per feed-forward chunk and queries per attention chunk (0: auto, chunks
    whose widest activation is no larger than the block's input); ``attention``: slice attention
    that would run on PyTorch's math path; ``vae``: decode frame by frame where the VAE takes frames
    as its batch."""

    chunk_tokens: int = setting(0, "Tokens per chunk", "rows per feed-forward chunk and queries per attention "
                                "chunk; 0: auto (a chunk's widest activation never exceeds the block's input)",
                                0, 1_048_576, 256, sweepable=True)
    feed_forward: bool = setting(True, "Slice feed-forward networks", "run every feed-forward over chunks of tokens")
    attention: bool = setting(True, "Slice attention", "run attention over chunks of queries where PyTorch would "
                              "hold the whole score matrix (its math path); fused kernels never hold it")
    vae: bool = setting(True, "Slice the VAE decode", "decode frame by frame where the VAE takes frames as a batch "
                        "(AnimateDiff); video VAEs decode one video, which slicing cannot split")

    def __post_init__(self) -> None:
        check_settings(self, NAME)


FIELDS = form_fields(Slicing, NAME)


def parse(values: Mapping[str, Any]) -> Slicing:
    return Slicing(**config_values(Slicing, NAME, values))


def summary(config: Slicing) -> str:
    parts = [f"chunk {config.chunk_tokens or 'auto'}"] if config.feed_forward or config.attention else []
    parts += [name for name in ("attention", "vae") if getattr(config, name)]
    return " ".join(parts)


METHOD = Method(
    name=NAME,
    label="activation slicing",
    config_type=Slicing,
    apply=Deferred("vdtome.methods.slicing_hooks", "AppliedSlicing"),
    fields=FIELDS,
    parse=parse,
    summary=summary,
    steps_alike=lambda config: True,
    changes_memory=True,
    graph_breaks="it chunks in Python (tensor sizes as numbers) and runs attention in a torch-function mode "
                 "dynamo cannot trace through: breaks inside every block",
    docs="runs feed-forward networks over chunks of tokens, math-path attention over chunks of queries and the "
         "image VAE frame by frame: exact outputs, a lower activation peak (Streamlined Inference's feature slicer)",
)
