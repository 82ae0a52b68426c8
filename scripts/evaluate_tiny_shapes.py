"""Judge a trained offline model on held-out prompts, through the real pipeline at the preset's defaults.

    python -m scripts.evaluate_tiny_shapes [--preset tiny-shapes-128] [--prompts 20] [--sheet FILE.png]
        [--method NAME[:field=value,...] ...] [--no-method]
    python -m scripts.evaluate_tiny_shapes --prompt-set shapes-tuning --sweep shapes-tome-tuning
    python -m scripts.evaluate_tiny_shapes --recipe tiny-shapes-128

Prints, per prompt, the colour and motion direction the judge reads from the generated clip, then the
share right and the clips' flow-compensated warp error beside that of uniform noise and of the
rendered training data (smooth clips sit near the data, far below noise). The prompts come from
combinations of colour, shape, direction and background never shown in training (and not among the
tuning prompts, vdtome/data/presets/prompts/shapes-tuning.txt). Each prompt is also generated with the stack the
preset runs by default (its token-merging defaults), or the ``--method`` stack, and judged alike, with
its PSNR to the baseline. Exits 1 when a share falls under the preset's acceptance targets.

With ``--prompt-set shapes-tuning --sweep shapes-tome-tuning`` it judges every setting of the tuning
sweep on the tuning prompts instead (one baseline per prompt): the quality half of choosing a preset's
defaults, beside ``python -m vdtome bench``'s speed half.
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch

from vdtome.bench.sweep import load_sweep
from vdtome.core.frames import to_uint8
from vdtome.core.presets import get_preset, load_prompts
from vdtome.engine.fidelity import fidelity, temporal_consistency
from vdtome.engine.pipelines import load_pipeline
from vdtome.engine.request import ComparisonRequest, resolve
from vdtome.methods import CallPlan, apply_stack, default_stack, parse_method_spec, prepare_stack, stack_label
from vdtome.methods.recipe import load_recipe
from vdtome.offline import shapes

#: Shares of the held-out prompts the judge must find right: (colour, direction) of the baseline,
#: then of the accelerated clips. tiny-shapes-128's are its acceptance targets (19/20, 17/20 and with
#: its default token merging 17/20, 15/20); tiny-shapes', the 64 px model's.
TARGETS = {
    "tiny-shapes": ((0.8, 0.7), (0.0, 0.0)),
    "tiny-shapes-128": ((0.95, 0.85), (0.85, 0.75)),
}


def _judged(clip: np.ndarray, scene) -> tuple:
    verdict = shapes.judge(clip, scene)
    marks = ("ok" if verdict.colour_right else "NO", "ok" if verdict.direction_right else "NO")
    text = f"{verdict.colour or '-':<8}{marks[0]:<3}{verdict.direction or '-':<6}{marks[1]:<3}"
    return verdict, text


def _shares(name: str, verdicts: list, targets: tuple[float, float]) -> tuple[str, bool]:
    n = len(verdicts)
    colour, direction = sum(v.colour_right for v in verdicts), sum(v.direction_right for v in verdicts)
    met = colour / n >= targets[0] and direction / n >= targets[1]
    return (f"{name}: colour right {colour}/{n} (target {targets[0]:.0%}), direction right {direction}/{n} "
            f"(target {targets[1]:.0%}){'' if met else '  BELOW TARGET'}"), met


def _candidates(args, preset) -> list[tuple[str, tuple]]:
    """The stacks to judge beside the baseline: a sweep's settings, the ``--method`` stack, or the
    preset's default stack (none with ``--no-method``)."""
    if args.no_method:
        return []
    if args.sweep:
        return [(setting.label, setting.configs) for setting in load_sweep(args.sweep).settings]
    if args.recipe:
        recipe = load_recipe(args.recipe)
        recipe.check_settings(preset.name)
        return [(f"recipe {recipe.label()}: {recipe.stack_text()}", recipe.configs())]
    stack = tuple(parse_method_spec(text, preset) for text in args.method) or default_stack(preset)
    return [(stack_label(stack), stack)] if stack else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluate_tiny_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-shapes-128")
    parser.add_argument("--prompts", type=int, default=20, help="held-out prompts to judge")
    parser.add_argument("--prompt-set", default=None,
                        help="judge this prompt set's prompts (e.g. shapes-tuning) instead of the evaluation prompts")
    parser.add_argument("--seed", type=int, default=0, help="first generation seed (prompt i uses seed + i)")
    parser.add_argument("--sheet", default=None, help="write every baseline clip (every other frame) to this PNG")
    parser.add_argument("--method", action="append", default=[], metavar="NAME[:FIELD=VALUE,...]",
                        help="the accelerated stack (as the CLI's --method; default: the preset's default stack)")
    parser.add_argument("--sweep", default=None,
                        help="judge every setting of this sweep (a shipped name or a YAML file), one baseline per prompt")
    parser.add_argument("--recipe", default=None, metavar="FILE|NAME",
                        help="the accelerated stack of a tune's recipe (a file or a shipped recipe's name)")
    parser.add_argument("--no-method", action="store_true", help="judge the baseline only")
    args = parser.parse_args(argv)

    preset = get_preset(args.preset)
    pipe = load_pipeline(preset, device="cpu")
    scenes = ([shapes.Scene.from_prompt(p) for p in load_prompts(args.prompt_set)] if args.prompt_set
              else shapes.held_out_scenes(args.prompts, seed=args.seed))
    candidates = _candidates(args, preset)
    baseline_verdicts, warp, rows = [], [], []
    fast_verdicts = {label: [] for label, _ in candidates}
    psnrs = {label: [] for label, _ in candidates}
    for i, scene in enumerate(scenes):
        # The app's own resolution of the request: the call is exactly what a comparison's baseline makes.
        settings, _ = resolve(ComparisonRequest(preset=preset.name, prompt=scene.prompt, seed=args.seed + i), preset)
        call = settings.call_kwargs()
        if i == 0:
            shown_call = {k: v for k, v in call.items() if k not in ("prompt", "negative_prompt")}
            print(f"{preset.name}: {len(scenes)} {args.prompt_set or 'held-out'} prompts, {shown_call}; "
                  f"accelerated: {'; '.join(label for label, _ in candidates) or 'none'}")
            print(f"{'':3}{'prompt':<64} {'baseline colour/direction':<28}{'accelerated':<28}PSNR")
        video = pipe(**call, generator=torch.Generator().manual_seed(settings.seed), output_type="np").frames[0]
        clip = to_uint8(video)
        verdict, shown = _judged(clip, scene)
        baseline_verdicts.append(verdict)
        warp.append(temporal_consistency(video).warp_error_mean)
        rows.append(np.concatenate(list(clip[::2]), axis=1))
        print(f"{i:2d} {scene.prompt:<64} {shown:<28}", end="")
        for n, (label, stack) in enumerate(candidates):
            # A method that calibrates for its calls (MagCache) does so once per settings, untimed.
            plan = CallPlan(settings.steps, settings.frames, settings.height, settings.width, settings.guidance)
            stack = prepare_stack(pipe, stack, plan, lambda: pipe(**call, generator=torch.Generator().manual_seed(0),
                                                                  output_type="latent"))
            applied = apply_stack(pipe, stack)
            try:
                fast = pipe(**call, generator=torch.Generator().manual_seed(settings.seed), output_type="np").frames[0]
            finally:
                applied.remove()
            fast_verdict, fast_shown = _judged(to_uint8(fast), scene)
            fast_verdicts[label].append(fast_verdict)
            psnrs[label].append(fidelity(video, fast).psnr_mean)
            lead = "" if n == 0 else f"{'':96}"
            tail = f"  {label}" if len(candidates) > 1 else ""
            print(f"{lead}{fast_shown:<28}{psnrs[label][-1]:5.1f} dB{tail}")
        print(f"{'':96}warp error {warp[-1]:.4f}")

    frames, side = settings.frames, settings.height
    rng = np.random.default_rng(0)
    noise = float(np.mean([temporal_consistency(rng.random((frames, side, settings.width, 3))).warp_error_mean
                           for _ in range(3)]))
    data_rng = random.Random(0)
    data = float(np.mean([temporal_consistency(shapes.render(s, data_rng, frames=frames, side=side) / 255.0)
                          .warp_error_mean for s in scenes]))
    base_targets, fast_targets = TARGETS.get(preset.name, ((0.0, 0.0), (0.0, 0.0)))
    line, met = _shares("baseline", baseline_verdicts, base_targets)
    print(line)
    for label, _ in candidates:
        fast_line, fast_met = _shares(f"accelerated ({label})", fast_verdicts[label], fast_targets)
        print(fast_line + f"; PSNR to the baseline mean {np.mean(psnrs[label]):.1f} dB "
              f"(lowest {np.min(psnrs[label]):.1f})")
        met = met and (fast_met or bool(args.sweep))  # a sweep reports every setting; it is no acceptance run
    print(f"warp error (mean absolute, 0-1 scale): generated {np.mean(warp):.4f} (worst {np.max(warp):.4f}), "
          f"rendered data {data:.4f}, uniform noise {noise:.4f}")
    if args.sheet:
        import cv2

        cv2.imwrite(args.sheet, cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
        print(f"wrote {args.sheet}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
