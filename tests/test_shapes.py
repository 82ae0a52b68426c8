"""The synthetic shapes data, its judge, and the training script of the tiny-shapes model."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from vdtome.engine.request import unknown_words_note
from vdtome.offline import shapes
from vdtome.offline import train as train_tiny
from vdtome.offline.tiny import tiny_tokenizer


def test_held_out_combinations_never_reach_training():
    rng = random.Random(3)
    seen = {shapes.random_training_scene(rng).combination for _ in range(3000)}
    assert seen <= shapes.TRAIN_COMBINATIONS and not seen & shapes.HELD_OUT
    assert len(shapes.HELD_OUT) == round(0.2 * 6 * 3 * 4 * 3)
    assert all(scene.combination in shapes.HELD_OUT for scene in shapes.held_out_scenes(20))
    # every colour and direction is still trained (the held-out set only removes combinations)
    assert {c[0] for c in shapes.TRAIN_COMBINATIONS} == set(shapes.COLOURS)
    assert {c[2] for c in shapes.TRAIN_COMBINATIONS} == set(shapes.DIRECTIONS)


def test_rendering_is_seeded_and_moves_the_named_way():
    scene = shapes.Scene("red", "triangle", "up", "quickly", "white")
    a, b = shapes.render(scene, random.Random(5)), shapes.render(scene, random.Random(5))
    assert a.shape == (9, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, shapes.render(scene, random.Random(6)))
    masks, background = shapes.foreground_masks(a)
    assert np.allclose(background, shapes.BACKGROUNDS["white"], atol=1)
    rows = [np.nonzero(m)[0].mean() for m in masks]
    assert rows[-1] < rows[0] - 20  # 3 px a frame over 8 frames, upward


def test_judge_reads_every_colour_and_direction_of_rendered_clips():
    rng = random.Random(0)
    for colour in shapes.COLOURS:
        for direction in shapes.DIRECTIONS:
            for background in shapes.BACKGROUNDS:
                scene = shapes.Scene(colour, rng.choice(shapes.SHAPES), direction, "slowly", background)
                verdict = shapes.judge(shapes.render(scene, rng), scene)
                assert verdict.colour_right and verdict.direction_right, (scene, verdict)


def test_judge_says_no_to_the_wrong_prompt_and_to_noise():
    rng = random.Random(1)
    clip = shapes.render(shapes.Scene("red", "circle", "left", "quickly", "black"), rng)
    wrong = shapes.judge(clip, shapes.Scene("blue", "circle", "right", "quickly", "black"))
    assert wrong.colour == "red" and wrong.direction == "left"
    assert not wrong.colour_right and not wrong.direction_right
    still = np.repeat(clip[:1], 9, axis=0)  # no motion: no direction
    assert shapes.judge(still, shapes.Scene("red", "circle", "left", "quickly", "black")).direction is None


def test_prompts_parse_back_and_bad_values_name_the_field():
    scene = shapes.held_out_scenes(1)[0]
    assert shapes.Scene.from_prompt(scene.prompt) == scene
    with pytest.raises(ValueError, match="colour must be one of"):
        shapes.Scene("purple", "circle", "left", "quickly", "black")
    with pytest.raises(ValueError, match="prompt must read"):
        shapes.Scene.from_prompt("a red fox")
    assert set(shapes.vocabulary()) >= set(scene.prompt.split())


def test_unknown_words_are_named_in_a_note():
    class Pipe:
        tokenizer = tiny_tokenizer(words=shapes.vocabulary())

    (note,) = unknown_words_note(Pipe, "A red fox runs left, quickly!")
    assert "'fox'" in note and "'runs'" in note and "'red'" not in note and "','" not in note
    assert unknown_words_note(Pipe, shapes.held_out_scenes(1)[0].prompt) == []


SMALL = train_tiny.TrainConfig(frames=5, side=32, vae_steps=4, vae_batch=2, vae_frames=5, pool_clips=8,
                               transformer_steps=3, transformer_batch=2, checkpoint_every=1, sample_every=0)


class _Stop(Exception):
    pass


def _progress_stopping_after(updates: int):
    """A progress bar that kills the run (as Ctrl-C would) after ``updates`` steps."""

    class Bar:
        count = 0

        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            Bar.count += n
            if Bar.count > updates:
                raise _Stop

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    return Bar


def _quiet(*args, **kwargs):
    return _progress_stopping_after(10**9)()


def test_an_interrupted_vae_run_resumes_to_the_same_weights(tmp_path):
    straight = train_tiny.train_vae(SMALL, _mkdir(tmp_path / "straight"), _quiet)
    work = _mkdir(tmp_path / "interrupted")
    with pytest.raises(_Stop):
        train_tiny.train_vae(SMALL, work, _progress_stopping_after(2))
    assert torch.load(work / train_tiny.VAE_CHECKPOINT, weights_only=True)["step"] == 2
    resumed = train_tiny.train_vae(SMALL, work, _quiet)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _mkdir(path):
    path.mkdir()
    return path


def test_training_writes_a_pipeline_that_loads_with_from_pretrained(tmp_path):
    from vdtome.core.presets import get_preset
    from vdtome.engine.pipelines import from_pretrained

    out = tmp_path / "model"
    train_tiny.train(SMALL, out, tmp_path / "work", progress=_quiet)
    pipe = from_pretrained(get_preset("tiny-shapes"), str(out))
    assert type(pipe).__name__ == "WanPipeline"
    pool = torch.load(tmp_path / "work" / train_tiny.POOL_FILE, weights_only=True)
    assert pipe.vae.config.latents_std == pytest.approx(pool["std"].tolist())
    assert dataclasses.asdict(SMALL).items() <= __import__("json").loads((out / "training.json").read_text()).items()
    with pytest.raises(SystemExit, match="other settings"):  # a work folder never mixes two recipes
        train_tiny.train(dataclasses.replace(SMALL, seed=1), out, tmp_path / "work", progress=_quiet)


def test_the_shapes_prompt_set_covers_what_the_model_knows():
    from vdtome.core.presets import get_preset, load_prompts

    scenes = [shapes.Scene.from_prompt(p) for p in load_prompts(get_preset("tiny-shapes").prompts)]
    assert {s.colour for s in scenes} == set(shapes.COLOURS)
    assert {s.direction for s in scenes} == set(shapes.DIRECTIONS)
    assert {s.shape for s in scenes} == set(shapes.SHAPES) and {s.background for s in scenes} == set(shapes.BACKGROUNDS)


def test_tuning_prompts_are_held_out_and_disjoint_from_the_evaluation_prompts():
    """The token-merging defaults are chosen on the tuning prompts and judged on the evaluation ones."""
    from vdtome.core.presets import load_prompts

    tuning = [shapes.Scene.from_prompt(p) for p in load_prompts("shapes-tuning")]
    evaluation = shapes.held_out_scenes(20, seed=0)  # scripts/evaluate_tiny_shapes.py's
    assert len(tuning) >= 3 and all(scene.combination in shapes.HELD_OUT for scene in tuning)
    assert not {s.combination for s in tuning} & {s.combination for s in evaluation}


@pytest.mark.parametrize("frames, side", [(9, 64), (17, 128)])
def test_a_clip_crosses_the_same_share_of_the_frame_at_any_size(frames, side):
    """Speeds are shares of the frame per clip: at 17 x 128 x 128 a shape moves as far, relative to the
    frame, as at 9 x 64 x 64, and its whole path stays inside the frame."""
    for speed, share in shapes.SPEEDS.items():
        scene = shapes.Scene("red", "circle", "right", speed, "black")
        clip = shapes.render(scene, random.Random(3), frames=frames, side=side)
        verdict = shapes.judge(clip, scene)
        masks, _ = shapes.foreground_masks(clip)
        assert verdict.direction_right and masks[0].sum() == pytest.approx(masks[-1].sum(), rel=0.05)
        # the judge averages a third of the frames at each end: two thirds of the path lie between
        k = max(1, frames // 3)
        expected = share * side * (frames - k) / (frames - 1)
        assert verdict.displacement[0] == pytest.approx(expected, rel=0.1)
