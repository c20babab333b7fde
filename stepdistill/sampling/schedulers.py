"""diffusers schedulers that reproduce stepdistill's few-step samplers inside plain pipelines."""

from __future__ import annotations


def renoising_scheduler(teacher_scheduler, schedule, num_steps: int):
    """The "predict x0, re-noise to the next timestep" sampler of DMD2 / consistency models.

    - VP teachers: ``LCMScheduler`` with ``original_inference_steps=num_steps`` gives exactly the
      evenly spaced timesteps ``[T-1, T-1-T/n, ...]`` at ``num_inference_steps=num_steps`` and re-noises
      with fresh Gaussian noise between steps (its boundary scalings are ~1e-7 from the identity here).
    - Flow teachers: ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling=True`` computes
      ``x0`` from the velocity and re-noises it to the next sigma.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    if schedule.kind == "flow":
        return FlowMatchEulerDiscreteScheduler.from_config(teacher_scheduler.config, stochastic_sampling=True)
    return LCMScheduler.from_config(teacher_scheduler.config, original_inference_steps=num_steps)
