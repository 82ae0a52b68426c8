"""The app as an API: a real server on a loopback port, called with gradio_client."""

import json
from pathlib import Path

import cv2
import pytest
from gradio_client import Client
from gradio_client.exceptions import ValidationError

from vdtome.engine.video_io import probe

pytestmark = pytest.mark.server

PROMPT = "A paper boat drifts down a rain-filled gutter past glowing shop windows."
END_TO_END = "end-to-end (projected: denoising + untouched phases measured here)"


@pytest.fixture(scope="module")
def client(app_server):
    return Client(app_server, verbose=False)


def rows(table):
    return {row[0]: row[1:] for row in table["data"]}


def runs(history) -> list[dict]:
    """The history table's rows by column name (its headers travel with it)."""
    return [dict(zip(history["headers"], row)) for row in history["data"]]


def test_compare_returns_playable_videos_and_metrics(client):
    outputs = client.predict(prompt=PROMPT, seed=7, ratio=0.5, api_name="/compare")
    side_by_side, baseline, accelerated, difference, result_json, metrics, environment, notes, history, _plot = outputs[:10]
    for path in (baseline, accelerated, difference):
        info = probe(path)
        assert (info["codec"], info["pix_fmt"], info["frames"]) == ("h264", "yuv420p", 9)
        assert (info["width"], info["height"]) == (320, 320)  # 64x64 enlarged 5x, nearest-neighbour
        assert info["faststart"]
    composite = probe(side_by_side)
    assert composite["frames"] == 9 and composite["width"] > 2 * 64  # both videos in one player

    figures = rows(metrics)
    assert figures["merge ratio (requested / effective)"][1] == "0.50 / 0.50"
    end_to_end = figures[END_TO_END]
    assert end_to_end[0].endswith(" s") and end_to_end[3] == "lower"
    assert "interval" in end_to_end[2] and "speedup" not in end_to_end[2]  # a verdict, never "0.71x speedup"
    assert any(word in end_to_end[2] for word in ("faster", "slower", "no significant difference"))
    assert figures["VAE decode (not touched by token merging (ToMe))"][2].startswith("unchanged by design")
    assert figures["PSNR vs baseline"][1].endswith("dB") and figures["PSNR vs baseline"][3] == "higher"
    assert 0.0 < float(figures["SSIM vs baseline"][1]) < 1.0
    assert "torch" in environment and "float32" in environment
    assert "only 48 video tokens per block" in notes  # the tiny model's speed says little: the page says so

    result = json.loads(open(result_json).read())
    assert result["settings"]["seed"] == 7 and result["settings"]["prompt"] == PROMPT
    assert result["settings"]["rounds"] == 7 and len(result["timing"]["calls"]) == 14
    assert result["methods"][0]["report"]["detail"]["effective_ratio"] == pytest.approx(0.5, abs=0.01)
    assert "/" not in json.dumps(result["files"])  # file names only: no server paths
    assert runs(history)[-1]["model"] == "tiny-wan" and runs(history)[-1]["size"] == "9x64x64"
    assert all(Path(path).name.startswith("tiny-wan_tome-ratio-0.5-stride-1x2x2_seed7_") for path in outputs[:5])
    # The whole result as one JSON output named "result", appended last: equal to result.json.
    assert outputs[-1] == result
    returns = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/compare"]["returns"]
    assert returns[-1]["label"] == "result" and returns[-1]["component"] == "Json"
    assert not [r["label"] for r in returns if r["label"].startswith("value_")]  # every output named

    # The page's own views, appended after the API's first values.
    headline, table_html, colour_bar, latency, frame, frame_pair, frame_plot, code = outputs[10:18]
    assert headline.count('class="card tone-') == 4 and "Denoising" in headline and "PSNR" in headline
    assert table_html.count("<tr>") == len(metrics["data"]) + 1  # every metric row, and the header
    assert "linear-gradient" in colour_bar and "largest difference" in colour_bar
    assert latency["type"] == "altair" and frame_plot["type"] == "altair"
    worst = min(range(9), key=lambda i: result["fidelity"]["psnr"][i])
    assert frame["value"] == worst and frame["maximum"] == 8
    images = [cv2.imread(path) for path in frame_pair]
    assert images[0].shape == (64, 64, 3) and (images[0] != images[1]).any()  # the worst frame differs
    namespace = {}
    assert code.splitlines()[-1].startswith("print(result.speedup")
    exec(code.rsplit("\n", 1)[0].replace("result = vdtome.compare(", "request = ("), namespace)
    assert namespace["request"].seed == 7 and namespace["request"].methods[0].ratio == 0.5  # the snippet runs as is


def test_ratio_zero_is_identical_claims_no_speed_and_the_baseline_is_reused(client):
    client.predict(prompt=PROMPT, seed=3, ratio=0.3, api_name="/compare")
    outputs = client.predict(prompt=PROMPT, seed=3, ratio=0.0, api_name="/compare")
    figures = rows(outputs[5])
    assert figures["PSNR vs baseline"][1] == "identical"
    assert float(figures["SSIM vs baseline"][1]) == 1.0
    assert figures["baseline video"][0].startswith("from cache")  # only the ratio changed
    assert figures["baseline video"][2] == "timing measured again in this request"
    # Nothing was merged: no speed verdict, whatever the two identical sides measured.
    assert figures["denoising loop (median of 7 rounds)"][2].startswith("no speed claim: token merging (ToMe) did nothing")
    assert outputs[-1]["timing"]["denoising"]["ratio"]["verdict"] == "did nothing"
    assert 'data-tone="untested"' in outputs[10] and "did nothing" in outputs[10]  # the headline: grey, plain
    assert runs(outputs[8])[-1]["denoising"] == "did nothing"
    assert "its timing was measured again" in outputs[7]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(prompt="   "), "prompt is empty"),
        (dict(prompt="x" * 1200), "limit is 1000"),
        (dict(frames=10), "frames must be 4k+1 (got 10; nearest valid 9)"),
        (dict(height=70), "height must be a multiple of 16"),
        (dict(ratio=0.9), "merge ratio must be between 0 and 0.75 for stride (1, 2, 2)"),
        (dict(ratio=0.6, stride_y=1), "merge ratio must be between 0 and 0.50 for stride (1, 1, 2)"),
        (dict(stride_t=1, stride_y=1, stride_x=1), "nothing can merge"),
        (dict(targets=[]), "at least one merge target"),
        (dict(steps=0), "steps must be between 1"),
        (dict(rounds=0), "timing rounds must be between 1 and 20"),
        (dict(rounds=2.5), "timing rounds must be a whole number, got 2.5"),  # refused, not rounded
        (dict(preset="cogvideox-2b"), "needs a GPU"),
        (dict(custom_model="someone/some-model"), "VDTOME_ALLOW_CUSTOM_MODEL=1"),
    ],
)
def test_bad_input_gets_a_message_naming_the_rule(client, overrides, message):
    # Refused when submitted (Gradio's validator), before the request takes a queue place.
    with pytest.raises(ValidationError) as error:
        client.predict(**({"prompt": PROMPT} | overrides), api_name="/compare")
    assert message in str(error.value)


def test_after_the_refusals_the_app_keeps_serving(client):
    for overrides in (dict(prompt="   "), dict(ratio=0.9), dict(rounds=2.5), dict(preset="cogvideox-2b")):
        with pytest.raises(ValidationError):
            client.predict(**({"prompt": PROMPT} | overrides), api_name="/compare")
    outputs = client.predict(prompt=PROMPT, seed=1, ratio=0.25, api_name="/compare")
    assert rows(outputs[5])["merge ratio (requested / effective)"][1] == "0.25 / 0.25"


def test_sweep_runs_each_ratio_once_on_one_baseline(client):
    outputs = client.predict(prompt=PROMPT, seed=11, ratios="0.5, 0.1 0.3", api_name="/sweep")
    swept = runs(outputs[8])[-3:]
    assert [row["methods"] for row in swept] == [f"tome ratio {r} stride 1x2x2" for r in ("0.1", "0.3", "0.5")]
    assert {(row["prompt"], row["seed"]) for row in swept} == {(PROMPT, 11)}  # each row names its prompt and seed
    assert [row["baseline video"] for row in swept] == ["made", "from cache", "from cache"]  # one baseline video
    plot = outputs[9]
    assert len(plot["data"]) >= 3  # every non-identical run is a point on the speedup/fidelity chart
    with pytest.raises(ValidationError, match="sweep value 0.8: merge ratio must be between 0 and 0.75"):
        client.predict(prompt=PROMPT, ratios="0.2, 0.8", api_name="/sweep")
    # A coarser stride allows more merging: 2x2x2 cells cap the ratio at 0.85.
    outputs = client.predict(prompt=PROMPT, ratio=0.8, stride_t=2, stride_y=2, stride_x=2, api_name="/compare")
    assert rows(outputs[5])["merge ratio (requested / effective)"][1].startswith("0.80 / ")


def test_two_methods_stack_through_the_api_and_a_cache_threshold_sweeps(client):
    outputs = client.predict(prompt=PROMPT, seed=5, ratio=0.5, use_first_block_cache=True,
                             first_block_cache_threshold=1.0, api_name="/compare")
    result = json.loads(open(outputs[4]).read())
    assert result["stack"] == "tome ratio 0.5 stride 1x2x2 + first_block_cache threshold 1"
    assert [entry["method"] for entry in result["methods"]] == ["tome", "first_block_cache"]
    for entry in result["methods"]:  # both acted: tokens merged away, blocks skipped
        assert entry["report"]["evidence"][0]["count"] > 0, entry
    figures = rows(outputs[5])
    assert figures["token merging (ToMe): merge ratio (requested / effective)"][1] == "0.50 / 0.50"
    skipped = figures["first block cache: transformer-block computations skipped (each CFG sample counted)"][1]
    assert skipped.split(" of ")[0] != "0"
    assert runs(outputs[8])[-1]["methods"] == result["stack"]  # the history names the whole stack

    # A stack the rules refuse is refused when submitted, naming the rule; the next good one runs.
    with pytest.raises(ValidationError, match="diffusers keeps one cache per model"):
        client.predict(prompt=PROMPT, use_first_block_cache=True, use_mag_cache=True, api_name="/compare")
    with pytest.raises(ValidationError, match="reuses attention outputs across steps"):
        client.predict(prompt=PROMPT, use_pyramid_attention_broadcast=True, api_name="/compare")
    outputs = client.predict(prompt=PROMPT, seed=5, use_tome=False, use_first_block_cache=True,
                             ratios="0, 1", sweep_field="first_block_cache_threshold", api_name="/sweep")
    swept = runs(outputs[8])[-2:]
    assert [row["methods"] for row in swept] == ["first_block_cache threshold 0", "first_block_cache threshold 1"]
    assert swept[0]["what they did"].startswith("first_block_cache: blocks skipped 0.0")  # threshold 0 never skips
    assert not swept[1]["what they did"].startswith("first_block_cache: blocks skipped 0.0,")
    # A cache that never skipped claims no speed, in the history too.
    assert swept[0]["end-to-end"] == swept[0]["denoising"] == "did nothing" and swept[1]["denoising"] != "did nothing"


BENCH_SWEEP = """
name: api smoke
request: {rounds: 2}
stacks:
  - tome: {ratio: [0.25, 0.5]}
  - first_block_cache: {threshold: 0.2}
"""


def test_benchmark_tab_runs_a_sweep_over_prompts_and_returns_summary_plots_and_report(client):
    prompts = "a red fox running through snow\n\nwaves crashing on a rocky shore\n"
    status, summary, plots, files, summary_html = client.predict(
        bench_preset="tiny-wan", bench_prompts=prompts, bench_seeds="0", bench_sweep=BENCH_SWEEP, api_name="/benchmark")
    assert "6 of 6 rows finished" in status and "Pareto front" in status
    table = {row[0]: row[1:] for row in summary["data"]}
    assert list(table) == ["tome ratio 0.25 stride 1x2x2", "tome ratio 0.5 stride 1x2x2",
                           "first_block_cache threshold 0.2"]
    assert all(cells[0] == "2" and cells[1] == "0" for cells in table.values())  # 2 rows each, none failed
    assert sorted(item["caption"] for item in plots) == ["against Merge ratio", "against prompt length",
                                                         "per-prompt distributions", "speedup / fidelity Pareto front"]
    names = sorted(Path(f).name for f in files)
    assert names == ["report.html", "rows.jsonl", "summary.csv"]
    report = Path(next(f for f in files if f.endswith("report.html"))).read_text()
    assert report.count("data:image/png;base64,") == 4 and "waves crashing on a rocky shore" in report


@pytest.mark.parametrize("overrides, message", [
    (dict(bench_sweep="stacks: [{tome: {ratio: 0.9}}]"), "the sweep, stack 1, tome: merge ratio must be between 0"),
    (dict(bench_sweep="stacks: [{tome: {ratio: 0.5}}]\nrequest: {height: 65}"), "height"),
    (dict(bench_seeds="zero"), "seeds must be whole numbers"),
    (dict(bench_prompts="  \n "), "prompts is empty"),
    (dict(bench_preset="cogvideox-2b"), "needs a GPU"),
    (dict(bench_prompts="\n".join(f"prompt {i}" for i in range(40))), "too large for this server"),
])
def test_benchmark_bad_input_is_refused_naming_the_field(client, overrides, message):
    values = dict(bench_preset="tiny-wan", bench_prompts="a red fox", bench_seeds="0", bench_sweep=BENCH_SWEEP)
    with pytest.raises(ValidationError) as error:
        client.predict(**(values | overrides), api_name="/benchmark")
    assert message in str(error.value)
