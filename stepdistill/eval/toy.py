"""Metrics of sets of toy images ([-1, 1], as ``stepdistill.toy.data`` renders them), in ``ToySpace``.

* ``fid`` / ``kid`` (``distribution_metrics``): ``stepdistill.eval.fid`` on the toy classifier's features,
  in float32 (the classifier's precision) — the numbers toy runs have always reported.
* ``alignment``: the CLIP-score analogue — the fraction of images whose predicted colour, kind and
  position all match their prompt, plus the accuracy per attribute.
* ``diversity``: mean pairwise feature distance among images of the same prompt (several seeds),
  averaged over prompts; 0 for a generator that ignores its noise.
* ``aligned_diversity``: the same over only the images the classifier reads as their prompt. On this
  domain a prompt fixes colour, kind and place, so what ``diversity`` adds beyond it is mostly *error*
  (a wrong colour or shape is far away in feature space): a student can out-"diversify" its teacher by
  missing the prompt. This one counts variety within the right answer only (size and place jitter,
  rendering) — the quantity distillation is said to lose.

Images are a float tensor [N, 3, 32, 32] in [-1, 1] or a list of PIL images; values outside [-1, 1] are
clamped. Everything runs without gradients, on one CPU thread (see ``single_cpu_thread``).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch
from PIL import Image

from stepdistill.eval.diversity import mean_pairwise_distance
from stepdistill.eval.fid import FeatureStats, fid_from_stats, kid_from_features
from stepdistill.eval.spaces import ToySpace, alignment_from_correct

__all__ = ["aligned_diversity", "alignment", "distribution_metrics", "diversity", "reference_images",
           "toy_metrics_by_split", "toy_image_metrics"]

Images = torch.Tensor | Sequence[Image.Image]


def single_cpu_thread(fn):
    """Run ``fn`` with one torch CPU thread (restored afterwards) when its images are on the CPU.

    The toy network and KID's 100 subset evaluations are tiny operations, for which OpenMP's thread
    hand-offs cost more than the work; on a 2-core machine with one other busy process, two threads
    made KID ~25× slower and FID ~5× slower.
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


def _as_images(images: Images, name: str = "images") -> torch.Tensor:
    """Validate and normalise images to a float tensor [N, 3, 32, 32] in [-1, 1]."""
    from stepdistill.toy.data import RESOLUTION, to_tensor

    if not isinstance(images, torch.Tensor):
        images = list(images)
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError(f"{name}: expected a tensor [N, 3, 32, 32] in [-1, 1] or a list of PIL images")
        images = to_tensor([im.convert("RGB") for im in images]) if images else torch.zeros(0, 3, 32, 32)
    expected = (3, RESOLUTION, RESOLUTION)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"{name}: expected shape [N, 3, 32, 32] (values in [-1, 1]), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor in [-1, 1], got {images.dtype}")
    return images.float().clamp(-1.0, 1.0)


def _space(images: torch.Tensor) -> ToySpace:
    return ToySpace(images.device)


def _has_pair(group_ids: Sequence[Hashable]) -> bool:
    """Some group holds two or more images (what a diversity needs)."""
    counts: dict[Hashable, int] = defaultdict(int)
    for group in group_ids:
        counts[group] += 1
    return max(counts.values(), default=0) >= 2


def reference_images(n: int, seed: int = 0, split: str = "all") -> torch.Tensor:
    """``n`` real procedural images [n, 3, 32, 32] in [-1, 1] of ``split`` ("all", "train", "held_out"),
    random combinations, for the FID/KID reference. Use a seed the generated set does not use."""
    from stepdistill.toy.data import sample_batch

    return sample_batch(n, seed=seed, split=split)[0]


@single_cpu_thread
@torch.no_grad()
def distribution_metrics(fake: Images, real: Images, kid_subsets: int = 100, kid_seed: int = 0) -> dict:
    """``fid``, ``kid_mean``, ``kid_std`` of ``fake`` against ``real`` in the toy space (float32).

    FID depends on the set sizes (a biased estimator): compare numbers computed with the same n. KID's
    subsets hold min(1000, half the smaller set) images, so that they differ and the std means something; a
    set against itself gives a slightly *negative* KID (the unbiased estimator excludes k(x, x) within a set
    but not across sets): read values ≤ 0 as "no difference".
    """
    fake, real = _as_images(fake, "fake"), _as_images(real, "real")
    for images, name in ((fake, "fake"), (real, "real")):
        if images.shape[0] < 2:
            raise ValueError(f"FID and KID need at least 2 {name} images, got {images.shape[0]}")
    space = _space(fake)
    f_fake, f_real = space.features((fake + 1.0) / 2.0), space.features((real.to(fake.device) + 1.0) / 2.0)
    size = max(2, min(1000, fake.shape[0] // 2, real.shape[0] // 2))
    kid_mean, kid_std = kid_from_features(f_fake, f_real, kid_subsets, size, kid_seed)
    fid = fid_from_stats(FeatureStats.from_features(f_fake, "toy", keep_features=False),
                         FeatureStats.from_features(f_real, "toy", keep_features=False))
    return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std}


@single_cpu_thread
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
    return alignment_from_correct(_space(images).correct(images, prompts))


@single_cpu_thread
@torch.no_grad()
def diversity(images: Images, group_ids: Sequence[Hashable]) -> float:
    """Mean pairwise L2 distance of toy features within each group (one prompt, several seeds),
    averaged over the groups with at least two images. Raises ValueError if there is none."""
    images = _as_images(images)
    group_ids = list(group_ids)
    if len(group_ids) != images.shape[0]:
        raise ValueError(f"diversity: {images.shape[0]} images but {len(group_ids)} group ids")
    return mean_pairwise_distance(_space(images).signed_features(images), group_ids, "l2")


@single_cpu_thread
@torch.no_grad()
def aligned_diversity(images: Images, prompts: Sequence[str], group_ids: Sequence[Hashable] | None = None):
    """``diversity`` over the images whose colour, kind and position the classifier reads as their prompt's
    (groups: ``group_ids``, default the prompts); None when no group keeps two such images."""
    images, prompts = _as_images(images), list(prompts)
    groups = list(group_ids) if group_ids is not None else prompts
    if not len(prompts) == len(groups) == images.shape[0]:
        raise ValueError(f"aligned_diversity: {images.shape[0]} images, {len(prompts)} prompts, "
                         f"{len(groups)} group ids")
    space = _space(images)
    keep = space.correct(images, prompts).all(dim=1)
    kept = [g for g, k in zip(groups, keep.tolist()) if k]
    if not _has_pair(kept):
        return None
    return mean_pairwise_distance(space.signed_features(images[keep.to(images.device)]), kept, "l2")


def toy_image_metrics(images: Images, prompts: Sequence[str], reference: Images,
                      group_ids: Sequence[Hashable] | None = None) -> dict[str, float | int | None]:
    """All toy metrics of generated ``images`` (one per prompt) against real ``reference`` images.

    Keys: num_images, num_reference, fid, kid_mean, kid_std, alignment, color_accuracy, kind_accuracy,
    position_accuracy, diversity, aligned_diversity. ``group_ids`` groups images for diversity (default: the
    prompts, i.e. the seeds of one prompt); diversity is None when no group has two images (aligned_diversity:
    two aligned images).
    """
    from stepdistill.toy.data import parse_caption

    images, reference = _as_images(images), _as_images(reference, "reference")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"toy_image_metrics: {images.shape[0]} images but {len(prompts)} prompts")
    for prompt in prompts:
        parse_caption(prompt)  # fail before the (slower) distribution metrics on a non-toy prompt
    distances = distribution_metrics(images, reference)
    result: dict[str, float | int | None] = {
        "num_images": images.shape[0],
        "num_reference": reference.shape[0],
        **distances,
        **alignment(images, prompts),
    }
    groups = list(group_ids) if group_ids is not None else prompts
    result["diversity"] = diversity(images, groups) if _has_pair(groups) else None
    result["aligned_diversity"] = aligned_diversity(images, prompts, groups)
    return result


def toy_metrics_by_split(images: Images, prompts: Sequence[str], reference_all: Images, reference_held_out: Images,
                         group_ids: Sequence[Hashable] | None = None) -> dict[str, dict[str, float | int | None]]:
    """``{"all": metrics of every image vs reference_all, "held_out": metrics of the images whose prompt
    is a held-out combination (``toy.data.HELD_OUT``) vs reference_held_out}``.

    Build the references with ``reference_images(n, seed, "all")`` and ``reference_images(n, seed,
    "held_out")``. Raises ValueError if no prompt is held out.
    """
    from stepdistill.toy.data import HELD_OUT, parse_caption

    images = _as_images(images)
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"toy_metrics_by_split: {images.shape[0]} images but {len(prompts)} prompts")
    held = [i for i, p in enumerate(prompts) if parse_caption(p) in HELD_OUT]
    if not held:
        raise ValueError("toy_metrics_by_split: none of the prompts is a held-out combination (toy.data.HELD_OUT)")
    groups = list(group_ids) if group_ids is not None else None
    return {
        "all": toy_image_metrics(images, prompts, reference_all, groups),
        "held_out": toy_image_metrics(images[held], [prompts[i] for i in held], reference_held_out,
                                      [groups[i] for i in held] if groups is not None else None),
    }
