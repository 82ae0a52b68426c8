"""The package's architecture, enforced: layers import only downwards, no module imports itself
back through others, the top level stays small, and the library imports without the app's stack."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vdtome"
# Lowest first: a module may import from its own layer and those before it, never after.
LAYERS = ("core", "tome", "methods", "measure", "offline", "engine", "bench", "web")
TOP = ("__init__", "__main__", "cli")  # the package's entry points, above every layer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every vdtome module ``path`` imports, at module level or inside a function."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "vdtome"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "vdtome":
                continue
            for alias in node.names:  # "from vdtome.offline import tiny" imports the module vdtome.offline.tiny
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                          else base)
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: {target for target in imports_of(path) if target != name} for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return LAYERS.index(part) if part in LAYERS else len(LAYERS)


def test_layers_import_only_downwards():
    upward = [f"{source} imports {target}" for source, targets in GRAPH.items() for target in targets
              if layer_of(target) > layer_of(source)]
    assert not upward, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    """Function-level imports count too: a cycle hidden inside a function is still a cycle."""
    cycles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_top_level_is_small_and_every_layer_is_a_package():
    top = sorted(path.name for path in PACKAGE.iterdir() if path.name != "__pycache__")
    assert len(top) <= 12, top
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").exists(), layer
    assert {path.stem for path in PACKAGE.glob("*.py")} == set(TOP)


LIBRARY_WITHOUT_THE_APP = """
import sys

BLOCKED = ("gradio", "altair", "matplotlib", "ray", "fastapi", "starlette", "pandas", "spaces")
for name in BLOCKED:  # as if not installed: importing raises ImportError, find_spec finds nothing
    sys.modules[name] = None

import torch
import vdtome
from vdtome.offline.tiny import tiny_wan_pipeline

pipe = tiny_wan_pipeline(seed=0)
model = pipe.transformer
hidden = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
text = torch.randn(2, 6, model.config.text_dim, generator=torch.Generator().manual_seed(1))
step = torch.tensor([500, 500])
forwards = {name: module.forward for name, module in model.named_modules()}
state = {name: value.clone() for name, value in model.state_dict().items()}
with torch.no_grad():
    before = model(hidden, step, text, return_dict=False)[0]
    handle = vdtome.apply_tome(pipe, vdtome.ToMeConfig(ratio=0.5))
    merged = model(hidden, step, text, return_dict=False)[0]
    assert handle.stats().effective_ratio > 0.4, handle.stats()
    handle.remove()
    after = model(hidden, step, text, return_dict=False)[0]
assert not torch.equal(before, merged), "merging changed nothing"
assert torch.equal(before, after), "not restored bit for bit"
assert {name: module.forward for name, module in model.named_modules()} == forwards
assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())
stack = vdtome.apply_stack(pipe, (vdtome.ToMeConfig(ratio=0.3), vdtome.parse_method_spec("first_block_cache")))
stack.remove()
import vdtome.engine.engine  # one comparison needs none of them either
loaded = sorted(name for name, module in sys.modules.items() if module is not None and name.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok")
"""


@pytest.mark.slow
def test_the_library_works_without_the_app_and_benchmark_dependencies():
    """``import vdtome``, token merging applied and removed (bitwise), a stack and the engine, with
    gradio, altair, matplotlib, ray (and FastAPI, pandas, spaces) unimportable."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(LIBRARY_WITHOUT_THE_APP)], capture_output=True,
                          text=True, cwd=PACKAGE.parent, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_private_diffusers_api_is_used_in_one_module_only():
    """Private diffusers names (``_helpers``, ``_MAG_CACHE_BLOCK_HOOK``, ``_diffusers_hook``...) appear
    in vdtome.core.diffusers_compat and nowhere else, and what it reads exists in this diffusers."""
    private = []
    for name, path in MODULES.items():
        if name == "vdtome.core.diffusers_compat":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
                if any(part.startswith("_") for part in node.module.split(".")) or any(
                        alias.name.startswith("_") for alias in node.names):
                    private.append(f"{name}: from {node.module} import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Constant) and node.value in ("_diffusers_hook", "_cache_config"):
                private.append(f"{name}: {node.value!r}")
            elif isinstance(node, ast.Attribute) and node.attr in ("_diffusers_hook", "_cache_config"):
                private.append(f"{name}: .{node.attr}")
    assert not private, "\n".join(private)

    from vdtome.core import diffusers_compat

    assert "WanTransformerBlock" in diffusers_compat.block_cache_classes()
    assert isinstance(diffusers_compat.mag_cache_block_hook_name(), str)
    assert diffusers_compat.active_attention_backend()
