"""Loss maths as pure tensor functions (no modules, no optimizers), each tested against hand values."""

from stepdistill.losses.core import (
    denoising_loss,
    dmd_gradient,
    dmd_loss,
    gan_critic_loss,
    gan_generator_loss,
    pseudo_huber,
    regression_loss,
)
from stepdistill.losses.score import sid_generator_loss, vsd_gradient, vsd_loss

__all__ = [
    "denoising_loss",
    "dmd_gradient",
    "dmd_loss",
    "gan_critic_loss",
    "gan_generator_loss",
    "pseudo_huber",
    "regression_loss",
    "sid_generator_loss",
    "vsd_gradient",
    "vsd_loss",
]
