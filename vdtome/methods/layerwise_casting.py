"""Weights stored in 8-bit floats as a plug-in: diffusers' layerwise casting, undone exactly.

diffusers' ``enable_layerwise_casting`` keeps each supported layer's weights in ``storage`` dtype
(float8) and casts them to the compute dtype for the layer's forward only, so weights take a
quarter (from float32) or half (from 16-bit) of their memory while activations keep their
precision. diffusers skips the layers precision depends on (embeddings, norms, the first and last
projections). Outputs change (fidelity says how much) and every layer pays a cast.

diffusers cannot undo it (casting back cannot restore the lost bits), so the original weights are
kept on the host while it is applied and put back on removal: bitwise the model it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vdtome.core.denoisers import denoisers_of, weight_bytes
from vdtome.core.diffusers_compat import remove_layerwise_casting
from vdtome.methods.base import Evidence, Method, MethodReport
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "layerwise_casting"
STORAGE = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class LayerwiseCasting:
    """``storage``: the float8 format weights are stored in."""

    storage: str = setting("float8_e4m3fn", "Weight storage", "float8_e4m3fn: more precision; float8_e5m2: more "
                           "range", options=tuple(STORAGE))

    def __post_init__(self) -> None:
        check_settings(self, NAME)


FIELDS = form_fields(LayerwiseCasting, NAME)


def parse(values: Mapping[str, Any]) -> LayerwiseCasting:
    return LayerwiseCasting(**config_values(LayerwiseCasting, NAME, values))


def summary(config: LayerwiseCasting) -> str:
    return config.storage


class AppliedLayerwiseCasting:
    def __init__(self, pipe: Any, config: LayerwiseCasting) -> None:
        self.config = config
        self.models = denoisers_of(pipe)
        self.before = sum(weight_bytes(m) for m in self.models)
        # The original tensors, on the host (a reference where they live there already: no copy).
        self.saved = [[(module, name, tensor.data.to("cpu"))
                       for module in model.modules()
                       for name, tensor in (*module._parameters.items(), *module._buffers.items()) if tensor is not None]
                      for model in self.models]
        self.calls = 0
        self._counters = []
        try:
            for model in self.models:
                compute = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
                model.enable_layerwise_casting(storage_dtype=STORAGE[config.storage], compute_dtype=compute)
                self._counters.append(model.register_forward_pre_hook(self._counted))
        except BaseException:
            self.remove()
            raise
        self.after = sum(weight_bytes(m) for m in self.models)

    def _counted(self, module, args) -> None:
        self.calls += 1

    def reset(self) -> None:
        self.calls = 0

    def remove(self) -> None:
        for model, saved in zip(self.models, self.saved):
            remove_layerwise_casting(model)
            for module, name, tensor in saved:
                target = module._parameters if name in module._parameters else module._buffers
                current = target[name]
                if isinstance(current, torch.nn.Parameter):
                    current.data = tensor.to(current.device)
                else:
                    target[name] = tensor.to(current.device)
        while self._counters:
            self._counters.pop().remove()

    def report(self) -> MethodReport:
        saved = self.before - self.after
        on_cpu = all(p.device.type == "cpu" for m in self.models for p in m.parameters())
        notes = ("on a CPU the original weights stay in the same memory (kept to be put back on removal): the "
                 "process holds both; on a GPU they wait in host memory and the GPU holds the float8 copies",) \
            if on_cpu else ()
        return MethodReport(
            method=NAME,
            summary={"settings": summary(self.config), "weights MiB": round(self.after / 2**20, 1)},
            rows=(("denoiser weights stored", f"{self.before / 2**20:.1f} -> {self.after / 2**20:.1f} MiB",
                   f"{self.config.storage}; cast per layer in each of {self.calls} denoiser calls"),),
            notes=notes,
            detail={"weight_bytes_before": self.before, "weight_bytes_after": self.after, "denoiser_calls": self.calls},
            evidence=(Evidence("denoiser weight bytes stored as float8 instead", saved, self.before),),
        )


METHOD = Method(
    name=NAME,
    label="layerwise casting (fp8 weights)",
    config_type=LayerwiseCasting,
    apply=AppliedLayerwiseCasting,
    fields=FIELDS,
    parse=parse,
    summary=summary,
    steps_alike=lambda config: True,
    changes_memory=True,
    graph_breaks="diffusers' casting hooks make parameters (torch.nn.Parameter) at every call",
    docs="stores the denoiser's weights in float8 and casts each layer up for its forward (diffusers "
         "enable_layerwise_casting): less weight memory, a cast per layer, slightly different outputs",
)
