"""Activation slicing's hooks (its declaration, config, form and the why are in
:mod:`vdtome.methods.slicing`): feed-forward networks over row chunks, math-path attention over
query chunks, and the image VAE's decode frame by frame, each counted for the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_processor import Attention
from torch.overrides import TorchFunctionMode

from vdtome.core.chunks import (attention_chunk, attention_in_query_chunks, feed_forward_chunk, query_chunk,
                                rows_in_chunks, runs_on_math_path)
from vdtome.core.denoisers import denoisers_of
from vdtome.core.phases import DENOISING, VAE_DECODE
from vdtome.methods.base import Evidence, MethodReport
from vdtome.methods.module_hooks import SDPA_KERNEL, attach, detach, sdpa_arguments
from vdtome.methods.slicing import NAME, Slicing, summary

HOOK = "vdtome_slicing"


@dataclass
class SliceStats:
    calls: int = 0
    sliced_calls: int = 0
    chunks: int = 0
    widest_unsliced_bytes: int = 0  # the largest inner activation one call would have made
    widest_sliced_bytes: int = 0  # ... and the largest it made
    widest_rows: int = 0  # the rows of the call with the widest inner activation
    widest_chunk: int = 0  # ... and its rows per chunk
    attention_calls: int = 0  # scaled-dot-product attention calls inside the denoiser's attention modules
    math_path_calls: int = 0  # ... that PyTorch would have run on its math path
    attention_sliced_calls: int = 0
    widest_scores_bytes: int = 0  # the largest score matrix a math-path call would have held
    widest_sliced_scores_bytes: int = 0  # ... and the largest it held

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
        chunk = feed_forward_chunk(rows, width, inner, self.config.chunk_tokens)
        stats = self.stats
        stats.calls += 1
        bytes_per_row = inner * hidden_states.element_size()
        if rows * bytes_per_row > stats.widest_unsliced_bytes:
            stats.widest_unsliced_bytes = rows * bytes_per_row
            stats.widest_rows, stats.widest_chunk = rows, min(chunk, rows)
        if chunk >= rows:
            stats.widest_sliced_bytes = max(stats.widest_sliced_bytes, rows * bytes_per_row)
            return original(hidden_states, *args, **kwargs)
        stats.chunks += -(-rows // chunk)
        stats.sliced_calls += 1
        stats.widest_sliced_bytes = max(stats.widest_sliced_bytes, chunk * bytes_per_row)
        return rows_in_chunks(original, hidden_states, chunk, *args, **kwargs)


class _QueryChunkedAttention(TorchFunctionMode):
    """Active inside one attention module's call: its ``scaled_dot_product_attention`` runs over
    chunks of queries when PyTorch would run it on the math path."""

    def __init__(self, config: Slicing, stats: SliceStats) -> None:
        super().__init__()
        self.config = config
        self.stats = stats

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA_KERNEL:
            return func(*args, **kwargs)
        call = sdpa_arguments(args, kwargs)
        query, key = call["query"], call["key"]
        stats = self.stats
        stats.attention_calls += 1
        if not runs_on_math_path(**call):
            return func(*args, **kwargs)
        stats.math_path_calls += 1
        length = query.shape[-2]
        # One query's scores: (batch x heads) x keys.
        score_row = query.numel() // query.shape[-1] // length * key.shape[-2] * query.element_size()
        chunk = query_chunk(attention_chunk(query, key, self.config.chunk_tokens), length,
                            call.get("is_causal", False), call.get("dropout_p", 0.0))
        stats.widest_scores_bytes = max(stats.widest_scores_bytes, length * score_row)
        stats.attention_sliced_calls += chunk < length
        stats.widest_sliced_scores_bytes = max(stats.widest_sliced_scores_bytes, chunk * score_row)
        return attention_in_query_chunks(chunk, **call)


class SlicedAttention(ModelHook):
    """Runs one attention module's call under :class:`_QueryChunkedAttention`."""

    def __init__(self, config: Slicing, stats: SliceStats) -> None:
        super().__init__()
        self.mode = lambda: _QueryChunkedAttention(config, stats)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        with self.mode():
            return self.fn_ref.original_forward(*args, **kwargs)


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
        self.attentions = [m for d in self.denoisers for m in d.modules()
                           if isinstance(m, (Attention, AttentionModuleMixin))] if config.attention else []
        attach(self.modules, lambda module: SlicedFeedForward(config, self.stats), HOOK, self.denoisers)
        attach(self.attentions, lambda module: SlicedAttention(config, self.stats), HOOK, self.denoisers)
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
        if self.config.attention:
            phases.add(DENOISING)
            if s.math_path_calls:
                evidence.append(Evidence("math-path attention calls run over query chunks", s.attention_sliced_calls,
                                         s.math_path_calls))
                rows.append(("widest attention scores (one call / sliced)",
                             f"{_mib(s.widest_scores_bytes)} / {_mib(s.widest_sliced_scores_bytes)}",
                             f"{s.math_path_calls} of {s.attention_calls} attention calls on PyTorch's math path"))
            elif s.attention_calls:
                notes.append(f"all {s.attention_calls} attention calls ran on a fused kernel, which never holds the "
                             "score matrix: attention slicing had nothing to save")
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
                    "widest_sliced_bytes": s.widest_sliced_bytes, "widest_rows": s.widest_rows,
                    "widest_chunk": s.widest_chunk, "attention_modules": len(self.attentions),
                    "attention_calls": s.attention_calls, "math_path_calls": s.math_path_calls,
                    "attention_sliced_calls": s.attention_sliced_calls,
                    "widest_scores_bytes": s.widest_scores_bytes,
                    "widest_sliced_scores_bytes": s.widest_sliced_scores_bytes, "vae_sliced": self.vae_sliced,
                    "vae_decoder_calls": self.decodes["decoder calls"]},
            evidence=tuple(evidence),
            phases=frozenset(phases),
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
