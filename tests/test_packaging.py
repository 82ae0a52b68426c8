"""The package as users install it: pyproject's dependencies and extras, requirements.txt for the
Space kept in step with them, the data found wherever the package lives, a wheel that builds."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirements(path: Path) -> dict[str, str]:
    """name -> pinned version of a requirements file (comments and blank lines skipped)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name)] = version
    return pins


def lower_bounds(specs: list[str]) -> dict[str, str]:
    bounds = {}
    for spec in specs:
        if spec.startswith("vdtome["):
            continue  # an extra that includes another
        name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", spec).groups()
        bounds[normalise(name)] = version
    return bounds


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_requirements_txt_pins_exactly_the_library_and_the_apps_extras():
    """The Space installs requirements.txt: the library, the app, the benchmark and the peers
    extras, at the versions the suite ran with, which are pyproject's lower bounds."""
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    declared = lower_bounds(project["dependencies"]) | lower_bounds(extras["app"]) | lower_bounds(extras["bench"])
    assert requirements(ROOT / "requirements.txt") == declared | lower_bounds(extras["peers"])
    assert requirements(ROOT / "requirements-dev.txt") == lower_bounds(extras["dev"])
    assert {"vdtome[bench]", "vdtome[peers]"} <= set(extras["app"]) and "vdtome[app]" in extras["dev"]


def test_the_data_is_package_data():
    from vdtome.bench.sweep import SWEEPS_DIR
    from vdtome.core.presets import DATA_DIR, PRESETS_DIR, get_preset

    assert DATA_DIR == ROOT / "vdtome" / "data" and PRESETS_DIR == DATA_DIR / "presets"
    assert SWEEPS_DIR.is_dir() and (DATA_DIR / "api_parameters.json").is_file()
    assert Path(get_preset("tiny-shapes-128").local).is_relative_to(DATA_DIR / "models")
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["vdtome"] == ["data/**/*"]


@pytest.mark.slow
def test_the_wheel_builds_and_holds_the_data(tmp_path):
    """``pip wheel --no-deps .``: the package, every layer, the presets and the shipped weights."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("vdtome-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for layer in ("core", "tome", "methods", "measure", "offline", "engine", "bench", "web"):
        assert f"vdtome/{layer}/__init__.py" in names
    assert "vdtome/data/presets/models.json" in names and "vdtome/data/api_parameters.json" in names
    weights = [name for name in names if name.startswith("vdtome/data/models/") and name.endswith(".safetensors")]
    assert len(weights) == 6  # two shipped models: text encoder, transformer, VAE each
    assert not any(name.startswith(("tests/", "app.py", "scripts/")) for name in names)
