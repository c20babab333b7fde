"""Reference statistics: real images (a folder, or saved .npz statistics) measured in a feature space,
computed once and cached as .npz; or a space's own default reference (the toy domain's procedural shapes).

``reference_stats`` is what an evaluation calls; the folder helpers check a folder before anything is
generated (every file an image, one resolution) and load it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stepdistill.eval.fid import FeatureStats

__all__ = ["IMAGE_EXTENSIONS", "folder_cache_key", "list_images", "load_image_folder", "reference_stats",
           "scan_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def list_images(folder: str | Path) -> list[Path]:
    """Image files of ``folder`` (recursively, sorted); ValueError if it is no folder or holds none."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ValueError(f"reference image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"reference {str(folder)!r} is neither a folder of images nor an .npz of statistics")
    try:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except OSError as e:
        raise ValueError(f"reference image folder {str(folder)!r} cannot be read ({e})") from None
    if not files:
        raise ValueError(f"reference image folder {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def scan_image_folder(folder: str | Path, resolution: int | None = None, center_crop: bool = False
                      ) -> tuple[list[Path], tuple[int, int]]:
    """List and check a reference folder before any generation: every file opens as an image, and all
    have one size equal to ``resolution`` (unless ``center_crop``, which makes them so). Reads headers only.
    Returns the files and their (common, or first) size (width, height)."""
    files = list_images(folder)
    sizes: dict[tuple[int, int], Path] = {}
    for path in files:
        try:
            with Image.open(path) as im:
                sizes.setdefault(im.size, path)
        except (OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"reference image {str(path)!r} cannot be read as an image ({e}); remove or "
                             f"replace it") from None
    if not center_crop:
        if len(sizes) > 1:
            examples = "; ".join(f"{w}x{h} ({p.name})" for (w, h), p in list(sizes.items())[:3])
            raise ValueError(f"reference images in {str(folder)!r} have {len(sizes)} different resolutions "
                             f"({examples}); pass --center-crop-reference to center-crop and resize them all "
                             f"to --resolution, or prepare the folder at one resolution")
        (size,) = sizes
        if resolution is not None and size != (resolution, resolution):
            raise ValueError(f"reference images are {size[0]}x{size[1]} but the generated images will be "
                             f"{resolution}x{resolution}; pass --resolution {size[0]} (if the model supports "
                             f"it) or --center-crop-reference to resize the reference to {resolution}")
    return files, next(iter(sizes))


def _load_image(path: Path, resolution: int | None, center_crop: bool) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"reference image {str(path)!r} cannot be decoded ({e}); remove or replace it") from None
    if center_crop:
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if resolution is not None and im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), resample=Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def load_image_folder(files: Sequence[Path], resolution: int | None = None, center_crop: bool = False
                      ) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] from ``files`` (checked by ``scan_image_folder``)."""
    return torch.stack([_load_image(Path(p), resolution, center_crop) for p in files])


def folder_cache_key(files: Sequence[Path], space: str, resolution: int | None, center_crop: bool) -> str:
    """A key that changes when the folder's files (names, sizes, times) or the preprocessing change."""
    h = hashlib.sha256(f"{space}|{resolution}|{center_crop}".encode())
    for p in files:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def default_cache_path(folder: Path, space: str, key: str) -> Path:
    return Path.home() / ".cache" / "stepdistill" / "fid" / f"{folder.name}-{space}-{key}.npz"


def reference_stats(space, reference: str | None, *, resolution: int, batch_size: int, num_default: int,
                    split, gather, cache: str | None = None, center_crop: bool = False, is_main: bool = True,
                    check_count=None) -> tuple[FeatureStats | None, dict]:
    """FeatureStats of the reference in ``space`` (float64 features) and a description of it.

    ``reference``: an .npz of statistics, a folder of images (its statistics cached as .npz at ``cache``,
    default ~/.cache/stepdistill/fid/), or None for the space's default reference (``num_default`` images;
    none for real pipelines). ``split(items)`` / ``gather(records)`` share the work between processes;
    ``check_count(n)`` runs on the reference size before any feature is computed.
    """
    check_count = check_count or (lambda n: None)
    if reference is None:
        images, info = space.default_reference(num_default)
        if images is None:
            return None, {}
        check_count(images.shape[0])
        mine = split(list(range(images.shape[0])))
        feats = space.features(images[mine], batch_size) if mine else torch.zeros(0, space.num_features)
        records = gather([(i, f.double().numpy()) for i, f in zip(mine, feats)])
        feats = np.stack([f for _, f in sorted(records, key=lambda r: r[0])])
        return FeatureStats.from_features(feats, space.name), {**info, "n": int(feats.shape[0])}
    ref = Path(reference).expanduser()
    if ref.suffix == ".npz":
        if not ref.is_file():
            raise ValueError(f"--reference {reference!r}: no such .npz file")
        stats = FeatureStats.load(ref, space.name, space.num_features)
        if stats.n is not None:
            check_count(stats.n)
        return stats, {"source": str(ref), "n": stats.n}
    files, _ = scan_image_folder(ref, resolution, center_crop)
    check_count(len(files))
    key = folder_cache_key(files, space.name, resolution if center_crop else None, center_crop)
    cache_path = Path(cache) if cache else default_cache_path(ref, space.name, key)
    if cache_path.is_file():
        stats = FeatureStats.load(cache_path, space.name, space.num_features)
        if stats.n == len(files):
            return stats, {"source": str(ref), "n": stats.n, "cache": str(cache_path), "cached": True}
    from tqdm.auto import tqdm

    mine = split(list(range(len(files))))
    records = []
    for start in tqdm(range(0, len(mine), batch_size), desc="reference features", unit="batch", disable=not is_main):
        idx = mine[start:start + batch_size]
        imgs = load_image_folder([files[i] for i in idx], resolution, center_crop)
        records.extend(zip(idx, space.features(imgs, batch_size).double().numpy()))
    records = gather(records)
    feats = np.stack([f for _, f in sorted(records, key=lambda r: r[0])])
    stats = FeatureStats.from_features(feats, space.name)
    if is_main:
        stats.save(cache_path)
    return stats, {"source": str(ref), "n": stats.n, "cache": str(cache_path), "cached": False}
