"""Honest timing: timers and a phase split of a diffusers pipeline call.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vdtome.core.denoisers import named_denoisers
from vdtome.core.phases import DENOISING, END_TO_END, PHASES, TEXT_ENCODING, VAE_DECODE  # noqa: F401 (re-exported)



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


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def sync(device: Any = None) -> None:
    """Wait for all queued work on ``device`` (CUDA: ``torch.cuda.synchronize``; MPS likewise).

    A no-op on CPU, where PyTorch ops are synchronous; CPU never touches ``torch.cuda``.
    """
    device = resolve_device(device)
    if is_cuda(device):
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
        self.cuda = is_cuda(self.device)
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
        elif device is not None and self._clock.cuda != is_cuda(resolve_device(device)):
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


def pipeline_components(pipe: Any) -> dict[str, Any]:
    try:
        components = dict(pipe.components)
    except Exception:
        components = {}
    return components


def _text_encoders(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    components = pipeline_components(pipe)
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

    def around_compiled(compiled: Any) -> Any:
        """A compiled denoiser's call marked from outside: a forward hook would run inside the
        compiled code (dynamo traces it; the timed calls would compile what the others did not)."""
        def timed_denoiser(*args: Any, **kwargs: Any) -> Any:
            denoiser_pre(None, args)
            try:
                return compiled(*args, **kwargs)
            finally:
                denoiser_post(None, args, None)

        return timed_denoiser

    compiled_modules: list[tuple[torch.nn.Module, Any]] = []
    vae = getattr(pipe, "vae", None)
    wrapper = None
    had_instance_decode = False
    previous_instance_decode = None
    try:
        for _, module in _text_encoders(pipe):
            handles.append(module.register_forward_pre_hook(text_pre))
            handles.append(module.register_forward_hook(text_post, always_call=True))
        for _, module in named_denoisers(pipe):
            compiled = vars(module).get("_compiled_call_impl")
            if compiled is not None:  # nn.Module.compile(): its __call__ goes straight to the compiled code
                compiled_modules.append((module, compiled))
                module._compiled_call_impl = around_compiled(compiled)
                continue
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
        for module, compiled in compiled_modules:
            module._compiled_call_impl = compiled
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
