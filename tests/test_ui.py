"""The app's form logic (vdtome.ui): what a user can type becomes a config or a clear refusal."""

import math

import pytest

from vdtome.compare import RequestError
from vdtome.merge import max_merge_ratio
from vdtome.presets import get_preset
from vdtome.ui import parse_ratios, preset_choice_label, preset_info, stride_ratio_cap, tome_config


@pytest.mark.parametrize("stride", [(1, 2, 2), (2, 2, 2), (1, 3, 3), (1, 1, 2), (4, 4, 4)])
def test_ratio_cap_never_exceeds_what_the_stride_can_merge(stride):
    cap = stride_ratio_cap(stride)
    grid = tuple(s * 4 for s in stride)  # divisible grid: the exact maximum is 1 - 1 / cells
    assert cap <= max_merge_ratio(grid, stride) < cap + 0.05
    assert math.isclose(cap * 20, round(cap * 20))  # on the slider's 0.05 grid


def test_form_values_become_the_config_they_name():
    config = tome_config(0.4, (2.0, 2.0, 2.0), "attnbin", "every other block",
                         ["cross-attention queries", "feed-forward"], 3.0, "per_sample", False, False)
    assert config.ratio == 0.4 and config.stride == (2, 2, 2) and config.strategy == "attnbin"
    assert config.blocks == "every_other" and config.reuse_steps == 3 and config.matching == "per_sample"
    assert (config.merge_self_attn, config.merge_cross_attn, config.merge_ffn) == (False, True, True)
    assert config.random_destinations is False and config.match_window is None
    default = tome_config(0.5, (1, 2, 2))
    assert default.merge_self_attn and not default.merge_ffn and default.match_window == (2, 4, 4)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0.8, (1, 2, 2)), "between 0 and 0.75 for stride (1, 2, 2)"),
        ((-0.1, (1, 2, 2)), "between 0 and 0.75"),
        ((float("nan"), (1, 2, 2)), "merge ratio must be a number"),
        ((0.5, (1, 1, 1)), "nothing can merge"),
        ((0.5, (1, 2, 5)), "stride x must be between 1 and 4"),
        ((0.5, (1, 2.5, 2)), "stride y must be a whole number"),
        ((0.5, (1, 2, 2), "random"), "strategy must be"),
        ((0.5, (1, 2, 2), "bipartite", "some blocks"), "blocks must be one of"),
        ((0.5, (1, 2, 2), "bipartite", "all blocks", []), "at least one merge target"),
        ((0.5, (1, 2, 2), "bipartite", "all blocks", ["values"]), "unknown merge target 'values'"),
        ((0.5, (1, 2, 2), "bipartite", "all blocks", ["self-attention"], 0), "matching reuse (steps) must be between 1"),
    ],
)
def test_bad_form_values_name_the_rule(args, message):
    with pytest.raises(RequestError) as error:
        tome_config(*args)
    assert message in str(error.value)


def test_sweep_ratios_are_parsed_sorted_and_bounded():
    assert parse_ratios("0.5, 0.1 0.3;.25", cap=0.75) == (0.1, 0.25, 0.3, 0.5)
    for text, message in [("", "empty"), ("0.2, abc", "'abc' is not a number"), ("0.9", "outside [0, 0.75]"),
                          (", ".join(str(i / 100) for i in range(9)), "at most 8"),
                          # What float() would take but nobody types as a ratio: refused, never reinterpreted.
                          ("1e-400", "'1e-400' is not a number written like 0.25"), ("nan", "'nan' is not a number"),
                          ("1_0", "'1_0' is not a number"), ("\u0660.\u0665", "is not a number"),
                          ("-0.1", "-0.1 is outside [0, 0.75]"),
                          ("0.1, 0.3, 0.1", "sweep ratio 0.1 is listed twice"), ("0.1 0.10", "(also as 0.1)")]:
        with pytest.raises(RequestError) as error:
            parse_ratios(text, cap=0.75)
        assert message in str(error.value)


def test_gpu_presets_are_marked_unavailable_without_a_gpu():
    real, tiny = get_preset("cogvideox-2b"), get_preset("tiny-wan")
    assert "unavailable" in preset_choice_label(real, has_gpu=False)
    assert "unavailable" not in preset_choice_label(real, has_gpu=True)
    assert "unavailable" not in preset_choice_label(tiny, has_gpu=False)
    info = preset_info(real, has_gpu=False)
    assert "no GPU" in info and real.hardware in info and "THUDM/CogVideoX-2b" in info


def test_preset_info_states_the_memory_and_the_default_timing_rounds():
    info = preset_info(get_preset("wan2.1-t2v-1.3b"), has_gpu=True)
    assert "~20 GB VRAM" in info and "no offload" in info and "Timing rounds by default: 1." in info
    assert "Timing rounds by default: 7." in preset_info(get_preset("tiny-wan"), has_gpu=False)
