"""FID and KID as in the papers, from the features of any feature space (``stepdistill.eval.spaces``).

* The real-image space: torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's port of the TF Inception
  used by the original FID code, pool3, 2048-d), as ``FrechetInceptionDistance(feature=2048)`` builds it.
  Its weights (``weights-inception-2015-12-05-6726825d.pth``) are downloaded on first use; offline, pass
  the file with ``--inception-weights`` (``InceptionFeatures(weights_path=...)``). Images are resized as
  clean-fid does it ("clean" mode, Parmar et al., CVPR 2022): each channel as a float image through PIL's
  bicubic filter to 299x299, rounded to uint8 because the network takes uint8 input.
* Statistics (``FeatureStats``: mu, sigma, n and optionally the features themselves, which KID needs) are
  accumulated exactly as torchmetrics' ``FrechetInceptionDistance.update`` does (sums over blocks of 500
  features, in float64), so that an FID from features is torchmetrics' own number; they are cached as .npz
  (``stepdistill.eval.reference``). KID is torchmetrics' ``KernelInceptionDistance`` on the features.
* Precision follows torchmetrics: FID is computed in float64 and reported in the precision of the features
  it came from, KID is computed in the features' precision. Float32 features (a network's output) give
  float32 numbers; ``stepdistill eval`` hands float64 features and gets float64 numbers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "FeatureStats",
    "InceptionFeatures",
    "clean_resize",
    "fid_from_stats",
    "find_inception_weights",
    "kid_from_features",
    "min_images_for_fid",
]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


# ----------------------------------------------------------------------------------------------------
# Resizing and the Inception network


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


def min_images_for_fid(num_features: int) -> int:
    """FID estimates a D x D covariance: it needs D + 1 images before that covariance can have full rank
    (with fewer, the value mostly measures the sample size). Papers use 10k-50k."""
    return num_features + 1


# ----------------------------------------------------------------------------------------------------
# Statistics and the metrics

_BLOCK = 500  # rows a block when accumulating statistics (the toy evaluation's torchmetrics update size)


@dataclass
class FeatureStats:
    """Mean, covariance (unbiased) and count of a set's features, as torchmetrics' FID derives them;
    ``features`` kept when KID should be computable against the set; ``dtype``: the features' precision
    ("float32" or "float64"), which the FID is reported in."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    features: np.ndarray | None = None
    space: str | None = None
    dtype: str = "float64"

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray, space: str | None = None,
                      keep_features: bool = True) -> FeatureStats:
        f = torch.as_tensor(features)
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"feature statistics need at least 2 feature vectors [N, D], got {tuple(f.shape)}")
        dtype = "float32" if f.dtype in (torch.float32, torch.float16, torch.bfloat16) else "float64"
        total = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
        products = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        for block in f.double().split(_BLOCK):
            total += block.sum(dim=0)
            products += block.t().mm(block)
        n = f.shape[0]
        mu = (total / n).unsqueeze(0)
        sigma = (products - n * mu.t().mm(mu)) / (n - 1)
        return cls(mu.squeeze(0).cpu().numpy(), sigma.cpu().numpy(), int(n),
                   f.float().cpu().numpy() if keep_features else None, space, dtype)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n if self.n is not None else -1),
                  "dtype": np.array(self.dtype)}
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
            dtype = str(data["dtype"]) if "dtype" in data else "float64"
        if space and saved_space and saved_space != space:
            raise ValueError(f"reference statistics {str(path)!r} were computed in the {saved_space!r} feature "
                             f"space, this evaluation uses {space!r}; compute them again from the images")
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"reference statistics {str(path)!r}: mu {mu.shape} and sigma {sigma.shape} do "
                             f"not fit together (expected [D] and [D, D])")
        if num_features is not None and mu.shape[0] != num_features:
            raise ValueError(f"reference statistics {str(path)!r} have {mu.shape[0]}-d features, the "
                             f"{space or 'chosen'} feature space gives {num_features}-d; compute them again")
        return cls(mu, sigma, None if n is None or n < 0 else n, features, saved_space or space, dtype)


def fid_from_stats(fake: FeatureStats, real: FeatureStats) -> float:
    """The Fréchet distance of two sets given by their statistics, as torchmetrics' FID computes it
    (``|mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 sum sqrt(eig(S_r S_f))``), in the coarser precision of the two."""
    if fake.mu.shape != real.mu.shape:
        raise ValueError(f"FID: generated features are {fake.mu.shape[0]}-d, reference {real.mu.shape[0]}-d")
    mu_r, sigma_r = torch.from_numpy(real.mu), torch.from_numpy(real.sigma)
    mu_f, sigma_f = torch.from_numpy(fake.mu), torch.from_numpy(fake.sigma)
    distance = ((mu_r - mu_f).square().sum(dim=-1) + sigma_r.trace() + sigma_f.trace()
                - 2 * torch.linalg.eigvals(sigma_r @ sigma_f).sqrt().real.sum(dim=-1))
    precision = torch.float32 if "float32" in (fake.dtype, real.dtype) else torch.float64
    return float(distance.to(precision))


class _Precomputed(nn.Module):
    """Identity "feature network": lets torchmetrics' KID take features computed elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def kid_from_features(fake: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray, subsets: int = 100,
                      subset_size: int | None = None, seed: int = 0) -> tuple[float, float]:
    """torchmetrics' KID (mean, std over ``subsets`` random subsets; polynomial kernel, unbiased MMD^2), in
    the wider precision of the two feature sets. ``subset_size`` defaults to min(1000, both set sizes); the
    subsets are drawn with ``seed`` (the global RNG is left as it was)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    fake, real = torch.as_tensor(fake), torch.as_tensor(real)
    dtype = torch.promote_types(fake.dtype, real.dtype)
    fake, real = fake.to(dtype), real.to(dtype)
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
