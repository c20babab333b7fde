"""stepdistill.eval metrics: FID/KID through torchmetrics with a small custom feature module (offline),
.npz statistics, clean-fid resizing, CLIP score with tiny CLIP models built from configs, diversity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from stepdistill.eval.clip_score import CLIPScorer, clip_score, to_pil
from stepdistill.eval.diversity import mean_pairwise_distance
from stepdistill.eval.fid import (
    FeatureStats,
    clean_resize,
    fid_from_stats,
    find_inception_weights,
    kid_from_features,
    min_images_for_fid,
)
from stepdistill.eval.spaces import FeatureSpace, ToySpace


class PoolFeatures(nn.Module):
    """A small fixed feature network in torchmetrics' custom-feature convention: uint8 images in,
    ``num_features`` features out (4x4 average pool of each channel, then a fixed random projection)."""

    num_features = 12

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(48, self.num_features)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.num_features, 48, generator=torch.Generator().manual_seed(0)))
            self.proj.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        return self.proj(x)


class Given(nn.Module):
    """Identity "network": torchmetrics' metrics on features computed beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _images(n: int, seed: int, size: int = 24, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2
    noise = torch.rand(n, 3, size, size, generator=g) * 0.2
    return (base + noise + shift).clamp(0, 1)


@pytest.fixture(scope="module")
def space() -> FeatureSpace:
    return FeatureSpace("pool", PoolFeatures().eval(), size=32, dtype="uint8")


def test_fid_of_a_set_against_itself_is_zero_and_against_a_shifted_set_positive(space):
    a, b = _images(64, 0), _images(64, 1)
    fa = space.features(a)
    assert fa.shape == (64, 12)
    stats_a = FeatureStats.from_features(fa, "pool")
    assert fid_from_stats(stats_a, stats_a) == pytest.approx(0.0, abs=1e-6)
    same_distribution = fid_from_stats(FeatureStats.from_features(space.features(b)), stats_a)
    shifted = fid_from_stats(FeatureStats.from_features(space.features(_images(64, 1, shift=0.25))), stats_a)
    assert shifted > 0.05
    assert shifted > 10 * same_distribution


def test_fid_from_stats_equals_torchmetrics_fid_on_the_images(space):
    """The statistics path gives torchmetrics' own number for the same (prepared) images."""
    real, fake = _images(40, 2), _images(40, 3, shift=0.1)
    metric = FrechetInceptionDistance(feature=PoolFeatures().eval())
    metric.update(space.prepare(real), real=True)
    metric.update(space.prepare(fake), real=False)
    expected = float(metric.compute())
    ours = fid_from_stats(FeatureStats.from_features(space.features(fake)), FeatureStats.from_features(space.features(real)))
    assert ours == pytest.approx(expected, rel=1e-4)


def test_npz_round_trip_and_mu_sigma_only_files(space, tmp_path):
    ref = FeatureStats.from_features(space.features(_images(50, 4)), "pool")
    fake = FeatureStats.from_features(space.features(_images(50, 5, shift=0.1)), "pool")
    path = ref.save(tmp_path / "ref.npz")
    loaded = FeatureStats.load(path, "pool", 12)
    assert loaded.n == 50 and loaded.space == "pool"
    np.testing.assert_allclose(loaded.mu, ref.mu)
    np.testing.assert_allclose(loaded.sigma, ref.sigma)
    np.testing.assert_allclose(loaded.features, ref.features)
    assert fid_from_stats(fake, loaded) == pytest.approx(fid_from_stats(fake, ref), rel=1e-9)
    # A clean-fid / pytorch-fid style file (mu and sigma only) gives the same FID; KID needs features.
    np.savez(tmp_path / "plain.npz", mu=ref.mu, sigma=ref.sigma)
    plain = FeatureStats.load(tmp_path / "plain.npz", "pool", 12)
    assert plain.n is None and plain.features is None
    assert fid_from_stats(fake, plain) == pytest.approx(fid_from_stats(fake, ref), rel=1e-9)
    with pytest.raises(ValueError, match="12-d"):
        FeatureStats.load(path, "pool", num_features=2048)
    with pytest.raises(ValueError, match="'pool' feature space.*'inception'"):
        FeatureStats.load(path, "inception")
    np.savez(tmp_path / "bad.npz", m=ref.mu)
    with pytest.raises(ValueError, match="no 'mu' and 'sigma'"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_kid_small_sets(space):
    a = space.features(_images(60, 6))
    b = space.features(_images(60, 7))
    shifted = space.features(_images(60, 7, shift=0.25))
    same, _ = kid_from_features(b, a, subsets=20, subset_size=30)
    far, far_std = kid_from_features(shifted, a, subsets=20, subset_size=30)
    assert far > 0 and far > 5 * abs(same)
    assert far_std >= 0
    # reproducible: the subsets are drawn with a fixed seed
    assert kid_from_features(shifted, a, subsets=20, subset_size=30) == (far, far_std)
    with pytest.raises(ValueError, match="at least that many"):
        kid_from_features(shifted[:10], a, subset_size=30)


def test_clean_resize_is_per_channel_float_bicubic():
    img = _images(1, 8, size=20)
    out = clean_resize(img, 29)
    assert out.shape == (1, 3, 29, 29) and out.dtype == torch.uint8
    channel = Image.fromarray((img[0, 1] * 255).numpy().astype(np.float32))
    expected = np.asarray(channel.resize((29, 29), resample=Image.BICUBIC))
    np.testing.assert_array_equal(out[0, 1].numpy(), np.clip(np.round(expected), 0, 255).astype(np.uint8))
    flat = torch.full((2, 3, 17, 17), 0.5)
    assert torch.all(clean_resize(flat, 299) == 128)


def test_fid_sample_size_rule_and_offline_weights(tmp_path, monkeypatch):
    assert min_images_for_fid(2048) == 2049
    with pytest.raises(ValueError, match="no such file"):
        find_inception_weights(str(tmp_path / "missing.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="--inception-weights"):
        find_inception_weights(None)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert find_inception_weights(str(weights)) == str(weights)


# ---- CLIP score ----------------------------------------------------------------------------------

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("oc") / "stepdistill-test-tiny-clip.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("stepdistill-test-tiny-clip", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("stepdistill-test-tiny-clip")


def test_clip_score_open_clip_matches_hand_computation(tiny_open_clip):
    model, preprocess, tokenizer = tiny_open_clip
    scorer = CLIPScorer.from_open_clip(model=model, preprocess=preprocess, tokenizer=tokenizer)
    images = _images(5, 9, size=40)
    prompts = ["a red circle", "a blue square", "a cat", "a dog on a sofa", "a photo"]
    cos, emb = scorer.cosine(images, prompts)
    with torch.no_grad():  # by hand: the PNG-equivalent uint8 image, the model's transforms, cosine
        for i in range(5):
            pil = Image.fromarray((images[i] * 255).round().byte().permute(1, 2, 0).numpy())
            e_img = model.encode_image(preprocess(pil)[None])[0]
            e_txt = model.encode_text(tokenizer([prompts[i]]))[0]
            expected = torch.dot(e_img, e_txt) / (e_img.norm() * e_txt.norm())
            assert cos[i].item() == pytest.approx(expected.item(), abs=1e-5)
            assert torch.allclose(emb[i], e_img / e_img.norm(), atol=1e-5)
    assert clip_score(cos) == pytest.approx(max(100 * cos.double().mean().item(), 0), abs=1e-9)


def test_clip_score_is_torchmetrics_convention():
    assert clip_score([0.3, 0.1]) == pytest.approx(20.0)
    assert clip_score([0.3, -0.1]) == pytest.approx(10.0)  # the mean is clamped, not each image
    assert clip_score([-0.3, -0.1]) == 0.0


def test_clip_score_transformers_matches_hand_computation(tmp_path):
    """transformers' CLIPModel from a folder, against the cosine inside CLIPModel.forward (its
    logits_per_image are exp(logit_scale) * cos). (torchmetrics 1.9's own clip_score cannot be the
    reference here: it breaks on transformers 5, whose get_image_features returns an output object.)"""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from stepdistill.toy.teachers import teacher_path

    tokenizer = CLIPTokenizer.from_pretrained(teacher_path("toy-sd") / "tokenizer")
    config = CLIPConfig(
        text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    scorer = CLIPScorer.from_transformers(str(tmp_path))
    images = _images(4, 10, size=32)
    prompts = ["a red circle at the top left", "a blue square in the center", "a green triangle",
               "a white circle at the bottom right"]
    cos, _ = scorer.cosine(images, prompts)
    inputs = processor(text=prompts, images=to_pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image  # [images, texts]
    expected = logits.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(cos, expected, atol=1e-5, rtol=1e-5)
    assert clip_score(cos) == pytest.approx(100 * expected.double().mean().item(), abs=1e-3)


def test_clip_weights_missing_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--clip-pretrained"):
        CLIPScorer.from_open_clip("ViT-B-32", str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="--clip-pretrained PATH"):
        CLIPScorer.from_open_clip("ViT-B-32", "laion2b_s34b_b79k")


def test_to_pil_round_trip():
    images = _images(2, 11, size=8)
    pil = to_pil(images)
    assert pil[0].size == (8, 8)
    np.testing.assert_array_equal(np.asarray(pil[1]), (images[1] * 255).round().byte().permute(1, 2, 0).numpy())


# ---- diversity -----------------------------------------------------------------------------------


def test_diversity_by_hand():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [9.0, 9.0]])
    groups = ["a", "a", "b", "b", "b", "c"]  # "c" has one image and does not count
    assert mean_pairwise_distance(f, groups) == pytest.approx((5.0 + 4.0 / 3.0) / 2)
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, 2.0]])
    assert mean_pairwise_distance(g, [0, 0, 1, 1], "cosine") == pytest.approx(0.5)  # (1 + 0) / 2
    with pytest.raises(ValueError, match="two or more images"):
        mean_pairwise_distance(f[:2], ["a", "b"])


def test_fid_from_features_is_torchmetrics_fid_to_the_last_digit():
    """Statistics accumulated as torchmetrics' FID accumulates them give its number exactly, in the features'
    precision (float32 features: a float32 FID, as torchmetrics reports for a float32 network)."""
    from stepdistill.eval.toy import reference_images

    real, fake = reference_images(600, seed=1), reference_images(150, seed=2, split="held_out")
    space = ToySpace()
    f_real, f_fake = space.features((real + 1) / 2), space.features((fake + 1) / 2)
    metric = FrechetInceptionDistance(feature=Given(128))
    for chunk in f_real.split(500):  # torchmetrics' state, filled in the same blocks
        metric.update(chunk, real=True)
    metric.update(f_fake, real=False)
    ours = fid_from_stats(FeatureStats.from_features(f_fake), FeatureStats.from_features(f_real))
    assert ours == float(metric.compute())
    assert FeatureStats.from_features(f_fake).dtype == "float32"
    in_float64 = fid_from_stats(FeatureStats.from_features(f_fake.double()), FeatureStats.from_features(f_real.double()))
    assert in_float64 == pytest.approx(ours, rel=1e-6) and in_float64 != ours


# ---- the real Inception path, with random weights (the real ones cannot be downloaded here) ---------


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A state dict of torch-fidelity's FID Inception with random weights, saved as a local weights file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    saved = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *args, **kwargs: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *args, **kwargs: None
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = saved
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow  # ~30 s: two random-weight Inception networks built and run on a CPU
def test_inception_space_gives_torchmetrics_fid_features(random_inception_weights):
    """Our Inception features are exactly those torchmetrics' FrechetInceptionDistance(feature=2048)
    accumulates for the clean-resized images (so the FID, tested above on a small module, is its FID)."""
    from stepdistill.eval.spaces import inception_space

    space = inception_space(str(random_inception_weights))
    real = _images(2, 12, size=40)
    features = space.features(real)
    assert features.shape == (2, 2048) and features.std() > 0
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(random_inception_weights))
    metric.update(clean_resize(real), real=True)  # 299x299 uint8: torchmetrics' own resize is the identity
    torch.testing.assert_close(metric.real_features_sum, features.sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(metric.real_features_cov_sum, features.T @ features, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="--inception-weights"):
        bad = random_inception_weights.with_name("bad.pth")
        torch.save({"x": torch.zeros(1)}, bad)
        inception_space(str(bad))
