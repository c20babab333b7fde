"""Real data for GAN terms: an image folder with captions, or a folder of cached teacher samples.

``data.images`` may point to
- a folder written by ``stepdistill cache-pairs`` (teacher samples as latents + prompts), or
- a folder of images with a ``metadata.jsonl`` (``{"file_name": ..., "caption"|"text": ...}`` per line,
  the Hugging Face ``imagefolder`` convention); images are resized and centre-cropped to the model
  resolution and encoded with the teacher's VAE on the fly, or
- ``builtin:toy``: procedural images of the toy domain's training combinations, drawn on the fly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stepdistill.data.pairs import load_pairs


def _load_image(path: Path, resolution: int) -> torch.Tensor:
    try:
        image = Image.open(path).convert("RGB")
    except Exception as err:  # PIL raises several types for unreadable files
        raise ValueError(f"cannot read image {path}: {err}") from err
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class RealLatents:
    """Deterministic, resumable batches of real (or teacher-sample) latents with their conditioning."""

    def __init__(self, path: str, teacher, resolution: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.teacher, self.resolution, self.batch_size = teacher, resolution, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.toy = path == "builtin:toy"
        if self.toy:
            self.latents = self.files = None
            return
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"data.images={path!r} is not a folder")
        self.latents = None
        if (folder / "pairs.safetensors").is_file():
            pairs = load_pairs(folder, expect_shape=tuple(teacher.latent_shape(resolution)))
            self.latents, self.captions = pairs.latents, pairs.prompts
            self.files = None
        else:
            meta = folder / "metadata.jsonl"
            if not meta.is_file():
                raise ValueError(
                    f"data.images={path!r} has neither pairs.safetensors (from `stepdistill cache-pairs`) nor a "
                    "metadata.jsonl with one {\"file_name\": ..., \"caption\": ...} object per line"
                )
            rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
            if not rows:
                raise ValueError(f"{meta} is empty")
            self.files = [folder / r["file_name"] for r in rows]
            self.captions = [r.get("caption", r.get("text", "")) for r in rows]
            missing = [str(f) for f in self.files if not f.is_file()]
            if missing:
                raise ValueError(f"{meta} lists {len(missing)} missing images, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.captions)

    @torch.no_grad()
    def _toy_batch(self, index: int) -> dict:
        from stepdistill.toy.data import sample_batch

        # A different, reproducible draw for every (step, rank): resumed runs see the same images.
        seed = (self.seed * 1_000_003 + index * self.world_size + self.rank) % (2**31)
        images, attrs = sample_batch(self.batch_size, seed=seed, split="train")
        if images.shape[-1] != self.resolution:
            images = torch.nn.functional.interpolate(images, size=self.resolution, mode="bilinear")
        device = self.teacher.backbone.device
        captions = [a.caption for a in attrs]
        latents = self.teacher.encode_images(images.to(device)).float()
        return {"latents": latents, "cond": self.teacher.encode_prompt(captions), "prompts": captions}

    def _indices(self, index: int) -> list[int]:
        epoch_size = len(self)
        start = (index * self.world_size + self.rank) * self.batch_size
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(epoch_size, generator=gen).tolist()
        return [perm[(start + i) % epoch_size] for i in range(self.batch_size)]

    @torch.no_grad()
    def batch_for_step(self, index: int) -> dict:
        if self.toy:
            return self._toy_batch(index)
        idx = self._indices(index)
        device = self.teacher.backbone.device
        if self.latents is not None:
            latents = self.latents[idx].to(device)
        else:
            images = torch.stack([_load_image(self.files[i], self.resolution) for i in idx]).to(device)
            latents = self.teacher.encode_images(images).float()
        captions = [self.captions[i] for i in idx]
        return {"latents": latents, "cond": self.teacher.encode_prompt(captions), "prompts": captions}
