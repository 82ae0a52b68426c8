"""Command line: ``python -m vdtome compare --preset tiny-shapes-128 --prompt "..." --method tome:ratio=0.5 --out DIR``.

``python -m vdtome bench --preset P --prompts FILE --sweep SWEEP.yaml --out DIR`` runs a sweep over
prompts and seeds (see :mod:`vdtome.bench.runner`), in this process or on Ray (``--ray``).
``python -m vdtome tune --preset P --floor psnr=24 --minutes 20 --out DIR`` finds the fastest stack
above the floors and writes its recipe (see :mod:`vdtome.bench.tune`); ``compare --recipe FILE`` runs it.

``--method NAME[:field=value,...]`` is repeatable: the methods stack in the order given (``python -m
vdtome methods`` lists them with their fields). Every form field of every registered method is also a
flag of its own (``--ratio 0.3``, ``--first-block-cache-threshold 0.05``), generated from the registry:
it sets that field of its method in the stack (without ``--method``, the preset's default stack), and
goes through the method's own parser, so a value is refused with the same message either way.

A size the model cannot take is refused as the app refuses it (exit 2, the rule named) before any
pipeline loads; ``--snap`` runs the nearest valid size instead. The table fits 100 columns
(``--wide``: one line per row).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vdtome.core.presets import ModelPreset

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEFAULT_PRESET = "tiny-shapes-128"
WIDTH = 100  # columns the table, the notes and `methods` are wrapped at


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vdtome", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser("compare", help="run baseline and accelerated, print figures, write files")
    compare.add_argument("--preset", help="model preset (see `python -m vdtome presets`; default: the recipe's, else "
                                          "tiny-shapes-128)")
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
    sizes = compare.add_mutually_exclusive_group()
    sizes.add_argument("--snap", action="store_true",
                       help="run frames, height or width the model cannot take at the nearest valid value, saying "
                            "so (default: refuse them, naming the rule, as the app does)")
    sizes.add_argument("--no-snap", action="store_true",
                       help="refuse sizes the model cannot take: the default now (kept for scripts that pass it)")
    compare.add_argument("--no-baseline-cache", action="store_true")
    compare.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    compare.add_argument("--out", help="output folder (default: a fresh temporary folder)")
    compare.add_argument("--json", action="store_true", help="print the full JSON result instead of the table")
    compare.add_argument("--wide", action="store_true",
                         help=f"print the table one line per row, however long (default: one block per row, "
                              f"wrapped at {WIDTH} columns)")
    compare.add_argument("--recipe", metavar="FILE|NAME",
                         help="the stack of a tune's recipe.json (or a shipped recipe's name), at the size, steps and "
                              "guidance it was tuned at (another value is refused); not with --method or field flags")
    compare.add_argument("--method", action="append", default=[], metavar="NAME[:FIELD=VALUE,...]",
                         help="a method of the stack, repeatable, applied in the order given, e.g. tome:ratio=0.5 "
                              "first_block_cache:threshold=0.2 (see `python -m vdtome methods`)")
    _add_method_flags(compare)

    bench = commands.add_parser(
        "bench", help="run a sweep of settings over prompts and seeds: rows file, summary, plots, HTML report",
        description="Every setting of a sweep file on every prompt and seed; rows are appended to DIR/rows.jsonl "
                    "as they finish and a rerun of the same command skips the finished ones.")
    bench.add_argument("--preset", default=DEFAULT_PRESET, help="model preset (see `python -m vdtome presets`)")
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
    _ray_arguments(bench, "the groups")
    bench.add_argument("--no-report", action="store_true", help="rows and summary only (no plots, no HTML)")

    from vdtome.bench.gpucheck import add_parser as add_gpucheck

    add_gpucheck(commands)
    plan = commands.add_parser(
        "plan", help="estimate a request's peak memory and the cheapest memory methods that fit a budget",
        description="Traces the preset's denoiser and VAE on the meta device (no weights, no compute) at the "
                    "request's size, with and without each memory method, and picks the first combination "
                    "(cheapest in time) whose estimated peak fits each budget.")
    plan.add_argument("--preset", default=DEFAULT_PRESET, help="model preset (see `python -m vdtome presets`)")
    plan.add_argument("--budget", action="append", default=[], metavar="SIZE",
                      help="memory budget, e.g. 24GB (GB = 2^30 bytes, as GPUs are sold); repeatable")
    plan.add_argument("--frames", type=int, help="default: the preset's")
    plan.add_argument("--height", type=int)
    plan.add_argument("--width", type=int)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    search = commands.add_parser(
        "search", help="tune a method per layer on calibration prompts and write its schedule (JSON)",
        description="Runs the plain pipeline on the calibration prompts with the method's probe attached: every "
                    "layer's candidate settings (tile_sparsity: each pattern G:P; tome: ratios 0.1, 0.2, ...) are "
                    "computed beside the dense one on the same inputs, and each layer keeps the one that saves the "
                    "most with its mean relative error (L2 of the attention or sub-layer output, over the "
                    "calibration calls) within the threshold. Load the schedule with --method tile_sparsity:schedule=FILE or "
                    "--method tome:ratio_schedule=FILE.")
    search.add_argument("--preset", default=DEFAULT_PRESET, help="model preset (see `python -m vdtome presets`)")
    search.add_argument("--method", required=True, metavar="tile_sparsity|tome[:FIELD=VALUE,...]",
                        help="the method, with the fields the search keeps fixed, e.g. "
                             "tile_sparsity:placement=spaced,dense_steps=4 (the others at the preset's defaults)")
    search.add_argument("--threshold", type=float, required=True,
                        help="largest relative error a layer may take, e.g. 0.05")
    search.add_argument("--out", required=True, help="the schedule file to write (JSON)")
    search.add_argument("--frames", type=int, help="default: the preset's")
    search.add_argument("--height", type=int)
    search.add_argument("--width", type=int)
    search.add_argument("--steps", type=int)
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--prompts", help="a text file (one prompt a line) or a prompt set (default: the first "
                                          "two of the preset's set)")
    search.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    tune = commands.add_parser(
        "tune", help="find the fastest stack above a quality floor, re-validate it, write recipe.json",
        description="An Optuna study over every registered method's fields (and the stacks the rules allow): each "
                    "trial runs its stack on the tuning prompts with one timing round; the feasible Pareto front is "
                    "then re-run fastest first with the full timing protocol on held-out validation prompts until "
                    "one is faster and keeps every floor on every validation prompt: it is written as "
                    "DIR/recipe.json (with DIR/report.html and DIR/trials.csv). Load it with vdtome.apply(pipe, "
                    "'DIR/recipe.json') or `python -m vdtome compare --recipe DIR/recipe.json`.")
    tune.add_argument("--preset", default=DEFAULT_PRESET, help="model preset (see `python -m vdtome presets`)")
    tune.add_argument("--floor", action="append", default=[], metavar="psnr=DB|ssim=X|judge[=CLIPS]", required=True,
                      help="a quality every validation prompt must keep, repeatable: PSNR or SSIM to the baseline "
                           "video, or (shapes models) the judge: no clip whose colour and direction the baseline "
                           "keeps is lost (CLIPS: lost clips tolerated)")
    tune.add_argument("--out", required=True, help="the tune's folder (its Optuna study, recipe, report)")
    tune.add_argument("--methods", help="methods to search, comma-separated (default: every registered one the "
                                        "preset takes that buys speed)")
    tune.add_argument("--require", help="methods every stack tried holds, comma-separated (e.g. tome: the fastest "
                                        "recipe with token merging in it)")
    tune.add_argument("--trials", type=int, help="trials to run (at least one of --trials and --minutes)")
    tune.add_argument("--minutes", type=float, help="minutes of trials to run, per Ray actor (the validation comes "
                                                    "after)")
    tune.add_argument("--prompts", help="a prompt set (default: the preset's tuning set, e.g. shapes-tuning)")
    tune.add_argument("--tuning-prompts", type=int, default=2, help="the set's first N prompts tune (default 2)")
    tune.add_argument("--validation-prompts", type=int, default=4,
                      help="the next N validate the finalists (default 4; never seen by the study)")
    tune.add_argument("--finalists", type=int, default=3,
                      help="front trials re-run on the validation prompts at most, fastest first (default 3)")
    tune.add_argument("--rounds", type=int, help="timing rounds of each validation comparison (default: the preset's)")
    tune.add_argument("--frames", type=int, help="default: the preset's")
    tune.add_argument("--height", type=int)
    tune.add_argument("--width", type=int)
    tune.add_argument("--steps", type=int)
    tune.add_argument("--seed", type=int, default=0, help="the generation seed and the sampler's")
    tune.add_argument("--resume", action="store_true", help="continue the tune in --out: its finished trials are kept")
    tune.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    _ray_arguments(tune, "the trials, as many at once as there are actors, and the validation comparisons")

    methods = commands.add_parser(
        "methods", help="list acceleration methods, their fields and the presets they support",
        description="Each method's fields with their defaults and ranges. Without --preset the defaults are the "
                    "methods' own; a preset may override them (its method_defaults).")
    methods.add_argument("--preset", help="show this preset's defaults (e.g. tiny-shapes-128, the default preset of "
                                          "compare)")
    commands.add_parser("presets", help="list model presets")
    prompts = commands.add_parser("prompts", help="print a prompt set")
    prompts.add_argument("--set", default="default")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        return _methods(args)
    if args.command == "presets":
        from vdtome.core.presets import load_presets

        for preset in load_presets().values():
            print(f"{preset.name:24} {preset.label}\n{'':24} {preset.hardware}")
        return 0
    if args.command == "prompts":
        from vdtome.core.presets import load_prompts

        print("\n".join(load_prompts(args.set)))
        return 0
    if args.command == "bench":
        return _bench(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "search":
        return _search(args)
    if args.command == "tune":
        return _tune(args)
    if args.command == "gpucheck":
        from vdtome.bench.gpucheck import main as gpucheck

        return gpucheck(args)
    return _compare(args)


def _plan(args) -> int:
    import json

    from vdtome.core.presets import get_preset
    from vdtome.core.validation import RequestError
    from vdtome.engine.plan import make_plan, parse_budget, plan_text
    from vdtome.engine.request import ComparisonRequest, resolve

    try:
        budgets = tuple(parse_budget(text) for text in args.budget)
        preset = get_preset(args.preset)
        settings, _ = resolve(ComparisonRequest(preset=preset.name, prompt="plan", frames=args.frames,
                                                height=args.height, width=args.width, snap=False), preset)
        plan = make_plan(preset.name, settings.frames, settings.height, settings.width, budgets,
                         progress=lambda text: print(text, file=sys.stderr))
    except (RequestError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan_text(plan))
    return 0


def _search(args) -> int:
    from vdtome.bench.runner import read_prompts
    from vdtome.core.validation import RequestError
    from vdtome.engine.search import run_search

    try:
        prompts = read_prompts(args.prompts) if args.prompts else None
        result = run_search(args.preset, args.method, args.threshold, args.out, frames=args.frames,
                            height=args.height, width=args.width, steps=args.steps, prompts=prompts,
                            seed=args.seed, device=args.device, progress=lambda text: print(text, file=sys.stderr))
    except (RequestError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    schedule = result.schedule
    key = "layers" if schedule["method"] == "tile_sparsity" else "ratios"
    print(f"{schedule['method']} schedule for {schedule['preset']} at {schedule['frames']} frames, "
          f"{schedule['height']}x{schedule['width']}, {schedule['steps']} steps, threshold {schedule['threshold']:g}:")
    for index, (entry, errors) in enumerate(zip(schedule[key], schedule["errors"])):
        figures = ", ".join(f"{k} {v['mean']:.3f}/{v['max']:.3f}" for k, v in errors.items())
        print(f"  layer {index:3}: {entry!s:8} mean/max error: {figures}")
    print(f"wrote {result.path}; check digest {schedule['check']['latents_sha256'][:16]}")
    return 0


def _shipped_sweep_names() -> list[str]:
    from vdtome.bench.sweep import shipped_sweeps

    return list(shipped_sweeps())


def _bench(args) -> int:
    from vdtome.bench.report import write_report
    from vdtome.bench.runner import BenchPlan, busy_sentence, format_summary, parse_seeds, read_prompts, run_bench
    from vdtome.bench.sweep import load_sweep
    from vdtome.core.validation import RequestError
    from vdtome.engine.pipelines import ModelUnavailableError

    try:
        plan = BenchPlan(preset=args.preset, prompts=read_prompts(args.prompts, args.limit),
                         seeds=parse_seeds(args.seeds), sweep=load_sweep(args.sweep), rounds=args.rounds)
        plan.check()
        runner = None
        if args.ray or args.ray_address:
            from vdtome.bench.ray_runner import RayRunner

            runner = RayRunner(plan, address=args.ray_address, workers=args.ray_workers, cpus_per_worker=args.ray_cpus,
                               device=args.device)
        outcome = run_bench(plan, args.out, runner=runner, retries=args.retries,
                            report=None if args.no_report else write_report,
                            device=args.device)
    except (RequestError, ModelUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished rows are in {args.out}/rows.jsonl; run the same command again to go on",
              file=sys.stderr)
        return 130
    print(format_summary(outcome.summaries))
    busy = busy_sentence(outcome.rows)
    if busy:
        print(f"\nwarning: {busy}")
    failed = sum(not row.ok for row in outcome.rows)
    print(f"\n{len(outcome.rows)} of {len(plan.keys())} rows ({outcome.skipped} from an earlier run, {outcome.ran} now; "
          f"{failed} failed). Files in {args.out}:")
    for name, path in outcome.files.items():
        if not name.startswith("plot: "):
            print(f"  {name}: {path}")
    return 0 if failed == 0 else 1


def _compare(args) -> int:
    import dataclasses

    from vdtome.core.presets import get_preset
    from vdtome.core.validation import RequestError
    from vdtome.engine.request import ComparisonRequest, resolve

    request = None
    try:
        recipe = _recipe(args)
        args.preset = args.preset or (recipe.preset if recipe is not None else DEFAULT_PRESET)
        preset = get_preset(args.preset)
        if recipe is not None:
            recipe.check_settings(preset.name, frames=args.frames, height=args.height, width=args.width,
                                  steps=args.steps, guidance=args.guidance)
            args.frames, args.height, args.width, args.steps, args.guidance = (
                recipe.frames, recipe.height, recipe.width, recipe.steps, recipe.guidance)
        request = ComparisonRequest(
            preset=preset.name,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            frames=args.frames,
            height=args.height,
            width=args.width,
            steps=args.steps,
            guidance=args.guidance,
            methods=recipe.configs() if recipe is not None else _stack(args),
            rounds=args.rounds,
            timing_steps=args.timing_steps,
            warmup_steps=args.warmup_steps,
            snap=args.snap,
            reuse_baseline=not args.no_baseline_cache,
        )
        # Every rule of the request, before the engine and its libraries load: refused as the app refuses it.
        _, notes = resolve(request, preset)
    except (RequestError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        if isinstance(error, RequestError) and error.field in ("frames", "height", "width") and not args.snap \
                and request is not None:
            try:  # the model takes a nearby size: say how to run that one instead
                resolve(dataclasses.replace(request, snap=True), preset)
                print("(--snap runs it at the nearest valid size)", file=sys.stderr)
            except (RequestError, ValueError):
                pass
        return 2
    for note in notes:
        if note.startswith("snapped "):
            print(f"--snap: {note}", file=sys.stderr)
    return _run_comparison(args, request)


def _recipe(args):
    """The ``--recipe`` (None without one); refused beside a stack given another way."""
    from vdtome.core.validation import RequestError
    from vdtome.methods.recipe import load_recipe

    if args.recipe is None:
        return None
    if args.method or any(dest.startswith(FIELD_FLAG) and value is not None for dest, value in vars(args).items()):
        raise RequestError("--recipe is the whole stack: give it without --method or method field flags", "recipe")
    return load_recipe(args.recipe)


def _ray_arguments(parser, what: str) -> None:
    parser.add_argument("--ray", action="store_true", help=f"run {what} on Ray actors, one per device")
    parser.add_argument("--ray-address", help="an existing Ray cluster: auto (from one of its nodes) or HEAD:6379 "
                                              "(not ray://); implies --ray")
    parser.add_argument("--ray-workers", type=int,
                        help="actors (default: one per GPU of the cluster, or one on a cluster without GPUs)")
    parser.add_argument("--ray-cpus", type=float, default=None,
                        help="CPUs per actor (default: 1 beside a GPU; without GPUs, the cluster's CPUs / workers)")


def _tune(args) -> int:
    from vdtome.core.validation import RequestError
    from vdtome.engine.pipelines import ModelUnavailableError

    try:
        from vdtome.bench.tune import Tuner
        from vdtome.bench.tune_plan import Floor, TunePlan
        from vdtome.bench.tune_worker import ValidationFailed

        plan = TunePlan(
            preset=args.preset, floors=tuple(Floor.parse(text) for text in args.floor),
            methods=None if not args.methods else tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            trials=args.trials, minutes=args.minutes, prompts=args.prompts, tuning_prompts=args.tuning_prompts,
            validation_prompts=args.validation_prompts, frames=args.frames, height=args.height, width=args.width,
            steps=args.steps, seed=args.seed, finalists=args.finalists, rounds=args.rounds,
            require=tuple(m.strip() for m in (args.require or "").split(",") if m.strip()))
    except (RequestError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.monotonic()

    def progress(event) -> None:
        budget = f"/{event.budget}" if event.budget else ""
        left = f", {event.minutes_left:.1f} min left" if event.minutes_left is not None else ""
        print(f"[{time.monotonic() - started:6.0f} s · {event.trials}{budget} trials{left} · front {event.front}] "
              f"{event.message}", file=sys.stderr, flush=True)

    try:
        trials = None
        if args.ray or args.ray_address:
            from vdtome.bench.tune_worker import RayTrials

            trials = RayTrials(plan, address=args.ray_address, workers=args.ray_workers,
                               cpus_per_worker=args.ray_cpus, device=args.device)
            print(f"trials on {trials.description}", file=sys.stderr)
        outcome = Tuner(plan, args.out, device=args.device, progress=progress, trials=trials).run(resume=args.resume)
    except (RequestError, ValueError, ModelUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValidationFailed as error:
        print(f"error: {error}; the trials and the validations made are kept: `--resume` goes on in {args.out}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished trials are kept; `--resume` continues the tune in {args.out}",
              file=sys.stderr)
        return 130
    print(outcome.message)
    print(outcome.search_text())
    for name, path in outcome.files.items():
        print(f"{name}: {path}")
    return 0 if outcome.ok else 1


def _run_comparison(args, request) -> int:
    from vdtome.core.validation import RequestError
    from vdtome.engine.engine import ComparisonEngine
    from vdtome.engine.pipelines import ModelUnavailableError
    from vdtome.engine.report import format_table

    try:
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
    print(result.to_json() if args.json else format_table(result, width=None if args.wide else WIDTH))
    return 0 if result.ok else 1


FIELD_FLAG = "method_field:"  # argparse destination prefix of the flags made from form fields


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--FIELD`` flag per form field of every registered method, read as text and parsed by
    the method (the registry is the one schema: a new method's fields appear here by themselves)."""
    from vdtome.methods import METHODS

    for method in METHODS.values():
        group = parser.add_argument_group(
            f"{method.label} (method {method.name}; adds it to the stack; a preset may set other defaults: "
            "`python -m vdtome methods --preset NAME`)")
        for form_field in method.fields:
            group.add_argument(f"--{form_field.name.replace('_', '-')}", dest=FIELD_FLAG + form_field.name,
                               metavar="VALUE", default=None,
                               help="method default " + form_field.describe().split(" = ", 1)[1].replace("%", "%%"))


def _stack(args) -> tuple:
    """The stack: the ``--method`` items in order (none: the preset's default stack), each method's
    field flags applied to it; a flag of a method not in the stack adds that method at the end."""
    from vdtome.core.presets import get_preset
    from vdtome.methods import (
        add_override,
        config_from_overrides,
        default_stack,
        field_owner,
        method_of,
        method_overrides,
    )

    preset = get_preset(args.preset)
    if args.method:
        items = [method_overrides(text) for text in args.method]
    else:
        items = [(method_of(config), {}) for config in default_stack(preset)]
    for dest, value in vars(args).items():
        if not dest.startswith(FIELD_FLAG) or value is None:
            continue
        method, _ = field_owner(dest.removeprefix(FIELD_FLAG))
        overrides = next((given for owner, given in items if owner is method), None)
        if overrides is None:
            items.append((method, overrides := {}))
        add_override(method, overrides, dest.removeprefix(FIELD_FLAG), value)
    return tuple(config_from_overrides(method, overrides, preset) for method, overrides in items)


def _methods(args) -> int:
    from vdtome.core.presets import get_preset

    try:
        preset = get_preset(args.preset) if args.preset else None
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_methods_text(preset))
    return 0


def _methods_text(preset: ModelPreset | None = None) -> str:
    """Every registered method: its fields with their defaults (``preset``'s where it sets its own),
    ranges and the presets it serves. Reads the methods' declarations and the presets' denoiser
    table only: no diffusers import, so it answers at once."""
    from vdtome.core.denoisers import pipeline_denoiser_types
    from vdtome.core.presets import load_presets
    from vdtome.methods import METHODS, preset_form_defaults

    presets = load_presets()
    if preset is None:
        intro = ("Defaults below are the methods' own. A preset may override them (method_defaults in its entry of "
                 "models.json): `python -m vdtome methods --preset NAME` shows that preset's, e.g. tiny-shapes-128, "
                 "the default preset of `compare`.")
    else:
        intro = (f"Defaults below are preset {preset.name}'s: the methods' own, except where the preset sets its own "
                 "(marked \"preset\", with the method's own beside it).")
    lines = [*_wrapped(intro), ""]
    for method in METHODS.values():
        lines.append(f"{method.name}: {method.label}{' (on by default in the app)' if method.on_by_default else ''}")
        if method.docs:
            lines += _wrapped(method.docs, "  ")
        chosen = method.form_defaults() if preset is None else preset_form_defaults(method, preset)
        for form_field in method.fields:
            value = chosen[form_field.name]
            line = form_field.describe()
            if value != form_field.default:
                line = (f"{form_field.describe(value)} [preset {preset.name}; method default "
                        f"{form_field.typed(form_field.default)}]")
            lines += _wrapped(line, "  ", "      ")
        supported, unavailable = [], []
        for listed in presets.values():
            reason = method.unavailable(pipeline_denoiser_types(listed.pipeline_class))
            (unavailable if reason else supported).append(listed.name)
        lines += _wrapped(f"presets: {', '.join(supported) or 'none'}", "  ", "    ")
        if unavailable:
            lines += _wrapped(f"unavailable for: {', '.join(unavailable)}", "  ", "    ")
        if method.graph_breaks:
            lines += _wrapped(f"under torch.compile: breaks the graph: {method.graph_breaks}", "  ", "    ")
        lines.append("")
    return "\n".join(lines).rstrip()


def _wrapped(text: str, indent: str = "", later: str | None = None) -> list[str]:
    """``text`` as lines of at most :data:`WIDTH` columns (a word longer than that keeps its line)."""
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent if later is None else later,
                         break_long_words=False, break_on_hyphens=False) or [indent]


if __name__ == "__main__":
    raise SystemExit(main())
