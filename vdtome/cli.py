"""Command line: ``python -m vdtome compare --preset tiny-shapes-128 --prompt "..." --method tome:ratio=0.5 --out DIR``.

``python -m vdtome bench --preset P --prompts FILE --sweep SWEEP.yaml --out DIR`` runs a sweep over
prompts and seeds (see :mod:`vdtome.bench`), in this process or on Ray (``--ray``).

``--method NAME[:field=value,...]`` is repeatable: the methods stack in the order given (``python -m
vdtome methods`` lists them with their fields). Without ``--method``, the token-merging flags
(``--ratio``, ``--stride``...) describe a stack of token merging alone, as before methods stacked.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    compare.add_argument("--preset", default="tiny-shapes-128", help="model preset (see `python -m vdtome presets`)")
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
                              "(default: the preset's; each a repeat: 6 or more give an interval, fewer are not tested)")
    compare.add_argument("--timing-steps", type=int,
                         help="steps of the rounds after the first when every step of the stack costs alike "
                              "(default: the preset's; 0: every round runs all steps)")
    compare.add_argument("--warmup-steps", type=int, default=2, help="steps of each untimed warm-up call (>= 2)")
    compare.add_argument("--no-snap", action="store_true", help="refuse invalid sizes instead of snapping them")
    compare.add_argument("--no-baseline-cache", action="store_true")
    compare.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    compare.add_argument("--out", help="output folder (default: a fresh temporary folder)")
    compare.add_argument("--json", action="store_true", help="print the full JSON result instead of the table")
    compare.add_argument("--method", action="append", default=[], metavar="NAME[:FIELD=VALUE,...]",
                         help="a method of the stack, repeatable, applied in the order given, e.g. tome:ratio=0.5 "
                              "first_block_cache:threshold=0.2 (see `python -m vdtome methods`)")
    tome = compare.add_argument_group("token merging alone (when no --method is given)")
    tome.add_argument("--ratio", type=float, default=None, help="default: the preset's (`python -m vdtome presets`)")
    tome.add_argument("--stride", type=int, nargs=3, default=None, metavar=("ST", "SY", "SX"), help="default: the preset's")
    tome.add_argument("--strategy", choices=("bipartite", "attnbin"), default=None)
    tome.add_argument("--blocks", type=_blocks, default=None, help="all | every_other | 0,2,5")
    tome.add_argument("--merge-cross-attn", action="store_true", default=None)
    tome.add_argument("--merge-ffn", action="store_true", default=None)
    tome.add_argument("--no-self-attn", action="store_true", default=None, help="do not merge before self-attention")
    tome.add_argument("--fixed-destinations", action="store_true", default=None,
                      help="first token of each cell, not random")
    tome.add_argument("--tome-seed", type=int, default=None)
    tome.add_argument("--matching", choices=("shared", "per_sample"), default=None)
    tome.add_argument("--reuse-steps", type=int, default=None)

    bench = commands.add_parser(
        "bench", help="run a sweep of settings over prompts and seeds: rows file, summary, plots, HTML report",
        description="Every setting of a sweep file on every prompt and seed; rows are appended to DIR/rows.jsonl "
                    "as they finish and a rerun of the same command skips the finished ones.")
    bench.add_argument("--preset", default="tiny-shapes-128", help="model preset (see `python -m vdtome presets`)")
    bench.add_argument("--prompts", required=True,
                       help="a text file (one prompt a line, # comments) or a prompt set (default, shapes)")
    bench.add_argument("--limit", type=int, help="only the first N prompts")
    bench.add_argument("--sweep", required=True,
                       help="a sweep file (YAML) or a shipped sweep's name: " + ", ".join(_shipped_sweep_names()))
    bench.add_argument("--seeds", default="0", help="e.g. 0,1,2 or 0-3 (default 0)")
    bench.add_argument("--rounds", type=int, help="timing rounds per comparison (default: the sweep's, else the preset's)")
    bench.add_argument("--out", required=True, help="results folder (rerun with the same folder to resume)")
    bench.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    bench.add_argument("--retries", type=int, default=2, help="reruns of a (prompt, seed) group that raised (default 2)")
    bench.add_argument("--ray", action="store_true", help="run the groups on Ray actors, one per device")
    bench.add_argument("--ray-address", help="an existing Ray cluster, from one of its nodes: auto or HEAD:6379 (not ray://); implies --ray")
    bench.add_argument("--ray-workers", type=int,
                       help="actors (default: one per GPU of the cluster, or one on a cluster without GPUs)")
    bench.add_argument("--ray-cpus", type=float, default=None,
                       help="CPUs per actor (default: 1 beside a GPU; without GPUs, the cluster's CPUs / workers)")
    bench.add_argument("--no-report", action="store_true", help="rows and summary only (no plots, no HTML)")

    from .gpucheck import add_parser as add_gpucheck

    add_gpucheck(commands)
    commands.add_parser("methods", help="list acceleration methods, their fields and the presets they support")
    commands.add_parser("presets", help="list model presets")
    prompts = commands.add_parser("prompts", help="print a prompt set")
    prompts.add_argument("--set", default="default")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        print(_methods_text())
        return 0
    if args.command == "presets":
        from .presets import load_presets

        for preset in load_presets().values():
            print(f"{preset.name:24} {preset.label}\n{'':24} {preset.hardware}")
        return 0
    if args.command == "prompts":
        from .presets import load_prompts

        print("\n".join(load_prompts(args.set)))
        return 0
    if args.command == "bench":
        return _bench(args)
    if args.command == "gpucheck":
        from .gpucheck import main as gpucheck

        return gpucheck(args)
    return _compare(args)


def _shipped_sweep_names() -> list[str]:
    from .sweep import shipped_sweeps

    return list(shipped_sweeps())


def _bench(args) -> int:
    from .bench import BenchPlan, format_summary, parse_seeds, read_prompts, run_bench
    from .pipelines import ModelUnavailableError
    from .sweep import load_sweep
    from .validation import RequestError

    try:
        plan = BenchPlan(preset=args.preset, prompts=read_prompts(args.prompts, args.limit),
                         seeds=parse_seeds(args.seeds), sweep=load_sweep(args.sweep), rounds=args.rounds)
        plan.check()
        runner = None
        if args.ray or args.ray_address:
            from .bench_ray import RayRunner

            runner = RayRunner(plan, address=args.ray_address, workers=args.ray_workers, cpus_per_worker=args.ray_cpus,
                               device=args.device)
        outcome = run_bench(plan, args.out, runner=runner, retries=args.retries, report=not args.no_report,
                            device=args.device)
    except (RequestError, ModelUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished rows are in {args.out}/rows.jsonl; run the same command again to go on",
              file=sys.stderr)
        return 130
    print(format_summary(outcome.summaries))
    failed = sum(not row.ok for row in outcome.rows)
    print(f"\n{len(outcome.rows)} of {len(plan.keys())} rows ({outcome.skipped} from an earlier run, {outcome.ran} now; "
          f"{failed} failed). Files in {args.out}:")
    for name, path in outcome.files.items():
        if not name.startswith("plot: "):
            print(f"  {name}: {path}")
    return 0 if failed == 0 else 1


def _compare(args) -> int:
    from .compare import ComparisonEngine, ComparisonRequest, RequestError
    from .pipelines import ModelUnavailableError
    from .report import format_table

    try:
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
            methods=_stack(args),
            rounds=args.rounds,
            timing_steps=args.timing_steps,
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


TOME_FLAGS = ("ratio", "stride", "strategy", "blocks", "merge_cross_attn", "merge_ffn", "no_self_attn",
              "fixed_destinations", "tome_seed", "matching", "reuse_steps")


def _stack(args) -> tuple:
    """The stack: the ``--method`` items in order, or token merging from its own flags; fields
    not given take the preset's defaults."""
    from .presets import get_preset

    preset = get_preset(args.preset)
    flags = [name for name in TOME_FLAGS if getattr(args, name) is not None]
    if not args.method:
        return (_tome_from_flags(args, preset),)
    if flags:
        raise ValueError(f"--{flags[0].replace('_', '-')} describes token merging alone; with --method, give "
                         "its fields as --method tome:ratio=0.5,stride_y=2,...")
    return tuple(parse_method(text, preset) for text in args.method)  # the engine checks the stacking rules


def _tome_from_flags(args, preset):
    from .methods import default_stack
    from .tome import ToMeConfig

    given = {
        "ratio": args.ratio,
        "stride": None if args.stride is None else tuple(args.stride),
        "strategy": args.strategy,
        "blocks": args.blocks,
        "merge_self_attn": None if args.no_self_attn is None else not args.no_self_attn,
        "merge_cross_attn": args.merge_cross_attn,
        "merge_ffn": args.merge_ffn,
        "random_destinations": None if args.fixed_destinations is None else not args.fixed_destinations,
        "seed": args.tome_seed,
        "matching": args.matching,
        "reuse_steps": args.reuse_steps,
    }
    base = next(config for config in default_stack(preset) if isinstance(config, ToMeConfig))
    return dataclasses.replace(base, **{name: value for name, value in given.items() if value is not None})


def parse_method(text: str, preset=None):
    """``NAME[:field=value,...]`` -> that method's config (every value checked by its form's rules;
    the fields not given at ``preset``'s defaults, or the method's own without one).
    A field may be named without its method's prefix (``first_block_cache:threshold=0.2``); a
    list takes ``+`` between its items (``tome:targets=self-attention+feed-forward``)."""
    from .validation import RequestError

    from .methods import preset_form_defaults

    method, overrides = method_overrides(text)
    try:
        return method.config_from(overrides, None if preset is None else preset_form_defaults(method, preset))
    except RequestError as error:
        raise RequestError(f"--method {text}: {error}", error.field) from None


def method_overrides(text: str):
    """``NAME[:field=value,...]`` -> (the method, its form fields given), each value checked alone."""
    from .methods import method_named
    from .validation import RequestError

    name, _, settings = text.partition(":")
    method = method_named(name.strip())
    overrides = {}
    try:
        for item in filter(None, (part.strip() for part in settings.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep:
                raise RequestError(f"{item!r} is not field=value")
            form_field = method.field_named(key)
            if form_field.name in overrides:
                raise RequestError(f"{key} is given twice")
            overrides[form_field.name] = form_field.from_text(value.strip())
    except RequestError as error:
        raise RequestError(f"--method {text}: {error}", error.field) from None
    return method, overrides


def _methods_text() -> str:
    from .denoisers import pipeline_denoiser_types
    from .methods import METHODS
    from .presets import load_presets

    presets = load_presets()
    lines = []
    for method in METHODS.values():
        lines.append(f"{method.name}: {method.label}{' (on by default in the app)' if method.on_by_default else ''}")
        if method.docs:
            lines.append(f"  {method.docs}")
        lines += [f"  {form_field.describe()}" for form_field in method.fields]
        supported, unavailable = [], []
        for preset in presets.values():
            reason = method.unavailable(pipeline_denoiser_types(preset.pipeline_class))
            (unavailable if reason else supported).append(preset.name)
        lines.append(f"  presets: {', '.join(supported) or 'none'}")
        if unavailable:
            lines.append(f"  unavailable for: {', '.join(unavailable)}")
        lines.append("")
    return "\n".join(lines).rstrip()


if __name__ == "__main__":
    raise SystemExit(main())
