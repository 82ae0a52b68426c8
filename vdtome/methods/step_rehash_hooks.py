"""Step rehash's hooks (its declaration, config and form are in :mod:`vdtome.methods.step_rehash`):
the first deep block of each UNet call decides whether this call reuses the deep blocks' outputs
of the last full step, and every deep block then runs or returns its stored output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook

from vdtome.core.denoisers import denoisers_of
from vdtome.core.steps import StepContext
from vdtome.methods.base import Evidence, MethodReport
from vdtome.methods.module_hooks import attach, detach
from vdtome.methods.step_rehash import NAME, StepRehash, deep_blocks, summary

HOOK = "vdtome_step_rehash"


@dataclass
class _Branch:
    """One branch's (conditional / unconditional call's) reuse state."""

    reference: torch.Tensor | None = None  # the first deep block's input at the last full step
    outputs: dict[int, Any] = field(default_factory=dict)  # deep block -> its output at that step
    full_step: int = -1
    in_row: int = 0
    reusing: bool = False


@dataclass
class RehashStats:
    calls: int = 0
    reused_calls: int = 0
    block_calls: int = 0
    blocks_skipped: int = 0
    changes: list[float] = field(default_factory=list)  # measured change at each decision (similarity)


class RehashState:
    """Shared by the hooks of one UNet: decides at its first deep block, serves the others."""

    def __init__(self, config: StepRehash, context: StepContext) -> None:
        self.config = config
        self.context = context
        self.stats = RehashStats()
        self.branches: dict[int, _Branch] = {}
        self.current = _Branch()  # the branch of the call under way (set by decide)
        self.run = -1

    def reset(self) -> None:
        self.stats = RehashStats()
        self.branches.clear()

    def decide(self, hidden: torch.Tensor) -> None:
        state = self.context.state
        if state.run != self.run:  # a new generation: nothing carries over
            self.branches.clear()
            self.run = state.run
        branch = self.branches.setdefault(max(state.call_in_step, 0), _Branch())
        config, stats = self.config, self.stats
        stats.calls += 1
        reuse = branch.reference is not None and branch.reference.shape == hidden.shape and config.interval > 1
        if reuse and config.mode == "interval":
            reuse = state.step - branch.full_step < config.interval
        elif reuse:
            change = ((hidden - branch.reference).abs().mean() / branch.reference.abs().mean().clamp_min(1e-12)).item()
            stats.changes.append(round(change, 5))
            reuse = change < config.threshold and branch.in_row < config.interval - 1
        branch.reusing = reuse
        if reuse:
            branch.in_row += 1
            stats.reused_calls += 1
        else:
            branch.reference, branch.outputs, branch.full_step, branch.in_row = hidden, {}, state.step, 0
        self.current = branch

    def run_block(self, index: int, compute) -> Any:
        branch = self.current
        self.stats.block_calls += 1
        if branch.reusing and index in branch.outputs:
            self.stats.blocks_skipped += 1
            return branch.outputs[index]
        branch.outputs[index] = output = compute()
        return output


class _DeepBlock(ModelHook):
    def __init__(self, state: RehashState, index: int, decides: bool) -> None:
        super().__init__()
        self.state = state
        self.index = index
        self.decides = decides

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.decides:
            self.state.decide(args[0] if args else kwargs["hidden_states"])
        return self.state.run_block(self.index, lambda: self.fn_ref.original_forward(*args, **kwargs))


class AppliedStepRehash:
    def __init__(self, pipe: Any, config: StepRehash) -> None:
        self.config = config
        self.unets = denoisers_of(pipe)
        self.context = StepContext.acquire(pipe)
        self.states = [RehashState(config, self.context) for _ in self.unets]
        try:
            for unet, state in zip(self.unets, self.states):
                blocks = deep_blocks(unet)
                attach(blocks, lambda block, blocks=blocks, state=state: _DeepBlock(
                    state, blocks.index(block), block is blocks[0]), HOOK, [unet])
        except BaseException:
            self.remove()
            raise

    def reset(self) -> None:
        for state in self.states:
            state.reset()

    def remove(self) -> None:
        detach(self.unets, HOOK)
        if self.context is not None:
            self.context.release()
            self.context = None

    def report(self) -> MethodReport:
        calls = sum(s.stats.calls for s in self.states)
        reused = sum(s.stats.reused_calls for s in self.states)
        block_calls = sum(s.stats.block_calls for s in self.states)
        skipped = sum(s.stats.blocks_skipped for s in self.states)
        changes = [c for s in self.states for c in s.stats.changes]
        deep = sum(len(deep_blocks(u)) for u in self.unets)
        notes = []
        if self.config.mode == "similarity" and changes and reused == 0:
            notes.append(f"step rehash never reused: the smallest change between steps was {min(changes):.3f}, above "
                         f"the threshold {self.config.threshold:g}")
        return MethodReport(
            method=NAME,
            summary={"settings": summary(self.config), "calls reused": reused},
            rows=(("denoiser calls that reused the deep blocks", f"{reused} of {calls}",
                   f"{skipped} of {block_calls} deep block calls skipped ({deep} deep blocks)"),),
            notes=tuple(notes),
            detail={"calls": calls, "reused_calls": reused, "deep_blocks": deep, "block_calls": block_calls,
                    "blocks_skipped": skipped, "changes": changes},
            evidence=(Evidence("deep UNet block calls skipped", skipped, block_calls),),
        )
