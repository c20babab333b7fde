"""sCM: continuous-time consistency distillation of a flow teacher through TrigFlow (SANA-Sprint).

- sCM: Cheng Lu, Yang Song. "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models."
  ICLR 2025, arXiv 2410.11081.
- SANA-Sprint: Junsong Chen et al. "SANA-Sprint: One-Step Diffusion with Continuous-Time Consistency
  Distillation." arXiv 2503.09641: a flow-matching teacher is used as a TrigFlow teacher through a change
  of variables, with no retraining (SANA-Sprint Sec. 3.1), and sCM + LADD in one generator loss (Sec. 3).
- CM: Yang Song, Prafulla Dhariwal, Mark Chen, Ilya Sutskever. "Consistency Models." ICML 2023,
  arXiv 2303.01469 (the multistep consistency sampler).

Roles: ``generator`` (the student, initialised from the teacher) and ``teacher`` (frozen). The loss is
sCM's continuous-time consistency distillation loss (sCM Algorithm 1, Eq. 8 for the tangent), with the
tangent warm-up and tangent normalisation of sCM Sec. 4.2; F^- and its time derivative come from one
forward-mode pass (``torch.func.jvp``) through the student. It trains on data: ``x0`` are real latents
(``data.images``) noised to the sampled TrigFlow time.

sCM + LADD (SANA-Sprint Sec. 3): ``method.adversarial.weight > 0`` adds the LADD term of
``methods/adversarial_term.py`` on the student's x0 estimate at the training point.
Not implemented: sCM's adaptive weighting w_phi(t) (sCM Sec. 4.3): the sCM loss here is unweighted.

Equation and section numbers refer to the arXiv versions named above; they were written from the
papers as read before this work and could not be re-checked offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.losses.consistency import scm_loss, scm_tangent, trigflow_time, trigflow_to_flow
from stepdistill.methods.adversarial_term import (
    DISCRIMINATOR,
    AdversarialConfig,
    AdversarialHost,
    adversarial_roles,
)
from stepdistill.methods.base import DistillMethod, MethodContext
from stepdistill.methods.consistency import check_consistency_run
from stepdistill.methods.fewstep import renoising_sample
from stepdistill.methods.registry import register
from stepdistill.models.denoiser import math_attention


@dataclass
class SCMConfig:
    name: str = "scm"
    num_steps: int = 2  # sCM's headline sampler: 2 steps (sCM Sec. 5)
    # TrigFlow data scale sigma_d (sCM Sec. 2: 0.5).
    sigma_data: float = 0.5
    # Log-normal proposal of tau, t = arctan(e^tau / sigma_d) (sCM Sec. 4.3).
    p_mean: float = -1.0
    p_std: float = 1.4
    # Teacher CFG scale (sCD distils the guided teacher; SANA-Sprint Sec. 3).
    guidance_scale: float = 3.0
    # Tangent warm-up: r rises linearly 0 -> 1 over this many generator updates (sCM Sec. 4.2: 10k).
    tangent_warmup_steps: int = 10000
    # Tangent normalisation g / (||g|| + c) (sCM Sec. 4.2: c = 0.1).
    tangent_norm_c: float = 0.1
    # Largest TrigFlow time (pi/2 is pure noise; the proposal is clamped below it).
    max_t: float = 1.5706
    # LADD term on the student's x0 estimate (SANA-Sprint's sCM + LADD); weight 0 = off.
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"method.num_steps={self.num_steps} must be >= 1")
        if self.sigma_data <= 0 or self.p_std <= 0:
            raise ValueError("method.sigma_data and method.p_std must be > 0")
        if self.guidance_scale < 1.0:
            raise ValueError(f"method.guidance_scale={self.guidance_scale} must be >= 1 (1 = no CFG)")
        if self.tangent_warmup_steps < 0 or self.tangent_norm_c <= 0:
            raise ValueError("method.tangent_warmup_steps must be >= 0 and method.tangent_norm_c > 0")
        if not 0.0 < self.max_t <= 1.5707963:
            raise ValueError(f"method.max_t={self.max_t} must be in (0, pi/2]")



@register
class SCM(AdversarialHost, DistillMethod):
    name = "scm"
    Config = SCMConfig
    paper = "Lu & Song, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models, ICLR 2025 " \
            "(arXiv 2410.11081); SANA-Sprint (arXiv 2503.09641)"

    def __init__(self, cfg: SCMConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        if self.schedule.kind != "flow":
            raise ValueError(f"method.name=scm needs a flow-matching teacher (SD3, FLUX, toy-flow); "
                             f"{self.teacher.family} is a DDPM teacher: use method.name=lcm or pcm")
        if not ctx.has_real_data:
            raise ValueError("method.name=scm needs data.images (real or teacher-sample latents)")
        self.timesteps = self._default_timesteps(cfg.num_steps)
        self._init_adversarial(cfg.adversarial, ctx)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_consistency_run(cfg)

    @classmethod
    def default_roles(cls, cfg) -> dict[str, RoleConfig]:
        return {"generator": RoleConfig(init_from="teacher", trainable=True),
                "teacher": RoleConfig(init_from="teacher", trainable=False),
                **adversarial_roles(cfg.adversarial)}

    def phases(self, step: int) -> list[str]:
        return self._with_discriminator(["generator"])

    @property
    def num_inference_steps(self) -> int:
        return self.cfg.num_steps

    def _default_timesteps(self, num_steps: int) -> list[float]:
        from stepdistill.sampling.schedulers import pipeline_timesteps

        return pipeline_timesteps(self.teacher, num_steps, self.ctx.resolution)

    # ---- TrigFlow view of a flow backbone (SANA-Sprint Sec. 3.1) ----------------------------------
    def _trig_velocity(self, denoiser, x_t, t, cond, uncond=None, guidance_scale=1.0) -> torch.Tensor:
        """``sigma_d * F(x_t / sigma_d, t)``, the TrigFlow PF-ODE velocity dx_t/dt of a flow backbone.

        x_t (TrigFlow) is x_s * a in flow coordinates with s = sigma_d sin t / a, a = cos t + sigma_d sin t;
        with the backbone's (x0, eps) at (x_s, s): dx_t/dt = -sin(t) x0 + sigma_d cos(t) eps (sCM Eq. 1-2).
        Differentiable in (x_t, t), so that torch.func.jvp can push tangents through it.
        """
        sd = self.cfg.sigma_data
        a, s = trigflow_to_flow(t, sd)
        view = (-1, *[1] * (x_t.dim() - 1))
        x_s = x_t / a.view(view)
        u = denoiser(x_s, s * self.schedule.num_train_timesteps, cond, uncond=uncond,
                     guidance_scale=guidance_scale, output="flow")
        x0 = x_s - s.view(view) * u
        eps = x_s + (1 - s).view(view) * u
        return -torch.sin(t).view(view) * x0 + sd * torch.cos(t).view(view) * eps

    def losses(self, phase: str, batch: dict, step: int) -> dict[str, torch.Tensor]:
        if phase == DISCRIMINATOR and self.adv is not None:
            return self._discriminator_losses(batch, step)
        if phase != "generator":
            raise ValueError(f"{self.name} has no phase {phase!r}")
        cfg, sd = self.cfg, self.cfg.sigma_data
        real = batch["real"]
        x0 = real["latents"].to(self.ctx.device, torch.float32)
        cond = real["cond"]
        n = len(x0)
        uncond = batch["uncond"].expand_to(n) if len(batch["uncond"]) in (1, n) else batch["uncond"][:n]
        # t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2) (sCM Sec. 4.3); x_t = cos t x0 + sin t z (Eq. 1).
        tau = torch.randn(n, device=x0.device) * cfg.p_std + cfg.p_mean
        t = trigflow_time(tau, sd).clamp(1e-4, cfg.max_t)
        view = (-1, 1, 1, 1)
        x_t = torch.cos(t).view(view) * x0 + torch.sin(t).view(view) * torch.randn_like(x0) * sd
        student = self.roles["generator"]
        with torch.no_grad():
            # Teacher PF-ODE dx_t/dt = sigma_d F_pretrain(x_t / sigma_d, t) (continuous-time CD, sCM Sec. 4).
            dxt_dt = self._trig_velocity(self.roles["teacher"].denoiser, x_t, t, cond, uncond, cfg.guidance_scale)
            # F^- and cos(t) sin(t) dF^-/dt in one forward-mode pass (sCM Algorithm 1), through the bare module.
            cs = torch.cos(t) * torch.sin(t)
            bare = _bare_denoiser(student)

            def f_theta(x_scaled, tt):
                return self._trig_velocity(bare, x_scaled * sd, tt, cond) / sd

            with math_attention():  # CPU flash attention has no JVP rule
                f_minus, df_dt = torch.func.jvp(f_theta, (x_t / sd, t), (cs.view(view) * dxt_dt / sd, cs))
            # Tangent warm-up r: 0 -> 1 linearly over the first updates (sCM Sec. 4.2); a function of the step
            # (one generator update per step), so a resumed run continues it exactly.
            r = 1.0 if cfg.tangent_warmup_steps == 0 else min(1.0, step / cfg.tangent_warmup_steps)
            g = scm_tangent(f_minus, df_dt, dxt_dt, x_t, t, sd, r, cfg.tangent_norm_c)  # sCM Eq. 8, Alg. 1
        f = self._trig_velocity(student.denoiser, x_t, t, cond) / sd
        loss = scm_loss(f, f_minus, g)  # sCM Algorithm 1 (no adaptive weighting)
        out = {"scm": loss.detach(), "stats/tangent_warmup": torch.tensor(r),
               "stats/g_norm": g.flatten(1).norm(dim=1).mean(), "stats/t_mean": t.mean()}
        if self.adv is not None:
            # sCM + LADD (SANA-Sprint Sec. 3): the student's x0 estimate at this training point, TrigFlow's
            # x0 = cos(t) x_t - sin(t) sigma_d F_theta (sCM Sec. 2), scored on the teacher's features.
            x0_hat = torch.cos(t).view(view) * x_t - torch.sin(t).view(view) * sd * f
            loss = loss + self._adversarial_generator_term(out, x0_hat, cond, step)
        out["loss"] = loss
        return out

    # ---- sampling and export ------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise, cond, uncond=None, num_steps=None, generator=None):
        """sCM's multistep sampler (sCM Sec. 2, consistency sampling): f = x0 of the student at each
        timestep, re-noised with fresh noise to the next (the exported stochastic flow scheduler)."""
        timesteps = self.timesteps if num_steps in (None, len(self.timesteps)) else self._default_timesteps(num_steps)
        return renoising_sample(self.roles[self.student_role].denoiser, self.schedule, timesteps, noise, cond,
                                generator)

    def export_scheduler(self, num_steps=None):
        from stepdistill.sampling.schedulers import renoising_scheduler

        return renoising_scheduler(self.teacher, num_steps or self.cfg.num_steps)


def _bare_denoiser(role):
    """The role's denoiser on its unwrapped module (no DDP hooks: the JVP pass is gradient-free)."""
    active = role.active
    role.active = False
    try:
        return role.denoiser
    finally:
        role.active = active
