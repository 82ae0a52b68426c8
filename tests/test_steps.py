"""The shared denoising-step context (vdtome.core.steps): counted from the scheduler, reversible."""

import inspect

import torch

from vdtome.core.steps import StepContext
from vdtome.offline import tiny


def run(pipe, steps=3):
    return pipe(prompt="a kite", num_frames=5, height=32, width=32, num_inference_steps=steps, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames


def test_steps_and_branches_come_from_the_scheduler_and_every_patch_is_undone():
    pipe = tiny.tiny_wan22_pipeline()  # two experts share the pipeline's one context
    signatures = {name: inspect.signature(getattr(pipe.scheduler, name)) for name in ("step", "set_timesteps")}
    seen = []
    context = StepContext.acquire(pipe)
    also = StepContext.acquire(pipe)  # a second method on the same pipeline shares it
    assert also is context
    for module in (pipe.transformer, pipe.transformer_2):
        module.register_forward_pre_hook(lambda m, a, k: seen.append((id(m), context.state.run, context.state.step,
                                                                     context.state.call_in_step)), with_kwargs=True)
    # Pipelines read these signatures (does step take a generator?): the patch must not hide them.
    assert {name: inspect.signature(getattr(pipe.scheduler, name)) for name in signatures} == signatures
    run(pipe, steps=4)
    run(pipe, steps=4)
    steps = [(run_, step, branch) for _, run_, step, branch in seen]
    one_run = [(step, branch) for step in range(4) for branch in (0, 1)]  # cond, then uncond, per step
    assert steps == [(1, s, b) for s, b in one_run] + [(2, s, b) for s, b in one_run]
    assert {module for module, *_ in seen} == {id(pipe.transformer), id(pipe.transformer_2)}  # both experts ran

    context.release()
    assert "step" in vars(pipe.scheduler)  # still one user
    also.release()
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    assert not hasattr(pipe, "_vdtome_step_context")
    assert len(pipe.transformer._forward_pre_hooks) == 1  # only this test's own hook is left


def test_the_current_timestep_is_the_pipelines_as_a_host_number():
    """The attention caches compare it with a range at every attention call: a Python number, the
    same value as the pipeline's own (device) current_timestep."""
    pipe = tiny.tiny_wan_pipeline()
    context = StepContext.acquire(pipe)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((context.current_timestep(), float(pipe.current_timestep))), with_kwargs=True)
    run(pipe, steps=3)
    assert len(seen) == 6 and all(isinstance(host, float) and host == device for host, device in seen)
    assert len({host for host, _ in seen}) == 3  # one per step, shared by both CFG branches
    context.release()
