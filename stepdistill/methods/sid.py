"""SiD: Score identity Distillation — data-free one-step and few-step distillation.

- SiD: Mingyuan Zhou, Huangjie Zheng, Zhendong Wang, Mingzhang Yin, Hai Huang. "Score identity Distillation:
  Exponentially Fast Distillation of Pretrained Diffusion Models for One-Step Generation." ICML 2024,
  arXiv 2404.04057.
- SiD-LSG: Mingyuan Zhou, Zhendong Wang, Huangjie Zheng, Hai Huang. "Guided Score identity Distillation for
  Data-Free One-Step Text-to-Image Generation." arXiv 2406.01561 (long and short guidance: CFG on the
  teacher, on the fake score's training and on its evaluation in the generator loss).
- Few-step SiD: Mingyuan Zhou, Yi Gu, Zhendong Wang. "Few-Step Diffusion via Score identity Distillation."
  arXiv 2505.12674 (a uniform mixture over the generation steps, no step-specific networks; Zero-CFG,
  Anti-CFG; a Diffusion-GAN term when real images exist).

Roles as in DMD (the score-distillation base, ``methods/score.py``): ``generator``, ``critic`` (the fake score f_psi, trained by
denoising the generator's samples), ``teacher`` (f_phi, frozen). The difference is the generator
loss: SiD's score-identity loss with its weight alpha, whose gradient flows *through* both score
networks (their parameters frozen in that phase) into the generator sample.

Guidance (``method.guidance``):
- ``cfg`` (LSG): the teacher with ``real_guidance_scale``, the fake score with ``fake_guidance_scale`` in
  the generator loss and with ``critic_guidance_scale`` in its own denoising loss.
- ``zero_cfg``: no CFG on the teacher, and the fake score sees no text (the empty-prompt embedding) in
  both its training and the generator loss.
- ``anti_cfg``: negative CFG on the fake score in the generator loss (``fake_guidance_scale`` < 1, i.e. a
  negative weight w in ``c + w (c - u)``); the fake score is trained plainly conditional.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.losses import sid_generator_loss
from stepdistill.methods.adversarial_term import AdversarialConfig, adversarial_roles
from stepdistill.methods.fewstep import ScoreDistillConfig
from stepdistill.methods.registry import register
from stepdistill.methods.score import CriticGAN, ScoreDistillation

GUIDANCE = ("cfg", "zero_cfg", "anti_cfg")


@dataclass
class SiDConfig(ScoreDistillConfig):
    """SiD's fields beside the shared ones (``ScoreDistillConfig``). num_steps > 1 is few-step SiD: each
    iteration trains on the output of a step k drawn uniformly (the uniform mixture over steps), reached by
    running the generator's own earlier steps. t range as DMD Sec. 3.2; SiD alternates 1:1 with the fake
    score."""

    name: str = "sid"
    # The weight alpha of the generator loss (SiD Sec. 4; alpha = 1.2 in the paper's experiments).
    alpha: float = 1.2
    guidance: str = "cfg"
    # LSG scales (SiD-LSG: one kappa for all; 1.5 gave its best FID on SD1.5, larger kappa better CLIP).
    real_guidance_scale: float = 1.5
    fake_guidance_scale: float = 1.5
    critic_guidance_scale: float = 1.5
    sid_weight: float = 1.0
    # Few-step: earlier steps run by the generator itself (true), or from noised real latents (false, needs data).
    backward_simulation: bool = True
    # Optional Diffusion-GAN term with real images (few-step SiD, SiDA arXiv 2410.14919): a classifier on the
    # fake score's bottleneck features, as DMD2's. Off by default: SiD is data-free.
    gan_generator_weight: float = 0.0
    gan_critic_weight: float = 0.0
    gan_max_t_frac: float = 1.0
    # LADD term on the generator's sample (methods/adversarial_term.py); weight 0 = off.
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance not in GUIDANCE:
            raise ValueError(f"method.guidance={self.guidance!r}; choose one of: {', '.join(GUIDANCE)}")
        if self.guidance == "zero_cfg" and (self.real_guidance_scale != 1.0 or self.fake_guidance_scale != 1.0
                                           or self.critic_guidance_scale != 1.0):
            raise ValueError(
                "method.guidance=zero_cfg disables CFG: set method.real_guidance_scale=1, fake_guidance_scale=1 "
                "and critic_guidance_scale=1 (or use guidance=cfg)")
        if self.guidance == "anti_cfg":
            if self.fake_guidance_scale >= 1.0:
                raise ValueError(
                    f"method.guidance=anti_cfg needs method.fake_guidance_scale < 1 (negative CFG on the fake "
                    f"score), got {self.fake_guidance_scale}")
            if self.critic_guidance_scale != 1.0:
                raise ValueError("method.guidance=anti_cfg trains the fake score without CFG: set "
                                 "method.critic_guidance_scale=1")
        for key in ("sid_weight", "gan_generator_weight", "gan_critic_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.{key}={getattr(self, key)} must be >= 0")
        if not 0.0 < self.gan_max_t_frac <= 1.0:
            raise ValueError(f"method.gan_max_t_frac={self.gan_max_t_frac} must be in (0, 1]")


@register
class SiD(CriticGAN, ScoreDistillation):
    name = "sid"
    Config = SiDConfig
    paper = ("Zhou et al., Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion "
             "Models for One-Step Generation, ICML 2024 (arXiv 2404.04057)")

    @classmethod
    def default_roles(cls, cfg: SiDConfig) -> dict[str, RoleConfig]:
        return {
            # Generator and fake score: full copies of the teacher, Adam with betas (0, 0.999), no weight decay,
            # one learning rate for both (SiD-LSG repo, run_sid.sh / sid_train.py: lr = glr = 1e-6).
            "generator": RoleConfig(init_from="teacher", trainable=True, lr=1e-6, betas=[0.0, 0.999],
                                    weight_decay=0.0),
            "critic": RoleConfig(init_from="teacher", trainable=True, lr=1e-6, betas=[0.0, 0.999], weight_decay=0.0),
            "teacher": RoleConfig(init_from="teacher", trainable=False),
            **adversarial_roles(cfg.adversarial),
        }

    # ---- the fake score under each guidance mode ------------------------------------------------
    def _fake_x0(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
        """f_psi(x_t) in the generator loss: conditional, guided (LSG), text-free (Zero-CFG) or anti-guided."""
        cfg, critic = self.cfg, self.roles["critic"].denoiser
        if cfg.guidance == "zero_cfg":
            return critic(x_t, t, batch["uncond"], output="x0")
        if cfg.fake_guidance_scale == 1.0:
            return critic(x_t, t, batch["cond"], output="x0")
        return critic(x_t, t, batch["cond"], uncond=batch["uncond"], guidance_scale=cfg.fake_guidance_scale,
                      output="x0")

    def _critic_prediction(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
        # The fake score's denoising loss on generator samples (SiD Sec. 4), with LSG's guidance on the fake
        # score during its own training (SiD-LSG) or without text (Zero-CFG).
        cfg, critic = self.cfg, self.roles["critic"].denoiser
        if cfg.guidance == "zero_cfg":
            return critic(x_t, t, batch["uncond"], output=self.native)
        if cfg.critic_guidance_scale == 1.0:
            return critic(x_t, t, batch["cond"], output=self.native)
        return critic(x_t, t, batch["cond"], uncond=batch["uncond"], guidance_scale=cfg.critic_guidance_scale,
                      output=self.native)

    # ---- losses -------------------------------------------------------------------------------
    def _generator_losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg, cond, uncond = self.cfg, batch["cond"], batch["uncond"]
        x_in, t_in = self._generator_input(batch)  # few-step: step k ~ U{0..K-1}, the uniform mixture
        x_g = self.roles["generator"].denoiser(x_in, t_in, cond, output="x0")
        self._fake_cache = (step, tuple(batch["prompts"]), x_g.detach())

        # SiD generator loss (SiD Sec. 4): diffuse x_g, evaluate f_phi and f_psi WITH autograd on x_t (the
        # networks' weights are frozen in this phase), (1 - alpha)||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g).
        n = len(x_g)
        t = self.schedule.sample_timesteps(n, min_frac=cfg.min_t_frac, max_frac=cfg.max_t_frac, device=x_g.device)
        x_t = self.schedule.add_noise(x_g, torch.randn_like(x_g), t)
        real_uncond = uncond if cfg.real_guidance_scale != 1.0 else None
        real_x0 = self.roles["teacher"].denoiser(x_t, t, cond, uncond=real_uncond,
                                                 guidance_scale=cfg.real_guidance_scale, output="x0")
        fake_x0 = self._fake_x0(x_t, t, batch)
        loss_sid = sid_generator_loss(x_g, real_x0, fake_x0, cfg.alpha)
        out = {
            "sid": loss_sid,
            "stats/score_diff_abs": (real_x0 - fake_x0).detach().abs().mean(),
            "stats/real_x0_std": real_x0.detach().std(), "stats/fake_x0_std": fake_x0.detach().std(),
            "stats/generator_x0_std": x_g.detach().std(),
        }
        # Diffusion-GAN term (few-step SiD: the classifier on the fake score's features, as DMD2) and LADD term.
        loss = cfg.sid_weight * loss_sid + self._extra_generator_terms(out, x_g, cond, step)
        out["loss"] = loss
        return out
