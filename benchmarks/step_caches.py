"""Step caches, token merging, and token merging + each cache on a real Wan denoising loop.

For every step cache registered in :mod:`vdtome.methods` (diffusers' cache hooks), for token
merging alone, and for token merging stacked with each cache the stacking rules allow, prints:

* **speedup** of the denoising loop over the plain pipeline. Every round runs the baseline and the
  variant back to back (which goes first alternates from round to round; the variants' order
  rotates), so drift of clock speed and background load cancels out of each round's ratio
  baseline / variant; the speedup is the median of those paired ratios, with their min-max spread;
* **skipped**: the share of transformer-block computations and of attention computations (per
  sample, over every denoiser call) that did not run, counted by
  :class:`vdtome.methods.evidence.ComputeSpy` (a block a cache skipped never enters its attention; an
  attention a cache answered from its store never reaches its first projection);
* **fidelity** of the final latents to the baseline's (same seed, same noise): PSNR in dB with the
  baseline latents' peak-to-peak as the signal range, and SSIM per latent frame over the 16 latent
  channels (scikit-image, as :mod:`vdtome.engine.fidelity` uses).

The pipeline is a real ``WanPipeline`` called with ``output_type="latent"``: :mod:`vdtome.offline.tiny`'s
text encoder, VAE (configuration only: nothing is decoded) and UniPC flow scheduler, with a larger
random-weight ``WanTransformer3DModel``. So the pipeline's own loop drives the caches: classifier-free
guidance with one denoiser call per branch inside ``cache_context("cond")`` / ``cache_context("uncond")``,
``current_timestep``, the scheduler's steps. Methods take their form defaults (what the app runs);
``--set FIELD=VALUE`` changes one (``python -m vdtome methods`` lists the fields). A method that needs
the call's step count (MagCache's calibration) is prepared as the engine does: one untimed plain run.
A cache that cannot serve Wan, or a pair the stacking rules refuse, is skipped with the reason.

Denoising time is :func:`vdtome.measure.timing.timed_call`'s ``denoising`` phase (first denoiser call to the
end of the last one). With random weights the caches' skip decisions are not those of a trained
model, and at this CPU-sized width (``--heads`` x ``--head-dim``) self-attention is nearly all of a
block's work, more than in the released models: read the ratios as how each method behaves in a real
loop, not as the speedups a trained Wan reaches.

On CPU the script first makes glibc keep freed memory (``vdtome.measure.memory.retain_freed_host_memory``),
as benchmarks/tome_speed.py does, so page faults do not differ between runs, and computes on one
thread (``--threads``): when other processes share the cores, torch's OpenMP threads wait for each
other at every parallel region and a forward takes 3-20x longer at random, which no pairing undoes.

    python benchmarks/step_caches.py                              # CPU: 4 x 64 x 64 latent = 4096 tokens, 8 layers, 20 steps
    python benchmarks/step_caches.py --quick --methods first_block_cache   # smoke check, seconds
    python benchmarks/step_caches.py --set first_block_cache_threshold=0.1 --set ratio=0.3
    python benchmarks/step_caches.py --device cuda --dtype bfloat16 --latent 21 60 104 --heads 12 --head-dim 128 --layers 30
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import WanPipeline  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

from vdtome.core.denoisers import denoiser_types
from vdtome.core.validation import RequestError
from vdtome.engine.fidelity import psnr_from_mse
from vdtome.measure.environment import environment, environment_line
from vdtome.measure.memory import benchmark_allocator
from vdtome.measure.timing import timed_call
from vdtome.methods import METHODS, CallPlan, apply_stack, check_stack, method_of, stack_label
from vdtome.methods.evidence import ComputeSpy
from vdtome.offline import tiny

PROMPT = "a red fox running through fresh snow at sunrise"
NEGATIVE = "blurry, low quality"
TOME = "tome"
QUICK = dict(latent=(2, 16, 16), layers=4, steps=8, rounds=1, warmup_steps=2)


# ------------------------------------------------------------------------------------------- pipeline


def build_pipeline(layers: int, heads: int, head_dim: int, ffn_mult: int, device: str, dtype: torch.dtype,
                   seed: int = 0) -> WanPipeline:
    """tiny_wan_pipeline's text encoder, VAE and scheduler around a wider, deeper Wan transformer."""
    small = tiny.tiny_wan_pipeline(seed)
    transformer = tiny.tiny_wan_transformer(seed, num_layers=layers, num_attention_heads=heads,
                                            attention_head_dim=head_dim, ffn_dim=ffn_mult * heads * head_dim)
    pipe = WanPipeline(**{**small.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype != torch.float32:  # the tiny components are built in float32
        pipe.to(dtype=dtype)
    return pipe


def call_kwargs(latent: tuple[int, int, int], steps: int, guidance: float) -> dict[str, Any]:
    """A call whose latent is ``latent`` (frames, height, width in latent units): Wan's VAE
    compresses 4x in time (frames 4k+1) and 8x in space. :func:`run` adds the seeded generator."""
    frames, height, width = latent
    return dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=4 * (frames - 1) + 1, height=8 * height,
                width=8 * width, num_inference_steps=steps, guidance_scale=guidance, output_type="latent")


# ------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    label: str
    configs: tuple[Any, ...]
    prepared: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    base_s: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    blocks: tuple[int, int] = (0, 0)  # skipped, expected (per sample, latest run)
    attention: tuple[int, int] = (0, 0)
    psnr: float | None = None
    ssim: float | None = None
    nonfinite: int = 0

    def ratios(self) -> list[float]:
        return [b / v for b, v in zip(self.base_s, self.seconds)]


def form_config(method, overrides: dict[str, Any]):
    own = {f.name for f in method.fields}
    return method.config_from({k: v for k, v in overrides.items() if k in own})


def plan(pipe, names: list[str] | None, overrides: dict[str, Any], with_tome: bool) -> tuple[list[Variant], list[str]]:
    """The variants to measure and a line per one skipped (with the reason)."""
    known = {f.name for m in METHODS.values() for f in m.fields}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"--set: no method has a field {unknown[0]!r}; fields: {', '.join(sorted(known))}")
    caches = [m for m in METHODS.values() if m.diffusers_cache]
    if names:
        missing = sorted(set(names) - {m.name for m in caches})
        if missing:
            raise SystemExit(f"--methods: {missing[0]!r} is not a registered cache; caches: "
                             f"{', '.join(m.name for m in caches)}")
        caches = [m for m in caches if m.name in names]
    types = denoiser_types(pipe)
    stacks: list[tuple[Any, ...]] = [(form_config(m, overrides),) for m in caches]
    if with_tome:
        tome = form_config(METHODS[TOME], overrides)
        stacks.append((tome,))
        stacks += [(tome, form_config(m, overrides)) for m in caches]
    variants, skipped = [], []
    for configs in stacks:
        label = stack_label(configs)
        try:
            methods = check_stack(configs)
        except RequestError as error:
            skipped.append(f"{label}: refused by the stacking rules: {error}")
            continue
        reasons = [f"{m.label}: {r}" for m in methods if (r := m.unavailable(types))]
        if reasons:
            skipped.append(f"{label}: unavailable for {', '.join(t.__name__ for t in types)}: {'; '.join(reasons)}")
            continue
        variants.append(Variant(label, configs))
    return variants, skipped


def configs_for(pipe, variant: Variant, kwargs: dict[str, Any], steps: int, untimed) -> tuple[Any, ...]:
    """The variant's configs for calls of ``steps`` steps (a method's ``prepare``, e.g. MagCache's
    calibration, runs once per step count, untimed, on the plain pipeline), as the engine does."""
    if steps not in variant.prepared:
        call = CallPlan(steps, kwargs["num_frames"], kwargs["height"], kwargs["width"], kwargs["guidance_scale"])
        configs = []
        for config in variant.configs:
            method = method_of(config)
            if method.prepare is not None:
                config = method.prepare(pipe, config, call, lambda: untimed(steps))
            configs.append(config)
        variant.prepared[steps] = tuple(configs)
    return variant.prepared[steps]


# ------------------------------------------------------------------------------------------- measuring


def latent_fidelity(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB, signal range = the reference's peak-to-peak, capped as vdtome.engine.fidelity caps it) and
    mean SSIM over latent frames of two (1, C, F, H, W) latents."""
    ref = reference.detach().to("cpu", torch.float64).numpy()[0]
    out = other.detach().to("cpu", torch.float64).numpy()[0]
    span = float(ref.max() - ref.min()) or 1.0
    psnr = psnr_from_mse(float(np.mean((out - ref) ** 2)) / span**2)
    side = min(ref.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    ssim = statistics.fmean(
        float(structural_similarity(ref[:, f], out[:, f], channel_axis=0, data_range=span, win_size=win))
        for f in range(ref.shape[1])
    )
    return psnr, ssim


def run(pipe, kwargs: dict[str, Any], configs: tuple[Any, ...] | None, spy: ComputeSpy,
        seed: int) -> tuple[float, torch.Tensor]:
    """Seconds of the denoising phase of one call (the stack applied around it only) and its latents."""
    kwargs = kwargs | {"generator": torch.Generator("cpu").manual_seed(seed)}
    gc.collect()
    stack = apply_stack(pipe, configs) if configs else None
    try:
        spy.reset()
        with torch.inference_mode():
            output, report = timed_call(pipe, **kwargs)
    finally:
        if stack is not None:
            stack.remove()
    return report.denoising_ms / 1e3, output.frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, nargs=3, default=[4, 64, 64], metavar=("T", "H", "W"),
                        help="latent frames, height, width (patch 1x2x2: T*H*W/4 video tokens per block)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--ffn-mult", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0, help="> 1: two denoiser calls per step (CFG)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (each: baseline + variant)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps of the untimed warm-up call of each variant")
    parser.add_argument("--methods", nargs="+", help="only these caches (default: every registered cache)")
    parser.add_argument("--no-tome", action="store_true", help="caches alone, no token merging rows")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a method's form field, e.g. first_block_cache_threshold=0.1 or ratio=0.3 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: 1 on CPU, see above; 0: torch's default)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    parser.add_argument("--system-malloc", action="store_true",
                        help="CPU: keep glibc's default of unmapping freed large blocks")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    if args.rounds < 1 or args.steps < 1 or args.warmup_steps < 0:
        parser.error("--rounds and --steps must be at least 1, --warmup-steps at least 0")
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes FIELD=VALUE, got {item!r}")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = tuple(value.split(",")) if "," in value else value

    cpu = not args.device.startswith("cuda")
    threads = args.threads if args.threads is not None else (1 if cpu else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    malloc = benchmark_allocator(args.device, args.system_malloc)
    dtype = getattr(torch, args.dtype)
    pipe = build_pipeline(args.layers, args.heads, args.head_dim, args.ffn_mult, args.device, dtype, args.seed)
    kwargs = call_kwargs(tuple(args.latent), args.steps, args.guidance)
    try:
        variants, skipped = plan(pipe, args.methods, overrides, not args.no_tome)
    except RequestError as error:
        raise SystemExit(f"--set: {error}") from None
    tokens = args.latent[0] * (args.latent[1] // 2) * (args.latent[2] // 2)
    extra = f" · {torch.get_num_threads()} CPU thread(s) · {malloc}" if cpu else ""
    print(environment_line(environment(pipe, dtype)) + extra)
    print(f"WanPipeline, output_type latent: transformer {args.layers} layers, {args.heads} heads x {args.head_dim}, "
          f"ffn x{args.ffn_mult}; latent {'x'.join(map(str, args.latent))} = {tokens} video tokens per block; "
          f"{args.steps} steps, guidance {args.guidance:g} ({'CFG: 2' if args.guidance > 1 else '1'} denoiser "
          f"calls per step); {args.rounds} round(s) per variant")
    for line in skipped:
        print(f"skipped: {line}")
    if not variants:
        print("nothing to measure")
        return

    spy = ComputeSpy([pipe.transformer])  # on every call, baseline included: the same hooks on both sides
    started = time.perf_counter()
    untimed = lambda steps: run(pipe, kwargs | {"num_inference_steps": steps}, None, spy, args.seed)  # noqa: E731
    base_time, reference = run(pipe, kwargs, None, spy, args.seed)  # warm-up and the reference latents
    print(f"baseline: {base_time:.2f} s denoising (warm-up)", flush=True)
    for variant in variants:
        if args.warmup_steps:
            configs = configs_for(pipe, variant, kwargs, args.warmup_steps, untimed)
            run(pipe, kwargs | {"num_inference_steps": args.warmup_steps}, configs, spy, args.seed)
        configs_for(pipe, variant, kwargs, args.steps, untimed)  # calibrations happen here, untimed
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            configs = variant.prepared[args.steps]
            order = ("base", "variant") if round_index % 2 == 0 else ("variant", "base")
            for side in order:
                seconds, latents = run(pipe, kwargs, configs if side == "variant" else None, spy, args.seed)
                if side == "base":
                    variant.base_s.append(seconds)
                    continue
                variant.seconds.append(seconds)
                variant.blocks = (spy.blocks_skipped, spy.expected_blocks)
                variant.attention = (spy.attention_skipped, spy.expected_attention)
                variant.nonfinite = int((~torch.isfinite(latents)).sum())
                if variant.psnr is None and not variant.nonfinite:
                    variant.psnr, variant.ssim = latent_fidelity(reference, latents)
        print(f"round {round_index + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)", flush=True)

    width = max(len(v.label) for v in variants)
    header = (f"{'variant':<{width}}  {'base s':>7} {'var. s':>7} {'speedup':>8} {'min-max':>11}  "
              f"{'blocks skipped':>14} {'attn skipped':>12}  {'PSNR dB':>7} {'SSIM':>6}")
    print()
    print(header)
    print("-" * len(header))
    for v in variants:
        ratios = v.ratios()
        share = lambda pair: f"{pair[0] / pair[1]:.0%}" if pair[1] else "-"  # noqa: E731
        fidelity = "non-finite" if v.nonfinite else f"{v.psnr:>7.1f} {v.ssim:>6.3f}"
        print(f"{v.label:<{width}}  {statistics.median(v.base_s):>7.2f} {statistics.median(v.seconds):>7.2f} "
              f"{statistics.median(ratios):>7.2f}x {min(ratios):>5.2f}-{max(ratios):<5.2f}  "
              f"{share(v.blocks):>14} {share(v.attention):>12}  {fidelity}")
    print(f"\nbase / var. s: median denoising seconds over the rounds; speedup: median over rounds of base / variant"
          f"\nwithin the round (min-max over the {args.rounds} round(s)); blocks / attn skipped: share of per-sample "
          "transformer-block /"
          "\nattention computations that did not run (ComputeSpy, latest run); PSNR (capped at 100 dB = identical) "
          "and SSIM:"
          "\nfinal latents against the baseline's, same seed. Total "
          f"{time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
