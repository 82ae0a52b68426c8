"""Step rehash (Streamlined Inference) for UNet video models: reuse the deep blocks' features of the
last fully computed step while the shallow features barely change.

A UNet's deep down, mid and up blocks change slowly from one denoising step to the next (the
paper's figure 6), while its shallow first down block and last up block carry the detail. Each
denoiser call computes the first down block; its output (the input of the first deep block) is
compared with the one of the last step that computed everything: while the relative mean absolute
change is below ``threshold``, every deep block returns its output of that step instead of running,
and the last up block combines the reused deep feature with this step's shallow skip connections.
``mode="interval"`` is the DeepCache baseline: everything is computed every ``interval`` steps and
the deep blocks are reused in between, whatever the change. Decisions are per branch of a step
(the conditional and unconditional calls when the pipeline makes two).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vdtome.core.denoisers import DenoiserType
from vdtome.methods.base import REUSES_BLOCKS, Deferred, Method
from vdtome.methods.schema import check_settings, config_values, form_fields, setting

NAME = "step_rehash"


@dataclass(frozen=True)
class StepRehash:
    """``mode``: ``similarity`` (reuse while the shallow feature changes less than ``threshold``, at
    most ``interval - 1`` steps in a row) or ``interval`` (compute every ``interval``-th step)."""

    mode: str = setting("similarity", "Reuse rule", "similarity: while the shallow feature changes less than the "
                        "threshold; interval: every N-th step computed (DeepCache)",
                        options=("similarity", "interval"))
    threshold: float = setting(0.1, "Change threshold", "reuse the deep blocks while the first down block's output "
                               "changed by less than this (relative mean absolute difference) since the last full "
                               "step; 0 never reuses", 0.0, 1.0, 0.01, sweepable=True)
    interval: int = setting(3, "Full step every", "compute every block at least every N-th step (1: always)",
                            1, 10, 1)

    def __post_init__(self) -> None:
        check_settings(self, NAME)


FIELDS = form_fields(StepRehash, NAME)


def parse(values: Mapping[str, Any]) -> StepRehash:
    return StepRehash(**config_values(StepRehash, NAME, values))


def summary(config: StepRehash) -> str:
    if config.mode == "interval":
        return f"every {config.interval} steps"
    return f"threshold {config.threshold:g} at most {config.interval - 1} in a row"


def deep_blocks(unet: Any) -> list[Any]:
    """A UNet's deep blocks, in call order: every down block but the first, the mid block, every up
    block but the last."""
    mid = [unet.mid_block] if getattr(unet, "mid_block", None) is not None else []
    return [*unet.down_blocks[1:], *mid, *unet.up_blocks[:-1]]


def _unavailable(denoiser_types: tuple[DenoiserType, ...]) -> str | None:
    for denoiser in denoiser_types:
        if not denoiser.name.startswith("UNet"):
            return (f"{denoiser.name} is a transformer: step rehash reuses a UNet's deep down/up blocks (use a "
                    "block-level step cache, e.g. first block cache, there)")
    return None


METHOD = Method(
    name=NAME,
    label="step rehash",
    config_type=StepRehash,
    apply=Deferred("vdtome.methods.step_rehash_hooks", "AppliedStepRehash"),
    fields=FIELDS,
    parse=parse,
    summary=summary,
    unavailable=_unavailable,
    reuses_across_steps=REUSES_BLOCKS,
    changes_memory=True,
    docs="reuses a UNet's deep block features from the last full step while its shallow features barely change "
         "(Streamlined Inference's step rehash; DeepCache's fixed interval as a mode)",
)
