"""Guidance distillation: one backbone pass that reproduces classifier-free guidance (CFG).

- Chenlin Meng, Robin Rombach, Ruiqi Gao, Diederik P. Kingma, Stefano Ermon, Jonathan Ho, Tim Salimans.
  "On Distillation of Guided Diffusion Models." CVPR 2023, arXiv 2210.03142. Stage one: a student that
  takes the guidance weight w as an input (a Fourier embedding) matches the CFG-combined teacher
  x^w = (1 + w) x_c - w x_u over a range of w (Sec. 3.1, Eq. 6).
- Cristian Perez Jensen, Seyedmorteza Sadat. "Efficient Distillation of Classifier-Free Guidance using
  Adapters." 2025, arXiv 2503.07274 (AGD): the base stays frozen, small adapters learn guidance, and
  training points come from CFG-*guided* sampling trajectories rather than from noised data, so the
  student is trained where the guided sampler actually goes (Sec. 3).

Here the student is ``generator``:
* full weights with a w-input (``roles.generator.guidance_embedding_dim``, diffusers'
  ``time_cond_proj_dim``): one model for every scale in ``[guidance_min, guidance_max]``; the exported
  StableDiffusion(XL)Pipeline feeds ``guidance_scale`` through that input and skips the doubled batch;
* or, with ``guidance_min == guidance_max``, any student — e.g. a LoRA on the frozen teacher
  (``roles.generator.lora_rank``), AGD-style adapters — distilled at one scale and exported as LoRA
  weights that ``pipe.load_lora_weights`` puts on the base pipeline (sample with ``guidance_scale=0``).
Our diffusers-style scale is Meng et al.'s w + 1 (1 = no guidance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.losses import denoising_loss
from stepdistill.methods.base import DistillMethod, MethodContext
from stepdistill.methods.registry import register


@dataclass
class GuidanceConfig:
    name: str = "guidance"
    # Range of CFG scales the student learns (diffusers convention; w ~ U[min, max] per sample). Meng et
    # al. train w in [0, 4] on pixel models (scales 1..5); SD recipes use up to ~14. Equal values: one scale.
    guidance_min: float = 2.0
    guidance_max: float = 8.0
    # Training points: states of CFG-guided DDIM trajectories of the teacher (AGD Sec. 3) with about
    # this many steps over the whole range (0: noised real latents from data.images, as Meng et al.).
    trajectory_steps: int = 8
    # Width of the student's w-input when the default roles are used (diffusers' LCM/SD UNets use 256).
    guidance_embedding_dim: int = 256
    # The exported pipeline's sampler: the teacher's own multi-step scheduler at this many steps and scale.
    sample_steps: int = 25
    sample_guidance: float = 5.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"method.guidance_min={self.guidance_min}, guidance_max={self.guidance_max}: "
                             "need 1 <= guidance_min <= guidance_max (1 = no guidance)")
        if self.trajectory_steps < 0:
            raise ValueError(f"method.trajectory_steps={self.trajectory_steps} must be >= 0 (0: real data)")
        if self.sample_steps < 1:
            raise ValueError(f"method.sample_steps={self.sample_steps} must be >= 1")
        if self.guidance_embedding_dim < 0:
            raise ValueError(f"method.guidance_embedding_dim={self.guidance_embedding_dim} must be >= 0")

    @property
    def single_scale(self) -> bool:
        return self.guidance_min == self.guidance_max


@register
class GuidanceDistillation(DistillMethod):
    name = "guidance"
    Config = GuidanceConfig
    paper = ("Meng et al., On Distillation of Guided Diffusion Models, CVPR 2023 (arXiv 2210.03142); "
             "Jensen & Sadat, Efficient Distillation of Classifier-Free Guidance using Adapters (arXiv 2503.07274)")

    def __init__(self, cfg: GuidanceConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.native = self.teacher.prediction_type
        self.latent_shape = tuple(self.teacher.latent_shape(ctx.resolution))
        student = self.roles["generator"].denoiser
        if self.teacher.family == "flux":
            raise ValueError("FLUX.1-dev is already guidance-distilled (its guidance embedding); distil "
                             "another family, or use a step-distillation method")
        if not cfg.single_scale and not student.guidance_embedded:
            raise ValueError(
                f"method.guidance_min={cfg.guidance_min} < guidance_max={cfg.guidance_max} needs a student that "
                "takes the scale as input: roles.generator.guidance_embedding_dim > 0 with full weights (UNet "
                "teachers). A LoRA or a transformer student distils one scale: set guidance_min = guidance_max")
        if cfg.trajectory_steps == 0 and not ctx.has_real_data:
            raise ValueError("method.trajectory_steps=0 trains on noised real latents: set data.images, or "
                             "use trajectory_steps > 0 (teacher CFG trajectories, no data needed)")
        self._sample_timesteps = self.teacher.schedule.timesteps_for_steps(cfg.sample_steps)

    # ---- structure ----------------------------------------------------------------------------
    @classmethod
    def default_roles(cls, cfg: GuidanceConfig) -> dict[str, RoleConfig]:
        dim = 0 if cfg.single_scale else cfg.guidance_embedding_dim
        return {
            "generator": RoleConfig(init_from="teacher", trainable=True, guidance_embedding_dim=dim),
            "teacher": RoleConfig(init_from="teacher", trainable=False),
        }

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.method.trajectory_steps == 0 and not cfg.data.images:
            raise ValueError("method.trajectory_steps=0 trains on noised real latents: set data.images, or "
                             "use trajectory_steps > 0 (teacher CFG trajectories, no data needed)")

    def phases(self, step: int) -> list[str]:
        return ["generator"]

    @property
    def num_inference_steps(self) -> int:
        return self.cfg.sample_steps

    def export_guidance_scale(self) -> float:
        """What the exported pipeline is called with: the scale itself for a w-input student (the
        pipeline feeds it to the UNet and runs one pass); 0 (no CFG) for a one-scale student."""
        return 0.0 if not self.roles["generator"].denoiser.guidance_embedded else self.cfg.sample_guidance

    # ---- training points ----------------------------------------------------------------------
    def _scales(self, n: int) -> torch.Tensor:
        lo, hi = self.cfg.guidance_min, self.cfg.guidance_max
        return lo + (hi - lo) * torch.rand(n, device=self.ctx.device)

    def _ddim_update(self, native: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: float) -> torch.Tensor:
        """Deterministic DDIM (flow: Euler) from ``x`` at ``t`` to ``t_next`` given a native prediction."""
        x0 = self.schedule.convert(native, x, t, self.native, "x0")
        eps = self.schedule.convert(native, x, t, self.native, "epsilon")
        return self.schedule.add_noise(x0, eps, torch.full_like(t, float(t_next)))

    @torch.no_grad()
    def _ddim_step(self, x: torch.Tensor, t: float, t_next: float, cond, uncond, w) -> torch.Tensor:
        """One DDIM step of the CFG teacher from t to t_next."""
        tt = torch.full((len(x),), float(t), device=x.device)
        native = self.roles["teacher"].denoiser(x, tt, cond, uncond=uncond, guidance_scale=w, output=self.native)
        return self._ddim_update(native, x, tt, t_next)

    def training_point(self, batch: dict, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, t)``: a state of the CFG-guided teacher trajectory at a uniformly drawn ``t`` (AGD), or
        noised real latents (Meng et al.) when ``trajectory_steps == 0``."""
        cond, uncond = batch["cond"], batch["uncond"]
        n = len(cond)
        t = self.schedule.sample_timesteps(1, device=self.ctx.device)  # one t for the batch
        if self.cfg.trajectory_steps == 0:
            x0 = batch["real"]["latents"][:n].float()
            return self.schedule.add_noise(x0, torch.randn_like(x0), t.expand(n)), t.expand(n)
        top = float(self.schedule.timesteps_for_steps(1)[0])
        x = torch.randn((n, *self.latent_shape), device=self.ctx.device)
        # Evenly spaced DDIM steps from the top down to t: about trajectory_steps over the whole range.
        steps = math.ceil(self.cfg.trajectory_steps * (top - float(t)) / top) if float(t) < top else 0
        grid = torch.linspace(top, float(t), steps + 1).tolist()
        for a, b in zip(grid, grid[1:]):
            x = self._ddim_step(x, a, b, cond, uncond, w)
        return x, t.expand(n)

    # ---- losses -------------------------------------------------------------------------------
    def losses(self, phase: str, batch: dict, step: int) -> dict[str, torch.Tensor]:
        if phase != "generator":
            raise ValueError(f"{self.name} has no phase {phase!r}")
        cond, uncond = batch["cond"], batch["uncond"]
        n = len(cond)
        w = self._scales(n)
        x_t, t = self.training_point(batch, w)
        with torch.no_grad():
            # The CFG-combined teacher, u + w (c - u) in its own parameterization (Meng et al. Eq. 6 with
            # their w = ours - 1; the same affine combination in x, eps or v space).
            target = self.roles["teacher"].denoiser(x_t, t, cond, uncond=uncond, guidance_scale=w,
                                                    output=self.native)
        student = self.roles["generator"].denoiser
        # One pass: the w-input student is told w; a one-scale student has it in its weights.
        pred = student(x_t, t, cond, guidance_scale=w if student.guidance_embedded else 1.0, output=self.native)
        # Meng et al. Eq. 6: E_w,t ||x_student(z_t, w) - x^w(z_t)||^2 with their SNR weighting; the squared
        # error in the teacher's native parameterization (eps: SNR-weighted x0 error) is such a weighting.
        loss = denoising_loss(pred, target)
        return {"loss": loss, "guidance_mse": loss.detach(), "stats/w_mean": w.mean(),
                "stats/t": t.float().mean(), "stats/target_std": target.std()}

    # ---- sampling and export ------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise, cond, uncond=None, num_steps=None, generator=None):
        """DDIM with the student, one pass per step, at ``sample_guidance``."""
        student = self.roles[self.student_role].denoiser
        timesteps = self.schedule.timesteps_for_steps(num_steps) if num_steps else self._sample_timesteps
        w = self.cfg.sample_guidance if student.guidance_embedded else 1.0
        x, n = noise.float(), len(noise)
        for i, t in enumerate(timesteps):
            tt = torch.full((n,), float(t), device=x.device)
            native = student(x, tt, cond, guidance_scale=w, output=self.native)
            if i + 1 == len(timesteps):
                return self.schedule.convert(native, x, tt, self.native, "x0")
            x = self._ddim_update(native, x, tt, timesteps[i + 1])
        return x

    def export_scheduler(self, num_steps=None):
        """The teacher's own multi-step scheduler: the student is a (faster) multi-step model."""
        scheduler = self.teacher.pipeline.scheduler
        return type(scheduler).from_config(scheduler.config)
