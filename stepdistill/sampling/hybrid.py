"""Hybrid sampling: the teacher for the first ``k`` steps, then the distilled student.

Gandikota & Bau, *Distilling Diversity and Control in Diffusion Models* (arXiv 2503.10637), call it
"diversity distillation": distilled models commit to the final image structure at the very first
timestep and lose sample diversity there; running the *base* model for that first step (or first
few) and the distilled model for the rest restores the base model's diversity at almost the
distilled model's cost.

``HybridSampler(teacher_pipe, student_pipe, teacher_steps=k)`` works on two diffusers pipelines of the
same family that share the latent space (the student of an export is the teacher's pipeline with
its backbone swapped). One timestep schedule of ``num_inference_steps`` steps — by default the
student's scheduler's, i.e. the schedule the student was trained for — is walked by one scheduler:

* steps ``0 .. k-1``: the teacher's backbone, with classifier-free guidance ``guidance_scale``;
* steps ``k .. N-1``: the student's backbone, with ``student_guidance_scale`` (default: none).

Every step is the scheduler's own ``step`` on the backbone's native prediction, so ``k = 0`` is
exactly ``student_pipe(prompt, num_inference_steps=N)`` and ``k = N`` is the teacher's pipeline run
with that scheduler. Text conditioning is encoded once when both pipelines hold the same text
encoders (the bench shares them), else by each pipeline; images are decoded by the student's VAE
(``pipe.vae``, so a tiny VAE swapped in is used). The call mirrors a pipeline's: ``sampler(prompts,
num_inference_steps=4, guidance_scale=..., generator=..., output_type="pt").images``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import numpy as np
import torch

_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


@dataclass
class HybridOutput:
    """What a diffusers pipeline returns: ``images`` as asked by ``output_type``."""

    images: object


def _family(pipe) -> str:
    from stepdistill.models.loading import detect_family

    return detect_family({"_class_name": type(pipe).__name__}, dict(pipe.scheduler.config))


def _shares_text_encoders(a, b) -> bool:
    return all(getattr(a, name, None) is getattr(b, name, None) for name in _TEXT_COMPONENTS)


class HybridSampler:
    """Teacher for the first ``teacher_steps`` steps, then the student (diversity distillation).

    Args:
        teacher: the base model's diffusers pipeline.
        student: the distilled model's pipeline (same family and latent space as ``teacher``).
        teacher_steps: ``k``, the number of leading steps the teacher takes (0 .. num_inference_steps).
        scheduler: the scheduler that walks the whole trajectory (default: a copy of the student's).
        student_guidance_scale: CFG of the student's steps (default 1.0: none; distilled models
            carry guidance in their weights).
    """

    def __init__(self, teacher, student, teacher_steps: int = 1, scheduler=None,
                 student_guidance_scale: float = 1.0):
        from stepdistill.models.loading import Teacher

        if teacher_steps < 0:
            raise ValueError(f"teacher_steps={teacher_steps} must be >= 0")
        family, student_family = _family(teacher), _family(student)
        if family != student_family:
            raise ValueError(f"HybridSampler needs two pipelines of one family; the teacher is {family!r} "
                             f"({type(teacher).__name__}) and the student {student_family!r} "
                             f"({type(student).__name__})")
        t_latent = int(teacher.vae.config.latent_channels) if hasattr(teacher.vae.config, "latent_channels") else None
        s_latent = int(student.vae.config.latent_channels) if hasattr(student.vae.config, "latent_channels") else None
        if t_latent != s_latent:
            raise ValueError(f"teacher and student latents differ ({t_latent} vs {s_latent} channels); "
                             "a hybrid needs one latent space (the student of an export shares the teacher's VAE)")
        self.teacher_pipe, self.student_pipe = teacher, student
        self.family = family
        self.teacher_steps = int(teacher_steps)
        self.student_guidance_scale = float(student_guidance_scale)
        self.scheduler = copy.deepcopy(scheduler if scheduler is not None else student.scheduler)
        self._teacher = Teacher(teacher, family)
        self._student = Teacher(student, family)
        self.shared_text = _shares_text_encoders(teacher, student)

    # The bench and ``eval.generate.generate`` treat the sampler as a pipeline.
    @property
    def device(self) -> torch.device:
        return self._student.device

    def set_progress_bar_config(self, **kwargs) -> None:
        for pipe in (self.teacher_pipe, self.student_pipe):
            pipe.set_progress_bar_config(**kwargs)

    def _set_timesteps(self, scheduler, num_steps: int, timesteps, resolution: int, device) -> list:
        """The timesteps the student's own pipeline would run, as its ``__call__`` sets them."""
        kwargs = {}
        if self.family == "flux":
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            cfg = scheduler.config
            kwargs["mu"] = calculate_shift(self._student.image_seq_len(resolution), cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.15))
            if timesteps is None:
                kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        elif self.family == "sd3" and scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            cfg = scheduler.config
            kwargs["mu"] = calculate_shift(self._student.image_seq_len(resolution), cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.16))
        if timesteps is not None:
            if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
                raise ValueError(f"{type(scheduler).__name__} does not accept custom timesteps")
            scheduler.set_timesteps(timesteps=list(timesteps), device=device, **kwargs)
        elif "sigmas" in kwargs:
            scheduler.set_timesteps(sigmas=kwargs.pop("sigmas"), device=device, **kwargs)
        else:
            scheduler.set_timesteps(num_steps, device=device, **kwargs)
        return list(scheduler.timesteps)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 4, guidance_scale: float = 1.0, height: int | None = None,
                 width: int | None = None, generator=None, output_type: str = "pil", timesteps=None,
                 negative_prompt: str = "", student_guidance_scale: float | None = None,
                 latents: torch.Tensor | None = None) -> HybridOutput:
        """Sample ``prompt`` (a string or list) with ``teacher_steps`` teacher steps then student steps.

        ``guidance_scale`` is the teacher's CFG; ``timesteps`` overrides the scheduler's spacing (as the
        pipelines' argument of that name); ``latents`` replaces the initial noise.
        """
        from diffusers.utils.torch_utils import randn_tensor

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("HybridSampler: no prompts")
        steps = len(timesteps) if timesteps is not None else int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps={steps} must be >= 1")
        if self.teacher_steps > steps:
            raise ValueError(f"teacher_steps={self.teacher_steps} is more than the {steps} steps of the schedule")
        if output_type not in ("pil", "pt", "np", "latent"):
            raise ValueError(f"output_type={output_type!r}; choose pil, pt, np or latent")
        if height is not None and width is not None and height != width:
            raise ValueError("HybridSampler samples square images: give height == width")
        resolution = int(height or width or self._student.default_resolution)
        s_guidance = self.student_guidance_scale if student_guidance_scale is None else float(student_guidance_scale)
        batch, device = len(prompts), self._student.device

        teacher_cond = self._teacher.encode_prompt(prompts, resolution) if self.teacher_steps else None
        student_cond = None
        if self.teacher_steps < steps:
            student_cond = teacher_cond if (self.shared_text and teacher_cond is not None) else \
                self._student.encode_prompt(prompts, resolution)
        teacher_uncond = (self._teacher.encode_negative(batch, negative_prompt, resolution)
                          if self.teacher_steps and guidance_scale > 1 else None)
        student_uncond = (self._student.encode_negative(batch, negative_prompt, resolution)
                          if self.teacher_steps < steps and s_guidance > 1 else None)

        scheduler = copy.deepcopy(self.scheduler)
        schedule = self._set_timesteps(scheduler, steps, timesteps, resolution, device)
        shape = (batch, *self._student.latent_shape(resolution))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers have none
        else:
            latents = latents.to(device=device, dtype=torch.float32)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}

        teacher_denoiser = self._teacher.denoiser()
        student_denoiser = self._student.denoiser()
        for i, t in enumerate(schedule):
            if i < self.teacher_steps:
                denoiser, cond, uncond, scale = teacher_denoiser, teacher_cond, teacher_uncond, guidance_scale
            else:
                denoiser, cond, uncond, scale = student_denoiser, student_cond, student_uncond, s_guidance
            scale_input = getattr(scheduler, "scale_model_input", None)  # flow schedulers have none
            model_input = scale_input(latents, t) if scale_input is not None else latents
            # CFG only above 1, as the pipelines do (``do_classifier_free_guidance``).
            pred = denoiser(model_input, t, cond, uncond=uncond if scale > 1 else None,
                            guidance_scale=float(scale), output=denoiser.prediction_type)
            latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]

        if output_type == "latent":
            return HybridOutput(latents)
        images = self._student.decode(latents)  # [-1, 1]
        return HybridOutput(self.student_pipe.image_processor.postprocess(images, output_type=output_type))

    def __repr__(self) -> str:
        return (f"HybridSampler(teacher={type(self.teacher_pipe).__name__}, student={type(self.student_pipe).__name__}, "
                f"teacher_steps={self.teacher_steps}, scheduler={type(self.scheduler).__name__})")
