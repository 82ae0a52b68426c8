"""vdtome.core.presets: model presets and prompt sets from vdtome/data/presets/ (no network, nothing downloaded)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import diffusers
import pytest
import torch

from vdtome.core.denoisers import PIPELINE_DENOISERS, DenoiserType, declared_denoiser_types, pipeline_denoiser_types
from vdtome.core.presets import (
    PRESETS_DIR,
    Constraints,
    ModelPreset,
    PresetError,
    UnknownPresetError,
    get_preset,
    load_presets,
    load_prompts,
    prompt_sets,
)
from vdtome.offline import tiny

EXPECTED = {
    "tiny-shapes-128",
    "tiny-shapes",
    "tiny-wan",
    "tiny-cogvideox",
    "tiny-ltx",
    "cogvideox-2b",
    "cogvideox-5b",
    "wan2.1-t2v-1.3b",
    "ltx-video",
    "hunyuanvideo",
    "animatediff",
}
HUB_IDS = {
    "cogvideox-2b": "THUDM/CogVideoX-2b",
    "cogvideox-5b": "THUDM/CogVideoX-5b",
    "wan2.1-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "ltx-video": "Lightricks/LTX-Video",
    "hunyuanvideo": "hunyuanvideo-community/HunyuanVideo",
}


@pytest.fixture(scope="module")
def presets():
    return load_presets()


def test_all_presets_load(presets):
    assert EXPECTED <= set(presets)
    for name, preset in presets.items():
        assert isinstance(preset, ModelPreset) and preset.name == name
        assert preset.label and preset.hardware
        assert preset.dtype in {"float32", "float16", "bfloat16"}
        assert not preset.constraints.check(preset.num_frames, preset.height, preset.width), name
        json.dumps(preset.to_dict())


def test_pipeline_classes_exist_in_diffusers(presets):
    for preset in presets.values():
        assert isinstance(getattr(diffusers, preset.pipeline_class), type), preset.pipeline_class


def test_the_denoiser_table_says_what_diffusers_declares(presets):
    """``methods`` and the form read each preset's denoiser types from a table, without importing
    diffusers: the table must name every shipped preset's pipeline class and agree with diffusers."""
    assert {preset.pipeline_class for preset in presets.values()} <= set(PIPELINE_DENOISERS)
    for pipeline_class, listed in PIPELINE_DENOISERS.items():
        assert declared_denoiser_types(pipeline_class) == listed, pipeline_class
    mochi = declared_denoiser_types("MochiPipeline")  # a class the table leaves out is read from diffusers
    assert "MochiPipeline" not in PIPELINE_DENOISERS and pipeline_denoiser_types("MochiPipeline") == mochi
    assert mochi == (DenoiserType("MochiTransformer3DModel", enable_cache=True, block_cache=True),)


def test_tiny_presets_name_real_builders(presets):
    tiny_presets = [p for p in presets.values() if p.is_builtin]
    assert {"tiny-wan", "tiny-cogvideox", "tiny-ltx"} <= {p.name for p in tiny_presets}
    for preset in tiny_presets:
        assert callable(getattr(tiny, preset.builtin)), preset.builtin
        assert preset.builtin in tiny.__all__
        assert preset.hub_id is None and not preset.requires_gpu
        assert "random weights, built in code" in preset.label


def test_tiny_preset_builds_the_declared_pipeline_class(presets):
    preset = presets["tiny-cogvideox-rotary"]
    pipe = tiny.build_tiny(preset)
    assert type(pipe).__name__ == preset.pipeline_class
    assert pipe.transformer.config.use_rotary_positional_embeddings
    with pytest.raises(ValueError, match="hub"):
        tiny.build_tiny(presets["cogvideox-2b"])


def test_hub_presets(presets):
    hub = [p for p in presets.values() if p.hub_id]
    for preset in hub:
        assert preset.hub_id and "/" in preset.hub_id and preset.builtin is None
        assert preset.requires_gpu
        assert "GB" in preset.hardware
    for name, hub_id in HUB_IDS.items():
        assert presets[name].hub_id == hub_id
    animatediff = presets["animatediff"]
    assert animatediff.motion_adapter == "guoyww/animatediff-motion-adapter-v1-5-2"
    assert animatediff.hub_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert animatediff.source["motion_adapter"] == animatediff.motion_adapter


def test_model_specific_facts(presets):
    assert presets["cogvideox-2b"].dtype == "float16"
    assert presets["cogvideox-5b"].dtype == "bfloat16"
    assert presets["animatediff"].dtype == "float16"
    for name in ("wan2.1-t2v-1.3b", "hunyuanvideo", "ltx-video"):
        assert presets[name].dtype == "bfloat16"
    rules = {name: presets[name].constraints.frames_rule for name in presets}
    assert rules["wan2.1-t2v-1.3b"] == rules["hunyuanvideo"] == rules["tiny-wan"] == "4k+1"
    assert rules["cogvideox-2b"] == rules["ltx-video"] == rules["tiny-cogvideox"] == "8k+1"
    assert presets["cogvideox-2b"].num_frames == 49
    assert (presets["cogvideox-2b"].height, presets["cogvideox-2b"].width) == (480, 720)
    assert presets["ltx-video"].constraints.side_multiple == 32
    assert presets["animatediff"].constraints.side_multiple == 8
    assert presets["tiny-cogvideox"].extras["max_sequence_length"] == 226


def test_tiny_input_rules_are_stated_once(presets):
    """models.json's constraints are the only statement of the tiny pipelines' input rules:
    vdtome.offline.tiny names the presets and the facts the rules follow from, never the rules themselves
    (tests/test_tiny.py checks the rules against the built pipelines)."""
    named = {name: key for key, spec in tiny.TINY_CONSTRAINTS.items() for name in spec.get("presets", ())}
    assert set(named) == {p.name for p in presets.values() if p.is_builtin}
    rule_keys = {"frames", "side_multiple", *Constraints.__dataclass_fields__}
    for name, key in named.items():
        spec = tiny.TINY_CONSTRAINTS[key]
        assert not rule_keys & set(spec), f"TINY_CONSTRAINTS[{key!r}] restates a rule of {name}"
        call = spec["call"]  # the builders' known-good call is allowed by the preset
        assert not presets[name].constraints.check(call["num_frames"], call["height"], call["width"]), name


def test_snap_wan(presets):
    wan = presets["wan2.1-t2v-1.3b"].constraints
    frames, height, width, notes = wan.snap(18, 480, 832)
    assert (frames, height, width) == (17, 480, 832)
    assert notes == ["frames 18 -> 17 (frames must be 4k+1)"]

    tiny_wan = presets["tiny-wan"].constraints
    frames, height, width, notes = tiny_wan.snap(18, 70, 64)
    assert (frames, height, width) == (17, 64, 64)
    assert len(notes) == 2 and "multiple of 16" in notes[1] and notes[1].startswith("height 70 -> 64")

    assert tiny_wan.snap(9, 64, 64) == (9, 64, 64, [])
    assert wan.snap(200, 4000, 16)[:3] == (81, 832, 256)  # clamped into [min, max]
    assert wan.snap(19, 480, 480)[0] == 17  # tie between 17 and 21 goes to the smaller


def test_snap_results_are_valid_for_every_preset(presets):
    for preset in presets.values():
        c = preset.constraints
        for frames in (1, 2, 18, 50, 97, 1000):
            for side in (1, 70, 333, 5000):
                f, h, w, _ = c.snap(frames, side, side)
                assert c.check(f, h, w) == [], (preset.name, frames, side)


def test_check_messages_name_the_rule(presets):
    wan = presets["wan2.1-t2v-1.3b"].constraints
    assert wan.check(17, 480, 832) == []
    problems = wan.check(18, 470, 832)
    assert "frames must be 4k+1 (got 18; nearest valid 17)" in problems
    assert "height must be a multiple of 16 (got 470; nearest valid 464)" in problems
    assert any("at most 81" in p for p in wan.check(85, 480, 832))
    assert any("width must be at least 256" in p for p in wan.check(17, 480, 128))


def test_constraints_any_frames():
    c = Constraints(frames_multiple=1, frames_offset=0, min_frames=8, max_frames=32, side_multiple=8, min_side=256, max_side=768)
    assert c.frames_rule == "any"
    assert c.snap(5, 512, 515)[:3] == (8, 512, 512)
    assert c.describe() == "frames any in [8, 32]; sides multiple of 8 in [256, 768]"


def test_unknown_preset_lists_names(presets):
    with pytest.raises(ValueError) as info:
        get_preset("no-such-model", presets)
    message = str(info.value)
    assert "no-such-model" in message and "tiny-wan" in message and "cogvideox-2b" in message
    with pytest.raises(KeyError):
        get_preset("no-such-model")
    assert isinstance(info.value, UnknownPresetError)
    assert get_preset("tiny-wan").name == "tiny-wan"


def test_prompts():
    prompts = load_prompts()
    assert len(prompts) >= 30
    assert len(set(prompts)) == len(prompts)
    for prompt in prompts:
        assert prompt and not prompt.startswith("#")
        assert 10 <= len(prompt.split()) <= 30, prompt
    assert "default" in prompt_sets()
    with pytest.raises(ValueError, match="default"):
        load_prompts("no-such-set")
    with pytest.raises(ValueError):
        load_prompts("../models")


def test_prompt_file_skips_comments_and_blanks(tmp_path):
    (tmp_path / "mini.txt").write_text("# header\n\n  first prompt  \n#second\nthird prompt\n", encoding="utf-8")
    assert load_prompts("mini", tmp_path) == ["first prompt", "third prompt"]


def _write(tmp_path, presets):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"presets": presets}), encoding="utf-8")
    return path


def _valid_entry():
    raw = json.loads((PRESETS_DIR / "models.json").read_text(encoding="utf-8"))
    return next(p for p in raw["presets"] if p["name"] == "tiny-wan")


def test_validation_errors_name_file_and_field(tmp_path):
    entry = _valid_entry()
    assert "tiny-wan" in load_presets(_write(tmp_path, [entry]))

    bad = json.loads(json.dumps(entry))
    bad["constraints"]["side_multiple"] = "16"
    with pytest.raises(PresetError) as info:
        load_presets(_write(tmp_path, [bad]))
    assert "models.json" in str(info.value) and "constraints.side_multiple" in str(info.value)
    assert "(tiny-wan)" in str(info.value)

    bad = json.loads(json.dumps(entry))
    del bad["label"]
    with pytest.raises(PresetError, match=r"presets\[0\] \(tiny-wan\)\.label: missing required field"):
        load_presets(_write(tmp_path, [bad]))

    bad = json.loads(json.dumps(entry))
    bad["defaults"]["num_frames"] = 10
    with pytest.raises(PresetError, match=r"defaults.*frames must be 4k\+1"):
        load_presets(_write(tmp_path, [bad]))

    bad = json.loads(json.dumps(entry))
    bad["source"] = {"builtin": "tiny_wan_pipeline", "hub_id": "a/b"}
    with pytest.raises(PresetError, match="exactly one of"):
        load_presets(_write(tmp_path, [bad]))

    bad = json.loads(json.dumps(entry))
    bad["source"] = {"local": "/etc/models"}
    with pytest.raises(PresetError, match="local: must be a folder relative to the presets file"):
        load_presets(_write(tmp_path, [bad]))

    bad = json.loads(json.dumps(entry))
    bad["dtype"] = "float8"
    with pytest.raises(PresetError, match="dtype"):
        load_presets(_write(tmp_path, [bad]))

    with pytest.raises(PresetError, match="duplicate"):
        load_presets(_write(tmp_path, [entry, entry]))

    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(PresetError, match="broken.json: invalid JSON"):
        load_presets(tmp_path / "broken.json")


def test_the_trained_preset_loads_a_folder_shipped_in_the_repository(presets, tmp_path):
    """tiny-shapes names its folder relative to models.json; the loader reads it with from_pretrained,
    and a checkout without it is told how to get it back, not sent to the hub."""
    from vdtome.engine.pipelines import ModelUnavailableError, load_pipeline

    preset = presets["tiny-shapes"]
    assert preset.local == str((PRESETS_DIR.parent / "models" / "tiny-shapes").resolve())
    assert (Path(preset.local) / "model_index.json").is_file() and preset.weights == preset.local
    assert not preset.is_builtin and preset.hub_id is None and preset.prompts == "shapes"
    moved = dataclasses.replace(preset, local=str(tmp_path / "tiny-shapes"))
    with pytest.raises(ModelUnavailableError, match=r"folder 'tiny-shapes' is missing.*vdtome.offline.train"):
        load_pipeline(moved, device="cpu")


def test_saved_weights_load_with_dtype_not_the_deprecated_torch_dtype(presets):
    """diffusers warns on every load that passes ``torch_dtype``; the loader passes ``dtype``."""
    from vdtome.engine.pipelines import load_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(presets["tiny-shapes"], device="cpu")
    assert pipe.transformer.dtype == getattr(torch, presets["tiny-shapes"].dtype)
    assert not [str(w.message) for w in caught if "torch_dtype" in str(w.message)]


def test_gpu_presets_state_what_the_loader_needs(presets):
    """Every GPU preset carries its memory need (in the label, as loaded and with memory methods) and the
    per-part GPU seconds ZeroGPU is asked for; tiny presets time themselves with more rounds."""
    for preset in presets.values():
        if not preset.requires_gpu:  # the tiny presets, random or trained
            assert preset.timing_rounds >= 6 and preset.gpu_time is None  # an interval from rounds alone
            continue
        # 7 rounds, the later ones short: an interval from independent calls at little cost
        assert preset.requires_gpu and preset.timing_rounds == 7 and preset.timing_steps == 3
        # The need as loaded and with the memory plan's methods, said to be an estimate; a loader
        # that offloads says below which GPU size.
        assert f"est. ~{preset.gpu_memory_gb:g} GB as loaded" in preset.label, preset.label
        assert "estimated by `python -m vdtome plan`" in preset.hardware, preset.name
        assert (preset.offload_below_gb is not None) == ("offloads below" in preset.label), preset.name
        gpu = preset.gpu_time
        assert gpu.load_s > 0 and gpu.step_s > 0 and gpu.decode_s > 0 and gpu.text_s > 0
    assert presets["hunyuanvideo"].vae_tiling and presets["cogvideox-5b"].vae_tiling
    assert presets["hunyuanvideo"].negative_prompt_unsupported
    assert not presets["wan2.1-t2v-1.3b"].negative_prompt_unsupported


def test_gpu_preset_without_its_gpu_figures_is_refused(tmp_path):
    raw = json.loads((PRESETS_DIR / "models.json").read_text(encoding="utf-8"))
    entry = next(p for p in raw["presets"] if p["name"] == "ltx-video")
    assert "ltx-video" in load_presets(_write(tmp_path, [entry]))
    for field, message in (("gpu_time", "gpu_time: missing required field"),
                           ("gpu_memory_gb", "gpu_memory_gb: missing required field")):
        bad = json.loads(json.dumps(entry))
        del bad[field]
        with pytest.raises(PresetError, match=message):
            load_presets(_write(tmp_path, [bad]))
    bad = json.loads(json.dumps(entry))
    bad["gpu_time"]["step_s"] = -1
    with pytest.raises(PresetError, match=r"gpu_time.step_s: must be >= 0 seconds"):
        load_presets(_write(tmp_path, [bad]))
    bad = json.loads(json.dumps(entry))
    del bad["defaults"]["timing_rounds"]
    with pytest.raises(PresetError, match=r"defaults.timing_rounds: missing required field"):
        load_presets(_write(tmp_path, [bad]))


def test_the_pipeline_cache_freezes_what_it_loads_and_thaws_it_on_eviction():
    """After a load, everything alive is frozen out of the cyclic collector (the engine's
    collection before each measured decode then scans only what requests made); an evicted
    pipeline caught in a reference cycle is still freed, since eviction thaws first."""
    import gc
    import weakref

    from vdtome.core.presets import get_preset
    from vdtome.engine.pipelines import PipelineCache

    cache = PipelineCache(capacity=1)
    try:
        pipe = cache.get(get_preset("tiny-wan"), "cpu")
        assert gc.get_freeze_count() > 0
        pipe.cycle = pipe  # only the cyclic collector can free it now
        evicted = weakref.ref(pipe)
        del pipe
        cache.get(get_preset("tiny-ltx"), "cpu")  # capacity 1: tiny-wan is evicted
        assert evicted() is None
    finally:
        cache.clear()
    assert gc.get_freeze_count() == 0
