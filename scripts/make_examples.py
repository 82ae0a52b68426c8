"""Record finished comparisons into ``assets/examples/`` for the app's Examples tab.

Each example is a comparison's output folder (videos, frames, ``result.json``) with the page's
``view.json``, so the app shows it instantly, naming the hardware it ran on. Run on a GPU host with
a real preset to add real-model examples::

    python -m scripts.make_examples --preset cogvideox-2b --name cogvideox-2b-tome-0.5 --method tome:ratio=0.5
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

from vdtome.core.presets import get_preset
from vdtome.engine.engine import ComparisonEngine
from vdtome.engine.request import ComparisonRequest
from vdtome.methods import method_overrides, parse_method_spec
from vdtome.web.ui import comparison_view, form_values

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
PROMPT = "A paper boat drifts down a rain-filled gutter, leaves swirling past it."
TINY = (  # name, preset, stack (the CLI's --method syntax; fields not named take the preset's defaults), prompt
    ("tiny-shapes-128-tome", "tiny-shapes-128", ["tome"],
     "a red circle moving right quickly on a black background"),
    ("tiny-shapes-128-tome-first-block-cache", "tiny-shapes-128", ["tome", "first_block_cache:threshold=0.2"],
     "a blue square moving left quickly on a white background"),
    ("tiny-shapes-128-first-block-cache", "tiny-shapes-128", ["first_block_cache:threshold=0.2"],
     "a yellow triangle moving down slowly on a gray background"),
)


def record(engine: ComparisonEngine, name: str, preset: str, methods: list[str], prompt: str, seed: int) -> Path:
    folder = EXAMPLES / name
    shutil.rmtree(folder, ignore_errors=True)
    configs = tuple(parse_method_spec(spec, get_preset(preset)) for spec in methods)
    result = engine.run(ComparisonRequest(preset, prompt, seed=seed, methods=configs), out_dir=folder)
    if not result.ok:
        raise SystemExit(f"{name}: {result.error}")
    overrides = {method.name: fields for method, fields in map(method_overrides, methods)}
    # the form's values too: showing the example restores them, so Run reproduces it
    replace(comparison_view(result, configs), form=form_values(result.settings, overrides)).save()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="record one example of this preset (default: the tiny examples)")
    parser.add_argument("--name", help="its folder name under assets/examples")
    parser.add_argument("--method", action="append", default=[], help="NAME[:field=value,...], as the CLI takes")
    parser.add_argument("--prompt", default=PROMPT, help="with --preset (the tiny examples have their own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    engine = ComparisonEngine()
    todo = [(args.name or args.preset, args.preset, args.method or ["tome:ratio=0.5"], args.prompt)] if args.preset \
        else TINY
    for name, preset, methods, prompt in todo:
        print(f"{name}: {record(engine, name, preset, methods, prompt, args.seed)}")


if __name__ == "__main__":
    main()
