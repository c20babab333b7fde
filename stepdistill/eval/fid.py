"""FID and KID as in the papers: torchmetrics' metrics on the standard Inception features.

* Features: torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's port of the TF Inception used by
  the original FID code, pool3, 2048-d), as ``FrechetInceptionDistance(feature=2048)`` builds it. Its
  weights (``weights-inception-2015-12-05-6726825d.pth``) are downloaded on first use; offline, pass
  the file with ``--inception-weights`` (``InceptionFeatures(weights_path=...)``).
* Resizing as clean-fid does it ("clean" mode, Parmar et al., *On Aliased Resizing and Surprising
  Subtleties in GAN Evaluation*, CVPR 2022): each channel as a float image through PIL's bicubic
  filter to 299x299; we round the result to uint8 because the network takes uint8 input (at most
  0.5/255 from clean-fid's float values — the same rounding a saved PNG would get).
* Any torchmetrics-style feature module works instead of Inception (an ``nn.Module`` with a
  ``num_features`` attribute: the toy domain's classifier features, a small module in tests).
* Statistics (``FeatureStats``: mu, sigma, n and optionally the features themselves, which KID needs)
  are computed once per reference set and cached as ``.npz``. FID is computed by torchmetrics'
  ``FrechetInceptionDistance`` from those statistics, KID by ``KernelInceptionDistance`` from features,
  so the numbers are torchmetrics' own.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "FeatureSpace",
    "FeatureStats",
    "InceptionFeatures",
    "clean_resize",
    "fid_from_stats",
    "find_inception_weights",
    "inception_space",
    "kid_from_features",
    "list_images",
    "load_image_folder",
    "min_images_for_fid",
    "scan_image_folder",
]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------------
# Resizing and feature spaces


def clean_resize(images: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] → uint8 [N, 3, size, size], clean-fid style (per-channel float PIL
    bicubic), rounded to uint8. Images already at ``size`` are only quantised."""
    images = images.detach().float().clamp(0, 1).cpu() * 255.0
    if images.shape[-2:] == (size, size):
        return images.round().to(torch.uint8)
    out = np.empty((images.shape[0], 3, size, size), dtype=np.float32)
    array = images.numpy()
    for i in range(array.shape[0]):
        for c in range(3):
            channel = Image.fromarray(np.ascontiguousarray(array[i, c]))  # mode "F" (float32)
            out[i, c] = np.asarray(channel.resize((size, size), resample=Image.BICUBIC))
    return torch.from_numpy(out).clamp(0, 255).round().to(torch.uint8)


class InceptionFeatures(nn.Module):
    """The FID Inception network (pool3, 2048 features) as torchmetrics' FID builds it; uint8 input
    [N, 3, 299, 299]. ``weights_path``: the local torch-fidelity weights file (None downloads them)."""

    num_features = 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights_path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


@dataclass
class FeatureSpace:
    """A feature network and how images reach it.

    ``module`` follows torchmetrics' custom-feature convention (``num_features``; [N, D] out).
    ``size``: clean-resize target (None: images go in at their own size); ``dtype``: "uint8" (0..255, as
    Inception takes) or "float" ([0, 1], as ``ToyFeatures`` takes).
    """

    name: str
    module: nn.Module
    size: int | None = 299
    dtype: str = "uint8"

    @property
    def num_features(self) -> int:
        return int(self.module.num_features)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] → the module's input."""
        if self.dtype == "uint8":
            return clean_resize(images, self.size) if self.size else (images.clamp(0, 1) * 255).round().to(torch.uint8)
        if self.size and images.shape[-2:] != (self.size, self.size):
            return clean_resize(images, self.size).float() / 255.0
        return images.float().clamp(0, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Features [N, D] (float64, CPU) of images [N, 3, H, W] in [0, 1]."""
        device = next(self.module.parameters(), torch.empty(0)).device
        out = []
        for chunk in images.split(batch_size):
            out.append(self.module(self.prepare(chunk).to(device)).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_features, dtype=torch.float64)


def find_inception_weights(weights_path: str | None) -> str | None:
    """The Inception weights file to use: ``weights_path`` (must exist), else torch hub's cached copy,
    else None (download) when online; ValueError naming ``--inception-weights`` when that cannot work."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ValueError(f"--inception-weights {weights_path!r}: no such file. Download {INCEPTION_URL} "
                             f"on a machine with internet and pass its path")
        return str(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return str(cached)
    if _offline():
        raise ValueError(f"FID/KID need the Inception weights ({INCEPTION_WEIGHTS_FILE}), which are not in the "
                         f"torch hub cache ({cached.parent}) and cannot be downloaded offline: download "
                         f"{INCEPTION_URL} elsewhere and pass --inception-weights PATH (or put it in that "
                         f"cache), or pass --no-fid to skip FID and KID")
    return None


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "STEPDISTILL_OFFLINE"))


def inception_space(weights_path: str | None = None, device: str | torch.device = "cpu") -> FeatureSpace:
    """The standard FID feature space; ValueError (naming ``--inception-weights``) if its weights are missing."""
    path = find_inception_weights(weights_path)
    try:
        module = InceptionFeatures(path)
    except ModuleNotFoundError as e:
        raise ValueError(f"FID needs torch-fidelity (torchmetrics' Inception): pip install torch-fidelity ({e})") from None
    except (OSError, RuntimeError) as e:  # download failure, or a file that is no Inception state dict
        where = f"the file {path!r}" if path else f"a download of {INCEPTION_URL}"
        raise ValueError(f"could not load the FID Inception weights from {where} ({type(e).__name__}: {e}); "
                         f"pass a valid --inception-weights PATH ({INCEPTION_WEIGHTS_FILE})") from None
    return FeatureSpace("inception", module.to(device).eval(), size=299, dtype="uint8")


def min_images_for_fid(num_features: int) -> int:
    """FID estimates a D x D covariance: it needs D + 1 images before that covariance can have full rank
    (with fewer, the value mostly measures the sample size). Papers use 10k-50k."""
    return num_features + 1


# ----------------------------------------------------------------------------------------------------
# Statistics and the metrics


@dataclass
class FeatureStats:
    """Mean, covariance (unbiased, as torchmetrics and clean-fid compute it) and count of a set's features;
    ``features`` kept when KID should be computable against the set."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    features: np.ndarray | None = None
    space: str | None = None

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray, space: str | None = None,
                      keep_features: bool = True) -> FeatureStats:
        f = torch.as_tensor(features).double()
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"feature statistics need at least 2 feature vectors [N, D], got {tuple(f.shape)}")
        mu = f.mean(0)
        centred = f - mu
        sigma = centred.T @ centred / (f.shape[0] - 1)
        return cls(mu.numpy(), sigma.numpy(), int(f.shape[0]),
                   f.float().numpy() if keep_features else None, space)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n if self.n is not None else -1)}
        if self.features is not None:
            arrays["features"] = self.features
        if self.space:
            arrays["space"] = np.array(self.space)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, space: str | None = None, num_features: int | None = None) -> FeatureStats:
        """Read an .npz with ``mu`` and ``sigma`` (and ``n``, ``features``, ``space`` when written here; a
        clean-fid / pytorch-fid .npz has only mu and sigma). ValueError when it does not fit."""
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"reference statistics {str(path)!r} cannot be read as .npz ({e})") from None
        with data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"reference statistics {str(path)!r} hold no 'mu' and 'sigma' arrays (keys: "
                                 f"{', '.join(data.files) or 'none'}); pass a folder of real images instead")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            n = int(data["n"]) if "n" in data else None
            features = data["features"] if "features" in data else None
            saved_space = str(data["space"]) if "space" in data else None
        if space and saved_space and saved_space != space:
            raise ValueError(f"reference statistics {str(path)!r} were computed in the {saved_space!r} feature "
                             f"space, this evaluation uses {space!r}; compute them again from the images")
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"reference statistics {str(path)!r}: mu {mu.shape} and sigma {sigma.shape} do "
                             f"not fit together (expected [D] and [D, D])")
        if num_features is not None and mu.shape[0] != num_features:
            raise ValueError(f"reference statistics {str(path)!r} have {mu.shape[0]}-d features, the "
                             f"{space or 'chosen'} feature space gives {num_features}-d; compute them again")
        return cls(mu, sigma, None if n is None or n < 0 else n, features, saved_space or space)


class _Precomputed(nn.Module):
    """Identity "feature network": lets torchmetrics' metrics take features computed elsewhere (once,
    on every process, then gathered)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_stats(fake: FeatureStats, real: FeatureStats) -> float:
    """torchmetrics' FID between two sets given by their statistics.

    The metric's state is (sum, sum of outer products, count); it is filled from (mu, sigma, n) so that
    its ``compute`` recovers exactly mu and sigma (for any n > 1, so an .npz without n works too).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if fake.mu.shape != real.mu.shape:
        raise ValueError(f"FID: generated features are {fake.mu.shape[0]}-d, reference {real.mu.shape[0]}-d")
    # sync_on_compute=False: the features were gathered already; only the main process computes.
    metric = FrechetInceptionDistance(feature=_Precomputed(fake.mu.shape[0]), sync_on_compute=False)
    for stats, side in ((real, "real"), (fake, "fake")):
        n = stats.n if stats.n and stats.n > 1 else 2
        mu = torch.from_numpy(np.asarray(stats.mu, dtype=np.float64))
        sigma = torch.from_numpy(np.asarray(stats.sigma, dtype=np.float64))
        setattr(metric, f"{side}_features_sum", mu * n)
        setattr(metric, f"{side}_features_cov_sum", sigma * (n - 1) + n * torch.outer(mu, mu))
        setattr(metric, f"{side}_features_num_samples", torch.tensor(n))
    metric.orig_dtype = torch.float64  # what update() would record for float64 features
    with warnings.catch_warnings():  # "compute before update": the state was set directly, on purpose
        warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
        return float(metric.compute())


def kid_from_features(fake: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray, subsets: int = 100,
                      subset_size: int | None = None, seed: int = 0) -> tuple[float, float]:
    """torchmetrics' KID (mean, std over ``subsets`` random subsets; polynomial kernel, unbiased MMD^2).
    ``subset_size`` defaults to min(1000, both set sizes); the subsets are drawn with ``seed``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    fake, real = torch.as_tensor(fake).double(), torch.as_tensor(real).double()
    size = subset_size or min(1000, fake.shape[0], real.shape[0])
    if min(fake.shape[0], real.shape[0]) < max(size, 2):
        raise ValueError(f"KID with subsets of {size} needs at least that many generated and reference images "
                         f"(got {fake.shape[0]} and {real.shape[0]})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Precomputed(fake.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# ----------------------------------------------------------------------------------------------------
# Reference image folders


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
