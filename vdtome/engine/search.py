"""``python -m vdtome search``: a per-layer schedule for a method, measured on calibration prompts.

The method's probe (:class:`vdtome.methods.base.Search`) is attached while the plain pipeline
generates each calibration prompt (latents only); every layer's candidate settings are measured
against the dense computation on the same inputs, and the one within the threshold that saves the
most is kept. The schedule records what it was searched on, each layer's error figures, and a
check: the hash of the latents of the first prompt generated with the schedule loaded back from
the written file, which any later run of the same request reproduces bitwise.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vdtome.core.presets import get_preset, load_prompts
from vdtome.core.validation import RequestError
from vdtome.engine.pipelines import load_pipeline
from vdtome.engine.request import ComparisonRequest, ResolvedSettings, resolve
from vdtome.methods import METHODS, apply_stack, config_from_overrides, method_overrides
from vdtome.methods.schedules import write_schedule

CALIBRATION_PROMPTS = 2


@dataclass(frozen=True)
class SearchResult:
    path: Path
    schedule: dict[str, Any]


def latents_digest(pipe: Any, settings: ResolvedSettings, prompt: str) -> str:
    """SHA-256 of the latents one generation of ``prompt`` ends with (seeded as every run is)."""
    parameters = frozenset(inspect.signature(pipe.__call__).parameters)
    with torch.no_grad():
        output = pipe(**settings.call_kwargs(parameters) | dict(
            prompt=prompt, generator=torch.Generator("cpu").manual_seed(settings.seed), output_type="latent"))
    latents = output.frames if hasattr(output, "frames") else output[0]
    return hashlib.sha256(latents.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def run_search(preset_name: str, method_spec: str, threshold: float, out: str | Path, *, frames: int | None = None,
               height: int | None = None, width: int | None = None, steps: int | None = None,
               prompts: list[str] | None = None, seed: int = 0, device: str | None = None, pipe: Any = None,
               progress: Callable[[str], None] = lambda text: None) -> SearchResult:
    """Search a method's per-layer schedule on ``preset`` and write it to ``out``. ``method_spec``:
    ``NAME[:field=value,...]`` as on the compare command line (the fields the search keeps fixed,
    e.g. ``tile_sparsity:placement=spaced,dense_steps=4``; the others at the preset's defaults)."""
    preset = get_preset(preset_name)
    method, overrides = method_overrides(method_spec)
    if method.search is None:
        searchable = ", ".join(m.name for m in METHODS.values() if m.search is not None)
        raise RequestError(f"{method.name} has no per-layer search; searchable methods: {searchable}", "method")
    if not 0 < threshold < 10:
        raise RequestError(f"threshold is a relative error (e.g. 0.05), above 0 and below 10, got {threshold:g}",
                           "threshold")
    prompts = list(prompts or load_prompts(preset.prompts or "default")[:CALIBRATION_PROMPTS])
    settings, _ = resolve(ComparisonRequest(preset=preset.name, prompt=prompts[0], seed=seed, frames=frames,
                                            height=height, width=width, steps=steps, snap=False), preset)
    if method.search.field in overrides:
        raise RequestError(f"{method.search.field} is what the search writes; leave it out", method.search.field)
    base = config_from_overrides(method, overrides, preset)
    pipe = pipe if pipe is not None else load_pipeline(preset, device)
    probe = method.search.start(pipe, base)
    try:
        for index, prompt in enumerate(prompts):
            progress(f"calibration prompt {index + 1}/{len(prompts)}: {prompt}")
            latents_digest(pipe, settings, prompt)
    finally:
        probe.remove()
    schedule = {"method": method.name, "preset": preset.name, "frames": settings.frames, "height": settings.height,
                "width": settings.width, "steps": settings.steps, "guidance": settings.guidance, "seed": settings.seed,
                "threshold": threshold, "prompts": prompts, **probe.choose(threshold)}
    path = write_schedule(out, schedule)
    progress("check: the first prompt with the schedule loaded from the file")
    config = config_from_overrides(method, overrides | {method.search.field: str(path)}, preset)
    with apply_stack(pipe, (config,)):
        digest = latents_digest(pipe, settings, prompts[0])
    schedule["check"] = {"prompt": prompts[0], "latents_sha256": digest}
    write_schedule(path, schedule)
    return SearchResult(path, schedule)
