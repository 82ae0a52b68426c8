"""Test-wide settings: no hub, no analytics, before any library reads them."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
# A/A pairs (vdtome.measure.noise) of this test session only: never a developer's own record, never stale.
import tempfile

os.environ["VDTOME_NOISE_DIR"] = tempfile.mkdtemp(prefix="vdtome-test-noise-")

from pathlib import Path

import pytest

from benchmarks.app_process import start_app, stop_app

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("slow", "server", "browser")  # anything not marked one of these is a unit test (pytest.ini)


def pytest_collection_modifyitems(items):
    """Every test belongs to exactly one tier, so ``-m unit`` is the fast tier and nothing else."""
    for item in items:
        marked = [tier for tier in TIERS if item.get_closest_marker(tier)]
        if len(marked) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(marked)}: one tier only")
        if not marked:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def app_server_and_log(tmp_path_factory):
    """One app server for the API and browser tests of the app's mechanics (starting one costs ~10 s on
    2 cores), and its log. It defaults to the random tiny Wan (4 steps, 48 tokens: a run in about a second)
    rather than the trained tiny-shapes-128 (12 steps, 2,304 tokens), so the many runs these tests make stay
    quick; ``default_app_server`` serves the page as a visitor gets it. A closed session is released 1 s
    after its heartbeat (1 s apart) ends, so tests/test_sessions.py sees it within seconds."""
    tmp_dir = tmp_path_factory.mktemp("app")
    process, url, log = start_app(tmp_dir, {"VDTOME_DEFAULT_PRESET": "tiny-wan", "VDTOME_SESSION_GRACE_S": "1",
                                            "GRADIO_HEARTBEAT_INTERVAL": "1"})
    try:
        yield url, log
    finally:
        stop_app(process)


@pytest.fixture(scope="session")
def app_server(app_server_and_log):
    return app_server_and_log[0]


@pytest.fixture(scope="session")
def default_app_server(tmp_path_factory):
    """The app exactly as ``make run`` serves it (the trained tiny-shapes-128 model by default)."""
    tmp_dir = tmp_path_factory.mktemp("default-app")
    process, url, log = start_app(tmp_dir)
    try:
        yield url
    finally:
        stop_app(process)


def a_a_attempts(compare, is_no_difference, attempts: int = 2):
    """Run an A/A comparison (ratio 0: the same code on both sides) until its verdict is "no
    significant difference", at most ``attempts`` times; returns every attempt's output.

    The protocol's sign interval over 7 pairs covers 98.4 %: an A/A comparison on a busy machine is
    called faster or slower in about 1.6 % of requests by design. One independent rerun makes a
    chance failure 0.03 %, while a real asymmetry between the sides (overhead on one of them) fails
    every attempt, so the assertion still catches what it is for."""
    outputs = []
    for _ in range(attempts):
        outputs.append(compare())
        if is_no_difference(outputs[-1]):
            break
    return outputs


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a test file of tiny models (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    they gain nothing from intra-op threads, and on a busy machine threads contend (test_step_caches
    took minutes with two threads against seconds with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
