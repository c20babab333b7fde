"""The LADD term: an adversarial loss on the frozen teacher's features that methods add by config.

- LADD: Axel Sauer, Frederic Boesel, Tim Dockhorn, Andreas Blattmann, Patrick Esser, Robin Rombach.
  "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation." arXiv 2403.12015
  (SD3-Turbo).
- ADD: Axel Sauer, Dominik Lorenz, Andreas Blattmann, Robin Rombach. "Adversarial Diffusion Distillation."
  arXiv 2311.17042 (SDXL-Turbo): the hinge GAN objective LADD keeps (ADD Sec. 3.2).
- R1: Lars Mescheder, Andreas Geiger, Sebastian Nowozin, "Which Training Methods for GANs do actually
  Converge?" ICML 2018 (exact R1); APT, Shanchuan Lin et al., arXiv 2501.08316 (its finite-difference R1).

The discriminator of LADD is the *frozen teacher itself*: both the student's samples and "real" latents
(real images, or teacher samples made by ``stepdistill cache-pairs``) are re-noised to a timestep t_hat,
run through the teacher's backbone, and small trainable heads read the teacher's intermediate features
at several levels, each giving a real/fake logit. Everything stays in latent space (no VAE decoding),
the teacher's features already see the prompt and the noise level, and only the heads train.

In the harness this is the role ``discriminator`` with ``heads_only=True``: its module *is* the teacher's
backbone (no copy, never DDP-wrapped; the teacher stays bit-identical) and its trainable parameters are
the heads (``models.heads.MultiLevelHeads``), which get their own optimizer and DDP wrapper.

Hosts: DMD/DMD2, VSD, SiD, LCM, PCM and sCM have a ``method.adversarial`` section (``weight: 0`` = off)
that adds the discriminator role, a ``discriminator`` phase and ``weight * L_adv`` to their generator loss
(``AdversarialHost``) -- the DMD2 + LADD and sCM + LADD (SANA-Sprint, Junsong Chen et al., arXiv
2503.09641) hybrids without a new class. The LADD method itself, the generator trained by this loss alone,
is ``methods/ladd.py``.

ADD's pixel-space discriminator (DINOv2 features of decoded images) is not built: it needs downloaded
DINOv2 weights and decodes every sample, which is what LADD was made to avoid.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.losses import (
    approximate_r1,
    gan_critic_loss,
    gan_generator_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    r1_penalty,
)
from stepdistill.methods.base import DistillMethod, MethodContext
from stepdistill.models.denoiser import Conditioning, math_attention

DISCRIMINATOR = "discriminator"
LOSSES = ("hinge", "non_saturating")
R1_MODES = ("approximate", "exact")


@dataclass
class AdversarialConfig:
    """The LADD term: trainable heads on the frozen teacher's multi-level features."""

    # Weight of the adversarial generator loss; 0 switches the term off (DMD2, sCM hosts). LADD: 1.
    weight: float = 0.0
    # "hinge" (ADD Sec. 3.2 and LADD) or "non_saturating" (the logistic loss of DMD2's GAN term).
    loss: str = "hinge"
    # Feature levels the heads read, indices into Denoiser.feature_levels(): a UNet's down blocks then its
    # mid block, a transformer's blocks. None = all of them (LADD reads every transformer block).
    levels: list[int] | None = None
    # t_hat, the noise level of the discriminator's inputs, is logit-normal: t_hat/T = sigmoid(m + s * n),
    # n ~ N(0, 1). LADD studies this distribution and favours high noise: pi(t; m = 1, s = 1) (LADD Sec. 4.1,
    # Fig. 4, as a third-party reading note of its arXiv v1 HTML reports it; the paper was not re-read).
    t_mean: float = 1.0
    t_std: float = 1.0
    head_hidden: int = 128  # width of each head (toy choice; LADD's heads are small conv nets)
    # Also condition every head on the prompt (mean text token, by projection). ADD's heads see the text and
    # image embeddings, LADD's the noise level and the pooled CLIP text embedding (per a third-party reading
    # note; neither paper re-read); without it the prompt reaches the heads only through the teacher's
    # cross-attention. Off by default: on the toy teacher it made the LADD student worse (FID 3.27 vs 1.98,
    # alignment 81.7% vs 94.2%, one run each, README).
    text_conditioning: bool = False
    # Gradient penalty on real inputs; 0 = off. "approximate": APT's finite-difference R1
    # (Lin et al. 2025, arXiv 2501.08316) E[(D(x) - D(x + sigma n))^2], no second-order backward;
    # "exact": E[||grad_x D(x)||^2] (Mescheder et al. 2018), a double backward through the teacher.
    r1_weight: float = 0.0
    r1: str = "approximate"
    r1_sigma: float = 0.01  # the perturbation of the approximate R1 (latent units; toy choice)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"method.adversarial.weight={self.weight} must be >= 0 (0 switches the term off)")
        if self.loss not in LOSSES:
            raise ValueError(f"method.adversarial.loss={self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.r1 not in R1_MODES:
            raise ValueError(f"method.adversarial.r1={self.r1!r}; choose one of: {', '.join(R1_MODES)}")
        if self.t_std <= 0 or self.head_hidden < 1 or self.r1_weight < 0 or self.r1_sigma <= 0:
            raise ValueError("method.adversarial: need t_std > 0, head_hidden >= 1, r1_weight >= 0, r1_sigma > 0")
        if self.levels is not None and not list(self.levels):
            raise ValueError("method.adversarial.levels is empty: list feature levels, or null for all of them")


# ---- what a host method adds for the term -----------------------------------------------------------
def adversarial_roles(acfg: AdversarialConfig) -> dict[str, RoleConfig]:
    """The discriminator role when the term is on: heads only, on the teacher's frozen backbone."""
    if acfg.weight <= 0:
        return {}
    # Adam with beta1 = 0 is the usual GAN discriminator setting (toy choice for lr; not from the paper).
    return {DISCRIMINATOR: RoleConfig(init_from="teacher", trainable=True, heads_only=True, lr=1e-4,
                                      betas=[0.0, 0.99], weight_decay=0.0)}


def adversarial_heads(acfg: AdversarialConfig) -> dict:
    if acfg.weight <= 0:
        return {}
    levels = None if acfg.levels is None else list(acfg.levels)

    def build(denoiser):
        from stepdistill.models.heads import MultiLevelHeads

        return MultiLevelHeads.for_denoiser(denoiser, levels, hidden=acfg.head_hidden,
                                            text_conditioning=acfg.text_conditioning)

    return {DISCRIMINATOR: build}


def check_adversarial_data(acfg: AdversarialConfig, has_real_data: bool, key: str = "method.adversarial") -> None:
    if acfg.weight > 0 and not has_real_data:
        raise ValueError(
            f"{key}.weight={acfg.weight} (LADD term) needs 'real' latents for its discriminator: set data.images "
            "to teacher samples made by `stepdistill cache-pairs` (LADD's synthetic data), to a folder of images "
            f"with a metadata.jsonl of captions, or to builtin:toy; or set {key}.weight=0")


def logit_normal_timesteps(schedule, n: int, mean: float, std: float, device) -> torch.Tensor:
    """Model timesteps with t/T ~ logit-normal(mean, std): VP teachers get integer timesteps in [0, T-1],
    flow teachers sigma * T (no shift: the distribution is the shift)."""
    u = torch.sigmoid(torch.randn(n, device=device) * std + mean)
    T = schedule.num_train_timesteps
    if schedule.kind == "flow":
        return u * T
    return (u * (T - 1)).round()


class AdversarialTerm:
    """The LADD losses for a host method: ``generator_losses`` (added to the host's generator loss, with
    gradient to the student's sample) and ``discriminator_losses`` (the discriminator phase)."""

    def __init__(self, acfg: AdversarialConfig, ctx: MethodContext) -> None:
        self.cfg = acfg
        self.ctx = ctx
        self.schedule = ctx.teacher.schedule
        self.role = ctx.roles[DISCRIMINATOR]

    def _logits(self, x0: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Re-noise ``x0`` to t_hat, read the teacher's features, score them: logits [B, levels]."""
        cfg = self.cfg
        t = logit_normal_timesteps(self.schedule, len(x0), cfg.t_mean, cfg.t_std, x0.device)
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t)
        features = self.role.denoiser.features(x_t, t, cond, cfg.levels)
        return self.role.gan_head(features, self._text(cond))

    def _text(self, cond: Conditioning) -> torch.Tensor | None:
        """The prompt vector of text-conditioned heads: the mean token of the backbone's text input."""
        return cond["encoder_hidden_states"].float().mean(dim=1) if self.cfg.text_conditioning else None

    def generator_losses(self, x0: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor]:
        """The student's adversarial loss through the frozen teacher and frozen heads (LADD; the generator
        side of ADD's hinge objective, ADD Sec. 3.2); ``x0`` carries the generator's graph."""
        logits = self._logits(x0, cond)
        loss = hinge_generator_loss(logits) if self.cfg.loss == "hinge" else gan_generator_loss(logits)
        return {"adversarial": loss, "stats/adv_fake_logits": logits.detach().mean()}

    def discriminator_losses(self, fake_x0: torch.Tensor, fake_cond: Conditioning, real: dict) -> dict:
        """Heads learn to tell real latents from the student's samples at noise level t_hat (LADD)."""
        cfg = self.cfg
        real_x0 = real["latents"].to(fake_x0.device, torch.float32)
        exact_r1 = cfg.r1_weight > 0 and cfg.r1 == "exact"
        n_real = len(real_x0)
        # Real and fake in one backbone pass; the teacher's features need no graph unless R1 is exact.
        # (exact R1 differentiates twice through attention: the math kernel is the one that can)
        grad_ctx = contextlib.ExitStack()
        grad_ctx.enter_context(torch.enable_grad() if exact_r1 else torch.no_grad())
        if exact_r1:
            grad_ctx.enter_context(math_attention())
        with grad_ctx:
            t = logit_normal_timesteps(self.schedule, n_real + len(fake_x0), cfg.t_mean, cfg.t_std, real_x0.device)
            x0 = torch.cat([real_x0, fake_x0.detach().float()])
            x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t)
            if exact_r1:
                x_t = x_t.detach().requires_grad_(True)
            cond = Conditioning.cat([real["cond"], fake_cond])
            features = self.role.denoiser.features(x_t, t, cond, cfg.levels)
        logits = self.role.gan_head([f if exact_r1 else f.detach() for f in features], self._text(cond))
        real_logits, fake_logits = logits[:n_real], logits[n_real:]
        if cfg.loss == "hinge":
            loss_d = hinge_discriminator_loss(real_logits, fake_logits)
        else:
            loss_d = gan_critic_loss(real_logits.flatten(), fake_logits.flatten())
        out = {"adversarial": loss_d, "stats/adv_real_logits": real_logits.detach().mean(),
               "stats/adv_fake_logits": fake_logits.detach().mean(),
               "stats/adv_accuracy": 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())}
        loss = loss_d
        if cfg.r1_weight > 0:
            if exact_r1:
                # D(x) = the mean of the heads' logits; its input gradient on the real rows of the batch.
                penalty = r1_penalty(real_logits.mean(dim=1), x_t, num_rows=n_real)
            else:
                with torch.no_grad():
                    x_real = x_t[:n_real]
                    perturbed = self.role.denoiser.features(
                        x_real + cfg.r1_sigma * torch.randn_like(x_real), t[:n_real], real["cond"], cfg.levels)
                penalty = approximate_r1(real_logits, self.role.gan_head([f.detach() for f in perturbed],
                                                                         self._text(real["cond"])))
            out["r1"] = penalty
            loss = loss + cfg.r1_weight * penalty
        out["loss"] = loss
        return out


class AdversarialHost(DistillMethod):
    """Base of a method whose config has an ``adversarial`` section: the discriminator role's heads and phase
    and the LADD term of the generator loss, on an x0 estimate of the student that carries its graph.

    The discriminator phase scores this step's student samples (``_adversarial_samples``): by default those
    the generator phase of the same step kept (sCM, LCM, PCM, whose x0 estimates come from noised data);
    few-step generators (DMD family, LADD) override it to make new ones on iterations without a generator
    update (TTUR).
    """

    adv: AdversarialTerm | None = None
    _adv_samples: tuple | None = None

    @classmethod
    def role_heads(cls, cfg) -> dict:
        """The discriminator's heads when ``adversarial.weight > 0`` (a subclass adds its own with super())."""
        return adversarial_heads(cfg.adversarial)

    def _init_adversarial(self, acfg: AdversarialConfig, ctx: MethodContext) -> None:
        self.adv = AdversarialTerm(acfg, ctx) if acfg.weight > 0 else None
        self._adv_samples = None

    def _with_discriminator(self, phases: list[str]) -> list[str]:
        return [*phases, DISCRIMINATOR] if self.adv is not None else phases

    def _adversarial_generator_term(self, out: dict, x0: torch.Tensor, cond: Conditioning, step: int):
        """Add the LADD term's entries to ``out``; return ``weight * L_adv`` for the host's loss, and keep the
        samples for this step's discriminator phase."""
        self._adv_samples = (step, x0.detach(), cond)
        adv = self.adv.generator_losses(x0, cond)
        out.update(adv)
        return self.adv.cfg.weight * adv["adversarial"]

    def _adversarial_samples(self, batch: dict, step: int) -> tuple[torch.Tensor, Conditioning]:
        samples, self._adv_samples = self._adv_samples, None
        if samples is None or samples[0] != step:
            raise RuntimeError(f"{type(self).__name__}: the discriminator phase needs the samples of step {step}'s "
                               "generator phase (phases run generator first)")
        return samples[1], samples[2]

    def _discriminator_losses(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        x0, cond = self._adversarial_samples(batch, step)
        return self.adv.discriminator_losses(x0, cond, batch["real"])
