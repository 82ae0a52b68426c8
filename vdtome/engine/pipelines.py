"""Loading preset pipelines, and keeping loaded ones in memory for reuse.

Hub presets and local directories go through the same ``from_pretrained`` path (a directory
written by ``save_pretrained`` is a valid source), never with remote code. Built-in tiny presets
are built in code. A loaded pipeline is shared by the baseline and the accelerated run: methods
are applied to it and removed again, so weights are never held twice.
"""

from __future__ import annotations

import gc
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from vdtome.core.presets import ModelPreset
from vdtome.offline.tiny import build_tiny

# Set to 1 to let ``load_pipeline`` accept a model id that is not a preset (off by default: a
# public app must not load arbitrary repositories on request).
ALLOW_CUSTOM_MODEL_ENV = "VDTOME_ALLOW_CUSTOM_MODEL"


class ModelUnavailableError(RuntimeError):
    """The weights cannot be loaded here (not cached and no hub, or no GPU for a GPU-only preset)."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def custom_models_allowed() -> bool:
    return os.environ.get(ALLOW_CUSTOM_MODEL_ENV, "").strip().lower() in ("1", "true", "yes")


# owner/name as the hub spells repository ids.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


class CustomModelRefused(ValueError):
    """A custom-weights value this server will not load (the message never says what exists outside
    the operator's model folder)."""


def custom_model_source(text: str, root: Path | None) -> str:
    """What to load for a visitor's custom weights: a folder under the operator's ``root`` (by its
    name there) or a hub id. Absolute paths, ``~`` and ``..`` are refused before the file system is
    asked anything; a link out of ``root`` counts as absent."""
    name = text.strip()
    where = "a folder name under the server's model folder or " if root is not None else ""
    rule = f"custom weights must be {where}a hub id such as owner/name"
    if name.startswith(("/", "~", "\\")) or "\\" in name or "\x00" in name or ".." in name.split("/"):
        raise CustomModelRefused(f"{rule}; paths are not accepted, got {name[:100]!r}")
    if root is not None and name:
        folder = (root / name).resolve()
        if folder.is_relative_to(root) and folder != root and folder.is_dir():
            return str(folder)
    if HUB_ID.fullmatch(name) and ".." not in name:
        return name
    missing = f"no folder {name[:100]!r} in the server's model folder, and it " if root is not None else "it "
    raise CustomModelRefused(f"{rule}: {missing}is not a hub id")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def from_pretrained(preset: ModelPreset, source: str | None = None):
    """Load ``preset``'s pipeline from its hub id or folder, or from ``source`` (a hub id or a folder)."""
    import diffusers

    source = source or preset.weights
    pipeline_class = getattr(diffusers, preset.pipeline_class)
    dtypes = {name: _dtype(value) for name, value in preset.extras.get("component_dtypes", {}).items()}
    if source == preset.local and not Path(source).is_dir():
        raise ModelUnavailableError(
            f"cannot load {preset.label}: its folder {Path(source).name!r} is missing from this checkout; "
            "train it with `python -m vdtome.offline.train` or restore it from git"
        )
    kwargs: dict[str, Any] = {  # ``dtype``, not the deprecated ``torch_dtype`` (diffusers warns on every load)
        "dtype": {"default": preset.torch_dtype, **dtypes} if dtypes else preset.torch_dtype,
        "trust_remote_code": False,
    }
    try:
        if preset.motion_adapter:
            kwargs["motion_adapter"] = diffusers.MotionAdapter.from_pretrained(
                preset.motion_adapter, dtype=preset.torch_dtype
            )
        pipe = pipeline_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        detail = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if Path(source).is_dir():  # a local folder: name it, never show where it is on this server
            detail = detail.replace(str(Path(source)), Path(source).name)
            raise ModelUnavailableError(
                f"cannot load {preset.label} from the folder {Path(source).name!r}: it is not a saved "
                f"{preset.pipeline_class} ({detail})"
            ) from error
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0")
        where = "the hub is switched off (HF_HUB_OFFLINE=1)" if offline else "the hub could not be reached"
        raise ModelUnavailableError(
            f"cannot load {preset.label} from {source!r}: the weights are not in the local cache and {where}. "
            f"Download them once with `huggingface-cli download {source}` on a machine with internet, or point "
            f"the preset at a local folder. ({detail})"
        ) from error
    scheduler = preset.extras.get("scheduler")
    if scheduler:
        scheduler_class = getattr(diffusers, scheduler["class"])
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **scheduler.get("kwargs", {}))
    return pipe


def loader_offloads(preset: ModelPreset, device: torch.device, total_bytes: int | None = None) -> bool:
    """Whether the loader offloads this preset on ``device``: a GPU with less memory than the
    preset's ``offload_below_gb`` (``total_bytes``: the GPU's memory, read from it if None)."""
    if preset.offload_below_gb is None or device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory if total_bytes is None else total_bytes
    return total < preset.offload_below_gb * 2**30


def load_pipeline(preset: ModelPreset, device: torch.device | str | None = None, source: str | None = None):
    """A ready pipeline for ``preset`` on ``device`` (progress bars off: callers report progress)."""
    device = torch.device(device) if device is not None else default_device()
    if preset.requires_gpu and device.type != "cuda":
        raise ModelUnavailableError(f"{preset.label} needs a GPU ({preset.hardware}); this machine has none")
    pipe = build_tiny(preset) if preset.is_builtin and source is None else from_pretrained(preset, source)
    if preset.vae_tiling:
        # As the model's own example does: a whole-video decode at full size can need more memory
        # than the denoiser (HunyuanVideo, CogVideoX), and tiles cost little time.
        pipe.vae.enable_tiling()
    if loader_offloads(preset, device):
        # Its weights alone outgrow this GPU (HunyuanVideo below 44 GB): one component on it at a time.
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PipelineCache:
    """Loaded pipelines, least recently used first out.

    On a GPU one real video model is all that fits, so the default capacity is 1 there; evicted
    pipelines are dropped and the CUDA cache emptied before the next load.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity if capacity is not None else (1 if torch.cuda.is_available() else 4)
        self._pipes: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, preset: ModelPreset, device: torch.device | str | None = None, source: str | None = None):
        device = torch.device(device) if device is not None else default_device()
        key = (preset.name, source, str(device))
        with self._lock:
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key]
            while len(self._pipes) >= max(self.capacity, 1):
                self._pipes.popitem(last=False)
                gc.unfreeze()  # the evicted pipeline's reference cycles can be collected again
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            pipe = load_pipeline(preset, device, source)
            self.loads += 1
            self._pipes[key] = pipe
            freeze_long_lived()
            return pipe

    def clear(self) -> None:
        with self._lock:
            self._pipes.clear()
            gc.unfreeze()


def freeze_long_lived() -> None:
    """Move every object alive now (the libraries, the loaded pipelines) out of the cyclic
    collector's reach: the collections the engine runs before each measured decode then scan only
    what the requests made (0.34 s each with the app and a pipeline loaded, 600k objects, on this
    CPU). Reference counting still frees whatever dies; only reference cycles among the frozen wait
    for the next eviction's ``gc.unfreeze``."""
    gc.collect()
    gc.freeze()
