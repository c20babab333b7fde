"""(noise → teacher ODE output) pairs: DMD's regression data, and teacher samples for GAN terms.

``stepdistill cache-pairs`` runs the teacher's own pipeline (its default deterministic scheduler)
from stored noise with classifier-free guidance and saves, in one folder:
``pairs.safetensors`` (``noise`` and ``latents``, both [N, C, h, w]), ``prompts.json`` and ``meta.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm


@dataclass
class Pairs:
    noise: torch.Tensor
    latents: torch.Tensor
    prompts: list[str]
    meta: dict

    def __len__(self) -> int:
        return len(self.prompts)

    def indices(self, step: int, batch_size: int) -> list[int]:
        """Deterministic, resumable choice of pairs for ``step`` (different on every process)."""
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        start = (step * world + rank) * batch_size
        return [(start + i) % len(self) for i in range(batch_size)]

    def batch(self, step: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        idx = self.indices(step, batch_size)
        return self.noise[idx].to(device), self.latents[idx].to(device), [self.prompts[i] for i in idx]


def load_pairs(path: str | Path, expect_shape: tuple[int, ...] | None = None) -> Pairs:
    folder = Path(path)
    file = folder / "pairs.safetensors"
    if not file.is_file() or not (folder / "prompts.json").is_file():
        raise ValueError(
            f"{folder} holds no teacher pairs (pairs.safetensors + prompts.json); "
            "make them with `stepdistill cache-pairs --config <config> --out <dir> --num N`"
        )
    tensors = load_file(str(file))
    prompts = json.loads((folder / "prompts.json").read_text())
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    pairs = Pairs(tensors["noise"], tensors["latents"], prompts, meta)
    if len(pairs.noise) != len(prompts) or pairs.noise.shape != pairs.latents.shape:
        raise ValueError(f"{file}: noise {tuple(pairs.noise.shape)}, latents {tuple(pairs.latents.shape)} and "
                         f"{len(prompts)} prompts do not match")
    if expect_shape is not None and tuple(pairs.latents.shape[1:]) != tuple(expect_shape):
        raise ValueError(
            f"{file}: latents of shape {tuple(pairs.latents.shape[1:])} but this run needs {tuple(expect_shape)} "
            "(model.resolution differs from the one the pairs were made at); re-run cache-pairs"
        )
    return pairs


@torch.no_grad()
def cache_pairs(cfg, out: str | Path, num: int, steps: int = 50, batch_size: int = 4,
                guidance_scale: float | None = None) -> Path:
    """Generate ``num`` teacher pairs for the run described by ``cfg`` (teacher, prompts, resolution)."""
    from stepdistill.data.prompts import load_prompts
    from stepdistill.models import load_teacher

    if num < 1:
        raise ValueError(f"--num={num} must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = load_teacher(cfg.model.pretrained, family=cfg.model.family, device=device, dtype=dtype,
                           resolution=cfg.model.resolution)
    if teacher.family == "flux":
        # FluxPipeline packs latents into 2x2 patches; pairs are stored unpacked. Not wired up yet.
        raise ValueError("cache-pairs does not support FLUX teachers yet (packed latents); use an SD-family teacher")
    prompts = load_prompts(cfg.data.prompts, cfg.data.caption_column)
    scale = cfg.method.real_guidance_scale if guidance_scale is None else guidance_scale
    res = cfg.model.resolution
    shape = teacher.latent_shape(res)
    gen = torch.Generator("cpu").manual_seed(cfg.run.seed)
    all_noise, all_latents, all_prompts = [], [], []
    for start in tqdm(range(0, num, batch_size), desc="teacher pairs"):
        chunk = [prompts[i % len(prompts)] for i in range(start, min(num, start + batch_size))]
        noise = torch.randn((len(chunk), *shape), generator=gen)
        kwargs = {"guidance_scale": scale} if scale is not None else {}
        latents = teacher.pipeline(
            prompt=chunk, latents=noise.to(device, dtype), num_inference_steps=steps, height=res, width=res,
            output_type="latent", **kwargs,
        ).images
        all_noise.append(noise)
        all_latents.append(latents.float().cpu())
        all_prompts += chunk
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"noise": torch.cat(all_noise).contiguous(), "latents": torch.cat(all_latents).contiguous()},
              str(folder / "pairs.safetensors"))
    (folder / "prompts.json").write_text(json.dumps(all_prompts, indent=1))
    meta = {"teacher": cfg.model.pretrained, "family": teacher.family, "steps": steps, "guidance_scale": scale,
            "resolution": res, "seed": cfg.run.seed, "scheduler": type(teacher.pipeline.scheduler).__name__}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return folder
