"""Honest measurement: timers, a phase split of a diffusers pipeline call, memory meters, environment.

Rules this module keeps:

* **CUDA is asynchronous.** On a CUDA device every time mark is a recorded
  ``torch.cuda.Event(enable_timing=True)`` and elapsed times are read only after a synchronisation,
  so they measure GPU work, not kernel launches. On any other device marks are
  ``time.perf_counter()`` values. Every mark also keeps the host time, which orders marks.
* **No CUDA on CPU.** When the device is not CUDA nothing here touches ``torch.cuda`` (not even
  ``torch.cuda.is_available()``), so a CPU run never initialises a CUDA context.
* **Reversible instrumentation.** :func:`phase_hooks` uses removable torch forward hooks on the text
  encoders and denoisers and wraps ``pipe.vae.decode`` as an *instance* attribute only; everything
  is restored in ``finally``, also when the pipeline raises.
* **Never crash on a missing meter.** Memory fields that cannot be measured are ``None`` with a
  reason in ``MemoryReport.unavailable_reason``.

Phase definitions used by :func:`phase_hooks` (all in milliseconds, summed over calls):

``text_encoding``
    Time inside the forward of every text encoder component (``text_encoder``, ``text_encoder_2``,
    ...), e.g. the positive and the negative prompt. Tokenisation is not included.
``denoising``
    From the start of the first denoiser forward (``transformer``, ``transformer_2`` or ``unet``)
    to the start of the VAE decode that follows it. It covers every step of the loop: all denoiser
    calls (both CFG branches), the classifier-free-guidance arithmetic, ``scheduler.step`` including
    the last one, and the step callbacks. It excludes prompt encoding, timestep / latent preparation
    before the first denoiser call, and the decode. If the pipeline does not decode
    (``output_type="latent"``) the interval ends at the end of the last denoiser forward (the final
    scheduler update, a few element-wise ops, is then left out). Several pipeline calls inside one
    ``phase_hooks`` block give several intervals, summed.
``vae_decode``
    Time inside ``pipe.vae.decode`` (outermost call only; sliced / tiled decodes that call
    ``decode`` again are not double counted). Post-processing to numpy / PIL is not included.
``end_to_end``
    Whatever the caller wraps in ``timer.phase("end_to_end")``; :func:`timed_call` wraps the whole
    ``pipe(...)`` call after a device synchronisation.

Per-step times (:class:`StepTimer`, used as ``callback_on_step_end``): step ``i`` lasts from the end
of step ``i - 1``'s callback to the end of step ``i``'s callback; step 0 is measured from the
``start()`` mark, which :func:`phase_hooks` takes at the first denoiser call. The steps therefore
tile the ``denoising`` interval (minus the tail between the last callback and the decode).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.metadata
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .denoisers import named_denoisers

__all__ = [
    "TEXT_ENCODING",
    "DENOISING",
    "VAE_DECODE",
    "END_TO_END",
    "PHASES",
    "resolve_device",
    "sync",
    "Stopwatch",
    "PhaseTimer",
    "StepTimer",
    "TimingReport",
    "phase_hooks",
    "timed_call",
    "gc_paused",
    "MemoryMonitor",
    "MemoryReport",
    "environment",
    "environment_line",
    "attention_info",
    "benchmark_allocator",
    "retain_freed_host_memory",
    "is_allocation_failure",
    "release_memory",
]

TEXT_ENCODING = "text_encoding"
DENOISING = "denoising"
VAE_DECODE = "vae_decode"
END_TO_END = "end_to_end"
PHASES = (TEXT_ENCODING, DENOISING, VAE_DECODE, END_TO_END)



# ------------------------------------------------------------------------------------------ devices


def resolve_device(obj: Any = None) -> torch.device:
    """The device an object computes on.

    Accepts ``None`` (CPU), a ``torch.device``, a string (``"cuda"``, ``"cuda:1"``, ``"cpu"``), an int
    (CUDA index), a diffusers pipeline (its ``_execution_device``, which follows model offloading), an
    ``nn.Module`` (its first parameter) or anything with a ``.device``.
    """
    if obj is None:
        return torch.device("cpu")
    if isinstance(obj, torch.device):
        return obj
    if isinstance(obj, str):
        return torch.device(obj)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return torch.device("cuda", obj)
    if isinstance(obj, torch.nn.Module):
        for tensor in obj.parameters():
            return tensor.device
        for tensor in obj.buffers():
            return tensor.device
        return torch.device("cpu")
    try:
        device = obj._execution_device  # DiffusionPipeline
    except Exception:
        device = getattr(obj, "device", None)
    if device is None:
        raise TypeError(f"cannot tell the device of {type(obj).__name__}")
    return torch.device(device)


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def sync(device: Any = None) -> None:
    """Wait for all queued work on ``device`` (CUDA: ``torch.cuda.synchronize``; MPS likewise).

    A no-op on CPU, where PyTorch ops are synchronous; CPU never touches ``torch.cuda``.
    """
    device = resolve_device(device)
    if _is_cuda(device):
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------------------------- clock


@dataclass(frozen=True)
class _Mark:
    host: float  # time.perf_counter(); orders marks, and is the time itself off CUDA
    event: Any = None  # a recorded torch.cuda.Event on CUDA


class _Clock:
    """Time marks on one device: CUDA events on CUDA, ``perf_counter`` elsewhere."""

    def __init__(self, device: Any = None):
        self.device = resolve_device(device)
        self.cuda = _is_cuda(self.device)
        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device} requested but CUDA is not available")

    @property
    def name(self) -> str:
        return "cuda_event" if self.cuda else "perf_counter"

    def mark(self) -> _Mark:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return _Mark(time.perf_counter(), event)
        return _Mark(time.perf_counter())

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed_ms(self, start: _Mark, end: _Mark) -> float:
        """Milliseconds from ``start`` to ``end``; on CUDA call :meth:`synchronize` first."""
        if self.cuda:
            return float(start.event.elapsed_time(end.event))
        return (end.host - start.host) * 1e3


class Stopwatch:
    """Time one interval on a device.

    >>> with Stopwatch("cpu") as sw:
    ...     work()
    >>> sw.elapsed_ms

    On CUDA the start and end are CUDA events and :meth:`stop` (or leaving the ``with`` block)
    waits for the end event, so ``elapsed_ms`` is the GPU time of the work queued in between.
    """

    def __init__(self, device: Any = None):
        self._clock = _Clock(device)
        self._start: _Mark | None = None
        self._end: _Mark | None = None
        self._elapsed: float | None = None

    @property
    def clock(self) -> str:
        return self._clock.name

    @property
    def device(self) -> torch.device:
        return self._clock.device

    def start(self) -> Stopwatch:
        self._start, self._end, self._elapsed = self._clock.mark(), None, None
        return self

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError("Stopwatch.stop() before start()")
        self._end = self._clock.mark()
        if self._clock.cuda:
            self._end.event.synchronize()
        self._elapsed = self._clock.elapsed_ms(self._start, self._end)
        return self._elapsed

    @property
    def elapsed_ms(self) -> float:
        if self._elapsed is None:
            raise RuntimeError("Stopwatch has not been stopped")
        return self._elapsed

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_ms / 1e3

    def __enter__(self) -> Stopwatch:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class TimingReport:
    """Times of one measured run. ``phases_ms``: summed milliseconds per phase; ``phase_calls``: how
    many intervals were summed; ``steps_ms``: per denoising step (``None`` where unknown, i.e. step 0
    of a run whose ``StepTimer.start()`` was never called)."""

    clock: str
    device: str
    phases_ms: dict[str, float] = field(default_factory=dict)
    phase_calls: dict[str, int] = field(default_factory=dict)
    steps_ms: tuple[float | None, ...] = ()

    def get(self, phase: str) -> float | None:
        return self.phases_ms.get(phase)

    @property
    def end_to_end_ms(self) -> float | None:
        return self.phases_ms.get(END_TO_END)

    @property
    def denoising_ms(self) -> float | None:
        return self.phases_ms.get(DENOISING)

    @property
    def text_encoding_ms(self) -> float | None:
        return self.phases_ms.get(TEXT_ENCODING)

    @property
    def vae_decode_ms(self) -> float | None:
        return self.phases_ms.get(VAE_DECODE)

    @property
    def steps_total_ms(self) -> float | None:
        known = [t for t in self.steps_ms if t is not None]
        return sum(known) if known else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps_ms"] = list(self.steps_ms)
        return out


# ------------------------------------------------------------------------------------------- timers


class PhaseTimer:
    """Sum the time of named phases on one device.

    ``with timer.phase("end_to_end"): ...`` or ``timer.begin(name)`` / ``timer.end(name)``; nested
    begins of the same phase count once (only the outermost interval is kept). On CUDA the marks
    are events, resolved with a single synchronisation in :meth:`results_ms` / :meth:`report`.
    """

    def __init__(self, device: Any = None):
        self._clock = _Clock(device)
        self._intervals: dict[str, list[tuple[_Mark, _Mark]]] = {}
        self._open: dict[str, tuple[int, _Mark | None]] = {}

    @property
    def clock(self) -> str:
        return self._clock.name

    @property
    def device(self) -> torch.device:
        return self._clock.device

    def mark(self) -> _Mark:
        return self._clock.mark()

    def begin(self, name: str) -> None:
        depth, start = self._open.get(name, (0, None))
        if depth == 0:
            start = self._clock.mark()
        self._open[name] = (depth + 1, start)

    def end(self, name: str) -> None:
        depth, start = self._open.get(name, (0, None))
        if depth == 0:
            raise RuntimeError(f"PhaseTimer.end({name!r}) without begin")
        if depth == 1:
            self.add(name, start, self._clock.mark())
            del self._open[name]
        else:
            self._open[name] = (depth - 1, start)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def add(self, name: str, start: _Mark, end: _Mark) -> None:
        """Add an interval between two marks taken with :meth:`mark` (or this timer's hooks)."""
        self._intervals.setdefault(name, []).append((start, end))

    def reset(self) -> None:
        self._intervals.clear()
        self._open.clear()

    def calls(self) -> dict[str, int]:
        return {name: len(intervals) for name, intervals in self._intervals.items()}

    def results_ms(self) -> dict[str, float]:
        """Summed milliseconds per phase (synchronises the device once on CUDA)."""
        self._clock.synchronize()
        return {
            name: sum(self._clock.elapsed_ms(a, b) for a, b in intervals)
            for name, intervals in self._intervals.items()
        }

    def report(self, steps: StepTimer | None = None) -> TimingReport:
        return TimingReport(
            clock=self.clock,
            device=str(self.device),
            phases_ms=self.results_ms(),
            phase_calls=self.calls(),
            steps_ms=tuple(steps.step_times_ms()) if steps is not None else (),
        )


class StepTimer:
    """Per-step times of a diffusers denoising loop; pass the instance as ``callback_on_step_end``.

    Each call records a mark (CUDA event or ``perf_counter``) and returns ``callback_kwargs``
    unchanged (or what the chained ``callback`` returns). :meth:`start` marks the beginning of
    denoising; :func:`phase_hooks` calls it at the first denoiser forward. Step ``i`` is the time
    between consecutive marks, step 0 from the start mark (``None`` if there was none).

    ``device``: anything :func:`resolve_device` accepts; ``None`` picks the pipeline's execution
    device at the first call (or the device passed to :meth:`start`). A CPU clock never meets a CUDA
    pipeline: that raises instead of timing kernel launches.
    """

    def __init__(self, device: Any = None, callback: Callable[..., dict[str, Any]] | None = None):
        self._clock = _Clock(device) if device is not None else None
        self.callback = callback
        self._entries: list[tuple[int | None, _Mark]] = []  # (None, start) or (step_index, end)
        self._checked_pipe = False

    @property
    def clock(self) -> str | None:
        return self._clock.name if self._clock is not None else None

    def _ensure_clock(self, device: Any) -> _Clock:
        if self._clock is None:
            self._clock = _Clock(device)
        elif device is not None and self._clock.cuda != _is_cuda(resolve_device(device)):
            raise RuntimeError(
                f"StepTimer clock is on {self._clock.device} but the pipeline runs on {resolve_device(device)}; "
                "pass device= to StepTimer"
            )
        return self._clock

    def start(self, device: Any = None) -> None:
        """Mark the beginning of denoising (a new run: its step 0 is measured from here)."""
        clock = self._ensure_clock(device)
        self._entries.append((None, clock.mark()))

    def __call__(self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._clock is None or not self._checked_pipe:  # resolve / check the device once, not every step
            self._ensure_clock(resolve_device(pipe) if pipe is not None else None)
            self._checked_pipe = True
        clock = self._clock
        out = callback_kwargs
        if self.callback is not None:
            out = self.callback(pipe, step_index, timestep, callback_kwargs)
        self._entries.append((int(step_index), clock.mark()))
        return out

    def __len__(self) -> int:
        return sum(1 for index, _ in self._entries if index is not None)

    @property
    def step_indices(self) -> list[int]:
        return [index for index, _ in self._entries if index is not None]

    @property
    def started(self) -> bool:
        return any(index is None for index, _ in self._entries)

    def reset(self) -> None:
        self._entries.clear()

    def step_times_ms(self) -> list[float | None]:
        """One duration per recorded step (synchronises on CUDA)."""
        if self._clock is None:
            return []
        self._clock.synchronize()
        times: list[float | None] = []
        previous: _Mark | None = None
        for index, mark in self._entries:
            if index is not None:
                times.append(self._clock.elapsed_ms(previous, mark) if previous is not None else None)
            previous = mark
        return times


# ------------------------------------------------------------------------------- pipeline phase hooks


def _components(pipe: Any) -> dict[str, Any]:
    try:
        components = dict(pipe.components)
    except Exception:
        components = {}
    return components


def _text_encoders(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    components = _components(pipe)
    names = sorted(n for n in components if n.startswith("text_encoder")) or ["text_encoder", "text_encoder_2"]
    found = []
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            found.append((name, module))
    return found


@contextlib.contextmanager
def phase_hooks(pipe: Any, timer: PhaseTimer, step_timer: StepTimer | None = None) -> Iterator[PhaseTimer]:
    """Time ``text_encoding``, ``denoising`` and ``vae_decode`` of the pipeline calls made inside.

    Installs removable forward pre/post hooks on each text encoder and denoiser and wraps
    ``pipe.vae.decode`` as an instance attribute (never the class); all are removed in ``finally``,
    also when the call raises. If ``step_timer`` is given, its :meth:`StepTimer.start` is called at
    the first denoiser forward of each run. See the module docstring for the exact definitions.
    """
    handles: list[Any] = []
    state: dict[str, Any] = {"denoise_start": None, "denoise_last": None}

    def close_denoising(end: _Mark | None) -> None:
        start = state["denoise_start"]
        if start is not None and end is not None:
            timer.add(DENOISING, start, end)
        state["denoise_start"] = state["denoise_last"] = None

    def text_pre(module, args):
        timer.begin(TEXT_ENCODING)

    def text_post(module, args, output):
        timer.end(TEXT_ENCODING)

    def denoiser_pre(module, args):
        if state["denoise_start"] is None:
            state["denoise_start"] = timer.mark()
            if step_timer is not None:
                step_timer.start(timer.device)

    def denoiser_post(module, args, output):
        state["denoise_last"] = timer.mark()

    vae = getattr(pipe, "vae", None)
    wrapper = None
    had_instance_decode = False
    previous_instance_decode = None
    try:
        for _, module in _text_encoders(pipe):
            handles.append(module.register_forward_pre_hook(text_pre))
            handles.append(module.register_forward_hook(text_post, always_call=True))
        for _, module in named_denoisers(pipe):
            handles.append(module.register_forward_pre_hook(denoiser_pre))
            handles.append(module.register_forward_hook(denoiser_post, always_call=True))

        if vae is not None and hasattr(vae, "decode"):
            had_instance_decode = "decode" in vae.__dict__
            previous_instance_decode = vae.__dict__.get("decode")
            original = vae.decode  # bound method (or an earlier instance wrapper)
            depth = [0]

            @functools.wraps(original)
            def timed_decode(*args: Any, **kwargs: Any) -> Any:
                if depth[0] == 0:
                    timer.begin(VAE_DECODE)
                    if state["denoise_start"] is not None:
                        # the decode's start mark closes the denoising interval
                        close_denoising(timer._open[VAE_DECODE][1])
                depth[0] += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    depth[0] -= 1
                    if depth[0] == 0:
                        timer.end(VAE_DECODE)

            wrapper = timed_decode
            vae.decode = timed_decode  # instance attribute: shadows the class method for this object only
        yield timer
    finally:
        for handle in handles:
            handle.remove()
        if wrapper is not None:
            if vae.__dict__.get("decode") is wrapper:
                if had_instance_decode:
                    vae.__dict__["decode"] = previous_instance_decode
                else:
                    del vae.__dict__["decode"]
        close_denoising(state["denoise_last"])


def timed_call(pipe: Any, *args: Any, device: Any = None, **call_kwargs: Any) -> tuple[Any, TimingReport]:
    """Call ``pipe(*args, **call_kwargs)`` once with all timers attached; return ``(output, report)``.

    Synchronises before the start and inside the report; pauses automatic garbage collection for
    the call (collect before it if memory matters); a ``callback_on_step_end`` given in
    ``call_kwargs`` is chained (it runs before the step mark, so its cost counts toward its step).
    No warm-up is done here: warm up before measuring.
    """
    device = resolve_device(pipe if device is None else device)
    timer = PhaseTimer(device)
    user_callback = call_kwargs.pop("callback_on_step_end", None)
    if user_callback is not None and "callback_on_step_end_tensor_inputs" not in call_kwargs:
        tensor_inputs = getattr(user_callback, "tensor_inputs", None)  # PipelineCallback objects
        if tensor_inputs:
            call_kwargs["callback_on_step_end_tensor_inputs"] = list(tensor_inputs)
    steps = StepTimer(device, callback=user_callback)
    sync(device)
    with gc_paused(), phase_hooks(pipe, timer, steps), timer.phase(END_TO_END):
        output = pipe(*args, callback_on_step_end=steps, **call_kwargs)
    return output, timer.report(steps)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic garbage collection inside the block (as ``timeit`` does): a collection that
    happens to start during one of two compared calls would be charged to that call alone."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -------------------------------------------------------------------------------------------- memory

# What allocation failures say when they are not torch.OutOfMemoryError: cuDNN / cuBLAS workspace
# allocations in big convolutions (VAE decodes) and CUDA runtime errors surface as RuntimeError (or
# torch.AcceleratorError); the CPU allocator says it cannot allocate.
_ALLOCATION_FAILURE = re.compile(
    r"out of memory|_ALLOC_FAILED|cudaErrorMemoryAllocation|can't allocate memory|failed to allocate|"
    r"not enough memory",
    re.IGNORECASE,
)


def is_allocation_failure(error: BaseException) -> bool:
    """Whether ``error`` means memory ran out (out of memory on any device, or a cuDNN / cuBLAS /
    CUDA runtime allocation failure), as opposed to a bug that must not be swallowed."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and bool(_ALLOCATION_FAILURE.search(str(error)))


def release_memory(device: Any = None) -> None:
    """Return freed memory after a failure: collect garbage, then empty the CUDA cache. Call it
    after the exception is gone (its traceback holds the failed run's tensors)."""
    gc.collect()
    if _is_cuda(resolve_device(device)):
        torch.cuda.empty_cache()


def _read_vm_hwm() -> int | None:
    """Peak RSS of this process in bytes (Linux ``VmHWM``), or None."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _reset_vm_hwm() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0: ``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def retain_freed_host_memory() -> str | None:
    """Make glibc serve every block from its heap and keep freed memory for reuse.

    For CPU *speed* benchmarks only. PyTorch's CPU allocator is plain malloc/free, and glibc
    serves large blocks with fresh ``mmap`` pages and unmaps them on free, so every forward
    page-faults its activations in again: 16k-48k minor faults per forward of the 8192-token Wan
    benchmark, a few percent of its time and varying run to run, most for whichever variant
    allocates more. CUDA's caching allocator never pays this, so CPU timings without the change
    understate what a smaller workload buys. No mmap at all (rather than a higher threshold,
    which glibc caps at 32 MiB) also covers real-size activations. Process-wide and not undoable:
    it also makes peak RSS stay high, so never call it where :class:`MemoryMonitor` measures host
    memory.

    Returns what it set, or None where glibc's ``mallopt`` is not there or refused a setting.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either parameter also stops glibc's adaptive thresholds.
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        return None
    return "glibc malloc: heap only, freed memory kept"


def benchmark_allocator(device: str, system_malloc: bool = False) -> str:
    """Set up the allocator a speed benchmark runs with and name it: CUDA's caching allocator on a
    GPU; on a CPU, glibc made to keep freed memory (:func:`retain_freed_host_memory`) unless
    ``system_malloc`` asks for its defaults."""
    if str(device).startswith("cuda"):
        return "CUDA caching allocator"
    if system_malloc:
        return "system malloc"
    return retain_freed_host_memory() or "system malloc (glibc mallopt unavailable)"


@dataclass(frozen=True)
class MemoryReport:
    """Memory used while a :class:`MemoryMonitor` block ran. Sizes in bytes; ``None`` = unavailable,
    with the reason in ``unavailable_reason[field]``.

    ``peak_bytes`` is the headline: on CUDA the peak of ``torch.cuda.max_memory_allocated`` (tensors
    this process allocated, after a reset at entry, so it includes what was already allocated); on
    CPU the process's peak RSS growth over its RSS at entry. ``nvml_*`` fields are device-wide
    (every process on the GPU, plus the CUDA context), as ``nvidia-smi`` shows them.
    """

    device: str
    peak_bytes: int | None
    cuda_peak_allocated_bytes: int | None
    cuda_peak_reserved_bytes: int | None
    cuda_baseline_allocated_bytes: int | None
    cuda_baseline_reserved_bytes: int | None
    nvml_baseline_used_bytes: int | None
    nvml_peak_used_bytes: int | None
    nvml_peak_growth_bytes: int | None
    rss_baseline_bytes: int | None
    rss_peak_bytes: int | None
    rss_peak_growth_bytes: int | None
    rss_method: str | None  # "vmhwm+sampled" (kernel peak counter, reset at entry) or "sampled"
    samples: int
    interval_s: float
    duration_s: float
    unavailable_reason: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MemoryMonitor:
    """Peak memory of the code run inside ``with MemoryMonitor(device) as mon: ...``; then ``mon.report``.

    CUDA: synchronise, ``torch.cuda.reset_peak_memory_stats`` at entry, ``max_memory_allocated`` /
    ``max_memory_reserved`` at exit (after a synchronisation); NVML device used memory sampled in a
    background thread. Always: process RSS sampled in the same thread every ``interval_s`` plus a
    final sample and, on Linux, the kernel's peak-RSS counter (``VmHWM``) reset at entry, so short
    spikes between samples are not missed. Nested monitors stay correct: an inner reset first folds
    the peak so far into the enclosing monitors.
    """

    _active: list[MemoryMonitor] = []
    _active_lock = threading.Lock()

    def __init__(self, device: Any = None, interval_s: float = 0.005, nvml: bool = True, rss: bool = True):
        self.device = resolve_device(device)
        self.cuda = _is_cuda(self.device)
        self.interval_s = float(interval_s)
        self.use_nvml = nvml
        self.use_rss = rss
        self.report: MemoryReport | None = None
        self._reasons: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples = 0
        self._process = None
        self._rss_baseline: int | None = None
        self._rss_peak: int | None = None
        self._hwm_reset = False
        self._carried_rss_peak = 0
        self._carried_cuda_alloc = 0
        self._carried_cuda_reserved = 0
        self._nvml = None
        self._nvml_handle = None
        self._nvml_baseline: int | None = None
        self._nvml_peak: int | None = None
        self._cuda_baseline_alloc: int | None = None
        self._cuda_baseline_reserved: int | None = None
        self._t0 = 0.0

    # -- samplers

    def _sample_rss(self) -> None:
        if self._process is None:
            return
        try:
            rss = self._process.memory_info().rss
        except Exception:
            return
        with self._lock:
            self._rss_peak = rss if self._rss_peak is None else max(self._rss_peak, rss)

    def _sample_nvml(self) -> None:
        if self._nvml_handle is None:
            return
        try:
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
        except Exception:
            return
        with self._lock:
            self._nvml_peak = used if self._nvml_peak is None else max(self._nvml_peak, used)

    def _sample(self) -> None:
        self._sample_rss()
        self._sample_nvml()
        self._samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    # -- setup

    def _open_nvml(self) -> None:
        try:
            import pynvml  # provided by nvidia-ml-py
        except Exception as exc:  # ImportError, or a broken install
            self._reasons["nvml"] = f"pynvml not importable: {exc}"
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            self._reasons["nvml"] = f"nvmlInit failed: {exc}"
            return
        self._nvml = pynvml
        try:
            self._nvml_handle = _nvml_handle(pynvml, self.device)
            self._nvml_baseline = int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
            self._nvml_peak = self._nvml_baseline
        except Exception as exc:
            self._reasons["nvml"] = f"NVML device query failed: {exc}"
            self._nvml_handle = None

    def _close_nvml(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None

    def __enter__(self) -> MemoryMonitor:
        with MemoryMonitor._active_lock:
            outer = list(MemoryMonitor._active)
            MemoryMonitor._active.append(self)
        try:
            self._enter(outer)
        except BaseException:
            with MemoryMonitor._active_lock:
                MemoryMonitor._active.remove(self)
            self._close_nvml()
            raise
        return self

    def _enter(self, outer: list[MemoryMonitor]) -> None:
        if self.use_rss:
            try:
                import psutil

                self._process = psutil.Process()
            except Exception as exc:
                self._reasons["rss"] = f"psutil unavailable: {exc}"
        else:
            self._reasons["rss"] = "disabled (rss=False)"
        if self._process is not None:
            hwm = _read_vm_hwm()
            if hwm is not None:
                for monitor in outer:  # keep the enclosing monitors' peak before resetting it
                    monitor._carried_rss_peak = max(monitor._carried_rss_peak, hwm)
                self._hwm_reset = _reset_vm_hwm()
            self._rss_baseline = self._process.memory_info().rss
            self._rss_peak = self._rss_baseline

        if self.cuda:
            if not torch.cuda.is_available():
                raise RuntimeError(f"MemoryMonitor on {self.device} but CUDA is not available")
            torch.cuda.synchronize(self.device)
            peak_alloc = torch.cuda.max_memory_allocated(self.device)
            peak_reserved = torch.cuda.max_memory_reserved(self.device)
            for monitor in outer:
                if monitor.cuda and monitor.device == self.device:
                    monitor._carried_cuda_alloc = max(monitor._carried_cuda_alloc, peak_alloc)
                    monitor._carried_cuda_reserved = max(monitor._carried_cuda_reserved, peak_reserved)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_baseline_alloc = torch.cuda.memory_allocated(self.device)
            self._cuda_baseline_reserved = torch.cuda.memory_reserved(self.device)
            if self.use_nvml:
                self._open_nvml()
            else:
                self._reasons["nvml"] = "disabled (nvml=False)"
        else:
            self._reasons["cuda"] = f"device is {self.device.type}, not CUDA"
            self._reasons["nvml"] = f"device is {self.device.type}, not CUDA"

        self._t0 = time.perf_counter()
        if self._process is not None or self._nvml_handle is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="vdtome-memory-monitor", daemon=True)
            self._thread.start()

    def __exit__(self, *exc: Any) -> None:
        try:
            self._exit()
        finally:
            with MemoryMonitor._active_lock:
                if self in MemoryMonitor._active:
                    MemoryMonitor._active.remove(self)
            self._close_nvml()

    def _exit(self) -> None:
        cuda_alloc = cuda_reserved = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            cuda_alloc = max(torch.cuda.max_memory_allocated(self.device), self._carried_cuda_alloc)
            cuda_reserved = max(torch.cuda.max_memory_reserved(self.device), self._carried_cuda_reserved)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()  # final sample
        duration = time.perf_counter() - self._t0

        rss_peak, rss_method = None, None
        if self._process is not None:
            rss_peak = max(self._rss_peak or 0, self._carried_rss_peak)
            rss_method = "sampled"
            if self._hwm_reset:
                hwm = _read_vm_hwm()
                if hwm is not None:
                    rss_peak = max(rss_peak, hwm)
                    rss_method = "vmhwm+sampled"
        rss_growth = None if rss_peak is None else max(0, rss_peak - self._rss_baseline)

        nvml_peak = self._nvml_peak if self._nvml_handle is not None else None
        nvml_base = self._nvml_baseline if self._nvml_handle is not None else None
        nvml_growth = None if nvml_peak is None else max(0, nvml_peak - nvml_base)

        reasons: dict[str, str] = {}
        cuda_reason, nvml_reason, rss_reason = (
            self._reasons.get("cuda"),
            self._reasons.get("nvml"),
            self._reasons.get("rss"),
        )
        for name, value, reason in (
            ("cuda_peak_allocated_bytes", cuda_alloc, cuda_reason),
            ("cuda_peak_reserved_bytes", cuda_reserved, cuda_reason),
            ("cuda_baseline_allocated_bytes", self._cuda_baseline_alloc, cuda_reason),
            ("cuda_baseline_reserved_bytes", self._cuda_baseline_reserved, cuda_reason),
            ("nvml_baseline_used_bytes", nvml_base, nvml_reason),
            ("nvml_peak_used_bytes", nvml_peak, nvml_reason),
            ("nvml_peak_growth_bytes", nvml_growth, nvml_reason),
            ("rss_baseline_bytes", self._rss_baseline, rss_reason),
            ("rss_peak_bytes", rss_peak, rss_reason),
            ("rss_peak_growth_bytes", rss_growth, rss_reason),
        ):
            if value is None:
                reasons[name] = reason or "not measured"
        peak = cuda_alloc if self.cuda else rss_growth
        if peak is None:
            reasons["peak_bytes"] = reasons.get("cuda_peak_allocated_bytes" if self.cuda else "rss_peak_growth_bytes")

        self.report = MemoryReport(
            device=str(self.device),
            peak_bytes=peak,
            cuda_peak_allocated_bytes=cuda_alloc,
            cuda_peak_reserved_bytes=cuda_reserved,
            cuda_baseline_allocated_bytes=self._cuda_baseline_alloc,
            cuda_baseline_reserved_bytes=self._cuda_baseline_reserved,
            nvml_baseline_used_bytes=nvml_base,
            nvml_peak_used_bytes=nvml_peak,
            nvml_peak_growth_bytes=nvml_growth,
            rss_baseline_bytes=self._rss_baseline,
            rss_peak_bytes=rss_peak,
            rss_peak_growth_bytes=rss_growth,
            rss_method=rss_method,
            samples=self._samples,
            interval_s=self.interval_s,
            duration_s=duration,
            unavailable_reason=reasons,
        )


def _nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """NVML handle of a torch CUDA device: by UUID (robust to CUDA_VISIBLE_DEVICES and ordering),
    then by torch's own index mapping, then by the plain index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with contextlib.suppress(Exception):
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        if uuid:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    with contextlib.suppress(Exception):
        return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(index))
    return pynvml.nvmlDeviceGetHandleByIndex(index)


# --------------------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "processor\t: ")) and ":" in line:
                    value = line.split(":", 1)[1].strip()
                    if value and not value.isdigit():
                        return value
    return platform.processor() or platform.machine() or "unknown CPU"


def _versions() -> dict[str, str]:
    """Versions of the relevant installed packages (read from metadata: nothing gets imported)."""
    out = {}
    for dist in ("torch", "diffusers", "transformers", "accelerate", "gradio", "numpy", "nvidia-ml-py"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    out["torch"] = torch.__version__
    return out


def _nvml_driver() -> tuple[dict[str, Any], str | None]:
    try:
        import pynvml
    except Exception as exc:
        return {}, f"pynvml not importable: {exc}"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return {}, f"nvmlInit failed: {exc}"
    try:
        info: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            version = pynvml.nvmlSystemGetDriverVersion()
            info["driver_version"] = version.decode() if isinstance(version, bytes) else str(version)
        with contextlib.suppress(Exception):
            cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
            info["cuda_driver_version"] = f"{cuda // 1000}.{(cuda % 1000) // 10}"
        return info, None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def attention_info(pipe: Any = None, device: Any = None) -> dict[str, Any]:
    """Which attention implementation runs.

    ``dispatch_backend``: diffusers' globally active backend from ``diffusers.models.attention_dispatch``
    (``"native"`` = ``torch.nn.functional.scaled_dot_product_attention``; set by
    ``DIFFUSERS_ATTN_BACKEND`` or the ``attention_backend(...)`` context manager). ``model_backends``:
    per-model overrides set with ``model.set_attention_backend``. ``processors``: the processor
    classes per pipeline component (older processors such as ``AttnProcessor2_0`` call torch SDPA
    directly). ``torch_sdpa_kernels``: which SDPA kernels torch may pick (CUDA only).
    """
    info: dict[str, Any] = {"dispatch_backend": None, "env_DIFFUSERS_ATTN_BACKEND": os.environ.get("DIFFUSERS_ATTN_BACKEND")}
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        backend = _AttentionBackendRegistry._active_backend
        info["dispatch_backend"] = getattr(backend, "value", str(backend))
    except Exception as exc:
        info["dispatch_backend_unavailable"] = f"{type(exc).__name__}: {exc}"
    processors: dict[str, list[str]] = {}
    model_backends: dict[str, list[str]] = {}
    if pipe is not None:
        for name, module in sorted(_components(pipe).items()):
            attn = None
            with contextlib.suppress(Exception):
                attn = getattr(module, "attn_processors", None)
            if not isinstance(attn, Mapping) or not attn:
                continue
            processors[name] = sorted({type(p).__name__ for p in attn.values()})
            backends = sorted(
                {str(getattr(b, "value", b)) for p in attn.values() if (b := getattr(p, "_attention_backend", None))}
            )
            if backends:
                model_backends[name] = backends
    info["processors"] = processors
    info["model_backends"] = model_backends
    device = resolve_device(device if device is not None else (pipe if pipe is not None else "cpu"))
    if _is_cuda(device):
        kernels = {}
        for kernel in ("flash", "mem_efficient", "math", "cudnn"):
            fn = getattr(torch.backends.cuda, f"{kernel}_sdp_enabled", None)
            if fn is not None:
                with contextlib.suppress(Exception):
                    kernels[kernel] = bool(fn())
        info["torch_sdpa_kernels"] = kernels
    overrides = sorted({b for bs in model_backends.values() for b in bs})
    if overrides:
        summary = "diffusers " + ", ".join(overrides) + " (set per model)"
    elif info["dispatch_backend"] == "native":
        summary = "torch SDPA (diffusers native dispatch)"
    elif info["dispatch_backend"]:
        summary = f"diffusers {info['dispatch_backend']}"
    else:
        summary = "torch SDPA"
    info["summary"] = summary
    return info


def environment(pipe_or_device: Any = None, dtype: Any = None) -> dict[str, Any]:
    """JSON-safe description of where a measurement ran (to print next to any figure).

    ``pipe_or_device``: a pipeline, module, device or device string. ``dtype``: the compute dtype
    (default: the pipeline's ``dtype`` when a pipeline is given).
    """
    device = resolve_device(pipe_or_device)
    pipe = None if isinstance(pipe_or_device, (str, int, torch.device, type(None))) else pipe_or_device
    if dtype is None and pipe is not None:
        dtype = getattr(pipe, "dtype", None)
    env: dict[str, Any] = {
        "device": str(device),
        "device_type": device.type,
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "versions": _versions(),
        "cuda_runtime_version": torch.version.cuda,  # the CUDA runtime torch was built with (None: CPU build)
        "unavailable_reason": {},
    }
    with contextlib.suppress(AttributeError, OSError):
        env["cpu_affinity"] = len(os.sched_getaffinity(0))
    if _is_cuda(device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env["device_name"] = torch.cuda.get_device_name(index)
        env["device_total_memory_bytes"] = int(props.total_memory)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        with contextlib.suppress(Exception):
            env["cudnn_version"] = torch.backends.cudnn.version()
        driver, reason = _nvml_driver()
        env.update(driver)
        if reason:
            env["unavailable_reason"]["driver_version"] = reason
    else:
        env["device_name"] = env["cpu"] if device.type == "cpu" else device.type
        env["unavailable_reason"]["driver_version"] = f"device is {device.type}, not CUDA"
    env["attention"] = attention_info(pipe, device)
    env["attention_backend"] = env["attention"]["summary"]
    return env


def _cudnn_text(version: Any) -> str | None:
    """``torch.backends.cudnn.version()`` as text: 90100 -> "9.1.0" (cuDNN 9+), 8902 -> "8.9.2"."""
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        return str(version) if isinstance(version, str) and version else None
    major, rest = divmod(version, 10000) if version >= 10000 else divmod(version, 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def environment_line(env: Mapping[str, Any]) -> str:
    """One line naming where a figure was measured, from :func:`environment`'s dict, e.g.

    ``NVIDIA H100 80GB HBM3 · driver 550.54.15 · CUDA 12.4 (torch), 12.6 (driver) · cuDNN 9.1.0 · torch 2.5.1 ·
    diffusers 0.42.1 · dtype bfloat16 · attention torch SDPA (diffusers native dispatch)``

    CUDA: the runtime torch was built with, then the newest CUDA the driver supports (NVML). The
    CUDA parts are shown for a CUDA device only. A part that is unknown (no NVML, a CPU build, an
    older ``result.json``) is left out, never shown as a placeholder.
    """
    versions = env.get("versions") or {}
    cuda = env.get("device_type") == "cuda" or str(env.get("device", "")).startswith("cuda")
    parts: list[str | None] = [str(env.get("device_name") or env.get("device") or "") or None]
    if cuda:
        parts.append(f"driver {env['driver_version']}" if env.get("driver_version") else None)
        runtime, driver_cuda = env.get("cuda_runtime_version"), env.get("cuda_driver_version")
        if runtime and driver_cuda:
            parts.append(f"CUDA {runtime} (torch), {driver_cuda} (driver)")
        elif runtime:
            parts.append(f"CUDA {runtime} (torch)")
        elif driver_cuda:
            parts.append(f"CUDA {driver_cuda} (driver)")
        cudnn = _cudnn_text(env.get("cudnn_version"))
        parts.append(f"cuDNN {cudnn}" if cudnn else None)
    for name in ("torch", "diffusers"):
        parts.append(f"{name} {versions[name]}" if versions.get(name) else None)
    parts.append(f"dtype {env['dtype']}" if env.get("dtype") else None)
    parts.append(f"attention {env['attention_backend']}" if env.get("attention_backend") else None)
    return " · ".join(part for part in parts if part)
