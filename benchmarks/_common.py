"""What the forward-speed benchmarks share: paired timing rounds, the zero-cost token drop (oracle),
the analytic FLOP model and the latent grids of each token count.

Used by benchmarks/tome_speed.py (a narrow Wan) and benchmarks/scaling.py (the real widths of
Wan 2.1 1.3B and CogVideoX-2b), so both measure and count the same way.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from vdtome.tome import ToMeConfig, apply_tome
from vdtome.tome.adapters import find_adapter
from vdtome.tome.hooks import _Call

# Video tokens per block -> latent token grid (frames, height, width after patching).
GRIDS = {
    256: (4, 8, 8),
    512: (4, 8, 16),
    1024: (4, 16, 16),
    2048: (8, 16, 16),
    4096: (4, 32, 32),
    8192: (8, 32, 32),
    16384: (16, 32, 32),
    32768: (8, 64, 64),
}


# ------------------------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def call_model(model, inputs):
    """``inputs``: positional arguments (tuple) or keyword arguments (mapping) of the forward."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def timed_forward(model, inputs, device: str) -> float:
    """Seconds of one forward; CUDA events on GPU, perf_counter on CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call_model(model, inputs)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    call_model(model, inputs)
    return time.perf_counter() - begin


@dataclass(frozen=True)
class Timings:
    """Seconds of every measured forward per variant, in the order they ran (index i of each list
    comes from the same round), and minor page faults per forward (None off Linux / on CUDA)."""

    seconds: dict[str, list[float]]
    faults: dict[str, float | None]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def paired_speedups(self, name: str) -> list[float]:
        """base / variant within each round: drift between rounds cancels out of each ratio."""
        return [b / v for b, v in zip(self.seconds["base"], self.seconds[name])]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); a single value is all three."""
    if len(values) < 2:
        return (values[0],) * 3
    low, middle, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, statistics.median(values), high


def _minor_faults() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def alternated_times(model, inputs, config: ToMeConfig, device: str, warmup: int, repeat: int):
    """The baseline, ToMe and oracle forwards, measured alternately in rounds; also returns the
    video tokens that reach the first merged sub-layer.

    Alternating the three (run, patch, run, unpatch, slice, run) inside one loop cancels the drift
    of clock speed and background load that separate loops would fold into the ratios. The
    rounds cycle through all six orders, so over a multiple of six rounds each variant runs
    first, and right after each other variant, equally often: what one run leaves behind
    (caches, sleeping threads) favours none.
    """
    with apply_tome(model, config) as handle, torch.inference_mode():
        call_model(model, inputs)
        kept = handle.stats().sites[0].tokens_out
    variants = {
        "base": contextlib.nullcontext,
        "tome": lambda: apply_tome(model, config),
        "oracle": lambda: sliced_self_attention(model, kept),
    }
    seconds = {name: [] for name in variants}
    faults = {name: 0 for name in variants}
    count_faults = not device.startswith("cuda") and _minor_faults() is not None
    with torch.inference_mode():
        orders = list(itertools.permutations(variants))
        for index in range(warmup + repeat):
            for name in orders[(index - warmup) % len(orders)]:
                with variants[name]():
                    synchronize(device)
                    before = _minor_faults() if count_faults else 0
                    elapsed = timed_forward(model, inputs, device)
                    after = _minor_faults() if count_faults else 0
                if index >= warmup:
                    seconds[name].append(elapsed)
                    faults[name] += after - before
    per_forward = {name: (total / repeat if count_faults else None) for name, total in faults.items()}
    return Timings(seconds, per_forward), kept


# ------------------------------------------------------------------------------------------- oracle


class _FirstTokens:
    """Stands in for a :class:`vdtome.tome.merge.Merge` in an adapter's argument transforms (rotary
    tables, masks): "gathers" the first ``keep`` tokens with a free slice, for the whole batch."""

    shared = True

    def __init__(self, keep: int) -> None:
        self.keep = keep

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor.narrow(dim, 0, self.keep)


@contextlib.contextmanager
def sliced_self_attention(model, keep: int):
    """The best any token reduction can do with these kernels: every self-attention runs on its
    first ``keep`` video tokens (a free slice; rotary tables sliced alike, by the transforms of the
    model's ToMe adapter, which knows where they go) and its output is padded back with one copy.
    No matching, no gathers: the gap to ToMe is ToMe's own overhead. For adapters whose
    self-attention gets video tokens only (Wan, CogVideoX: no text prefix to keep)."""
    adapter = find_adapter(model)
    handles = []
    for block in adapter.blocks(model):
        for site in adapter.sites(block):
            if site.target == "self_attn":
                module = block.get_submodule(site.module)
                shrink, restore = _first_tokens_hooks(site, inspect.signature(type(module).forward), keep)
                handles.append(module.register_forward_pre_hook(shrink, with_kwargs=True))
                handles.append(module.register_forward_hook(restore, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_tokens_hooks(site, signature: inspect.Signature, keep: int):
    """A forward pre-hook that hands ``site``'s sub-layer its first ``keep`` tokens and a forward
    hook that pads its output back to the full count."""
    first, full = _FirstTokens(keep), {}

    def shrink(module, args, kwargs):
        call = _Call(signature.bind(module, *args, **kwargs))
        tokens = call.get(site.tokens)
        full["tokens"] = tokens.shape[1]
        call.set(site.tokens, tokens[:, :keep])
        for name, transform in site.transforms:
            value = call.get(name)
            if value is not None:
                call.set(name, transform(value, first, 0))
        return call.args, call.kwargs

    def restore(module, args, kwargs, output):
        def pad(video):
            return torch.cat([video, video[:, : full["tokens"] - keep]], dim=1)

        if site.output_index is None:
            return pad(output)
        output = list(output)
        output[site.output_index] = pad(output[site.output_index])
        return tuple(output)

    return shrink, restore


# ------------------------------------------------------------------------------------------- FLOP model


@dataclass(frozen=True)
class Architecture:
    """What the FLOP model needs of a video transformer. ``joint_text``: text tokens join the
    self-attention and the FFN (CogVideoX) instead of being attended to by a cross-attention (Wan);
    ``text_macs_per_token``: the text embedder's multiply-adds per text token; ``patch_values``:
    latent values per video token going in and coming out (channels x patch volume)."""

    dim: int
    ffn_dim: int
    text_tokens: int
    text_macs_per_token: int
    patch_values_in: int
    patch_values_out: int
    joint_text: bool


@dataclass(frozen=True)
class ForwardMacs:
    """Multiply-adds of one forward: in linear / conv layers, and in attention's QK^T and AV."""

    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention


def architecture_of(model, text_tokens: int) -> Architecture:
    """The FLOP model's view of a Wan or CogVideoX transformer, read from its config."""
    config = model.config
    dim = config.num_attention_heads * config.attention_head_dim
    name = type(model).__name__
    if name == "WanTransformer3DModel":
        volume = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
        return Architecture(dim, config.ffn_dim, text_tokens,
                            text_macs_per_token=config.text_dim * dim + dim * dim,  # two-layer text projection
                            patch_values_in=config.in_channels * volume, patch_values_out=config.out_channels * volume,
                            joint_text=False)
    if name == "CogVideoXTransformer3DModel":
        volume = config.patch_size * config.patch_size * (config.patch_size_t or 1)
        return Architecture(dim, 4 * dim, text_tokens,  # diffusers' FeedForward default: 4 x width
                            text_macs_per_token=config.text_embed_dim * dim,
                            patch_values_in=config.in_channels * volume, patch_values_out=config.out_channels * volume,
                            joint_text=True)
    raise TypeError(f"no FLOP model for {name}")


def forward_macs(arch: Architecture, layers: int, batch: int, tokens: int, self_tokens: int | None = None,
                 cross_tokens: int | None = None, ffn_tokens: int | None = None) -> ForwardMacs:
    """Multiply-adds of one forward of ``tokens`` video tokens; ``*_tokens`` are the video tokens
    entering each sub-layer (default: all of them). Matching is not counted, nor are the
    timestep embedding, modulation and norms (independent of the token count and small)."""
    s = tokens if self_tokens is None else self_tokens
    x = tokens if cross_tokens is None else cross_tokens
    f = tokens if ffn_tokens is None else ffn_tokens
    c, l = arch.dim, arch.text_tokens
    if arch.joint_text:  # one attention over [text, video], the FFN over both
        joint = l + s
        linear = 4 * joint * c * c + 2 * (l + f) * c * arch.ffn_dim
        attention = 2 * joint * joint * c
    else:
        linear = (4 * s * c * c  # self-attention q, k, v, out
                  + 2 * x * c * c + 2 * l * c * c  # cross-attention q, out on video; k, v on text
                  + 2 * f * c * arch.ffn_dim)
        attention = 2 * s * s * c + 2 * x * l * c
    outside = tokens * c * (arch.patch_values_in + arch.patch_values_out) + l * arch.text_macs_per_token
    return ForwardMacs(batch * (layers * linear + outside), batch * layers * attention)


def linear_macs_counted(model, inputs) -> float:
    """Multiply-adds torch's FLOP counter sees in one forward (on CPU it cannot see flash
    attention, so compare it with :attr:`ForwardMacs.linear`)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call_model(model, inputs)
    return counter.get_total_flops() / 2
