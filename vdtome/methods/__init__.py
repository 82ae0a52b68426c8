"""Acceleration methods as plug-ins (see :mod:`vdtome.methods.base`), registered here, one line each.

A new method is one module under this package and one line in ``REGISTERED`` below; the engine, the
report, the app's form and the CLI read everything else from the registry. The module declares the
method without importing diffusers (listing methods stays fast); hooks that need diffusers go in a
runtime module it names with :class:`Deferred` (e.g. ``slicing_hooks``).
"""

import importlib

from vdtome.methods.base import Applied, CallPlan, Deferred, Evidence, FormField, Method, MethodReport, config_fields
from vdtome.methods.registry import (
    METHODS,
    add_override,
    config_from_overrides,
    default_stack,
    field_owner,
    method_named,
    method_of,
    method_overrides,
    method_spec,
    parse_method_spec,
    preset_form_defaults,
    register,
)
from vdtome.methods.stack import (AppliedStack, apply_stack, check_available, check_stack, prepare_stack, stack_label,
                                  steps_alike)

# The methods, in the order the form lists them: adding one is one line here.
REGISTERED = (
    "tome",
    "tile_sparsity",
    "first_block_cache",
    "pyramid_attention_broadcast",
    "faster_cache",
    "taylorseer_cache",
    "mag_cache",
    "sea_cache",
    "cache_dit",
    "slicing",
    "step_rehash",
    "vae_tiling",
    "layerwise_casting",
    "offload",
    "compile",
)
for _module in REGISTERED:
    register(importlib.import_module(f".{_module}", __name__).METHOD)

__all__ = ["METHODS", "Applied", "AppliedStack", "CallPlan", "Deferred", "Evidence", "FormField", "Method",
           "MethodReport", "add_override", "apply_stack", "check_available", "check_stack", "config_fields",
           "config_from_overrides", "default_stack", "field_owner", "method_named", "method_of",
           "method_overrides", "method_spec", "parse_method_spec", "preset_form_defaults", "prepare_stack", "register",
           "stack_label", "steps_alike"]
