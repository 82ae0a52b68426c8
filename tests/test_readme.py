"""The README's library snippets run as written and reproduce the app's figures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def library_blocks() -> list[str]:
    """The Python blocks of the README's "Using the library" section, in order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Using the library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_the_library_snippet_reproduces_the_apps_figures(capsys):
    comparison, own_pipeline, stack = library_blocks()[:3]
    assert "tests/test_readme.py" in README.read_text().split(own_pipeline)[0][-200:]  # the marked block
    app_side: dict = {}
    exec(compile(comparison, "README: one comparison", "exec"), app_side)
    library: dict = {}
    exec(compile(own_pipeline, "README: token merging on a pipeline", "exec"), library)
    result = app_side["result"]
    assert result.ok and result.settings.max_sequence_length == 16  # the preset's text length reached the call
    # The same video on both paths: the same PSNR to the last digit.
    assert library["psnr"] == pytest.approx(result.fidelity.psnr_mean, abs=1e-9)
    exec(compile(stack, "README: stacks", "exec"), library)
    printed = capsys.readouterr().out
    assert f"PSNR {result.fidelity.psnr_mean:.2f} dB" in printed and "effective ratio 0.50" in printed
    assert "first_block_cache" in printed and "tome" in printed


def test_the_readme_quotes_the_committed_example_results():
    """The examples' table is written from their result.json: no figure drifts from its source."""
    from scripts import readme_figures

    text = README.read_text(encoding="utf-8")
    assert readme_figures.render(text) == text, "README.md is out of date: run python -m scripts.readme_figures"
