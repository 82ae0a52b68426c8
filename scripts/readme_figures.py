"""The README's figures of the shipped examples, written from their committed ``result.json``.

Between the markers ``<!-- figures: examples -->`` and ``<!-- /figures -->`` the README holds a
table made here from ``assets/examples/*/..._result.json`` (re-record them with
``python -m scripts.make_examples``, then run this to rewrite the table); a test fails when the
two disagree, so the README never quotes a figure that no committed result holds.

    python -m scripts.readme_figures          # rewrite README.md
    python -m scripts.readme_figures --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "assets" / "examples"
BLOCK = re.compile(r"(<!-- figures: examples -->\n)(.*?)(<!-- /figures -->)", re.S)


def _results() -> list[dict]:
    results = [json.loads(path.read_text()) for path in sorted(EXAMPLES.glob("*/*_result.json"))]
    return sorted(results, key=lambda r: (len(r["methods"]), r["stack"]))


def examples_table() -> str:
    """One row per shipped example: stack, prompt, the denoising verdict as the page words it,
    fidelity, the request's wall time and the noise threshold it was judged against."""
    lines = ["| stack | prompt (seed 0) | denoising (7 rounds) | fidelity to the baseline | request | noise threshold |",
             "|---|---|---|---|---|---|"]
    for result in _results():
        ratio = result["timing"]["denoising"]["ratio"]
        fidelity = result["fidelity"]
        noise = result["timing"]["noise"]
        lines.append(
            f"| `{result['stack']}` | {result['settings']['prompt']} | {ratio['text']} | "
            f"{fidelity['psnr_mean']:.1f} dB, SSIM {fidelity['ssim_mean']:.3f} | {result['elapsed_s']:.1f} s | "
            f"{noise['threshold']:.1%} ({noise['aa_pairs']} A/A pairs) |")
    cpu = _results()[0]["environment"]["cpu"]
    lines.append("")
    lines.append(f"Recorded on {cpu} ({_results()[0]['environment']['cpu_count']} cores), "
                 f"torch {_results()[0]['environment']['versions']['torch']}; request = loading the pipeline, "
                 "warm-ups, 7 rounds of both sides, decodes and metrics.")
    return "\n".join(lines) + "\n"


def render(readme: str) -> str:
    if not BLOCK.search(readme):
        raise SystemExit("README.md has no <!-- figures: examples --> block")
    return BLOCK.sub(lambda m: m.group(1) + examples_table() + m.group(3), readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        sys.exit(0 if new == text else 1)
    README.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    main()
