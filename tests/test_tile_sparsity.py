"""Attention-tile sparsity: its math (vdtome.core.tile_sparsity: the gathered computation and the
FlexAttention block mask equal the masked dense reference for video-only, text-first and
video-first sequences, score only the kept tiles, grow linearly with the frame count); the method
on tiny instances of the real diffusers models (dense is the identity, a spy sees fewer keys,
outputs equal the masked reference, stacking on token merging); the per-layer search of both
methods and its bitwise check; refusals that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vdtome.core.tile_sparsity import (
    TileLayout,
    TilePattern,
    allowed_keys,
    flex_block_mask,
    flex_tile_attention,
    global_frame_ids,
    parse_pattern,
    place_video,
    query_groups,
    tile_sparse_attention,
)


def test_patterns_are_read_and_bad_ones_refused_with_the_rule():
    assert parse_pattern("dense") is None and parse_pattern(" Dense ") is None
    assert parse_pattern("1:7") == TilePattern(1, 7) and parse_pattern("4 : 4").frames == 8
    for bad in ("0:8", "half", "1:-2", "2.5:3", ""):
        with pytest.raises(ValueError, match="'dense' or G:P with G >= 1"):
            parse_pattern(bad)


def test_global_frames_are_the_first_or_evenly_spaced():
    assert global_frame_ids(8, 2) == (0, 1)
    assert global_frame_ids(8, 3, "spaced") == (0, 4, 7)
    assert global_frame_ids(8, 1, "spaced") == (0,)
    with pytest.raises(ValueError, match="9 global frames do not fit 8"):
        global_frame_ids(8, 9)
    with pytest.raises(ValueError, match="first or spaced"):
        global_frame_ids(8, 2, "random")


def test_a_global_frames_own_tile_is_one_of_the_global_ones():
    layout = TileLayout(frames=4, tokens_per_frame=1, video_start=0, length=4)
    allowed = allowed_keys(layout.frame_ids(), (0,))
    assert allowed.tolist() == [[True, False, False, False],  # frame 0 is global: 1 frame seen
                                [True, True, False, False],  # the others: the global one and their own
                                [True, False, True, False],
                                [True, False, False, True]]


# (name, text tokens before the video, text tokens after it, a key mask on the text)
LAYOUTS = [("video only (Wan)", 0, 0, False), ("text first (CogVideoX)", 5, 0, False),
           ("video first with a text mask (HunyuanVideo)", 0, 6, True)]
PATTERNS = [("1:3", "first"), ("2:2", "first"), ("2:2", "spaced"), ("4:0", "first")]


@pytest.mark.parametrize("name, before, after, masked", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
@pytest.mark.parametrize("pattern, placement", PATTERNS)
def test_gathered_attention_equals_the_masked_dense_reference(name, before, after, masked, pattern, placement):
    torch.manual_seed(0)
    frames, per_frame = 4, 6
    layout = TileLayout(frames, per_frame, video_start=before, length=before + frames * per_frame + after)
    q, k, v = (torch.randn(2, 3, layout.length, 8) for _ in range(3))
    user_mask = None
    if masked:  # the second sample's last two text tokens are padding: no query may attend them
        user_mask = torch.ones(2, 1, 1, layout.length, dtype=torch.bool)
        user_mask[1, ..., -2:] = False
    global_ids = global_frame_ids(frames, parse_pattern(pattern).global_frames, placement)
    allowed = allowed_keys(layout.frame_ids(), global_ids)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed if user_mask is None else allowed & user_mask)
    groups = query_groups(layout.frame_ids(), global_ids)
    sparse = tile_sparse_attention(q, k, v, groups, attn_mask=user_mask)
    assert torch.allclose(sparse, reference, rtol=0, atol=1e-6)
    assert groups.scored == int(allowed.sum())  # exactly the kept (query, key) pairs were scored
    flex = flex_tile_attention(q, k, v, flex_block_mask(layout.frame_ids(), global_ids, user_mask, batch=2))
    assert torch.allclose(flex, reference, rtol=0, atol=1e-5)  # the block-mask kernel computes the same
    if pattern == "4:0":  # every frame global: dense
        assert torch.allclose(sparse, F.scaled_dot_product_attention(q, k, v, attn_mask=user_mask), rtol=0, atol=1e-6)


def test_the_cost_grows_linearly_with_the_frame_count():
    def scored(frames: int) -> int:
        layout = TileLayout(frames, 16, 0, frames * 16)
        return query_groups(layout.frame_ids(), global_frame_ids(frames, 1)).scored

    tile = 16 * 16
    assert scored(8) == (2 * 8 - 1) * tile  # the global frame's own tile, and two tiles for each other frame
    assert scored(16) - scored(8) == 8 * 2 * tile  # each frame more adds two tiles: linear, where dense is T^2


def test_merged_tokens_keep_their_frame_and_the_pattern_still_holds():
    """After token merging a frame's kept tokens are fewer and need not be contiguous; each carries
    its destination's frame, and the gathered computation still equals the masked reference."""
    torch.manual_seed(1)
    kept_positions = torch.tensor([0, 2, 3, 5, 6, 7, 9, 12, 13, 14, 17, 19])  # of 4 frames x 5 tokens
    frames = place_video(kept_positions // 5, length=3 + kept_positions.numel(), video_start=3)  # text first
    q, k, v = (torch.randn(2, 2, frames.numel(), 4) for _ in range(3))
    allowed = allowed_keys(frames, (0,))
    groups = query_groups(frames, (0,))
    assert groups.scored == int(allowed.sum()) < frames.numel() ** 2
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(tile_sparse_attention(q, k, v, groups), reference, rtol=0, atol=1e-6)


# ---- the method on tiny instances of the real diffusers models -------------------------------

@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every ``scaled_dot_product_attention`` call's (queries, keys): where attention really happens."""
    calls: list[tuple[int, int]] = []
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        calls.append((query.shape[-2], key.shape[-2]))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def _case(name: str):
    from test_tome_models import make_case

    return make_case(name)


# (case, latent frames, text tokens in the self-attention call, text after the video)
MODEL_LAYOUTS = {"wan": (3, 0, False), "cogvideox_rotary": (3, None, False), "hunyuan_video": (3, 6, True)}


@pytest.mark.parametrize("name", ["wan", "cogvideox_rotary", "ltx", "hunyuan_video", "mochi"])
def test_dense_is_bitwise_the_unpatched_model_and_removal_restores_it(name):
    from vdtome.methods import apply_stack
    from vdtome.methods.tile_sparsity import TileSparsity

    case = _case(name)
    baseline = case.run()
    with apply_stack(case.model, (TileSparsity(pattern="dense"),)) as stack:
        assert torch.equal(case.run(), baseline)
        report = stack.reports()[0]
    assert report.evidence[0].of > 0 and not report.acted  # it saw the calls and left them alone
    with apply_stack(case.model, (TileSparsity(pattern="1:2"),)):
        assert not torch.equal(case.run(), baseline)
    assert torch.equal(case.run(), baseline)


@pytest.mark.parametrize("name", list(MODEL_LAYOUTS))
@pytest.mark.parametrize("pattern, placement", [("1:2", "first"), ("2:1", "spaced")])
def test_outputs_equal_the_masked_dense_reference(name, pattern, placement, monkeypatch, sdpa_calls):
    """The patched model against the same model whose self-attention calls get the pattern as a
    dense boolean mask, built here from the model's own layout (text first for CogVideoX, after the
    video for HunyuanVideo, whose padding mask joins it); a spy sees fewer keys per call."""
    from vdtome.methods import apply_stack
    from vdtome.methods.tile_sparsity import TileSparsity

    case = _case(name)
    frames, text, text_after = MODEL_LAYOUTS[name]
    text = case.text_tokens if text is None else text
    per_frame = case.video_tokens // frames
    global_ids = global_frame_ids(frames, parse_pattern(pattern).global_frames, placement)
    length = case.video_tokens + text
    layout = TileLayout(frames, per_frame, 0 if text_after else text, length)
    allowed = allowed_keys(layout.frame_ids(), global_ids)
    sdpa = F.scaled_dot_product_attention

    def masked(query, key, value, attn_mask=None, *args, **kwargs):
        if query.shape[-2] == key.shape[-2] == length:
            attn_mask = allowed if attn_mask is None else attn_mask.bool() & allowed
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", masked)
        reference = case.run()
    sdpa_calls.clear()
    with apply_stack(case.model, (TileSparsity(pattern=pattern, placement=placement, kernel="gather"),)) as stack:
        sparse = case.run()
        evidence = stack.reports()[0].evidence
    assert torch.allclose(sparse, reference, rtol=0, atol=1e-5)
    self_attention = [keys for queries, keys in sdpa_calls if keys != length and queries <= length]
    assert self_attention and max(keys for keys in self_attention) < length  # every kernel call saw fewer keys
    assert evidence[0].count == evidence[0].of > 0
    assert evidence[1].count == evidence[1].of - int(allowed.sum()) * evidence[0].of


def test_a_pattern_that_does_not_fit_the_frames_is_refused_naming_the_field():
    from vdtome.core.validation import RequestError
    from vdtome.methods import apply_stack
    from vdtome.methods.tile_sparsity import TileSparsity

    case = _case("wan")  # 3 latent frames
    with apply_stack(case.model, (TileSparsity(pattern="1:7"),)):
        with pytest.raises(RequestError, match=r"1:7: G \+ P = 8, but this request has 3 latent frames") as error:
            case.run()
    assert error.value.field == "tile_sparsity_pattern"
    with pytest.raises(RequestError, match="'dense' or G:P") as error:
        TileSparsity(pattern="half")
    assert error.value.field == "tile_sparsity_pattern"
    baseline = _case("wan").run()
    assert torch.equal(case.run(), baseline)  # the failed call left the model as it was


def test_stacked_on_token_merging_each_kept_token_keeps_its_frame(monkeypatch):
    """ToMe merges the self-attention's tokens; tile sparsity then runs on the merged sequence with
    each kept token in its destination's frame: equal to ToMe alone with that mask applied densely
    (built here from the matching ToMe runs on), and both methods report acting. Per-sample
    matching is refused, naming the rule."""
    from vdtome.core.diffusers_compat import hook_registry
    from vdtome.core.validation import RequestError
    from vdtome.methods import apply_stack
    from vdtome.methods.tile_sparsity import TileSparsity
    from vdtome.tome import ToMeConfig

    case = _case("wan")  # video only: 3 latent frames
    per_frame = case.video_tokens // 3
    sdpa = F.scaled_dot_product_attention

    def masked(query, key, value, attn_mask=None, *args, **kwargs):
        merges = [hook.active_merge for module in case.model.modules() if (registry := hook_registry(module))
                  and (hook := registry.get_hook("vdtome_tome")) and hook.active_merge is not None]
        if merges and query.shape[-2] == key.shape[-2]:
            attn_mask = allowed_keys(place_video(merges[0].kept[0] // per_frame, query.shape[-2], 0), (0,))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    with apply_stack(case.model, (ToMeConfig(ratio=0.5),)), monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", masked)
        reference = case.run()
    with apply_stack(case.model, (ToMeConfig(ratio=0.5), TileSparsity(pattern="1:2"))) as stack:
        sparse = case.run()
        tome_report, tile_report = stack.reports()
    assert torch.allclose(sparse, reference, rtol=0, atol=1e-5)
    assert tome_report.acted and tile_report.acted
    merged_length = case.video_tokens // 2
    assert tile_report.detail["pairs_scored"] < tile_report.detail["pairs_dense"] == 2 * merged_length ** 2
    with pytest.raises(RequestError, match="shared matching only"):
        apply_stack(case.model, (ToMeConfig(ratio=0.5, matching="per_sample"), TileSparsity(pattern="1:2")))


@pytest.mark.parametrize("method, field, key", [("tile_sparsity", "schedule", "layers"),
                                                ("tome", "ratio_schedule", "ratios")])
def test_search_writes_a_schedule_that_reproduces_its_check_run_bitwise(tmp_path, method, field, key):
    """The search on a tiny preset picks per-layer settings within the threshold; loading the
    written file (as the CLI and the app do) and running the same request gives the very latents
    the search's check recorded, and they differ from the plain pipeline's."""
    from vdtome.core.presets import get_preset
    from vdtome.engine.pipelines import load_pipeline
    from vdtome.engine.request import ComparisonRequest, resolve
    from vdtome.engine.search import latents_digest, run_search
    from vdtome.methods import apply_stack, parse_method_spec

    preset = get_preset("tiny-wan")
    pipe = load_pipeline(preset, "cpu")
    out = tmp_path / "schedule.json"
    result = run_search("tiny-wan", method, 0.3, out, steps=2, pipe=pipe, prompts=["a red ball", "a blue cube"])
    schedule = json.loads(out.read_text())
    assert schedule["method"] == method and len(schedule[key]) == 2 == len(schedule["errors"])
    for entry, errors in zip(schedule[key], schedule["errors"]):  # each layer: the most saving within 0.3
        within = [name for name, error in errors.items() if error["mean"] <= 0.3]
        if method == "tome":
            assert entry == max((float(name) for name in within), default=0.0)
        else:
            assert entry == (min(within, key=lambda name: int(name.split(":")[0])) if within else "dense")
    assert any(entry not in ("dense", 0.0) for entry in schedule[key])  # the threshold let something through
    settings, _ = resolve(ComparisonRequest(preset="tiny-wan", prompt="a red ball", steps=2, snap=False), preset)
    with apply_stack(pipe, (parse_method_spec(f"{method}:{field}={out}", preset),)) as stack:
        assert latents_digest(pipe, settings, "a red ball") == result.schedule["check"]["latents_sha256"]
        assert stack.reports()[0].acted
    assert latents_digest(pipe, settings, "a red ball") != result.schedule["check"]["latents_sha256"]


def test_schedules_that_do_not_fit_are_refused_naming_the_field(tmp_path):
    from vdtome.core.validation import RequestError
    from vdtome.methods import apply_stack, parse_method_spec

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"method": "tome", "stride": [1, 2, 2], "ratios": [0.5]}))
    with pytest.raises(RequestError, match="not a tile_sparsity schedule") as error:
        parse_method_spec(f"tile_sparsity:schedule={wrong}")
    assert error.value.field == "tile_sparsity_schedule"
    with pytest.raises(RequestError, match="neither a shipped schedule"):
        parse_method_spec(f"tile_sparsity:schedule={tmp_path / 'missing.json'}")
    with pytest.raises(RequestError, match="searched at stride 1x2x2") as error:
        parse_method_spec(f"tome:ratio_schedule={wrong},stride_y=1")
    assert error.value.field == "ratio_schedule"
    case = _case("wan")  # 2 blocks
    with pytest.raises(RequestError, match="has 1 layers; WanTransformer3DModel has 2"):
        three = tmp_path / "three.json"
        three.write_text(json.dumps({"method": "tile_sparsity", "placement": "first", "layers": ["1:2"]}))
        apply_stack(case.model, (parse_method_spec(f"tile_sparsity:schedule={three}"),))
    with pytest.raises(RequestError, match="ratio schedule has 1 blocks; WanTransformer3DModel has 2") as error:
        apply_stack(case.model, (parse_method_spec(f"tome:ratio_schedule={wrong}"),))
    assert error.value.field == "ratio_schedule"


def test_text_fields_take_one_line_and_the_method_checks_it():
    """The pattern and the schedule are text fields (suggestions, any text): one printable line,
    then the method's own rule; the app, the API and the command line share the checks."""
    from vdtome.core.validation import RequestError
    from vdtome.methods import METHODS, parse_method_spec

    method = METHODS["tile_sparsity"]
    pattern = method.field_named("pattern")
    assert pattern.kind == "text" and pattern.parse(" 2:7 ") == "2:7" and "text, e.g. dense" in pattern.describe()
    for bad in ("1:2\n3", 7, "x" * 301):
        with pytest.raises(RequestError) as error:
            pattern.parse(bad)
        assert error.value.field == "tile_sparsity_pattern"
    assert parse_method_spec("tile_sparsity:pattern=2:7,placement=spaced").pattern == "2:7"
    with pytest.raises(RequestError, match="'dense' or G:P"):
        method.from_form({**method.form_defaults(), "tile_sparsity_pattern": "2-7"})


@pytest.mark.slow
def test_a_comparison_reports_the_pattern_and_a_misfit_is_refused_without_harm(tmp_path):
    """Through the engine: the result carries the method's evidence; a pattern that does not fit
    the request's latent frames is refused naming the field, before any timed call, and the same
    engine (its cached pipeline) then serves a request that fits."""
    from vdtome.core.validation import RequestError
    from vdtome.engine.engine import ComparisonEngine
    from vdtome.engine.request import ComparisonRequest
    from vdtome.methods.tile_sparsity import TileSparsity

    engine = ComparisonEngine(device="cpu", output_root=tmp_path / "outputs", noise_dir=tmp_path / "noise")
    request = dict(preset="tiny-wan", prompt="a boat", steps=3, rounds=2)  # 9 frames: 3 latent frames
    with pytest.raises(RequestError, match="this request has 3 latent frames; use G:P with G \\+ P = 3") as error:
        engine.run(ComparisonRequest(**request, methods=(TileSparsity(pattern="1:7"),)), out_dir=tmp_path / "bad")
    assert error.value.field == "tile_sparsity_pattern"
    result = engine.run(ComparisonRequest(**request, methods=(TileSparsity(pattern="1:2"),)), out_dir=tmp_path / "ok")
    assert result.ok, result.error
    (entry,) = json.loads(Path(result.files["json"]).read_text())["methods"]
    assert entry["method"] == "tile_sparsity" and entry["config"]["pattern"] == "1:2"
    calls, pairs = entry["report"]["evidence"]
    assert calls["count"] == calls["of"] > 0 and 0 < pairs["count"] < pairs["of"]
