"""One-step knowledge distillation, as a plugin method of stepdistill (a test fixture, not a recipe).

Eric Luhman, Troy Luhman. "Knowledge Distillation in Iterative Generative Models for Improved Sampling
Speed." arXiv 2101.02388 (2021): the student maps noise to the teacher's sample in one step, trained by
regression on the teacher's output (theirs is the endpoint of a whole deterministic DDIM trajectory; here,
to stay a tiny fixture, the target is the CFG teacher's own x0 prediction at the top timestep).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.losses import denoising_loss
from stepdistill.methods import register
from stepdistill.methods.fewstep import FewStepGenerator, check_generator_schedule


@dataclass
class KDConfig:
    name: str = "kd_plugin"
    num_steps: int = 1
    generator_timesteps: list[int] | None = None
    guidance_scale: float = 2.0
    critic_steps_per_generator_step: int = 1  # (check_generator_schedule's ratio; no critic here)

    def __post_init__(self) -> None:
        check_generator_schedule(self)


@register
class KnowledgeDistillation(FewStepGenerator):
    name = "kd_plugin"
    Config = KDConfig
    paper = "Luhman & Luhman, Knowledge Distillation in Iterative Generative Models (arXiv 2101.02388)"

    @classmethod
    def default_roles(cls, cfg: KDConfig) -> dict[str, RoleConfig]:
        return {"generator": RoleConfig(init_from="teacher", trainable=True),
                "teacher": RoleConfig(init_from="teacher", trainable=False)}

    def phases(self, step: int) -> list[str]:
        return ["generator"]

    def losses(self, phase: str, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cond, uncond = batch["cond"], batch["uncond"]
        noise = torch.randn((len(cond), *self.latent_shape), device=self.ctx.device)
        t = self._t(self.timesteps[0], len(cond))
        with torch.no_grad():
            target = self.roles["teacher"].denoiser(noise, t, cond, uncond=uncond,
                                                    guidance_scale=self.cfg.guidance_scale, output="x0")
        pred = self.roles["generator"].denoiser(noise, t, cond, output="x0")
        loss = denoising_loss(pred, target)  # Luhman & Luhman's regression, on the teacher's x0 (see above)
        return {"loss": loss, "kd": loss.detach()}
