"""Score matching within a subinterval (Phased DMD, arXiv 2510.27684, its "score matching within
subintervals", Sec. 2.2.2, Eq. 11-13 of its v3): the diffusion kernel from a *noisy* level s to a
noisier level t, and the denoising target of a fake score trained on samples that are themselves noisy at level s.

All functions take the schedule coefficients of the forward process ``x_t = alpha_t x0 + sigma_t eps``
(VP: alpha^2 + sigma^2 = 1; rectified flow: alpha = 1 - sigma) as tensors broadcastable to the samples,
so they are pure tensor maths, tested against hand computations (tests/test_phased_dmd.py). A clean
level is ``alpha_s = 1, sigma_s = 0``: then every function reduces to ordinary DMD / denoising.

Derivation (derived here; the paper states the subinterval objective for its flow teachers, the forms
below are written for any Gaussian schedule):

1. Kernel. For a Gaussian forward process, ``x_t | x_s ~ N(r x_s, c^2 I)`` with
   ``r = alpha_t / alpha_s`` and ``c^2 = sigma_t^2 - r^2 sigma_s^2`` (>= 0 whenever the SNR at t is at most
   the SNR at s). Composition check: from x0, ``x_s = alpha_s x0 + sigma_s e1`` and
   ``x_t = r x_s + c e2`` has mean ``alpha_t x0`` and variance ``r^2 sigma_s^2 + c^2 = sigma_t^2``: the
   marginal from 0 to t.
2. Critic target. The score of ``p_t(x_t) = ∫ p(x_t | x_s) p_s(x_s) dx_s`` is
   ``E[∇ log p(x_t | x_s) | x_t] = E[-(x_t - r x_s) / c^2 | x_t] = E[-e / c | x_t]`` (``x_t = r x_s + c e``),
   so denoising score matching with ``x_s`` in place of x0 regresses onto ``-e / c``. A denoiser's x0
   prediction relates to the score by Tweedie, ``x0_hat = (x_t + sigma_t^2 ∇ log p_t) / alpha_t``; the
   x0 target is therefore ``(x_t - sigma_t^2 e / c) / alpha_t``, and the targets of the other
   parameterisations follow from it with the usual affine maps at level t (eps = (x_t - alpha_t x0)/sigma_t:
   ``sigma_t e / c``). At a clean s (c = sigma_t) this is the ordinary target x0 / e.
   Treating the noisy ``x_s`` as if it were clean data (target x_s) would instead learn the score of
   ``N(alpha_t x_s, sigma_t^2)``-diffused x_s, i.e. of a distribution noised twice: biased.
3. Weight. The target's conditional variance grows like ``1 / c^2`` as t -> s. Weighting the squared
   error by ``lambda = c^2 / sigma_t^2 = 1 - SNR(t) / SNR(s)`` (the natural DSM weight of the kernel's
   own noise, relative to the usual per-t weighting) gives every t the same target variance as ordinary
   denoising at that t, and does not change the minimiser at any t (a per-t weight never does).
"""

from __future__ import annotations

from torch import Tensor


def kernel_coefficients(alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> tuple[Tensor, Tensor]:
    """``(r, c)`` of the transition ``x_t = r x_s + c e`` from level s to the noisier level t."""
    r = alpha_t / alpha_s
    c2 = sigma_t**2 - (r * sigma_s) ** 2
    return r, c2.clamp_min(0).sqrt()


def subinterval_diffuse(x_s: Tensor, noise: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor,
                        sigma_t: Tensor) -> Tensor:
    """Diffuse a sample at level s to level t (item 1 above), in float32."""
    r, c = kernel_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
    return r * x_s.float() + c * noise.float()


def subinterval_x0_target(x_t: Tensor, noise: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor,
                          sigma_t: Tensor) -> Tensor:
    """The x0 regression target at ``x_t = r x_s + c * noise`` whose conditional mean is ``E[x0 | x_t]``
    under the diffused distribution of x_s (item 2 above)."""
    _, c = kernel_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
    return (x_t.float() - sigma_t**2 * noise.float() / c.clamp_min(1e-12)) / alpha_t


def subinterval_weight(alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """``c^2 / sigma_t^2 = 1 - SNR(t) / SNR(s)``: 1 at a clean s, -> 0 as t -> s (item 3 above)."""
    _, c = kernel_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
    return (c / sigma_t) ** 2


def weighted_denoising_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Mean over samples of ``weight * mean_elements (pred - target)^2`` (``weight``: one per sample)."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (weight.reshape(-1).float() * per_sample).mean()


__all__ = ["kernel_coefficients", "subinterval_diffuse", "subinterval_x0_target", "subinterval_weight",
           "weighted_denoising_loss"]
