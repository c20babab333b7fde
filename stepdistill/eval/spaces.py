"""Feature spaces: what an evaluation measures images with, chosen once per pipeline kind.

A space turns generated images ([N, 3, H, W] in [0, 1], what a pipeline gives with ``output_type="pt"``)
into the two kinds of numbers an evaluation reports:

* ``features``: the vectors FID, KID and diversity are computed on (``stepdistill.eval.fid``);
* ``prompt_scores`` / ``prompt_metrics``: how well each image follows its prompt, per image and summed up.

``InceptionClipSpace`` serves real pipelines: torchmetrics' Inception (pool3, clean-fid resizing) and
CLIP score with open_clip or transformers' CLIP (either may be off). ``ToySpace`` serves the toy domain:
the shipped toy classifier's 128 penultimate features and its prompt alignment (colour, kind and position
read back from the image), with procedural shapes as the default reference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stepdistill.eval.fid import (
    INCEPTION_URL,
    INCEPTION_WEIGHTS_FILE,
    InceptionFeatures,
    clean_resize,
    find_inception_weights,
)

__all__ = ["SPACES", "FeatureSpace", "InceptionClipSpace", "ToySpace", "inception_space", "quantize"]


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] → uint8, as a saved PNG holds them."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass
class FeatureSpace:
    """A feature network and how images reach it.

    ``module`` follows torchmetrics' custom-feature convention (``num_features``; [N, D] out).
    ``size``: clean-resize target (None: images go in at their own size); ``dtype``: "uint8" (0..255, as
    Inception takes) or "float" ([0, 1]).
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
            return clean_resize(images, self.size) if self.size else quantize(images)
        if self.size and images.shape[-2:] != (self.size, self.size):
            return clean_resize(images, self.size).float() / 255.0
        return images.float().clamp(0, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Features [N, D] (the network's precision, CPU) of images [N, 3, H, W] in [0, 1]."""
        device = next(self.module.parameters(), torch.empty(0)).device
        out = [self.module(self.prepare(chunk).to(device)).cpu() for chunk in images.split(batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.num_features)


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


# ----------------------------------------------------------------------------------------------------
# Real pipelines


class InceptionClipSpace:
    """Inception features (when a reference is given) and CLIP score (unless switched off)."""

    kind = "real"
    default_prompts = None

    def __init__(self, inception: FeatureSpace | None = None, scorer=None):
        self.inception, self.scorer = inception, scorer
        self.name = inception.name if inception is not None else None

    @classmethod
    def build(cls, settings, device) -> InceptionClipSpace:
        """The networks ``settings`` (an ``EvalSettings``) ask for: Inception for FID/KID when a reference is
        given, CLIP unless ``no_clip``; ValueError when there is nothing to measure or weights are missing."""
        if settings.reference is None and settings.no_clip:
            raise ValueError("nothing to measure: give --reference (real images or an .npz) for FID/KID, or drop "
                             "--no-clip")
        inception = inception_space(settings.inception_weights, device) if settings.reference else None
        scorer = None
        if not settings.no_clip:
            from stepdistill.eval.clip_score import CLIPScorer

            if settings.clip_transformers:
                scorer = CLIPScorer.from_transformers(settings.clip_transformers, device)
            else:
                scorer = CLIPScorer.from_open_clip(settings.clip_model, settings.clip_pretrained, device)
        return cls(inception, scorer)

    @property
    def has_features(self) -> bool:
        return self.inception is not None

    @property
    def num_features(self) -> int:
        return self.inception.num_features

    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        return self.inception.features(images, batch_size)

    @staticmethod
    def check(prompts: Sequence[str], resolution: int | None) -> None:
        """Real pipelines take any prompt at any resolution their VAE allows (checked elsewhere)."""

    def pipeline_dtype(self, name: str, device: torch.device) -> torch.dtype:
        from stepdistill.models.loading import as_dtype

        if name == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return as_dtype(name)

    def default_reference(self, n: int):
        return None, {}

    def prompt_scores(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> dict:
        """Per image: CLIP cosine with its prompt and the image embedding (for diversity in CLIP space)."""
        if self.scorer is None:
            return {}
        cos, emb = self.scorer.cosine(images, list(prompts), batch_size)
        return {"cos": cos.numpy(), "clip": emb.numpy()}

    def prompt_metrics(self, scores: dict, prompts: Sequence[str], groups: Sequence[int]) -> dict:
        if self.scorer is None:
            return {}
        from stepdistill.eval.clip_score import clip_score
        from stepdistill.eval.diversity import mean_pairwise_distance

        metrics = {"clip_score": clip_score([float(c) for c in scores["cos"]]), "clip_model": self.scorer.name}
        if len(set(groups)) < len(groups):
            metrics["diversity_clip"] = mean_pairwise_distance(torch.from_numpy(scores["clip"]), list(groups),
                                                               "cosine")
        return metrics


# ----------------------------------------------------------------------------------------------------
# The toy domain


@functools.lru_cache(maxsize=4)
def _toy_classifier(device: str):
    # One shared, read-only copy a device (the classifier never trains here).
    from stepdistill.toy.classifier import load_classifier

    return load_classifier(device).requires_grad_(False)


class ToySpace:
    """The toy classifier's features and prompt alignment.

    ``features`` takes images in [0, 1] like every space; the toy domain's own images are in [-1, 1]
    (``stepdistill.toy.data``), for which ``signed_features`` and ``correct`` read them as they are.
    """

    kind = "toy"
    name = "toy"
    has_features = True
    default_prompts = "builtin:toy_all"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.classifier = _toy_classifier(str(self.device))

    @classmethod
    def build(cls, settings, device) -> ToySpace:
        return cls(device)

    @property
    def num_features(self) -> int:
        return int(self.classifier.feature_dim)

    @torch.no_grad()
    def signed_features(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Features [N, 128] (float32, CPU) of toy images [N, 3, 32, 32] in [-1, 1]."""
        out = [self.classifier.metric_features(chunk.to(self.device)).cpu() for chunk in images.split(batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.num_features)

    def features(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Features [N, 128] (float32, CPU) of images in [0, 1]."""
        return self.signed_features(images.float().clamp(0, 1) * 2.0 - 1.0, batch_size)

    @torch.no_grad()
    def correct(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[N, 3] booleans (CPU): the colour, kind and position read from each image ([-1, 1]) equal its
        prompt's. ValueError for a prompt that is not a toy caption."""
        from stepdistill.toy.data import parse_caption

        targets = torch.tensor([parse_caption(p).labels for p in prompts], device=self.device)
        return (self.classifier.predict(images.to(self.device)) == targets).cpu()

    @staticmethod
    def check(prompts: Sequence[str], resolution: int | None) -> None:
        """ValueError for a prompt that is not a toy caption or a resolution the classifier cannot read."""
        from stepdistill.toy.data import RESOLUTION, parse_caption

        for prompt in set(prompts):
            parse_caption(prompt)
        if resolution not in (None, RESOLUTION):
            raise ValueError(f"--resolution {resolution}: toy pipelines generate {RESOLUTION}x{RESOLUTION} images "
                             f"(the toy feature space needs that size); drop --resolution")

    def pipeline_dtype(self, name: str, device: torch.device) -> torch.dtype:
        return torch.float32  # the toy pipelines are small; fp32 everywhere keeps their numbers comparable

    def default_reference(self, n: int):
        """``n`` procedural images in [0, 1] (seed 10000, every combination) and how to name them."""
        from stepdistill.toy.data import sample_batch

        images = (sample_batch(n, seed=10_000, split="all")[0] + 1) / 2
        return images, {"source": "procedural toy images (seed 10000)"}

    def prompt_scores(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> dict:
        """Per image: which of colour, kind and position the classifier reads right, on the image as a
        saved PNG holds it (uint8)."""
        signed = quantize(images).float() / 127.5 - 1
        return {"correct": self.correct(signed, prompts).numpy()}

    def prompt_metrics(self, scores: dict, prompts: Sequence[str], groups: Sequence[int]) -> dict:
        """alignment (all three right), the accuracy of each attribute, and the alignment on the prompts
        that are held-out combinations (None when there is none)."""
        from stepdistill.toy.data import HELD_OUT, parse_caption

        correct = torch.from_numpy(np.asarray(scores["correct"]))
        metrics = alignment_from_correct(correct)
        held = [k for k, p in enumerate(prompts) if parse_caption(p) in HELD_OUT]
        metrics["held_out_alignment"] = alignment_from_correct(correct[held])["alignment"] if held else None
        return metrics


SPACES = {"real": InceptionClipSpace, "toy": ToySpace}  # pipeline kind -> its feature space


def alignment_from_correct(correct: torch.Tensor) -> dict[str, float]:
    """``alignment`` (all three attributes right) and ``<head>_accuracy`` of [N, 3] correctness booleans."""
    from stepdistill.toy.classifier import HEADS

    result = {"alignment": correct.all(dim=1).float().mean().item()}
    for i, head in enumerate(HEADS):
        result[f"{head}_accuracy"] = correct[:, i].float().mean().item()
    return result
