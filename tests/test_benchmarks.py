"""The benchmark scripts under benchmarks/ run (smoke checks of their --quick modes, in a subprocess:
the scripts set process-wide state such as glibc's malloc settings and torch's thread count)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_caches_quick_runs_a_cache_tome_and_the_stack():
    command = [sys.executable, "benchmarks/step_caches.py", "--quick", "--methods", "first_block_cache",
               "--set", "first_block_cache_threshold=1.0"]  # 1.0: skips whenever it may, so the spy sees it
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "128 video tokens per block" in out and "CFG: 2" in out
    rows = {}
    for line in out.splitlines():
        match = re.match(r"(\S.*?)\s{2,}([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+\S+\s+(\d+)%\s+(\d+)%\s+([\d.]+)\s+([\d.]+)$", line)
        if match:
            rows[match[1]] = [float(v) for v in match.groups()[1:]]
    fbc, tome = "first_block_cache threshold 1", "tome ratio 0.5 stride 1x2x2"
    assert set(rows) == {fbc, tome, f"{tome} + {fbc}"}, out
    for label, (base_s, variant_s, speedup, blocks, attention, psnr, ssim) in rows.items():
        assert base_s > 0 and variant_s > 0 and speedup > 0, label
        assert 0 <= ssim <= 1 and psnr > 0, label
    assert rows[fbc][3] > 0 and rows[f"{tome} + {fbc}"][3] > 0  # blocks skipped, counted by ComputeSpy
    assert rows[tome][3] == 0 and rows[tome][5] < 100  # merging skips no block but changes the latents
