"""The memory plan: a request's peak, estimated without running it, and the cheapest methods that fit.

The denoiser and the VAE are built on the meta device (no weights, no compute) and one denoiser
forward and one decode run there at the request's shapes under :class:`TensorMemoryMeter`: every
activation is sized exactly as the model's own code makes it, with and without the memory methods
applied (their hooks run on meta tensors too). Attention is counted as a fused kernel does it (its
output only, never the score matrix): flash and memory-efficient attention on a GPU, and PyTorch's
CPU attention, do not hold the scores. Weights are counted from the meta modules in the preset's
dtypes; a hub preset's text encoders, which this plan does not trace, are counted from their
published sizes (``memory`` in ``models.json``). The peak of a call is the largest over its phases
of the weights held then plus that phase's activations.

What it cannot see: a kernel's private workspace (cuDNN, a fused attention's scratch), the CUDA
context (~0.3-0.5 GB), allocator fragmentation. Tests check the estimate against a measured peak
on the tiny presets.
"""

from __future__ import annotations

import copy
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vdtome.core.denoisers import weight_bytes as _bytes
from vdtome.core.phases import DENOISING, TEXT_ENCODING, VAE_DECODE
from vdtome.core.presets import ModelPreset, get_preset
from vdtome.core.validation import RequestError
from vdtome.measure.memory import TensorMemoryMeter
from vdtome.methods import apply_stack, method_of, method_spec
from vdtome.methods.layerwise_casting import LayerwiseCasting
from vdtome.methods.offload import Offload
from vdtome.methods.slicing import Slicing
from vdtome.methods.vae_tiling import VaeTiling

GIB = 2**30
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# How each pipeline family calls its denoiser: the batch of one call (CFG branches batched or not)
# and the text tokens it passes.
CALLS = {"wan": (1, 512), "cogvideox": (2, 226), "ltx": (2, 128), "hunyuan_video": (1, 256), "animatediff": (2, 77)}
ANIMATEDIFF_DECODE_CHUNK = 16  # AnimateDiffPipeline.decode_latents' default


def parse_budget(text: str) -> int:
    """"24GB", "24 GiB", "80", "7.5GB" -> bytes (GB as GPUs are sold: 2^30 bytes)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(GB|GiB|G)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise RequestError(f"budget must be a size such as 24GB, got {text!r}", "budget")
    return int(float(match.group(1)) * GIB)


# ---- the models on the meta device


@dataclass
class MetaModels:
    """What the plan traces and counts for one preset."""

    family: str
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    other_weights: dict[str, int]  # components other than the denoiser and VAE: bytes as loaded
    batch: int
    text_tokens: int
    text_activation: int | None = None  # one prompt's encoding, traced where the encoders are built


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """``module``'s architecture on the meta device in its dtype, built from its config (its weights,
    wherever they are, are never copied)."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    with torch.device("meta"):
        built = type(module).from_config(module.config)
    return built.to(dtype)


def _trace_text_encoders(encoders: list[torch.nn.Module], tokens: int) -> int:
    """Peak activation bytes of encoding one prompt with each encoder (pipelines encode the prompt
    and the negative one in separate calls). They run for real, on a padded prompt: text encoders
    read their inputs' values (.item()), which meta tensors do not have."""
    peaks = []
    for encoder in encoders:
        ids = torch.zeros(1, tokens, dtype=torch.long, device=next(encoder.parameters()).device)
        with _traced() as meter:
            encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
        peaks.append(meter.peak_bytes)
    return max(peaks)


def meta_models(preset: ModelPreset, pipe: Any = None) -> MetaModels:
    """``pipe``: the preset's pipeline where it is loaded already (its components are then read
    from it rather than from a second load)."""
    batch, tokens = CALLS[preset.family]
    tokens = preset.extras.get("max_sequence_length", tokens)
    if preset.hub_id is None or pipe is not None:  # built in code or shipped: build it (cheap) and read it
        from vdtome.engine.pipelines import load_pipeline

        pipe = pipe if pipe is not None else load_pipeline(preset, "cpu")
        denoiser = pipe.unet if preset.family == "animatediff" else pipe.transformer
        modules = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
        # Every other component is held too (AnimateDiff's motion adapter stays registered after
        # its weights were copied into the UNet).
        others = {name: _bytes(c) for name, c in modules.items() if name not in ("transformer", "unet", "vae")}
        encoders = [c for name, c in modules.items() if name.startswith("text_encoder")]
        text = _trace_text_encoders(encoders, tokens) if encoders else None
        return MetaModels(preset.family, _meta_copy(denoiser), _meta_copy(pipe.vae), others, batch, tokens, text)
    spec = preset.memory
    if not spec:
        raise RequestError(f"{preset.label} has no memory description in models.json; the plan cannot size it",
                           "preset")
    import diffusers

    dtypes = preset.extras.get("component_dtypes", {})
    with torch.device("meta"):
        if preset.family == "animatediff":
            unet = diffusers.UNet2DConditionModel(**spec["denoiser"].get("unet2d", {}))
            denoiser = diffusers.UNetMotionModel.from_unet2d(unet, diffusers.MotionAdapter(**spec["denoiser"].get(
                "motion_adapter", {})))
        else:
            denoiser = getattr(diffusers, spec["denoiser"]["class"])(**spec["denoiser"].get("config", {}))
        vae = getattr(diffusers, spec["vae"]["class"])(**spec["vae"].get("config", {}))
    denoiser_name = "unet" if preset.family == "animatediff" else "transformer"
    denoiser.to(DTYPES[dtypes.get(denoiser_name, preset.dtype)])
    vae.to(DTYPES[dtypes.get("vae", preset.dtype)])
    others = {name: int(gb * 1e9) for name, gb in spec.get("other_weights_gb", {}).items()}
    return MetaModels(preset.family, denoiser, vae, others, batch, tokens)


# ---- tracing


class _FusedAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` as a fused kernel holds it: its output, not the scores."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            value = args[2] if len(args) > 2 else kwargs["value"]
            return query.new_empty((*query.shape[:-1], value.shape[-1]))
        return func(*args, **kwargs)


@contextmanager
def _traced() -> Iterator[TensorMemoryMeter]:
    with torch.no_grad(), _FusedAttention(), TensorMemoryMeter() as meter:
        yield meter


def _vae_factors(family: str, vae: Any) -> tuple[int, int]:
    """(temporal, spatial) compression of the VAE, as the pipelines compute them."""
    if family == "wan":
        return vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if family in ("ltx", "hunyuan_video"):
        return vae.temporal_compression_ratio, vae.spatial_compression_ratio
    if family == "cogvideox":
        return vae.config.temporal_compression_ratio, 2 ** (len(vae.config.block_out_channels) - 1)
    return 1, 2 ** (len(vae.config.block_out_channels) - 1)  # animatediff: an image VAE


def _latent_size(models: MetaModels, frames: int, height: int, width: int) -> tuple[int, int, int]:
    temporal, spatial = _vae_factors(models.family, models.vae)
    latent_frames = frames if temporal == 1 else (frames - 1) // temporal + 1
    return latent_frames, height // spatial, width // spatial


def _denoiser_inputs(models: MetaModels, frames: int, height: int, width: int) -> dict[str, Any]:
    m, config = models.denoiser, models.denoiser.config
    dtype = next(p.dtype for p in m.parameters() if p.is_floating_point())
    b, tokens = models.batch, models.text_tokens
    t, h, w = _latent_size(models, frames, height, width)

    def empty(*shape, dtype=dtype):
        return torch.empty(*shape, device="meta", dtype=dtype)

    timestep = torch.full((b,), 500, device="meta", dtype=torch.long)
    if models.family == "wan":
        return dict(hidden_states=empty(b, config.in_channels, t, h, w), timestep=timestep,
                    encoder_hidden_states=empty(b, tokens, config.text_dim), return_dict=False)
    if models.family == "cogvideox":
        return dict(hidden_states=empty(b, t, config.in_channels, h, w), timestep=timestep,
                    encoder_hidden_states=empty(b, config.max_text_seq_length, config.text_embed_dim), return_dict=False)
    if models.family == "ltx":
        temporal, spatial = _vae_factors("ltx", models.vae)
        return dict(hidden_states=empty(b, t * h * w, config.in_channels), timestep=timestep,
                    encoder_hidden_states=empty(b, tokens, config.caption_channels),
                    encoder_attention_mask=empty(b, tokens, dtype=torch.long), num_frames=t, height=h, width=w,
                    rope_interpolation_scale=(temporal / 25, spatial, spatial), return_dict=False)
    if models.family == "hunyuan_video":
        return dict(hidden_states=empty(b, config.in_channels, t, h, w), timestep=timestep,
                    encoder_hidden_states=empty(b, tokens, config.text_embed_dim),
                    encoder_attention_mask=empty(b, tokens, dtype=torch.long),
                    pooled_projections=empty(b, config.pooled_projection_dim),
                    guidance=torch.full((b,), 6000.0, device="meta"), return_dict=False)
    # AnimateDiffPipeline repeats the prompt embeddings for every frame.
    return dict(sample=empty(b, config.in_channels, t, h, w), timestep=timestep,
                encoder_hidden_states=empty(b * t, tokens, config.cross_attention_dim), return_dict=False)


def trace_denoiser(models: MetaModels, frames: int, height: int, width: int,
                   slicing: Slicing | None = None) -> tuple[int, dict[str, Any]]:
    """Peak activation bytes of one denoiser call at this size (its inputs included), and what
    slicing reported of it (empty without slicing)."""
    inputs = _denoiser_inputs(models, frames, height, width)
    stack = [slicing] if slicing is not None and slicing.feed_forward else []
    with apply_stack(models.denoiser, stack) as applied:
        with _traced() as meter:
            models.denoiser(**inputs)
        detail = dict(applied.reports()[0].detail) if stack else {}
    inputs_bytes = sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))
    return meter.peak_bytes + inputs_bytes, detail


def _video_bytes(frames: int, height: int, width: int) -> int:
    return 3 * frames * height * width * 4


def trace_decode(models: MetaModels, frames: int, height: int, width: int, tiling: VaeTiling | None = None,
                 sliced: bool = False) -> int:
    """Peak activation bytes of decoding the video at this size (with the pipeline's post-processing);
    ``tiling``: decoded in tiles as that method sets them; ``sliced``: frame by frame (image VAEs)."""
    from vdtome.methods.vae_tiling_hooks import AppliedVaeTiling  # diffusers' hooks, only when tracing

    vae = models.vae
    t, h, w = _latent_size(models, frames, height, width)
    dtype = next(p.dtype for p in vae.parameters())
    channels = vae.config.latent_channels if models.family != "wan" else vae.config.z_dim
    saved = (getattr(vae, "use_tiling", False), getattr(vae, "use_slicing", False))
    vae.use_tiling = False
    applied = AppliedVaeTiling(SimpleNamespace(vae=vae), tiling) if tiling is not None else None
    try:
        # After the decode the pipeline's VideoProcessor holds the float32 video, (video / 2 + 0.5)
        # and its clamp at once.
        postprocess = 3 * _video_bytes(frames, height, width)
        if models.family == "animatediff":
            vae.use_slicing = sliced
            chunk = min(ANIMATEDIFF_DECODE_CHUNK, frames)
            with _traced() as meter:
                out = vae.decode(torch.empty(chunk, channels, h, w, device="meta", dtype=dtype)).sample
            # Chunks are decoded one after another; the ones before the last are held meanwhile.
            before_last = _video_bytes(frames - chunk, height, width) * out.element_size() // 4
            return max(meter.peak_bytes + before_last, postprocess)
        with _traced() as meter:
            vae.decode(torch.empty(1, channels, t, h, w, device="meta", dtype=dtype))
        return max(meter.peak_bytes, postprocess)
    finally:
        if applied is not None:
            applied.remove()
        vae.use_tiling, vae.use_slicing = saved


# ---- candidates


@dataclass(frozen=True)
class Candidate:
    """A combination of memory methods and its estimated peak (bytes)."""

    name: str
    configs: tuple[Any, ...]
    phases: dict[str, int]  # phase -> weights held then + its activations
    weights_bytes: int  # weights held during denoising
    unmodelled: tuple[str, ...] = ()  # methods of the stack the plan takes as leaving memory unchanged

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def specs(self) -> tuple[str, ...]:
        """The methods as ``--method`` takes them (``slicing:chunk_tokens=9216``)."""
        return tuple(method_spec(config) for config in self.configs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "peak_bytes": self.peak_bytes, "phases": dict(self.phases),
                "weights_bytes": self.weights_bytes, "unmodelled": list(self.unmodelled), "methods": list(self.specs)}


@dataclass(frozen=True)
class Choice:
    """What the plan picks for one budget: the cheapest candidate that fits, its slicing chunks as
    large as the budget allows; None where nothing fits."""

    budget_bytes: int
    candidate: Candidate | None

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes,
                "choice": None if self.candidate is None else self.candidate.to_dict()}


@dataclass(frozen=True)
class PlanCheck:
    """The plan's estimate of both sides of a comparison, next to the peaks measured in it
    (``measured``: what the measured figures count)."""

    baseline: Candidate
    accelerated: Candidate
    measured_baseline_bytes: int | None
    measured_accelerated_bytes: int | None
    measured: str

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline.to_dict(), "accelerated": self.accelerated.to_dict(),
                "measured_baseline_bytes": self.measured_baseline_bytes,
                "measured_accelerated_bytes": self.measured_accelerated_bytes, "measured": self.measured}


_SIZERS: OrderedDict[tuple, Sizer] = OrderedDict()
_SIZERS_LOCK = threading.Lock()


def sizer_for(preset_name: str, frames: int, height: int, width: int, pipe: Any = None,
              source: str | None = None) -> Sizer:
    """A :class:`Sizer` kept for the next request of this preset, weights and size (the last 8);
    ``pipe``: the pipeline if it is loaded (see :func:`meta_models`); ``source``: the weights'
    folder or repository where they are not the preset's own."""
    key = (preset_name, source, frames, height, width)
    with _SIZERS_LOCK:
        if key not in _SIZERS:
            _SIZERS[key] = Sizer(preset_name, frames, height, width, pipe=pipe)
        _SIZERS.move_to_end(key)
        while len(_SIZERS) > 8:
            _SIZERS.popitem(last=False)
        return _SIZERS[key]


@dataclass(frozen=True)
class MemoryPlan:
    preset: str
    frames: int
    height: int
    width: int
    weights: dict[str, int]
    denoise_activation: dict[str, int]  # "plain" / "sliced"
    decode_activation: dict[str, int]  # "plain" / "tiled" / "sliced"
    candidates: tuple[Candidate, ...]
    choices: tuple[Choice, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def baseline(self) -> Candidate:
        return self.candidates[0]

    def choose(self, budget_bytes: int) -> Candidate | None:
        """The first candidate (cheapest in time) that fits ``budget_bytes``, slicing in its auto
        chunks; None if none does (:attr:`choices` holds the budgets' choices with chunks fitted)."""
        return next((c for c in self.candidates if c.peak_bytes <= budget_bytes), None)

    @property
    def smallest(self) -> Candidate:
        return min(self.candidates, key=lambda c: c.peak_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "frames": self.frames, "height": self.height, "width": self.width,
            "weights": dict(self.weights),
            "denoise_activation": dict(self.denoise_activation), "decode_activation": dict(self.decode_activation),
            "candidates": [c.to_dict() for c in self.candidates],
            "choices": [choice.to_dict() for choice in self.choices], "notes": list(self.notes),
        }


def _block_sizes(module: torch.nn.Module) -> tuple[int, int]:
    """(largest block, bytes outside the blocks) for diffusers' block-level group offloading: the
    blocks are the entries of the module's direct ModuleList / Sequential children."""
    blocks = [_bytes(block) for child in module.children()
              if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) for block in child]
    return max(blocks, default=0), _bytes(module) - sum(blocks)


def _cast_bytes(denoiser: torch.nn.Module) -> int:
    """The denoiser's weights under layerwise casting to float8, as diffusers stores them."""
    cast = copy.deepcopy(denoiser)
    cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                  compute_dtype=next(p.dtype for p in denoiser.parameters()))
    return _bytes(cast)


class Sizer:
    """One preset at one size: the models built on meta once, each trace made when first asked for."""

    def __init__(self, preset_name: str, frames: int | None = None, height: int | None = None,
                 width: int | None = None, progress: Callable[[str], None] | None = None, pipe: Any = None) -> None:
        self.preset = get_preset(preset_name)
        p = self.preset
        self.frames, self.height, self.width = frames or p.num_frames, height or p.height, width or p.width
        self.say = progress or (lambda text: None)
        self.say(f"building {p.label} on the meta device")
        self.models = meta_models(p, pipe)
        m = self.models
        self.weights = {"denoiser": _bytes(m.denoiser), "vae": _bytes(m.vae), **m.other_weights}
        self.text_bytes = sum(v for k, v in m.other_weights.items() if k.startswith("text_encoder"))
        from vdtome.methods.slicing_hooks import decodes_frames_as_batch  # diffusers' hooks, only when tracing

        self.frame_slicing = decodes_frames_as_batch(m.vae)
        self._traces: dict[tuple, int | None] = {}
        # Traces hook and switch the shared meta models: one at a time (a request's fit check and
        # another's estimate may ask at once).
        self._lock = threading.RLock()

    def _trace(self, key: tuple, what: str, run: Callable[[], int | None]) -> int | None:
        with self._lock:
            if key not in self._traces:
                self.say(f"tracing {what}")
                self._traces[key] = run()
            return self._traces[key]

    def _denoise_trace(self, slicing: Slicing | None) -> tuple[int, dict[str, Any]]:
        # Keyed by what changes the trace: the feed-forward chunks. Attention is traced as a fused
        # kernel holds it (attention slicing leaves it alone), and a bare denoiser has no VAE.
        sliced = replace(slicing, vae=False, attention=False) if slicing is not None and slicing.feed_forward else None
        what = "one denoiser call" + (f" sliced (chunk {sliced.chunk_tokens or 'auto'})" if sliced else "")
        return self._trace(("denoise", sliced), what, lambda: trace_denoiser(
            self.models, self.frames, self.height, self.width, sliced))

    def denoise(self, slicing: Slicing | None) -> int:
        return self._denoise_trace(slicing)[0]

    def feed_forward_rows(self) -> tuple[int, int]:
        """(rows, auto chunk) of the denoiser's widest feed-forward call at this size."""
        detail = self._denoise_trace(Slicing())[1]
        return detail.get("widest_rows", 0), detail.get("widest_chunk", 0)

    def fitted(self, candidate: Candidate, budget_bytes: int) -> Candidate:
        """``candidate`` with its feed-forward chunks as large as ``budget_bytes`` allows (fewer chunks
        cost less time): the whole call first, then halves, quarters... down to the auto chunk."""
        slicing = next((c for c in candidate.configs if isinstance(c, Slicing)), None)
        if slicing is None or not slicing.feed_forward or slicing.chunk_tokens:
            return candidate
        rows, auto = self.feed_forward_rows()
        parts = 1
        while rows and -(-rows // parts) > auto:
            if parts == 1:  # no feed-forward slicing (the frame-by-frame decode kept where it acts)
                kept = (replace(slicing, feed_forward=False),) if slicing.vae and self.frame_slicing else ()
            else:
                kept = (replace(slicing, chunk_tokens=-(-rows // parts)),)
            fitted = self.estimate(tuple(part for c in candidate.configs for part in (kept if c is slicing else (c,))))
            if fitted.peak_bytes <= budget_bytes:
                return fitted
            parts *= 2
        return candidate

    def decode(self, tiling: VaeTiling | None, sliced: bool) -> int:
        if tiling is None and self.preset.vae_tiling:
            tiling = VaeTiling()  # as the preset loads it
        sliced = sliced and self.frame_slicing
        if tiling is not None and sliced:
            # Frame by frame and each frame in tiles: taken as the smaller of the two rather than
            # traced (thousands of tile decodes on meta cost minutes, for a figure within their range).
            return min(self.decode(tiling, False), self.decode(None, True))
        return self._trace(("decode", tiling, sliced), "the decode" + (" in tiles" if tiling else "") +
                           (" frame by frame" if sliced else ""), lambda: trace_decode(
            self.models, self.frames, self.height, self.width, tiling, sliced))

    def text(self) -> int | None:
        return self.models.text_activation

    def cast_bytes(self) -> int:
        return self._trace(("cast",), "the float8 weights", lambda: _cast_bytes(self.models.denoiser))

    def held(self, casting: bool, offload: str | None) -> dict[str, int]:
        """Weights held on the device in each phase."""
        denoiser = self.weights["denoiser"]
        denoiser_weights = self.cast_bytes() if casting else denoiser
        if offload == "model":  # one component on the GPU at a time
            return {TEXT_ENCODING: self.text_bytes, DENOISING: denoiser_weights, VAE_DECODE: self.weights["vae"]}
        if offload is not None:  # group offloading: a group computing, the next one arriving (+ what is outside blocks)
            if offload == "group_leaf":
                largest, outside = max((_bytes(m) for m in self.models.denoiser.modules() if not list(m.children())),
                                       default=0), 0
            else:
                largest, outside = _block_sizes(self.models.denoiser)
            group = largest * denoiser_weights // max(denoiser, 1)
            return {TEXT_ENCODING: self.text_bytes, DENOISING: 2 * group + outside, VAE_DECODE: self.weights["vae"]}
        everything = sum(self.weights.values()) - denoiser + denoiser_weights
        return dict.fromkeys((TEXT_ENCODING, DENOISING, VAE_DECODE), everything)

    def estimate(self, configs: tuple[Any, ...], name: str | None = None) -> Candidate:
        """The estimated peak of a call with this stack applied (methods that change no memory, such
        as token merging and the step caches, are taken as they leave it: unchanged)."""
        slicing = next((c for c in configs if isinstance(c, Slicing)), None)
        tiling = next((c for c in configs if isinstance(c, VaeTiling)), None)
        casting = any(isinstance(c, LayerwiseCasting) for c in configs)
        offload = next((c.mode for c in configs if isinstance(c, Offload)), None)
        held = self.held(casting, offload)
        phases = {TEXT_ENCODING: held[TEXT_ENCODING] + (self.text() or 0),
                  DENOISING: held[DENOISING] + self.denoise(slicing),
                  VAE_DECODE: held[VAE_DECODE] + self.decode(tiling, bool(slicing and slicing.vae))}
        unmodelled = tuple(method_of(c).label for c in configs if type(c) not in _NAMES and not isinstance(c, Offload))
        return Candidate(name or stack_name(configs), tuple(configs), phases, held[DENOISING], unmodelled)

    def least_possible(self) -> int:
        """A floor under every candidate's peak that needs no tiled trace: the text encoders' and the
        VAE's weights (held alone under offloading), and the sliced denoiser call with group offloading."""
        held = self.held(casting=True, offload="group_block")
        return max(held[TEXT_ENCODING], held[VAE_DECODE], held[DENOISING] + self.denoise(Slicing()))

    def notes(self) -> tuple[str, ...]:
        notes = ["not counted: kernel workspaces, the CUDA context (~0.3-0.5 GB), allocator fragmentation"]
        if self.text() is None:
            notes.append("the text encoders are counted by their weights only (their activations at this prompt "
                         "length are small next to them)")
        if any(k.startswith("transformer") for k in self.models.other_weights):
            notes.append("the second expert's weights are held with the first (both on the GPU) unless offloaded")
        if self.preset.vae_tiling:
            notes.append("this preset decodes in tiles as loaded (as the model's own example does)")
        return tuple(notes)


_NAMES = {Slicing: "slicing", VaeTiling: "VAE tiling", LayerwiseCasting: "fp8 weights"}


def stack_name(configs: tuple[Any, ...]) -> str:
    parts = [_NAMES[type(c)] if type(c) in _NAMES else
             f"{'model' if c.mode == 'model' else 'group'} offload" if isinstance(c, Offload) else None
             for c in configs]
    return " + ".join(p for p in parts if p) or "as loaded"


# The candidates, cheapest in time first: slicing costs almost nothing; tiling slows the decode a
# little; model offload moves each component once a call; float8 weights pay a cast per layer and
# change outputs; group offloading moves weights every step.
CANDIDATES = (
    (),
    (Slicing(),),
    (Slicing(), VaeTiling()),
    (Slicing(), VaeTiling(), Offload(mode="model")),
    (Slicing(), VaeTiling(), LayerwiseCasting()),
    (Slicing(), VaeTiling(), LayerwiseCasting(), Offload(mode="model")),
    (Slicing(), VaeTiling(), Offload(mode="group_block")),
    (Slicing(), VaeTiling(), LayerwiseCasting(), Offload(mode="group_block")),
)


def make_plan(preset_name: str, frames: int | None = None, height: int | None = None, width: int | None = None,
              budgets: tuple[int, ...] = (), progress: Callable[[str], None] | None = None) -> MemoryPlan:
    """Estimate the preset's request at this size with each candidate combination of memory methods,
    and choose for each budget (bytes)."""
    sizer = Sizer(preset_name, frames, height, width, progress)
    candidates = tuple(sizer.estimate(configs) for configs in CANDIDATES)
    denoise = {"plain": sizer.denoise(None), "sliced": sizer.denoise(Slicing())}
    decode = {"plain": sizer.decode(None, False), "tiled": sizer.decode(VaeTiling(), False)}
    if sizer.frame_slicing:
        decode["sliced"] = sizer.decode(None, True)
    plan = MemoryPlan(sizer.preset.name, sizer.frames, sizer.height, sizer.width, sizer.weights, denoise, decode,
                      candidates, notes=sizer.notes())
    choices = []
    for budget in budgets:
        candidate = plan.choose(budget)
        choices.append(Choice(budget, None if candidate is None else sizer.fitted(candidate, budget)))
    return replace(plan, choices=tuple(choices))


def size_text(size: float) -> str:
    """Bytes as GB (2^30) or, below one, MB (2^20), right-aligned in 9 characters."""
    return f"{size / GIB:6.2f} GB" if size >= GIB else f"{size / 2**20:6.1f} MB"


def choice_text(plan: MemoryPlan, choice: Choice) -> str:
    budget = f"budget {choice.budget_bytes / GIB:.4g} GB"
    if choice.candidate is None:
        return (f"{budget}: nothing fits; the smallest is {plan.smallest.name} at "
                f"{size_text(plan.smallest.peak_bytes).strip()}")
    chosen = choice.candidate
    methods = " ".join(f"--method {spec}" for spec in chosen.specs) or "(no memory method)"
    return f"{budget}: {chosen.name} (estimated peak {size_text(chosen.peak_bytes).strip()})\n    {methods}"


def plan_text(plan: MemoryPlan) -> str:
    """The plan as ``python -m vdtome plan`` prints it, with the choice for each budget."""
    gb = size_text
    lines = [f"{plan.preset} at {plan.frames} frames, {plan.height}x{plan.width}",
             "weights: " + ", ".join(f"{name} {gb(size).strip()}" for name, size in plan.weights.items()),
             f"denoiser call activations: {gb(plan.denoise_activation['plain']).strip()} plain, "
             f"{gb(plan.denoise_activation['sliced']).strip()} sliced",
             "decode activations: " + ", ".join(f"{gb(size).strip()} {kind}" for kind, size in
                                                 plan.decode_activation.items()),
             "", f"{'estimated peak by phase':52} {'text':>9} {'denoise':>9} {'decode':>9} {'peak':>9}"]
    for c in plan.candidates:
        lines.append(f"{c.name:52} {gb(c.phases[TEXT_ENCODING])} {gb(c.phases[DENOISING])} "
                     f"{gb(c.phases[VAE_DECODE])} {gb(c.peak_bytes)}")
    if plan.choices:
        lines.append("")
        lines += [choice_text(plan, choice) for choice in plan.choices]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
