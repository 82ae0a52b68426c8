"""Speed of attention-tile sparsity against dense attention: the kernel alone and a whole forward.

Two parts, each timed in alternating rounds (every variant once per round, the order rotating), the
speedup being the median over rounds of dense / variant within the round, with its interquartile
range, next to the FLOP ideal (the pairs a dense call scores over those the pattern scores; for a
forward, the analytic MACs of every layer with self-attention scaled so):

* kernel: one self-attention call over T latent frames (dense ``scaled_dot_product_attention``
  against the gathered-keys computation, and FlexAttention's compiled block mask on CUDA);
* forward: a Wan transformer at Wan 2.1 1.3B's width (12 heads x 128, FFN 8960) with the method
  applied through its hooks (dense, two patterns, token merging, and tile sparsity on the merged
  tokens).

    python benchmarks/tile_sparsity.py                       # CPU: 8 latent frames, 8192 tokens
    python benchmarks/tile_sparsity.py --device cuda --dtype bfloat16 --frames 16 --tokens-per-frame 2048
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    architecture_of,
    forward_macs,
    quartiles,
    synchronize,
    timed_forward,
)
from vdtome.core.tile_sparsity import (  # noqa: E402
    TileLayout,
    flex_block_mask,
    flex_tile_attention,
    global_frame_ids,
    parse_pattern,
    query_groups,
    tile_sparse_attention,
)
from vdtome.measure.memory import benchmark_allocator  # noqa: E402
from vdtome.methods import apply_stack  # noqa: E402
from vdtome.methods.tile_sparsity import TileSparsity  # noqa: E402
from vdtome.tome import ToMeConfig  # noqa: E402

TEXT_TOKENS = 64


def rounds(calls: dict, device: str, warmup: int, repeat: int) -> dict[str, list[float]]:
    """Seconds of each call per measured round; the order rotates so none always runs first."""
    names = list(calls)
    seconds = {name: [] for name in names}
    for index in range(warmup + repeat):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = calls[name]()
            if index >= warmup:
                seconds[name].append(elapsed)
    return seconds


def speedup_text(seconds: dict[str, list[float]], name: str, ideal: float) -> str:
    low, middle, high = quartiles([b / v for b, v in zip(seconds["dense"], seconds[name])])
    median_ms = sorted(seconds[name])[len(seconds[name]) // 2] * 1e3
    return (f"{name:24} {median_ms:>10.1f} {middle:>7.2f}x {low:>5.2f}-{high:<5.2f} {ideal:>6.2f}x "
            f"{middle / ideal:>7.2f}")


def clock(fn, device: str):
    def run() -> float:
        synchronize(device)
        with torch.inference_mode():
            return timed_forward(fn, (), device)
    return run


def kernel_part(args, dtype) -> None:
    length = args.frames * args.tokens_per_frame
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, length, args.head_dim, generator=generator)
               .to(args.device, dtype) for _ in range(3))
    frame_ids = TileLayout(args.frames, args.tokens_per_frame, 0, length).frame_ids(torch.device(args.device))
    calls = {"dense": clock(lambda: F.scaled_dot_product_attention(q, k, v), args.device)}
    ideals = {}
    flex = None
    if args.device.startswith("cuda"):
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    for text in args.patterns:
        global_ids = global_frame_ids(args.frames, parse_pattern(text).global_frames)
        groups = query_groups(frame_ids, global_ids)
        ideals[f"{text} gather"] = length * length / groups.scored
        calls[f"{text} gather"] = clock(lambda groups=groups: tile_sparse_attention(q, k, v, groups), args.device)
        if flex is not None:
            ideals[f"{text} flex"] = ideals[f"{text} gather"]
            block_mask = flex_block_mask(frame_ids, global_ids, batch=args.batch)
            calls[f"{text} flex"] = clock(
                lambda m=block_mask: flex_tile_attention(q, k, v, m, attention=flex), args.device)
    seconds = rounds(calls, args.device, args.warmup, args.repeat)
    print(f"\nkernel: one self-attention call, batch {args.batch}, {args.heads} heads x {args.head_dim}, "
          f"{args.frames} latent frames x {args.tokens_per_frame} tokens = {length} tokens")
    print(HEADER)
    print(speedup_text(seconds, "dense", 1.0))
    for name in ideals:
        print(speedup_text(seconds, name, ideals[name]))


def forward_part(args, dtype) -> None:
    model = build_wan(args.model_heads, args.layers, args.ffn_dim, args.device, dtype)
    c = args.model_heads * 128
    side = int(round((args.tokens_per_frame) ** 0.5))
    if side * side != args.tokens_per_frame:
        raise SystemExit("--tokens-per-frame must be a square for the forward part")
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(args.batch, 16, args.frames, 2 * side, 2 * side, generator=generator).to(args.device, dtype)
    text = torch.randn(args.batch, TEXT_TOKENS, c, generator=generator).to(args.device, dtype)
    call = (latent, torch.full((args.batch,), 500.0, device=args.device), text)
    tokens = args.frames * args.tokens_per_frame
    architecture = architecture_of(model, TEXT_TOKENS)

    def ideal(stack, self_tokens: int = tokens) -> float:
        """Analytic MACs of the dense forward over those of the variant (self-attention scaled by
        the pairs the variant scored, counted by the method itself)."""
        full = forward_macs(architecture, args.layers, args.batch, tokens)
        variant = forward_macs(architecture, args.layers, args.batch, tokens, self_tokens=self_tokens)
        self_attention = args.batch * args.layers * 2 * self_tokens * self_tokens * c
        share = 1.0
        for report in stack.reports():
            if report.method == "tile_sparsity":
                share = report.detail["pairs_scored"] / report.detail["pairs_dense"]
        return full.total / (variant.total - self_attention * (1 - share))

    variants = {"dense": ()}
    for text in args.patterns:
        variants[f"tile {text}"] = (TileSparsity(pattern=text, kernel="gather" if args.device == "cpu" else "auto"),)
    tome = ToMeConfig(ratio=args.ratio)
    variants[f"tome {args.ratio:g}"] = (tome,)
    variants[f"tome {args.ratio:g} + tile {args.patterns[-1]}"] = (tome, TileSparsity(pattern=args.patterns[-1]))
    ideals = {}
    for name, configs in variants.items():
        with apply_stack(model, configs) as stack, torch.inference_mode():
            model(*call)
            kept = next((r.detail["tokens_per_block"][0]["tokens_out"] for r in stack.reports() if r.method == "tome"),
                        tokens)
            ideals[name] = ideal(stack, kept)

    def timed(configs):
        def run() -> float:
            with apply_stack(model, configs) if configs else contextlib.nullcontext():
                synchronize(args.device)
                with torch.inference_mode():
                    return timed_forward(model, call, args.device)
        return run

    seconds = rounds({name: timed(configs) for name, configs in variants.items()}, args.device, args.warmup,
                     args.repeat)
    print(f"\nforward: Wan transformer, {args.layers} layer(s), {args.model_heads} heads x 128 (width {c}), "
          f"FFN {args.ffn_dim}, "
          f"batch {args.batch}, {args.frames} latent frames x {args.tokens_per_frame} tokens = {tokens} tokens, "
          f"{TEXT_TOKENS} text tokens")
    print(HEADER)
    for name in variants:
        print(speedup_text(seconds, name, ideals[name]))


def build_wan(heads: int, layers: int, ffn_dim: int, device: str, dtype: torch.dtype):
    """A random-weight Wan transformer of ``heads`` x 128 width (Wan 2.1 1.3B: 12 heads, FFN 8960)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128,
                                      in_channels=16, out_channels=16, text_dim=heads * 128, freq_dim=64,
                                      ffn_dim=ffn_dim, num_layers=layers, rope_max_seq_len=128)
    return model.to(device=device, dtype=dtype).eval()


HEADER = (f"{'variant':24} {'median ms':>10} {'speedup':>8} {'IQR':>11} {'ideal':>7} {'effic.':>7}\n" + "-" * 72)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8, help="latent frames (>= 8 for the issue's figures)")
    parser.add_argument("--tokens-per-frame", type=int, default=1024, help="tokens per latent frame (a square)")
    parser.add_argument("--patterns", nargs="+", default=["2:6", "1:7"])
    parser.add_argument("--heads", type=int, default=12, help="heads of the kernel part")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--model-heads", type=int, default=12, help="heads x 128 of the forward part's model")
    parser.add_argument("--ffn-dim", type=int, default=8960)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.5, help="token merging's ratio in the stacked rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--parts", default="kernel,forward")
    args = parser.parse_args()
    for text in args.patterns:
        if parse_pattern(text) is None or parse_pattern(text).frames != args.frames:
            parser.error(f"pattern {text} must be G:P with G + P = --frames ({args.frames})")
    malloc = benchmark_allocator(args.device, False)
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | dtype {args.dtype} | {malloc} | "
          f"{args.warmup} warm-up + {args.repeat} measured rounds")
    if "kernel" in args.parts:
        kernel_part(args, dtype)
    if "forward" in args.parts:
        forward_part(args, dtype)
    print("\nspeedup: median over rounds of dense / variant within the round, IQR its interquartile range; ideal:\n"
          "the FLOP ratio (kernel: pairs scored; forward: analytic MACs with self-attention scaled by the pairs the\n"
          "method scored); efficiency = speedup / ideal. Token merging's rows count the self-attention tokens it kept.")


if __name__ == "__main__":
    main()
