"""Token merging's denoiser speedup against video tokens per block, at the real widths of Wan 2.1
1.3B and CogVideoX-2b.

Why: the offline model is measured at 320 (tiny-shapes) or 2,304 (tiny-shapes-128) video tokens per
block and a toy width, while the released models run 17,550 (CogVideoX-2b at 49x480x720) or 32,760
(Wan 2.1 at 81x480x832) tokens at widths 1536-1920. What merging saves grows with the token count,
and the width decides how much of a block is attention, so this script measures at the real widths
(random seeded weights, 1 layer by default, paired rounds) over 1k-16k tokens and puts every point on
one axis with both models' real token counts.

Per model and token count:
* one forward: baseline, token merging and a zero-cost token drop (the oracle: self-attention on the
  first N - r tokens, a free slice) alternated in rounds (benchmarks/_common.py); speedup = median of
  the per-round ratios, with their interquartile range; beside them the FLOP ideal of the analytic
  model at the built depth and at the released model's depth (30 layers);
* the stacks, token merging + first block cache and + MagCache (diffusers' hooks, as vdtome.methods
  applies them), over a short flow-matching Euler loop (``--steps`` denoiser calls, the input updated
  by each output), on a model of ``--stack-layers`` layers (first block cache keeps the first block,
  so it needs two); speedup of the whole loop over the plain loop, and the blocks each cache skipped.
  The caches' decisions on random weights are not a trained model's: at their default thresholds they
  may never skip, which the table says. The "ceiling" rows (threshold 1: skip whenever the cache's
  other rules allow) show what skipping buys at these widths; they are not quality settings.

Writes DIR/scaling.json (every figure; resumable: a configuration already there with the same
settings is not measured again, so a stopped run goes on where it stopped), DIR/scaling.csv and
DIR/scaling.png. On a 2-core AMD EPYC the default run is about 1 h 10 min on one thread (the stacks,
at 1024 and 4096 tokens, are two thirds of it), about 40 min with ``--threads 2`` on idle cores.

    python benchmarks/scaling.py                                   # CPU, both models, 1024-8192 tokens
    python benchmarks/scaling.py --tokens 16384 --no-stacks        # adds a point to the same files
    python benchmarks/scaling.py --quick --out /tmp/scaling-quick  # smoke check: narrow, 256-512 tokens
    python benchmarks/scaling.py --device cuda --dtype bfloat16 --tokens 1024 2048 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel  # noqa: E402

from benchmarks._common import (  # noqa: E402
    GRIDS,
    alternated_times,
    architecture_of,
    forward_macs,
    linear_macs_counted,
    quartiles,
    synchronize,
    timed_forward,
)
from vdtome.measure.environment import environment, environment_line
from vdtome.measure.host_load import HostLoadMonitor
from vdtome.measure.memory import benchmark_allocator
from vdtome.methods import METHODS, CallPlan, apply_stack, method_of, stack_label
from vdtome.methods.evidence import ComputeSpy
from vdtome.tome import ToMeConfig
from vdtome.tome.merge import merge_count

QUICK = dict(heads=1, tokens=[256, 512], stack_tokens=[256, 512], rounds=1, warmup=1, stack_rounds=1, steps=4)
# Token counts to mark on the plot: the offline model's and the released models' at their sizes.
MARKERS = (
    (320, "tiny-shapes (9x64x64)"),
    (2304, "tiny-shapes-128 (17x128x128)"),
    (17550, "CogVideoX-2b (49x480x720)"),
    (32760, "Wan 2.1 (81x480x832)"),
)


# ------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Width:
    """The widths a model is built at: the real ones, or narrowed (``--heads``) for a smoke check."""

    heads: int
    ffn_dim: int
    text_dim: int


@dataclass(frozen=True)
class RealModel:
    """A released model's layout: what is built (at any depth, width and token grid) and its real size."""

    key: str
    label: str
    heads: int
    head_dim: int
    ffn_dim: int  # CogVideoX's is diffusers' default, 4 x width: listed (and scaled alike), never passed
    text_dim: int
    text_tokens: int  # as its pipeline pads the prompt
    depth: int
    tokens: int  # video tokens per block at its default size
    size: str

    def width(self, heads: int | None) -> Width:
        """The real widths, or ``heads`` heads of the real head size with the FFN and text widths
        scaled alike."""
        if heads is None or heads == self.heads:
            return Width(self.heads, self.ffn_dim, self.text_dim)
        return Width(heads, max(1, round(self.ffn_dim * heads / self.heads)),
                     max(1, round(self.text_dim * heads / self.heads)))

    def construct(self, width: Width, layers: int, grid: tuple[int, int, int]) -> torch.nn.Module:
        """The model with torch's default initialisation, on torch's current default device."""
        if self.key == "wan":
            return WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=width.heads, attention_head_dim=self.head_dim,
                in_channels=16, out_channels=16, text_dim=width.text_dim, freq_dim=256, ffn_dim=width.ffn_dim,
                num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=1024)
        frames, height, width_tokens = grid
        # The sin-cos table is made for this grid at build time, as the released model's is for its
        # default size (any other size recomputes it at every forward).
        return CogVideoXTransformer3DModel(
            num_attention_heads=width.heads, attention_head_dim=self.head_dim, in_channels=16, out_channels=16,
            time_embed_dim=512, text_embed_dim=width.text_dim, num_layers=layers,
            sample_frames=4 * (frames - 1) + 1, sample_height=2 * height, sample_width=2 * width_tokens,
            patch_size=2, temporal_compression_ratio=4, max_text_seq_length=self.text_tokens,
            use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False)

    def build(self, width: Width, layers: int, grid: tuple[int, int, int], device: str,
              dtype: torch.dtype) -> torch.nn.Module:
        """Random weights, seeded: every build of the same layout is the same model."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = self.construct(width, layers, grid).to(device)
        if dtype != torch.float32:  # built in float32; diffusers warns about any cast, needed or not
            model = model.to(dtype=dtype)
        return model.eval()

    @functools.lru_cache(maxsize=None)
    def architecture(self, width: Width):
        """The FLOP model's view, read from a weightless (meta-device) build."""
        with torch.device("meta"):
            return architecture_of(self.construct(width, 1, (1, 2, 2)), self.text_tokens)

    def inputs(self, width: Width, grid: tuple[int, int, int], device: str, dtype: torch.dtype) -> dict[str, Any]:
        """Seeded keyword arguments of one forward: noise latent, mid-schedule timestep, text."""
        generator = torch.Generator().manual_seed(0)
        frames, height, width_tokens = grid
        if self.key == "wan":  # (B, C, F, H, W)
            shape = (1, 16, frames, 2 * height, 2 * width_tokens)
        else:  # (B, F, C, H, W)
            shape = (1, frames, 16, 2 * height, 2 * width_tokens)
        latent = torch.randn(shape, generator=generator)
        text = torch.randn(1, self.text_tokens, width.text_dim, generator=generator)
        return dict(hidden_states=latent.to(device, dtype), timestep=torch.full((1,), 500.0, device=device),
                    encoder_hidden_states=text.to(device, dtype), return_dict=False)


MODELS = {
    "wan": RealModel("wan", "Wan 2.1 1.3B", heads=12, head_dim=128, ffn_dim=8960, text_dim=4096, text_tokens=512,
                     depth=30, tokens=32760, size="81x480x832"),
    "cogvideox": RealModel("cogvideox", "CogVideoX-2b", heads=30, head_dim=64, ffn_dim=4 * 1920, text_dim=4096,
                           text_tokens=226, depth=30, tokens=17550, size="49x480x720"),
}


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def kept_tokens(tokens: int, ratio: float) -> int:
    """Video tokens left after merging ``ratio`` of them (ToMe's r = int(ratio * N))."""
    return tokens - merge_count(tokens, ratio)


def ideal_speedup(arch, layers: int, tokens: int, kept: int) -> float:
    """The FLOP model's speedup of one forward whose self-attentions see ``kept`` video tokens."""
    return forward_macs(arch, layers, 1, tokens).total / forward_macs(arch, layers, 1, tokens, self_tokens=kept).total


# ------------------------------------------------------------------------------------------- one forward


def measure_forward(spec: RealModel, width: Width, grid, args) -> dict[str, Any]:
    """Baseline, ToMe and oracle forwards in paired rounds at ``args.layers`` layers, with the FLOP
    ideal at this depth and at the released model's depth, and torch's FLOP count as a check."""
    tokens = math.prod(grid)
    model = spec.build(width, args.layers, grid, args.device, args.dtype_)
    call = spec.inputs(width, grid, args.device, args.dtype_)
    with torch.inference_mode():
        timed_forward(model, call, args.device)  # warm-up
        forward_s = timed_forward(model, call, args.device)
    forwards = 3 * (args.warmup + args.rounds) + 2
    print(f"  one forward: {forward_s:.2f} s; token merging: ~{duration(forwards * forward_s)} "
          f"({forwards} forwards)", flush=True)
    config = ToMeConfig(ratio=args.ratio)
    timings, kept = alternated_times(model, call, config, args.device, args.warmup, args.rounds)
    arch = architecture_of(model, spec.text_tokens)
    counted = linear_macs_counted(model, call)
    low, speedup, high = quartiles(timings.paired_speedups("tome"))
    oracle_low, oracle, oracle_high = quartiles(timings.paired_speedups("oracle"))
    return {
        "kept_tokens": kept,
        "base_ms": 1e3 * timings.median("base"),
        "tome_ms": 1e3 * timings.median("tome"),
        "oracle_ms": 1e3 * timings.median("oracle"),
        "speedup": speedup, "speedup_iqr": [low, high],
        "oracle": oracle, "oracle_iqr": [oracle_low, oracle_high],
        "ideal": ideal_speedup(arch, args.layers, tokens, kept),
        "ideal_real_depth": ideal_speedup(arch, spec.depth, tokens, kept),
        "seconds": {name: list(values) for name, values in timings.seconds.items()},
        "faults_per_forward": timings.faults,
        "flop_check": {"counted_linear_gmacs": counted / 1e9,
                       "model_linear_gmacs": forward_macs(arch, args.layers, 1, tokens).linear / 1e9},
    }


# ------------------------------------------------------------------------------------------- stacks


def stack_variants(ratio: float, ceiling: bool) -> list[dict[str, Any]]:
    """Token merging + each block cache at its form defaults, and (``ceiling``) at threshold 1."""
    tome = ToMeConfig(ratio=ratio)
    fbc, mag = METHODS["first_block_cache"], METHODS["mag_cache"]
    variants = [
        dict(label="ToMe + first block cache", configs=(tome, fbc.config_from({})), ceiling=False),
        dict(label="ToMe + MagCache", configs=(tome, mag.config_from({})), ceiling=False),
    ]
    if ceiling:
        variants += [
            dict(label="ToMe + first block cache, ceiling", ceiling=True,
                 configs=(tome, fbc.config_from({"first_block_cache_threshold": 1.0}))),
            dict(label="ToMe + MagCache, ceiling", ceiling=True,
                 configs=(tome, mag.config_from({"mag_cache_threshold": 1.0}))),
        ]
    return variants


def denoise(model, call: dict[str, Any], steps: int, device: str, spy: ComputeSpy, configs=()) -> dict[str, Any]:
    """``steps`` denoiser calls of a flow-matching Euler loop from ``call``'s latent (timesteps
    1000 -> 0), with ``configs`` applied around it: seconds, blocks run per step, final latent."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    timesteps = [torch.full((1,), 1000.0 * s, device=device) for s in sigmas[:-1]]
    stack = apply_stack(model, configs) if configs else None
    blocks_run = []
    try:
        with torch.inference_mode():
            latent = call["hidden_states"]
            synchronize(device)
            begin = time.perf_counter()
            for index, timestep in enumerate(timesteps):
                before = spy.blocks_run
                with model.cache_context("cond"):
                    velocity = model(**(call | {"hidden_states": latent, "timestep": timestep}))[0]
                latent = latent + (sigmas[index + 1] - sigmas[index]) * velocity
                blocks_run.append(spy.blocks_run - before)
            synchronize(device)
            seconds = time.perf_counter() - begin
        reports = {report.method: dict(report.summary) for report in stack.reports()} if stack else {}
    finally:
        if stack is not None:
            stack.remove()
    return dict(seconds=seconds, blocks_run=blocks_run, latent=latent, reports=reports)


def prepared(model, configs, plan: CallPlan, untimed) -> tuple:
    """The configs as the engine applies them: a method's ``prepare`` (MagCache's calibration, one
    untimed plain loop) runs first."""
    out = []
    for config in configs:
        method = method_of(config)
        out.append(method.prepare(model, config, plan, untimed) if method.prepare else config)
    return tuple(out)


def measure_stacks(spec: RealModel, width: Width, grid, args) -> dict[str, Any]:
    """Plain loop vs each stack, one plain loop per round shared by every variant (the order
    rotates and turns round from round to round), speedup = median of per-round ratios."""
    model = spec.build(width, args.stack_layers, grid, args.device, args.dtype_)
    call = spec.inputs(width, grid, args.device, args.dtype_)
    spy = ComputeSpy([model])
    variants = stack_variants(args.ratio, not args.no_ceiling)
    plan = CallPlan(args.steps, grid[0], 2 * grid[1], 2 * grid[2], 1.0)  # latent frames, height, width
    untimed = lambda: denoise(model, call, args.steps, args.device, spy)  # noqa: E731
    warm = denoise(model, call, 2, args.device, spy)  # warm-up, and the time of one call
    per_call = warm["seconds"] / 2
    for variant in variants:
        variant["configs"] = prepared(model, variant["configs"], plan, untimed)
        denoise(model, call, 1, args.device, spy, variant["configs"])  # warm-up
        variant.update(seconds=[], base_seconds=[], blocks_run=None, reports=None, latent_error=None)
    loops = args.stack_rounds * (len(variants) + 1)
    most = duration(loops * args.steps * per_call)
    print(f"  stacks ({args.stack_layers} layers): {per_call:.2f} s per call; ~{most} at most ({loops} loops of "
          f"{args.steps} calls)", flush=True)
    base_seconds = []
    for round_index in range(args.stack_rounds):
        order = [None, *variants]
        shift = round_index % len(order)
        order = order[shift:] + order[:shift]
        if round_index % 2:
            order.reverse()
        runs = [(variant, denoise(model, call, args.steps, args.device, spy, variant["configs"] if variant else ()))
                for variant in order]
        base = next(run for variant, run in runs if variant is None)
        base_seconds.append(base["seconds"])
        for variant, run in runs:
            if variant is None:
                continue
            variant["seconds"].append(run["seconds"])
            variant["base_seconds"].append(base["seconds"])
            variant["blocks_run"], variant["reports"] = run["blocks_run"], run["reports"]
            variant["latent_error"] = float((run["latent"] - base["latent"]).norm() / base["latent"].norm())
    spy.remove()
    rows = []
    for variant in variants:
        ratios = [b / v for b, v in zip(variant["base_seconds"], variant["seconds"])]
        blocks = variant["blocks_run"]
        rows.append({
            "label": variant["label"], "stack": stack_label(variant["configs"]), "ceiling": variant["ceiling"],
            "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
            "median_s": statistics.median(variant["seconds"]), "seconds": variant["seconds"],
            "blocks_run_per_step": blocks,
            "blocks_skipped": args.stack_layers * args.steps - sum(blocks),
            "blocks_expected": args.stack_layers * args.steps,
            "calls_cached": sum(1 for b in blocks if b < args.stack_layers),
            "final_latent_relative_error": variant["latent_error"],
            "reports": variant["reports"],
        })
    return {"layers": args.stack_layers, "steps": args.steps, "base_median_s": statistics.median(base_seconds),
            "base_seconds": base_seconds, "variants": rows}


# ------------------------------------------------------------------------------------------- results


def settings_of(args, width: Width) -> dict[str, Any]:
    """What a measurement depends on: a stored one is reused only when all of it matches."""
    return dict(layers=args.layers, stack_layers=args.stack_layers, heads=width.heads, ffn_dim=width.ffn_dim,
                text_dim=width.text_dim, ratio=args.ratio, device=args.device, dtype=args.dtype,
                threads=torch.get_num_threads(), rounds=args.rounds, warmup=args.warmup,
                stack_rounds=args.stack_rounds, steps=args.steps, ceiling=not args.no_ceiling,
                malloc=args.malloc)


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return json.loads(path.read_text()).get("records", [])


def save(path: Path, records: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """Write atomically: a run stopped mid-write leaves the previous file."""
    about = ("speedups of token merging (one forward) and of its stacks with step caches (a short denoising loop) "
             "at the real widths of Wan 2.1 1.3B and CogVideoX-2b, random weights; see benchmarks/scaling.py")
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"about": about, "environment": env, "records": records}, indent=1))
    temporary.replace(path)


def planned_macs(spec: RealModel, width: Width, grid, args, parts: list[str]) -> float:
    """Multiply-adds the ``parts`` ("tome", "stacks") of a configuration will run (upper bound: no
    cache skips), to extrapolate time from the configurations already measured."""
    tokens = math.prod(grid)
    arch = spec.architecture(width)
    one = forward_macs(arch, args.layers, 1, tokens).total
    loop_call = forward_macs(arch, args.stack_layers, 1, tokens).total
    variants = 4 if not args.no_ceiling else 2
    calls = args.steps * (args.stack_rounds * (variants + 1) + 1) + variants + 2  # rounds, calibration, warm-ups
    return (3 * (args.warmup + args.rounds) + 4) * one * ("tome" in parts) + calls * loop_call * ("stacks" in parts)


def runs_stacks(tokens: int, args) -> bool:
    return not args.no_stacks and tokens in args.stack_tokens


# ------------------------------------------------------------------------------------------- report


def print_tables(records: list[dict[str, Any]], args) -> None:
    print()
    for spec in {r["model"]: MODELS[r["model"]] for r in records}.values():
        width = spec.width(args.heads)
        print(f"{spec.label}: {width.heads} heads x {spec.head_dim}, FFN {width.ffn_dim}, {spec.text_tokens} "
              f"text tokens of width {width.text_dim}, random weights, batch 1")
    print(f"ToMe: ratio {args.ratio:g}, stride 1x2x2, self-attention merged in every block, local matching windows")
    print("\n| model | tokens/block | base ms | ToMe ms | ToMe speedup (IQR) | zero-cost drop | FLOP ideal "
          f"({args.layers} layer{'s' * (args.layers > 1)}) | FLOP ideal (30 layers) | linear GMACs counted / model |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for record in records:
        tome = record.get("tome")
        if not tome:
            continue
        check = tome["flop_check"]
        print(f"| {record['label']} | {record['tokens']:,} | {tome['base_ms']:.1f} | {tome['tome_ms']:.1f} | "
              f"{tome['speedup']:.2f}x ({tome['speedup_iqr'][0]:.2f}-{tome['speedup_iqr'][1]:.2f}) | "
              f"{tome['oracle']:.2f}x | {tome['ideal']:.2f}x | {tome['ideal_real_depth']:.2f}x | "
              f"{check['counted_linear_gmacs']:.3g} / {check['model_linear_gmacs']:.3g} |")
    stacked = [r for r in records if r.get("stacks")]
    if stacked:
        print(f"\n| model | tokens/block | plain loop s ({stacked[0]['stacks']['steps']} calls, "
              f"{stacked[0]['stacks']['layers']} layers) | stack | speedup (min-max) | blocks skipped | calls cached | "
              "final latent rel. error |")
        print("|---|---:|---:|---|---:|---:|---:|---:|")
        for record in stacked:
            stacks = record["stacks"]
            for row in stacks["variants"]:
                print(f"| {record['label']} | {record['tokens']:,} | {stacks['base_median_s']:.2f} | {row['label']} | "
                      f"{row['speedup']:.2f}x ({row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}) | "
                      f"{row['blocks_skipped']}/{row['blocks_expected']} | {row['calls_cached']}/{stacks['steps']} | "
                      f"{row['final_latent_relative_error']:.3f} |")
        rows = [row for r in stacked for row in r["stacks"]["variants"] if not row["ceiling"]]
        never = [label for label in dict.fromkeys(row["label"] for row in rows)
                 if not any(row["blocks_skipped"] for row in rows if row["label"] == label)]
        if never:
            print(f"\nAt their default thresholds these never skipped a block with random weights: {', '.join(never)}"
                  " (a finding about random weights, not a failure; the ceiling rows show what skipping buys).")
    busy = [f"{r['label']} {r['tokens']:,} ({part})" for r in records for part in ("tome", "stacks")
            if ((r.get(part) or {}).get("host_load") or {}).get("busy")]
    if busy:
        print(f"\nMeasured while other processes kept the cores busy (not to be trusted): {', '.join(busy)}")
    for spec in {r["model"]: MODELS[r["model"]] for r in records}.values():
        arch = spec.architecture(spec.width(None))
        real = ideal_speedup(arch, spec.depth, spec.tokens, kept_tokens(spec.tokens, args.ratio))
        print(f"FLOP ideal of {spec.label} at its real width ({arch.dim}), size ({spec.size}: {spec.tokens:,} tokens) "
              f"and depth ({spec.depth} layers), ratio {args.ratio:g}: {real:.2f}x")
    print("\nToMe speedup: median over rounds of base / ToMe within the round, IQR its interquartile range;"
          "\nzero-cost drop: the same for self-attention on the first N - r tokens (no matching, no gathers);"
          "\nFLOP ideal: analytic multiply-adds, at the built depth and at the released models' 30 layers;"
          "\nstack speedup: plain Euler loop / loop with the stack, median over rounds (min-max);"
          "\nblocks skipped / calls cached: in the latest loop (ComputeSpy); final latent rel. error: against the"
          "\nplain loop's of the same round.")


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """One row per figure: model, tokens, measure, speedup and its spread, times, skips."""
    fields = ["model", "tokens", "grid", "measure", "speedup", "low", "high", "spread", "base_ms", "method_ms",
              "blocks_skipped", "blocks_expected", "calls_cached", "final_latent_relative_error"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in records:
            head = dict(model=r["model"], tokens=r["tokens"], grid="x".join(map(str, r["grid"])))
            tome = r.get("tome")
            if tome:
                writer.writerow(head | dict(measure="tome", speedup=tome["speedup"], low=tome["speedup_iqr"][0],
                                            high=tome["speedup_iqr"][1], spread="IQR", base_ms=tome["base_ms"],
                                            method_ms=tome["tome_ms"]))
                writer.writerow(head | dict(measure="zero-cost drop", speedup=tome["oracle"], low=tome["oracle_iqr"][0],
                                            high=tome["oracle_iqr"][1], spread="IQR", base_ms=tome["base_ms"],
                                            method_ms=tome["oracle_ms"]))
                writer.writerow(head | dict(measure="FLOP ideal", speedup=tome["ideal"]))
                writer.writerow(head | dict(measure="FLOP ideal, 30 layers", speedup=tome["ideal_real_depth"]))
            stacks = r.get("stacks")
            for row in stacks["variants"] if stacks else ():
                writer.writerow(head | dict(
                    measure=row["label"], speedup=row["speedup"], low=row["speedup_range"][0],
                    high=row["speedup_range"][1], spread="min-max", base_ms=1e3 * stacks["base_median_s"],
                    method_ms=1e3 * row["median_s"], blocks_skipped=row["blocks_skipped"],
                    blocks_expected=row["blocks_expected"], calls_cached=row["calls_cached"],
                    final_latent_relative_error=row["final_latent_relative_error"]))


def plot(path: Path, records: list[dict[str, Any]], args) -> str | None:
    """Speedup against tokens per block (log2), one panel per model, the offline model's and the
    released models' token counts marked; None, or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    keys = [key for key in MODELS if any(r["model"] == key for r in records)]
    figure, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 5.4), sharey=True, squeeze=False)
    curve = [round(2 ** (e / 8)) for e in range(8 * 8, 8 * 15 + 3)]  # 256 .. ~38k
    ticks = [2 ** e for e in range(8, 16)]
    for axis, key in zip(axes[0], keys):
        spec, rows = MODELS[key], sorted((r for r in records if r["model"] == key), key=lambda r: r["tokens"])
        width = spec.width(args.heads)
        measured = [r for r in rows if r.get("tome")]
        if measured:
            x = [r["tokens"] for r in measured]
            y = [r["tome"]["speedup"] for r in measured]
            spread = [[v - r["tome"]["speedup_iqr"][0] for v, r in zip(y, measured)],
                      [r["tome"]["speedup_iqr"][1] - v for v, r in zip(y, measured)]]
            axis.errorbar(x, y, yerr=spread, fmt="o-", color="C0", capsize=3,
                          label=f"ToMe, measured ({args.layers} layer(s), IQR)")
            axis.plot(x, [r["tome"]["oracle"] for r in measured], "s--", color="C1", label="zero-cost token drop")
        arch = spec.architecture(width)
        for layers, style in ((args.layers, "-"), (spec.depth, ":")):
            axis.plot(curve, [ideal_speedup(arch, layers, n, kept_tokens(n, args.ratio)) for n in curve], style,
                      color="grey", label=f"FLOP ideal, {layers} layer(s)")
        labels = [row["label"] for r in rows if r.get("stacks") for row in r["stacks"]["variants"]]
        for index, label in enumerate(dict.fromkeys(labels)):
            points = [(r["tokens"], row["speedup"], row["ceiling"]) for r in rows if r.get("stacks")
                      for row in r["stacks"]["variants"] if row["label"] == label]
            ceiling = points[0][2]
            axis.plot([p[0] for p in points], [p[1] for p in points], "D" + (":" if ceiling else "-"),
                      color=f"C{2 + index}", fillstyle="none" if ceiling else "full",
                      label=f"{label} ({args.stack_layers} layers, {args.steps}-call loop)")
        for tokens, name in MARKERS:
            axis.axvline(tokens, color="black", linewidth=0.8, alpha=0.35)
            axis.text(tokens, 0.02, f"{name}: {tokens:,} ", rotation=90, va="bottom", ha="right", fontsize=7,
                      transform=axis.get_xaxis_transform())
        axis.axhline(1.0, color="black", linewidth=0.6)
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [f"{t // 1024}k" if t >= 1024 else str(t) for t in ticks])
        axis.set_xlim(230, 40000)
        axis.set_xlabel("video tokens per block")
        narrowed = "" if width.heads == spec.heads else f", narrowed from {spec.heads * spec.head_dim}"
        axis.set_title(f"{spec.label}: width {width.heads * spec.head_dim}{narrowed}, random weights, "
                       f"ToMe ratio {args.ratio:g}", fontsize=9)
        axis.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("speedup over the plain model (x)")
    handles, names = axes[0][0].get_legend_handles_labels()
    first = sorted(range(len(names)), key=lambda i: not names[i].startswith("ToMe, measured"))  # errorbars come last
    figure.legend([handles[i] for i in first], [names[i] for i in first], loc="lower center", ncol=3, fontsize=8,
                  frameon=False)
    figure.tight_layout(rect=(0, 0.16, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="wan,cogvideox", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192], choices=sorted(GRIDS),
                        help="video tokens per block (grids: " + ", ".join(
                            f"{n}={'x'.join(map(str, g))}" for n, g in GRIDS.items()) + ")")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds of one forward (each: base, ToMe, drop)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks of the one-forward model")
    parser.add_argument("--stack-layers", type=int, default=2, help="blocks of the stacks' model (at least 2)")
    parser.add_argument("--steps", type=int, default=6, help="denoiser calls of the stacks' loop")
    parser.add_argument("--stack-rounds", type=int, default=2, help="rounds of the loop (each: plain + every stack)")
    parser.add_argument("--stack-tokens", type=int, nargs="+", default=[1024, 4096], choices=sorted(GRIDS),
                        help="measure the stacks at these of the --tokens only: a stack costs about 5x token merging "
                             "alone (default: 1024 4096)")
    parser.add_argument("--no-stacks", action="store_true", help="token merging alone")
    parser.add_argument("--no-ceiling", action="store_true", help="no threshold-1 cache rows")
    parser.add_argument("--heads", type=int, default=None,
                        help="narrow: this many heads of the real head size, FFN and text widths scaled alike "
                             "(default: the real 12 / 30)")
    parser.add_argument("--ratio", type=float, default=0.5, help="ToMe merge ratio (stride 1x2x2, self-attention)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default 1 on CPU: shared cores make more threads wait for "
                             "each other at random; 0: torch's default)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="CPU: keep glibc's default of unmapping freed large blocks (see tome_speed.py)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "scaling")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown[0]!r}; known: {', '.join(MODELS)}")
    if args.rounds < 1 or args.stack_rounds < 1 or args.steps < 2 or args.warmup < 0 or args.layers < 1:
        parser.error("--rounds, --stack-rounds and --layers must be at least 1, --steps at least 2, --warmup >= 0")
    if args.stack_layers < 2 and not args.no_stacks:
        parser.error("--stack-layers must be at least 2: first block cache always runs the first block")
    args.dtype_ = getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cpu = not args.device.startswith("cuda")
    threads = args.threads if args.threads is not None else (1 if cpu else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    args.malloc = benchmark_allocator(args.device, args.system_malloc)
    env = environment(args.device, args.dtype_) | {"threads": torch.get_num_threads(), "allocator": args.malloc}
    print(environment_line(env) + (f" · {torch.get_num_threads()} thread(s) · {args.malloc}" if cpu else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "scaling.json"
    records = load_records(store)
    pending = []  # configurations with a part still to measure
    for key in args.models.split(","):
        for tokens in args.tokens:
            spec, width, grid = MODELS[key], MODELS[key].width(args.heads), GRIDS[tokens]
            settings = settings_of(args, width)
            record = next((r for r in records if r["model"] == key and r["tokens"] == tokens
                           and r["settings"] == settings), None)
            if record is None:
                record = dict(model=key, label=spec.label, tokens=tokens, grid=list(grid), settings=settings,
                              width=asdict(width), text_tokens=spec.text_tokens)
                records.append(record)
            parts = [part for part in ("tome", "stacks")
                     if part not in record and (part == "tome" or runs_stacks(tokens, args))]
            if parts:
                pending.append((spec, width, grid, record, parts))
            else:
                print(f"{spec.label}, {tokens:,} tokens: already in {store}, skipped", flush=True)
    started, rate = time.perf_counter(), None  # rate: seconds per planned multiply-add, once one ran
    for index, (spec, width, grid, record, parts) in enumerate(pending):
        remaining = sum(planned_macs(*item[:3], args, item[4]) for item in pending[index:])
        guess = f"; about {duration(rate * remaining)} left in all" if rate else ""
        print(f"{spec.label}, {record['tokens']:,} tokens (grid {'x'.join(map(str, grid))}), width "
              f"{width.heads}x{spec.head_dim}{guess}", flush=True)
        begin = time.perf_counter()
        for part, measure in (("tome", measure_forward), ("stacks", measure_stacks)):
            if part in parts:
                with HostLoadMonitor() as monitor:
                    record[part] = measure(spec, width, grid, args)
                load = monitor.load
                record[part]["host_load"] = load.to_dict() if load else None
                if load and load.busy:
                    print(f"  warning: {load.busy}: these timings are not to be trusted", flush=True)
                save(store, records, env)
        took = time.perf_counter() - begin
        rate = took / planned_macs(spec, width, grid, args, parts)
        print(f"  done in {duration(took)}", flush=True)
    # Every stored configuration measured with these settings, not only this run's: a run that adds a
    # token count (or a model) adds it to the same table and plot.
    order = list(MODELS)
    shown = sorted((r for r in records if r["model"] in MODELS
                    and r["settings"] == settings_of(args, MODELS[r["model"]].width(args.heads))),
                   key=lambda r: (order.index(r["model"]), r["tokens"]))
    print_tables(shown, args)
    write_csv(args.out / "scaling.csv", shown)
    problem = plot(args.out / "scaling.png", shown, args)
    written = f"{store}, {args.out / 'scaling.csv'}" + (f"; {problem}" if problem else f", {args.out / 'scaling.png'}")
    print(f"\nwrote {written} ({duration(time.perf_counter() - started)})")
    return {"records": shown, "out": str(args.out)}


if __name__ == "__main__":
    main()
