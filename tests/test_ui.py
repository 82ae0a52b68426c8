"""The app's form logic (vdtome.web.ui): what a user can type becomes a config or a clear refusal."""

import json
import math

import pytest

from vdtome.core.presets import get_preset
from vdtome.engine.request import RequestError
from vdtome.methods import METHODS, method_of
from vdtome.methods.tome import stride_ratio_cap
from vdtome.tome.merge import max_merge_ratio
from vdtome.web.ui import (
    API_PARAMETERS,
    PLOT_SPEEDUP,
    api_fields,
    appended_from,
    preset_choice_label,
    preset_info,
    stack_from_form,
    sweep_choices,
    sweep_stacks,
    sweep_suggestion,
)


@pytest.mark.parametrize("stride", [(1, 2, 2), (2, 2, 2), (1, 3, 3), (1, 1, 2), (4, 4, 4)])
def test_ratio_cap_never_exceeds_what_the_stride_can_merge(stride):
    cap = stride_ratio_cap(stride)
    grid = tuple(s * 4 for s in stride)  # divisible grid: the exact maximum is 1 - 1 / cells
    assert cap <= max_merge_ratio(grid, stride) < cap + 0.05
    assert math.isclose(cap * 20, round(cap * 20))  # on the slider's 0.05 grid


TOME = METHODS["tome"]
LEGACY_ORDER = ("preset", "prompt", "negative_prompt", "seed", "frames", "height", "width", "steps", "guidance", "rounds",
                "ratio", "stride_t", "stride_y", "stride_x", "strategy", "blocks", "targets", "reuse_steps", "matching",
                "random_destinations", "local_window", "custom_model")


def tome(**values):
    return TOME.from_form(values)


def test_form_values_become_the_config_they_name():
    config = tome(ratio=0.4, stride_t=2.0, stride_y=2.0, stride_x=2.0, strategy="attnbin", blocks="every other block",
                  targets=["cross-attention queries", "feed-forward"], reuse_steps=3.0, matching="per_sample",
                  random_destinations=False, local_window=False)
    assert config.ratio == 0.4 and config.stride == (2, 2, 2) and config.strategy == "attnbin"
    assert config.blocks == "every_other" and config.reuse_steps == 3 and config.matching == "per_sample"
    assert (config.merge_self_attn, config.merge_cross_attn, config.merge_ffn) == (False, True, True)
    assert config.random_destinations is False and config.match_window is None
    default = tome()
    assert default.merge_self_attn and not default.merge_ffn and default.match_window == (2, 4, 4)


@pytest.mark.parametrize(
    "values, field, message",
    [
        (dict(ratio=0.8), "ratio", "between 0 and 0.75 for stride (1, 2, 2)"),
        (dict(ratio=-0.1), "ratio", "merge ratio must be between 0 and 0.95"),
        (dict(ratio=float("nan")), "ratio", "merge ratio must be a number"),
        (dict(ratio=True), "ratio", "merge ratio must be a number"),
        (dict(stride_y=1, stride_x=1), "stride_x", "nothing can merge"),
        (dict(stride_x=10), "stride_x", "stride x must be between 1 and 9"),
        (dict(stride_y=2.5), "stride_y", "stride y must be a whole number"),
        (dict(strategy="random"), "strategy", "strategy must be one of"),
        (dict(blocks="some blocks"), "blocks", "blocks must be one of"),
        (dict(targets=[]), "targets", "at least one merge target"),
        (dict(targets=["values"]), "targets", "unknown merge targets 'values'"),
        (dict(targets="self-attention"), "targets", "must be a list of names"),
        (dict(reuse_steps=0), "reuse_steps", "reuse a matching for k steps must be between 1"),
        (dict(random_destinations="false"), "random_destinations", "must be true or false"),
    ],
)
def test_bad_form_values_name_the_field_and_the_rule(values, field, message):
    with pytest.raises(RequestError) as error:
        tome(**values)
    assert message in str(error.value) and error.value.field == field


def test_the_api_order_is_append_only():
    """Positional API calls written when token merging was the only method keep their meaning."""
    assert api_fields(sweep=False)[: len(LEGACY_ORDER)] == LEGACY_ORDER
    assert appended_from(sweep=False) == len(LEGACY_ORDER) and appended_from(sweep=True) == len(LEGACY_ORDER) + 1
    assert api_fields(sweep=True)[: len(LEGACY_ORDER) + 1] == (*LEGACY_ORDER, "ratios")
    assert api_fields(sweep=True)[len(LEGACY_ORDER) + 1: len(LEGACY_ORDER) + 3] == ("use_tome", "sweep_field")
    # Every name published keeps its place; the fields added since (a new method's switch and
    # fields, a new field of an older method) follow, in registration order.
    published = json.loads(API_PARAMETERS.read_text())["compare"]["parameters"]
    names = api_fields(sweep=False)
    assert list(names[:len(published)]) == published
    current = [name for m in METHODS.values() for name in (m.enable_field, *(f.name for f in m.fields))]
    assert list(names[len(published):]) == [name for name in current if name not in published]
    assert {"use_tile_sparsity", "tile_sparsity_pattern", "ratio_schedule"} <= set(names[len(published):])
    names = api_fields(sweep=True)
    assert len(names) == len(set(names))


def test_sweep_values_are_parsed_sorted_and_checked_by_the_method():
    stacks = sweep_stacks({"ratios": "0.5, 0.1 0.3;.25"})
    assert [stack[0].ratio for stack in stacks] == [0.1, 0.25, 0.3, 0.5]
    assert [s[0].reuse_steps for s in sweep_stacks({"ratios": "3, 1", "sweep_field": "reuse_steps"})] == [1, 3]
    for text, message in [("", "empty"), ("0.2, abc", "'abc' is not a number"),
                          ("0.9", "sweep value 0.9: merge ratio must be between 0 and 0.75"),
                          (", ".join(str(i / 100) for i in range(9)), "at most 8"),
                          # What float() would take but nobody types as a ratio: refused, never reinterpreted.
                          ("1e-400", "'1e-400' is not a number written like 0.25"), ("nan", "'nan' is not a number"),
                          ("1_0", "'1_0' is not a number"), ("\u0660.\u0665", "is not a number"),
                          ("-0.1", "sweep value -0.1: merge ratio must be between 0"),
                          ("0.1, 0.3, 0.1", "0.1 is listed twice"), ("0.1 0.10", "(also as 0.1)")]:
        with pytest.raises(RequestError) as error:
            sweep_stacks({"ratios": text})
        assert message in str(error.value) and error.value.field == "ratios"
    with pytest.raises(RequestError, match="sweep field must be a sweepable field") as error:
        sweep_stacks({"ratios": "1, 2", "sweep_field": "stride_t"})
    assert error.value.field == "sweep_field"
    with pytest.raises(RequestError, match="which is switched off"):
        sweep_stacks({"ratios": "0.1", "use_tome": False})


def test_a_form_with_every_method_off_is_refused_naming_the_switch():
    with pytest.raises(RequestError, match="switch on at least one method") as error:
        stack_from_form({"use_tome": False})
    assert error.value.field == "use_tome"
    assert stack_from_form({}) == (tome(),)  # token merging is on by default


def test_gpu_presets_are_marked_unavailable_without_a_gpu():
    real, tiny = get_preset("cogvideox-2b"), get_preset("tiny-wan")
    assert "unavailable" in preset_choice_label(real, has_gpu=False)
    assert "unavailable" not in preset_choice_label(real, has_gpu=True)
    assert "unavailable" not in preset_choice_label(tiny, has_gpu=False)
    info = preset_info(real, has_gpu=False)
    assert "no GPU" in info and real.hardware in info and "THUDM/CogVideoX-2b" in info


def test_preset_info_states_the_memory_and_the_default_timing_rounds():
    info = preset_info(get_preset("wan2.1-t2v-1.3b"), has_gpu=True)
    assert "est. ~22 GB as loaded" in info and "estimated by `python -m vdtome plan`" in info
    assert "Timing rounds by default: 7 (after the first, 3 steps each" in info
    assert "Timing rounds by default: 7." in preset_info(get_preset("tiny-wan"), has_gpu=False)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_form_declares_its_config_defaults(name):
    """The form's defaults are the config's own: nothing drifts between the page, the API and the library."""
    method = METHODS[name]
    assert method.from_form({}) == method.config_type()
    assert all(f.name.startswith(f"{name}_") for f in method.fields) or name == "tome"  # names never clash


def test_the_sweep_box_suggests_values_each_sweepable_field_accepts():
    for _, name in sweep_choices():
        owner = next(m for m in METHODS.values() if name in {f.name for f in m.fields})
        values = {"use_tome": owner.name == "tome", owner.enable_field: True, "sweep_field": name,
                  "ratios": sweep_suggestion(name)}
        stacks = sweep_stacks(values)
        assert len(stacks) == 4 and all(method_of(stack[0]) is owner for stack in stacks), name


def test_a_shared_link_restores_the_form_and_names_what_it_cannot_use():
    from urllib.parse import parse_qsl

    from vdtome.web.ui import settings_from_query, settings_query

    form = {"preset": "tiny-wan", "prompt": "a fox & a hen", "negative_prompt": "", "seed": 3, "frames": 9,
            "height": 64, "width": 64, "steps": 4, "guidance": 5.0, "rounds": 7, "ratio": 0.3, "use_tome": True,
            "targets": ["self-attention", "feed-forward"], "use_first_block_cache": True}
    query = settings_query(form)
    assert "use_tome" not in query  # a default travels only implicitly
    values, problems = settings_from_query(dict(parse_qsl(query[1:])))
    assert problems == []
    assert values == {k: v for k, v in form.items() if k not in ("negative_prompt", "use_tome")}
    values, problems = settings_from_query({"frames": "nine", "ratio": "2", "bogus": "1"})
    assert values == {} and len(problems) == 3
    assert any(p.startswith("frames: must be a plain decimal number") for p in problems)
    assert any(p.startswith("ratio: merge ratio must be between") for p in problems)


def test_history_chart_draws_intervals_one_line_per_sweep_a_1x_rule_and_untested_points_apart():
    from vdtome.web.page import history_chart, history_points

    def record(run, psnr, speedup, series=None, ratio="0.5", verdict="faster", low=0.9, high=1.1):
        point = {"run": run, "PSNR vs baseline (dB)": psnr, PLOT_SPEEDUP: speedup, "interval": f"{low}-{high}",
                 "verdict": verdict, "methods": f"tome ratio {ratio}", "model": "tiny-wan", "low": low, "high": high}
        return {"row": [run], "point": point, "settings": {"tome.ratio": ratio, "seed": "0"}, "series": series}

    history = [record(1, 100.0, 1.3, ratio="0", verdict="did nothing"), record(2, 40.0, 1.3, low=1.2, high=1.4),
               record(3, 45.0, 1.2, verdict="not tested", low=None, high=None),
               *(record(4 + i, 50.0 - 5 * i, 1.1 + 0.1 * i, "sweep from run 4", r, "no significant difference")
                 for i, r in enumerate("123"))]
    points = history_points(history)
    assert list(points["anchor"]) == [True, False, False, False, False, False]
    assert list(points["tested"]) == [False, True, False, True, True, True]
    assert list(points["claim"][:3]) == ["did nothing (no claim)", "faster (interval above 1)",
                                         "not tested (too few rounds)"]  # words in the legend, never true/false
    assert points["what differs"][0] == "tome.ratio=0" and set(points["series"]) == {"single runs", "sweep from run 4"}
    spec = history_chart(history).to_dict()
    layers = spec["layer"]
    marks = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in layers]
    assert marks[:6] == ["rule", "rule", "rule", "line", "point", "point"] and "text" in marks
    assert spec["datasets"][layers[0]["data"]["name"]] == [{PLOT_SPEEDUP: 1.0}]  # the 1x line
    # every point's interval is a bar from low to high; tested points filled, the others open and grey
    assert layers[1]["encoding"]["y"]["field"] == "low" and layers[1]["encoding"]["y2"]["field"] == "high"
    assert layers[4]["mark"]["filled"] is True and layers[5]["mark"]["filled"] is False
    assert layers[5]["mark"]["color"] == "#64748b" and "color" not in layers[5]["encoding"]
    # fits a phone: the container's width, legends below the plot
    assert spec["width"] == "container" and spec["config"]["legend"]["orient"] == "bottom"
    assert history_chart([]) is None


