"""Real data for GAN terms: an image folder with captions, or a folder of cached teacher samples.

``data.images`` may point to
- a folder written by ``stepdistill cache-pairs`` (teacher samples as latents + prompts), or
- a folder of images with a ``metadata.jsonl`` (``{"file_name": ..., "caption"|"text": ...}`` per line,
  the Hugging Face ``imagefolder`` convention); images are resized and centre-cropped to the model
  resolution and encoded with the teacher's VAE on the fly, or
- ``builtin:toy``: procedural images of the toy domain's training combinations, drawn on the fly, or
- a streamed source (``data/sources.py``): a datasets ``save_to_disk`` folder, parquet, arrow or webdataset
  tar shards, read and decoded in ``data.num_workers`` DataLoader workers as the batches are drawn.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from stepdistill.data.pairs import load_pairs
from stepdistill.data.sources import ImageStream, open_source, to_pixels

logger = logging.getLogger("stepdistill")

SCAN_CACHE = ".stepdistill_scan.json"  # per image folder: {file: [size, mtime_ns, error or null]}


def read_metadata(folder: Path) -> tuple[list[Path], list[str]]:
    """``(files, captions)`` of an image folder's ``metadata.jsonl``; one clear error per bad line."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ValueError(
            f"data.images={str(folder)!r} has neither pairs.safetensors (from `stepdistill cache-pairs`) nor a "
            "metadata.jsonl with one {\"file_name\": ..., \"caption\": ...} object per line"
        )
    files, captions = [], []
    for number, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{meta} line {number} is not JSON ({e}); each line must be one object like "
                             '{"file_name": "0001.png", "caption": "a photo of a cat"}') from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(f"{meta} line {number} has no \"file_name\" string; each line must be one object like "
                             '{"file_name": "0001.png", "caption": "a photo of a cat"}')
        files.append(folder / row["file_name"])
        captions.append(str(row.get("caption", row.get("text", ""))))
    if not files:
        raise ValueError(f"{meta} is empty")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{meta} lists {len(missing)} missing images, e.g. {missing[0]}")
    return files, captions


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image (``None`` if it decodes): verify() checks the container,
    a full decode catches truncated pixel data that verify() lets through."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"
    return None


def scan_images(files: list[Path], folder: Path, skip_unreadable: bool = False) -> list[bool]:
    """Open and decode every image once (in parallel), cached in ``<folder>/.stepdistill_scan.json`` by size
    and mtime so an unchanged folder is not read again. Unreadable files raise one ValueError listing them,
    or with ``skip_unreadable`` are reported once and marked False. Returns one ``usable`` flag per file."""
    cache_path = folder / SCAN_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    stats = [f.stat() for f in files]
    keys = [os.path.relpath(f, folder) for f in files]
    todo = [i for i, (k, st) in enumerate(zip(keys, stats))
            if cache.get(k, [None, None])[:2] != [st.st_size, st.st_mtime_ns]]
    if todo:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for i, error in zip(todo, pool.map(_unreadable, [files[i] for i in todo])):
                cache[keys[i]] = [stats[i].st_size, stats[i].st_mtime_ns, error]
        try:
            tmp = cache_path.with_name(f".tmp-{os.getpid()}{SCAN_CACHE}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
        except OSError:  # a read-only data folder: scan again next time
            pass
    bad = [(keys[i], cache[keys[i]][2]) for i in range(len(files)) if cache[keys[i]][2]]
    if bad:
        listed = "; ".join(f"{k} ({why})" for k, why in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10
                                                                        else "")
        if not skip_unreadable:
            raise ValueError(f"data.images={str(folder)!r}: {len(bad)} of {len(files)} images cannot be read: "
                             f"{listed}. Fix or remove them, or set data.skip_unreadable=true to train without them")
        logger.warning("data.skip_unreadable=true: skipping %d of %d images that cannot be read: %s",
                       len(bad), len(files), listed)
    unusable = {k for k, _ in bad}
    if len(unusable) == len(files):
        raise ValueError(f"data.images={str(folder)!r}: none of its {len(files)} images can be read")
    return [k not in unusable for k in keys]


def _load_image(path: Path, resolution: int) -> torch.Tensor:
    try:
        image = Image.open(path).convert("RGB")
    except Exception as err:  # PIL raises several types for unreadable files
        raise ValueError(f"cannot read image {path}: {err}") from err
    return to_pixels(image, resolution)


class RealLatents:
    """Deterministic, resumable batches of real (or teacher-sample) latents with their conditioning."""

    def __init__(self, path: str, teacher, resolution: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, skip_unreadable: bool = False,
                 image_column: str = "image", caption_column: str = "caption", num_workers: int = 0):
        self.teacher, self.resolution, self.batch_size = teacher, resolution, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.toy = path == "builtin:toy"
        self.stream: ImageStream | None = None
        if self.toy:
            self.latents = self.files = None
            return
        source = open_source(path, image_column, caption_column)  # None: an image folder or cache-pairs folder
        if source is not None:
            self.stream = ImageStream(source, resolution, batch_size, seed=seed, rank=rank, world_size=world_size,
                                      num_workers=num_workers, skip_unreadable=skip_unreadable)
            self.latents = self.files = self.captions = None
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
            files, captions = read_metadata(folder)
            usable = scan_images(files, folder, skip_unreadable)  # cached: validate_paths scanned already
            self.files = [f for f, ok in zip(files, usable) if ok]
            self.captions = [c for c, ok in zip(captions, usable) if ok]

    def __len__(self) -> int:
        return len(self.stream) if self.stream is not None else len(self.captions)

    def state_dict(self) -> dict:
        """A streamed source's position (``ImageStream.state_dict``); ``{}`` for the other formats, whose
        batches are a pure function of the step index. Per process (each rank has its own)."""
        return self.stream.state_dict() if self.stream is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.stream is not None and state:
            self.stream.load_state_dict(state)

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
        device = self.teacher.backbone.device
        if self.stream is not None:
            images, captions = self.stream.batch(index)
            latents = self.teacher.encode_images(images.to(device)).float()
            return {"latents": latents, "cond": self.teacher.encode_prompt(captions), "prompts": captions}
        idx = self._indices(index)
        if self.latents is not None:
            latents = self.latents[idx].to(device)
        else:
            images = torch.stack([_load_image(self.files[i], self.resolution) for i in idx]).to(device)
            latents = self.teacher.encode_images(images).float()
        captions = [self.captions[i] for i in idx]
        return {"latents": latents, "cond": self.teacher.encode_prompt(captions), "prompts": captions}
