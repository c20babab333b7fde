"""The toy metrics (stepdistill.eval.toy, ToySpace) on the shipped classifier: it reads real procedural images right, and FID, KID,
alignment and diversity move the way they should (CPU, a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepdistill.eval.spaces import ToySpace
from stepdistill.eval.toy import (
    aligned_diversity,
    alignment,
    distribution_metrics,
    diversity,
    reference_images,
    toy_image_metrics,
    toy_metrics_by_split,
)
from stepdistill.toy import classifier as classifier_module
from stepdistill.toy.classifier import ToyClassifier, _gaussian_blur, load_classifier
from stepdistill.toy.data import HELD_OUT, parse_caption, render, sample_batch, to_tensor

N = 300  # images a set: enough for a clear FID gap, small enough to stay fast


@pytest.fixture(scope="module")
def real():
    images, attrs = sample_batch(N, seed=101, split="all")
    return images, [a.caption for a in attrs]


@pytest.fixture(scope="module")
def reference():
    return reference_images(N, seed=202, split="all")


def test_shipped_classifier_reads_fresh_images_including_held_out():
    model = load_classifier()
    assert isinstance(model, ToyClassifier) and not model.training
    images, attrs = sample_batch(400, seed=303, split="all")
    held_images, held_attrs = sample_batch(100, seed=304, split="held_out")
    images, attrs = torch.cat([images, held_images]), attrs + held_attrs
    color, kind, position = model(images)
    assert color.shape == (500, 6) and kind.shape == (500, 3) and position.shape == (500, 5)
    assert model.features(images).shape == (500, model.feature_dim)
    targets = torch.tensor([a.labels for a in attrs])
    correct = model.predict(images) == targets
    assert correct.all(dim=1).float().mean() >= 0.95
    assert correct[400:].all(dim=1).float().mean() >= 0.95  # the held-out combinations alone


def test_toy_space_reads_unit_and_signed_images_alike(real):
    space = ToySpace()
    assert space.num_features == 128 and space.name == "toy"
    images, captions = real
    unit = (images[:8] + 1) / 2
    features = space.features(unit)
    assert features.shape == (8, 128) and features.dtype == torch.float32
    torch.testing.assert_close(features, space.signed_features(images[:8]), atol=1e-4, rtol=1e-4)
    # prompt scores are read on the images as a PNG holds them, and summed up as alignment
    scores = space.prompt_scores(unit, captions[:8])
    assert scores["correct"].shape == (8, 3)
    metrics = space.prompt_metrics(scores, captions[:8], list(range(8)))
    assert metrics["alignment"] >= 0.85 and set(metrics) >= {"color_accuracy", "held_out_alignment"}


def fid(fake, real):
    return distribution_metrics(fake, real)["fid"]


def kid(fake, real):
    m = distribution_metrics(fake, real)
    return m["kid_mean"], m["kid_std"]


def test_fid_and_kid_separate_shifted_sets(real, reference):
    images, _ = real
    threads = torch.get_num_threads()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    shifted_sets = {
        "noised": (images + 0.5 * noise).clamp(-1, 1),
        "blurred": _gaussian_blur(images, 1.5),
        "dimmed": images * 0.7,  # duller colours, lighter background
    }
    same = fid(images, images)
    fresh = fid(images, reference)  # two real sets: the estimator's small-sample floor
    shifted = {name: fid(x, reference) for name, x in shifted_sets.items()}
    assert abs(same) < 1e-3 * min(shifted.values())
    for name, value in shifted.items():
        assert value > 1.5 * fresh > 0, (name, value, fresh)

    kid_same, _ = kid(images, images)
    kid_fresh, kid_std = kid(images, reference)
    assert kid_std > 0  # subsets of half the set differ
    assert abs(kid_same) < 0.1 and abs(kid_fresh) < 0.1
    for name, x in shifted_sets.items():
        value, std = kid(x, reference)
        assert value > max(kid_fresh, kid_same, 0.0) + std, (name, value, kid_fresh)
    assert torch.get_num_threads() == threads  # the metrics' single-thread section restores the setting


def test_alignment_with_own_and_shuffled_captions(real):
    images, captions = real
    own = alignment(images, captions)
    assert set(own) == {"alignment", "color_accuracy", "kind_accuracy", "position_accuracy"}
    assert own["alignment"] >= 0.95
    shuffled = captions[1:] + captions[:1]
    assert alignment(images, shuffled)["alignment"] < 0.2


def test_alignment_rejects_non_toy_caption(real):
    images, captions = real
    with pytest.raises(ValueError, match="a photo of a cat"):
        alignment(images[:2], [captions[0], "a photo of a cat"])


def test_diversity_zero_for_identical_positive_for_different_seeds():
    images, _ = sample_batch(1, seed=5, split="all")
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    assert diversity(images.repeat(8, 1, 1, 1), groups) == pytest.approx(0.0, abs=1e-6)
    # Same prompt, different seeds: the shape's size and place jitter.
    captions = ["a red circle at the top left"] * 4 + ["a blue square in the center"] * 4
    rendered = to_tensor([render(parse_caption(c), np.random.default_rng(i)) for i, c in enumerate(captions)])
    assert diversity(rendered, captions) > 0
    with pytest.raises(ValueError, match="two or more"):
        diversity(rendered[:2], ["a", "b"])


def test_aligned_diversity_ignores_images_that_miss_their_prompt():
    rng = np.random.default_rng
    captions = ["a red circle at the top left"] * 4 + ["a blue square in the center"] * 4
    right = to_tensor([render(parse_caption(c), rng(i)) for i, c in enumerate(captions)])
    both = aligned_diversity(right, captions)
    assert both == pytest.approx(diversity(right, captions), rel=1e-6)  # every image aligned: the same number
    # Replace two red circles by green triangles: "diversity" rises (errors look like variety), the aligned
    # one is the mean over the red group's two remaining circles and the blue group, computed by hand.
    wrong = right.clone()
    wrong[2:4] = to_tensor([render(parse_caption("a green triangle at the bottom right"), rng(50 + i))
                            for i in range(2)])
    assert diversity(wrong, captions) > diversity(right, captions)
    by_hand = diversity(torch.cat([right[:2], right[4:]]), captions[:2] + captions[4:])
    assert aligned_diversity(wrong, captions) == pytest.approx(by_hand, rel=1e-6)
    assert aligned_diversity(wrong[1:4], captions[1:4]) is None  # no prompt keeps two aligned images
    with pytest.raises(ValueError, match="3 images, 2 prompts"):
        aligned_diversity(right[:3], captions[:2])


def test_toy_metrics_by_split(real):
    images, captions = real
    reference_held_out = reference_images(120, seed=404, split="held_out")
    result = toy_metrics_by_split(images, captions, reference_images(N, seed=202), reference_held_out)
    assert set(result) == {"all", "held_out"}
    n_held = sum(1 for c in captions if parse_caption(c) in HELD_OUT)
    assert result["held_out"]["num_images"] == n_held > 0
    assert result["all"]["num_images"] == N
    for part in result.values():
        assert {"fid", "kid_mean", "kid_std", "alignment", "diversity", "aligned_diversity"} <= set(part)
        assert part["alignment"] >= 0.95
    assert result["all"]["diversity"] > 0  # the random batch repeats prompts


def test_toy_image_metrics_fails_fast_on_bad_prompts(real, reference):
    images, captions = real
    with pytest.raises(ValueError, match="not a toy-domain caption"):
        toy_image_metrics(images[:4], captions[:3] + ["hello"], reference)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        toy_image_metrics(images[:4], captions[:3], reference)


def test_load_classifier_missing_folder_names_the_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="stepdistill toy train-classifier --out"):
        load_classifier(path=tmp_path / "nowhere")
    monkeypatch.setattr(classifier_module, "ASSETS_DIR", tmp_path / "assets" / "classifier")
    with pytest.raises(
        FileNotFoundError, match=r"no toy classifier in .*assets.*stepdistill toy train-classifier"
    ):
        load_classifier()
