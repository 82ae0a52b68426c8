"""vdtome demo: baseline vs token-merged video generation on the built-in tiny Wan model.

A first, minimal UI: one tiny random-weight Wan 2.1 pipeline (built in code, runs offline on a
CPU), the same prompt and seed run without and with ToMe, both videos side by side with their
latency, the effective merge ratio and the PSNR of the accelerated video against the baseline.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never phone home

import math
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from diffusers.utils import export_to_video

from vdtome.tiny import tiny_wan_pipeline
from vdtome.tome import ToMeConfig, apply_tome

MAX_PROMPT_CHARS = 400
FRAMES, HEIGHT, WIDTH, FPS = 17, 64, 64, 8
OUTPUT_ROOT = Path(tempfile.gettempdir()) / "vdtome-outputs"
KEEP_RUNS = 16

_pipe = None
_pipe_lock = threading.Lock()


def pipeline():
    """The tiny pipeline, built once and warmed up (first calls pay one-off costs)."""
    global _pipe
    with _pipe_lock:
        if _pipe is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            pipe = tiny_wan_pipeline().to(device)
            _generate(pipe, "warm up", 0, 2)
            _pipe = pipe
    return _pipe


def _generate(pipe, prompt: str, seed: int, steps: int) -> np.ndarray:
    return pipe(
        prompt=prompt,
        negative_prompt="",
        num_frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames[0]


def _timed(pipe, prompt: str, seed: int, steps: int) -> tuple[np.ndarray, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    frames = _generate(pipe, prompt, seed, steps)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return frames, time.perf_counter() - start


def _psnr(reference: np.ndarray, other: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _run_dir() -> Path:
    """A fresh output folder; only the newest KEEP_RUNS folders are kept."""
    OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
    runs = sorted(OUTPUT_ROOT.iterdir(), key=lambda p: p.stat().st_mtime)
    for old in runs[: max(0, len(runs) - KEEP_RUNS + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=OUTPUT_ROOT))


def compare(prompt: str, seed: float, ratio: float, steps: float):
    """Run baseline and ToMe on the same prompt and seed; return both videos and a summary."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise gr.Error("Prompt is empty: type a description of the video.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(f"Prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
    if not 0.0 <= ratio < 1.0:
        raise gr.Error(f"Merge ratio must be in [0, 1), got {ratio}.")
    if int(steps) < 1:
        raise gr.Error(f"Steps must be at least 1, got {steps}.")
    pipe = pipeline()
    seed, steps = int(seed), int(steps)
    with _pipe_lock:
        # Untimed warm-up in this worker thread: its first torch call pays one-off costs
        # (e.g. starting the thread's OpenMP team) that would otherwise land on the baseline.
        _generate(pipe, prompt, seed, 1)
        baseline, base_s = _timed(pipe, prompt, seed, steps)
        handle = apply_tome(pipe, ToMeConfig(ratio=ratio))
        try:
            merged, tome_s = _timed(pipe, prompt, seed, steps)
            stats = handle.stats()
        finally:
            handle.remove()
    folder = _run_dir()
    base_path, tome_path = str(folder / "baseline.mp4"), str(folder / "tome.mp4")
    export_to_video(list(baseline), base_path, fps=FPS)
    export_to_video(list(merged), tome_path, fps=FPS)
    psnr = _psnr(baseline, merged)
    summary = (
        f"| | baseline | ToMe |\n|---|---|---|\n"
        f"| end-to-end latency | {base_s:.3f} s | {tome_s:.3f} s |\n"
        f"| speedup | | {base_s / tome_s:.2f}x |\n"
        f"| merge ratio (requested / effective) | | {stats.requested_ratio:.2f} / {stats.effective_ratio:.2f} |\n"
        f"| PSNR vs baseline | | {'identical' if math.isinf(psnr) else f'{psnr:.1f} dB'} |\n\n"
        f"Tiny random-weight Wan model on {next(pipe.transformer.parameters()).device}: the videos are noise-like "
        "patterns and latencies are dominated by fixed costs; it shows the mechanics, not real-model speedups."
    )
    return base_path, tome_path, summary


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="vdtome: token merging for video diffusion") as demo:
        gr.Markdown(
            "# vdtome\nToken merging (ToMe) for video diffusion transformers: the same prompt and seed, "
            "without and with merging. Built-in tiny Wan model (random weights, runs offline)."
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="a red fox runs through fresh snow at dawn", scale=3)
            seed = gr.Number(label="Seed", value=0, precision=0)
        with gr.Row():
            ratio = gr.Slider(0.0, 0.7, value=0.5, step=0.05, label="Merge ratio")
            steps = gr.Slider(1, 20, value=4, step=1, label="Denoising steps")
        run = gr.Button("Run comparison", variant="primary")
        with gr.Row():
            base_video = gr.Video(label="baseline", autoplay=True, loop=True)
            tome_video = gr.Video(label="accelerated (ToMe)", autoplay=True, loop=True)
        summary = gr.Markdown()
        run.click(compare, [prompt, seed, ratio, steps], [base_video, tome_video, summary], concurrency_id="gpu")
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


if __name__ == "__main__":
    build_demo().launch()
