"""torch.compile as a stack modifier: both sides compiled, a compile phase apart from the timed
rounds, dynamo's graphs, breaks and recompiles reported, refusals naming their field.

Compiled with dynamo's eager backend: its tracing, guards, graph breaks and recompiles are what
these tests check (inductor's code generation adds a minute per graph on this CPU and nothing to
them); the shipped matrix (benchmarks/compile_matrix.py) runs inductor.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from vdtome.core.denoisers import denoisers_of, pipeline_denoiser_types
from vdtome.core.presets import get_preset
from vdtome.core.validation import RequestError
from vdtome.engine.engine import ComparisonEngine
from vdtome.engine.report import metric_rows
from vdtome.engine.request import ComparisonRequest
from vdtome.methods import METHODS, apply_stack, check_available, check_stack
from vdtome.methods import compile_hooks
from vdtome.methods.compile import Compile
from vdtome.methods.first_block_cache import FirstBlockCache
from vdtome.methods.mag_cache import MagCache
from vdtome.methods.tile_sparsity import TileSparsity
from vdtome.tome import ToMeConfig
from vdtome.tome.hooks import is_registered

pytestmark = pytest.mark.slow  # compiled pipelines, whole comparisons

TRACE = Compile(backend="eager")  # dynamo without code generation
PROMPT = "a red fox runs through snow"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ComparisonEngine(device="cpu", output_root=tmp_path_factory.mktemp("outputs"), noise_dir=None)


def compare(engine, *methods, preset="tiny-wan", rounds=2):
    return engine.run(ComparisonRequest(preset=preset, prompt=PROMPT, methods=methods, rounds=rounds), write=False)


def test_tome_is_timed_over_the_compiled_baseline_with_compiling_kept_out_of_the_timed_rounds(engine, monkeypatch):
    """Both sides run the compiled denoiser (the baseline without token merging's hooks, the
    accelerated side with them); the compile phase compiles, the timed rounds compile nothing (a
    forward hook of the timing would run inside the compiled code: it compiled 14 times there); the
    second request finds every graph made and still reports the breaks; nothing is left on the model."""
    sides = []
    real_call = compile_hooks._call

    def spying_call(compiled, model, *args, **kwargs):
        sides.append("accelerated" if is_registered(model) else "baseline")
        return real_call(compiled, model, *args, **kwargs)

    monkeypatch.setattr(compile_hooks, "_call", spying_call)
    first = compare(engine, ToMeConfig(ratio=0.3), TRACE)
    assert first.ok, first.error
    assert {"baseline", "accelerated"} <= set(sides)
    report = first.compilation
    assert report.compile_phase.graphs > 0 and report.settled and report.phase_rounds >= 2
    assert report.timed.frames == 0 and report.timed.graphs == 0 and report.timing_problem() is None
    assert any("_matching_eager" in reason for reason, _ in report.graph_breaks.graph_breaks)
    saved = first.to_dict()["compilation"]
    assert saved["compiles_in_timed_rounds"] == 0 and saved["graph_breaks"] == report.graph_breaks.break_count > 0
    assert any(row[0] == "compile phase (untimed, both sides)" for row in metric_rows(first))
    assert [m.method for m in first.methods] == ["tome", "compile"] and all(m.report.acted for m in first.methods)

    second = compare(engine, ToMeConfig(ratio=0.3), TRACE)
    assert second.compilation.phase_rounds == 1 and second.compilation.compile_phase.graphs == 0
    assert second.compilation.graph_breaks.break_count == report.graph_breaks.break_count  # found when compiled
    pipe = engine.pipelines.get(get_preset("tiny-wan"), engine.device)
    assert all("_compiled_call_impl" not in vars(model) and not is_registered(model) for model in denoisers_of(pipe))


@pytest.mark.parametrize("config", [FirstBlockCache(threshold=0.2), MagCache(), TileSparsity(pattern="1:2")],
                         ids=lambda c: type(c).__name__)
def test_caches_and_tile_sparsity_compile_with_nothing_compiled_in_the_timed_rounds(engine, config):
    result = compare(engine, config, TRACE)
    assert result.ok, result.error
    assert result.compilation.settled and result.compilation.timed.frames == 0
    assert result.timing.denoising.ratio.no_claim is None or "compiled" not in result.timing.denoising.ratio.no_claim


def test_compiling_the_accelerated_side_only_leaves_the_baseline_eager(engine, monkeypatch):
    sides = []
    real_call = compile_hooks._call
    monkeypatch.setattr(compile_hooks, "_call", lambda compiled, model, *a, **k: (
        sides.append(is_registered(model)), real_call(compiled, model, *a, **k))[1])
    result = compare(engine, ToMeConfig(ratio=0.3), Compile(backend="eager", baseline=False))
    assert result.ok and sides and all(sides)  # every compiled call had token merging on
    assert result.compilation.compile_phase is not None and result.compilation.timed.frames == 0


def test_compile_is_removed_exactly_and_computes_what_eager_does():
    from vdtome.offline import tiny

    preset = get_preset("tiny-wan")
    pipe = tiny.build_tiny(preset)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(prompt=PROMPT, num_frames=preset.num_frames, height=preset.height, width=preset.width,
                    num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(0), output_type="latent").frames

    model = pipe.transformer
    eager = generate()  # the pipeline's first call adds diffusers' own hook registry to the model
    before = dict(vars(model))
    with apply_stack(pipe, [TRACE]) as stack:
        assert "_compiled_call_impl" in vars(model)
        compiled = generate()
        assert stack.reports()[0].evidence[0].count == 1
    assert vars(model).keys() == before.keys() and all(vars(model)[k] is v for k, v in before.items())
    assert torch.equal(compiled, eager) and torch.equal(generate(), eager)


def test_full_graph_refuses_a_method_that_breaks_the_graph_naming_it():
    with pytest.raises(RequestError, match="token merging.*breaks the compiled graph") as refused:
        check_stack((ToMeConfig(ratio=0.3), Compile(fullgraph=True)))
    assert refused.value.field == "use_compile"
    check_stack((ToMeConfig(ratio=0.3), Compile()))  # breaks allowed: compiled between them


def test_a_break_no_method_declared_is_refused_by_dynamo_naming_the_field(engine, monkeypatch):
    """Under full graph, a graph break the declarations did not foresee fails the compile phase as a
    refusal naming the compile field and the side, not a traceback."""
    monkeypatch.setitem(METHODS, "tome", dataclasses.replace(METHODS["tome"], graph_breaks=""))
    with pytest.raises(RequestError, match="accelerated side cannot be compiled") as refused:
        compare(engine, ToMeConfig(ratio=0.3), Compile(backend="eager", fullgraph=True))
    assert refused.value.field == "use_compile"
    assert compare(engine, ToMeConfig(ratio=0.3)).ok  # the pipeline still serves


def test_refusals_name_the_field(monkeypatch):
    with pytest.raises(RequestError, match="inductor's") as refused:
        Compile(backend="eager", mode="max-autotune-no-cudagraphs")
    assert refused.value.field == "compile_mode"
    from vdtome.offline import tiny

    pipe = tiny.build_tiny(get_preset("tiny-wan"))
    with pytest.raises(RequestError, match="CUDA graphs") as refused:
        apply_stack(pipe, [Compile(mode="reduce-overhead")])
    assert refused.value.field == "compile_mode" and "_compiled_call_impl" not in vars(pipe.transformer)
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    with pytest.raises(RequestError, match="ZeroGPU does not support torch.compile") as refused:
        check_available(check_stack([TRACE]), pipeline_denoiser_types(get_preset("tiny-wan").pipeline_class))
    assert refused.value.field == "use_compile"


def test_the_matrix_benchmark_writes_its_table(tmp_path):
    spec = importlib.util.spec_from_file_location("compile_matrix", Path(__file__).parents[1] / "benchmarks" /
                                                  "compile_matrix.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    assert matrix.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "matrix.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"none", "tome"} <= set(rows)
    cells = [cell.strip() for cell in rows["tome"].split("|")[1:-1]]
    assert cells[1][0].isdigit() and cells[2][0].isdigit()  # a speedup eager and compiled
    assert int(cells[3]) > 0 and cells[4] == "0"  # token merging's breaks; nothing compiled while timed


def test_a_tune_holds_compile_in_every_stack_and_never_draws_it_by_default():
    from vdtome.methods.tuning import search_space

    preset = get_preset("tiny-shapes-128")
    assert "compile" not in {part.method.name for part in search_space(preset).methods}
    space = search_space(preset, ["tome", "compile"])
    assert "compile" in space.required
    assert [part.fields for part in space.methods if part.method.name == "compile"] == [()]


def test_compile_on_both_sides_is_no_difference_between_them(engine):
    """A method that did nothing beside a compile on both sides leaves both sides computing the same:
    no speed verdict (the compile's own evidence is not the accelerated side's); compile alone, the same."""
    from vdtome.measure.stats import Verdict

    idle = compare(engine, FirstBlockCache(threshold=0.0), TRACE)  # never skips
    assert idle.timing.denoising.ratio.verdict is Verdict.DID_NOTHING
    assert "did nothing" in idle.timing.denoising.ratio.no_claim
    alone = compare(engine, TRACE)
    assert alone.timing.denoising.ratio.verdict is Verdict.DID_NOTHING
    assert "applied to both sides and nothing else" in alone.timing.denoising.ratio.no_claim


def test_evidence_is_counted_by_the_stack_that_ran_when_graphs_are_reused(engine):
    """Dynamo reuses the graphs of another stack with the same hooks (first block cache at another
    threshold); with torch's module-hook guards off (its default) the reused graph ran the earlier
    stack's evidence hooks: 16 of 32 attention calls were counted as skipped by a cache that never skips."""
    compare(engine, FirstBlockCache(threshold=0.2), TRACE)
    never = compare(engine, FirstBlockCache(threshold=0.0), TRACE)
    assert [item.count for item in never.methods[0].report.evidence] == [0, 0]
