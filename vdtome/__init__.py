"""vdtome: training-free acceleration for video diffusion pipelines, measured honestly.

Token merging on a diffusers pipeline, reversibly::

    import vdtome

    handle = vdtome.apply_tome(pipe, vdtome.ToMeConfig(ratio=0.3))
    video = pipe(prompt, num_inference_steps=20).frames[0]
    print(handle.stats().effective_ratio)
    handle.remove()  # the model is exactly as before

Any registered methods stacked (token merging, diffusers' step caches)::

    stack = vdtome.apply_stack(pipe, (vdtome.ToMeConfig(ratio=0.3),
                                      vdtome.parse_method_spec("first_block_cache:threshold=0.05")))
    ...
    stack.remove()

The stack a tune chose (``python -m vdtome tune``), from its recipe file or a shipped recipe's name::

    stack = vdtome.apply(pipe, "recipe.json")  # refused on another pipeline; stack.recipe: what it was tuned at
    ...
    stack.remove()

Attention-tile sparsity, one pattern or a searched schedule per layer (``vdtome.run_search``)::

    stack = vdtome.apply_stack(pipe, (vdtome.TileSparsity(pattern="1:7"),))  # 8 latent frames

One comparison, baseline against accelerated on the same seed, with the timing protocol::

    result = vdtome.compare("tiny-shapes-128", "a red circle moving right slowly on a white background")
    print(result.speedup("denoising"))  # a paired ratio with its interval

Names are imported on first use, so ``import vdtome`` is light and token merging needs none of the
app's or the benchmarks' dependencies (gradio, altair, matplotlib, ray).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vdtome.core.known_messages import silence_known_messages
from vdtome.core.lazy import lazy_exports

__version__ = "0.2.0"

silence_known_messages()  # before anything imports diffusers

# Public name -> the module that defines it.
_EXPORTS = {
    "ToMeConfig": "vdtome.tome",
    "ToMeHandle": "vdtome.tome",
    "ToMeStats": "vdtome.tome",
    "apply_tome": "vdtome.tome",
    "remove_tome": "vdtome.tome",
    "SUPPORTED_MODELS": "vdtome.tome",
    "METHODS": "vdtome.methods",
    "Method": "vdtome.methods",
    "FormField": "vdtome.methods",
    "MethodReport": "vdtome.methods",
    "AppliedStack": "vdtome.methods",
    "apply_stack": "vdtome.methods",
    "check_stack": "vdtome.methods",
    "default_stack": "vdtome.methods",
    "method_named": "vdtome.methods",
    "method_of": "vdtome.methods",
    "parse_method_spec": "vdtome.methods",
    "register": "vdtome.methods",
    "TileSparsity": "vdtome.methods.tile_sparsity",
    "apply": "vdtome.methods.recipe",
    "Recipe": "vdtome.methods.recipe",
    "load_recipe": "vdtome.methods.recipe",
    "run_search": "vdtome.engine.search",
    "ComparisonRequest": "vdtome.engine.request",
    "ComparisonResult": "vdtome.engine.request",
    "ComparisonEngine": "vdtome.engine.engine",
    "compare": "vdtome.engine.engine",
    "RequestError": "vdtome.core.validation",
    "load_presets": "vdtome.core.presets",
    "get_preset": "vdtome.core.presets",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names above load on first use
    from vdtome.core.presets import get_preset, load_presets
    from vdtome.core.validation import RequestError
    from vdtome.engine.engine import ComparisonEngine, compare
    from vdtome.engine.request import ComparisonRequest, ComparisonResult
    from vdtome.engine.search import run_search
    from vdtome.methods import (
        METHODS,
        AppliedStack,
        FormField,
        Method,
        MethodReport,
        apply_stack,
        check_stack,
        default_stack,
        method_named,
        method_of,
        parse_method_spec,
        register,
    )
    from vdtome.methods.recipe import Recipe, apply, load_recipe
    from vdtome.methods.tile_sparsity import TileSparsity
    from vdtome.tome import SUPPORTED_MODELS, ToMeConfig, ToMeHandle, ToMeStats, apply_tome, remove_tome
