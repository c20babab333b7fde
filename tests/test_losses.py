"""Loss maths against values computed by hand."""

import math

import pytest
import torch

from stepdistill.losses import (
    denoising_loss,
    dmd_gradient,
    dmd_loss,
    gan_critic_loss,
    gan_generator_loss,
    pseudo_huber,
    regression_loss,
)


def test_dmd_gradient_hand_values():
    x = torch.tensor([[1.0, 3.0]])
    real = torch.tensor([[0.0, 1.0]])
    fake = torch.tensor([[2.0, 2.0]])
    # weight = 1 / mean(|x - real|) = 1 / 1.5; direction = fake - real = [2, 1]
    grad = dmd_gradient(x, real, fake)
    assert torch.allclose(grad, torch.tensor([[2 / 1.5, 1 / 1.5]]))


def test_dmd_gradient_is_per_sample_normalised():
    x = torch.zeros(2, 1, 2, 2)
    real = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 4.0)])
    fake = real + 2.0
    grad = dmd_gradient(x, real, fake)
    assert torch.allclose(grad[0], torch.full((1, 2, 2), 2.0))  # 2 / 1
    assert torch.allclose(grad[1], torch.full((1, 2, 2), 0.5))  # 2 / 4


def test_dmd_loss_gradient_equals_dmd_direction():
    x = torch.tensor([[1.0, 3.0]], requires_grad=True)
    real = torch.tensor([[0.0, 1.0]])
    fake = torch.tensor([[2.0, 2.0]])
    loss, grad = dmd_loss(x, real, fake)
    loss.backward()
    # d/dx 0.5 * mean((x - (x - g))^2) = g / N with N = 2 elements
    assert torch.allclose(x.grad, grad / 2)
    assert loss.item() == pytest.approx(0.5 * ((2 / 1.5) ** 2 + (1 / 1.5) ** 2) / 2)


def test_dmd_loss_zero_when_scores_agree():
    x = torch.randn(3, 4, requires_grad=True)
    real = torch.randn(3, 4)
    loss, grad = dmd_loss(x, real, real.clone())
    assert loss.item() == 0.0 and grad.abs().max().item() == 0.0


def test_pseudo_huber_hand_value():
    x = torch.tensor([[3.0, 4.0]])
    assert pseudo_huber(x, torch.zeros_like(x), c=1.0).item() == pytest.approx(math.sqrt(26) - 1)
    # default c = 0.00054 * sqrt(d)
    c = 0.00054 * math.sqrt(2)
    assert pseudo_huber(x, torch.zeros_like(x)).item() == pytest.approx(math.sqrt(25 + c * c) - c)


def test_regression_loss_kinds():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert regression_loss(a, b, "l2").item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="pseudo_huber, l2"):
        regression_loss(a, b, "lpips")


def test_gan_losses_hand_values():
    zero = torch.zeros(4)
    assert gan_generator_loss(zero).item() == pytest.approx(math.log(2))
    assert gan_critic_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    # A confident, correct critic has near-zero loss; the generator's loss is then large.
    assert gan_critic_loss(torch.full((2,), 20.0), torch.full((2,), -20.0)).item() < 1e-8
    assert gan_generator_loss(torch.full((2,), -20.0)).item() == pytest.approx(20.0, rel=1e-6)


def test_denoising_loss_is_mse():
    assert denoising_loss(torch.ones(2, 2), torch.zeros(2, 2)).item() == 1.0
