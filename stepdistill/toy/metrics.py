"""Toy-domain metrics: the analogues of FID, KID and CLIP score, measured with the toy classifier.

* ``fid`` / ``kid``: torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with
  ``ToyFeatures`` (the shipped classifier's 128 penultimate features) in place of Inception.
* ``alignment``: the CLIP-score analogue — the fraction of images whose predicted colour, kind and
  position all match their prompt, plus the accuracy per attribute.
* ``diversity``: mean pairwise feature distance among images of the same prompt (several seeds),
  averaged over prompts; 0 for a generator that ignores its noise.
* ``aligned_diversity``: the same over only the images the classifier reads as their prompt. On this
  domain a prompt fixes colour, kind and place, so what ``diversity`` adds beyond it is mostly *error*
  (a wrong colour or shape is far away in feature space): a student can out-"diversify" its teacher by
  missing the prompt. This one counts variety within the right answer only (size and place jitter,
  rendering) — the quantity distillation is said to lose.

All functions take images as a float tensor [N, 3, 32, 32] in [-1, 1] (what ``stepdistill.toy.data``
renders, and what a pipeline gives with ``output_type="pt"`` once mapped from [0, 1]) or a list of
PIL images; values outside [-1, 1] are clamped. Everything runs on the images' device, without gradients.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from stepdistill.toy.classifier import HEADS, ToyClassifier, load_classifier
from stepdistill.toy.data import HELD_OUT, RESOLUTION, parse_caption, sample_batch, to_tensor

Images = torch.Tensor | Sequence[Image.Image]


class ToyFeatures(nn.Module):
    """The toy FID/KID feature extractor: images → the classifier's penultimate features [N, 128],
    centred and scaled to unit mean variance on clean procedural images (``metric_features``).

    Input convention (torchmetrics'): a float tensor [N, 3, 32, 32] in **[0, 1]**, or a uint8
    tensor in [0, 255]. With a custom ``feature=`` module torchmetrics hands the images of
    ``update(imgs, real)`` to this module unchanged, whatever its ``normalize`` flag says (it only
    converts [0, 1] floats to uint8 for its own Inception), so use
    ``FrechetInceptionDistance(feature=ToyFeatures(), normalize=True)`` and feed [0, 1] floats, as its
    documentation asks for ``normalize=True``; uint8 images work as well. ``num_features`` tells
    torchmetrics the feature size without a dummy forward pass.

    The module stays in eval mode (``train()`` is a no-op) and its parameters need no gradients.
    """

    def __init__(self, classifier: ToyClassifier | None = None):
        super().__init__()
        self.classifier = classifier if classifier is not None else load_classifier()
        self.classifier.requires_grad_(False)
        self.num_features = self.classifier.feature_dim
        super().train(False)

    def train(self, mode: bool = True) -> ToyFeatures:
        # Like torchmetrics' NoTrainInceptionV3: a metric's feature network never leaves eval mode.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            x = images.float() / 127.5 - 1.0
        elif images.is_floating_point():
            x = images.float() * 2.0 - 1.0
        else:
            raise TypeError(f"ToyFeatures expects float images in [0, 1] or uint8 images, got {images.dtype}")
        return self.classifier.metric_features(x)


# ----------------------------------------------------------------------------------------------------
# Helpers


@functools.lru_cache(maxsize=4)
def _cached_classifier(device: str) -> ToyClassifier:
    # One shared, read-only copy a device for alignment and diversity (the FID/KID metrics get their
    # own copy inside ToyFeatures, since torchmetrics may move or re-type its feature module).
    return load_classifier(device)


def toy_features(images: torch.Tensor) -> torch.Tensor:
    """ToyFeatures' features [N, 128] of images [N, 3, 32, 32] in [-1, 1] (shared classifier, chunked)."""
    classifier = _cached_classifier(str(images.device))
    with torch.no_grad():
        return torch.cat([classifier.metric_features(chunk) for chunk in images.split(500)])


def _as_images(images: Images, name: str = "images") -> torch.Tensor:
    """Validate and normalise images to a float tensor [N, 3, 32, 32] in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        images = list(images)
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError(f"{name}: expected a tensor [N, 3, 32, 32] in [-1, 1] or a list of PIL images")
        images = to_tensor([im.convert("RGB") for im in images]) if images else torch.zeros(0, 3, 32, 32)
    expected = (3, RESOLUTION, RESOLUTION)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"{name}: expected shape [N, 3, 32, 32] (values in [-1, 1]), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor in [-1, 1], got {images.dtype}")
    return images.float().clamp(-1.0, 1.0)


def _single_cpu_thread(fn):
    """Run ``fn`` with one torch CPU thread (restored afterwards) when its images are on the CPU.

    The toy network and KID's 100 subset evaluations are tiny operations, for which OpenMP's thread
    hand-offs cost more than the work; on a 2-core machine with one other busy process, two threads
    made ``kid`` ~25× slower (2.4 s instead of 0.09 s for 300 images) and ``fid`` ~5× slower.
    """

    @functools.wraps(fn)
    def wrapper(images, *args, **kwargs):
        on_cpu = not isinstance(images, torch.Tensor) or images.device.type == "cpu"
        previous = torch.get_num_threads()
        if on_cpu and previous > 1:
            torch.set_num_threads(1)
        try:
            return fn(images, *args, **kwargs)
        finally:
            if torch.get_num_threads() != previous:
                torch.set_num_threads(previous)

    return wrapper


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], ToyFeatures' (torchmetrics') input convention."""
    return (images + 1.0) / 2.0


def _need(images: torch.Tensor, n: int, what: str, name: str) -> None:
    if images.shape[0] < n:
        raise ValueError(f"{what} needs at least {n} {name}, got {images.shape[0]}")


# ----------------------------------------------------------------------------------------------------
# Distribution metrics


@_single_cpu_thread
@torch.no_grad()
def fid(fake: Images, real: Images, batch_size: int = 500) -> float:
    """Fréchet distance between the toy features of ``fake`` and ``real`` (both in [-1, 1]).

    It depends on the set sizes (a biased estimator): compare numbers computed with the same n.
    """
    fake, real = _as_images(fake, "fake"), _as_images(real, "real")
    _need(fake, 2, "fid", "fake images")
    _need(real, 2, "fid", "real images")
    metric = FrechetInceptionDistance(feature=ToyFeatures(), normalize=True).to(fake.device)
    for chunk in real.split(batch_size):
        metric.update(_to_unit(chunk).to(fake.device), real=True)
    for chunk in fake.split(batch_size):
        metric.update(_to_unit(chunk), real=False)
    return float(metric.compute())


@_single_cpu_thread
@torch.no_grad()
def kid(
    fake: Images,
    real: Images,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
    batch_size: int = 500,
) -> tuple[float, float]:
    """Kernel distance (mean, std over ``subsets`` random subsets) between ``fake`` and ``real``.

    ``subset_size`` defaults to min(1000, half the smaller set) so that the subsets differ and the std
    means something; they are drawn with ``seed`` (the global torch RNG is left untouched), so the
    result is reproducible. A set against itself gives a slightly *negative* KID (the unbiased
    estimator excludes k(x, x) within a set but not across sets): read values ≤ 0 as "no difference".
    """
    fake, real = _as_images(fake, "fake"), _as_images(real, "real")
    _need(fake, 2, "kid", "fake images")
    _need(real, 2, "kid", "real images")
    size = subset_size or max(2, min(1000, fake.shape[0] // 2, real.shape[0] // 2))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": intended, and small here
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=ToyFeatures(), subsets=subsets, subset_size=size, normalize=True
        )
    metric = metric.to(fake.device)
    for chunk in real.split(batch_size):
        metric.update(_to_unit(chunk).to(fake.device), real=True)
    for chunk in fake.split(batch_size):
        metric.update(_to_unit(chunk), real=False)
    devices = [fake.device] if fake.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# ----------------------------------------------------------------------------------------------------
# Prompt alignment and diversity


@_single_cpu_thread
@torch.no_grad()
def alignment(images: Images, prompts: Sequence[str]) -> dict[str, float]:
    """How often the classifier reads each image as its prompt asked.

    Returns ``alignment`` (all three attributes right) and ``color_accuracy``, ``kind_accuracy``,
    ``position_accuracy``. Raises ValueError for a prompt that is not a toy caption.
    """
    images = _as_images(images)
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"alignment: {images.shape[0]} images but {len(prompts)} prompts")
    if not prompts:
        raise ValueError("alignment: no images")
    correct = _correct(images, prompts)  # [N, 3]
    result = {"alignment": correct.all(dim=1).float().mean().item()}
    for i, head in enumerate(HEADS):
        result[f"{head}_accuracy"] = correct[:, i].float().mean().item()
    return result


def _has_pair(group_ids: Sequence[Hashable]) -> bool:
    """Some group holds two or more images (what a diversity needs)."""
    counts: dict[Hashable, int] = defaultdict(int)
    for group in group_ids:
        counts[group] += 1
    return max(counts.values(), default=0) >= 2


def _correct(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """[N, 3] booleans: the classifier's colour, kind and position of each image equal its prompt's."""
    targets = torch.tensor([parse_caption(p).labels for p in prompts], device=images.device)
    return _cached_classifier(str(images.device)).predict(images) == targets


@_single_cpu_thread
@torch.no_grad()
def aligned_diversity(images: Images, prompts: Sequence[str], group_ids: Sequence[Hashable] | None = None):
    """``diversity`` over the images whose colour, kind and position the classifier reads as their prompt's
    (groups: ``group_ids``, default the prompts); None when no group keeps two such images."""
    from stepdistill.eval.diversity import mean_pairwise_distance

    images, prompts = _as_images(images), list(prompts)
    groups = list(group_ids) if group_ids is not None else prompts
    if not len(prompts) == len(groups) == images.shape[0]:
        raise ValueError(f"aligned_diversity: {images.shape[0]} images, {len(prompts)} prompts, "
                         f"{len(groups)} group ids")
    keep = _correct(images, prompts).all(dim=1).cpu()
    kept = [g for g, k in zip(groups, keep.tolist()) if k]
    if not _has_pair(kept):
        return None
    return mean_pairwise_distance(toy_features(images[keep.to(images.device)]), kept, "l2")


@_single_cpu_thread
@torch.no_grad()
def diversity(images: Images, group_ids: Sequence[Hashable]) -> float:
    """Mean pairwise L2 distance of toy features within each group (one prompt, several seeds),
    averaged over the groups with at least two images. Raises ValueError if there is none."""
    from stepdistill.eval.diversity import mean_pairwise_distance

    images = _as_images(images)
    group_ids = list(group_ids)
    if len(group_ids) != images.shape[0]:
        raise ValueError(f"diversity: {images.shape[0]} images but {len(group_ids)} group ids")
    return mean_pairwise_distance(toy_features(images), group_ids, "l2")


# ----------------------------------------------------------------------------------------------------
# Reference sets and the evaluation bundle


def reference_images(n: int, seed: int = 0, split: str = "all") -> torch.Tensor:
    """``n`` real procedural images [n, 3, 32, 32] in [-1, 1] of ``split`` ("all", "train", "held_out"),
    random combinations, for the FID/KID reference. Use a seed the generated set does not use."""
    return sample_batch(n, seed=seed, split=split)[0]


def evaluate_images(
    images: Images,
    prompts: Sequence[str],
    reference: Images,
    group_ids: Sequence[Hashable] | None = None,
) -> dict[str, float | int | None]:
    """All toy metrics of generated ``images`` (one per prompt) against real ``reference`` images.

    Keys: num_images, num_reference, fid, kid_mean, kid_std, alignment, color_accuracy, kind_accuracy,
    position_accuracy, diversity, aligned_diversity. ``group_ids`` groups images for diversity (default: the
    prompts, i.e. the seeds of one prompt); diversity is None when no group has two images (aligned_diversity:
    two aligned images).
    """
    images, reference = _as_images(images), _as_images(reference, "reference")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"evaluate_images: {images.shape[0]} images but {len(prompts)} prompts")
    for prompt in prompts:
        parse_caption(prompt)  # fail before the (slower) distribution metrics on a non-toy prompt
    kid_mean, kid_std = kid(images, reference)
    result: dict[str, float | int | None] = {
        "num_images": images.shape[0],
        "num_reference": reference.shape[0],
        "fid": fid(images, reference),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        **alignment(images, prompts),
    }
    groups = list(group_ids) if group_ids is not None else prompts
    result["diversity"] = diversity(images, groups) if _has_pair(groups) else None
    result["aligned_diversity"] = aligned_diversity(images, prompts, groups)
    return result


def evaluate_by_split(
    images: Images,
    prompts: Sequence[str],
    reference_all: Images,
    reference_held_out: Images,
    group_ids: Sequence[Hashable] | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """``{"all": metrics of every image vs reference_all, "held_out": metrics of the images whose prompt
    is a held-out combination (``data.HELD_OUT``) vs reference_held_out}``.

    Build the references with ``reference_images(n, seed, "all")`` and ``reference_images(n, seed,
    "held_out")``. Raises ValueError if no prompt is held out.
    """
    images = _as_images(images)
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"evaluate_by_split: {images.shape[0]} images but {len(prompts)} prompts")
    held = [i for i, p in enumerate(prompts) if parse_caption(p) in HELD_OUT]
    if not held:
        raise ValueError("evaluate_by_split: none of the prompts is a held-out combination (data.HELD_OUT)")
    groups = list(group_ids) if group_ids is not None else None
    return {
        "all": evaluate_images(images, prompts, reference_all, groups),
        "held_out": evaluate_images(
            images[held],
            [prompts[i] for i in held],
            reference_held_out,
            [groups[i] for i in held] if groups is not None else None,
        ),
    }
