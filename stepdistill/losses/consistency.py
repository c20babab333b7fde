"""Loss maths of the consistency family, as pure tensor functions.

References
- LCM: Luo, Tan, Huang, Li, Zhao, "Latent Consistency Models", arXiv 2310.04378 (boundary conditions
  c_skip/c_out with sigma_data = 0.5 and the timestep scaling 10 of diffusers' LCMScheduler).
- CM: Song, Dhariwal, Chen, Sutskever, "Consistency Models", ICML 2023, arXiv 2303.01469 (Eq. 7: the
  parameterisation f(x, t) = c_skip(t) x + c_out(t) F(x, t)).
- sCM: Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", ICLR 2025,
  arXiv 2410.11081 (TrigFlow, Eq. 1-2; the continuous-time gradient, Eq. 6-8; tangent normalisation and
  warm-up, Sec. 4.2 and Algorithm 1).
- SANA-Sprint: Chen et al., arXiv 2503.09641, Sec. 3.1: a flow-matching model is a TrigFlow model after
  the change of variables implemented by ``trigflow_to_flow``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stepdistill.losses.core import pseudo_huber


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.float().reshape(-1, *([1] * (like.dim() - 1)))


def lcm_boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's ``(c_skip, c_out)`` at discrete timesteps ``t`` (CM Eq. 7 with LCM's choice of scales).

    ``c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2)``, ``c_out = s t / sqrt((s t)^2 + sigma_data^2)``
    with ``s = timestep_scaling``: ``c_skip(0) = 1, c_out(0) = 0`` (the boundary condition f(x, 0) = x);
    the same numbers LCMScheduler uses at sampling time, so training and export agree.
    """
    st = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, kind: str = "pseudo_huber",
                         c: float | None = None) -> torch.Tensor:
    """The consistency-distillation metric d(., .) (LCM Eq. 9 / CM Eq. 10): pseudo-Huber (iCT) or L2."""
    if kind == "pseudo_huber":
        return pseudo_huber(pred, target, c)
    if kind == "l2":
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    raise ValueError(f"consistency loss {kind!r} is not known; choose one of: pseudo_huber, l2")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_to: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """The DDIM (first-order PF-ODE) jump to a lower noise level: ``alpha_s x0 + sigma_s eps``.

    LCM's skipping-step teacher solver Psi (LCM Eq. 8 with DDIM), and PCM's map to the phase edge.
    """
    return _per_sample(alpha_to, x0) * x0.float() + _per_sample(sigma_to, x0) * eps.float()


# ---- sCM / TrigFlow -------------------------------------------------------------------------------
def trigflow_time(tau: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """TrigFlow time ``t = arctan(exp(tau) / sigma_data)`` from a log-normal proposal tau (sCM Sec. 4.3)."""
    return torch.atan(torch.exp(tau.float()) / sigma_data)


def trigflow_to_flow(t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The change of variables from TrigFlow to rectified flow (SANA-Sprint Sec. 3.1).

    TrigFlow: ``x_t = cos(t) x0 + sin(t) sigma_d eps``; rectified flow: ``x_s = (1 - s) x0 + s eps``.
    Returns ``(a, s)`` with ``x_s = x_t / a``: ``a = cos t + sigma_d sin t``, ``s = sigma_d sin t / a``.
    """
    cos, sin = torch.cos(t), torch.sin(t)
    a = cos + sigma_data * sin
    return a, sigma_data * sin / a


def scm_tangent(f_minus: torch.Tensor, df_dt: torch.Tensor, dxt_dt: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor, sigma_data: float, warmup: float, c: float = 0.1) -> torch.Tensor:
    """The normalised tangent ``g`` of sCM's continuous-time objective (sCM Eq. 8, Algorithm 1).

    ``g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt)``, where
    ``df_dt`` is already ``cos(t) sin(t) dF^-/dt`` (the JVP of F^- along the PF-ODE with tangents
    scaled by cos t sin t, as the paper computes it for stability); ``r = warmup`` in [0, 1] is the
    tangent warm-up (Sec. 4.2); then ``g <- g / (||g|| + c)`` (tangent normalisation, Sec. 4.2).
    """
    cos, sin = _per_sample(torch.cos(t), x_t), _per_sample(torch.sin(t), x_t)
    g = -cos**2 * (sigma_data * f_minus.float() - dxt_dt.float())
    g = g - warmup * (cos * sin * x_t.float() + sigma_data * df_dt.float())
    norm = g.flatten(1).norm(dim=1)
    return g / _per_sample(norm + c, g)


def scm_loss(f: torch.Tensor, f_minus: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||F_theta - F_theta^- - g||^2 / D`` (sCM Algorithm 1 without adaptive weighting).

    Its gradient at ``F_theta = F_theta^-`` is ``-2/D * g . dF_theta/dtheta``: the continuous-time
    consistency gradient of sCM Eq. 8 (up to the weighting), with a plain MSE's numerics.
    """
    return F.mse_loss(f.float(), (f_minus.float() + g.float()).detach(), reduction="mean")
