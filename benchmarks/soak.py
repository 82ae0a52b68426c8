"""Soak: does the server's memory stay flat when every call comes from a new visitor?

On a public Space every visitor is a new Gradio session, and whatever the server keeps per session
must be released when the visitor leaves (vdtome.web.sessions). This drives the app's public
``/compare`` endpoint through ``gradio_client`` on loopback, as the user trial did:

* ``--sessions N`` calls, each from a new session (a new ``Client``, closed after its call), in
  ``--waves`` waves, ``--concurrency`` clients at a time;
* then ``--one-session N`` calls from one client (one session, its history growing);

and prints after each wave the server's resident memory (the server process and its children,
psutil) and the sessions it holds (its ``vdtome: sessions`` log line; not available for a server
started elsewhere without ``--log``). Acceptance (issue: the server's memory grows with every
visitor): 1,000 calls from new sessions grow the RSS by under 50 MiB after the first wave.

    python benchmarks/soak.py --sessions 1000 --waves 10 --concurrency 4 --one-session 100
    python benchmarks/soak.py --url http://127.0.0.1:7860/ --pid 1234 --log app.log --sessions 200

Without ``--url`` it starts ``python app.py`` on a free loopback port with the preset as the
default, and ``--ttl``/``--grace`` (VDTOME_SESSION_TTL_S, VDTOME_SESSION_GRACE_S) if given, so a
run can show the release within its own run time; it prints the settings it ran with.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from gradio_client import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.app_process import start_app, stop_app  # noqa: E402
from vdtome.core.presets import load_presets  # noqa: E402
from vdtome.web.limits import ENV_SESSION_GRACE_S, ENV_SESSION_TTL_S, ENV_SESSIONS_MAX, ServiceLimits  # noqa: E402
from vdtome.web.sessions import STATUS_LINE  # noqa: E402

PROMPT = "A red square slides across a blue background."
SETTINGS = (ENV_SESSION_TTL_S, ENV_SESSION_GRACE_S, ENV_SESSIONS_MAX, "VDTOME_QUEUE_PER_ADDRESS", "VDTOME_QUEUE_SIZE",
            "GRADIO_HEARTBEAT_INTERVAL")


def rss_mib(pid: int) -> float:
    """Resident memory of the process and its children, MiB."""
    process = psutil.Process(pid)
    total = 0
    for p in (process, *process.children(recursive=True)):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def held_sessions(log: Path | None) -> str:
    """The sessions the server holds, from its latest ``vdtome: sessions`` line ("?" if none yet)."""
    if log is None or not log.exists():
        return "?"
    found = STATUS_LINE.findall(log.read_text(errors="replace"))
    return found[-1] if found else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (else app.py is started here)")
    parser.add_argument("--pid", type=int, help="the running server's process id (with --url)")
    parser.add_argument("--log", type=Path, help="the running server's log, for its session count (with --url)")
    parser.add_argument("--sessions", type=int, default=1000, help="calls, each from a new session")
    parser.add_argument("--waves", type=int, default=10, help="waves the new-session calls are split into")
    parser.add_argument("--concurrency", type=int, default=4, help="clients calling at once")
    parser.add_argument("--one-session", type=int, default=100, help="calls from one session, after the waves")
    parser.add_argument("--preset", default="tiny-shapes")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="timing rounds per comparison")
    parser.add_argument("--ttl", type=int, help="VDTOME_SESSION_TTL_S for the server started here")
    parser.add_argument("--grace", type=int, help="VDTOME_SESSION_GRACE_S for the server started here")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds to wait after the last call before the final reading (heartbeats close, "
                             "the grace runs out)")
    args = parser.parse_args()
    if args.url and not args.pid:
        parser.error("--url needs --pid (the server whose memory is read)")
    if args.url:
        print(f"server: {args.url} (pid {args.pid}); its settings are its own")
        soak(args, args.url, args.pid, args.log)
        return
    env = {}
    if args.ttl is not None:
        env[ENV_SESSION_TTL_S] = str(args.ttl)
    if args.grace is not None:
        env[ENV_SESSION_GRACE_S] = str(args.grace)
    # Every client is on loopback, one address: let it have as many calls queued as run here.
    env["VDTOME_QUEUE_PER_ADDRESS"] = str(max(4, args.concurrency))
    began = time.monotonic()
    env |= {"VDTOME_DEFAULT_PRESET": args.preset, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    try:
        process, url, log = start_app(Path(tempfile.mkdtemp(prefix="vdtome-soak-")), env, timeout=300.0)
    except RuntimeError as error:
        raise SystemExit(str(error)) from None
    try:
        print(f"server: app.py started in {time.monotonic() - began:.0f} s on {url} (pid {process.pid}, log {log})")
        defaults = {ENV_SESSION_TTL_S: ServiceLimits.session_ttl_s, ENV_SESSION_GRACE_S: ServiceLimits.session_grace_s,
                    ENV_SESSIONS_MAX: ServiceLimits.sessions_max, "VDTOME_QUEUE_SIZE": ServiceLimits.queue_size,
                    "GRADIO_HEARTBEAT_INTERVAL": 15}
        shown = {name: (os.environ | env).get(name, f"{defaults.get(name)} (default)") for name in SETTINGS}
        print("settings: " + ", ".join(f"{name}={value}" for name, value in shown.items()))
        soak(args, url, process.pid, log)
    finally:
        stop_app(process)


def soak(args: argparse.Namespace, url: str, pid: int, log: Path | None) -> None:
    """The waves of new-session calls, then the one-session calls, with the server's memory after each."""
    preset = load_presets()[args.preset]
    print(f"calls: /compare, preset {args.preset} ({preset.num_frames} frames, {preset.height}x{preset.width}), "
          f"{args.steps} steps, {args.rounds} timing round(s); {args.sessions} from new sessions in {args.waves} "
          f"waves, {args.concurrency} at a time; then {args.one_session} from one session", flush=True)
    counter = iter(range(10**9))
    lock = threading.Lock()

    def call(client: Client) -> None:
        with lock:
            seed = next(counter) % 8
        client.predict(preset=args.preset, prompt=PROMPT, seed=seed, frames=preset.num_frames,
                       height=preset.height, width=preset.width, steps=args.steps, rounds=args.rounds,
                       api_name="/compare")

    def new_session_call(_: int) -> None:
        client = Client(url, verbose=False, download_files=False)
        try:
            call(client)
        finally:
            client.close()

    start_rss = rss_mib(pid)
    print(f"\nbefore any call: RSS {start_rss:.0f} MiB, sessions held {held_sessions(log)}")
    print(f"{'wave':>4} {'calls':>6} {'s/call':>7} {'RSS MiB':>8} {'vs wave 1':>9} {'held':>5}")
    first = None
    per_wave = [args.sessions // args.waves + (i < args.sessions % args.waves) for i in range(args.waves)]
    done = 0
    for wave, size in enumerate(per_wave, 1):
        began = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(new_session_call, range(size)))
        done += size
        seconds = (time.monotonic() - began) / max(size, 1)
        rss = rss_mib(pid)
        first = rss if first is None else first
        print(f"{wave:>4} {done:>6} {seconds:>7.2f} {rss:>8.0f} {rss - first:>+9.0f} {held_sessions(log):>5}",
              flush=True)
    if args.one_session:
        client = Client(url, verbose=False, download_files=False)
        began = time.monotonic()
        before = rss_mib(pid)
        try:
            for i in range(args.one_session):
                call(client)
                if (i + 1) % max(1, args.one_session // 4) == 0:
                    rss = rss_mib(pid)
                    print(f"one session: {i + 1:>4} calls ({(time.monotonic() - began) / (i + 1):.2f} s/call), "
                          f"RSS {rss:.0f} MiB ({rss - before:+.0f} since its first call), sessions held "
                          f"{held_sessions(log)}", flush=True)
        finally:
            client.close()
    time.sleep(args.settle)
    rss = rss_mib(pid)
    print(f"after {args.settle:.0f} s without calls: RSS {rss:.0f} MiB ({rss - (first or start_rss):+.0f} vs wave 1), "
          f"sessions held {held_sessions(log)}")
    if first is not None and args.waves > 1:
        verdict = "PASS" if rss - first < 50 else "FAIL"
        print(f"{verdict}: RSS growth after the first wave {rss - first:+.0f} MiB (limit: under 50 MiB)")


if __name__ == "__main__":
    main()
