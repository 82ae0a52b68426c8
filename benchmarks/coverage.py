"""Do verdicts hold across requests? The same request sent N times, every interval printed.

Each request's interval claims to cover the true median ratio with its coverage (98 % for 7
rounds) whatever the noise, if its rounds are independent repeats. Sent N times on one machine,
the intervals should all overlap and nearly all hold the median of the N medians; intervals built
from something that is not an independent repeat (the steps of one call) fail this.

    python benchmarks/coverage.py --preset tiny-shapes --requests 8 [--rounds 7] [--method tome:ratio=0.5]

Prints one line per request (interval, median, verdict, noise threshold, busy warning) and the
summary: pairwise overlap and how many intervals hold the median of all medians. The A/A pairs
of these requests go to a fresh temporary record unless ``--noise-dir`` names one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdtome.core.presets import get_preset, load_prompts
from vdtome.engine.engine import ComparisonEngine
from vdtome.engine.request import ComparisonRequest
from vdtome.methods import parse_method_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-shapes")
    parser.add_argument("--prompt", help="default: the preset's first known prompt")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, help="default: the preset's")
    parser.add_argument("--method", action="append", default=[], help="NAME[:field=value,...] (default tome:ratio=0.5)")
    parser.add_argument("--noise-dir", help="the A/A record to use (default: a fresh temporary one)")
    parser.add_argument("--retain-freed", action="store_true", help="glibc keeps freed memory (no page-fault churn)")
    args = parser.parse_args()
    if args.retain_freed:
        from vdtome.measure.memory import retain_freed_host_memory
        print(retain_freed_host_memory())
    preset = get_preset(args.preset)
    prompt = args.prompt or load_prompts(preset.prompts or "default")[0]
    methods = tuple(parse_method_spec(spec) for spec in (args.method or ["tome:ratio=0.5"]))
    engine = ComparisonEngine(noise_dir=args.noise_dir or tempfile.mkdtemp(prefix="vdtome-coverage-"))
    request = ComparisonRequest(args.preset, prompt, methods=methods, rounds=args.rounds)
    ratios = []
    for index in range(args.requests):
        result = engine.run(request, write=False)
        if not result.ok:
            raise SystemExit(f"request {index + 1}: {result.error}")
        ratio = result.speedup("denoising")
        ratios.append(ratio)
        busy = " BUSY" if result.warnings else ""
        interval = f"{ratio.low:.3f}-{ratio.high:.3f}" if ratio.has_interval else "no interval"
        print(f"{index + 1:2d}  median {ratio.value:.3f}  interval {interval:13s}  {ratio.verdict.value:26s} "
              f"threshold {ratio.threshold:.1%} ({result.timing.noise.aa_pairs} A/A pairs){busy}", flush=True)
    grand = statistics.median(r.value for r in ratios)
    tested = [r for r in ratios if r.has_interval]
    print(f"\n{args.preset}, {result.stack}, {result.settings.rounds} rounds, {args.requests} requests; "
          f"median of medians {grand:.3f}")
    if tested:
        overlap = max(r.low for r in tested) <= min(r.high for r in tested)
        holding = sum(r.low <= grand <= r.high for r in tested)
        verdicts = sorted({r.verdict.value for r in ratios})
        print(f"every interval overlaps every other: {'yes' if overlap else 'NO'}; {holding} of {len(tested)} hold the "
              f"median of medians; verdicts: {', '.join(verdicts)}")


if __name__ == "__main__":
    main()
