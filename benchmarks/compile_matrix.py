"""Every registered method (and the preset's shipped recipes), eager and under torch.compile.

For each stack X (each method at the preset's defaults, each shipped recipe, and nothing), three
comparisons of the same request, each with vdtome's full protocol (paired rounds, intervals):

* **eager**: X over the eager baseline;
* **compiled**: X + ``compile`` over the compiled baseline (both sides compiled: what a method keeps
  in a deployment that compiles), with what dynamo did: the compile phase's seconds (untimed),
  graph breaks with their reasons, compiles during the timed rounds (the verdict is withdrawn if any);
* **compiled vs eager**: X + ``compile:baseline=false`` over the eager baseline (what compiling and
  the method give together; for X = nothing, what compiling alone gives).

It runs as a benchmark (``vdtome.bench``): rows in ``OUT/rows.jsonl``, resumable (rerun with the same
folder: finished rows are kept), then ``OUT/matrix.md``, the table the README quotes. A method the
model or this machine cannot take, or a stack that fails to compile, is a row with its reason.

    python benchmarks/compile_matrix.py                               # tiny-shapes-128 on this CPU, inductor
    python benchmarks/compile_matrix.py --quick --out /tmp/matrix     # smoke: tiny-wan, tracing only, token merging
    python benchmarks/compile_matrix.py --device cuda --preset wan2.1-t2v-1.3b --out benchmarks/results/compile-matrix-wan
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdtome.bench.runner import BenchPlan, BenchRow, RowsFile, latest_rows, run_bench  # noqa: E402
from vdtome.bench.sweep import Setting, Sweep  # noqa: E402
from vdtome.core.denoisers import pipeline_denoiser_types  # noqa: E402
from vdtome.core.presets import get_preset  # noqa: E402
from vdtome.methods import METHODS, preset_form_defaults  # noqa: E402
from vdtome.methods.compile import Compile  # noqa: E402
from vdtome.methods.recipe import load_recipe, shipped_recipes  # noqa: E402

PROMPT = "a red circle moving right quickly on a black background"  # the peers table's prompt
EAGER, COMPILED, COMPILED_VS_EAGER = "eager", "compiled", "compiled vs eager baseline"
KINDS = (EAGER, COMPILED, COMPILED_VS_EAGER)


def stacks(preset_name: str, methods: list[str] | None, device: str) -> list[tuple[str, tuple[Any, ...]]]:
    """(name, configs): nothing, each method the model takes at the preset's defaults (cache-dit also
    with TaylorSeer, as the peers table has it), each shipped recipe of the preset."""
    preset = get_preset(preset_name)
    types = pipeline_denoiser_types(preset.pipeline_class)
    out: list[tuple[str, tuple[Any, ...]]] = [("none", ())]
    for method in METHODS.values():
        if method.settles or (methods is not None and method.name not in methods):
            continue
        if method.unavailable(types) is not None:
            continue
        if method.name == "offload" and not device.startswith("cuda"):
            continue  # a CPU has nowhere to offload to
        out.append((method.name, (method.from_form(preset_form_defaults(method, preset)),)))
    if methods is None and "cache_dit" in METHODS and METHODS["cache_dit"].unavailable(types) is None:
        # The peers table's other cache-dit row: its TaylorSeer calibrator on.
        cache_dit = METHODS["cache_dit"]
        out.append(("cache_dit + TaylorSeer", (cache_dit.config_from({"cache_dit_taylorseer": True},
                                                                     preset_form_defaults(cache_dit, preset)),)))
    if methods is None:
        for name in shipped_recipes():
            recipe = load_recipe(name)
            if recipe.preset == preset_name:
                out.append((f"recipe {name}", recipe.configs()))
    return out


def sweep(preset_name: str, methods: list[str] | None, device: str, backend: str) -> Sweep:
    settings = []
    for name, configs in stacks(preset_name, methods, device):
        variants = {EAGER: configs, COMPILED: configs + (Compile(backend=backend),),
                    COMPILED_VS_EAGER: configs + (Compile(backend=backend, baseline=False),)}
        for kind, stack in variants.items():
            if kind != COMPILED_VS_EAGER and not configs:
                continue  # nothing over the baseline: no comparison
            settings.append(Setting(stack, (("stack", name), ("kind", kind)), f"{name} · {kind}"))
    return Sweep("compile-matrix", "every method and shipped recipe, eager and compiled", tuple(settings))


def _speed(row: BenchRow) -> str:
    """"1.28x (1.11-1.39)", with the protocol's verdict where it is not faster or slower."""
    speed = row.denoising
    if speed is None:
        return "n/a"
    text = f"{speed.median:.2f}x" + (f" ({speed.low:.2f}-{speed.high:.2f})" if speed.low is not None else "")
    if speed.verdict == "no significant difference":
        text += " within noise"
    elif speed.verdict == "did nothing":
        text += " no verdict"
    return text


def _cell(row: BenchRow | None) -> dict[str, str]:
    """One comparison's figures for the table."""
    if row is None:
        return {"speed": "not run", "psnr": "", "breaks": "", "timed": "", "compile": ""}
    if not row.ok:
        return {"speed": "fails: " + (row.error or "").splitlines()[0][:90], "psnr": "", "breaks": "", "timed": "",
                "compile": ""}
    compiled = (row.result or {}).get("compilation") or {}
    speed = _speed(row)
    phase = compiled.get("compile_phase") or {}
    breaks = compiled.get("graph_breaks")
    if compiled and (breaks is None or (not phase.get("frames") and not compiled.get("earlier"))):
        breaks = "reused"  # every graph was made by an earlier comparison with another stack: not counted here
    return {"speed": speed, "psnr": "" if row.psnr_mean_db is None else f"{row.psnr_mean_db:.1f}",
            "breaks": str(breaks) if compiled else "",
            "timed": str(compiled.get("compiles_in_timed_rounds", "")) if compiled else "",
            "compile": f"{phase['seconds']:.0f}" if phase else ""}


def table(out: Path, plan: BenchPlan) -> str:
    """The matrix as Markdown, from the rows written so far."""
    rows = latest_rows(RowsFile(out / "rows.jsonl").read(), plan.keys())
    by_setting = {row.setting: row for row in rows}
    names = list(dict.fromkeys(dict(s.values)["stack"] for s in plan.sweep.settings))
    lines = ["| stack | eager: speedup (interval), PSNR dB | compiled over compiled baseline: speedup, PSNR dB | "
             "graph breaks | compiles in timed rounds | compile phase s | compiled over eager baseline |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        eager = _cell(by_setting.get(f"{name} · {EAGER}")) if name != "none" else {"speed": "(baseline)", "psnr": ""}
        compiled = _cell(by_setting.get(f"{name} · {COMPILED}")) if name != "none" else \
            {"speed": "(baseline)", "psnr": "", "breaks": "", "timed": "", "compile": ""}
        mixed = _cell(by_setting.get(f"{name} · {COMPILED_VS_EAGER}"))
        if name == "none":
            compiled = {**compiled, **{k: mixed[k] for k in ("breaks", "timed", "compile")}}
        psnr = lambda cell: f", {cell['psnr']}" if cell["psnr"] else ""  # noqa: E731
        lines.append(f"| {name} | {eager['speed']}{psnr(eager)} | {compiled['speed']}{psnr(compiled)} | "
                     f"{compiled['breaks']} | {compiled['timed']} | {compiled['compile']} | {mixed['speed']} |")
    withdrawn = [(row.setting, ratio["no_claim"]) for row in rows if row.ok and (ratio := (((row.result or {}).get(
        "timing") or {}).get("denoising") or {}).get("ratio") or {}).get("no_claim") and "dynamo" in ratio["no_claim"]]
    lines += ["", "Verdicts withdrawn because of compiling:" if withdrawn else ""]
    lines += [f"- {setting}: {reason}" for setting, reason in withdrawn]
    lines += ["", "Graph breaks by reason, where the stack was compiled (its compile phase):", ""]
    for row in rows:
        phase = (((row.result or {}).get("compilation") or {}).get("compile_phase") or {})
        for item in phase.get("graph_breaks") or ():
            lines.append(f"- {row.setting}: {item['count']} x {item['reason']}")
    return "\n".join(lines) + "\n"


def plot(out: Path, plan: BenchPlan, title: str) -> Path:
    """Denoising speedup against PSNR: each stack eager (over the eager baseline) and compiled (over
    the compiled baseline), joined by a line; the speedups' intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {row.setting: row for row in latest_rows(RowsFile(out / "rows.jsonl").read(), plan.keys()) if row.ok}
    fig, ax = plt.subplots(figsize=(9, 6))
    names = list(dict.fromkeys(dict(s.values)["stack"] for s in plan.sweep.settings))
    for name in names:
        points = [(kind, rows.get(f"{name} · {kind}")) for kind in (EAGER, COMPILED)]
        points = [(kind, row) for kind, row in points if row is not None and row.denoising and row.psnr_mean_db]
        if not points:
            continue
        xs = [min(row.psnr_mean_db, 60.0) for _, row in points]
        ys = [row.denoising.median for _, row in points]
        ax.plot(xs, ys, color="0.7", linewidth=1, zorder=1)
        for (kind, row), x, y in zip(points, xs, ys):
            low, high = row.denoising.low or y, row.denoising.high or y
            ax.errorbar([x], [y], yerr=[[y - low], [high - y]], fmt="o" if kind == EAGER else "s",
                        color="tab:blue" if kind == EAGER else "tab:orange", capsize=3, zorder=2)
        ax.annotate(name, (xs[-1], ys[-1]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(1.0, color="0.5", linestyle=":", linewidth=1)
    ax.plot([], [], "o", color="tab:blue", label="eager, over the eager baseline")
    ax.plot([], [], "s", color="tab:orange", label="compiled, over the compiled baseline")
    ax.set_xlabel("PSNR to the baseline, dB (identical shown at 60)")
    ax.set_ylabel("denoising speedup (median of paired rounds, 98% interval)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = out / "matrix.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-shapes-128")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile-matrix"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    parser.add_argument("--methods", help="comma-separated method names (default: every registered method)")
    parser.add_argument("--rounds", type=int, help="timing rounds per comparison (default: the preset's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke check: tiny-wan, tracing only (eager backend), token merging, "
                             "2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.backend, args.rounds = "tiny-wan", "eager", args.rounds or 2
        args.methods = args.methods or "tome"
    methods = args.methods.split(",") if args.methods else None
    the_sweep = sweep(args.preset, methods, args.device, args.backend)
    if args.steps:
        the_sweep = Sweep(the_sweep.name, the_sweep.description, the_sweep.settings, (("steps", args.steps),))
    plan = BenchPlan(args.preset, (PROMPT,), (0,), the_sweep, rounds=args.rounds)
    plan.check()
    out = Path(args.out)
    outcome = run_bench(plan, out, device=args.device)
    text = table(out, plan)
    title = f"{args.preset}, {args.device}, backend {args.backend}; prompt {PROMPT!r}"
    (out / "matrix.md").write_text(f"{title}\n\n{text}")
    plot(out, plan, title)
    (out / "command.txt").write_text("python benchmarks/compile_matrix.py " + " ".join(argv or sys.argv[1:]) + "\n")
    print(text)
    return 0 if all(row.ok for row in outcome.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
