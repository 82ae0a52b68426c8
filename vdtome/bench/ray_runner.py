"""The benchmark on Ray: one actor per device holds a loaded pipeline and its baseline cache.

A task is one (prompt, seed) group with all its settings, run by one actor as a streaming
generator: each row comes back to the driver as soon as its comparison finished, and the driver
alone writes the rows file (:func:`vdtome.bench.runner.run_bench`). A group whose actor raised or died
comes back as a :class:`~vdtome.bench.runner.GroupFailure`; the driver retries it (its finished rows are
kept and skipped) up to its bound, then records the missing rows with the error. A dead actor is
restarted by Ray (``max_restarts``) and loads its pipeline again.

``RayRunner(plan, address="auto")`` joins an existing cluster; without an address it starts a
local one. The package is shipped to the workers as one of Ray's ``py_modules`` (with its presets
and shipped weights, from wherever it is installed here): every node needs the same dependencies
installed (``pip install vdtome[bench]`` or ``pip install -r requirements.txt``).
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vdtome.bench.runner import BenchPlan, BenchWorker, Event, Group, GroupFailure, error_text
from vdtome.engine.pipelines import ModelUnavailableError

# The package the workers import, shipped to them whole (with its presets and tiny weights) wherever it
# is installed here, and what they do not need from it (gitignore-style).
PACKAGE_DIR = Path(__file__).resolve().parent.parent
SHIPPING_EXCLUDES = ["**/__pycache__", "*.mp4", "*.png", "*.jsonl"]
MAX_RESTARTS = 2


class RayRunner:
    """Runs groups on Ray actors and streams ``(group, row or failure)`` back, as :func:`run_serial` does.

    ``workers``: actors (default: one per GPU of the cluster; one on a cluster without GPUs);
    ``cpus_per_worker``: CPUs each actor reserves (default: 1 beside a GPU, else the cluster's
    CPUs shared out) and torch's thread count in it; ``device``: the actors' torch device
    (default: ``cuda`` when the cluster has GPUs); ``init``: more ``ray.init`` arguments (a local
    cluster's ``num_cpus``); ``worker_class``: the actor's class (a :class:`BenchWorker`).
    """

    def __init__(self, plan: BenchPlan, address: str | None = None, workers: int | None = None,
                 cpus_per_worker: float | None = None, device: str | None = None,
                 init: dict[str, Any] | None = None, worker_class: type = BenchWorker) -> None:
        self.plan = plan
        self.actors, self.description = start_actors(worker_class, {}, address=address, workers=workers,
                                                     cpus_per_worker=cpus_per_worker, device=device, init=init)

    def __call__(self, todo: Sequence[tuple[Group, frozenset[str]]]) -> Iterator[Event]:
        import ray

        queue = deque(todo)
        idle = list(self.actors)
        running: dict[Any, tuple[Any, Group]] = {}
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                group, skip = queue.popleft()
                running[actor.run_group.remote(self.plan, group, skip)] = (actor, group)
            ready, _ = ray.wait(list(running), num_returns=1)
            stream = ready[0]
            actor, group = running[stream]
            try:
                row = ray.get(next(stream))
            except StopIteration:  # the group is done
                del running[stream]
                idle.append(actor)
                continue
            except ray.exceptions.RayError as error:  # the task raised, or its actor died (Ray restarts it)
                if isinstance(getattr(error, "cause", None), ModelUnavailableError):
                    raise error.cause from None  # no retry loads a model that is not there
                del running[stream]
                idle.append(actor)
                yield group, GroupFailure(group, ray_error_text(error))
                continue
            yield group, row

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def start_actors(worker_class: type, arguments: dict[str, Any], address: str | None = None,
                 workers: int | None = None, cpus_per_worker: float | None = None, device: str | None = None,
                 init: dict[str, Any] | None = None) -> tuple[list[Any], str]:
    """Joins the cluster at ``address`` (or starts a local one) and starts ``worker_class`` actors,
    each built with ``arguments`` and its ``device`` and ``threads``: ``workers`` of them (default:
    one per GPU of the cluster; one on a cluster without GPUs), each reserving one GPU or
    ``cpus_per_worker`` CPUs (default: the cluster's shared out). Returns them and their description.
    What cannot work is refused before Ray starts or waits (ValueError)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # the driver never reports usage
    if address and address.startswith("ray://"):
        raise ValueError(f"--ray-address {address}: Ray Client (ray://) cannot stream a task's results, which "
                         "this runner needs; run the command on a node of the cluster with --ray-address auto "
                         "(or HEAD:6379)")
    if workers is not None and workers < 1:
        raise ValueError(f"--ray-workers must be at least 1, got {workers}")
    if cpus_per_worker is not None and cpus_per_worker <= 0:
        raise ValueError(f"--ray-cpus must be above 0, got {cpus_per_worker:g}")
    if not ray.is_initialized():
        runtime_env = {"py_modules": [str(PACKAGE_DIR)], "excludes": SHIPPING_EXCLUDES,
                       "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "GRADIO_ANALYTICS_ENABLED": "False",
                                    "HF_HUB_DISABLE_TELEMETRY": "1"}}
        join(address, lambda: ray.init(address=address, runtime_env=runtime_env, include_dashboard=False,
                                       logging_level="WARNING", **(init or {})))
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = workers if workers is not None else max(gpus, 1)
    if gpus and count > gpus:
        raise ValueError(f"{count} workers asked for, but the cluster has {gpus} GPUs (one per worker)")
    total_cpus = float(resources.get("CPU", 0))
    cpus = cpus_per_worker or (1.0 if gpus else max(1.0, float(int(total_cpus) // count)))
    if cpus * count > total_cpus:  # Ray would wait for resources that never come
        raise ValueError(f"{count} workers x {cpus:g} CPUs need {cpus * count:g} CPUs; the cluster has "
                         f"{total_cpus:g}: use fewer --ray-workers or --ray-cpus")
    device = device or ("cuda" if gpus else "cpu")
    actor = ray.remote(worker_class).options(num_gpus=1 if gpus else 0, num_cpus=cpus, max_restarts=MAX_RESTARTS,
                                             max_task_retries=0)
    actors = [actor.remote(**arguments, device=device, threads=max(1, int(cpus))) for _ in range(count)]
    each = "1 GPU" if gpus else f"{cpus:g} CPU{'s' if cpus != 1 else ''}"
    return actors, f"{count} Ray actor{'s' if count > 1 else ''} ({each} each)"


def join(address: str | None, init: Callable[[], Any]) -> None:
    """``init()`` (ray.init) joining the cluster at ``address``; what keeps it from joining is said
    with what to do (ValueError), never as Ray's traceback.

    Ray 2.60 starts a cluster with token authentication once its machine holds a token (any local
    ``ray.init`` writes ``~/.ray/auth_token``). A driver joining with ``auto`` sends this machine's
    token, but one joining an explicit HOST:PORT sends none, and Ray retries for 20 s and fails with
    "Failed to connect". So for an explicit address the token is sent as for ``auto`` (unless
    RAY_AUTH_MODE says otherwise), and an address where nothing listens is refused at once (Ray
    would retry it for minutes)."""
    explicit = address not in (None, "auto")
    if explicit:
        _listening(address)
        if "RAY_AUTH_MODE" not in os.environ:
            # What ray.init does itself for "auto" (ray/_private/worker.py): this machine's token, if any.
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        init()
    except ConnectionError as error:
        if not explicit:
            raise
        token = _local_token()
        sent = f"this machine's token ({token})" if token else "no token: this machine has none"
        raise ValueError(
            f"--ray-address {address}: a Ray cluster answers there but did not let this driver join ({error}); it "
            f"sent {sent}. If the cluster uses token authentication (Ray's log above says 'Unauthenticated'), copy "
            "the head node's ~/.ray/auth_token to this machine (or set RAY_AUTH_TOKEN to it) and run again; or run "
            "the command on a node of the cluster with --ray-address auto") from None


def _listening(address: str) -> None:
    """Refuses at once an address where nothing accepts a connection."""
    host, _, port = address.rpartition(":") if ":" in address else (address, "", "6379")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except ValueError:
        raise ValueError(f"--ray-address {address}: give HOST:PORT (the head's GCS port, 6379 by default), or auto") \
            from None
    except OSError as error:
        raise ValueError(f"--ray-address {address}: nothing accepts a connection there ({error.strerror or error}). "
                         "Start the head with `ray start --head --port=PORT` and check that this machine reaches "
                         "it, or run the command on a node of the cluster with --ray-address auto") from None


def _local_token() -> str | None:
    """Where this machine's Ray token is (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return str(path) if path.is_file() else None


def ray_error_text(error: BaseException) -> str:
    """The user's exception inside a RayTaskError ("RuntimeError: boom"), else Ray's own first line."""
    cause = getattr(error, "cause", None)
    return error_text(cause if cause is not None and not isinstance(cause, type(error)) else error)
