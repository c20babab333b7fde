"""Loss maths as pure tensor functions (no modules, no optimizers), each tested against hand values."""

from stepdistill.losses.core import (
    approximate_r1,
    denoising_loss,
    dmd_gradient,
    dmd_loss,
    gan_critic_loss,
    gan_generator_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    pseudo_huber,
    r1_penalty,
    regression_loss,
)
from stepdistill.losses.score import sid_generator_loss, vsd_gradient, vsd_loss

__all__ = [
    "approximate_r1",
    "denoising_loss",
    "dmd_gradient",
    "dmd_loss",
    "gan_critic_loss",
    "gan_generator_loss",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "pseudo_huber",
    "r1_penalty",
    "regression_loss",
    "sid_generator_loss",
    "vsd_gradient",
    "vsd_loss",
]
