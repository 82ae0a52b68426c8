"""The operator's limits, disk pruning, custom-weights confinement and the per-address queue limit."""

import asyncio
import os
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
from fastapi import HTTPException

from vdtome.core.presets import load_presets
from vdtome.engine.pipelines import CustomModelRefused, ModelUnavailableError, custom_model_source, from_pretrained
from vdtome.engine.request import ComparisonRequest, RequestError, resolve
from vdtome.engine.storage import prune
from vdtome.tome import ToMeConfig
from vdtome.web.limits import DEFAULT_WORK_FACTOR, ServiceLimits, default_work
from vdtome.web.serving import client_address, limit_visitors

PRESETS = load_presets()


def settings(**overrides):
    request = ComparisonRequest(preset="tiny-wan", prompt="a kite", methods=ToMeConfig(ratio=0.5))
    return resolve(ComparisonRequest(**(vars(request) | overrides)), PRESETS["tiny-wan"])[0]


def test_limits_from_the_environment():
    limits = ServiceLimits.from_env(PRESETS, {"VDTOME_QUEUE_PER_SESSION": "3", "VDTOME_MAX_WORK": "5e8, tiny-ltx=1e9"})
    assert limits.queue_per_session == 3 and limits.queue_per_address == 4  # the default
    assert limits.work_limit(PRESETS["tiny-ltx"]) == 10**9 and limits.work_limit(PRESETS["cogvideox-2b"]) == 5 * 10**8
    default = ServiceLimits.from_env(PRESETS, {})
    assert default.work_limit(PRESETS["tiny-wan"]) == DEFAULT_WORK_FACTOR * default_work(PRESETS["tiny-wan"])


@pytest.mark.parametrize("env, message", [
    ({"VDTOME_QUEUE_PER_SESSION": "two"}, "VDTOME_QUEUE_PER_SESSION must be a whole number, got 'two'"),
    ({"VDTOME_HISTORY_ROWS": "0"}, "VDTOME_HISTORY_ROWS must be at least 1"),
    ({"VDTOME_MAX_WORK": "tiny-wan=lots"}, "VDTOME_MAX_WORK: 'lots' is not a number"),
    ({"VDTOME_MAX_WORK": "tiny-wam=1e9"}, "VDTOME_MAX_WORK: unknown preset 'tiny-wam'"),
    ({"VDTOME_MAX_WORK": "inf"}, "must be a finite number"),
    ({"VDTOME_CUSTOM_MODEL_ROOT": "/nonexistent/models"}, "is not a folder"),
])
def test_a_malformed_operator_setting_stops_the_app_naming_it(env, message):
    with pytest.raises(ValueError) as error:
        ServiceLimits.from_env(PRESETS, env)
    assert message in str(error.value)


def test_the_work_limit_refuses_with_the_numbers_and_what_fits():
    limits = ServiceLimits.from_env(PRESETS, {})
    limits.check_work(PRESETS["tiny-wan"], settings())  # the defaults fit
    limits.check_work(PRESETS["tiny-wan"], settings(), points=DEFAULT_WORK_FACTOR)  # a 16-point sweep too
    with pytest.raises(RequestError) as error:
        limits.check_work(PRESETS["tiny-wan"], settings(steps=500))
    assert error.value.field == "steps"
    assert str(error.value).startswith(
        "this request is too large for this server: 2 sides x 7 timing rounds x 500 steps x 9 frames x 64x64 pixels "
        "= 258,048,000 frame-pixel steps; the limit for Tiny Wan 2.1")
    assert "is 33,030,144; at these settings at most 64 steps fit" in str(error.value)
    with pytest.raises(RequestError, match="x 17 sweep points"):
        limits.check_work(PRESETS["tiny-wan"], settings(), points=17)
    # Short timing rounds count their own steps: a real preset's default request fits its default limit,
    # 500 steps do not, and the message names both kinds of round.
    cog = PRESETS["cogvideox-2b"]
    default = resolve(ComparisonRequest("cogvideox-2b", "a kite", methods=ToMeConfig(ratio=0.5)), cog)[0]
    assert default.round_steps == 3 and default_work(cog) == 2 * (50 + 6 * 3) * 49 * 480 * 720
    limits.check_work(cog, default)
    tight = ServiceLimits.from_env(PRESETS, {"VDTOME_MAX_WORK": "cogvideox-2b=1e10"})
    with pytest.raises(RequestError, match=r"2 sides x 518 steps per side \(timing rounds: the first of 500 steps, "
                                           r"6 of 3\) x 49 frames .* at these settings at most 277 steps fit"):
        tight.check_work(cog, replace(default, steps=500))


def make_entry(path, size, age):
    path.mkdir()
    (path / "video.mp4").write_bytes(b"\0" * size)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def test_prune_bounds_count_and_size_oldest_first(tmp_path):
    for index in range(6):
        make_entry(tmp_path / f"run-{index}", 1000, age=100 - index)
    assert [p.name for p in prune(tmp_path, keep=4, max_bytes=10**6)] == ["run-0", "run-1"]
    assert [p.name for p in prune(tmp_path, keep=10, max_bytes=2500)] == ["run-2", "run-3"]
    assert [p.name for p in prune(tmp_path, keep=10, max_bytes=10)] == ["run-4"]  # the newest always stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-5"]


def test_custom_weights_stay_under_the_operators_root(tmp_path):
    root = tmp_path / "models"
    (root / "team" / "tiny").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "escape").symlink_to(tmp_path / "secret")
    assert custom_model_source("team/tiny", root) == str(root / "team" / "tiny")
    assert custom_model_source("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", root) == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    refused = {}
    for value in ("/etc", str(tmp_path / "secret"), "~/x", "../secret", "team/../../secret", "escape", "a\\b", "nope"):
        with pytest.raises(CustomModelRefused) as error:
            custom_model_source(value, root)
        refused[value] = str(error.value)
    assert all(str(root) not in message for message in refused.values())  # only what the visitor sent comes back
    assert "paths are not accepted" in refused["/etc"] and "paths are not accepted" in refused["../secret"]
    # An absent folder and a link out of the root read the same: nothing outside the root is revealed.
    assert refused["escape"] == refused["nope"].replace("'nope'", "'escape'")
    # Without a root only hub ids: a name is never looked up on this server's disk.
    assert custom_model_source("team/tiny", None) == "team/tiny"
    with pytest.raises(CustomModelRefused, match="must be a hub id such as owner/name: it is not a hub id"):
        custom_model_source("tiny", None)


def test_a_folder_that_is_not_a_pipeline_is_named_not_located(tmp_path):
    folder = tmp_path / "deep" / "models" / "broken"
    folder.mkdir(parents=True)
    with pytest.raises(ModelUnavailableError) as error:
        from_pretrained(PRESETS["tiny-wan"], str(folder))
    assert "'broken'" in str(error.value) and str(tmp_path) not in str(error.value)


class FakeQueue:
    def __init__(self):
        self.event_ids_to_events = {}

    async def push(self, body, request, username):
        event = SimpleNamespace(fn=SimpleNamespace(concurrency_id="gpu"), session_hash=body.session_hash,
                                request=request)
        self.event_ids_to_events[str(len(self.event_ids_to_events))] = event
        return True, "id", "success"


def test_one_address_cannot_take_the_queue_whatever_session_ids_it_sends():
    blocks = SimpleNamespace(_queue=FakeQueue(), fns={0: SimpleNamespace(concurrency_id="gpu")})
    limit_visitors(blocks, "gpu", per_session=2, per_address=3)
    here = SimpleNamespace(client=SimpleNamespace(host="10.0.0.1"), headers={})
    there = SimpleNamespace(client=SimpleNamespace(host="10.0.0.2"), headers={})

    async def join(session, request):
        return await blocks._queue.push(SimpleNamespace(fn_index=0, session_hash=session), request, None)

    async def scenario():
        for session in ("a", "b", "c"):
            assert (await join(session, here))[0]
        with pytest.raises(HTTPException) as error:
            await join("d", here)
        assert error.value.status_code == 429 and "at most 3 per address" in error.value.detail
        assert (await join("d", there))[0] and (await join("d", there))[0]  # another address is not held up
        with pytest.raises(HTTPException) as error:
            await join("d", there)  # its third: over the session's limit
        assert "you already have 2 comparisons queued or running" in error.value.detail

    asyncio.run(scenario())


def test_a_visitors_address_on_a_space_is_the_first_forwarded_hop(monkeypatch):
    request = SimpleNamespace(client=SimpleNamespace(host="10.16.3.80"),
                              headers={"x-forwarded-for": "203.0.113.7, 10.1.0.2"})
    assert client_address(request) == "10.16.3.80"  # off a Space: the socket's peer
    monkeypatch.setenv("SPACE_ID", "someone/vdtome")
    assert client_address(request) == "203.0.113.7"  # on a Space the peer is the Hub's proxy, the same for everyone
