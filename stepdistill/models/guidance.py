"""Guidance-scale conditioning of UNet students ("w-conditioning").

A guidance-distilled (Meng et al. 2023) or LCM student takes the classifier-free guidance scale ``w``
as an input instead of running the backbone twice. diffusers' UNet2DConditionModel has the input
built in: with ``time_cond_proj_dim`` set, ``time_embedding.cond_proj`` adds a projection of a
sinusoidal embedding of ``w - 1`` to the timestep embedding, and StableDiffusion(XL)Pipeline /
LatentConsistencyModelPipeline then feed ``guidance_scale`` through it and skip the doubled CFG batch.

``add_guidance_embedding`` gives an existing (teacher-initialised) UNet that input, zero-initialised so
that the student starts exactly as the teacher; the config records ``time_cond_proj_dim`` so
``save_pretrained`` / ``from_pretrained`` round-trip it.
"""

from __future__ import annotations

import torch
from torch import nn


def guidance_embedding_dim(backbone: nn.Module) -> int | None:
    """``time_cond_proj_dim`` of a UNet (None for UNets without the input and for transformers)."""
    config = getattr(backbone, "config", None)
    return getattr(config, "time_cond_proj_dim", None) if config is not None else None


def add_guidance_embedding(unet: nn.Module, dim: int = 256) -> nn.Module:
    """Give ``unet`` (in place) a zero-initialised guidance-scale input of width ``dim``; returns it."""
    if not hasattr(unet, "time_embedding") or not hasattr(unet.time_embedding, "linear_1"):
        raise ValueError(
            f"{type(unet).__name__} has no UNet timestep embedding: guidance-scale conditioning "
            "(roles.*.guidance_embedding_dim) needs a UNet teacher (SD 1.x/2.x, SDXL)"
        )
    if guidance_embedding_dim(unet) is not None:
        raise ValueError(f"the UNet already takes a guidance embedding (time_cond_proj_dim="
                         f"{guidance_embedding_dim(unet)})")
    linear = unet.time_embedding.linear_1
    proj = nn.Linear(dim, linear.in_features, bias=False, device=linear.weight.device, dtype=linear.weight.dtype)
    nn.init.zeros_(proj.weight)
    unet.time_embedding.cond_proj = proj
    unet.register_to_config(time_cond_proj_dim=dim)
    return unet


def guidance_scale_embedding(w: torch.Tensor, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ``timestep_cond`` diffusers' pipelines compute for guidance scale ``w`` [B]: the sinusoidal
    embedding of ``w - 1`` (the pipelines' own function, so training matches sampling exactly)."""
    from diffusers import StableDiffusionPipeline

    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1).cpu()
    # get_guidance_scale_embedding does not use the pipeline instance.
    emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=dim)
    return emb.to(device=device, dtype=dtype)
