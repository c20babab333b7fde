"""Teachers, denoisers, noise schedules, heads and tiny test pipelines.

The API the rest of stepdistill builds on::

    teacher = load_teacher("tiny:sdxl")                 # or a Hub id / local pipeline folder
    cond = teacher.encode_prompt(["a red circle"])
    uncond = teacher.encode_negative(len(cond))
    x_t = teacher.schedule.add_noise(x0, noise, t)
    x0_hat = teacher.denoiser()(x_t, t, cond, uncond=uncond, guidance_scale=5.0, output="x0")
"""

from stepdistill.families import FAMILIES
from stepdistill.models.denoiser import Conditioning, Denoiser, unwrap_model
from stepdistill.models.heads import GANHead
from stepdistill.models.loading import (
    Teacher,
    check_pretrained,
    detect_family,
    frozen_teacher,
    load_teacher,
    read_model_index,
    resolve_pretrained,
)
from stepdistill.models.schedules import FlowSchedule, NoiseSchedule, VPSchedule
from stepdistill.models.tiny import TINY_RESOLUTION, build_tiny_pipeline

__all__ = [
    "FAMILIES",
    "TINY_RESOLUTION",
    "Conditioning",
    "Denoiser",
    "FlowSchedule",
    "GANHead",
    "NoiseSchedule",
    "Teacher",
    "VPSchedule",
    "build_tiny_pipeline",
    "check_pretrained",
    "detect_family",
    "frozen_teacher",
    "load_teacher",
    "read_model_index",
    "resolve_pretrained",
    "unwrap_model",
]
