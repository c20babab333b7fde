"""Noise schedules: the forward process ``x_t = alpha(t) * x0 + sigma(t) * eps`` of a teacher.

Every distillation method speaks in terms of this one equation, whatever the teacher was trained
with. Two kinds cover the supported families:

* ``VPSchedule`` — discrete variance-preserving DDPM schedules (SD 1.5, SD 2.x, SDXL):
  ``alpha = sqrt(alphas_cumprod[t])``, ``sigma = sqrt(1 - alphas_cumprod[t])``, with integer model
  timesteps ``t`` in ``[0, T - 1]`` (non-integer ``t`` interpolates ``alphas_cumprod`` linearly).
* ``FlowSchedule`` — rectified flow (SD3, FLUX): ``sigma = t / T``, ``alpha = 1 - sigma``, with
  model timesteps ``t = sigma * T`` in ``[0, T]``, exactly as diffusers' ``FlowMatchEulerDiscreteScheduler``
  hands them to the transformer. The resolution-dependent "timestep shift" of SD3/FLUX only changes
  *which* sigmas are sampled (``sample_timesteps``, ``timesteps_for_steps``), not the meaning of ``t``.

Prediction types (``convert``) are defined for every schedule from ``(x0, eps)``:

=================  ==========================================  =====================================
name               definition                                  used by
=================  ==========================================  =====================================
``"x0"``           the clean sample (alias ``"sample"``)        x0-parameterised students
``"epsilon"``      the noise ``eps``                            SD 1.5, SDXL
``"v_prediction"`` ``alpha * eps - sigma * x0``                 SD 2.x 768 px
``"flow"``         the velocity ``u = eps - x0 = dx_t/dsigma``  SD3, FLUX (rectified flow)
=================  ==========================================  =====================================

All arithmetic is done in float32, whatever the dtype of the inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREDICTION_TYPES = ("x0", "epsilon", "v_prediction", "flow")
_ALIASES = {"sample": "x0", "x_0": "x0", "eps": "epsilon", "v": "v_prediction", "velocity": "flow"}

# Divisions by alpha or sigma are guarded with this floor: at the very ends of a schedule (flow
# t = 0 or t = T, zero-terminal-SNR VP schedules) one of the two vanishes and the conversion that
# divides by it is undefined; the floor keeps the result finite instead of inf/nan.
_EPS = 1e-6


def _canonical(pred_type: str) -> str:
    name = _ALIASES.get(pred_type, pred_type)
    if name not in PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction type {pred_type!r}; choose one of {', '.join(PREDICTION_TYPES)} (or 'sample' for x0)"
        )
    return name


def _broadcast(coef: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient [B] (or a scalar) so it broadcasts over ``like`` [B, ...]."""
    coef = coef.to(device=like.device, dtype=torch.float32)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Base class: the forward process of a teacher and conversions between prediction types."""

    kind: str = ""
    num_train_timesteps: int = 1000

    # ---- the forward process ------------------------------------------------------------------
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha(t), sigma(t))`` as float32 tensors shaped like ``t`` (model timesteps)."""
        raise NotImplementedError

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = alpha(t) * x0 + sigma(t) * noise`` in float32; ``t`` is a scalar or [B]."""
        alpha, sigma = self.alpha_sigma(self._as_tensor(t, x0.device))
        return _broadcast(alpha, x0) * x0.float() + _broadcast(sigma, x0) * noise.float()

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``alpha^2 / sigma^2`` (inf where sigma = 0)."""
        alpha, sigma = self.alpha_sigma(self._as_tensor(t))
        return alpha**2 / sigma**2

    # ---- timesteps ----------------------------------------------------------------------------
    def sample_timesteps(
        self,
        n: int,
        *,
        min_frac: float = 0.0,
        max_frac: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``n`` training timesteps drawn uniformly from ``[min_frac, max_frac]`` of the training range
        (the exact ends per schedule: VP integers, flow continuous; see the subclasses)."""
        raise NotImplementedError

    def timesteps_for_steps(self, num_steps: int) -> list[float]:
        """Model timesteps of a ``num_steps`` few-step generator, highest (noisiest) first."""
        raise NotImplementedError

    # ---- prediction types ---------------------------------------------------------------------
    def convert(self, pred: Tensor, x_t: Tensor, t: Tensor, from_type: str, to_type: str) -> Tensor:
        """Convert a model prediction between parameterisations, given ``x_t`` and its timestep ``t``.

        Works for any ``alpha``, ``sigma`` (not only ``alpha^2 + sigma^2 = 1``): ``(x0, eps)`` is
        recovered from ``(x_t, pred)`` by solving the 2x2 linear system, then the requested type is formed.
        """
        from_type, to_type = _canonical(from_type), _canonical(to_type)
        pred, x_t = pred.float(), x_t.float()
        if from_type == to_type:
            return pred
        alpha, sigma = self.alpha_sigma(self._as_tensor(t, x_t.device))
        a, s = _broadcast(alpha, x_t), _broadcast(sigma, x_t)

        # 1) recover (x0, eps) from x_t = a * x0 + s * eps and the prediction.
        if from_type == "x0":
            x0 = pred
            eps = (x_t - a * x0) / s.clamp_min(_EPS)
        elif from_type == "epsilon":
            eps = pred
            x0 = (x_t - s * eps) / a.clamp_min(_EPS)
        elif from_type == "v_prediction":  # v = a * eps - s * x0
            det = a * a + s * s
            x0 = (a * x_t - s * pred) / det
            eps = (s * x_t + a * pred) / det
        else:  # "flow": u = eps - x0  =>  x_t = (a + s) * x0 + s * u
            x0 = (x_t - s * pred) / (a + s)
            eps = x0 + pred

        # 2) form the requested type.
        if to_type == "x0":
            return x0
        if to_type == "epsilon":
            return eps
        if to_type == "v_prediction":
            return a * eps - s * x0
        return eps - x0

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor, pred_type: str) -> Tensor:
        return self.convert(pred, x_t, t, pred_type, "x0")

    def to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor, pred_type: str) -> Tensor:
        return self.convert(pred, x_t, t, pred_type, "epsilon")

    def to_velocity(self, pred: Tensor, x_t: Tensor, t: Tensor, pred_type: str) -> Tensor:
        """The native "velocity" of this schedule: ``v_prediction`` for VP, the flow ``u`` for flow."""
        return self.convert(pred, x_t, t, pred_type, "v_prediction" if self.kind == "vp" else "flow")

    # ---- construction -------------------------------------------------------------------------
    @staticmethod
    def from_scheduler(scheduler, image_seq_len: int | None = None) -> NoiseSchedule:
        """Build the schedule of a diffusers scheduler from its config.

        * Schedulers with ``alphas_cumprod`` (DDPM, DDIM, PNDM, Euler, DPM-Solver, LCM, ...) give a
          ``VPSchedule`` with the scheduler's ``prediction_type``.
        * Flow-matching schedulers (``FlowMatchEulerDiscreteScheduler`` and friends) give a
          ``FlowSchedule``. With ``use_dynamic_shifting`` (FLUX) the shift depends on the number of
          image tokens: pass ``image_seq_len`` to get the shift the pipeline uses at that resolution
          (``exp(mu)``, ``mu`` interpolated between ``base_shift`` and ``max_shift``); without it the
          config's static ``shift`` is used. Karras/exponential/beta sigma spacings and
          ``shift_terminal`` only affect inference spacing and are not modelled.
        """
        config = scheduler.config
        if getattr(scheduler, "alphas_cumprod", None) is not None:
            return VPSchedule(scheduler.alphas_cumprod, config.get("prediction_type", "epsilon"))
        if "FlowMatch" in type(scheduler).__name__ or "use_dynamic_shifting" in config:
            shift = float(config.get("shift", 1.0))
            if config.get("use_dynamic_shifting", False) and image_seq_len is not None:
                shift = dynamic_shift(image_seq_len, config)
            return FlowSchedule(int(config.get("num_train_timesteps", 1000)), shift=shift)
        raise ValueError(
            f"Cannot derive a noise schedule from {type(scheduler).__name__}: it has neither alphas_cumprod "
            "(VP/DDPM family) nor a flow-matching config (shift / use_dynamic_shifting)."
        )

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _as_tensor(t, device=None) -> Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor(t, dtype=torch.float32)
        t = t.float()
        return t.to(device) if device is not None else t

    @staticmethod
    def _check_fracs(min_frac: float, max_frac: float) -> None:
        if not 0.0 <= min_frac < max_frac <= 1.0:
            raise ValueError(
                f"need 0 <= min_frac < max_frac <= 1, got min_frac={min_frac}, max_frac={max_frac}"
            )


def dynamic_shift(image_seq_len: int, config) -> float:
    """The static shift equivalent to a dynamic-shifting flow scheduler at ``image_seq_len`` tokens.

    Mirrors ``diffusers.pipelines.flux.pipeline_flux.calculate_shift``: ``mu`` is linear in the
    sequence length between ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``.
    An exponential time shift ``e^mu / (e^mu + 1/s - 1)`` is the plain shift with ``shift = e^mu``;
    a linear one is the plain shift with ``shift = mu``.
    """
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = base_shift + slope * (image_seq_len - base_len)
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule defined by ``alphas_cumprod`` (length T)."""

    kind = "vp"

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().float().cpu()
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        self.prediction_type = _canonical(prediction_type)
        self._acp_on: dict[torch.device, Tensor] = {}  # one copy per device: no host copy per call

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = self._as_tensor(t)
        if t.device not in self._acp_on:
            self._acp_on[t.device] = self.alphas_cumprod.to(t.device)
        acp = self._acp_on[t.device]
        # Linear interpolation of alphas_cumprod between the neighbouring integer timesteps.
        t = t.clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo.float()
        a2 = acp[lo] * (1 - w) + acp[hi] * w
        return a2.sqrt(), (1 - a2).clamp_min(0).sqrt()

    def sample_timesteps(self, n, *, min_frac=0.0, max_frac=1.0, generator=None, device=None) -> Tensor:
        """Integer timesteps uniform in ``[round(min_frac*T), min(round(max_frac*T), T - 1)]``, both ends
        included, as a float tensor: 0.02 / 0.98 of T = 1000 draw 20..980 (the DMD paper's ``[0.02T, 0.98T]``
        and DMD2's ``randint(min_step, min(max_step + 1, T))``); max_frac = 1 draws up to T - 1."""
        self._check_fracs(min_frac, max_frac)
        T = self.num_train_timesteps
        lo = min(round(min_frac * T), T - 1)
        hi = max(min(round(max_frac * T), T - 1), lo)
        gen_device = generator.device if generator is not None else (device or "cpu")
        t = torch.randint(lo, hi + 1, (n,), generator=generator, device=gen_device)
        return t.float().to(device if device is not None else gen_device)

    def timesteps_for_steps(self, num_steps: int) -> list[float]:
        """Evenly spaced from ``T - 1`` down: ``t_k = T - 1 - k * (T // n)`` (999, 749, 499, 249 for 4)."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        T = self.num_train_timesteps
        return [float(T - 1 - k * (T // num_steps)) for k in range(num_steps)]

    def __repr__(self) -> str:
        return f"VPSchedule(T={self.num_train_timesteps}, prediction_type={self.prediction_type!r})"


class FlowSchedule(NoiseSchedule):
    """Rectified-flow schedule: ``sigma = t / T``, ``alpha = 1 - sigma``; ``shift`` warps sampled sigmas."""

    kind = "flow"
    prediction_type = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"shift={shift} must be > 0")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)

    def shift_sigma(self, sigma: Tensor) -> Tensor:
        """SD3's timestep shift ``shift * s / (1 + (shift - 1) * s)`` (identity for shift = 1)."""
        sigma = self._as_tensor(sigma)
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = (self._as_tensor(t) / self.num_train_timesteps).clamp(0, 1)
        return 1 - sigma, sigma

    def sample_timesteps(self, n, *, min_frac=0.0, max_frac=1.0, generator=None, device=None) -> Tensor:
        """Continuous ``t = shift(u) * T`` with ``u ~ U[min_frac, max_frac)``: ``shift(min_frac) * T <= t <
        shift(max_frac) * T`` (max_frac = 1: t < T; the open top is a measure-zero difference)."""
        self._check_fracs(min_frac, max_frac)
        gen_device = generator.device if generator is not None else (device or "cpu")
        u = torch.rand((n,), generator=generator, device=gen_device) * (max_frac - min_frac) + min_frac
        t = self.shift_sigma(u) * self.num_train_timesteps
        return t.to(device if device is not None else gen_device)

    def timesteps_for_steps(self, num_steps: int) -> list[float]:
        """``shift(linspace(1, 0, n + 1)[:-1]) * T`` (e.g. 1000, 750, 500, 250 for 4 steps, shift 1)."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        # Plain Python floats (double precision) so the values are exact and printable.
        sigmas = [1.0 - k / num_steps for k in range(num_steps)]
        return [self.shift * s / (1 + (self.shift - 1) * s) * self.num_train_timesteps for s in sigmas]

    def __repr__(self) -> str:
        return f"FlowSchedule(T={self.num_train_timesteps}, shift={self.shift:g})"
