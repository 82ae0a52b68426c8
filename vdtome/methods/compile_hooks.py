"""torch.compile applied to a pipeline's denoisers and removed exactly (the declaration:
:mod:`vdtome.methods.compile`).

``nn.Module.compile()`` stores ``torch.compile(module._call_impl)`` on the module; here the
compiled function is one per set of options for the process (``torch.compile`` of the unbound
``Module._call_impl``), bound to each denoiser while the method is on. Dynamo keeps its graphs on
the code it compiled, guarded by what each call reads: removing the method and applying it again
finds the graphs already made, and so does a later request on the same pipeline (the engine keeps
it on for a whole comparison). A fresh ``torch.compile`` each time would be a new backend, and
recompile.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch

from vdtome.core.denoisers import denoisers_of
from vdtome.core.validation import RequestError
from vdtome.methods.base import Evidence, MethodReport
from vdtome.methods.compile import NAME, Compile, summary

# Dynamo's default (8 graphs per function) is reached by a pipeline compiled with a few stacks in
# turn: every stack a server has run keeps its graphs. Over this, dynamo runs the function eagerly
# and the engine reports it (never a silent verdict).
RECOMPILE_LIMIT = 64

_compiled: dict[tuple, Any] = {}
_lock = threading.Lock()
_ABSENT = object()  # a module without its own ``_compiled_call_impl`` (the class's None)


def compiled_call(config: Compile) -> Any:
    """The process's ``torch.compile(nn.Module._call_impl, **options)`` for ``config``."""
    options = config.options()
    key = tuple(sorted(options.items()))
    with _lock:
        if key not in _compiled:
            if options["backend"] != "inductor":
                # Dynamo reuses the graphs of any compile with the same backend object, whatever its
                # other options: its own for these options, so a full-graph compile never runs the graphs
                # (and breaks) another compile of the stack made.
                named = torch._dynamo.lookup_backend(options["backend"])
                options["backend"] = lambda graph, inputs: named(graph, inputs)
            _compiled[key] = torch.compile(torch.nn.Module._call_impl, **options)
        return _compiled[key]


def _call(compiled: Any, model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The compiled call, with dynamo guarding on torch's module hooks (off by default): a graph made
    while other hooks were on (another stack's evidence counters) would otherwise run with those, and
    count what this stack did into another's counters."""
    with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit),
                                    skip_nnmodule_hook_guards=False):
        return compiled(model, *args, **kwargs)


class CompiledDenoisers:
    """Every denoiser of ``pipe`` runs through the compiled function until :meth:`remove`."""

    def __init__(self, pipe: Any, config: Compile) -> None:
        self.config = config
        models = denoisers_of(pipe)
        if config.mode == "reduce-overhead":
            devices = {p.device.type for model in models for p in model.parameters()}
            if devices != {"cuda"}:
                raise RequestError("mode reduce-overhead records CUDA graphs: it needs the denoiser on a GPU "
                                   f"(here on {', '.join(sorted(devices))})", f"{NAME}_mode")
        compiled = compiled_call(config)
        self.count = len(models)
        self._saved = [(model, vars(model).get("_compiled_call_impl", _ABSENT)) for model in models]
        for model in models:
            model._compiled_call_impl = functools.partial(_call, compiled, model)

    def reset(self) -> None:
        pass  # no state between calls: dynamo's graphs are what a later call should find

    def remove(self) -> None:
        while self._saved:
            model, before = self._saved.pop()
            if before is _ABSENT:
                vars(model).pop("_compiled_call_impl", None)
            else:
                model._compiled_call_impl = before

    def report(self) -> MethodReport:
        return MethodReport(
            NAME,
            summary={"backend": self.config.backend, "mode": self.config.mode},
            rows=(("compiled", summary(self.config), "both sides: the baseline is compiled the same way"
                   if self.config.baseline else "the accelerated side only: the baseline runs eagerly"),),
            detail={"options": dict(self.config.options())},
            evidence=(Evidence("denoisers compiled", self.count),) if self.count else (),
        )

