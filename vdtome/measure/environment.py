"""Where a figure was measured: device, versions, driver, attention backend, in one line for reports."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from collections.abc import Mapping
from typing import Any

import torch

from vdtome.core.diffusers_compat import active_attention_backend
from vdtome.measure.timing import is_cuda, pipeline_components, resolve_device

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
    # cache-dit: the peer method's version, beside whose figures it belongs (absent where not installed).
    for dist in ("torch", "diffusers", "transformers", "accelerate", "gradio", "numpy", "nvidia-ml-py", "cache-dit"):
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
        info["dispatch_backend"] = active_attention_backend()
    except Exception as exc:
        info["dispatch_backend_unavailable"] = f"{type(exc).__name__}: {exc}"
    processors: dict[str, list[str]] = {}
    model_backends: dict[str, list[str]] = {}
    if pipe is not None:
        for name, module in sorted(pipeline_components(pipe).items()):
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
    if is_cuda(device):
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
    if is_cuda(device):
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
