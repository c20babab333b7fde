"""The method interface: every distillation method is a plug-in of the one harness.

A method declares the roles (networks) it needs, the phases of one training step, and returns
losses for a phase. It never calls ``backward`` or steps an optimizer: the harness does, for the
roles the phase trains (``phase_roles``); the other trainable roles have ``requires_grad`` switched
off during that phase, so e.g. the critic gets no gradient from the generator loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from stepdistill.config.schema import RoleConfig
    from stepdistill.models.denoiser import Denoiser
    from stepdistill.models.loading import Teacher
    from stepdistill.models.roles import Role


def _as_drawn(value: int) -> int:
    return value


@dataclass
class MethodContext:
    """What the harness hands to a method: the loaded teacher and the built roles."""

    teacher: Teacher
    roles: dict[str, Role]
    resolution: int
    device: torch.device
    has_real_data: bool = False  # data.images is set: batches carry batch["real"] = {"latents", "cond"}
    # ``agree(k)``: one value for every process (the first process's) of a random draw that decides how
    # many network calls a step makes, e.g. how many backward-simulation steps. Sharded (FSDP2) networks
    # need the same calls on every process, and under DDP no process then waits for one that drew more.
    # The harness sets it for a multi-process run; one process keeps its own draw.
    agree: Callable[[int], int] = _as_drawn

    @property
    def schedule(self):
        return self.teacher.schedule


class DistillMethod:
    Config: ClassVar[type]
    name: ClassVar[str]
    paper: ClassVar[str] = ""
    student_role: ClassVar[str] = "generator"  # the role that is exported

    def __init__(self, cfg: Any, ctx: MethodContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.teacher = ctx.teacher
        self.schedule = ctx.teacher.schedule
        self.roles = ctx.roles

    # ---- declared structure -------------------------------------------------------------------
    @classmethod
    def default_roles(cls, cfg: Any) -> dict[str, RoleConfig]:
        """Roles this method needs and how they start; the user's ``roles:`` section overrides them."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Raise ValueError when the whole run config cannot work for this method (called before any
        model loads, e.g. a GAN term without ``data.images``)."""

    @classmethod
    def role_heads(cls, cfg: Any) -> dict[str, Callable[[Denoiser], torch.nn.Module]]:
        """Roles that carry an extra head module: ``{role: factory}``. The harness builds each head once, as
        ``factory(denoiser)`` with the role's backbone as a ``Denoiser`` (its ``backbone``, ``family`` and
        ``feature_levels()`` size the head), and trains it with the role (DMD2's bottleneck classifier,
        ``score.gan_head``; LADD's multi-level heads). A role with ``heads_only=True`` trains only its head,
        on the teacher's backbone. The method reads a head as ``roles[role].gan_head``."""
        return {}

    def phases(self, step: int) -> list[str]:
        """The phases of generator step ``step``, in order; each is one optimizer update."""
        raise NotImplementedError

    def phase_roles(self, phase: str) -> tuple[str, ...]:
        """Roles whose optimizers step in ``phase`` (default: the role named like the phase)."""
        return (phase,)

    def ema_targets(self) -> dict[str, tuple[str, float]]:
        """Frozen roles the harness keeps as an exponential moving average of a trained role.

        ``{target: (source, decay)}``: after every optimizer step of ``source`` the harness sets
        ``target <- decay * target + (1 - decay) * source`` (all parameters, same architecture) and
        checkpoints ``target`` with the run. This is the EMA *target network* of consistency
        distillation (LCM's theta^-), which the method calls like any role; it is separate from the
        export EMA (``RoleConfig.ema_decay``), which is a set of shadow tensors for export only.
        A target must be a non-trainable, full-weight role; the source a full-weight trainable role.
        """
        return {}

    # ---- training -----------------------------------------------------------------------------
    def losses(self, phase: str, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Loss terms for one phase; must contain "loss" (the one the harness back-propagates).

        Other entries are logged (detached by the harness); entries under ``stats/`` are health
        signals (score statistics, gradient norms of the DMD direction, GAN logits).
        """
        raise NotImplementedError

    # ---- inference / export -------------------------------------------------------------------
    @property
    def num_inference_steps(self) -> int:
        return 1

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond, uncond=None, num_steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Student sampler: latents from noise in ``num_steps`` generator evaluations."""
        raise NotImplementedError

    def export_roles(self) -> tuple[str, ...]:
        """Roles the export writes (the harness swaps in their EMA weights first): the student, or
        every expert of a mixture-of-experts student (Phased DMD)."""
        return (self.student_role,)

    def export_scheduler(self, num_steps: int | None = None):
        """A diffusers scheduler that reproduces ``sample`` inside a plain pipeline."""
        raise NotImplementedError

    def export_timesteps(self) -> list[float] | None:
        """Timesteps the exported pipeline must be called with (``timesteps=``, written to ``stepdistill.json``);
        None: the scheduler's own ones at ``num_inference_steps`` (the default)."""
        return None

    def export_guidance_scale(self) -> float | None:
        """The ``guidance_scale`` the exported pipeline is called with; None: the family default (1.0 for
        FLUX, whose guidance embedding was 1.0 in training; 0.0, no CFG, for the others). A student that
        takes the scale as an input (LCM's w-embedding, guidance distillation) returns its scale."""
        return None

    def export_experts(self) -> dict | None:
        """Extra networks the export writes beside the pipeline, for a student with one network per step:
        ``{"roles": {name: Role}, "timesteps": [...]}`` (Phased DMD; see ``sampling/experts.py``). None: the
        student is the pipeline's one backbone (the default)."""
        return None
