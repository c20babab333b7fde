"""Generation for evaluations: seeded images from any pipeline, and labelled comparison grids.

Every image is fixed by its seed alone: its noise comes from a CPU generator seeded per image, and the
re-noising steps of few-step flow students draw from it too (``sampling.schedulers.seeded_steps``; the SD3
and FLUX pipelines would draw them from torch's global RNG).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["Entry", "generate", "generate_images", "labelled_grid", "noise_seed"]


def noise_seed(seed: int, prompt_index: int) -> int:
    """The generator seed of image (prompt ``prompt_index``, seed ``seed``) in ``stepdistill eval``."""
    return seed * 1_000_000 + prompt_index


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], steps: int | None = None,
                    guidance: float | None = None, resolution: int | None = None, batch_size: int = 16,
                    timesteps: list | None = None, progress: bool = False, desc: str = "generating",
                    leave: bool = True) -> tuple[torch.Tensor, float]:
    """Images [N, 3, H, W] in [0, 1] (float32, CPU) for ``prompts[i]`` with a CPU generator seeded by
    ``seeds[i]``, and seconds per image (CUDA-synchronised). None settings use the pipeline's defaults."""
    from tqdm.auto import tqdm

    from stepdistill.sampling.schedulers import seeded_steps

    if len(prompts) != len(seeds):
        raise ValueError(f"generate_images: {len(prompts)} prompts but {len(seeds)} seeds")
    kwargs: dict = {"output_type": "pt"}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if resolution is not None:
        kwargs["height"] = kwargs["width"] = resolution
    if timesteps:
        kwargs["timesteps"] = timesteps
    images, elapsed = [], 0.0
    device = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", torch.device("cpu"))
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch", leave=leave):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        _sync(device)
        t0 = time.perf_counter()
        with seeded_steps(pipe, generators):  # flow pipelines' re-noising steps too (sampling/schedulers.py)
            out = pipe(list(prompts[chunk]), generator=generators, **kwargs)
        _sync(device)
        elapsed += time.perf_counter() - t0
        images.append(out.images.float().cpu())
    if not images:
        return torch.zeros(0, 3, resolution or 1, resolution or 1), 0.0
    return torch.cat(images), elapsed / len(prompts)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Entry:
    """One row of a comparison: a pipeline (or any callable taking a pipeline's arguments) sampled at a
    number of steps and a guidance scale."""

    name: str
    pipe: object
    steps: int
    guidance: float
    timesteps: list | None = None


def generate(entry: Entry, prompts: list[str], seeds: list[int], resolution: int, batch_size: int = 64,
             progress: bool = True) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] for every (prompt, seed) pair, prompt-major (seed ``s`` for every prompt, its
    generator seeded with ``s``); and seconds per image."""
    pairs = [(p, s) for p in prompts for s in seeds]
    images, seconds = generate_images(entry.pipe, [p for p, _ in pairs], [s for _, s in pairs], entry.steps,
                                      entry.guidance, resolution, batch_size, entry.timesteps, progress=progress,
                                      desc=f"eval: {entry.name}", leave=False)
    return images * 2 - 1, seconds


def _strip(images: torch.Tensor) -> Image.Image:
    """[N, 3, H, W] images in [-1, 1] side by side."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return Image.fromarray(np.ascontiguousarray(torch.cat(list(pixels), dim=-1).permute(1, 2, 0).numpy()))


def labelled_grid(rows: list[tuple[str, torch.Tensor]], scale: int = 3, max_size: int = 256,
                  label_width: int = 150) -> Image.Image:
    """One row of images ([N, 3, H, W] in [-1, 1]) per entry, its name written on the left. Small images
    are enlarged ``scale`` times (nearest), large ones shrunk to ``max_size``."""
    strips = [_strip(images) for _, images in rows]
    side = rows[0][1].shape[-1]
    factor = scale if side * scale <= max_size else max_size / side
    w = int(max(g.width for g in strips) * factor)
    h = int(strips[0].height * factor)
    canvas = Image.new("RGB", (label_width + w, h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    resample = Image.NEAREST if factor >= 1 else Image.BICUBIC
    for i, ((name, _), strip) in enumerate(zip(rows, strips)):
        canvas.paste(strip.resize((int(strip.width * factor), h), resample), (label_width, i * h))
        draw.text((6, i * h + h // 2 - 6), name, fill=(0, 0, 0))
    return canvas
