"""VSD / SwiftBrush: image-free one-step distillation with variational score distillation.

- SwiftBrush: Thuan Hoang Nguyen, Anh Tran. "SwiftBrush: One-Step Text-to-Image Diffusion Model with
  Variational Score Distillation." CVPR 2024, arXiv 2312.05239.
- VSD: Zhengyi Wang, Cheng Lu, Yikai Wang, Fan Bao, Chongxuan Li, Hang Su, Jun Zhu. "ProlificDreamer:
  High-Fidelity and Diverse Text-to-3D Generation with Variational Score Distillation." NeurIPS 2023,
  arXiv 2305.16213.

Roles: ``generator`` (the one-step student, full weights initialised from the teacher), ``teacher``
(frozen: the pretrained score eps_pretrain), ``critic`` (the "LoRA teacher" eps_phi: a LoRA on the
teacher's own frozen base, trained with the ordinary denoising loss on the student's samples). Each
iteration updates the student with the VSD gradient ``w(t) (eps_pretrain - eps_phi)`` and then the
LoRA on the student's fresh samples (SwiftBrush's alternating scheme). No image data is used.

The skeleton (roles, phases, generator inputs, fake-score denoising loss, sampler, export) is the one
every score-distillation method shares (``methods/score.py``, as DMD); what differs is the generator loss: the score difference in noise space with
the time weighting ``w(t)`` of DreamFusion/ProlificDreamer instead of DMD's per-sample normalisation.

Not implemented (documented extension): SwiftBrush v2's clamped CLIP loss (Dao et al., arXiv 2408.14176),
``max(CLIP distance, tau)`` on decoded student images against the prompt. It needs CLIP weights matching
the teacher's domain and a VAE decode per step; add it as an extra generator term when needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.losses import vsd_loss
from stepdistill.methods.adversarial_term import AdversarialConfig, adversarial_roles
from stepdistill.methods.fewstep import ScoreDistillConfig
from stepdistill.methods.registry import register
from stepdistill.methods.score import ScoreDistillation

WEIGHTINGS = ("sigma2", "uniform")


@dataclass
class VSDConfig(ScoreDistillConfig):
    """VSD's fields beside the shared ones (``ScoreDistillConfig``). SwiftBrush is one-step (num_steps > 1
    trains a few-step student with DMD2's backward simulation); the fake score is the LoRA; t in
    [0.02, 0.98] T as ProlificDreamer/DreamFusion; LoRA and student alternate 1:1 (SwiftBrush)."""

    name: str = "vsd"
    # CFG scale of the pretrained score in the VSD gradient (SwiftBrush Sec. 5: 4.5).
    real_guidance_scale: float = 4.5
    # w(t): "sigma2" = sigma_t^2 (DreamFusion App. A, kept by ProlificDreamer), "uniform" = 1.
    weighting: str = "sigma2"
    vsd_weight: float = 1.0
    # LADD term on the student's sample (methods/adversarial_term.py); weight 0 = off.
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"method.weighting={self.weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
        if self.vsd_weight <= 0:
            raise ValueError(f"method.vsd_weight={self.vsd_weight} must be > 0")


@register
class VSD(ScoreDistillation):
    name = "vsd"
    Config = VSDConfig
    paper = ("Nguyen & Tran, SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score "
             "Distillation, CVPR 2024 (arXiv 2312.05239)")

    @classmethod
    def default_roles(cls, cfg: VSDConfig) -> dict[str, RoleConfig]:
        return {
            # SwiftBrush trains the full student and a rank-64 LoRA teacher, lrs 1e-6 and 1e-3 (the official
            # training command, VinAIResearch/SwiftBrush README.md L99-102; see configs/vsd_sd15.yaml).
            "generator": RoleConfig(init_from="teacher", trainable=True, lr=1e-6),
            "critic": RoleConfig(init_from="teacher", trainable=True, lora_rank=64, share_teacher_base=True,
                                 lr=1e-3),
            "teacher": RoleConfig(init_from="teacher", trainable=False),
            **adversarial_roles(cfg.adversarial),
        }

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.weighting == "uniform":
            return torch.ones_like(t, dtype=torch.float32)
        _, sigma = self.schedule.alpha_sigma(t)
        return sigma.float() ** 2

    def _generator_losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg, cond, uncond = self.cfg, batch["cond"], batch["uncond"]
        x_in, t_in = self._generator_input(batch)
        x0 = self.roles["generator"].denoiser(x_in, t_in, cond, output="x0")
        self._fake_cache = (step, tuple(batch["prompts"]), x0.detach())

        # VSD gradient (ProlificDreamer Sec. 3, used as is by SwiftBrush Sec. 4): diffuse the student's sample,
        # w(t) (eps_pretrain(x_t) - eps_lora(x_t)); no U-Net Jacobian (stop-gradient through both scores).
        n = len(x0)
        t = self.schedule.sample_timesteps(n, min_frac=cfg.min_t_frac, max_frac=cfg.max_t_frac, device=x0.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x0.detach(), torch.randn_like(x0), t)
            real_uncond = uncond if cfg.real_guidance_scale != 1.0 else None
            eps_real = self.roles["teacher"].denoiser(
                x_t, t, cond, uncond=real_uncond, guidance_scale=cfg.real_guidance_scale, output="epsilon")
            fake_uncond = uncond if cfg.fake_guidance_scale != 1.0 else None
            eps_fake = self.roles["critic"].denoiser(
                x_t, t, cond, uncond=fake_uncond, guidance_scale=cfg.fake_guidance_scale, output="epsilon")
        loss_vsd, grad = vsd_loss(x0, eps_real, eps_fake, self._weight(t))
        out = {
            "vsd": loss_vsd,
            "stats/vsd_grad_norm": grad.flatten(1).norm(dim=1).mean(),
            "stats/eps_diff_abs": (eps_real - eps_fake).abs().mean(),
            "stats/generator_x0_std": x0.detach().std(),
        }
        out["loss"] = cfg.vsd_weight * loss_vsd + self._extra_generator_terms(out, x0, cond, step)  # LADD, if on
        return out
