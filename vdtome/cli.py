"""Command line: ``python -m vdtome compare --preset tiny-wan --prompt "..." --ratio 0.5 --out DIR``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _blocks(value: str):
    if value in ("all", "every_other"):
        return value
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"blocks must be 'all', 'every_other' or indices like 0,2,5; got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vdtome", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser("compare", help="run baseline and accelerated, print figures, write files")
    compare.add_argument("--preset", default="tiny-wan", help="model preset (see `python -m vdtome presets`)")
    compare.add_argument("--prompt", required=True)
    compare.add_argument("--negative-prompt", default="")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--frames", type=int, help="default: the preset's")
    compare.add_argument("--height", type=int)
    compare.add_argument("--width", type=int)
    compare.add_argument("--steps", type=int)
    compare.add_argument("--guidance", type=float)
    compare.add_argument("--rounds", type=int,
                         help="timing rounds: baseline and accelerated calls back to back, order alternating "
                              "(default: the preset's; 6 or more give an interval from rounds alone)")
    compare.add_argument("--warmup-steps", type=int, default=2, help="steps of each untimed warm-up call (>= 2)")
    compare.add_argument("--no-snap", action="store_true", help="refuse invalid sizes instead of snapping them")
    compare.add_argument("--no-baseline-cache", action="store_true")
    compare.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    compare.add_argument("--out", help="output folder (default: a fresh temporary folder)")
    compare.add_argument("--json", action="store_true", help="print the full JSON result instead of the table")
    tome = compare.add_argument_group("token merging")
    tome.add_argument("--ratio", type=float, default=0.5)
    tome.add_argument("--stride", type=int, nargs=3, default=(1, 2, 2), metavar=("ST", "SY", "SX"))
    tome.add_argument("--strategy", choices=("bipartite", "attnbin"), default="bipartite")
    tome.add_argument("--blocks", type=_blocks, default="all", help="all | every_other | 0,2,5")
    tome.add_argument("--merge-cross-attn", action="store_true")
    tome.add_argument("--merge-ffn", action="store_true")
    tome.add_argument("--no-self-attn", action="store_true", help="do not merge before self-attention")
    tome.add_argument("--fixed-destinations", action="store_true", help="first token of each cell, not random")
    tome.add_argument("--tome-seed", type=int, default=0)
    tome.add_argument("--matching", choices=("shared", "per_sample"), default="shared")
    tome.add_argument("--reuse-steps", type=int, default=1)

    commands.add_parser("presets", help="list model presets")
    prompts = commands.add_parser("prompts", help="print a prompt set")
    prompts.add_argument("--set", default="default")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        from .presets import load_presets

        for preset in load_presets().values():
            print(f"{preset.name:24} {preset.label}\n{'':24} {preset.hardware}")
        return 0
    if args.command == "prompts":
        from .presets import load_prompts

        print("\n".join(load_prompts(args.set)))
        return 0
    return _compare(args)


def _compare(args) -> int:
    from .compare import ComparisonEngine, ComparisonRequest, RequestError
    from .pipelines import ModelUnavailableError
    from .report import format_table
    from .tome import ToMeConfig

    try:
        config = ToMeConfig(
            ratio=args.ratio,
            stride=tuple(args.stride),
            strategy=args.strategy,
            blocks=args.blocks,
            merge_self_attn=not args.no_self_attn,
            merge_cross_attn=args.merge_cross_attn,
            merge_ffn=args.merge_ffn,
            random_destinations=not args.fixed_destinations,
            seed=args.tome_seed,
            matching=args.matching,
            reuse_steps=args.reuse_steps,
        )
        request = ComparisonRequest(
            preset=args.preset,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            frames=args.frames,
            height=args.height,
            width=args.width,
            steps=args.steps,
            guidance=args.guidance,
            acceleration=config,
            rounds=args.rounds,
            warmup_steps=args.warmup_steps,
            snap=not args.no_snap,
            reuse_baseline=not args.no_baseline_cache,
        )
        engine = ComparisonEngine(device=args.device)

        interactive = sys.stderr.isatty()

        def progress(event) -> None:
            if interactive:
                end = "\n" if event.done == event.total else ""
                print(f"\r{event.label:60}", end=end, file=sys.stderr, flush=True)
            elif event.step == event.steps:
                print(event.label, file=sys.stderr, flush=True)

        result = engine.run(request, out_dir=args.out, progress=progress)
    except (RequestError, ValueError, TypeError, ModelUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else format_table(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
