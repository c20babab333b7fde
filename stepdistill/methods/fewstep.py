"""What one-step and few-step generators of the DMD family share (DMD, DMD2, LADD).

A generator conditioned on ``num_steps`` timesteps t_0 > ... > t_{k-1}, sampled the DMD2 way (DMD2
Sec. 4.5): predict x0 at t_i, re-noise it with fresh noise to t_{i+1}; exported as the re-noising
scheduler of ``sampling/schedulers.py``. Training inputs for step k come from backward simulation
(the generator's own k-step output, DMD2 Sec. 4.5) or from noised data latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stepdistill.methods.base import DistillMethod, MethodContext


def check_generator_schedule(cfg, ratio_key: str = "critic_steps_per_generator_step") -> None:
    """The checks every few-step generator config shares: generator steps and timesteps, the timestep
    range of the distillation loss (when the config has one), and the update ratio ``ratio_key``."""
    if cfg.num_steps < 1:
        raise ValueError(f"method.num_steps={cfg.num_steps} must be >= 1")
    if cfg.generator_timesteps is not None:
        ts = list(cfg.generator_timesteps)
        if len(ts) != cfg.num_steps:
            raise ValueError(
                f"method.generator_timesteps has {len(ts)} entries but method.num_steps={cfg.num_steps}; "
                "give one timestep per generator step, highest first"
            )
        if any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"method.generator_timesteps={ts} must be strictly decreasing")
    if hasattr(cfg, "min_t_frac") and not 0.0 <= cfg.min_t_frac < cfg.max_t_frac <= 1.0:
        raise ValueError(
            f"method.min_t_frac={cfg.min_t_frac}, max_t_frac={cfg.max_t_frac}: need 0 <= min < max <= 1"
        )
    if getattr(cfg, ratio_key) < 1:
        raise ValueError(f"method.{ratio_key}={getattr(cfg, ratio_key)} must be >= 1")


@torch.no_grad()
def renoising_sample(denoiser, schedule, timesteps, noise, cond, generator=None) -> torch.Tensor:
    """x0 at each timestep, re-noised with fresh noise to the next (what the exported LCMScheduler /
    stochastic flow scheduler does); returns the last x0."""
    x, n = noise, len(noise)
    for i, t in enumerate(timesteps):
        x0 = denoiser(x, torch.full((n,), float(t), device=noise.device), cond, output="x0")
        if i + 1 < len(timesteps):
            fresh = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x = schedule.add_noise(x0, fresh, torch.full((n,), float(timesteps[i + 1]), device=noise.device))
    return x0


@dataclass
class ScoreDistillConfig:
    """The fields every score-distillation config shares (DMD, DMD2, VSD, SiD, Phased DMD): the generator's
    steps and timesteps, the CFG scales of the real and fake scores, the noise range of the distillation
    loss and the critic/generator update ratio. Methods redeclare a field to change its default."""

    name: str = ""
    # Generator steps; > 1 trains a few-step student.
    num_steps: int = 1
    # Timesteps the generator is conditioned on, highest first (default: evenly spaced from the top, those of
    # the exported scheduler: [999] for one step, [999, 749, 499, 249] for four of a 1000-step VP teacher).
    generator_timesteps: list[int] | None = None
    # CFG scales of the real score (teacher) and of the fake score (critic) in the generator loss.
    real_guidance_scale: float = 3.0
    fake_guidance_scale: float = 1.0
    # Noise range of the generator loss, as fractions of the teacher's training timesteps (DMD Sec. 3.2:
    # T_min = 0.02 T, T_max = 0.98 T).
    min_t_frac: float = 0.02
    max_t_frac: float = 0.98
    # Critic (fake score) updates per generator update (TTUR; DMD2 Sec. 4.2).
    critic_steps_per_generator_step: int = 1

    def __post_init__(self) -> None:
        check_generator_schedule(self)


def check_exportable_timesteps(method, default: list[float]) -> None:
    """Hand-set generator timesteps are exported as the pipeline call's ``timesteps=``, an argument the SD3 and
    FLUX pipelines do not have (they take ``sigmas``, which their schedulers shift again): refuse them there."""
    if method.export_timesteps() is not None and method.teacher.schedule.kind == "flow":
        raise ValueError(
            f"method.generator_timesteps={list(method.cfg.generator_timesteps)}: the {method.teacher.family} "
            "pipeline takes no timesteps= argument, so an export could not run hand-set timesteps; drop "
            "method.generator_timesteps (the default, the exported scheduler's own "
            f"{[round(t, 1) for t in default]}, needs none)")


class FewStepGenerator(DistillMethod):
    """Generator timesteps, training inputs, the re-noising sampler and its export.

    Config fields used: ``num_steps``, ``generator_timesteps`` and ``backward_simulation`` (a config without
    that field always trains step k > 0 on the generator's own earlier steps).
    """

    def __init__(self, cfg, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        # Default: exactly the timesteps the exported pipeline will run (sampling/schedulers.py).
        self.timesteps = [float(t) for t in (cfg.generator_timesteps or self._default_timesteps(cfg.num_steps))]
        check_exportable_timesteps(self, self._default_timesteps(cfg.num_steps))
        self.latent_shape = tuple(self.teacher.latent_shape(ctx.resolution))
        self._fake_cache: tuple | None = None  # (step, prompts, x0) of the step's generator samples

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)
    # ---- helpers ------------------------------------------------------------------------------
    def _default_timesteps(self, num_steps: int) -> list[float]:
        from stepdistill.sampling.schedulers import pipeline_timesteps

        return pipeline_timesteps(self.teacher, num_steps, self.ctx.resolution)

    def _t(self, t: float, n: int) -> torch.Tensor:
        return torch.full((n,), float(t), device=self.ctx.device)

    def _generator_input(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's input x_{t_k} and t_k for this batch (backward simulation for k > 0)."""
        cond = batch["cond"]
        n = len(cond)
        noise = torch.randn((n, *self.latent_shape), device=self.ctx.device)
        if len(self.timesteps) == 1:
            return noise, self._t(self.timesteps[0], n)
        k = self.ctx.agree(int(torch.randint(len(self.timesteps), ()).item()))  # same k on every process
        if getattr(self.cfg, "backward_simulation", True):
            x = noise
            with torch.no_grad():
                generator = self.roles["generator"].denoiser
                for i in range(k):
                    x0 = generator(x, self._t(self.timesteps[i], n), cond, output="x0")
                    x = self.schedule.add_noise(x0, torch.randn_like(x0), self._t(self.timesteps[i + 1], n))
            return x, self._t(self.timesteps[k], n)
        real = batch["real"]["latents"][:n]
        t = self._t(self.timesteps[k], n)
        return (noise if k == 0 else self.schedule.add_noise(real, noise, t)), t

    def _take_fake(self, batch: dict, step: int) -> torch.Tensor:
        """This step's generator samples: those of the generator phase, else new ones without a graph.
        Kept for the step's last phase (the critic's, or the LADD discriminator's)."""
        cache = self._fake_cache
        if cache is None or cache[0] != step or cache[1] != tuple(batch["prompts"]):
            with torch.no_grad():
                x_in, t_in = self._generator_input(batch)
                x0 = self.roles["generator"].denoiser(x_in, t_in, batch["cond"], output="x0")
            cache = self._fake_cache = (step, tuple(batch["prompts"]), x0)
        return cache[2]

    def _adversarial_samples(self, batch: dict, step: int):
        """The samples a LADD discriminator phase scores (``AdversarialHost``): this step's generator samples,
        made anew on iterations without a generator update."""
        return self._take_fake(batch, step), batch["cond"]

    # ---- sampling and export ------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise, cond, uncond=None, num_steps=None, generator=None):
        """DMD2's few-step sampler: predict x0, re-noise it to the next timestep with fresh noise."""
        timesteps = self.timesteps
        if num_steps is not None and num_steps != len(timesteps):
            timesteps = self._default_timesteps(num_steps)
        return renoising_sample(self.roles[self.student_role].denoiser, self.schedule, timesteps, noise, cond,
                                generator)

    def export_scheduler(self, num_steps=None):
        from stepdistill.sampling.schedulers import renoising_scheduler

        return renoising_scheduler(self.teacher, num_steps or len(self.timesteps))

    def export_timesteps(self) -> list[float] | None:
        """Timesteps the exported scheduler must be called with, when they differ from its defaults
        (only when the config sets ``method.generator_timesteps`` by hand)."""
        default = self._default_timesteps(len(self.timesteps))
        same = all(abs(float(a) - float(b)) < 1e-3 for a, b in zip(default, self.timesteps))
        return None if same else list(self.timesteps)
