"""LoRA files for the tools people load them in: kohya (sd-scripts, A1111, Forge) and ComfyUI.

The diffusers file (``pytorch_lora_weights.safetensors``, ``export.pipeline.export_lora``) stays the
reference; these are written beside it from the same adapter weights:

- ``kohya`` (UNet families): ``lora_unet_<module path>.lora_down.weight`` / ``.lora_up.weight`` and one
  ``.alpha`` per layer, the names diffusers' ``convert_state_dict_to_kohya`` gives. That converter writes
  alpha = rank (a scale of 1); the adapter's own ``lora_alpha`` is written instead, or a rank-64 alpha-8
  adapter would load 8 times too strong.
- ``comfyui``: the kohya file for UNet families (ComfyUI reads ``lora_unet_`` keys); for transformer
  families (SD3, FLUX.1) the diffusers key names under ``transformer.`` with ``lora_A`` / ``lora_B``, which
  ComfyUI reads as diffusers LoRAs, with the scale alpha / rank folded into ``lora_B`` so that a loader
  that assumes alpha = rank applies it exactly.

Every file carries its provenance in the safetensors header: ``ss_network_dim`` / ``ss_network_alpha``
(what A1111-style tools display) and ``stepdistill.*``: base model, method, steps, timesteps, scheduler,
guidance scale and shift, so a file found alone says how to sample it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stepdistill.families import UNET_FAMILIES

FORMATS = ("diffusers", "kohya", "comfyui")

# kohya's ss_base_model_version values, for the tools that sort LoRAs by base
_BASE_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}


def check_format(fmt: str, family: str, lora_student: bool = True) -> None:
    """A clear error before any work for a format the family has no file for, or a student that is no LoRA."""
    if fmt == "diffusers":
        return
    if not lora_student:
        raise ValueError(f"--format={fmt}: the student is full weights, not a LoRA; LoRA files exist for LoRA "
                         "students (roles.generator.lora_rank > 0)")
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "kohya" and family not in UNET_FAMILIES:
        raise ValueError(f"--format=kohya: kohya LoRA names exist for UNet models ({', '.join(UNET_FAMILIES)}), "
                         f"not for {family}; use --format comfyui (diffusers names, which ComfyUI reads) "
                         "or --format diffusers")


def kohya_state_dict(weights: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A UNet adapter's peft-named weights (``lora_state_dict``) in kohya's names, with its real alpha."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    converted = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in weights.items()})
    return {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous())
            for k, v in converted.items()}


def comfyui_transformer_state_dict(weights: dict[str, torch.Tensor], rank: int,
                                   alpha: float) -> dict[str, torch.Tensor]:
    """A transformer adapter under diffusers names, the alpha / rank scale folded into ``lora_B``."""
    scale = float(alpha) / float(rank)
    return {f"transformer.{k}": (v * scale if ".lora_B." in k else v).contiguous() for k, v in weights.items()}


def header(info: dict, fmt: str, rank: int, alpha: float) -> dict[str, str]:
    """The safetensors metadata of a LoRA file (strings only, as the format requires)."""
    family = info.get("family", "")
    meta = {
        "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_base_model_version": _BASE_VERSION.get(family, family),
        "stepdistill.format": fmt,
        "stepdistill.base_model": str(info.get("teacher", "")),
        "stepdistill.family": family,
        "stepdistill.method": str(info.get("method", "")),
        "stepdistill.num_inference_steps": str(info.get("num_inference_steps", "")),
        "stepdistill.timesteps": json.dumps(info.get("timesteps")),
        "stepdistill.scheduler": str(info.get("scheduler", "")),
        "stepdistill.guidance_scale": str(info.get("guidance_scale", "")),
    }
    shift = (info.get("scheduler_config") or {}).get("shift")
    if shift is not None:
        meta["stepdistill.shift"] = str(shift)
    return meta


def write_lora_file(path: Path, fmt: str, weights: dict[str, torch.Tensor], rank: int, alpha: float,
                    info: dict) -> Path:
    """Write the ``fmt`` (kohya / comfyui) file at ``path`` from the adapter's peft-named weights."""
    from safetensors.torch import save_file

    family = info["family"]
    check_format(fmt, family)
    if fmt == "kohya" or family in UNET_FAMILIES:
        tensors = kohya_state_dict(weights, alpha)
    else:
        tensors = comfyui_transformer_state_dict(weights, rank, alpha)
    path = Path(path)
    save_file(tensors, str(path), metadata=header(info, fmt, rank, alpha))
    return path
