"""DMD and DMD2: distribution matching distillation with a learned fake score (critic).

- DMD: Tianwei Yin, Michaël Gharbi, Richard Zhang, Eli Shechtman, Frédo Durand, William T. Freeman,
  Taesung Park. "One-step Diffusion with Distribution Matching Distillation." CVPR 2024, arXiv 2311.18828.
- DMD2: Tianwei Yin, Michaël Gharbi, Taesung Park, Richard Zhang, Eli Shechtman, Frédo Durand,
  William T. Freeman. "Improved Distribution Matching Distillation for Fast Image Synthesis."
  NeurIPS 2024, arXiv 2405.14867.

Roles: ``generator`` (the student, initialised from the teacher), ``critic`` (the fake score
mu_fake, trained to denoise generator samples), ``teacher`` (frozen, the real score mu_real).
DMD2 adds: no regression loss, a two time-scale update rule (several critic updates per generator
update), a GAN classifier on the critic's bottleneck features, and multi-step students trained
with backward simulation and sampled with re-noising between steps (an LCM-style sampler).

The roles, phases, critic loss, GAN term and sampler are those every score-distillation method shares
(``methods/score.py``); this file holds DMD's generator loss and its regression term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepdistill.losses import dmd_loss, regression_loss
from stepdistill.methods.adversarial_term import AdversarialConfig
from stepdistill.methods.base import MethodContext
from stepdistill.methods.fewstep import ScoreDistillConfig
from stepdistill.methods.registry import register
from stepdistill.methods.score import CriticGAN, ScoreDistillation


@dataclass
class DMDConfig(ScoreDistillConfig):
    """DMD's fields beside the shared ones (``ScoreDistillConfig``: steps, timesteps, CFG scales, the noise
    range of the DMD gradient, the critic/generator update ratio). DMD is a one-step method (num_steps=1,
    one critic update per generator update); > 1 step uses DMD2's few-step sampler. The critic's denoising
    loss uses all timesteps, whatever min_t_frac / max_t_frac say."""

    name: str = "dmd"
    dmd_weight: float = 1.0
    # Regression loss on (noise -> teacher ODE output) pairs (DMD Sec. 3.3, Eq. 9); lambda_reg = 0.25.
    regression_weight: float = 0.25
    # Folder written by `stepdistill cache-pairs` (pairs.safetensors + prompts.json).
    regression_pairs: str | None = None
    # "pseudo_huber" (default; the paper's LPIPS needs downloaded VGG weights) or "l2", in latent space.
    regression_loss: str = "pseudo_huber"
    regression_batch_size: int = 1
    # Multi-step students: train step k on the student's own k-step output (DMD2 Sec. 4.5).
    backward_simulation: bool = True
    # GAN term on the critic's bottleneck features (DMD2 Sec. 4.3); 0 disables it.
    gan_generator_weight: float = 0.0
    gan_critic_weight: float = 0.0
    # The GAN classifier sees latents noised to integer t in [0, min(round(gan_max_t_frac * T), T - 1)]
    # (DMD2 "diffusion GAN"; 1.0 = its diffusion_gan_max_timestep 1000 of 1000: t in 0..999).
    gan_max_t_frac: float = 1.0
    # LADD term (methods/adversarial_term.py): trainable heads on the frozen teacher's multi-level features,
    # updated every iteration like the critic; weight 0 = off. DMD2 + LADD = this with weight > 0.
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.regression_loss not in ("pseudo_huber", "l2"):
            raise ValueError(f"method.regression_loss={self.regression_loss!r}; choose one of: pseudo_huber, l2")
        for key in ("gan_generator_weight", "gan_critic_weight", "regression_weight", "dmd_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.{key}={getattr(self, key)} must be >= 0")


@dataclass
class DMD2Config(DMDConfig):
    name: str = "dmd2"
    real_guidance_scale: float = 8.0
    critic_steps_per_generator_step: int = 5  # TTUR (DMD2 Sec. 4.2)
    regression_weight: float = 0.0  # DMD2 drops the regression loss (Sec. 4.1)
    gan_generator_weight: float = 1e-3
    gan_critic_weight: float = 1e-2


@torch.no_grad()
def real_and_fake_x0(roles: dict, cfg, x_t: torch.Tensor, t: torch.Tensor, cond, uncond):
    """The two denoised predictions of the DMD gradient (DMD Eq. 7) at ``x_t``: the teacher's (real score, CFG
    ``cfg.real_guidance_scale``) and the critic's (fake score, CFG ``cfg.fake_guidance_scale``)."""
    real_x0 = roles["teacher"].denoiser(x_t, t, cond, uncond=uncond, guidance_scale=cfg.real_guidance_scale,
                                        output="x0")
    fake_uncond = uncond if cfg.fake_guidance_scale != 1.0 else None
    fake_x0 = roles["critic"].denoiser(x_t, t, cond, uncond=fake_uncond, guidance_scale=cfg.fake_guidance_scale,
                                       output="x0")
    return real_x0, fake_x0


def check_regression_pairs(cfg: DMDConfig) -> None:
    if cfg.regression_weight > 0 and not cfg.regression_pairs:
        raise ValueError(
            f"method.regression_weight={cfg.regression_weight} needs method.regression_pairs: make them with "
            "`stepdistill cache-pairs --config <config> --out <dir> --num N` (or set method.regression_weight=0)"
        )


@register
class DMD(CriticGAN, ScoreDistillation):
    name = "dmd"
    Config = DMDConfig
    paper = "Yin et al., One-step Diffusion with Distribution Matching Distillation, CVPR 2024 (arXiv 2311.18828)"

    def __init__(self, cfg: DMDConfig, ctx: MethodContext) -> None:
        self.pairs = None
        super().__init__(cfg, ctx)
        if cfg.regression_weight > 0:
            from stepdistill.data.pairs import load_pairs

            self.pairs = load_pairs(cfg.regression_pairs, expect_shape=self.latent_shape)

    @classmethod
    def check_data(cls, cfg, has_real_data: bool) -> None:
        check_regression_pairs(cfg)
        super().check_data(cfg, has_real_data)

    # ---- losses -------------------------------------------------------------------------------
    def _generator_losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg, cond, uncond = self.cfg, batch["cond"], batch["uncond"]
        x_in, t_in = self._generator_input(batch)
        x0 = self.roles["generator"].denoiser(x_in, t_in, cond, output="x0")
        self._fake_cache = (step, tuple(batch["prompts"]), x0.detach())

        # Distribution matching (DMD Eq. 7, normalised by Eq. 8): diffuse the sample to a random t,
        # compare the teacher's (real) and the critic's (fake) denoised predictions.
        n = len(x0)
        t = self.schedule.sample_timesteps(n, min_frac=cfg.min_t_frac, max_frac=cfg.max_t_frac, device=x0.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x0.detach(), torch.randn_like(x0), t)
            real_x0, fake_x0 = real_and_fake_x0(self.roles, cfg, x_t, t, cond, uncond)
        loss_dmd, grad = dmd_loss(x0, real_x0, fake_x0)
        out = {
            "dmd": loss_dmd,
            "stats/dmd_grad_norm": grad.flatten(1).norm(dim=1).mean(),
            "stats/real_x0_mean": real_x0.mean(), "stats/real_x0_std": real_x0.std(),
            "stats/fake_x0_mean": fake_x0.mean(), "stats/fake_x0_std": fake_x0.std(),
            "stats/generator_x0_std": x0.detach().std(),
        }
        loss = cfg.dmd_weight * loss_dmd + self._extra_generator_terms(out, x0, cond, step)
        if self.pairs is not None:
            # Regression on teacher ODE pairs (DMD Eq. 9): the one-step output from the pair's noise
            # must match the teacher's multi-step output.
            noise, target, prompts = self.pairs.batch(step, cfg.regression_batch_size, self.ctx.device)
            with torch.no_grad():
                pair_cond = self.teacher.encode_prompt(prompts)
            pred = self.roles["generator"].denoiser(noise, self._t(self.timesteps[0], len(noise)), pair_cond,
                                                    output="x0")
            out["regression"] = regression_loss(pred, target, cfg.regression_loss)
            loss = loss + cfg.regression_weight * out["regression"]
        out["loss"] = loss
        return out


@register
class DMD2(DMD):
    name = "dmd2"
    Config = DMD2Config
    paper = "Yin et al., Improved Distribution Matching Distillation for Fast Image Synthesis, NeurIPS 2024 (arXiv 2405.14867)"
