"""Weights off the GPU between uses, as a plug-in: diffusers' own offloading, undone exactly.

``model``: each component (text encoder, denoiser, VAE) moves to the GPU when the pipeline calls it
and back to the host after (``enable_model_cpu_offload``): the GPU holds one component's weights at
a time. ``group_block`` / ``group_leaf``: diffusers' group offloading moves groups of blocks (or
single layers) in and out during each forward, on a side CUDA stream that prefetches the next
group while one computes (``enable_group_offload``): the GPU holds a few blocks' weights. The
transfers are part of every call the accelerated side makes, so the comparison shows what the
memory costs in time. On a CPU there is no separate memory to offload to: refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vdtome.core.denoisers import weight_bytes
from vdtome.core.diffusers_compat import is_group_offloaded, remove_group_offloading
from vdtome.core.phases import DENOISING, TEXT_ENCODING, VAE_DECODE
from vdtome.methods.base import Evidence, Method, MethodReport
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "offload"
MODES = ("model", "group_block", "group_leaf")


@dataclass(frozen=True)
class Offload:
    """``mode``: what moves (see the module). One block per group: with a side stream (CUDA)
    diffusers moves one at a time whatever is asked."""

    mode: str = setting("group_block", "What moves", "model: one whole component at a time; group_block: one block "
                        "at a time, the next prefetched on a side stream; group_leaf: single layers", options=MODES)

    def __post_init__(self) -> None:
        check_settings(self, NAME)


FIELDS = form_fields(Offload, NAME)


def parse(values: Mapping[str, Any]) -> Offload:
    return Offload(**config_values(Offload, NAME, values))


def summary(config: Offload) -> str:
    return config.mode


def pipeline_device(pipe: Any) -> torch.device:
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    return next((p.device for m in modules for p in m.parameters()), torch.device("cpu"))


class OffloadedPipeline:
    """Offloading applied to every component of ``pipe``, computing on ``onload_device``.

    ``remove`` takes diffusers' hooks off and puts every component back on the device it was on.
    The plug-in refuses a CPU pipeline; this class takes one (nothing moves then), so the hooks'
    application and removal can be tested without a GPU."""

    def __init__(self, pipe: Any, config: Offload, onload_device: torch.device) -> None:
        self.pipe = pipe
        self.config = config
        self.onload_device = onload_device
        self.components = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
        self.placed = {name: next((p.device for p in c.parameters()), onload_device)
                       for name, c in self.components.items()}
        self.offloaded = sum(weight_bytes(c) for c in self.components.values())
        try:
            if config.mode == "model":
                pipe.enable_model_cpu_offload(device=onload_device)
            else:
                pipe.enable_group_offload(
                    onload_device=onload_device, offload_device=torch.device("cpu"),
                    offload_type="block_level" if config.mode == "group_block" else "leaf_level",
                    num_blocks_per_group=1 if config.mode == "group_block" else None,
                    use_stream=onload_device.type == "cuda")
        except BaseException:
            self.remove()
            raise

    def reset(self) -> None:
        pass  # nothing is counted per call: what moves is fixed by the mode

    def remove(self) -> None:
        if self.config.mode == "model":
            self.pipe.remove_all_hooks()
        for name, component in self.components.items():
            if self.config.mode != "model":
                remove_group_offloading(component)
            component.to(self.placed[name])

    def report(self) -> MethodReport:
        on_gpu = self.onload_device.type != "cpu"
        return MethodReport(
            method=NAME,
            summary={"settings": summary(self.config)},
            rows=(("weights kept in host memory between uses", f"{self.offloaded / 2**30:.2f} GB",
                   f"{self.config.mode}, computing on {self.onload_device}"),),
            notes=() if on_gpu else ("computing on the CPU: nothing moved",),
            detail={"offloaded_bytes": self.offloaded, "components": sorted(self.components)},
            evidence=(Evidence("weight bytes kept in host memory between uses", self.offloaded if on_gpu else 0),),
            phases=frozenset({TEXT_ENCODING, DENOISING, VAE_DECODE}),
        )


def already_offloaded(pipe: Any) -> bool:
    """Whether the pipeline offloads already (its loader enabled model offload, or group offloading)."""
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    return any(hasattr(m, "_hf_hook") or is_group_offloaded(m) for m in modules)


def apply_offload(pipe: Any, config: Offload) -> OffloadedPipeline:
    if already_offloaded(pipe):
        raise TypeError("this pipeline offloads already (its loader enables model offload on a GPU this size), on "
                        "both sides: offloading cannot be compared here")
    device = pipeline_device(pipe)
    if device.type == "cpu":
        raise TypeError("offloading moves weights between GPU and host memory; this pipeline computes on the CPU, "
                        "where there is nothing to offload to")
    return OffloadedPipeline(pipe, config, device)


METHOD = Method(
    name=NAME,
    label="offloading",
    config_type=Offload,
    apply=apply_offload,
    fields=FIELDS,
    parse=parse,
    summary=summary,
    steps_alike=lambda config: True,
    applies_last=True,
    changes_memory=True,
    docs="keeps weights in host memory and moves them to the GPU for use (diffusers model or group offloading): "
         "GPU memory for transfer time",
)
