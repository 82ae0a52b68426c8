"""Memory methods on the tiny presets at their largest allowed sizes, and the plan for the real ones.

Part 1, for each tiny preset at its largest frames and sides: one pipeline call (2 steps, decoded)
as loaded and with each memory method that runs on a CPU (slicing, VAE tiling, fp8 weights, and
slicing stacked with token merging), printing

* the peak of tensor memory (the most bytes held at once, counted per operation by
  :class:`vdtome.measure.memory.TensorMemoryMeter`) in the denoising loop (from the denoiser's first
  call to the last step's end) and over the whole call, and the weights held;
* the memory plan's estimate for the same stack (weights included) and how far off it is;
* whether the video equals the plain one (bitwise, else the largest absolute difference);
* each method's evidence;

and the same call without and with slicing where PyTorch is made to run attention on its math path
(the kernel that holds the whole score matrix, as on GPUs and dtypes without a fused one).

Part 2: ``python -m vdtome plan`` for every real preset at its default request and 16, 24, 48 and
80 GB budgets (estimates only: no weights are downloaded, nothing runs on a GPU).

    python benchmarks/memory.py                # both parts (about 10 minutes on 2 cores)
    python benchmarks/memory.py --part tiny --presets tiny-wan
    python benchmarks/memory.py --part plan
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vdtome.core.denoisers import denoisers_of, pipeline_weight_bytes
from vdtome.core.presets import get_preset, load_presets
from vdtome.engine.pipelines import load_pipeline
from vdtome.engine.plan import GIB, Sizer, make_plan, plan_text
from vdtome.measure.memory import TensorMemoryMeter
from vdtome.methods import apply_stack
from vdtome.methods.layerwise_casting import LayerwiseCasting
from vdtome.methods.slicing import Slicing
from vdtome.methods.vae_tiling import VaeTiling
from vdtome.tome import SUPPORTED_MODELS, ToMeConfig

TINY = ("tiny-shapes-128", "tiny-wan", "tiny-cogvideox", "tiny-ltx", "tiny-animatediff")
BUDGETS = (16, 24, 48, 80)


def stacks(pipe) -> dict[str, tuple]:
    out = {"as loaded": (), "slicing": (Slicing(),), "VAE tiling 128 px": (VaeTiling(tile_px=128),),
           "fp8 weights": (LayerwiseCasting(),)}
    if type(pipe.vae).__name__ == "AutoencoderKLCogVideoX":
        out["VAE tiling 128 px"] = (VaeTiling(),)  # its tiles are its own size
        out = {("VAE tiling" if k == "VAE tiling 128 px" else k): v for k, v in out.items()}
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    if type(denoiser).__name__ in SUPPORTED_MODELS:
        out["token merging 0.5 + slicing"] = (ToMeConfig(ratio=0.5), Slicing())
    return out


def mib(size: float) -> str:
    return f"{size / 2**20:7.1f}"


def measure(pipe, call: dict, configs: tuple, math_attention: bool = False):
    """One call with ``configs`` applied: (weights, meter, video, seconds, reports); ``math_attention``:
    PyTorch made to run every attention on its math path (which holds the score matrix)."""
    kernels = sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    with apply_stack(pipe, list(configs)) as stack, kernels:
        weights = pipeline_weight_bytes(pipe)
        started = time.perf_counter()
        with TensorMemoryMeter() as meter, meter.section_before("text encoding", denoisers_of(pipe)):
            steps = {"n": 0}

            def at_end(p, i, t, kwargs):
                steps["n"] += 1
                if steps["n"] == 2:
                    meter.mark("denoising")
                return kwargs

            video = pipe(**call, generator=torch.Generator().manual_seed(0), callback_on_step_end=at_end).frames
        return weights, meter, video, time.perf_counter() - started, stack.reports()


def compared(video: torch.Tensor, plain: torch.Tensor) -> str:
    if torch.equal(video, plain):
        return "bitwise equal"
    return f"max |diff| {(video - plain).abs().max().item():.2g}"


def tiny_part(presets: tuple[str, ...]) -> None:
    torch.set_num_threads(2)
    for name in presets:
        preset = get_preset(name)
        c = preset.constraints
        frames, side = c.max_frames, c.max_side
        pipe = load_pipeline(preset, "cpu")
        sizer = Sizer(name, frames, side, side)
        call = dict(prompt="a red circle moving right", num_frames=frames, height=side, width=side,
                    num_inference_steps=2, guidance_scale=preset.guidance_scale, output_type="pt")
        if "max_sequence_length" in preset.extras:
            call["max_sequence_length"] = preset.extras["max_sequence_length"]
        print(f"\n{name} at {frames} frames, {side}x{side} (2 steps, decoded; MiB)")
        print(f"{'stack':30} {'weights':>8} {'denoise':>8} {'whole':>8} {'estimate':>9} {'off':>6}  "
              f"{'seconds':>7}  video vs plain; evidence")
        plain = math_plain = None
        runs = [(label, configs, False) for label, configs in stacks(pipe).items()]
        # Where PyTorch has no fused kernel for a call (some GPUs and dtypes, masks it cannot take) it
        # holds the whole score matrix; the plan does not count that case (no estimate shown).
        runs += [("as loaded, math attention", (), True), ("slicing, math attention", (Slicing(),), True)]
        for label, configs, math_attention in runs:
            weights, meter, video, seconds, reports = measure(pipe, call, configs, math_attention)
            measured = weights + meter.peak_bytes
            if math_attention:
                estimate = "-".rjust(9) + " " + "".rjust(6)
                same = "reference" if math_plain is None else compared(video, math_plain)
                math_plain = video if math_plain is None else math_plain
            else:
                peak = sizer.estimate(tuple(configs)).peak_bytes
                estimate = f"{mib(peak):>9} {peak / measured - 1:+6.0%}"
                same = "reference" if plain is None else compared(video, plain)
                plain = video if plain is None else plain
            evidence = "; ".join(f"{e.label}: {e.text()}" for r in reports for e in r.evidence)
            print(f"{label:30} {mib(weights):>8} {mib(meter.peaks['denoising']):>8} {mib(meter.peak_bytes):>8} "
                  f"{estimate}  {seconds:7.1f}  {same}; {evidence}")
            sys.stdout.flush()


def plan_part() -> None:
    for preset in load_presets().values():
        if preset.hub_id is None:
            continue
        plan = make_plan(preset.name, budgets=tuple(b * GIB for b in BUDGETS))
        print()
        print(plan_text(plan))
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("tiny", "plan", "both"), default="both")
    parser.add_argument("--presets", nargs="+", default=list(TINY))
    args = parser.parse_args()
    if args.part in ("tiny", "both"):
        tiny_part(tuple(args.presets))
    if args.part in ("plan", "both"):
        plan_part()


if __name__ == "__main__":
    main()
