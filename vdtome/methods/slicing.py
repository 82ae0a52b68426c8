"""Exact activation slicing (Streamlined Inference's feature slicer): the same outputs, a lower peak.

A feed-forward network is token-wise (linear, activation, linear), so running it over chunks of
tokens and writing each chunk's output into one preallocated tensor computes exactly what one call
computes, while its widest activation (tokens x inner width, 4x the model width in most video DiTs,
and the activation makes a second one) only ever exists for one chunk. Every ``FeedForward`` of the
denoiser is sliced: the DiT blocks', the UNet's spatial transformers' and its motion modules' (which
see (batch x height x width, frames, channels): slicing over all their rows is slicing over space).
Where the pipeline decodes frames as a batch of images (AnimateDiff's image VAE), the decode runs
one frame at a time (diffusers' VAE slicing), also exact.

Bitwise equal on CPU (each output row is computed by the same kernel whatever the number of rows);
on CUDA a GEMM may pick another tiling for another row count: equal within float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention import FeedForward

from vdtome.core.denoisers import denoisers_of
from vdtome.core.phases import DENOISING, VAE_DECODE
from vdtome.methods.base import Evidence, Method, MethodReport
from vdtome.methods.module_hooks import attach, detach
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "slicing"
HOOK = "vdtome_slicing"


@dataclass(frozen=True)
class Slicing:
    """``chunk_tokens``: rows per feed-forward chunk (0: auto, chunks small enough that the widest
    activation is no larger than the block's input); ``vae``: decode frame by frame where the VAE
    takes frames as its batch."""

    chunk_tokens: int = setting(0, "Tokens per chunk", "rows per feed-forward chunk; 0: auto (the inner "
                                "activation never exceeds the block's input)", 0, 1_048_576, 256, sweepable=True)
    feed_forward: bool = setting(True, "Slice feed-forward networks", "run every feed-forward over chunks of tokens")
    vae: bool = setting(True, "Slice the VAE decode", "decode frame by frame where the VAE takes frames as a batch "
                        "(AnimateDiff); video VAEs decode one video, which slicing cannot split")

    def __post_init__(self) -> None:
        check_settings(self, NAME)


FIELDS = form_fields(Slicing, NAME)


def parse(values: Mapping[str, Any]) -> Slicing:
    return Slicing(**config_values(Slicing, NAME, values))


def summary(config: Slicing) -> str:
    parts = [f"chunk {config.chunk_tokens or 'auto'}"] if config.feed_forward else []
    if config.vae:
        parts.append("vae")
    return " ".join(parts)


def chunk_rows(rows: int, width: int, inner: int, chunk_tokens: int) -> int:
    """Rows per chunk: ``chunk_tokens``, or with 0 the most whose inner activation (rows x inner) is
    no larger than the input (rows x width)."""
    if chunk_tokens:
        return chunk_tokens
    return max(1, rows * width // max(inner, 1))


@dataclass
class SliceStats:
    calls: int = 0
    sliced_calls: int = 0
    chunks: int = 0
    widest_unsliced_bytes: int = 0  # the largest inner activation one call would have made
    widest_sliced_bytes: int = 0  # ... and the largest it made

    def clear(self) -> None:
        vars(self).update(vars(SliceStats()))


class SlicedFeedForward(ModelHook):
    """Runs a ``FeedForward`` over row chunks into a preallocated output."""

    def __init__(self, config: Slicing, stats: SliceStats) -> None:
        super().__init__()
        self.config = config
        self.stats = stats

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
        original = self.fn_ref.original_forward
        width = hidden_states.shape[-1]
        inner = _inner_width(module)
        rows = hidden_states.numel() // width
        chunk = chunk_rows(rows, width, inner, self.config.chunk_tokens)
        stats = self.stats
        stats.calls += 1
        bytes_per_row = inner * hidden_states.element_size()
        stats.widest_unsliced_bytes = max(stats.widest_unsliced_bytes, rows * bytes_per_row)
        if chunk >= rows:
            stats.widest_sliced_bytes = max(stats.widest_sliced_bytes, rows * bytes_per_row)
            return original(hidden_states, *args, **kwargs)
        flat = hidden_states.reshape(rows, width)
        out = None
        for start in range(0, rows, chunk):
            piece = original(flat[start:start + chunk], *args, **kwargs)
            if out is None:
                out = piece.new_empty((rows, piece.shape[-1]))
            out[start:start + piece.shape[0]] = piece
            stats.chunks += 1
        stats.sliced_calls += 1
        stats.widest_sliced_bytes = max(stats.widest_sliced_bytes, chunk * bytes_per_row)
        return out.reshape(*hidden_states.shape[:-1], out.shape[-1])


def _inner_width(module: torch.nn.Module) -> int:
    """The widest activation's width: the output features of the network's first linear layer."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            return layer.out_features
    return 0


class _DecodeCount(ModelHook):
    """Counts the VAE decoder's calls and the frames each one took (the evidence of slicing)."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def new_forward(self, module: torch.nn.Module, sample: torch.Tensor, *args, **kwargs):
        self.counts["decoder calls"] += 1
        self.counts["one frame"] += sample.shape[0] == 1
        return self.fn_ref.original_forward(sample, *args, **kwargs)


def decodes_frames_as_batch(vae: Any) -> bool:
    """Whether a VAE decodes images (4D latents): a video pipeline then passes frames as its batch,
    which diffusers' VAE slicing splits exactly. Video VAEs (3D convolutions) take one video."""
    from diffusers import AutoencoderKL

    return isinstance(vae, AutoencoderKL) and hasattr(vae, "use_slicing")


class AppliedSlicing:
    def __init__(self, pipe: Any, config: Slicing) -> None:
        self.config = config
        self.denoisers = denoisers_of(pipe)
        self.stats = SliceStats()
        self.vae = getattr(pipe, "vae", None)
        self.vae_sliced = bool(config.vae and decodes_frames_as_batch(self.vae))
        self.vae_was_slicing = bool(getattr(self.vae, "use_slicing", False))
        self.decodes = {"decoder calls": 0, "one frame": 0}
        self.modules = [m for d in self.denoisers for m in d.modules() if isinstance(m, FeedForward)] \
            if config.feed_forward else []
        attach(self.modules, lambda module: SlicedFeedForward(config, self.stats), HOOK, self.denoisers)
        if self.vae_sliced:
            try:
                attach([self.vae.decoder], lambda module: _DecodeCount(self.decodes), HOOK, [self.vae])
            except BaseException:
                detach(self.denoisers, HOOK)
                raise
            self.vae.use_slicing = True

    def reset(self) -> None:
        self.stats.clear()  # the hooks hold this object
        self.decodes.update({"decoder calls": 0, "one frame": 0})

    def remove(self) -> None:
        detach(self.denoisers, HOOK)
        if self.vae_sliced:
            detach([self.vae], HOOK)
            self.vae.use_slicing = self.vae_was_slicing

    def report(self) -> MethodReport:
        s = self.stats
        rows = []
        notes = []
        evidence = []
        phases = set()
        if self.config.feed_forward:
            evidence.append(Evidence("feed-forward calls run in chunks", s.sliced_calls, s.calls))
            rows.append(("widest feed-forward activation (one call / sliced)",
                         f"{_mib(s.widest_unsliced_bytes)} / {_mib(s.widest_sliced_bytes)}",
                         f"{s.chunks} chunks in {s.sliced_calls} of {s.calls} calls"))
            phases.add(DENOISING)
            if not self.modules:
                notes.append("slicing found no diffusers FeedForward in this denoiser: nothing to slice")
        if self.config.vae:
            if self.vae_sliced:
                evidence.append(Evidence("VAE decoder calls on one frame", self.decodes["one frame"],
                                         self.decodes["decoder calls"]))
                phases.add(VAE_DECODE)
            else:
                notes.append(f"VAE slicing left {type(self.vae).__name__} as it was: it decodes a whole video at once "
                             "(3D convolutions across frames), which slicing cannot split exactly")
        return MethodReport(
            method=NAME,
            summary={"settings": summary(self.config)},
            rows=tuple(rows),
            notes=tuple(notes),
            detail={"feed_forward_modules": len(self.modules), "calls": s.calls, "sliced_calls": s.sliced_calls,
                    "chunks": s.chunks, "widest_unsliced_bytes": s.widest_unsliced_bytes,
                    "widest_sliced_bytes": s.widest_sliced_bytes, "vae_sliced": self.vae_sliced,
                    "vae_decoder_calls": self.decodes["decoder calls"]},
            evidence=tuple(evidence),
            phases=frozenset(phases),
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


METHOD = Method(
    name=NAME,
    label="activation slicing",
    config_type=Slicing,
    apply=AppliedSlicing,
    fields=FIELDS,
    parse=parse,
    summary=summary,
    steps_alike=lambda config: True,
    changes_memory=True,
    docs="runs feed-forward networks over chunks of tokens and the image VAE frame by frame: exact outputs, a "
         "lower activation peak (Streamlined Inference's feature slicer)",
)
