"""The shipped toy teachers (stepdistill/toy/assets/toy-sd, toy-flow): they load offline as plain
diffusers pipelines, are recognised as sd15 / sd3, generate 32x32 images, tokenize every caption
word as one known token, fit the size budget, and actually draw what a prompt asks for."""

from __future__ import annotations

import pytest
import torch

from stepdistill.models.loading import load_teacher, resolve_pretrained
from stepdistill.toy import teachers
from stepdistill.toy.data import ALL, BACKGROUND, COLORS, HELD_OUT, POSITIONS, RESOLUTION, vocabulary

MAX_ASSETS_MB = 25


@pytest.fixture(scope="module")
def toy_sd():
    return load_teacher("toy-sd")


@pytest.fixture(scope="module")
def toy_flow():
    return load_teacher("toy-flow")


def _generate(pipe, prompts, steps, guidance=3.0, seed=0):
    result = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
    )
    return result.images  # [N, 3, H, W] in [0, 1]


# ---- names and files ----------------------------------------------------------------------------
def test_names_resolve_to_the_shipped_folders():
    for name in ("toy-sd", "toy-flow"):
        path = resolve_pretrained(name)
        assert path == str(teachers.ASSETS_DIR / name)
        assert (teachers.ASSETS_DIR / name / "model_index.json").is_file()


def test_unknown_or_missing_toy_teacher_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="toy-sd, toy-flow"):
        resolve_pretrained("toy-xl")
    monkeypatch.setattr(teachers, "ASSETS_DIR", tmp_path)
    with pytest.raises(ValueError, match="stepdistill toy train-teacher --kind flow"):
        resolve_pretrained("toy-flow")


def test_assets_fit_the_size_budget():
    size_mb = teachers.folder_size(teachers.ASSETS_DIR) / 2**20
    assert size_mb <= MAX_ASSETS_MB, f"shipped toy assets are {size_mb:.1f} MB > {MAX_ASSETS_MB} MB"


# ---- loading and shapes -------------------------------------------------------------------------
def test_toy_sd_is_an_sd15_teacher(toy_sd):
    from diffusers import StableDiffusionPipeline

    assert toy_sd.family == "sd15" and toy_sd.prediction_type == "epsilon"
    assert isinstance(toy_sd.pipeline, StableDiffusionPipeline)
    assert toy_sd.resolution == RESOLUTION and toy_sd.latent_shape(RESOLUTION) == (4, 8, 8)
    images = _generate(toy_sd.pipeline, ["a red circle in the center", ""], steps=2)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and torch.isfinite(images).all()


def test_toy_flow_is_an_sd3_teacher(toy_flow):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    assert toy_flow.family == "sd3" and toy_flow.prediction_type == "flow"
    assert isinstance(toy_flow.pipeline, StableDiffusion3Pipeline)
    assert isinstance(toy_flow.pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    assert toy_flow.pipeline.text_encoder_3 is not None  # reloads with a plain from_pretrained
    assert toy_flow.latent_shape(RESOLUTION) == (4, 8, 8)
    images = _generate(toy_flow.pipeline, ["a blue square at the top right"], steps=2)
    assert images.shape == (1, 3, RESOLUTION, RESOLUTION) and torch.isfinite(images).all()


def test_plain_diffusers_loads_the_folder():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(resolve_pretrained("toy-sd"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == RESOLUTION


# ---- tokenizers ---------------------------------------------------------------------------------
def test_tokenizers_spell_each_caption_word_as_one_known_token(toy_sd, toy_flow):
    words = vocabulary()
    assert {w for a in ALL for w in a.caption.split()} <= set(words)
    for tokenizer in (toy_sd.pipeline.tokenizer, toy_flow.pipeline.tokenizer, toy_flow.pipeline.tokenizer_2):
        for word in words:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            assert tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"], word
        caption = max((a.caption for a in ALL), key=len)
        ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length).input_ids
        assert len(ids) == teachers.TEXT_MAX_LENGTH
        assert (
            ids[: len(caption.split()) + 2].count(tokenizer.eos_token_id) == 1
        )  # EOS (= unk) only at the end
    t5 = toy_flow.pipeline.tokenizer_3
    for word in words:
        ids = t5(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != t5.unk_token_id, word


# ---- a real outcome: the shape is where the prompt says, in its colour --------------------------
def _patch_mean(image: torch.Tensor, position: str, half: int = 2) -> torch.Tensor:
    cx, cy = (round(f * RESOLUTION) for f in POSITIONS[position])
    return image[:, cy - half : cy + half, cx - half : cx + half].mean(dim=(1, 2))


OPPOSITE = {"top left": "bottom right", "bottom right": "top left", "top right": "bottom left"}
OPPOSITE |= {"bottom left": "top right", "center": "top left"}


@pytest.mark.parametrize("teacher", ["toy_sd", "toy_flow"])
def test_eight_step_samples_draw_the_prompted_colour_in_the_prompted_place(teacher, request):
    pipe = request.getfixturevalue(teacher).pipeline
    prompts = [
        a for a in ALL if a.caption in ("a red square at the top left", "a blue circle at the bottom right")
    ]
    assert len(prompts) == 2 and not set(prompts) & HELD_OUT
    images = _generate(pipe, [a.caption for a in prompts], steps=8)
    background = torch.tensor(BACKGROUND) / 255
    for image, attrs in zip(images, prompts):
        target = torch.tensor(COLORS[attrs.color]) / 255
        inside = _patch_mean(image, attrs.position)
        outside = _patch_mean(image, OPPOSITE[attrs.position])
        assert (inside - target).norm() < 0.5 * (target - background).norm(), (attrs.caption, inside)
        assert (outside - background).norm() < 0.15, (attrs.caption, outside)


# ---- the training script, end to end in seconds -------------------------------------------------
def test_train_teacher_script_writes_loadable_pipelines(tmp_path):
    import json

    from diffusers import DiffusionPipeline

    from stepdistill.toy.train_teacher import main

    tiny = ["--steps", "2", "--pool", "64", "--batch-size", "4", "--seed", "1"]
    sd_out, flow_out = tmp_path / "toy-sd", tmp_path / "toy-flow"
    argv = ["--kind", "sd", "--out", str(sd_out), "--vae-steps", "2", "--vae-batch-size", "4"]
    assert main([*argv, "--unet-channels", "16", "32", *tiny]) == 0
    assert (
        main(["--kind", "flow", "--out", str(flow_out), "--from-sd", str(sd_out), "--layers", "1", *tiny])
        == 0
    )

    info = json.loads((sd_out / "stepdistill_toy.json").read_text())
    assert info["denoiser_steps"] == 2 and info["scaling_factor"] > 0
    sd = DiffusionPipeline.from_pretrained(str(sd_out))
    assert sd.vae.config.scaling_factor == info["scaling_factor"]
    flow = DiffusionPipeline.from_pretrained(str(flow_out))
    assert type(flow).__name__ == "StableDiffusion3Pipeline"
    assert flow.vae.config.scaling_factor == info["scaling_factor"]  # toy-flow reuses toy-sd's VAE
    images = _generate(flow, ["a green circle in the center"], steps=2)
    assert images.shape == (1, 3, RESOLUTION, RESOLUTION)


def test_shipped_weight_files_stay_small():
    """Every shipped weight file is under 5 MB (large ones are sharded) and all assets under 25 MB."""
    from stepdistill.toy.teachers import ASSETS_DIR, folder_size

    sizes = {str(p.relative_to(ASSETS_DIR)): p.stat().st_size for p in ASSETS_DIR.rglob("*.safetensors")}
    assert sizes and max(sizes.values()) < 5 * 2**20, sizes
    assert folder_size(ASSETS_DIR) < 25 * 2**20
