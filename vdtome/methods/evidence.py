"""A spy that counts the computations a denoiser really ran: the evidence that a cache skipped.

Per sample (a call on a CFG batch of 2 counts 2, so a cache that drops the unconditional half
skips half), over every denoiser call since ``reset``:
* expected block computations: samples entering the denoiser x its transformer blocks;
* block computations: a block call in which any of its attention modules was entered (a block
  a cache skipped returns without calling them);
* expected / actual attention computations: attention modules' calls, and the calls that reached
  their first projection (an attention a cache answers from its store never projects).
A few torch forward pre-hooks (no host sync, no change to any value, no recompile under
torch.compile); removed exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vdtome.methods.base import Evidence

# diffusers' names for the ModuleLists that hold transformer blocks (Hunyuan has two).
BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks", "temporal_transformer_blocks", "layers")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block for name, child in model.named_children()
            if name in BLOCK_LISTS and isinstance(child, torch.nn.ModuleList) for block in child]


def _attentions(block: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [m for m in block.modules() if isinstance(m, (Attention, AttentionModuleMixin))]


def _first_projection(attention: torch.nn.Module) -> torch.nn.Module | None:
    return next((m for m in attention.children() if isinstance(m, torch.nn.Linear)), None)


def _batch(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


# Where each count sits in the spy's counter tensor.
EXPECTED_BLOCKS, BLOCKS_RUN, EXPECTED_ATTENTION, ATTENTION_CALLS, ATTENTION_RUN, OPEN_BLOCK = range(6)


class ComputeSpy:
    """The counts live in one int64 tensor on the denoiser's device, added to in place: under
    ``torch.compile`` a hook becomes part of the graph, where Python ints on the spy were values
    dynamo guards on, so a compiled denoiser recompiled at every call (and fell back to eager after
    eight). Reading a count (at report time) waits for the device once."""

    def __init__(self, models: Iterable[torch.nn.Module]) -> None:
        models = list(models)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        device = next((p.device for model in models for p in model.parameters() if p.device.type != "meta"),
                      torch.device("cpu"))
        self._counts = torch.zeros(6, dtype=torch.int64, device=device)
        for model in models:
            blocks = transformer_blocks(model)
            attentions = [len(_attentions(block)) for block in blocks]
            self._hook(model, self._on_denoiser(len(blocks), sum(attentions)))
            for block in blocks:
                self._hook(block, self._on_block)
                for attention in _attentions(block):
                    self._hook(attention, self._on_attention)
                    projection = _first_projection(attention)
                    if projection is not None:
                        self._hook(projection, self._on_projection)

    def _hook(self, module: torch.nn.Module, hook) -> None:
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _on_denoiser(self, blocks: int, attentions: int):
        def hook(module, args, kwargs):
            batch = _batch(args, kwargs)
            self._counts[EXPECTED_BLOCKS] += batch * blocks
            self._counts[EXPECTED_ATTENTION] += batch * attentions
        return hook

    def _on_block(self, module, args, kwargs):
        self._counts[OPEN_BLOCK] = _batch(args, kwargs)

    def _on_attention(self, module, args, kwargs):
        self._counts[ATTENTION_CALLS] += _batch(args, kwargs)
        self._counts[BLOCKS_RUN] += self._counts[OPEN_BLOCK]  # the first attention entered in this block call
        self._counts[OPEN_BLOCK] = 0

    def _on_projection(self, module, args, kwargs):
        self._counts[ATTENTION_RUN] += _batch(args, kwargs)

    def reset(self) -> None:
        self._counts.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    expected_blocks = property(lambda self: int(self._counts[EXPECTED_BLOCKS]))
    blocks_run = property(lambda self: int(self._counts[BLOCKS_RUN]))
    expected_attention = property(lambda self: int(self._counts[EXPECTED_ATTENTION]))
    attention_calls = property(lambda self: int(self._counts[ATTENTION_CALLS]))
    attention_run = property(lambda self: int(self._counts[ATTENTION_RUN]))

    @property
    def blocks_skipped(self) -> int:
        return self.expected_blocks - self.blocks_run

    @property
    def attention_skipped(self) -> int:
        return self.expected_attention - self.attention_run

    def evidence(self) -> tuple[Evidence, ...]:
        return (
            Evidence("transformer-block computations skipped (each CFG sample counted)", self.blocks_skipped, self.expected_blocks),
            Evidence("attention computations skipped (each CFG sample counted)", self.attention_skipped, self.expected_attention),
        )
