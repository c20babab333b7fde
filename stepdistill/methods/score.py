"""What the score-distillation methods share (DMD, DMD2, VSD, SiD): a generator, a learned fake score, a teacher.

- DMD: Tianwei Yin, Michaël Gharbi, Richard Zhang, Eli Shechtman, Frédo Durand, William T. Freeman,
  Taesung Park. "One-step Diffusion with Distribution Matching Distillation." CVPR 2024, arXiv 2311.18828.
- DMD2: Tianwei Yin et al. "Improved Distribution Matching Distillation for Fast Image Synthesis."
  NeurIPS 2024, arXiv 2405.14867: the two time-scale update rule (Sec. 4.2), the GAN classifier on the fake
  score's bottleneck (Sec. 4.3, Eq. 6) and backward simulation for few-step students (Sec. 4.5).

Roles: ``generator`` (the student), ``critic`` (the fake score, trained to denoise the generator's samples,
DMD Eq. 6) and ``teacher`` (frozen, the real score); the LADD ``discriminator`` when
``method.adversarial.weight > 0``. Each iteration runs the generator phase every
``critic_steps_per_generator_step`` iterations, the critic phase (and the discriminator phase) every one.
The methods differ in the generator loss only (``_generator_losses``): DMD's distribution matching
gradient, VSD's score difference in noise space, SiD's score-identity loss.

``ScoreDistillation`` is the base; ``CriticGAN`` adds DMD2's GAN classifier on the critic's bottleneck to a
method whose config has ``gan_generator_weight``, ``gan_critic_weight`` and ``gan_max_t_frac`` (DMD/DMD2,
SiD's Diffusion-GAN term).
"""

from __future__ import annotations

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.losses import denoising_loss, gan_critic_loss, gan_generator_loss
from stepdistill.methods.adversarial_term import (
    DISCRIMINATOR,
    AdversarialHost,
    adversarial_roles,
    check_adversarial_data,
)
from stepdistill.methods.base import MethodContext
from stepdistill.methods.fewstep import FewStepGenerator
from stepdistill.models.denoiser import Conditioning
from stepdistill.models.heads import GANHead


def check_backward_simulation_data(cfg, has_real_data: bool) -> None:
    """Few-step students without backward simulation train steps k > 0 on noised real latents."""
    if cfg.num_steps > 1 and not getattr(cfg, "backward_simulation", True) and not has_real_data:
        raise ValueError(
            "method.backward_simulation=false trains steps k > 0 on noised real latents: set data.images, "
            "or keep method.backward_simulation=true"
        )


class ScoreDistillation(FewStepGenerator, AdversarialHost):
    """Generator, fake score (critic) and teacher; the TTUR phases; the critic's denoising loss; the LADD term.

    Config fields used: those of ``fewstep.ScoreDistillConfig`` and ``adversarial`` (``AdversarialConfig``).
    A subclass provides ``_generator_losses(batch, step)``, which calls ``_extra_generator_terms`` on its
    sample; it may override ``_critic_prediction`` (the critic's conditioning and guidance in its own loss),
    ``check_data`` (the data its optional terms need) and ``default_roles``.
    """

    def __init__(self, cfg, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.native = self.teacher.prediction_type
        self.check_data(cfg, has_real_data=ctx.has_real_data)
        self._init_adversarial(cfg.adversarial, ctx)

    # ---- structure ----------------------------------------------------------------------------
    @classmethod
    def check_data(cls, cfg, has_real_data: bool) -> None:
        """The data each enabled loss term of the method config ``cfg`` needs; raises ValueError. Called
        before any model loads (``check_config``) and again when the method is built."""
        check_adversarial_data(cfg.adversarial, has_real_data)
        check_backward_simulation_data(cfg, has_real_data)

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.check_data(cfg.method, has_real_data=bool(cfg.data.images))

    @classmethod
    def default_roles(cls, cfg) -> dict[str, RoleConfig]:
        return {
            "generator": RoleConfig(init_from="teacher", trainable=True),
            "critic": RoleConfig(init_from="teacher", trainable=True),
            "teacher": RoleConfig(init_from="teacher", trainable=False),
            **adversarial_roles(cfg.adversarial),
        }

    def phases(self, step: int) -> list[str]:
        # TTUR (DMD2 Sec. 4.2): the critic (and the LADD discriminator) every step, the generator every
        # `critic_steps_per_generator_step`.
        if step % self.cfg.critic_steps_per_generator_step == 0:
            return self._with_discriminator(["generator", "critic"])
        return self._with_discriminator(["critic"])

    # ---- losses -------------------------------------------------------------------------------
    def losses(self, phase: str, batch: dict, step: int) -> dict[str, torch.Tensor]:
        if phase == "generator":
            return self._generator_losses(batch, step)
        if phase == "critic":
            return self._critic_losses(batch, step)
        if phase == DISCRIMINATOR and self.adv is not None:
            return self._discriminator_losses(batch, step)
        raise ValueError(f"{self.name} has no phase {phase!r}")

    def _generator_losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _extra_generator_terms(self, out: dict, x0: torch.Tensor, cond, step: int):
        """The optional terms a score-distillation generator loss adds on its sample ``x0`` (with its graph):
        here the LADD term (DMD2 + LADD). Entries go to ``out``; returns their weighted sum (0 when off)."""
        if self.adv is not None:
            return self._adversarial_generator_term(out, x0, cond, step)
        return 0.0

    def _native_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of a denoiser in the teacher's own parameterization."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha = alpha.view(-1, *[1] * (x0.dim() - 1))
        sigma = sigma.view(-1, *[1] * (x0.dim() - 1))
        if self.native == "epsilon":
            return noise
        if self.native == "v_prediction":
            return alpha * noise - sigma * x0
        if self.native == "flow":
            return noise - x0
        return x0

    def _critic_losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        x0 = self._take_fake(batch, step)
        # The fake score learns to denoise generator samples at every noise level (DMD Eq. 6, in the
        # teacher's own parameterization; uniform t over the whole training range as in DMD2).
        n = len(x0)
        t = self.schedule.sample_timesteps(n, min_frac=0.0, max_frac=1.0, device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        pred = self._critic_prediction(x_t, t, batch)
        out = {"denoising": denoising_loss(pred, self._native_target(x0, noise, t))}
        out["loss"] = self._extra_critic_terms(out, out["denoising"], x0, batch)
        return out

    def _extra_critic_terms(self, out: dict, loss: torch.Tensor, x0: torch.Tensor, batch: dict) -> torch.Tensor:
        """The critic's loss ``loss`` plus its optional terms on this step's samples ``x0`` (none here)."""
        return loss

    def _critic_prediction(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
        """The fake score's prediction (teacher's parameterization) in its denoising loss; subclasses
        change its conditioning or guidance (SiD's LSG and Zero-CFG)."""
        return self.roles["critic"].denoiser(x_t, t, batch["cond"], output=self.native)


def gan_head(denoiser) -> torch.nn.Module:
    """The head factory of ``CriticGAN``: DMD2's classifier sized for the bottleneck of the critic's backbone."""
    return GANHead.for_backbone(denoiser.backbone, denoiser.family)


def check_gan_data(cfg, has_real_data: bool) -> None:
    if (cfg.gan_critic_weight > 0 or cfg.gan_generator_weight > 0) and not has_real_data:
        raise ValueError(
            f"method.gan_critic_weight={cfg.gan_critic_weight}, gan_generator_weight={cfg.gan_generator_weight} "
            "(GAN term) need real data: set data.images to a folder of images with a metadata.jsonl of captions, "
            "or to teacher samples made by `stepdistill cache-pairs`; or set both weights to 0"
        )


class CriticGAN:
    """DMD2's GAN term (DMD2 Sec. 4.3, Eq. 6) for a ``ScoreDistillation`` method: a classifier head on the
    critic's bottleneck features tells real latents from generator samples, both noised to a random t.

    Put it before the base (``class DMD(CriticGAN, ScoreDistillation)``). Config fields used:
    ``gan_generator_weight``, ``gan_critic_weight`` (0 and 0: off) and ``gan_max_t_frac``.
    """

    @classmethod
    def check_data(cls, cfg, has_real_data: bool) -> None:
        check_gan_data(cfg, has_real_data)
        super().check_data(cfg, has_real_data)

    @classmethod
    def role_heads(cls, cfg) -> dict:
        heads = {"critic": gan_head} if (cfg.gan_critic_weight > 0 or cfg.gan_generator_weight > 0) else {}
        return {**heads, **super().role_heads(cfg)}

    def _critic_features(self, x0: torch.Tensor, cond, max_frac: float):
        critic = self.roles["critic"]
        t = self.schedule.sample_timesteps(len(x0), min_frac=0.0, max_frac=max_frac, device=x0.device)
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t)
        # The classifier reads the bottleneck: the critic's backbone stops there (as DMD2's classify mode).
        features = critic.denoiser(x_t, t, cond, features_only=True)
        return critic.gan_head(features).flatten()

    def _extra_generator_terms(self, out: dict, x0: torch.Tensor, cond, step: int):
        """The GAN term on the critic's classifier (DMD2 Eq. 6, non-saturating), then the base's terms."""
        cfg, loss = self.cfg, 0.0
        if cfg.gan_generator_weight > 0:
            logits = self._critic_features(x0, cond, cfg.gan_max_t_frac)
            out["gan"] = gan_generator_loss(logits)
            out["stats/fake_logits"] = logits.detach().mean()
            loss = loss + cfg.gan_generator_weight * out["gan"]
        return loss + super()._extra_generator_terms(out, x0, cond, step)

    def _extra_critic_terms(self, out: dict, loss: torch.Tensor, x0: torch.Tensor, batch: dict) -> torch.Tensor:
        cfg = self.cfg
        if cfg.gan_critic_weight > 0:
            # The classifier tells real latents from generator samples at a random noise level (DMD2 Eq. 6).
            # Real and fake in one batched critic forward (one pass of the backbone instead of two).
            real = batch["real"]
            n_real = len(real["latents"])
            logits = self._critic_features(torch.cat([real["latents"].to(x0.dtype), x0]),
                                           Conditioning.cat([real["cond"], batch["cond"]]), cfg.gan_max_t_frac)
            real_logits, fake_logits = logits[:n_real], logits[n_real:]
            out["gan"] = gan_critic_loss(real_logits, fake_logits)
            out["stats/real_logits"] = real_logits.detach().mean()
            out["stats/fake_logits"] = fake_logits.detach().mean()
            loss = loss + cfg.gan_critic_weight * out["gan"]
        return super()._extra_critic_terms(out, loss, x0, batch)
