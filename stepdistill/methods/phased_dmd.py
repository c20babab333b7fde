"""Phased DMD: few-step distribution matching distillation with one expert per step.

Xiangyu Fan, Zesong Qiu, Zhuguanyu Wu, Fanzhou Wang, Zhiqian Lin, Tianxiang Ren, Dahua Lin, Ruihao Gong,
Lei Yang. "Phased DMD: Few-step Distribution Matching Distillation via Score Matching within
Subintervals." arXiv 2510.27684, 2025. (What follows implements its two key ideas; the formulas are
derived here. Checked later against v3 of the paper: it samples t in (t_{i+1}, T] for both the DMD
gradient and the fake score (Sec. 2.2.1-2.2.2, App. C.2: dmd_t_range "full" here), re-initialises the
fake score from the teacher at each phase (Sec. 2.2.1) and updates it 5 times per generator step
(Sec. 3).)

The noise range is split by the generator timesteps into k subintervals, edges
``T ≥ t_0 > t_1 > ... > t_{k-1} > t_k = clean``. The generator is a mixture of experts: expert i runs
step i, maps ``x_{t_i}`` to a state at ``t_{i+1}``, and the last expert to clean latents. The paper's two
ideas, as implemented here:

- Progressive distribution matching (the paper's first key idea): training runs
  in k stages; stage i trains only expert i, towards higher SNR. The earlier, frozen experts produce the
  stage's input ``x_{t_i}`` from noise. The stage of an iteration is a pure function of the step
  (``method.steps_per_stage``), so a resumed run continues in the same stage at the same place.
- Score matching within subintervals (the paper's second key idea): expert i's
  output lives at noise level ``s = t_{i+1}``, so its distribution is only defined there and above. The
  DMD gradient and the fake score's training both use ``t`` in ``(s, t_i]`` (``dmd_t_range: subinterval``;
  ``full`` uses ``(s, max_t]``), reaching ``x_t`` from ``x_s`` with the transition kernel of the forward
  process, and the fake score is trained with the subinterval denoising target derived in
  ``losses/subinterval.py`` (the score of p_t is ``E[∇ log p(x_t | x_s) | x_t]``; derived there, including
  its weight ``1 - SNR(t)/SNR(s)``). At the last stage s is clean and both reduce to DMD (Yin et al. 2024).

The expert's output (derived here). Expert i predicts ``x0_hat = G_i(x_{t_i})``; its output at
``s = t_{i+1}`` is one of two transitions (``method.transition``):

- ``ddim``: the deterministic DDIM jump ``x_s = alpha_s x0_hat + sigma_s eps_hat`` with
  ``eps_hat = (x_{t_i} - alpha_{t_i} x0_hat) / sigma_{t_i}``: the input's noise is carried to the next
  expert, so the whole mixture is a deterministic map of the initial noise, and before training it *is*
  the teacher's own k-step DDIM sampler. Exported with ``DDIMScheduler`` (trailing, VP) or deterministic
  ``FlowMatchEulerDiscreteScheduler`` (flow), which is the same jump.
- ``renoise`` (default): DMD2's re-noising step ``x_s = alpha_s x0_hat + sigma_s z`` with fresh z, exported
  with ``LCMScheduler`` (VP) / stochastic ``FlowMatchEulerDiscreteScheduler`` (flow). Every step discards
  what the input's noise held beyond x0_hat (README, Phased DMD: the two compared on the toy teacher).

Either way the DMD gradient w.r.t. x_s is ``(dx_t/dx_s)(s_fake - s_real) = r * alpha_t / sigma_t^2 *
(fake_x0 - real_x0)``, and ``dx_s/dx0_hat`` is a positive per-sample factor (``alpha_s``, or ``alpha_s -
sigma_s alpha_t / sigma_t`` > 0 for DDIM since SNR(s) > SNR(t_i)), which DMD's normalisation (DMD Eq. 8)
replaces: so the generator loss is ``dmd_loss(x0_hat, real, fake)`` for both.

One fake score (critic) serves all stages: stage i trains it only at ``t`` in its own subinterval, so
the stages' noise ranges are disjoint and the time conditioning keeps them apart; at the start of a stage
the critic's weights there are the ones the previous stages left (close to the teacher's, from which it
started), a warm start for the new expert's distribution. Every role may be full weights or a LoRA; with
``share_teacher_base`` LoRA experts are an MoE of adapters on one frozen base (the paper's LoRA experts).

Role names: expert 0 is the role ``generator`` (the name the harness, the export and every method's
first trained student carry), experts 1..k-1 are ``expert_1`` ... ``expert_{k-1}``. Phase names equal the
trained role's name.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.losses import dmd_loss
from stepdistill.losses.subinterval import (
    subinterval_diffuse,
    subinterval_weight,
    subinterval_x0_target,
    weighted_denoising_loss,
)
from stepdistill.methods.base import DistillMethod, MethodContext
from stepdistill.methods.dmd import real_and_fake_x0
from stepdistill.methods.fewstep import ScoreDistillConfig, check_exportable_timesteps
from stepdistill.methods.registry import register
from stepdistill.sampling.experts import route

DMD_T_RANGES = ("subinterval", "full")
TRANSITIONS = ("ddim", "renoise")


def expert_role(i: int) -> str:
    """Role (and phase) name of expert i: ``generator`` for expert 0, else ``expert_i``."""
    return "generator" if i == 0 else f"expert_{i}"


def stage_starts(num_steps: int, steps_per_stage: list[int]) -> list[int]:
    """First training step of each of the ``num_steps`` stages (the last stage runs to the end)."""
    lengths = list(steps_per_stage)
    if len(lengths) == 1:
        lengths = lengths * (num_steps - 1)
    starts = [0]
    for n in lengths[: num_steps - 1]:
        starts.append(starts[-1] + n)
    return starts


def stage_of(step: int, starts: list[int]) -> int:
    """The stage (= index of the expert trained) at iteration ``step``: a pure function of the step."""
    return bisect_right(starts, step) - 1


@dataclass
class PhasedDMDConfig(ScoreDistillConfig):
    """Phased DMD's fields beside the shared ones (``ScoreDistillConfig``). The generator timesteps are the
    subinterval edges t_0 > ... > t_{k-1} (t_k = clean); min_t_frac / max_t_frac clip every stage's
    subinterval (DMD Sec. 3.2); the critic/generator ratio applies within a stage."""

    name: str = "phased_dmd"
    # Generator steps = experts = stages (the paper distils 4-step image and video models).
    num_steps: int = 4
    # Training iterations of stages 0 .. k-2 (one entry: every stage that long); the last stage trains
    # expert k-1 until train.max_steps.
    steps_per_stage: list[int] = field(default_factory=lambda: [500])
    # "subinterval": t in (t_{i+1}, t_i] for stage i (stepdistill's default); "full": t in (t_{i+1}, max], the
    # paper's "reverse nested intervals" (Phased DMD v3 Sec. 2.2.1, App. C.2).
    dmd_t_range: str = "subinterval"
    # Expert i's output at t_{i+1}: "ddim" (deterministic DDIM jump carrying the input's noise; starts as the
    # teacher's DDIM sampler) or "renoise" (DMD2's re-noising with fresh noise). See the module docstring.
    transition: str = "renoise"
    dmd_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.num_steps < 2:
            raise ValueError(f"method.num_steps={self.num_steps}: Phased DMD needs >= 2 steps (one expert per "
                             "step); for one step use method.name=dmd2")
        super().__post_init__()
        n = len(self.steps_per_stage)
        if n not in (1, self.num_steps - 1):
            raise ValueError(f"method.steps_per_stage has {n} entries; give one (every stage) or num_steps - 1 = "
                             f"{self.num_steps - 1} (stages 0..{self.num_steps - 2}; the last runs to train.max_steps)")
        if any(s < 1 for s in self.steps_per_stage):
            raise ValueError(f"method.steps_per_stage={list(self.steps_per_stage)}: every stage needs >= 1 step")
        if self.dmd_t_range not in DMD_T_RANGES:
            raise ValueError(f"method.dmd_t_range={self.dmd_t_range!r}; choose one of: {', '.join(DMD_T_RANGES)}")
        if self.transition not in TRANSITIONS:
            raise ValueError(f"method.transition={self.transition!r}; choose one of: {', '.join(TRANSITIONS)}")
        if self.dmd_weight < 0:
            raise ValueError(f"method.dmd_weight={self.dmd_weight} must be >= 0")


@register
class PhasedDMD(DistillMethod):
    name = "phased_dmd"
    Config = PhasedDMDConfig
    paper = ("Fan et al., Phased DMD: Few-step Distribution Matching Distillation via Score Matching within "
             "Subintervals, 2025 (arXiv 2510.27684)")

    def __init__(self, cfg: PhasedDMDConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        from stepdistill.sampling.schedulers import pipeline_timesteps

        self._default = pipeline_timesteps(self.teacher, cfg.num_steps, ctx.resolution)
        self.timesteps = [float(t) for t in (cfg.generator_timesteps or self._default)]
        check_exportable_timesteps(self, self._default)
        if cfg.transition == "ddim" and self.export_timesteps() is not None:
            raise ValueError(
                f"method.generator_timesteps={list(cfg.generator_timesteps)} with method.transition=ddim: the "
                "exported DDIM scheduler steps over the evenly spaced grid "
                f"{[round(t, 3) for t in self._default]} only; drop generator_timesteps or use transition=renoise")
        self.native = self.teacher.prediction_type
        self.latent_shape = tuple(self.teacher.latent_shape(ctx.resolution))
        self.starts = stage_starts(cfg.num_steps, cfg.steps_per_stage)
        self.experts = [expert_role(i) for i in range(cfg.num_steps)]
        self._cache: tuple | None = None
        self.t_ranges = [self._t_range(i) for i in range(cfg.num_steps)]

    # ---- structure ----------------------------------------------------------------------------
    @classmethod
    def default_roles(cls, cfg: PhasedDMDConfig) -> dict[str, RoleConfig]:
        roles = {expert_role(i): RoleConfig(init_from="teacher", trainable=True) for i in range(cfg.num_steps)}
        roles["critic"] = RoleConfig(init_from="teacher", trainable=True)
        roles["teacher"] = RoleConfig(init_from="teacher", trainable=False)
        return roles

    @classmethod
    def check_config(cls, cfg) -> None:
        m = cfg.method
        starts = stage_starts(m.num_steps, list(m.steps_per_stage))
        if starts[-1] >= cfg.train.max_steps:
            raise ValueError(
                f"method.steps_per_stage={list(m.steps_per_stage)} starts the last stage (expert {m.num_steps - 1}) "
                f"at step {starts[-1]}, but train.max_steps={cfg.train.max_steps}: later experts would stay "
                "untrained; shorten method.steps_per_stage or raise train.max_steps")

    def stage(self, step: int) -> int:
        return stage_of(step, self.starts)

    def phases(self, step: int) -> list[str]:
        i = self.stage(step)
        # TTUR within the stage: a generator (expert i) update every `critic_steps_per_generator_step`.
        if (step - self.starts[i]) % self.cfg.critic_steps_per_generator_step == 0:
            return [self.experts[i], "critic"]
        return ["critic"]

    def export_roles(self) -> tuple[str, ...]:
        return tuple(self.experts)

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    # ---- noise levels -------------------------------------------------------------------------
    def _t(self, t: float, n: int) -> torch.Tensor:
        return torch.full((n,), float(t), device=self.ctx.device)

    def _edge(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` of subinterval edge t_i, [n, 1, 1, 1]; the edge t_k is clean (1, 0)."""
        if i >= len(self.timesteps):
            one = torch.ones(n, 1, 1, 1, device=self.ctx.device)
            return one, torch.zeros_like(one)
        a, s = self.schedule.alpha_sigma(self._t(self.timesteps[i], n))
        return a.view(n, 1, 1, 1), s.view(n, 1, 1, 1)

    def _t_range(self, i: int) -> tuple[float, float]:
        """``(lo, hi)``: stage i samples t in (lo, hi] (VP: integers lo+1..hi). The global clip is the one of
        ``VPSchedule.sample_timesteps``: VP integers round(min_t_frac*T)..min(round(max_t_frac*T), T-1)
        inclusive (20..980 of 1000 for 0.02 / 0.98); flow (min_t_frac*T, max_t_frac*T]."""
        cfg, T = self.cfg, self.schedule.num_train_timesteps
        vp = self.schedule.kind == "vp"
        top = min(round(cfg.max_t_frac * T), T - 1) if vp else cfg.max_t_frac * T
        bottom = (round(cfg.min_t_frac * T) - 1) if vp else cfg.min_t_frac * T
        hi = min(self.timesteps[i], top) if cfg.dmd_t_range == "subinterval" else top
        lo = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else bottom
        lo = max(lo, bottom)
        if hi <= lo or (vp and int(hi) <= int(lo)):
            raise ValueError(
                f"stage {i}: no noise level in the subinterval ({lo:g}, {hi:g}] after clipping to "
                f"method.min_t_frac={cfg.min_t_frac}, max_t_frac={cfg.max_t_frac}; widen them or space "
                "method.generator_timesteps further apart")
        return float(lo), float(hi)

    def _sample_t(self, i: int, n: int) -> torch.Tensor:
        lo, hi = self.t_ranges[i]
        if self.schedule.kind == "vp":
            return torch.randint(int(lo) + 1, int(hi) + 1, (n,), device=self.ctx.device).float()
        return hi - (hi - lo) * torch.rand(n, device=self.ctx.device)  # (lo, hi]

    def _noisy(self, i: int, x_s: torch.Tensor) -> tuple:
        """Diffuse stage i's outputs x_s (level t_{i+1}) to a random t in the stage's range."""
        n = len(x_s)
        t = self._sample_t(i, n)
        a_s, s_s = self._edge(i + 1, n)
        a_t, s_t = self.schedule.alpha_sigma(t)
        a_t, s_t = a_t.view(n, 1, 1, 1), s_t.view(n, 1, 1, 1)
        noise = torch.randn_like(x_s)
        x_t = subinterval_diffuse(x_s, noise, a_s, s_s, a_t, s_t)
        return t, x_t, noise, (a_s, s_s, a_t, s_t)

    # ---- the mixture of experts ---------------------------------------------------------------
    def _transition(self, x_in: torch.Tensor, x0: torch.Tensor, t: float, s: float | None, generator=None):
        """The step from ``x_in`` at t to level s given the prediction x0 (``method.transition``); s=None: clean."""
        if s is None:
            return x0
        n = len(x0)
        if self.cfg.transition == "ddim":
            eps = self.schedule.convert(x0.float(), x_in.float(), self._t(t, n), "x0", "epsilon")
        else:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        a_s, s_s = self.schedule.alpha_sigma(self._t(s, n))
        return a_s.view(n, 1, 1, 1) * x0.float() + s_s.view(n, 1, 1, 1) * eps.float()

    def _next_level(self, i: int) -> float | None:
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else None

    def _stage_input(self, i: int, cond) -> torch.Tensor:
        """x_{t_i}: noise through the frozen experts 0..i-1 (their transitions)."""
        n = len(cond)
        x = torch.randn((n, *self.latent_shape), device=self.ctx.device)
        with torch.no_grad():
            for j in range(i):
                x0 = self.roles[self.experts[j]].denoiser(x, self._t(self.timesteps[j], n), cond, output="x0")
                x = self._transition(x, x0, self.timesteps[j], self._next_level(j))
        return x

    def _expert_output(self, i: int, cond, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert i's x0 prediction (with its graph when ``grad``) and its detached output x_s at s = t_{i+1}."""
        x_in = self._stage_input(i, cond)
        n = len(x_in)
        with torch.set_grad_enabled(grad):
            x0 = self.roles[self.experts[i]].denoiser(x_in, self._t(self.timesteps[i], n), cond, output="x0")
        x_s = self._transition(x_in, x0.detach(), self.timesteps[i], self._next_level(i))
        return x0, x_s.float()

    # ---- losses -------------------------------------------------------------------------------
    def losses(self, phase: str, batch: dict, step: int) -> dict[str, torch.Tensor]:
        i = self.stage(step)
        if phase == "critic":
            return self._critic_losses(i, batch, step)
        if phase == self.experts[i]:
            return self._generator_losses(i, batch, step)
        raise ValueError(f"{self.name}: phase {phase!r} does not train at step {step} (stage {i} trains "
                         f"{self.experts[i]!r} and the critic)")

    def _generator_losses(self, i: int, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg, cond, uncond = self.cfg, batch["cond"], batch["uncond"]
        x0, x_s = self._expert_output(i, cond, grad=True)
        self._cache = (step, tuple(batch["prompts"]), x_s)
        # DMD within the subinterval (Phased DMD; DMD Eq. 7 with the Eq. 8 normalisation on x0_hat, see the
        # module docstring): x_t from the expert's output x_s by the s -> t kernel, t in (t_{i+1}, t_i].
        with torch.no_grad():
            t, x_t, _, _ = self._noisy(i, x_s)
            real_x0, fake_x0 = real_and_fake_x0(self.roles, cfg, x_t, t, cond, uncond)
        loss_dmd, grad = dmd_loss(x0, real_x0, fake_x0)
        return {
            "loss": cfg.dmd_weight * loss_dmd,
            "dmd": loss_dmd,
            "stats/stage": torch.tensor(float(i)),
            "stats/dmd_grad_norm": grad.flatten(1).norm(dim=1).mean(),
            "stats/real_x0_std": real_x0.std(), "stats/fake_x0_std": fake_x0.std(),
            "stats/generator_x0_std": x0.detach().std(),
        }

    def _critic_losses(self, i: int, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cond = batch["cond"]
        cache = self._cache
        if cache is not None and cache[0] == step and cache[1] == tuple(batch["prompts"]):
            x_s = cache[2]
        else:
            _, x_s = self._expert_output(i, cond, grad=False)
        self._cache = None
        # Score matching within the subinterval (Phased DMD; target and weight derived here, in
        # losses/subinterval.py): the "clean" sample x_s is itself noisy at level t_{i+1}.
        t, x_t, noise, coeffs = self._noisy(i, x_s)
        x0_target = subinterval_x0_target(x_t, noise, *coeffs)
        target = self.schedule.convert(x0_target, x_t, t, "x0", self.native)
        pred = self.roles["critic"].denoiser(x_t, t, cond, output=self.native)
        weight = subinterval_weight(*coeffs)
        loss = weighted_denoising_loss(pred, target, weight)
        return {"loss": loss, "denoising": loss, "stats/subinterval_weight": weight.mean()}

    # ---- sampling and export ------------------------------------------------------------------
    def expert_for(self, t: float) -> int:
        """The expert whose subinterval (t_{i+1}, t_i] holds timestep t (expert 0 above t_0); the same
        routing as the export's ``ExpertSwitch``."""
        return route(self.timesteps, t)

    @torch.no_grad()
    def sample(self, noise, cond, uncond=None, num_steps=None, generator=None):
        """Expert i runs step i: predict x0, then the transition to the next timestep (what the exported
        DDIM / LCM / flow scheduler does, with ``ExpertSwitch`` choosing the expert)."""
        timesteps = self.timesteps
        if num_steps is not None and num_steps != len(timesteps):
            from stepdistill.sampling.schedulers import pipeline_timesteps

            timesteps = pipeline_timesteps(self.teacher, num_steps, self.ctx.resolution)
        x, n = noise, len(noise)
        for k, t in enumerate(timesteps):
            denoiser = self.roles[self.experts[self.expert_for(t)]].denoiser
            x0 = denoiser(x, self._t(t, n), cond, output="x0")
            x = self._transition(x, x0, t, timesteps[k + 1] if k + 1 < len(timesteps) else None, generator)
        return x

    def export_scheduler(self, num_steps=None):
        from stepdistill.sampling.schedulers import deterministic_scheduler, renoising_scheduler

        make = deterministic_scheduler if self.cfg.transition == "ddim" else renoising_scheduler
        return make(self.teacher, num_steps or len(self.timesteps))

    def export_timesteps(self) -> list[float] | None:
        same = all(abs(float(a) - float(b)) < 1e-3 for a, b in zip(self._default, self.timesteps))
        return None if same else list(self.timesteps)

    def export_experts(self) -> dict:
        """Experts 1..k-1 the export writes beside the pipeline (expert 0 is its backbone), and the
        timesteps that route steps to experts (``sampling/experts.py``)."""
        return {"roles": {self.experts[i]: self.roles[self.experts[i]] for i in range(1, len(self.experts))},
                "timesteps": list(self.timesteps)}
