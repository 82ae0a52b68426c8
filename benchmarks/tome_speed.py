"""Speed of a Wan transformer forward with and without video token merging.

Prints, for each token count: median forward times, the measured speedup (median of per-round
ratios, with its interquartile range), the ideal speedup of a FLOP model of the same merge,
efficiency = measured / ideal, the speedup of an oracle that drops tokens for free, and the share
of the patched forward spent in matching + merge + unmerge (from the ``vdtome.*`` profiler ranges).

FLOP model: analytic multiply-adds of every linear / conv layer and of attention
(QK^T and AV: 2 * Nq * Nk * C), matching excluded; the linear part is cross-checked against
``torch.utils.flop_counter`` on the baseline (the counter cannot see CPU flash attention).

On CPU the script first makes glibc serve every block from its heap and keep what is freed
(``vdtome.measure.memory.retain_freed_host_memory``):
by default every forward page-faults its activations in afresh, tens of thousands of faults whose
cost varies from run to run, which a GPU's caching allocator never pays. ``--system-malloc``
measures without it; the faults per forward are printed either way.

    python benchmarks/tome_speed.py                 # CPU, 4096 and 8192 tokens
    python benchmarks/tome_speed.py --device cuda --dtype bfloat16 --tokens 16384 32768
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import WanTransformer3DModel  # noqa: E402

from benchmarks._common import (  # noqa: E402
    GRIDS,
    alternated_times,
    architecture_of,
    forward_macs,
    linear_macs_counted,
    quartiles,
    synchronize,
)
from vdtome.measure.memory import benchmark_allocator
from vdtome.tome import ToMeConfig, apply_tome

TEXT_TOKENS = 64


@dataclass(frozen=True)
class Shape:
    heads: int
    head_dim: int
    layers: int
    ffn_mult: int

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


def build(shape: Shape, device: str, dtype: torch.dtype) -> WanTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=shape.heads,
            attention_head_dim=shape.head_dim,
            in_channels=16,
            out_channels=16,
            text_dim=shape.dim,
            freq_dim=64,
            ffn_dim=shape.ffn_mult * shape.dim,
            num_layers=shape.layers,
            rope_max_seq_len=128,
        )
    return model.to(device=device, dtype=dtype).eval()


def inputs(grid, shape: Shape, device: str, dtype: torch.dtype, batch: int):
    generator = torch.Generator().manual_seed(0)
    t, h, w = grid
    latent = torch.randn(batch, 16, t, 2 * h, 2 * w, generator=generator)
    text = torch.randn(batch, TEXT_TOKENS, shape.dim, generator=generator)
    timestep = torch.full((batch,), 500.0)
    return latent.to(device, dtype), timestep.to(device), text.to(device, dtype)


def overhead_share(model, args, device: str, repeat: int = 3) -> tuple[float, dict[str, float]]:
    """Share of the patched forward spent inside the vdtome.* profiler ranges."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode():
        model(*args)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(repeat):
                with torch.profiler.record_function("vdtome.forward"):
                    model(*args)
                synchronize(device)
    use_device = device.startswith("cuda")
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("vdtome."):
            totals[event.key] = event.device_time_total if use_device else event.cpu_time_total
    forward = totals.pop("vdtome.forward")
    parts = {key.removeprefix("vdtome."): value / forward for key, value in totals.items()}
    return sum(parts.values()), parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192], choices=sorted(GRIDS))
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn-mult", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=24, help="measured rounds (each runs all three variants), >= 1")
    parser.add_argument("--windows", default="auto,global", help="comma list: auto, global, or t:y:x (cells)")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="CPU: keep glibc's default of unmapping freed large blocks (every forward page-faults its activations again)",
    )
    args = parser.parse_args()
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be at least 1 and --warmup at least 0")

    malloc = benchmark_allocator(args.device, args.system_malloc)
    dtype = getattr(torch, args.dtype)
    shape = Shape(args.heads, args.head_dim, args.layers, args.ffn_mult)
    model = build(shape, args.device, dtype)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | dtype {args.dtype} | batch {args.batch} | {malloc}")
    print(f"Wan transformer: {shape.layers} layers, {shape.heads} heads x {shape.head_dim}, ffn x{shape.ffn_mult}, "
          f"{TEXT_TOKENS} text tokens; ToMe ratio {args.ratio}, stride (1, 2, 2), self-attention merged in every block")
    print("FLOP model: analytic MACs (linears + attention), matching excluded\n")

    architecture = architecture_of(model, TEXT_TOKENS)
    windows = {"auto": "auto", "global": None}
    header = (f"{'tokens':>7} {'matching':>10} {'base ms':>9} {'tome ms':>9} {'speedup':>8} {'IQR':>11} {'ideal':>6} "
              f"{'effic.':>7} {'oracle':>7} {'vs oracle':>9} {'overhead':>9}  (match / merge / unmerge)  faults/fwd base / tome")
    print(header)
    print("-" * len(header))
    for tokens in args.tokens:
        grid = GRIDS[tokens]
        call = inputs(grid, shape, args.device, dtype, args.batch)
        counted = linear_macs_counted(model, call)
        full = forward_macs(architecture, shape.layers, args.batch, tokens)
        for label in args.windows.split(","):
            window = windows.get(label) if label in windows else tuple(int(v) for v in label.split(":"))
            config = ToMeConfig(ratio=args.ratio, stride=(1, 2, 2), match_window=window)
            timings, kept = alternated_times(model, call, config, args.device, args.warmup, args.repeat)
            base, tome = timings.median("base"), timings.median("tome")
            handle = apply_tome(model, config)
            try:
                share, parts = overhead_share(model, call, args.device)
            finally:
                handle.remove()
            ideal = full.total / forward_macs(architecture, shape.layers, args.batch, tokens, self_tokens=kept).total
            low, speedup, high = quartiles(timings.paired_speedups("tome"))
            oracle = statistics.median(timings.paired_speedups("oracle"))
            detail = " / ".join(f"{100 * parts.get(key, 0.0):.1f}%" for key in ("match", "merge", "unmerge"))
            window_name = "global" if config.match_window is None else "x".join(map(str, config.match_window))
            faults = " / ".join("-" if timings.faults[v] is None else f"{timings.faults[v]:.0f}" for v in ("base", "tome"))
            print(f"{tokens:>7} {window_name:>10} {base * 1e3:>9.1f} {tome * 1e3:>9.1f} {speedup:>7.2f}x "
                  f"{low:>5.2f}-{high:.2f} {ideal:>5.2f}x {speedup / ideal:>7.2f} {oracle:>6.2f}x {speedup / oracle:>9.2f} "
                  f"{100 * share:>8.1f}%  ({detail})  {faults}")
        print(f"{'':>7} linear MACs: flop_counter {counted / 1e9:.3f} G vs model {full.linear / 1e9:.3f} G")
    print("\nbase / tome ms: medians over the rounds; speedup = median over rounds of base / tome within the round, IQR its"
          "\ninterquartile range; ideal = FLOP-model speedup; efficiency = speedup / ideal;"
          "\noracle = speedup when every attn1 simply runs on its first N - r tokens (same kernels, no matching, one copy back):"
          "\nthe most any token reduction can gain here; vs oracle = speedup / oracle, i.e. how much of that ToMe keeps;"
          "\noverhead = time in vdtome.match + vdtome.merge + vdtome.unmerge over the patched forward (profiler, which"
          "\nadds its own per-op cost to these many small ops); faults/fwd = minor page faults per forward.")


if __name__ == "__main__":
    main()
