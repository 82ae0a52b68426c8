"""torch.compile as a stack modifier: the denoiser compiled on **both** sides, so a method's speedup
is the one it keeps over the compiled baseline a deployment runs (its hooks: :mod:`vdtome.methods.compile_hooks`).

The engine applies it around the baseline's calls too, runs both sides in a compile phase of its
own until a round compiles nothing new (shown apart, never inside the timed rounds), and reports
what dynamo did: graphs, graph breaks with their reasons, and any recompile during the timed
rounds (which withdraws the speed verdict: the timing would include compiling). The compiled
function is kept for the process, so a later request on the same pipeline compiles nothing.
ZeroGPU does not support torch.compile: refused there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.core.denoisers import DenoiserType
from vdtome.core.hosting import on_zero_gpu
from vdtome.core.validation import RequestError
from vdtome.methods.base import Deferred, Method
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "compile"
MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
DYNAMIC = ("auto", "on", "off")
BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class Compile:
    """``torch.compile(denoiser, mode=..., dynamic=..., fullgraph=..., backend=...)``, on both sides
    unless ``baseline`` is off."""

    mode: str = setting("default", "Mode", "inductor's mode; reduce-overhead uses CUDA graphs (a GPU only)",
                        options=MODES)
    dynamic: str = setting("auto", "Dynamic shapes", "auto: a dimension that changes between calls is made "
                           "dynamic at its first change (torch's default); on: dynamic from the start; off: a "
                           "new graph per shape", options=DYNAMIC, advanced=True)
    fullgraph: bool = setting(False, "Full graph", "one graph per denoiser call: a stack whose methods break the "
                              "graph is refused, naming them", advanced=True)
    baseline: bool = setting(True, "Compile the baseline too", "on: the speedup is over the compiled baseline (what "
                             "a deployment compares with); off: only the accelerated side is compiled, so the "
                             "speedup is over the eager baseline and includes what compiling alone gives",
                             advanced=True)
    backend: str = setting("inductor", "Backend", "inductor generates kernels; aot_eager and eager only trace "
                           "(graphs, breaks and recompiles, without code generation: for checking a stack "
                           "quickly)", options=BACKENDS, advanced=True)

    def __post_init__(self) -> None:
        check_settings(self, NAME)
        if self.backend != "inductor" and self.mode != "default":
            raise RequestError(f"mode {self.mode} is inductor's; the {self.backend} backend takes the default mode",
                               f"{NAME}_mode")

    def options(self) -> dict[str, Any]:
        """``torch.compile``'s keyword arguments."""
        options: dict[str, Any] = {"backend": self.backend, "fullgraph": self.fullgraph,
                                   "dynamic": {"auto": None, "on": True, "off": False}[self.dynamic]}
        if self.mode != "default":
            options["mode"] = self.mode
        return options


FIELDS = form_fields(Compile, NAME)


def parse(values: Mapping[str, Any]) -> Compile:
    return Compile(**config_values(Compile, NAME, values))


def summary(config: Compile) -> str:
    parts = [config.backend] + [f"mode {config.mode}"] * (config.mode != "default")
    parts += [f"dynamic {config.dynamic}"] * (config.dynamic != "auto") + ["fullgraph"] * config.fullgraph
    parts += ["accelerated side only"] * (not config.baseline)
    return " ".join(parts)


def _unavailable(denoiser_types: tuple[DenoiserType, ...]) -> str | None:
    if on_zero_gpu():
        return ("ZeroGPU does not support torch.compile (its worker is forked per task and the compiled code "
                "would not survive it); run the comparison on your own GPU or CPU")
    return None


METHOD = Method(
    name=NAME,
    label="torch.compile",
    config_type=Compile,
    apply=Deferred("vdtome.methods.compile_hooks", "CompiledDenoisers"),
    fields=FIELDS,
    parse=parse,
    summary=summary,
    unavailable=_unavailable,
    steps_alike=lambda config: True,
    both_sides=lambda config: config.baseline,
    settles=True,
    refuses_graph_breaks=lambda config: config.fullgraph,
    docs="torch.compile on both sides (a stack modifier): every speedup is then over the compiled baseline; "
         "compile time is its own phase, graph breaks and recompiles are reported",
)
