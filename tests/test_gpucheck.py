"""``python -m vdtome gpucheck``: its tiny CPU version runs the same code path as the GPU check.

One tiny run (seconds) writes the JSON and the table; the checks read them. Speed is never asserted:
only that every model x method row is there, token merging merged tokens, and every time is positive.
"""

from __future__ import annotations

import json

import pytest

from vdtome.bench import gpucheck
from vdtome.cli import build_parser
from vdtome.core.validation import RequestError
from vdtome.methods.pyramid_attention_broadcast import PyramidAttentionBroadcast
from vdtome.tome import ToMeConfig

METHODS = ("tome", "first_block_cache", "tome+first_block_cache")


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck")
    check = gpucheck.run_gpucheck(out, tiny=True, device="cpu", steps=3, rounds=2, warmup_steps=2,
                                  log=lambda text: None)
    return check, out


def test_writes_json_and_table_with_every_model_and_method(tiny_check):
    check, out = tiny_check
    data = json.loads((out / "gpucheck.json").read_text())
    assert data["tiny"] and data["ok"]
    assert data["environment"]["versions"]["torch"] and data["environment"]["versions"]["diffusers"]
    assert "unavailable" in data["nvml"]  # no GPU here: said, not crashed
    assert [model["name"] for model in data["models"]] == list(gpucheck.MODELS)
    for model in data["models"]:
        assert model["error"] is None
        assert [row["method"] for row in model["rows"]] == list(METHODS)
    assert [model["tokens_per_block"]["video"] for model in data["models"]] == [3 * 8 * 8, 3 * 8 * 9]
    table = (out / "gpucheck.md").read_text()
    assert table == check.table()
    for model in gpucheck.MODELS:
        for method in METHODS:
            assert f"| {model} | {method} |" in table


def test_token_merging_rows_show_fewer_tokens_and_timings_are_positive(tiny_check):
    _, out = tiny_check
    for model in json.loads((out / "gpucheck.json").read_text())["models"]:
        for row in model["rows"]:
            for side in ("baseline", "accelerated"):
                assert len(row[side]["loop_ms"]) == 2 and all(ms > 0 for ms in row[side]["loop_ms"])
                assert row[side]["step_ms_median"] > 0
            assert row["speedup"] > 0 and len(row["speedup_per_round"]) == 2
            assert row["relative_l2"] is not None and row["relative_l2"] >= 0
            if row["method"].startswith("tome"):
                assert row["tokens_out"] < row["tokens_in"]
                merged = [item for item in row["evidence"] if item["method"] == "tome"]
                assert merged and merged[0]["count"] > 0 and row["acted"]


def test_real_sizes_are_the_released_models_at_real_token_counts():
    wan, cogvideox = gpucheck.wan_spec(), gpucheck.cogvideox_spec()
    assert wan.video_tokens == 21 * 30 * 52 == 32_760 and wan.text_tokens == 512
    assert wan.config["num_layers"] == 30 and wan.config["ffn_dim"] == 8960
    assert cogvideox.video_tokens == 13 * 30 * 45 == 17_550 and cogvideox.text_tokens == 226
    assert cogvideox.config["num_attention_heads"] * cogvideox.config["attention_head_dim"] == 1920


def test_cli_registers_the_subcommand_and_a_refused_stack_fails_before_building():
    args = build_parser().parse_args(["gpucheck", "--out", "x", "--models", "wan", "--rounds", "3"])
    assert args.command == "gpucheck" and args.rounds == 3 and args.models == "wan"
    with pytest.raises(RequestError):
        gpucheck.run_gpucheck("unused", tiny=True, device="cpu",
                              methods=[ToMeConfig(), PyramidAttentionBroadcast()])
