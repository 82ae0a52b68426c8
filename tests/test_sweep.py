"""Sweep files: grids expanded over any method's fields, every value checked, errors that name the place."""

import pytest

from vdtome.bench.sweep import axis_label, load_sweep, parse_sweep, shipped_sweeps
from vdtome.core.validation import RequestError
from vdtome.methods.first_block_cache import FirstBlockCache
from vdtome.tome import ToMeConfig


def test_grids_expand_in_order_and_stack():
    sweep = parse_sweep("""
stacks:
  - tome: {ratio: [0.25, 0.5], stride_y: [1, 2]}
  - first_block_cache: {threshold: 0.2}
  - tome: {ratio: 0.5}
    first_block_cache: {threshold: [0.1, 0.2]}
""")
    labels = [s.label for s in sweep.settings]
    assert len(labels) == 4 + 1 + 2
    assert labels[0] == "tome ratio 0.25 stride 1x1x2" and labels[3] == "tome ratio 0.5 stride 1x2x2"
    first, second = sweep.settings[-1].configs
    assert isinstance(first, ToMeConfig) and first.ratio == 0.5
    assert isinstance(second, FirstBlockCache) and second.threshold == 0.2
    # Unprefixed names are the method's own fields; values keep their form field names.
    assert dict(sweep.settings[-1].values) == {"ratio": 0.5, "first_block_cache_threshold": 0.2}
    assert sweep.swept == ("ratio", "stride_y", "first_block_cache_threshold")
    assert len({s.key for s in sweep.settings}) == len(sweep.settings)


def test_list_of_grids_is_a_union_and_fields_that_move_together_are_one_axis():
    sweep = load_sweep("video-tome-study")
    assert len(sweep.settings) == 24
    strides = {s.configs[0].stride for s in sweep.settings}
    assert strides == {(1, 3, 3), (2, 3, 3), (4, 6, 9)}
    assert {s.configs[0].strategy for s in sweep.settings} == {"bipartite", "attnbin"}
    assert {s.configs[0].blocks for s in sweep.settings} == {"all", "every_other"}
    assert sweep.axes == (("ratio",), ("strategy",), ("blocks",), ("stride_t", "stride_y", "stride_x"))
    assert axis_label(sweep.axes[-1]) == "Stride t / Stride y / Stride x"
    assert sweep.axis_value(sweep.settings[-1], sweep.axes[-1]) == "4/6/9"


def test_shipped_sweeps():
    assert set(shipped_sweeps()) >= {"smoke", "video-tome-study", "tome-sd-ratios"}
    ratios = [s.configs[0].ratio for s in load_sweep("tome-sd-ratios").settings]
    assert ratios == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    smoke = load_sweep("smoke")
    assert dict(smoke.request) == {"rounds": 3}
    assert [len(s.configs) for s in smoke.settings] == [1, 1, 1, 2]


def test_list_valued_fields_take_plus_joined_items():
    sweep = parse_sweep("stacks: [{tome: {targets: [self-attention, self-attention+feed-forward]}}]")
    assert [s.configs[0].merge_ffn for s in sweep.settings] == [False, True]
    assert sweep.settings[1].configs[0].merge_self_attn


@pytest.mark.parametrize("text, words", [
    ("stacks: [{tome: {ratio: [0.5, 0.9]}}]", ["mine.yaml, stack 1, tome", "merge ratio", "0.75"]),
    ("stacks: [{tome: {speed: 2}}]", ["stack 1, tome", "no field 'speed'", "ratio"]),
    ("stacks: [{tome: {}}, {nope: {}}]", ["stack 2", "unknown method 'nope'"]),
    ("stacks: [{tome: {ratio: 0.5}}, {tome: {ratio: 0.5}}]", ["stack 2", "same configuration as an earlier"]),
    ("stacks: [{tome: {strategy: attnbin, local_window: [true, false]}}]", ["local_window False", "changes nothing"]),
    ("stacks:\n- tome: {ratio: 0.5}\n  tome: {ratio: 0.3}\n", ["'tome' is given twice", "line 3"]),
    ("name: a\nname: b\nstacks: [{tome: {}}]", ["'name' is given twice"]),
    ("stacks: [{pyramid_attention_broadcast: {}, tome: {ratio: 0.5}}]", ["stack 1", "token merging"]),
    ("stacks: [{first_block_cache: {}, mag_cache: {}}]", ["stack 1", "diffusers"]),
    ("stacks: [{tome: {ratio: []}}]", ["ratio has an empty list"]),
    ("stacks: []", ["non-empty list"]),
    ("stacks: [{tome: {ratio: 0.5}}]\nrequest: {colour: red}", ["request takes", "'colour'"]),
    ("stacks: [{tome: {ratio: 0.5}}]\nextra: 1", ["unknown key 'extra'"]),
    ("stacks: [{tome: {ratio: 0.5}", ["not valid YAML"]),
    ("stacks: [{tome: {blocks: some}}]", ["blocks", "all blocks"]),
])
def test_errors_name_the_place_and_the_rule(text, words):
    with pytest.raises(RequestError) as caught:
        parse_sweep(text, origin="mine.yaml")
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_unknown_sweep_file_names_the_shipped_ones(tmp_path):
    with pytest.raises(RequestError, match="shipped sweeps: .*smoke"):
        load_sweep(tmp_path / "absent.yaml")


def test_settings_with_one_label_are_named_apart_and_anchors_merge():
    sweep = parse_sweep("""
x-base: &base {ratio: 0.3, stride_y: 1}
stacks:
  - tome: {ratio: 0.5, matching: [shared, per_sample]}
  - tome: {<<: *base, ratio: 0.25}
""")
    assert [s.label for s in sweep.settings] == ["tome ratio 0.5 stride 1x2x2 (matching shared)",
                                                 "tome ratio 0.5 stride 1x2x2 (matching per_sample)",
                                                 "tome ratio 0.25 stride 1x1x2"]  # the anchor's ratio overridden
