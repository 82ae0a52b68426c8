"""The app as a public service, on live servers over loopback: abandoned runs stop and write
nothing, the queue is the only place requests wait, one visitor cannot take the queue, every bad
value sent as raw HTTP is refused naming its field, no uploads, instances keep to their own files."""

import json
import re
import subprocess
import sys
import time

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import ValidationError
from gradio_client.utils import QueueError

from benchmarks.app_process import start_app, stop_app
from vdtome.web.ui import api_fields, method_defaults

pytestmark = pytest.mark.server

PROMPT = "A paper boat drifts down a rain-filled gutter past glowing shop windows."
# A run of about two minutes on 2 cores (7 rounds x 2 sides x 500 steps, each call about 5 s),
# allowed by this server's work limit; a quick one (1 round, 2 steps) for "the next request
# starts at once". The runs are abandoned early in round 1's baseline call, seconds from its decode
# (a decode has no step to stop at).
LONG = dict(prompt=PROMPT, steps=500)
QUICK = dict(prompt=PROMPT, rounds=1, steps=2)
QUICK_SECONDS = 20  # a quick run takes about 1 s; the long run it followed had a minute left
SERVICE_ENV = {
    "VDTOME_DEFAULT_PRESET": "tiny-wan",  # the quick random model: these tests are about the service
    "VDTOME_MAX_WORK": "tiny-wan=4e8",
    "VDTOME_QUEUE_SIZE": "3",
    "VDTOME_QUEUE_PER_SESSION": "2",
    "VDTOME_QUEUE_PER_ADDRESS": "6",
    "VDTOME_HISTORY_ROWS": "3",
}
# The form as raw HTTP sends it (the API's parameter order), quick settings.
GOOD = ["tiny-wan", PROMPT, "", 0, 9, 64, 64, 2, 5.0, 1, 0.5, 1, 2, 2, "bipartite", "all blocks", ["self-attention"],
        1, "shared", True, True, ""]
NAMES = ["preset", "prompt", "negative_prompt", "seed", "frames", "height", "width", "steps", "guidance", "rounds",
         "ratio", "stride_t", "stride_y", "stride_x", "strategy", "blocks", "targets", "reuse_steps", "matching",
         "random_destinations", "local_window", "custom_model"]
# GOOD is what a client written when token merging was the only method sends; the parameters added
# since (method switches and fields) take their defaults. FULL sends every one of them.
FULL = GOOD + [method_defaults()[name] for name in api_fields(sweep=False)[len(GOOD):]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_dir = tmp_path_factory.mktemp("service")
    process, url, log = start_app(tmp_dir, SERVICE_ENV)
    try:
        yield url, log, tmp_dir
    finally:
        stop_app(process)


def output_folders(tmp_dir) -> set:
    """Comparison folders of every app instance started under ``tmp_dir``."""
    return set(tmp_dir.glob("gradio/vdtome-app-*/outputs/run-*"))


def wait_running(job, timeout=120):
    """Until the job reports a timed denoising step (loading and warm-ups are over)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = job.status().progress_data
        if progress and "round 1/7 · baseline · step" in (progress[0].desc or ""):
            return
        time.sleep(0.05)
    raise AssertionError("the job never reported progress")


def timed_quick_run(client) -> float:
    started = time.monotonic()
    client.predict(**QUICK, api_name="/compare")
    return time.monotonic() - started


def test_a_cancelled_job_stops_at_once_writes_nothing_and_the_next_starts_at_once(server):
    url, log, tmp_dir = server
    client = Client(url, verbose=False)
    before = output_folders(tmp_dir)
    job = client.submit(**LONG, api_name="/compare")
    wait_running(job)
    started = time.monotonic()
    job.cancel()  # /cancel returns once the worker has stopped
    cancel_seconds = time.monotonic() - started
    assert cancel_seconds < 5, cancel_seconds  # a step takes ~10 ms; the run had about two minutes left
    assert timed_quick_run(client) < QUICK_SECONDS
    assert "stopping a comparison: it was cancelled" in log.read_text()
    assert_stopped_within_a_step(log)
    assert len(output_folders(tmp_dir) - before) == 1  # the quick run's; the cancelled run wrote nothing


STOPPED = re.compile(r"comparison cancelled after (\d+) of (\d+) denoising steps, (\d+) ms after the cancel "
                     r"\(the last step took (\d+) ms\)")


def assert_stopped_within_a_step(log):
    """The engine logs when it stopped: steps done, milliseconds since the cancel flag was set, and
    how long the step it stopped after took; stopping at the end of the step in progress means the
    former is at most the latter (50 ms for a stop between two calls, where no step is running)."""
    done, total, after_ms, step_ms = (int(x) for x in STOPPED.findall(log.read_text())[-1])
    assert 0 < done < total / 2
    assert after_ms <= step_ms + 50, (after_ms, step_ms)


KILLED_CLIENT = """
import sys, time
from gradio_client import Client
job = Client(sys.argv[1], verbose=False).submit(prompt="a kite", steps=500, api_name="/compare")
def stage():
    progress = job.status().progress_data
    return (progress[0].desc or "") if progress else ""
while "round 1/7 · baseline · step" not in stage():
    time.sleep(0.05)
print("running", flush=True)
time.sleep(600)
"""

CLOSED_STREAM = """
import json, sys, httpx
data = json.loads(sys.argv[2])
event = httpx.post(sys.argv[1] + "gradio_api/call/compare", json={"data": data}).json()["event_id"]
with httpx.stream("GET", sys.argv[1] + f"gradio_api/call/compare/{event}", timeout=600) as stream:
    print("running", flush=True)
    for _ in stream.iter_raw():
        pass
"""


@pytest.mark.parametrize("script", [KILLED_CLIENT, CLOSED_STREAM], ids=["killed gradio_client", "closed raw stream"])
def test_a_client_that_goes_away_stops_its_run(server, script):
    url, log, tmp_dir = server
    before = output_folders(tmp_dir)
    stops = log.read_text().count("its client disconnected")
    long = list(GOOD)
    long[NAMES.index("steps")], long[NAMES.index("rounds")] = 500, 7
    client = subprocess.Popen([sys.executable, "-c", script, url, json.dumps(long)], stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "running"
    time.sleep(2)  # it is generating: round 1's baseline call (about 5 s) is under way
    client.kill()
    client.wait()
    assert timed_quick_run(Client(url, verbose=False)) < QUICK_SECONDS
    assert log.read_text().count("its client disconnected") == stops + 1
    assert_stopped_within_a_step(log)
    assert len(output_folders(tmp_dir) - before) == 1  # only the quick run's


def test_queue_full_and_per_session_limits_say_so(server):
    url, log, _ = server
    first, second, third = (Client(url, verbose=False) for _ in range(3))
    jobs = [first.submit(**LONG, api_name="/compare")]
    wait_running(jobs[0])
    jobs.append(first.submit(**LONG, api_name="/compare"))
    time.sleep(0.5)
    with pytest.raises(httpx.HTTPStatusError) as refused:
        first.predict(**QUICK, api_name="/compare")
    assert refused.value.response.status_code == 429
    assert refused.value.response.json()["detail"] == (
        "you already have 2 comparisons queued or running; this server takes at most 2 per visitor at a time: "
        "wait for one to finish, or cancel it")
    jobs += [second.submit(**LONG, api_name="/compare") for _ in range(2)]
    time.sleep(0.5)  # 1 running, 3 queued: the queue (3 places) is full
    with pytest.raises(QueueError, match="Queue is full"):
        third.predict(**QUICK, api_name="/compare")
    raw = httpx.post(url + "gradio_api/call/compare", json={"data": GOOD})
    assert raw.status_code == 503 and raw.json()["detail"].startswith("Queue is full. Max size is 3")
    for job in jobs:
        job.cancel()
    assert timed_quick_run(third) < QUICK_SECONDS


def raw_call(url: str, data=None, body: str | None = None, endpoint: str = "compare"):
    """(status, message): the join's refusal detail, or the run's outcome from its event stream."""
    content = body if body is not None else json.dumps({"data": data})
    joined = httpx.post(f"{url}gradio_api/call/{endpoint}", content=content,
                        headers={"content-type": "application/json"})
    if joined.status_code != 200:
        return joined.status_code, joined.json()["detail"]
    event = joined.json()["event_id"]
    stream = httpx.get(f"{url}gradio_api/call/{endpoint}/{event}", timeout=120).text
    kind = [line for line in stream.splitlines() if line.startswith("event:")][-1].split(": ")[1]
    return 200, kind


def with_value(name, value):
    data = list(GOOD)
    data[NAMES.index(name)] = value
    return data


BAD_INPUTS = [
    # (name, how it is sent, field that must be named, words of the rule)
    ("fractional seed", with_value("seed", 1.5), "seed", "seed must be a whole number, got 1.5"),
    ("NaN seed", json.dumps({"data": GOOD}).replace(', 0, 9, 64', ', NaN, 9, 64'), "seed",
     "seed must be a whole number, got nan"),
    ("infinite steps", json.dumps({"data": GOOD}).replace(', 64, 2, 5.0', ', 64, Infinity, 5.0'), "steps",
     "steps must be a whole number, got inf"),
    ("text for steps", with_value("steps", "abc"), "steps", "steps must be a whole number, got 'abc'"),
    ("fractional frames", with_value("frames", 9.5), "frames", "frames must be a whole number, got 9.5"),
    ("string for a boolean", with_value("random_destinations", "false"), "random_destinations",
     "random destinations must be true or false, got 'false'"),
    ("number for a boolean", with_value("local_window", 1), "local_window",
     "local matching window must be true or false, got 1"),
    ("list for text", with_value("prompt", ["a", "b"]), "prompt", "prompt must be text, got a list"),
    ("lone surrogate", with_value("prompt", "\ud800 a boat"), "prompt", "prompt is not valid Unicode"),
    ("null targets", with_value("targets", None), "targets", "merge targets must be a list of names"),
    ("string targets", with_value("targets", "self-attention"), "targets", "merge targets must be a list"),
    ("ratio above the stride's cap", with_value("ratio", 0.9), "ratio",
     "merge ratio must be between 0 and 0.75 for stride (1, 2, 2)"),
    ("text ratio", with_value("ratio", "half"), "ratio", "merge ratio must be a number, got 'half'"),
    ("stride below the slider", with_value("stride_y", 0), "stride_y", "stride y must be between 1 and 9, got 0"),
    ("unknown strategy", with_value("strategy", "random"), "strategy", "strategy must be one of 'bipartite', 'attnbin'"),
    ("list for a choice", with_value("blocks", ["all blocks"]), "blocks", "blocks must be one of"),
    ("unknown preset", with_value("preset", "nope"), "preset", "model preset must be one of tiny-shapes-128, tiny-shapes, tiny-wan"),
    ("GPU preset on a CPU host", with_value("preset", "cogvideox-2b"), "preset", "needs a GPU"),
    ("negative guidance", with_value("guidance", -1), "guidance", "guidance must be between 0 and 50, got -1"),
    ("height off the grid", with_value("height", 70), "height", "height must be a multiple of 16"),
    ("zero rounds", with_value("rounds", 0), "rounds", "timing rounds must be between 1 and 20, got 0"),
    ("request above the work limit", with_value("steps", 500)[:9] + [20] + GOOD[10:], "steps",
     "too large for this server: 2 sides x 20 timing rounds x 500 steps x 9 frames x 64x64 pixels"),
    ("custom weights switched off", with_value("custom_model", "/etc"), "custom_model", "custom model ids are switched off"),
    ("huge width", with_value("width", 1e300), "width", "width must be between 1 and 10000, got 1e+300"),
]


@pytest.mark.parametrize("sent, field, rule", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_a_bad_value_sent_as_raw_http_is_refused_naming_its_field(server, sent, field, rule):
    url, _, _ = server
    status, detail = raw_call(url, body=sent) if isinstance(sent, str) else raw_call(url, sent)
    assert status == 422, detail
    refused = [entry for entry in detail if entry["is_valid"] is False]
    assert len(refused) == 1 and refused[0]["parameter_name"] == field
    assert rule in refused[0]["message"]


@pytest.mark.parametrize("body, rule", [
    (json.dumps({"data": GOOD[:5]}), "this endpoint takes 22 values (preset, prompt, negative_prompt, seed, frames, "
                                      "height,"),
    (json.dumps({"data": GOOD[:5]}), "got 5: missing height, width, steps"),
    (json.dumps({"data": [*FULL, 1, 2]}), f"got {len(FULL) + 2}: too many"),
    # A 23rd value would land where the session's history goes, and be dropped without a word.
    (json.dumps({"data": [*FULL, [["forged"]]]}),
     f"got {len(FULL) + 1}: too many (the session's history is kept on the server"),
    # A value where a method's switch goes is checked like any other.
    (json.dumps({"data": [*GOOD, "yes"]}), None),
])
def test_missing_or_extra_values_are_named(server, body, rule):
    url, _, _ = server
    status, detail = raw_call(url, body=body)
    if rule is None:
        assert status == 422 and "use token merging (ToMe) must be true or false, got 'yes'" in json.dumps(detail)
    else:
        assert status == 400 and rule in detail


def test_the_server_keeps_serving_after_every_refusal(server):
    """Every bad body above, one after another (refusals are cheap: they never reach the queue's
    worker), then a good run with the method switches left out and one with all of them."""
    url, _, _ = server
    malformed = [json.dumps({"data": GOOD[:5]}), json.dumps({"data": [*FULL, 1, 2]}),
                 json.dumps({"data": [*FULL, [["forged"]]]}), json.dumps({"data": [*GOOD, "yes"]})]
    for sent in [case[1] for case in BAD_INPUTS] + malformed:
        status, _ = raw_call(url, body=sent) if isinstance(sent, str) else raw_call(url, sent)
        assert status in (400, 422), sent
    assert raw_call(url, GOOD) == (200, "complete")
    assert raw_call(url, FULL) == (200, "complete")


def test_routes_around_the_queue_are_closed_and_named_values_are_checked(server):
    url, _, tmp_dir = server
    before = output_folders(tmp_dir)
    for path, body in (("run/compare", {"data": [*GOOD, None]}), ("run/predict", {"data": [*GOOD, None], "fn_index": 1}),
                       ("api/compare", {"data": GOOD})):
        direct = httpx.post(f"{url}gradio_api/{path}", json=body)
        assert direct.status_code == 404 and "join the queue" in direct.json()["detail"], (path, direct.text)
    assert output_folders(tmp_dir) == before  # nothing ran outside the queue
    unknown = httpx.post(f"{url}gradio_api/run/nope", json={"data": []})
    assert unknown.status_code == 404 and unknown.json()["detail"].startswith("no API endpoint named /nope")
    named = dict(zip(NAMES, GOOD))
    for body, rule in (({**named, "bogus": 1}, "/compare has no parameter 'bogus'; it takes preset, prompt, "),
                       ({"data": GOOD}, "/compare has no parameter 'data'"),
                       ([1, 2], "/call/v2/compare takes a JSON object of named values")):
        refused = httpx.post(f"{url}gradio_api/call/v2/compare", json=body)
        assert refused.status_code == 400 and rule in refused.json()["detail"], refused.text
    accepted = httpx.post(f"{url}gradio_api/call/v2/compare", json={**named, "seed": 1.5})
    assert accepted.status_code == 422  # named values meet the same checks
    assert httpx.post(f"{url}gradio_api/call/v2/compare", json=named).status_code == 200


@pytest.mark.parametrize("ratios, rule", [
    (None, 'sweep values must be text such as "0.1, 0.3, 0.5", got null'),
    ("1e-400", "sweep values: '1e-400' is not a number written like 0.25"),
    ("0.1, 0.1", "sweep values: 0.1 is listed twice"),
])
def test_a_sweep_refuses_missing_or_loose_ratios(server, ratios, rule):
    url, _, _ = server
    status, detail = raw_call(url, [*GOOD, ratios], endpoint="sweep")
    assert status == 422
    assert [(e["parameter_name"], e["message"]) for e in detail if not e["is_valid"]] == [("ratios", rule)]


def test_an_empty_sweep_is_refused_through_gradio_client(server):
    url, _, _ = server
    with pytest.raises(ValidationError, match="sweep values are empty"):
        Client(url, verbose=False).predict(prompt=PROMPT, ratios="  ", api_name="/sweep")


def test_no_uploads_and_unknown_endpoints_are_named(server):
    url, _, tmp_dir = server
    for size in (10, 2 * 2**20):
        upload = httpx.post(url + "gradio_api/upload", files={"files": ("clip.mp4", b"\0" * size)})
        assert (upload.status_code, upload.json()["detail"]) == (403, "this app takes no file uploads")
    assert not list(tmp_dir.glob("gradio/**/clip.mp4"))
    for path in ("gradio_api/call/nope", "gradio_api/call/v2/nope"):
        missing = httpx.post(url + path, json={"data": []})
        assert missing.status_code == 404
        assert missing.json()["detail"] == "no API endpoint named /nope; this app's endpoints are /benchmark, /compare, /sweep, /tune"


def test_session_history_is_capped(server):
    url, _, _ = server
    client = Client(url, verbose=False)
    for seed in range(4):
        outputs = client.predict(**QUICK, seed=seed, api_name="/compare")
    assert [row[0] for row in outputs[9]["data"]] == [2, 3, 4]  # the operator's cap of 3 rows, newest kept


def served_video(url: str) -> str:
    """The URL of a fresh comparison's baseline video, as the page would fetch it."""
    joined = httpx.post(f"{url}gradio_api/call/compare", json={"data": GOOD}).json()["event_id"]
    stream = httpx.get(f"{url}gradio_api/call/compare/{joined}", timeout=120).text
    outputs = json.loads([line for line in stream.splitlines() if line.startswith("data:")][-1][5:])
    return outputs[1]["url"]


def test_two_instances_on_one_host_keep_to_their_own_files(server):
    url, _, tmp_dir = server
    own_log = tmp_dir / "other"
    own_log.mkdir()
    shared = {"GRADIO_TEMP_DIR": str(tmp_dir / "gradio"), "TMPDIR": str(tmp_dir)}  # the first server's temp folders
    other, other_url, _ = start_app(own_log, SERVICE_ENV | shared | {"VDTOME_OUTPUTS_MB": "1"})
    try:
        mine = served_video(url)
        folders = output_folders(tmp_dir)
        for _ in range(16):  # about 70 kB each: the other instance prunes its own beyond 1 MiB
            theirs = served_video(other_url)
        assert folders <= output_folders(tmp_dir)  # nothing of this instance was pruned
        assert httpx.get(mine).status_code == 200 and httpx.get(theirs).status_code == 200
        path = mine.split("file=", 1)[1]
        assert httpx.get(f"{other_url}gradio_api/file={path}").status_code in (403, 404)  # not served across
        their_instance = next(p for p in tmp_dir.glob("gradio/vdtome-app-*") if p.name in theirs)
        kept = [sum(f.stat().st_size for f in run.iterdir()) for run in their_instance.glob("outputs/run-*")]
        assert len(kept) < 16 and sum(kept) <= 2**20 + max(kept)  # bounded by size: 1 MiB + the newest run
    finally:
        stop_app(other)
    assert not their_instance.exists()  # an instance removes its folder when it stops
