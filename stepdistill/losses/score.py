"""Generator losses of the score-distillation family beside DMD: VSD (SwiftBrush) and SiD.

References
- ProlificDreamer (VSD): Wang et al., "ProlificDreamer: High-Fidelity and Diverse Text-to-3D Generation with
  Variational Score Distillation", NeurIPS 2023 (arXiv 2305.16213), Sec. 3 (the VSD gradient).
- SwiftBrush: Nguyen & Tran, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score
  Distillation", CVPR 2024 (arXiv 2312.05239), Sec. 4 (VSD applied to a one-step text-to-image student).
- DreamFusion (the weighting w(t) = sigma_t^2): Poole et al., arXiv 2209.14988, Sec. 3 and App. A.
- SiD: Zhou et al., "Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion
  Models for One-Step Generation", ICML 2024 (arXiv 2404.04057), Sec. 4 (the alpha-weighted generator loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.float().view(-1, *([1] * (like.dim() - 1)))


def vsd_gradient(eps_real: torch.Tensor, eps_fake: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The VSD direction for generator samples: ``w(t) * (eps_real - eps_fake)`` per sample.

    ProlificDreamer Sec. 3: ``grad_theta L_VSD = E[w(t) (eps_pretrain(x_t, t, y) - eps_phi(x_t, t, y)) dx/dtheta]``
    with ``eps_phi`` the noise prediction of the LoRA fitted to the generator's own samples; SwiftBrush
    uses it unchanged for a one-step student. ``weight`` holds ``w(t)`` per sample (shape ``[B]``).
    Returned with the sign of a gradient: descent moves samples away from the fake score's noise
    estimate and toward the teacher's.
    """
    grad = _per_sample(weight, eps_real) * (eps_real.float() - eps_fake.float())
    return torch.nan_to_num(grad)


def vsd_loss(x: torch.Tensor, eps_real: torch.Tensor, eps_fake: torch.Tensor,
             weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A scalar whose gradient w.r.t. ``x`` is ``vsd_gradient / x.numel()``.

    As for DMD, ``0.5 * mean((x - stopgrad(x - g))^2)`` carries the score-difference direction ``g`` (which
    skips the U-Net Jacobian, as SDS/VSD do) into ordinary autograd. Returns ``(loss, g)``, ``g`` detached.
    """
    grad = vsd_gradient(eps_real.detach(), eps_fake.detach(), weight.detach())
    target = (x.detach().float() - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target, reduction="mean"), grad


def sid_generator_loss(x_g: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor,
                       alpha: float = 1.2) -> torch.Tensor:
    """SiD's generator loss (SiD Sec. 4, the loss with the weight alpha; alpha = 1.2 in the paper's runs).

    With ``x_g`` the generator sample, ``f_phi = real_x0`` (teacher) and ``f_psi = fake_x0`` (fake score) the
    denoised predictions at ``x_t = a_t x_g + sigma_t eps``::

        L = (1 - alpha) * ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g)

    per element, each sample divided by ``w = mean|x_g - f_phi|`` (stop-gradient; SiD's choice of the
    time weighting, as DMD Eq. 8), then averaged over elements and batch. Unlike DMD's surrogate, the
    gradient flows through all three arguments: callers evaluate both score networks *with* autograd
    on ``x_t`` (their parameters frozen), as the score identities require.
    """
    x_g, real_x0, fake_x0 = x_g.float(), real_x0.float(), fake_x0.float()
    with torch.no_grad():
        weight = (x_g - real_x0).abs().flatten(1).mean(dim=1).clamp_min(1e-5)
    diff = real_x0 - fake_x0
    per_elem = (1.0 - alpha) * diff.pow(2) + diff * (fake_x0 - x_g)
    return (per_elem / _per_sample(weight, x_g)).mean()
