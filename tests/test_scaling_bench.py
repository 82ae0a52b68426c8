"""benchmarks/scaling.py: its --quick configuration runs in-process and writes every figure, and a
second run with the same settings measures nothing again (resumable)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from benchmarks import scaling


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_quick_run_writes_every_figure_and_resumes(tmp_path, capsys, restore_threads):
    # --system-malloc: the default changes glibc's malloc for the whole process, which other tests measure.
    argv = ["--quick", "--system-malloc", "--out", str(tmp_path)]
    result = scaling.main(argv)
    records = json.loads((tmp_path / "scaling.json").read_text())["records"]
    assert [(r["model"], r["tokens"]) for r in records] == [(m, t) for m in ("wan", "cogvideox") for t in (256, 512)]
    assert records == json.loads(json.dumps(result["records"]))
    for record in records:
        tome = record["tome"]
        assert tome["kept_tokens"] == record["tokens"] // 2  # ratio 0.5
        assert all(len(tome["seconds"][name]) == 1 for name in ("base", "tome", "oracle"))  # one round
        assert tome["speedup_iqr"][0] <= tome["speedup"] <= tome["speedup_iqr"][1]
        assert 1 < tome["ideal"] <= tome["ideal_real_depth"] < 4  # self-attention on half the tokens
        check = tome["flop_check"]  # the analytic linear MACs against torch's FLOP counter
        assert check["model_linear_gmacs"] == pytest.approx(check["counted_linear_gmacs"], rel=0.05)
        stacks = record["stacks"]
        assert (stacks["layers"], stacks["steps"]) == (2, 4)
        labels = [row["label"] for row in stacks["variants"]]
        assert labels == ["ToMe + first block cache", "ToMe + MagCache", "ToMe + first block cache, ceiling",
                          "ToMe + MagCache, ceiling"]
        for row in stacks["variants"]:
            assert row["speedup"] > 0 and len(row["blocks_run_per_step"]) == 4
            assert row["blocks_skipped"] == 8 - sum(row["blocks_run_per_step"])
            assert row["reports"]["tome"]["effective ratio"] == 0.5
        ceiling = stacks["variants"][3]  # MagCache at threshold 1 skips whenever max_skip_steps allows
        assert ceiling["blocks_skipped"] > 0 and ceiling["calls_cached"] > 0
    with (tmp_path / "scaling.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * (4 + 4)  # 4 configurations x (ToMe, drop, 2 ideals + 4 stacks)
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "| Wan 2.1 1.3B | 256 |" in out and "FLOP ideal of CogVideoX-2b at its real width (1920)" in out

    scaling.main(argv)  # the same settings: everything is read back, nothing measured
    out = capsys.readouterr().out
    assert out.count("already in") == 4 and "one forward" not in out
    assert json.loads((tmp_path / "scaling.json").read_text())["records"] == records
