"""Honest memory: peak meters (CUDA allocator, NVML device, process RSS) and allocation failures.

On CPU nothing here touches ``torch.cuda``. A meter that cannot be read is ``None`` with a reason in
``MemoryReport.unavailable_reason``, never a crash.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import re
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vdtome.measure.timing import is_cuda, resolve_device

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
    if is_cuda(resolve_device(device)):
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
        self.cuda = is_cuda(self.device)
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
            self._nvml_handle = nvml_handle(pynvml, self.device)
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


def nvml_handle(pynvml: Any, device: torch.device) -> Any:
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


class TensorMemoryMeter(TorchDispatchMode):
    """Peak bytes of the tensors the code inside ``with TensorMemoryMeter() as meter:`` holds at once.

    Every operator's outputs are counted once per storage (views share theirs; an op whose schema
    says its output aliases an input allocated nothing) from when an op returns them until the last
    reference goes, so the figure is what a non-caching allocator would need on top of what was live
    at entry: deterministic, on any device, and not blurred by glibc or CUDA keeping freed memory
    (which the RSS and allocator peaks of :class:`MemoryMonitor` show). On the meta device it sizes
    a run without computing it (the memory plan). What a kernel allocates privately (a fused
    attention's scratch, a cuDNN workspace) is not seen. Every op pays a Python call: for sizing
    memory, never inside a timed call. ``peaks``: the peak of each section closed by :meth:`mark`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}
        self._section_peak = 0
        self.peaks: dict[str, int] = {}
        self._aliasing: dict[Any, bool] = {}

    def mark(self, name: str) -> None:
        """Close a section: ``peaks[name]`` is the peak since the previous mark (or entry)."""
        self.peaks[name] = self._section_peak
        self._section_peak = self.current_bytes

    @contextlib.contextmanager
    def section_before(self, name: str, modules) -> Any:
        """Close section ``name`` when any of ``modules`` is first called inside the block (a
        pipeline's denoiser: what came before is its text encoding and set-up)."""
        def first_call(module, args) -> None:
            if name not in self.peaks:
                self.mark(name)

        handles = [module.register_forward_pre_hook(first_call) for module in modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _forget(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = self._aliasing.get(func)
        if aliases is None:  # an op whose outputs alias an input (a view, an in-place or out= op) allocates nothing
            aliases = self._aliasing[func] = any(r.alias_info is not None for r in func._schema.returns)
        if aliases:
            return out
        for item in (out,) if isinstance(out, torch.Tensor) else tree_leaves(out):
            if not isinstance(item, torch.Tensor):
                continue
            # Storages are keyed by their Python object, which torch keeps for as long as the
            # storage lives (meta storages have no address to key by).
            storage = item.untyped_storage()
            key = id(storage)
            if key in self._live:
                continue
            size = storage.nbytes()
            if size == 0:
                continue
            self._live[key] = size
            self.current_bytes += size
            weakref.finalize(storage, self._forget, key)
            if self.current_bytes > self._section_peak:
                self._section_peak = self.current_bytes
                self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out
