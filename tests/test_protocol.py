"""The timing protocol: paired statistics, what a comparison may claim, and the engine following it."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from vdtome import tiny
from vdtome.compare import ComparisonEngine, ComparisonRequest, RequestError, resolve
from vdtome.measure import MemoryReport, TimingReport
from vdtome.pipelines import load_pipeline
from vdtome.presets import get_preset
from vdtome.protocol import (
    ACCELERATED,
    BASELINE,
    MAX_GPU_SECONDS,
    TimedCall,
    estimate_gpu_time,
    round_order,
    summarise,
)
from vdtome.report import metric_rows
from vdtome.stats import (
    MIN_PAIRS,
    Verdict,
    diluted,
    median_interval,
    paired_ratio,
    range_phrase,
    speed_phrase,
)
from vdtome.tome import ToMeConfig
from vdtome.methods.mag_cache import MagCache
from vdtome.ui import gpu_estimate

from conftest import a_a_attempts

PROMPT = "a lighthouse beam sweeps over a stormy sea at night"


# ---- statistics ----------------------------------------------------------------------------------


def test_median_interval_is_the_distribution_free_order_statistic_interval():
    assert median_interval([1.0] * (MIN_PAIRS - 1)) is None  # 5 pairs cannot reach 95 %
    low, high, coverage = median_interval([5, 1, 4, 2, 3, 6])
    assert (low, high) == (1, 6) and coverage == pytest.approx(1 - 2 / 64)
    # 9 pairs: the 2nd smallest to the 2nd largest covers 1 - 2 * (1 + 9) / 512 = 96.1 %.
    low, high, coverage = median_interval(range(1, 10))
    assert (low, high) == (2, 8) and coverage == pytest.approx(1 - 20 / 512)
    # Coverage checked by simulation: the interval holds the true median of a skewed distribution.
    torch.manual_seed(0)
    samples = torch.distributions.Exponential(1.0).sample((4000, 7))
    true_median = math.log(2)
    hits = sum(low <= true_median <= high for low, high, _ in map(median_interval, samples.tolist()))
    assert hits / 4000 > 0.97  # 7 pairs: the range covers 1 - 2 / 128 = 98.4 %


def test_verdicts_need_an_interval_that_excludes_one_and_a_change_above_the_noise_threshold():
    faster = paired_ratio([2.0] * 7, [1.0, 1.1, 0.9, 1.0, 1.05, 1.0, 0.95])
    assert faster.verdict is Verdict.FASTER and faster.text().startswith("2.00x faster (98% interval")
    slower = paired_ratio([1.0] * 7, [1.4, 1.5, 1.45, 1.4, 1.5, 1.42, 1.41])
    assert slower.verdict is Verdict.SLOWER and slower.text().startswith("1.42x slower")
    assert "0.7" not in slower.text()  # a slowdown is never printed as a speedup below 1
    noisy = paired_ratio([1.0] * 7, [0.8, 1.2, 0.9, 1.1, 1.0, 0.95, 1.05])
    assert noisy.verdict is Verdict.NO_DIFFERENCE and noisy.text().startswith("no significant difference")
    # Significant but small (3 %): within the noise threshold, and said so.
    small = paired_ratio([1.03, 1.02, 1.04, 1.03, 1.03, 1.03, 1.03], [1.0] * 7)
    assert small.low > 1 and small.verdict is Verdict.NO_DIFFERENCE
    assert small.text().startswith("within the 5% noise threshold (median 1.03x faster;")
    single = paired_ratio([2.0], [1.0])
    assert single.verdict is Verdict.TOO_FEW_REPEATS and "too few for an interval" in single.text()


def test_speed_words():
    assert speed_phrase(1 / 1.4) == "1.40x slower" and speed_phrase(1.84) == "1.84x faster"
    assert speed_phrase(1.001) == "1.00x"
    assert range_phrase(1.2, 1.5) == "1.20-1.50x faster"
    assert range_phrase(0.5, 0.8) == "1.25-2.00x slower"
    assert range_phrase(0.8, 1.25) == "1.25x slower to 1.25x faster"


def test_end_to_end_dilutes_the_denoising_ratio_by_the_untouched_time():
    ratio = paired_ratio([2.0] * 6, [1.0, 1.0, 1.0, 1.0, 0.8, 1.25])
    whole = diluted(ratio, accelerated_part=1.0, untouched=1.0)
    assert whole.value == pytest.approx((2.0 + 1.0) / (1.0 + 1.0))
    assert whole.low == pytest.approx((1.6 + 1.0) / 2.0) and whole.high == pytest.approx((2.5 + 1.0) / 2.0)
    # Untouched times measured 1.0 and 1.5 apart: the interval spans both.
    spread = diluted(ratio, accelerated_part=1.0, untouched=1.25, untouched_range=(1.0, 1.5))
    assert spread.low == pytest.approx((1.6 + 1.5) / 2.5) and spread.high == pytest.approx((2.5 + 1.0) / 2.0)
    # A 20 % denoising gain under 10x as much untouched time is below the noise threshold end to end.
    small = diluted(paired_ratio([1.2] * 7, [1.0] * 7), accelerated_part=1.0, untouched=10.0)
    assert small.verdict is Verdict.NO_DIFFERENCE


# ---- summarising calls ---------------------------------------------------------------------------


def _call(side, round_number, decoded, denoise, text=20.0, decode=100.0, steps=None, clock="perf_counter", peak=0):
    phases = {"denoising": denoise, "text_encoding": text, "end_to_end": denoise + text + (decode if decoded else 0) + 5}
    if decoded:
        phases["vae_decode"] = decode
    steps = steps if steps is not None else (denoise / 4,) * 4
    timing = TimingReport(clock=clock, device="cpu", phases_ms=phases, steps_ms=tuple(steps))
    memory = MemoryReport("cuda:0" if clock == "cuda_event" else "cpu", peak, *([None] * 10), None, 0, 0.0, 0.0)
    return TimedCall(side, round_number, decoded, timing, memory, started_at=0.0)


def _rounds(n, base, fast, **kwargs):
    calls = []
    for r in range(1, n + 1):
        for side in round_order(r):
            calls.append(_call(side, r, r == 1, base if side == BASELINE else fast, **kwargs))
    return calls


def test_rounds_alternate_and_are_the_repeats_when_there_are_enough():
    assert [round_order(r) for r in (1, 2, 3)] == [(BASELINE, ACCELERATED), (ACCELERATED, BASELINE),
                                                   (BASELINE, ACCELERATED)]
    summary = summarise(_rounds(7, 100.0, 50.0))
    assert summary.denoising.ratio.unit == "rounds" and summary.denoising.ratio.pairs == 7
    assert summary.denoising.ratio.value == pytest.approx(2.0)
    # End to end: 5 ms set-up + 20 ms text + 100 ms decode are untouched (mean of both decoding calls).
    assert summary.end_to_end.baseline_ms == pytest.approx(100 + 125) and summary.end_to_end.accelerated_ms == 50 + 125
    assert summary.end_to_end.ratio.value == pytest.approx(225 / 175)
    assert summary.busy_warning is None


def test_with_few_rounds_the_steps_are_the_repeats_unless_they_differ():
    one_round = _rounds(1, 100.0, 50.0, steps=None)
    ratio = summarise(one_round, steps_alike=True).denoising.ratio
    assert ratio.verdict is Verdict.TOO_FEW_REPEATS and ratio.pairs == 1  # 4 steps are still too few
    # Step 0 (one-off costs: here 10x the others) is left out of the step pairs.
    fifty = [_call(BASELINE, 1, True, 100.0, steps=(20.0,) + (2.0,) * 49),
             _call(ACCELERATED, 1, True, 50.0, steps=(1.0,) + tuple(1.0 + 0.01 * (i % 3) for i in range(49)))]
    stepped = summarise(fifty, steps_alike=True).denoising.ratio
    assert stepped.unit == "steps" and stepped.pairs == 49 and stepped.verdict is Verdict.FASTER
    assert stepped.high < 2.01  # step 0's 20x did not enter
    # A method whose steps differ (e.g. a matching reused for k steps) cannot use steps as repeats.
    assert summarise(fifty, steps_alike=False).denoising.ratio.verdict is Verdict.TOO_FEW_REPEATS


def test_untouched_phases_that_differ_say_the_machine_was_busy():
    calls = _rounds(7, 100.0, 50.0)
    calls = [replace(c, timing=replace(c.timing, phases_ms=c.timing.phases_ms | {"text_encoding": 30.0}))
             if c.side == ACCELERATED else c for c in calls]
    summary = summarise(calls)
    text = next(p for p in summary.untouched if p.phase == "text_encoding")
    assert not text.touched and "text encoding took 1.50x as long in the accelerated runs" in text.busy
    assert "machine was busy" in summary.busy_warning
    # Agreeing on the median but spread over a factor of 3 between rounds: disturbed as well.
    spread = [replace(c, timing=replace(c.timing, phases_ms=c.timing.phases_ms | {"text_encoding": 20.0 * 3 ** (c.round % 2)}))
              if c.side == ACCELERATED and c.round > 4 else c for c in _rounds(7, 100.0, 50.0)]
    assert "text encoding varied 3.0x between the rounds' two calls" in summarise(spread).busy_warning
    # The denoising ratio itself spread over 3x between rounds: disturbed, whatever the other phases say.
    jumpy = [replace(c, timing=replace(c.timing, phases_ms=c.timing.phases_ms | {"denoising": 150.0}))
             if c.side == ACCELERATED and c.round == 3 else c for c in _rounds(7, 100.0, 50.0)]
    assert "the denoising ratio itself varied 3.0x between rounds" in summarise(jumpy).busy_warning
    # 10 % slower and 10 % faster weigh alike: an accelerated side 10.7 % slower is flagged too.
    lopsided = [replace(c, timing=replace(c.timing, phases_ms=c.timing.phases_ms | {"text_encoding": 22.14}))
                if c.side == ACCELERATED else c for c in _rounds(7, 100.0, 50.0)]
    assert "text encoding took 1.11x as long in the accelerated runs" in summarise(lopsided).busy_warning
    # A phase of a few milliseconds on a CPU clock is jitter: it checks nothing and flags nothing.
    short = [replace(c, timing=replace(c.timing, phases_ms=c.timing.phases_ms | {"text_encoding": 2.0 * (1 + c.round % 3)}))
             for c in _rounds(7, 100.0, 50.0)]
    text = summarise(short).untouched[0]
    assert text.busy is None and text.check.startswith("too short to be a noise check on a CPU clock")
    # One decode per side: a single CPU pair is no evidence, a single GPU pair is.
    slow_decode = [_call(BASELINE, 1, True, 100.0, decode=100.0), _call(ACCELERATED, 1, True, 50.0, decode=150.0)]
    assert summarise(slow_decode).busy_warning is None
    gpu = [replace(c, timing=replace(c.timing, clock="cuda_event")) for c in slow_decode]
    assert "VAE decode took 1.50x as long in the accelerated runs" in summarise(gpu).busy_warning


def test_memory_changes_within_the_spread_of_repeated_calls_are_noise():
    calls = []
    for r in range(1, 5):
        for side in round_order(r):
            peak = {BASELINE: [10, 14, 12, 11], ACCELERATED: [12, 9, 10, 13]}[side][r - 1] * 2**20
            calls.append(_call(side, r, r == 1, 50.0, peak=peak))
    whole, denoising = summarise(calls).memory
    assert whole.scope == "whole call" and whole.within_noise and whole.noise_bytes is None  # one sample per side
    assert denoising.scope == "denoising" and denoising.noise_bytes == 4 * 2**20 and denoising.within_noise
    exact = summarise([replace(c, memory=replace(c.memory, device="cuda:0")) for c in calls]).memory[0]
    assert exact.exact and not exact.within_noise and exact.change_bytes == 2 * 2**20
    # A baseline from the cache ran in another request: its RSS figure is not comparable.
    cached = summarise(calls[1:], cached_baseline_memory=calls[0].memory).memory[0]
    assert cached.baseline_from_cache and not cached.comparable and not cached.within_noise


# ---- the engine follows the protocol -------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ComparisonEngine(device="cpu", output_root=tmp_path_factory.mktemp("protocol"), keep_outputs=4)


def test_each_round_is_two_adjacent_calls_in_alternating_order(engine):
    result = engine.run(ComparisonRequest("tiny-wan", PROMPT, seed=1, methods=ToMeConfig(ratio=0.5), rounds=4))
    calls = sorted(result.timing.calls, key=lambda c: c.started_at)
    assert [(c.round, c.side) for c in calls] == [
        (r, side) for r in range(1, 5) for side in round_order(r)
    ]
    assert [c.decoded for c in calls] == [True, True] + [False] * 6


def test_ratio_zero_is_no_significant_difference(engine):
    attempts = a_a_attempts(
        lambda: engine.run(ComparisonRequest("tiny-wan", PROMPT, seed=2, methods=ToMeConfig(ratio=0.0))),
        lambda result: result.speedup("denoising").verdict is Verdict.NO_DIFFERENCE)
    result = attempts[-1]
    assert result.fidelity.identical
    calls = [[(c.round, c.side, round(c.timing.denoising_ms, 1)) for c in r.timing.calls] for r in attempts]
    assert result.speedup("denoising").verdict is Verdict.NO_DIFFERENCE, (calls, result.warnings)
    assert result.speedup("end_to_end").verdict is Verdict.NO_DIFFERENCE
    rows = {row[0]: row for row in metric_rows(result)}
    assert rows["denoising loop (median of 7 rounds)"][3].startswith("no significant difference")


def test_phases_the_method_cannot_touch_are_shown_unchanged(engine):
    result = engine.run(ComparisonRequest("tiny-wan", PROMPT, seed=3, methods=ToMeConfig(ratio=0.5)))
    rows = {row[0]: row for row in metric_rows(result)}
    for label in ("text encoding (not touched by token merging (ToMe))", "VAE decode (not touched by token merging (ToMe))"):
        change = rows[label][3]
        assert change.startswith("unchanged by design") and "faster" not in change, change
        assert rows[label][4] == "lower"
    assert all(len(row) == 5 and row[4] in ("lower", "higher", "higher (1 = same)", "closer to baseline", "")
               for row in rows.values())


def test_reruns_under_cpu_load_give_overlapping_intervals(engine):
    """A busy machine (a second process spinning on one of the two cores, stopped after at most
    3 minutes): five reruns of identical settings must agree within their intervals."""
    load = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 180\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.5)
        results = [
            engine.run(ComparisonRequest("tiny-wan", PROMPT, seed=4, methods=ToMeConfig(ratio=0.5)))
            for _ in range(5)
        ]
        ratios = [result.speedup("denoising") for result in results]
    finally:
        load.kill()
        load.wait()
    assert all(r.has_interval for r in ratios)
    assert any("machine was busy" in " ".join(result.warnings) for result in results)
    # Intervals on a line overlap pairwise exactly when they share a point.
    assert max(r.low for r in ratios) <= min(r.high for r in ratios), [(r.low, r.high) for r in ratios]


def test_ltx_is_called_with_the_frame_rate_its_video_is_written_at(engine, monkeypatch):
    from diffusers import LTXPipeline

    seen = []
    original = LTXPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("frame_rate"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LTXPipeline, "__call__", __import__("functools").wraps(original)(spy))
    result = engine.run(ComparisonRequest("tiny-ltx", PROMPT, methods=ToMeConfig(ratio=0.5), rounds=1))
    assert result.ok and seen and set(seen) == {get_preset("tiny-ltx").fps} == {24}


def test_negative_prompt_is_refused_where_the_model_takes_none():
    preset = get_preset("hunyuanvideo")
    with pytest.raises(RequestError, match="negative prompt must be empty for HunyuanVideo.*guidance-distilled"):
        resolve(ComparisonRequest("hunyuanvideo", PROMPT, negative_prompt="blurry"), preset)
    settings, _ = resolve(ComparisonRequest("hunyuanvideo", PROMPT), preset)
    assert settings.negative_prompt == ""
    resolve(ComparisonRequest("cogvideox-2b", PROMPT, negative_prompt="blurry"), get_preset("cogvideox-2b"))


def test_bad_rounds_are_refused_with_the_rule():
    with pytest.raises(RequestError, match="timing rounds must be between 1 and 20, got 0"):
        resolve(ComparisonRequest("tiny-wan", PROMPT, rounds=0), get_preset("tiny-wan"))
    with pytest.raises(RequestError, match="warm-up steps must be between 2"):
        resolve(ComparisonRequest("tiny-wan", PROMPT, warmup_steps=1), get_preset("tiny-wan"))


def test_presets_that_tile_their_vae_do_so_when_loaded(tmp_path):
    tiny.tiny_cogvideox_pipeline(rotary=True).save_pretrained(tmp_path / "cogvideox")
    tiled = replace(get_preset("cogvideox-5b"), requires_gpu=False, dtype="float32")
    assert get_preset("hunyuanvideo").vae_tiling and tiled.vae_tiling
    pipe = load_pipeline(tiled, "cpu", source=str(tmp_path / "cogvideox"))
    assert pipe.vae.use_tiling
    assert not load_pipeline(get_preset("tiny-cogvideox"), "cpu").vae.use_tiling


# ---- GPU time a request asks for -----------------------------------------------------------------


def test_gpu_estimate_of_a_default_real_request_covers_loading_warmups_runs_and_decodes():
    preset = get_preset("wan2.1-t2v-1.3b")
    gpu = preset.gpu_time
    estimate = gpu_estimate([ComparisonRequest("wan2.1-t2v-1.3b", PROMPT)])
    assert estimate.load_s == gpu.load_s > 0
    assert estimate.decode_s == pytest.approx(2 * gpu.decode_s)  # the baseline's and the accelerated video
    assert estimate.warmup_s >= gpu.decode_s  # the pipeline warm-up decodes once
    assert estimate.denoising_s == pytest.approx(2 * preset.num_inference_steps * gpu.step_s)  # 1 round, 2 sides
    assert estimate.text_s > 0 and estimate.margin_s > 0
    assert estimate.seconds == math.ceil(estimate.total_s) and estimate.fits
    # More rounds, more sweep points and bigger videos ask for more; an impossible request does not fit.
    assert gpu_estimate([ComparisonRequest("wan2.1-t2v-1.3b", PROMPT, rounds=3)]).total_s > estimate.total_s
    assert gpu_estimate([ComparisonRequest("wan2.1-t2v-1.3b", PROMPT)] * 3).total_s > estimate.total_s
    # MagCache calibrates first: one untimed run at the warm-up's step count and one at the request's.
    calibrating = gpu_estimate([ComparisonRequest("wan2.1-t2v-1.3b", PROMPT, methods=MagCache())])
    assert estimate.calibration_s == 0 and "calibration" not in estimate.parts()
    assert calibrating.calibration_s == pytest.approx((2 + preset.num_inference_steps) * gpu.step_s)
    assert calibrating.parts()["calibration"] == calibrating.calibration_s and calibrating.total_s > estimate.total_s
    huge = estimate_gpu_time(get_preset("hunyuanvideo"), 50, 129, 720, 1280, rounds=5, points=8)
    assert not huge.fits and huge.seconds == MAX_GPU_SECONDS
