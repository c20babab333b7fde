"""LADD: a few-step generator trained by the latent adversarial loss alone.

- LADD: Axel Sauer, Frederic Boesel, Tim Dockhorn, Andreas Blattmann, Patrick Esser, Robin Rombach.
  "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation." arXiv 2403.12015
  (SD3-Turbo).
- ADD: Axel Sauer, Dominik Lorenz, Andreas Blattmann, Robin Rombach. "Adversarial Diffusion Distillation."
  arXiv 2311.17042 (SDXL-Turbo): the hinge GAN objective (ADD Sec. 3.2) LADD keeps.

Roles: ``generator`` (the student), ``teacher`` (frozen) and ``discriminator`` (trainable heads on the
frozen teacher's multi-level features). The loss, the heads and the discriminator phase are the LADD term
of ``methods/adversarial_term.py``, which other methods add to their own generator loss; here it is the
only generator loss (``method.adversarial.weight`` must be > 0). Few-step students are sampled and
exported as DMD2's re-noising sampler (``methods/fewstep.py``); step k > 0 trains on the student's own
k-step output (backward simulation) or on noised data latents, as LADD trains on noised synthetic teacher
samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.methods.adversarial_term import (
    DISCRIMINATOR,
    AdversarialConfig,
    AdversarialHost,
    adversarial_roles,
    check_adversarial_data,
)
from stepdistill.methods.base import MethodContext
from stepdistill.methods.fewstep import FewStepGenerator, check_generator_schedule
from stepdistill.methods.registry import register


@dataclass
class LADDConfig:
    name: str = "ladd"
    # Generator steps (SD3-Turbo: 4; LADD also trains 1- and 2-step students).
    num_steps: int = 1
    # Timesteps the generator is conditioned on, highest first (default: the exported scheduler's).
    generator_timesteps: list[int] | None = None
    # Few-step students: train step k on the student's own k-step output (as DMD2 Sec. 4.5), or (false) on
    # noised data latents (data.images), as LADD trains on noised synthetic teacher samples.
    backward_simulation: bool = True
    # Discriminator updates per generator update (the generator steps every n-th iteration).
    discriminator_steps_per_generator_step: int = 1
    adversarial: AdversarialConfig = field(default_factory=lambda: AdversarialConfig(weight=1.0))

    def __post_init__(self) -> None:
        check_generator_schedule(self, ratio_key="discriminator_steps_per_generator_step")
        if self.adversarial.weight <= 0:
            raise ValueError("method.adversarial.weight must be > 0 for method.name=ladd (it is the only loss)")


@register
class LADD(FewStepGenerator, AdversarialHost):
    name = "ladd"
    Config = LADDConfig
    paper = ("Sauer et al., Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation, "
             "arXiv 2403.12015")

    def __init__(self, cfg: LADDConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        check_adversarial_data(cfg.adversarial, ctx.has_real_data)
        self._init_adversarial(cfg.adversarial, ctx)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_adversarial_data(cfg.method.adversarial, bool(cfg.data.images))

    @classmethod
    def default_roles(cls, cfg: LADDConfig) -> dict[str, RoleConfig]:
        return {
            "generator": RoleConfig(init_from="teacher", trainable=True),
            "teacher": RoleConfig(init_from="teacher", trainable=False),
            **adversarial_roles(cfg.adversarial),
        }

    def phases(self, step: int) -> list[str]:
        if step % self.cfg.discriminator_steps_per_generator_step == 0:
            return ["generator", DISCRIMINATOR]
        return [DISCRIMINATOR]

    def losses(self, phase: str, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cond = batch["cond"]
        if phase == "generator":
            x_in, t_in = self._generator_input(batch)
            x0 = self.roles["generator"].denoiser(x_in, t_in, cond, output="x0")
            self._fake_cache = (step, tuple(batch["prompts"]), x0.detach())
            out = {"stats/generator_x0_std": x0.detach().std()}
            out["loss"] = self._adversarial_generator_term(out, x0, cond, step)
            return out
        if phase == DISCRIMINATOR:
            return self._discriminator_losses(batch, step)
        raise ValueError(f"{self.name} has no phase {phase!r}")
