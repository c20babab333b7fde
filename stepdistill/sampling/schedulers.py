"""diffusers schedulers that reproduce stepdistill's few-step samplers inside plain pipelines.

The student's timesteps are *defined* by the scheduler it is exported with: ``pipeline_timesteps``
asks that scheduler which timesteps the teacher's own pipeline will use for ``num_inference_steps=N``,
and methods train on exactly those. So an export never needs hand-set timesteps.

The sampler is "predict x0, re-noise it to the next timestep with fresh noise" (DMD2's few-step
sampler, the consistency-model multistep sampler):
- VP teachers (SD 1.x/2.x, SDXL): ``LCMScheduler`` with ``original_inference_steps=N`` gives evenly
  spaced timesteps ``[T-1, T-1-T/N, ...]`` at ``num_inference_steps=N`` (its boundary-condition
  scalings differ from the identity by < 1e-7 there).
- Flow teachers (SD3, FLUX): ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` computes
  ``x0`` from the velocity and re-noises it to the next sigma. SD3's pipeline spaces its N timesteps
  from sigma 1 to the scheduler's smallest sigma (~0.009: a wasted last step), so the export sets
  ``shift_terminal`` to the regular grid's last sigma, ``shift(1/N)``; FLUX's pipeline passes
  ``sigmas = linspace(1, 1/N, N)`` and a resolution-dependent shift itself.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np


def _shift(sigma: float, shift: float) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def renoising_scheduler(teacher, num_steps: int):
    """The exported scheduler of a ``num_steps`` student of ``teacher``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    config = teacher.pipeline.scheduler.config
    if teacher.schedule.kind == "flow":
        extra = {"stochastic_sampling": True}
        if teacher.family != "flux" and num_steps > 1 and not config.get("use_dynamic_shifting", False):
            extra["shift_terminal"] = _shift(1.0 / num_steps, float(config.get("shift", 1.0)))
        return FlowMatchEulerDiscreteScheduler.from_config(config, **extra)
    # LCMScheduler picks N timesteps evenly from a grid of `original_inference_steps` and refuses N larger
    # than that grid: the full training grid gives the evenly spaced N-step schedule (999 / 999, 499 /
    # 999, 749, 499, 249 ...) for every N, so an export trained for 1 step can still be run at 2 or 4.
    return LCMScheduler.from_config(config, original_inference_steps=int(config.get("num_train_timesteps", 1000)))


def deterministic_scheduler(teacher, num_steps: int):
    """The exported scheduler of a student whose steps are DDIM jumps (``x_s = alpha_s x0 + sigma_s eps_hat``,
    no fresh noise): DDIM with trailing spacing and alpha 1 at the end (VP), or deterministic flow Euler, which
    is the same jump for a flow teacher. At ``num_inference_steps = num_steps`` both step over the timesteps
    of ``pipeline_timesteps`` (the evenly spaced grid from the top); other counts work too."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    config = teacher.pipeline.scheduler.config
    if teacher.schedule.kind == "flow":
        ref = renoising_scheduler(teacher, num_steps)
        return FlowMatchEulerDiscreteScheduler.from_config(ref.config, stochastic_sampling=False)
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
                                     clip_sample=False)


def pipeline_timesteps(teacher, num_steps: int, resolution: int) -> list[float]:
    """The timesteps the exported pipeline runs at ``num_inference_steps=num_steps``."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    scheduler = renoising_scheduler(teacher, num_steps)
    if teacher.family == "flux":
        # As FluxPipeline.__call__ does: explicit sigmas and a shift from the image token count.
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = scheduler.config
        mu = calculate_shift(teacher.image_seq_len(resolution), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    else:
        scheduler.set_timesteps(num_steps)
    return [float(t) for t in scheduler.timesteps]


@contextlib.contextmanager
def seeded_steps(pipe, generator):
    """Make ``pipe``'s scheduler draw its per-step noise from ``generator`` during the block.

    The SD / SDXL / PixArt / SANA pipelines hand ``generator`` to ``scheduler.step``, but the SD3 and FLUX
    pipelines do not: a re-noising flow scheduler (``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``,
    every few-step flow export) then draws the noise of steps 2..N from torch's global RNG, so an image is
    not fixed by its seed and depends on what ran before it. Inside this block ``scheduler.step`` defaults
    ``generator`` to the call's generator(s) (one per image, continuing the stream the initial latents were
    drawn from, as the SD pipelines do); a caller that passes its own still wins. The scheduler becomes an
    instance of a subclass of its class for the block, so a copy made inside it (``HybridSampler`` copies its
    scheduler per call) steps its own state. Schedulers whose ``step`` takes no generator, and pipelines
    without a scheduler, are left alone.
    """
    scheduler = getattr(pipe, "scheduler", None)
    step = getattr(scheduler, "step", None)
    if generator is None or step is None or "generator" not in inspect.signature(step).parameters:
        yield
        return
    original = type(scheduler)
    scheduler.__class__ = _seeded_class(original)
    scheduler._seeded_generator = generator
    try:
        yield
    finally:
        scheduler.__class__ = original
        del scheduler._seeded_generator


_SEEDED_CLASSES: dict[type, type] = {}


def _seeded_class(cls: type) -> type:
    """``cls`` with a ``step`` whose ``generator`` defaults to the instance's ``_seeded_generator``."""
    if cls not in _SEEDED_CLASSES:
        def step(self, *args, **kwargs):
            if kwargs.get("generator") is None:
                kwargs["generator"] = self._seeded_generator
            return cls.step(self, *args, **kwargs)

        _SEEDED_CLASSES[cls] = type(cls.__name__, (cls,), {"step": step, "__module__": cls.__module__})
    return _SEEDED_CLASSES[cls]
