"""Judge the trained offline model on held-out prompts, through the real pipeline at the preset's defaults.

    python -m scripts.evaluate_tiny_shapes [--preset tiny-shapes] [--prompts 20] [--sheet FILE.png]

Prints, per prompt, the colour and motion direction the judge reads from the generated clip, then the
share right and the clips' flow-compensated warp error beside that of uniform noise and of the
rendered training data (smooth clips sit near the data, far below noise). The prompts come from
combinations of colour, shape, direction and background never shown in training. Exits 1 when colour
is right in under 80 % or direction in under 70 % of the clips (the preset's acceptance targets).
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch

from vdtome import shapes
from vdtome.compare import ComparisonRequest, resolve
from vdtome.metrics import temporal_consistency
from vdtome.pipelines import load_pipeline
from vdtome.presets import get_preset
from vdtome.video_io import to_uint8

COLOUR_TARGET, DIRECTION_TARGET = 0.8, 0.7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluate_tiny_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-shapes")
    parser.add_argument("--prompts", type=int, default=20, help="held-out prompts to judge")
    parser.add_argument("--seed", type=int, default=0, help="first generation seed (prompt i uses seed + i)")
    parser.add_argument("--sheet", default=None, help="write every clip (every other frame) to this PNG")
    args = parser.parse_args(argv)

    preset = get_preset(args.preset)
    pipe = load_pipeline(preset, device="cpu")
    scenes = shapes.held_out_scenes(args.prompts, seed=args.seed)
    colour_right = direction_right = 0
    warp, rows = [], []
    for i, scene in enumerate(scenes):
        # The app's own resolution of the request: the call is exactly what a comparison's baseline makes.
        settings, _ = resolve(ComparisonRequest(preset=preset.name, prompt=scene.prompt, seed=args.seed + i), preset)
        call = settings.call_kwargs()
        if i == 0:
            shown_call = {k: v for k, v in call.items() if k not in ("prompt", "negative_prompt")}
            print(f"{preset.name}: {len(scenes)} held-out prompts, {shown_call}")
        video = pipe(**call, generator=torch.Generator().manual_seed(settings.seed), output_type="np").frames[0]
        clip = to_uint8(video)
        verdict = shapes.judge(clip, scene)
        colour_right += verdict.colour_right
        direction_right += verdict.direction_right
        warp.append(temporal_consistency(video).warp_error_mean)
        rows.append(np.concatenate(list(clip[::2]), axis=1))
        marks = ("ok" if verdict.colour_right else "NO", "ok" if verdict.direction_right else "NO")
        print(f"{i:2d} {scene.prompt:<64} colour {verdict.colour or '-':<8}{marks[0]:<3} "
              f"direction {verdict.direction or '-':<6}{marks[1]:<3} shift {verdict.displacement[0]:+5.1f},"
              f"{verdict.displacement[1]:+5.1f} px  warp error {warp[-1]:.4f}")

    frames, side = settings.frames, settings.height
    rng = np.random.default_rng(0)
    noise = float(np.mean([temporal_consistency(rng.random((frames, side, settings.width, 3))).warp_error_mean
                           for _ in range(3)]))
    data_rng = random.Random(0)
    data = float(np.mean([temporal_consistency(shapes.render(s, data_rng, frames=frames, side=side) / 255.0)
                          .warp_error_mean for s in scenes]))
    n = len(scenes)
    print(f"colour right {colour_right}/{n} ({colour_right / n:.0%}, target {COLOUR_TARGET:.0%}); "
          f"direction right {direction_right}/{n} ({direction_right / n:.0%}, target {DIRECTION_TARGET:.0%})")
    print(f"warp error (mean absolute, 0-1 scale): generated {np.mean(warp):.4f} (worst {np.max(warp):.4f}), "
          f"rendered data {data:.4f}, uniform noise {noise:.4f}")
    if args.sheet:
        import cv2

        cv2.imwrite(args.sheet, cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
        print(f"wrote {args.sheet}")
    return 0 if colour_right / n >= COLOUR_TARGET and direction_right / n >= DIRECTION_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
