"""``python -m vdtome gpucheck --out DIR``: the methods at real model widths and real token counts.

Why: the tiny CPU models show that the methods act, not what they buy where they are meant to run.
This check builds the real-width transformers of Wan 2.1 1.3B and CogVideoX-2b (every layer, random
weights, bf16 on CUDA; nothing is downloaded), feeds them latents of the real video sizes and runs a
few denoising steps of each: the baseline, token merging, first block cache and their stack, each
through the project's plug-in interface (:func:`vdtome.methods.apply_stack`), so what is timed is
the code the app runs.

* Wan 2.1 1.3B: 81 frames of 480x832 -> latent (1, 16, 21, 60, 104) -> 21 x 30 x 52 = 32,760 video
  tokens per block, 512 text tokens of 4096. Classifier-free guidance as WanPipeline does it: two
  denoiser calls per step (cond, uncond) on a batch of 1.
* CogVideoX-2b: 49 frames of 480x720 -> latent (1, 13, 16, 60, 90) -> 13 x 30 x 45 = 17,550 video
  tokens, 226 text tokens. Guidance as CogVideoXPipeline does it: one call per step on a batch of 2.

The loop: a pipeline-like shim (the denoiser and a ``FlowMatchEulerDiscreteScheduler``, shift 3), so
the methods' step context counts steps from the scheduler as in a pipeline (no host sync per call).
It runs ``steps`` consecutive steps of a 50-step schedule from step 10 on (a few steps, but with the
step sizes of a real run, where a step cache can skip), guidance 5, the latent updated every step
(Euler). CogVideoX ships a DDIM v-prediction scheduler; the update rule does not change the timing.

Timing: warm-up first (a plain loop, then one loop per variant, untimed, each inside a
:class:`~vdtome.measure.memory.MemoryMonitor`: peak allocated memory after a reset, NVML device peak). Then
``rounds`` rounds; each runs the baseline and every method once, the order rotating from round to
round, every loop timed alone with CUDA events after a synchronisation (:class:`~vdtome.measure.timing.Stopwatch`),
garbage collection paused. A method's speedup is the median of its per-round ratios baseline / method
(:func:`~vdtome.measure.stats.paired_ratio`: with 6 or more rounds also a 95% interval), with their min-max.
Fidelity: relative L2 distance of the final latent to the baseline's (same inputs, same seed; the
last update goes to the scheduler's terminal sigma 0, so the final latent is the loop's prediction of
the clean latent), and of what the steps added to the initial latent.

Time budget (H100 / H200, bf16, torch SDPA; an estimate from FLOPs, not yet measured): a Wan forward at
32,760 tokens is ~285 TFLOP (~200 of it attention), ~0.6 s; a baseline loop of 4 steps x 2 calls ~5 s;
a round (baseline + 3 methods, which are faster) <= 20 s; 6 rounds + warm-up ~2.3 min. A CogVideoX
call (batch 2, 17,776 tokens) ~270 TFLOP, ~0.5 s; a round <= 8 s; ~1 min in all. With building the
models (fp32 init on the GPU, then cast) ~3.5-4 min in all, under the 8-minute budget; an A100 is
~2.5x slower. ``--models``, ``--steps``, ``--rounds`` and ``--layers`` cut it.

``--tiny`` (automatic without CUDA): the same code path at tiny widths, 2 layers and ~200 video
tokens, in float32 on the CPU, in seconds: what the test runs. Its timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vdtome.core.validation import RequestError
from vdtome.measure.environment import environment, environment_line
from vdtome.measure.memory import MemoryMonitor, nvml_handle
from vdtome.measure.stats import median, paired_ratio
from vdtome.measure.timing import Stopwatch, gc_paused, sync
from vdtome.methods import METHODS, apply_stack, check_stack, method_of, parse_method_spec, stack_label

MODELS = ("wan", "cogvideox")
DEFAULT_METHODS = ("tome", "first_block_cache")
BASELINE = "baseline"
GUIDANCE = 5.0
FLOW_SHIFT = 3.0
SCHEDULE_STEPS = 50  # the run the few steps are taken from
FIRST_STEP = 10
DEFAULTS = {"steps": 4, "rounds": 6, "warmup_steps": 2}
TINY_DEFAULTS = {"steps": 4, "rounds": 2, "warmup_steps": 2}


# ------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """One transformer at one video size: what to build and what to feed it.

    ``latent``: the model's input shape for one sample ((C, F, H, W) for Wan, (F, C, H, W) for
    CogVideoX); ``cfg_batch``: 2 runs cond and uncond in one call on a batch of 2 (CogVideoX), 1 runs
    two calls on a batch of 1 (Wan)."""

    name: str
    label: str
    model_class: str
    config: Mapping[str, Any]
    latent: tuple[int, int, int, int]
    frames_axis: int  # where the latent frames are in ``latent``
    patch: tuple[int, int, int]
    text_tokens: int
    text_dim: int
    cfg_batch: int
    video: str

    @property
    def grid(self) -> tuple[int, int, int]:
        frames = self.latent[self.frames_axis]
        return (frames // self.patch[0], self.latent[-2] // self.patch[1], self.latent[-1] // self.patch[2])

    @property
    def video_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def cfg(self) -> str:
        return "cond + uncond in one call, batch 2" if self.cfg_batch == 2 else "cond and uncond calls, batch 1 each"


def wan_spec(tiny: bool = False) -> ModelSpec:
    """Wan 2.1 T2V 1.3B (its released config) at 81 x 480 x 832."""
    heads, head_dim, ffn, text_dim, layers = (2, 16, 64, 32, 2) if tiny else (12, 128, 8960, 4096, 30)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                  out_channels=16, text_dim=text_dim, freq_dim=32 if tiny else 256, ffn_dim=ffn, num_layers=layers,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                  rope_max_seq_len=32 if tiny else 1024)
    return ModelSpec(
        name="wan", label="Wan 2.1 T2V 1.3B" + (" (tiny)" if tiny else ""), model_class="WanTransformer3DModel",
        config=config, latent=(16, 3, 16, 16) if tiny else (16, 21, 60, 104), frames_axis=1, patch=(1, 2, 2),
        text_tokens=8 if tiny else 512, text_dim=text_dim, cfg_batch=1,
        video="9 x 128 x 128" if tiny else "81 x 480 x 832")


def cogvideox_spec(tiny: bool = False) -> ModelSpec:
    """CogVideoX-2b (its released config) at 49 x 480 x 720."""
    heads, head_dim, text_dim, layers = (2, 16, 32, 2) if tiny else (30, 64, 4096, 30)
    text_tokens = 8 if tiny else 226
    latent = (3, 16, 16, 18) if tiny else (13, 16, 60, 90)  # an odd grid width, as the real 45
    config = dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
                  time_embed_dim=32 if tiny else 512, text_embed_dim=text_dim, num_layers=layers,
                  sample_frames=9 if tiny else 49, sample_height=latent[2], sample_width=latent[3], patch_size=2,
                  temporal_compression_ratio=4, max_text_seq_length=text_tokens,
                  use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False)
    return ModelSpec(
        name="cogvideox", label="CogVideoX-2b" + (" (tiny)" if tiny else ""),
        model_class="CogVideoXTransformer3DModel", config=config, latent=latent, frames_axis=0, patch=(1, 2, 2),
        text_tokens=text_tokens, text_dim=text_dim, cfg_batch=2, video="9 x 128 x 144" if tiny else "49 x 480 x 720")


SPECS = {"wan": wan_spec, "cogvideox": cogvideox_spec}


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, layers: int | None = None,
                seed: int = 0) -> torch.nn.Module:
    """The transformer with seeded random weights, built on ``device`` (a GPU initialises 1.3B
    parameters in a moment; a CPU would take minutes), cast to ``dtype`` as ``from_pretrained`` casts:
    the parameters of the model's ``_keep_in_fp32_modules`` stay in float32."""
    import diffusers

    config = dict(spec.config)
    if layers:
        config["num_layers"] = layers
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = getattr(diffusers, spec.model_class)(**config)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not any(part in keep for part in name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Inputs:
    latents: torch.Tensor  # float32, one sample
    text: torch.Tensor  # (cfg_batch, L, D) for a batch-2 model, else the cond prompt (1, L, D)
    negative: torch.Tensor  # the uncond prompt (1, L, D)


def make_inputs(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Seeded on the CPU, so every device gets the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, *spec.latent, generator=generator)
    text = torch.randn(1, spec.text_tokens, spec.text_dim, generator=generator)
    negative = torch.randn(1, spec.text_tokens, spec.text_dim, generator=generator)
    return Inputs(latents.to(device), text.to(device, dtype), negative.to(device, dtype))


class Shim:
    """What the methods need of a pipeline: its denoiser and a scheduler whose ``set_timesteps`` /
    ``step`` mark runs and steps for their shared step context."""

    def __init__(self, model: torch.nn.Module) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = model
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)


def sigmas(steps: int) -> list[float]:
    """``steps`` consecutive sigmas of a ``SCHEDULE_STEPS``-step run from step ``FIRST_STEP`` on
    (before the scheduler's shift), so each step moves the latent as much as in a real run."""
    first = min(FIRST_STEP, SCHEDULE_STEPS - steps)
    return [1.0 - (first + index) / SCHEDULE_STEPS for index in range(steps)]


def denoise(pipe: Shim, spec: ModelSpec, inputs: Inputs, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """The denoising loop of the spec's pipeline (its guidance batching and diffusers cache
    contexts), with an Euler flow update; returns the final latent (float32)."""
    model, scheduler = pipe.transformer, pipe.scheduler
    device = inputs.latents.device
    scheduler.set_timesteps(sigmas=sigmas(steps), device=device)
    scheduler.set_begin_index(0)  # no host lookup of the step index
    latents = inputs.latents
    pair = torch.cat([inputs.text, inputs.negative]) if spec.cfg_batch == 2 else None
    for t in scheduler.timesteps:
        model_input = latents.to(dtype)
        if pair is not None:
            with model.cache_context("cond_uncond"):
                both = model(hidden_states=torch.cat([model_input, model_input]), encoder_hidden_states=pair,
                             timestep=t.expand(2), return_dict=False)[0]
            cond, uncond = both.float().chunk(2)
        else:
            with model.cache_context("cond"):
                cond = model(hidden_states=model_input, encoder_hidden_states=inputs.text, timestep=t.expand(1),
                             return_dict=False)[0].float()
            with model.cache_context("uncond"):
                uncond = model(hidden_states=model_input, encoder_hidden_states=inputs.negative,
                               timestep=t.expand(1), return_dict=False)[0].float()
        velocity = uncond + GUIDANCE * (cond - uncond)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Timing:
    """Loop times of one variant over the timed rounds, in round order (milliseconds)."""

    loop_ms: tuple[float, ...]
    steps: int

    @property
    def median_ms(self) -> float:
        return median(self.loop_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"loop_ms": list(self.loop_ms), "loop_ms_median": self.median_ms, "loop_ms_min": min(self.loop_ms),
                "loop_ms_max": max(self.loop_ms), "step_ms_median": self.median_ms / self.steps}


@dataclass(frozen=True)
class Memory:
    """Peak memory of one variant's warm-up loop: CUDA peak allocated after a reset (on CPU, peak
    RSS growth) and the device-wide NVML peak (None off CUDA)."""

    peak_bytes: int | None
    kind: str
    nvml_peak_used_bytes: int | None

    @staticmethod
    def of(report) -> "Memory":
        kind = "cuda max_memory_allocated" if report.cuda_peak_allocated_bytes is not None else "peak RSS growth"
        return Memory(report.peak_bytes, kind, report.nvml_peak_used_bytes)


@dataclass(frozen=True)
class MethodRow:
    """One method (or stack) against the baseline on one model."""

    model: str
    method: str
    stack: str
    baseline: Timing
    accelerated: Timing
    ratio: Any  # vdtome.measure.stats.Ratio
    baseline_memory: Memory
    memory: Memory
    tokens_in: int
    tokens_out: int
    evidence: tuple[dict[str, Any], ...]
    acted: bool
    relative_l2: float | None  # of the final latent, to the baseline's
    relative_l2_update: float | None  # of what the steps added to the initial latent: few steps move it little
    notes: tuple[str, ...] = ()

    @property
    def ratios(self) -> list[float]:
        return [b / a for b, a in zip(self.baseline.loop_ms, self.accelerated.loop_ms)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "method": self.method, "stack": self.stack,
            "baseline": self.baseline.to_dict(), "accelerated": self.accelerated.to_dict(),
            "speedup": self.ratio.value, "speedup_min": min(self.ratios), "speedup_max": max(self.ratios),
            "speedup_per_round": self.ratios, "ratio": self.ratio.to_dict(),
            "baseline_memory": asdict(self.baseline_memory), "memory": asdict(self.memory),
            "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
            "evidence": list(self.evidence), "acted": self.acted, "relative_l2": self.relative_l2,
            "relative_l2_update": self.relative_l2_update,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ModelResult:
    spec: ModelSpec
    layers: int
    steps: int
    rounds: int
    build_s: float
    seconds: float
    rows: tuple[MethodRow, ...] = ()
    nvml: Mapping[str, Any] = field(default_factory=dict)  # after the timed rounds: clocks, power, temperature
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": spec.name, "label": spec.label, "class": spec.model_class, "video": spec.video,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.config.items()} | {"num_layers": self.layers},
            "latent": [1, *spec.latent], "cfg": spec.cfg,
            "tokens_per_block": {"video": spec.video_tokens, "grid": list(spec.grid), "text": spec.text_tokens},
            "steps": self.steps, "rounds": self.rounds, "build_s": self.build_s, "seconds": self.seconds,
            "rows": [row.to_dict() for row in self.rows], "nvml_after": dict(self.nvml), "error": self.error,
        }


@dataclass(frozen=True)
class GpuCheck:
    environment: Mapping[str, Any]
    nvml: Mapping[str, Any]
    tiny: bool
    settings: Mapping[str, Any]
    models: tuple[ModelResult, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(model.error is None for model in self.models)

    def to_dict(self) -> dict[str, Any]:
        return {"tiny": self.tiny, "ok": self.ok, "seconds": self.seconds, "settings": dict(self.settings),
                "environment": dict(self.environment), "nvml": dict(self.nvml),
                "models": [model.to_dict() for model in self.models]}

    def table(self) -> str:
        """Markdown: one row per model and method."""
        lines = [f"# vdtome gpucheck{' (tiny: timings mean nothing)' if self.tiny else ''}", "",
                 environment_line(self.environment), ""]
        for model in self.models:
            lines.append(f"- {model.spec.label}: {model.spec.video}, {model.spec.video_tokens:,} video + "
                         f"{model.spec.text_tokens} text tokens per block, {model.layers} layers, {model.steps} steps "
                         f"({model.spec.cfg}), {model.rounds} rounds" + (f": **failed**: {model.error}" if model.error else ""))
        lines += ["", "| model | method | tokens/block | baseline loop ms | method loop ms | speedup (min-max) | "
                      "peak MiB base / method | evidence | rel. L2 latent / update |", "|" + "---|" * 9]
        for model in self.models:
            for row in model.rows:
                lines.append("| " + " | ".join((
                    model.spec.name, row.method, f"{row.tokens_in:,} → {row.tokens_out:,}",
                    _spread(row.baseline.loop_ms), _spread(row.accelerated.loop_ms),
                    f"{row.ratio.value:.2f}x ({min(row.ratios):.2f}-{max(row.ratios):.2f})"
                    + ("" if row.acted else ", did nothing: no claim"),
                    f"{_mib(row.baseline_memory.peak_bytes)} / {_mib(row.memory.peak_bytes)}",
                    "; ".join(_evidence_text(item) for item in row.evidence) or "-",
                    f"{_number(row.relative_l2)} / {_number(row.relative_l2_update)}")) + " |")
        return "\n".join(lines) + "\n"


def _spread(values: Sequence[float]) -> str:
    return f"{median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def _evidence_text(item: Mapping[str, Any]) -> str:
    share = f" ({item['count'] / item['of']:.0%})" if item.get("of") else ""
    return f"{item['label'].split(' (')[0]}: {item['count']:,}{share}"


# -------------------------------------------------------------------------------------------- NVML


def nvml_facts(device: torch.device) -> dict[str, Any]:
    """What NVML says about the device now (name, driver, memory, power, clocks, temperature,
    throttle reasons); ``{"unavailable": why}`` off CUDA or without NVML. Every read is optional."""
    if device.type != "cuda":
        return {"unavailable": f"device is {device.type}, not CUDA"}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:
        return {"unavailable": f"NVML: {exc}"}
    try:
        handle = nvml_handle(pynvml, device)
        reads = {
            "name": lambda: pynvml.nvmlDeviceGetName(handle),
            "driver_version": pynvml.nvmlSystemGetDriverVersion,
            "memory_used_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used),
            "memory_total_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "power_draw_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "memory_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "utilization_percent": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "throttle_reasons": lambda: int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)),
        }
        facts: dict[str, Any] = {}
        for key, read in reads.items():
            with contextlib.suppress(Exception):
                value = read()
                facts[key] = value.decode() if isinstance(value, bytes) else value
        return facts
    except Exception as exc:
        return {"unavailable": f"NVML device query: {exc}"}
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


# --------------------------------------------------------------------------------------------- run


def check_model(spec: ModelSpec, stacks: Sequence[tuple[Any, ...]], device: torch.device, dtype: torch.dtype, *,
                steps: int, rounds: int, warmup_steps: int, layers: int | None = None, seed: int = 0,
                log=print) -> ModelResult:
    """The baseline and every stack on one model: warm-up with memory, then the timed rounds."""
    began = time.perf_counter()
    model = build_model(spec, device, dtype, layers, seed)
    sync(device)
    build_s = time.perf_counter() - began
    layers = len(getattr(model, "blocks", None) or model.transformer_blocks)
    log(f"{spec.label}: built in {build_s:.1f} s ({sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters, "
        f"{layers} layers), {spec.video_tokens:,} video tokens per block")
    pipe, inputs = Shim(model), make_inputs(spec, device, dtype, seed)
    names = [BASELINE, *(_name(stack) for stack in stacks)]
    configs = dict(zip(names, [(), *stacks]))

    def run(name: str, loop_steps: int):
        """One loop of a variant, the stack applied around it only; (ms, latent, reports)."""
        stack = apply_stack(pipe, configs[name]) if configs[name] else None
        try:
            sync(device)
            with gc_paused(), Stopwatch(device) as watch:
                latent = denoise(pipe, spec, inputs, loop_steps, dtype)
            return watch.elapsed_ms, latent, (stack.reports() if stack else ())
        finally:
            if stack:
                stack.remove()

    with torch.inference_mode():
        run(BASELINE, warmup_steps)  # first calls: kernels chosen, workspaces allocated
        memory = {}
        for name in names:
            with MemoryMonitor(device, rss=device.type != "cuda") as monitor:
                run(name, warmup_steps)
            memory[name] = Memory.of(monitor.report)
        times: dict[str, list[float]] = {name: [] for name in names}
        latents: dict[str, torch.Tensor] = {}
        reports: dict[str, tuple] = {}
        for index in range(rounds):
            order = names[index % len(names):] + names[:index % len(names)]
            for name in order:
                ms, latent, report = run(name, steps)
                times[name].append(ms)
                latents.setdefault(name, latent)
                reports[name] = report
            log(f"  round {index + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.0f} ms" for n in names))
    baseline = Timing(tuple(times[BASELINE]), steps)
    rows = tuple(_row(spec, name, configs[name], baseline, Timing(tuple(times[name]), steps), memory,
                      reports[name], latents[name], latents[BASELINE], inputs.latents) for name in names[1:])
    nvml = nvml_facts(device)
    del model, pipe, inputs, latents
    return ModelResult(spec, layers, steps, rounds, build_s, time.perf_counter() - began, rows, nvml)


def _name(stack: Sequence[Any]) -> str:
    return "+".join(method_of(config).name for config in stack)


def _row(spec: ModelSpec, name: str, configs: tuple, baseline: Timing, accelerated: Timing,
         memory: Mapping[str, Memory], reports: tuple, latent: torch.Tensor, reference: torch.Tensor,
         initial: torch.Tensor) -> MethodRow:
    evidence = tuple({"method": report.method, **asdict(item)} for report in reports for item in report.evidence)
    acted = any(report.acted for report in reports)
    ratio = paired_ratio(baseline.loop_ms, accelerated.loop_ms)
    if not acted:
        ratio = ratio.without_claim("no method acted (no token merged, no block skipped)")
    tokens_out = spec.video_tokens
    for report in reports:
        sites = report.detail.get("tokens_per_block") or ()
        merged = [site["tokens_out"] for site in sites if site["target"] == "self_attn" and site["calls"]]
        if merged:
            tokens_out = min(merged)
    relative_l2 = _relative(latent - reference, reference)
    relative_l2_update = _relative(latent - reference, reference - initial)
    return MethodRow(
        model=spec.name, method=name, stack=stack_label(configs), baseline=baseline, accelerated=accelerated,
        ratio=ratio, baseline_memory=memory[BASELINE], memory=memory[name], tokens_in=spec.video_tokens,
        tokens_out=tokens_out, evidence=evidence, acted=acted,
        relative_l2=relative_l2, relative_l2_update=relative_l2_update,
        notes=tuple(note for report in reports for note in report.notes)
        + (() if relative_l2 is not None else ("no finite relative L2 (random weights overflowed?)",)))


def _relative(difference: torch.Tensor, reference: torch.Tensor) -> float | None:
    """||difference|| / ||reference||, None when not finite (JSON has no NaN)."""
    value = float(torch.linalg.vector_norm(difference.float()) / torch.linalg.vector_norm(reference.float()))
    return value if math.isfinite(value) else None


def run_gpucheck(out: str | Path, *, models: Sequence[str] = MODELS, methods: Sequence[Any] | None = None,
                 tiny: bool | None = None, device: str | None = None, steps: int | None = None,
                 rounds: int | None = None, warmup_steps: int | None = None, layers: int | None = None,
                 seed: int = 0, log=print) -> GpuCheck:
    """Run the check and write ``out/gpucheck.json`` and ``out/gpucheck.md``.

    ``methods``: configs of the methods to check, each alone and (when there are several) all
    stacked (default: token merging and first block cache at their form defaults). Without CUDA
    (or with ``tiny``) every model is its tiny version on the CPU."""
    began = time.perf_counter()
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested, but CUDA is not available")
    torch_device = torch.device(device or ("cuda" if cuda else "cpu"))
    tiny = (not cuda) if tiny is None else (tiny or not cuda)
    defaults = TINY_DEFAULTS if tiny else DEFAULTS
    steps, rounds = steps or defaults["steps"], rounds or defaults["rounds"]
    warmup_steps = warmup_steps or defaults["warmup_steps"]
    if steps < 1 or rounds < 1 or warmup_steps < 1:
        raise ValueError("steps, rounds and warmup steps must be at least 1")
    unknown = [name for name in models if name not in SPECS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; known: {', '.join(SPECS)}")
    if methods is None:

        methods = [METHODS[name].config_from({}) for name in DEFAULT_METHODS]
    stacks = [(config,) for config in methods] + ([tuple(methods)] if len(methods) > 1 else [])
    for stack in stacks:
        check_stack(stack)  # before anything is built
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    settings = {"models": list(models), "methods": [_name(stack) for stack in stacks], "steps": steps,
                "rounds": rounds, "warmup_steps": warmup_steps, "layers": layers, "seed": seed,
                "guidance": GUIDANCE, "flow_shift": FLOW_SHIFT,
                "schedule": f"{steps} steps of a {SCHEDULE_STEPS}-step run from step {FIRST_STEP}",
                "timing": "CUDA events" if torch_device.type == "cuda" else "perf_counter"}
    log(f"gpucheck on {torch_device} ({'tiny' if tiny else 'real sizes'}, {str(dtype).replace('torch.', '')}): "
        f"{', '.join(models)} x baseline, {', '.join(settings['methods'])}; {steps} steps, {rounds} rounds")
    results = []
    for name in models:
        spec = SPECS[name](tiny)
        try:
            results.append(check_model(spec, stacks, torch_device, dtype, steps=steps, rounds=rounds,
                                       warmup_steps=warmup_steps, layers=layers, seed=seed, log=log))
        except Exception as error:  # e.g. out of memory: the other model still runs
            log(f"{spec.label}: failed: {type(error).__name__}: {error}")
            results.append(ModelResult(spec, layers or spec.config["num_layers"], steps, rounds, 0.0, 0.0,
                                       error=f"{type(error).__name__}: {error}"))
        finally:
            if torch_device.type == "cuda":
                torch.cuda.empty_cache()
    check = GpuCheck(environment(torch_device, dtype), nvml_facts(torch_device), tiny, settings, tuple(results),
                     time.perf_counter() - began)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpucheck.json").write_text(json.dumps(check.to_dict(), indent=2, default=str, allow_nan=False) + "\n")
    (folder / "gpucheck.md").write_text(check.table())
    return check


# --------------------------------------------------------------------------------------------- CLI


def add_parser(commands) -> argparse.ArgumentParser:
    """The ``gpucheck`` subcommand (registered by :mod:`vdtome.cli`)."""
    parser = commands.add_parser(
        "gpucheck", help="real-width Wan 2.1 1.3B and CogVideoX-2b, random weights: methods vs baseline on a GPU",
        description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpucheck.json and gpucheck.md")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--method", action="append", default=[], metavar="NAME[:FIELD=VALUE,...]",
                        help="a method to check alone and in the stack of all given (default: tome and "
                             "first_block_cache at their defaults), e.g. first_block_cache:threshold=0.1")
    parser.add_argument("--steps", type=int, help=f"denoising steps per loop (default {DEFAULTS['steps']})")
    parser.add_argument("--rounds", type=int, help=f"timed rounds (default {DEFAULTS['rounds']}; 6+ give an interval)")
    parser.add_argument("--warmup-steps", type=int, help=f"steps of each warm-up loop (default {DEFAULTS['warmup_steps']})")
    parser.add_argument("--layers", type=int, help="transformer layers (default: the released model's, 30)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU, in seconds (automatic without CUDA)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> int:

    try:
        methods = [parse_method_spec(text) for text in args.method] or None
        check = run_gpucheck(args.out, models=[m.strip() for m in args.models.split(",") if m.strip()],
                             methods=methods, tiny=args.tiny or None, device=args.device, steps=args.steps,
                             rounds=args.rounds, warmup_steps=args.warmup_steps, layers=args.layers, seed=args.seed,
                             log=lambda text: print(text, file=sys.stderr, flush=True))
    except (RequestError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(check.table())
    print(f"Files: {Path(args.out) / 'gpucheck.json'}, {Path(args.out) / 'gpucheck.md'} ({check.seconds:.0f} s)")
    return 0 if check.ok else 1
