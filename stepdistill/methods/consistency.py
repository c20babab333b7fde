"""Consistency distillation: LCM (and LCM-LoRA), PCM (phased, TSCD-style), and their shared base.

- LCM: Simian Luo, Yiqin Tan, Longbo Huang, Jian Li, Hang Zhao. "Latent Consistency Models: Synthesizing
  High-Resolution Images with Few-Step Inference." arXiv 2310.04378 (2023).
- LCM-LoRA: Simian Luo et al. "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module." arXiv 2311.05556.
- CM: Yang Song, Prafulla Dhariwal, Mark Chen, Ilya Sutskever. "Consistency Models." ICML 2023, arXiv 2303.01469.
- PCM: Fu-Yun Wang, Zhaoyang Huang, Alexander Bergman, Dazhong Shen, Peng Gao, Michael Lingelbach, Keqiang
  Sun, Weikang Bian, Guanglu Song, Yu Liu, Xiaoshuai Chen, Hongsheng Li. "Phased Consistency Models."
  NeurIPS 2024, arXiv 2405.18407. (Hyper-SD's TSCD, arXiv 2404.13686, is the same phased objective with
  the number of phases decreased 8 -> 4 -> 2 -> 1 over successive runs: run this method once per stage.)

The continuous-time sCM lives in ``methods/scm.py``; a new discrete-time consistency method (TCM, ...)
builds on ``ConsistencyDistillation`` below.

Roles: ``generator`` (the student, initialised from the teacher), ``teacher`` (frozen), and for an EMA
target (``method.target_ema_decay > 0``) a frozen ``target`` role that the harness keeps as an EMA of
the generator after every generator update (``DistillMethod.ema_targets``). With decay 0 the target
network is the online student under stop-gradient (LCM-LoRA, as diffusers' LCM-LoRA scripts do).

Both train on data: ``x0`` are real latents (``data.images``: an image folder with captions, teacher
samples from ``stepdistill cache-pairs``, or ``builtin:toy``) noised to the sampled timestep.

LCM + LADD and PCM + LADD: ``method.adversarial.weight > 0`` adds the LADD term of
``methods/adversarial_term.py`` (trainable heads on the frozen teacher's features) on the student's x0
estimate at the training point, with its own ``discriminator`` phase and optimizer.
Not implemented: PCM's own adversarial consistency loss (on phase-mapped states rather than x0).

Equation and section numbers refer to the arXiv versions named above; they were written from the
papers as read before this work and could not be re-checked offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.families import UNET_FAMILIES
from stepdistill.losses.consistency import consistency_distance, ddim_step, lcm_boundary_scalings
from stepdistill.methods.adversarial_term import (
    DISCRIMINATOR,
    AdversarialConfig,
    AdversarialHost,
    adversarial_roles,
)
from stepdistill.methods.base import DistillMethod, MethodContext
from stepdistill.methods.registry import register
from stepdistill.models.denoiser import Conditioning
from stepdistill.models.guidance import guidance_embedding_dim, guidance_scale_embedding


# ---- configs --------------------------------------------------------------------------------------
@dataclass
class LCMConfig:
    name: str = "lcm"
    # Student sampling steps (LCMScheduler, num_inference_steps) used for samples, export and eval.
    num_steps: int = 4
    # Skipping-step teacher solver: a DDIM grid of N timesteps over the T training steps, skip k = T / N
    # (LCM Sec. 4.3: k = 20 for N = 50 of T = 1000; LCMScheduler's original_inference_steps).
    num_ddim_timesteps: int = 50
    # CFG-augmented teacher (LCM Eq. 9 / Sec. 4.2): omega ~ U[w_min, w_max], teacher CFG scale omega + 1.
    w_min: float = 3.0
    w_max: float = 15.0
    # Give omega to the student as an embedding (a new zero-initialised time_cond_proj layer of the UNet,
    # read by StableDiffusion pipelines as guidance_scale - 1). LCM-LoRA drops it (LCM-LoRA Sec. 3).
    w_embedding: bool = True
    time_cond_proj_dim: int = 256
    # Distance d: "pseudo_huber" (iCT; diffusers' LCM scripts use a Huber loss) or "l2" (LCM Eq. 9).
    loss: str = "pseudo_huber"
    huber_c: float | None = None  # None: iCT's 0.00054 * sqrt(d)
    # EMA rate of the target network theta^- (LCM Eq. 9; 0.95 in LCM). 0 = the online student (LCM-LoRA).
    target_ema_decay: float = 0.95
    # Boundary-condition scalings (LCM / LCMScheduler: sigma_data 0.5, timestep_scaling 10).
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    # Guidance scale written into the export of a w-conditioned student (the pipeline's guidance_scale;
    # the student sees omega = guidance_scale - 1, no CFG batch). Ignored without w_embedding.
    export_guidance_scale: float = 8.0

    # LADD term on the student's x0 prediction at the training point (methods/adversarial_term.py); weight 0 = off.
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def __post_init__(self) -> None:
        check_consistency_config(self)
        if not 0.0 <= self.w_min <= self.w_max:
            raise ValueError(f"method.w_min={self.w_min}, w_max={self.w_max}: need 0 <= w_min <= w_max")
        if self.time_cond_proj_dim < 2:
            raise ValueError(f"method.time_cond_proj_dim={self.time_cond_proj_dim} must be >= 2")
        if self.sigma_data <= 0 or self.timestep_scaling <= 0:
            raise ValueError("method.sigma_data and method.timestep_scaling must be > 0")


@dataclass
class PCMConfig:
    name: str = "pcm"
    # Phases of the trajectory (PCM Sec. 3: M sub-trajectories, one consistency function each); the
    # student samples in num_phases steps, one per phase (deterministic DDIM/Euler over the phase edges).
    num_phases: int = 4
    num_ddim_timesteps: int = 50  # skipping-step solver grid, as LCM (PCM builds on LCM's solver)
    # Teacher CFG scale of the solver: one fixed scale (no w-embedding in PCM's students).
    guidance_scale: float = 3.0
    loss: str = "pseudo_huber"
    huber_c: float | None = None
    target_ema_decay: float = 0.0  # the online student as target (as LCM-LoRA); > 0: an EMA target role

    # LADD term on the student's x0 prediction at the training point (methods/adversarial_term.py); weight 0 = off.
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def __post_init__(self) -> None:
        check_consistency_config(self)
        if self.num_phases < 1:
            raise ValueError(f"method.num_phases={self.num_phases} must be >= 1")
        if self.guidance_scale < 1.0:
            raise ValueError(f"method.guidance_scale={self.guidance_scale} must be >= 1 (1 = no CFG)")


def check_consistency_config(cfg) -> None:
    """The checks of the fields every ``ConsistencyDistillation`` config has (call it in ``__post_init__``)."""
    if getattr(cfg, "num_steps", 1) < 1:
        raise ValueError(f"method.num_steps={cfg.num_steps} must be >= 1")
    if cfg.num_ddim_timesteps < 1:
        raise ValueError(f"method.num_ddim_timesteps={cfg.num_ddim_timesteps} must be >= 1")
    if cfg.loss not in ("pseudo_huber", "l2"):
        raise ValueError(f"method.loss={cfg.loss!r}; choose one of: pseudo_huber, l2")
    if not 0.0 <= cfg.target_ema_decay < 1.0:
        raise ValueError(f"method.target_ema_decay={cfg.target_ema_decay} must be in [0, 1)")


def check_consistency_run(cfg) -> None:
    """Whole-run checks of a consistency method (LCM, PCM, sCM), before any model loads: the training data,
    and a LoRA student's target network and w-embedding (config fields a method may lack)."""
    m = cfg.method
    if not cfg.data.images:
        raise ValueError(
            f"method.name={m.name} trains on data (x0 noised to t): set data.images to a folder of images with a "
            "metadata.jsonl of captions, to teacher samples from `stepdistill cache-pairs`, or to builtin:toy")
    gen = (cfg.get("roles") or {}).get("generator") or {}
    lora = int(gen.get("lora_rank", 0) or 0) > 0
    if lora and getattr(m, "target_ema_decay", 0.0) > 0:
        raise ValueError(
            f"roles.generator.lora_rank={gen.get('lora_rank')} with method.target_ema_decay={m.target_ema_decay}: "
            "a LoRA student uses the online student as its target (LCM-LoRA); set method.target_ema_decay=0")
    if lora and getattr(m, "w_embedding", False):
        raise ValueError(
            "roles.generator.lora_rank > 0 with method.w_embedding=true: the w-embedding layer is not part of a "
            "LoRA (LCM-LoRA drops it); set method.w_embedding=false")


# ---- shared machinery -----------------------------------------------------------------------------
class ConsistencyDistillation(AdversarialHost, DistillMethod):
    """The base of discrete-time consistency distillation (LCM, PCM; build a new one such as TCM on it).

    It provides: training data (``_data``: real latents, their conditioning and the unconditional batch),
    the roles (``generator``, frozen ``teacher``, an EMA ``target`` when ``target_ema_decay > 0``, the LADD
    ``discriminator`` when ``adversarial.weight > 0``), the phases (``generator``, then ``discriminator``),
    the skipping-step solver grid (``_solver_grid``, LCM Sec. 4.3: call it in ``__init__`` and keep the
    steps the method trains on), one CFG teacher DDIM step
    (``_teacher_step``, LCM Eq. 8-9), the target network (``_target_denoiser``: the EMA target or the online
    student) and the distance d (``_distance``).

    A subclass provides:

    - ``name``, ``paper`` and ``Config``: a dataclass with at least ``name``, ``num_ddim_timesteps``, ``loss``
      ("pseudo_huber" or "l2"), ``huber_c``, ``target_ema_decay`` and ``adversarial`` (``AdversarialConfig``);
      its ``__post_init__`` may call ``check_consistency_config``;
    - ``_generator_losses(batch, step)``: the consistency loss (the paper's equation cited where it is
      computed), returning ``{"loss": ..., ...}``; with the LADD term on (``self.adv``), add
      ``self._adversarial_generator_term(out, x0_estimate, cond, step)`` to the loss;
    - ``sample(noise, cond, uncond, num_steps, generator)``, ``export_scheduler(num_steps)`` and
      ``num_inference_steps``: the student's sampler and the diffusers scheduler that reproduces it;
    - optionally ``export_guidance_scale()`` / ``export_timesteps()`` (``DistillMethod``'s export hooks),
      and ``default_roles`` (call ``super()``) for extra roles.
    """

    def __init__(self, cfg, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        if not ctx.has_real_data:
            raise ValueError(f"method.name={cfg.name} needs data.images (real or teacher-sample latents)")
        self.latent_shape = tuple(self.teacher.latent_shape(ctx.resolution))
        self._init_adversarial(cfg.adversarial, ctx)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_consistency_run(cfg)

    @classmethod
    def default_roles(cls, cfg) -> dict[str, RoleConfig]:
        roles = {
            "generator": RoleConfig(init_from="teacher", trainable=True),
            "teacher": RoleConfig(init_from="teacher", trainable=False),
            **adversarial_roles(cfg.adversarial),
        }
        if getattr(cfg, "target_ema_decay", 0.0) > 0:
            roles["target"] = RoleConfig(init_from="teacher", trainable=False)
        return roles

    def ema_targets(self) -> dict[str, tuple[str, float]]:
        decay = getattr(self.cfg, "target_ema_decay", 0.0)
        return {"target": ("generator", decay)} if decay > 0 else {}

    def phases(self, step: int) -> list[str]:
        return self._with_discriminator(["generator"])

    def losses(self, phase: str, batch: dict, step: int) -> dict[str, torch.Tensor]:
        if phase == DISCRIMINATOR and self.adv is not None:
            return self._discriminator_losses(batch, step)
        if phase != "generator":
            raise ValueError(f"{self.name} has no phase {phase!r}")
        return self._generator_losses(batch, step)

    # ---- helpers ------------------------------------------------------------------------------
    def _t(self, t: float, n: int) -> torch.Tensor:
        return torch.full((n,), float(t), device=self.ctx.device)

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The schedule's (alpha, sigma), with t < 0 meaning the clean end (alpha 1, sigma 0)."""
        alpha, sigma = self.schedule.alpha_sigma(t.clamp_min(0))
        clean = t < 0
        return torch.where(clean, torch.ones_like(alpha), alpha), torch.where(clean, torch.zeros_like(sigma), sigma)

    def _data(self, batch: dict) -> tuple[torch.Tensor, Conditioning, Conditioning]:
        real = batch["real"]
        x0 = real["latents"].to(self.ctx.device, torch.float32)
        n = len(x0)
        return x0, real["cond"], batch["uncond"].expand_to(n) if len(batch["uncond"]) in (1, n) else batch["uncond"][:n]

    def _solver_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, prev) timesteps of the skipping-step solver: t_{n+k} and t_n (LCM Sec. 4.3).

        VP: ``t_{n+k} = (i + 1) k - 1`` for i < N, ``t_n = max(t_{n+k} - k, 0)`` (LCMScheduler's
        original timesteps); flow: ``sigma = shift(i / N)``, the teacher's Euler grid.
        """
        n, T = self.cfg.num_ddim_timesteps, self.schedule.num_train_timesteps
        if self.schedule.kind == "flow":
            u = torch.arange(1, n + 1, dtype=torch.float32) / n
            start = self.schedule.shift_sigma(u) * T
            prev = self.schedule.shift_sigma(u - 1.0 / n) * T
        else:
            k = T // n
            start = torch.arange(1, n + 1, dtype=torch.float32) * k - 1
            prev = (start - k).clamp_min(0)
        return start.to(self.ctx.device), prev.to(self.ctx.device)

    @torch.no_grad()
    def _teacher_step(self, x_t, t, t_to, cond, uncond, guidance: torch.Tensor):
        """One skipping step of the CFG teacher's DDIM solver from ``t`` to ``t_to`` (LCM Eq. 8-9).

        ``guidance`` is the per-sample CFG scale; CFG is applied to epsilon (affine in the native
        prediction at a fixed x_t, so the same as CFG in any parameterisation).
        """
        n = len(x_t)
        eps = self.roles["teacher"].denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                             Conditioning.cat([uncond, cond]), output="epsilon")
        eps_u, eps_c = eps.chunk(2)
        g = guidance.view(n, *[1] * (x_t.dim() - 1))
        eps = eps_u + g * (eps_c - eps_u)
        x0 = self.schedule.convert(eps, x_t, t, "epsilon", "x0")
        alpha, sigma = self._alpha_sigma(t_to)
        return ddim_step(x0, eps, alpha, sigma)

    def _target_denoiser(self):
        return self.roles["target"].denoiser if "target" in self.roles else self.roles["generator"].denoiser

    def _distance(self, pred, target):
        return consistency_distance(pred, target, self.cfg.loss, self.cfg.huber_c)


# ---- LCM ------------------------------------------------------------------------------------------
@register
class LCM(ConsistencyDistillation):
    name = "lcm"
    Config = LCMConfig
    paper = "Luo et al., Latent Consistency Models, arXiv 2310.04378 (LCM-LoRA: arXiv 2311.05556)"

    def __init__(self, cfg: LCMConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        if self.schedule.kind != "vp":
            raise ValueError(f"method.name=lcm needs a DDPM/VP teacher (LCMScheduler); {self.teacher.family} is a "
                             "flow teacher: use method.name=pcm or scm")
        if cfg.w_embedding:
            if self.teacher.family not in UNET_FAMILIES:
                raise ValueError(f"method.w_embedding=true needs a UNet (time_cond_proj_dim); {self.teacher.family} "
                                 "has none: set method.w_embedding=false")
            # The harness gave these roles the w-input (default_roles: RoleConfig.guidance_embedding_dim).
            for name in ("generator", "target"):
                if name in self.roles and guidance_embedding_dim(self.roles[name].module) != cfg.time_cond_proj_dim:
                    raise ValueError(f"method.w_embedding=true with time_cond_proj_dim={cfg.time_cond_proj_dim} needs "
                                     f"roles.{name}.guidance_embedding_dim={cfg.time_cond_proj_dim}")
        self.start_t, self.prev_t = self._solver_grid()

    @classmethod
    def default_roles(cls, cfg) -> dict[str, RoleConfig]:
        roles = super().default_roles(cfg)
        if cfg.w_embedding:  # the student (and its EMA target) take omega through time_cond_proj
            for name in ("generator", "target"):
                if name in roles:
                    roles[name].guidance_embedding_dim = cfg.time_cond_proj_dim
        return roles

    @property
    def num_inference_steps(self) -> int:
        return self.cfg.num_steps

    def _scalings(self, t):
        return lcm_boundary_scalings(t, self.cfg.sigma_data, self.cfg.timestep_scaling)

    def _w_cond(self, omega: torch.Tensor) -> dict:
        if not self.cfg.w_embedding:
            return {}
        # omega is LCM's w (= guidance scale - 1); the embedding is the pipelines' one of the scale.
        return {"timestep_cond": guidance_scale_embedding(omega + 1, self.cfg.time_cond_proj_dim, device=omega.device)}

    def _consistency_fn(self, denoiser, x_t, t, cond, w_cond) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t) (CM Eq. 7 with LCM's scalings)."""
        c_skip, c_out = self._scalings(t)
        x0 = denoiser(x_t, t, cond, output="x0", **w_cond)
        return c_skip.view(-1, 1, 1, 1) * x_t.float() + c_out.view(-1, 1, 1, 1) * x0

    def _generator_losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        x0, cond, uncond = self._data(batch)
        n, dev = len(x0), x0.device
        idx = torch.randint(len(self.start_t), (n,), device=dev)
        t_start, t_prev = self.start_t[idx], self.prev_t[idx]
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t_start)
        omega = torch.rand(n, device=dev) * (cfg.w_max - cfg.w_min) + cfg.w_min
        w_cond = self._w_cond(omega)
        # Online consistency function at t_{n+k} (LCM Eq. 9, first argument).
        pred = self._consistency_fn(self.roles["generator"].denoiser, x_t, t_start, cond, w_cond)
        with torch.no_grad():
            # CFG-augmented skipping-step solver x_{t_n} = Psi(x_{t_{n+k}}, t_{n+k}, t_n, c; omega) (LCM Eq. 8-9)
            x_prev = self._teacher_step(x_t, t_start, t_prev, cond, uncond, omega + 1.0)
            # Target f_{theta^-}(x_{t_n}, t_n, c, omega) (LCM Eq. 9, second argument; EMA target).
            target = self._consistency_fn(self._target_denoiser(), x_prev, t_prev, cond, w_cond)
        loss = self._distance(pred, target)  # d(., .) of LCM Eq. 9
        out = {"consistency": loss.detach(), "stats/omega": omega.mean(),
               "stats/pred_std": pred.detach().std(), "stats/target_std": target.std()}
        if self.adv is not None:  # LADD term on f_theta(x_t), the student's x0 estimate
            loss = loss + self._adversarial_generator_term(out, pred, cond, step)
        out["loss"] = loss
        return out

    # ---- sampling and export ------------------------------------------------------------------
    def _sampler_timesteps(self, num_steps: int) -> list[float]:
        scheduler = self.export_scheduler(num_steps)
        scheduler.set_timesteps(num_steps)
        return [float(t) for t in scheduler.timesteps]

    @torch.no_grad()
    def sample(self, noise, cond, uncond=None, num_steps=None, generator=None):
        """LCM's multistep consistency sampler (LCM Algorithm 3 / LCMScheduler): f, then re-noise."""
        steps = self._sampler_timesteps(num_steps or self.cfg.num_steps)
        denoiser = self.roles[self.student_role].denoiser
        n = len(noise)
        w_cond = self._w_cond(torch.full((n,), self.cfg.export_guidance_scale - 1.0, device=noise.device))
        x = noise
        for i, t in enumerate(steps):
            x0 = self._consistency_fn(denoiser, x, self._t(t, n), cond, w_cond)
            if i + 1 < len(steps):
                fresh = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                x = self.schedule.add_noise(x0, fresh, self._t(steps[i + 1], n))
        return x0

    def export_scheduler(self, num_steps=None):
        from diffusers import LCMScheduler

        return LCMScheduler.from_config(self.teacher.pipeline.scheduler.config,
                                        original_inference_steps=self.cfg.num_ddim_timesteps,
                                        timestep_scaling=self.cfg.timestep_scaling)

    def export_guidance_scale(self) -> float:
        return float(self.cfg.export_guidance_scale) if self.cfg.w_embedding else 0.0


# ---- PCM ------------------------------------------------------------------------------------------
@register
class PCM(ConsistencyDistillation):
    name = "pcm"
    Config = PCMConfig
    paper = "Wang et al., Phased Consistency Models, NeurIPS 2024 (arXiv 2405.18407)"

    def __init__(self, cfg: PCMConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        if self.teacher.family == "flux":
            raise ValueError("method.name=pcm supports SD1.x/2.x, SDXL and SD3 teachers (FLUX's pipeline sets its "
                             "own sigmas); use method.name=scm for FLUX")
        self.start_t, self.prev_t = self._solver_grid()
        self.edges = self._edges(cfg.num_phases)

    @property
    def num_inference_steps(self) -> int:
        return self.cfg.num_phases

    def _edges(self, num_phases: int) -> torch.Tensor:
        """Phase edges, highest first: the exported scheduler's timesteps at num_phases steps, then the clean
        end (-1). The sampler evaluates the student exactly at the upper edges (PCM Sec. 3.1)."""
        scheduler = self.export_scheduler(num_phases)
        scheduler.set_timesteps(num_phases)
        return torch.tensor([float(t) for t in scheduler.timesteps] + [-1.0], device=self.ctx.device)

    def _phase_map(self, denoiser, x_t, t, s, cond, return_x0: bool = False):
        """PCM's phased consistency function: the DDIM jump from t to the phase's lower edge s (PCM Eq. 6),
        the identity at t = s (its boundary condition). ``return_x0``: also the x0 prediction it jumps with."""
        x0 = denoiser(x_t, t, cond, output="x0")
        eps = self.schedule.convert(x0, x_t, t, "x0", "epsilon")
        alpha, sigma = self._alpha_sigma(s)
        x_s = ddim_step(x0, eps, alpha, sigma)
        return (x_s, x0) if return_x0 else x_s

    def _generator_losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        x0, cond, uncond = self._data(batch)
        n, dev = len(x0), x0.device
        idx = torch.randint(len(self.start_t), (n,), device=dev)
        t_start = self.start_t[idx]
        # Phase k of t: edges[k] >= t > edges[k + 1]; its lower edge s_k ends the sub-trajectory.
        k = (self.edges[None, 1:] >= t_start[:, None]).sum(dim=1)
        lower = self.edges[1:][k]
        # The solver step never crosses the phase edge (PCM Sec. 3.2: consistency within a phase).
        t_prev = torch.maximum(self.prev_t[idx], lower)
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t_start)
        pred, x0_pred = self._phase_map(self.roles["generator"].denoiser, x_t, t_start, lower, cond, return_x0=True)
        with torch.no_grad():
            g = torch.full((n,), self.cfg.guidance_scale, device=dev)
            x_prev = self._teacher_step(x_t, t_start, t_prev, cond, uncond, g)
            target = self._phase_map(self._target_denoiser(), x_prev, t_prev.clamp_min(0), lower, cond)
            # t_prev on the clean edge: the phase map there is the identity.
            at_edge = (t_prev <= lower).view(-1, 1, 1, 1)
            target = torch.where(at_edge, x_prev, target)
        loss = self._distance(pred, target)  # PCM Eq. 8 (phased consistency distillation loss)
        out = {"consistency": loss.detach(), "stats/phase": k.float().mean(), "stats/pred_std": pred.detach().std()}
        if self.adv is not None:
            # LADD term on the student's x0 prediction. PCM's own adversarial loss compares phase-mapped
            # states instead (real: the target's state at the phase edge, fake: the student's, both
            # re-noised to a t within the phase; PCM repo code/text_to_image_sd15/
            # train_pcm_lora_sd15_adv.py L1288-1305, L1379-1381): not reproduced here.
            loss = loss + self._adversarial_generator_term(out, x0_pred, cond, step)
        out["loss"] = loss
        return out

    @torch.no_grad()
    def sample(self, noise, cond, uncond=None, num_steps=None, generator=None):
        """Deterministic phased sampling: jump from each edge to the next (PCM Sec. 3.1, DDIM over edges)."""
        edges = self.edges if num_steps in (None, self.cfg.num_phases) else self._edges(num_steps)
        denoiser = self.roles[self.student_role].denoiser
        x, n = noise, len(noise)
        for i in range(len(edges) - 1):
            x = self._phase_map(denoiser, x, self._t(float(edges[i]), n), self._t(float(edges[i + 1]), n), cond)
        return x

    def export_scheduler(self, num_steps=None):
        """DDIM with trailing spacing (VP; alpha 1 at the end) or deterministic flow Euler (SD3): at
        num_inference_steps = num_phases they step exactly over the phase edges; 1, 2 or 8 also work."""
        from stepdistill.sampling.schedulers import deterministic_scheduler

        return deterministic_scheduler(self.teacher, num_steps or self.cfg.num_phases)
