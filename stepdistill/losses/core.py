"""Loss functions shared by the methods.

References
- DMD: Yin et al., "One-step Diffusion with Distribution Matching Distillation", CVPR 2024 (arXiv 2311.18828).
- DMD2: Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024
  (arXiv 2405.14867).
- Pseudo-Huber: Song & Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024, Sec. 3.3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """The distribution-matching direction for generator samples ``x`` (DMD Eq. 7 and Eq. 8).

    The KL gradient is ``s_fake - s_real``; with denoisers, ``s(x_t) ∝ -(x_t - alpha x0_hat)/sigma^2``, so
    ``s_fake - s_real ∝ real_x0 - fake_x0`` up to the per-timestep factor. DMD replaces that factor by
    ``w = 1 / mean|x - real_x0|`` per sample (Eq. 8), which keeps the gradient magnitude comparable
    across noise levels. Returned with the sign of a gradient (descent moves ``x`` toward ``real_x0``).
    """
    x, real_x0, fake_x0 = x.float(), real_x0.float(), fake_x0.float()
    weight = (x - real_x0).abs().flatten(1).mean(dim=1).clamp_min(1e-8)
    grad = (fake_x0 - real_x0) / weight.view(-1, *([1] * (x.dim() - 1)))
    return torch.nan_to_num(grad)


def dmd_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A scalar surrogate whose gradient w.r.t. ``x`` is ``dmd_gradient / x.numel()``.

    ``0.5 * ||x - stopgrad(x - g)||^2`` (mean over elements) has gradient ``g / N``: this is how the
    distribution-matching gradient of DMD Eq. 7 reaches the generator through ordinary autograd.
    Returns ``(loss, g)``; ``g`` is detached and logged as the DMD gradient norm.
    """
    grad = dmd_gradient(x.detach(), real_x0.detach(), fake_x0.detach())
    target = (x.detach().float() - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target, reduction="mean"), grad


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain denoising score matching in the backbone's own parameterization (DMD Eq. 6)."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Pseudo-Huber distance per sample, ``sqrt(||x - y||^2 + c^2) - c``, averaged over the batch.

    ``c`` defaults to ``0.00054 * sqrt(d)`` with ``d`` the number of elements per sample (iCT Sec. 3.3).
    """
    d = x[0].numel()
    c = 0.00054 * d**0.5 if c is None else c
    sq = (x.float() - y.float()).pow(2).flatten(1).sum(dim=1)
    return (torch.sqrt(sq + c * c) - c).mean()


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "pseudo_huber") -> torch.Tensor:
    """DMD's regression loss (Eq. 9) on (noise -> teacher output) pairs.

    The paper uses LPIPS on decoded images; LPIPS needs downloaded VGG weights, so this works in
    latent space: ``pseudo_huber`` (robust, as in iCT) or ``l2`` (mean squared error).
    """
    if kind == "pseudo_huber":
        return pseudo_huber(pred, target)
    if kind == "l2":
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    raise ValueError(f"regression loss {kind!r} is not known; choose one of: pseudo_huber, l2")


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``E[softplus(-D(fake))] = -E[log sigmoid(D(fake))]`` (DMD2 Eq. 6)."""
    return F.softplus(-fake_logits.float()).mean()


def gan_critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss ``E[softplus(-D(real))] + E[softplus(D(fake))]`` (DMD2 Eq. 6, the classifier side)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator, ``E[relu(1 - D(real))] + E[relu(1 + D(fake))]`` (ADD Sec. 3.2 and
    LADD Sec. 3 use the hinge loss; Lim & Ye 2017). Logits of several heads are averaged over all entries."""
    return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN, ``-E[D(fake)]`` (ADD Sec. 3.2)."""
    return -fake_logits.float().mean()


def approximate_r1(logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """Approximated R1 of APT (Lin et al. 2025, "Diffusion Adversarial Post-Training", arXiv 2501.08316):
    ``E[(D(x) - D(x + sigma * n))^2]`` over real inputs, a finite-difference stand-in for the gradient
    penalty ``||grad_x D(x)||^2`` that needs no second-order backward through the backbone."""
    return (logits.float() - perturbed_logits.float()).pow(2).mean()


def r1_penalty(logits: torch.Tensor, inputs: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """Exact R1 (Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?", without the
    gamma/2 factor): ``E[||grad_x D(x)||^2]`` over real inputs ``x``, which must require grad. ``logits`` are
    the per-sample D(x) of the first ``num_rows`` rows of ``inputs`` (default: all); the graph is kept so
    the penalty itself back-propagates to the discriminator."""
    (grad,) = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
    rows = len(logits) if num_rows is None else num_rows
    return grad[:rows].float().flatten(1).pow(2).sum(dim=1).mean()
