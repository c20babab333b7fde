"""The real SD 1.5 and SDXL architectures with random weights, as diffusers pipeline folders.

Training-speed and memory benchmarks need the real shapes (860M-parameter SD 1.5 UNet, 2.6B SDXL
UNet, CLIP ViT-L and OpenCLIP bigG text encoders, 8x KL VAE), not the real weights. These builders
write ordinary ``save_pretrained`` folders (safetensors) from the published ``config.json`` values
of ``stable-diffusion-v1-5/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-xl-base-1.0``,
with weights drawn after ``torch.manual_seed`` — nothing is downloaded, so a benchmark runs on a
machine without Hub access. The tokenizers are byte-level CLIP BPE vocabularies (a few hundred
tokens) padded to 77 tokens, which is what the text encoders' cost depends on.

``random_pipeline(arch)`` builds a folder once and caches it under ``$STEPDISTILL_CACHE/random/<arch>``
(default ``~/.cache/stepdistill/random/<arch>``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger("stepdistill")

ARCHS = ("sd15", "sdxl", "tiny")

# Bump when a config below changes, so cached folders are rebuilt.
RANDOM_VERSION = 1
_MARKER = "stepdistill_random.json"

# Resolution each architecture is trained at (pixels).
NATIVE_RESOLUTION = {"sd15": 512, "sdxl": 1024}

# ---- published configs ---------------------------------------------------------------------------
# stable-diffusion-v1-5: unet/config.json
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# stable-diffusion-xl-base-1.0: unet/config.json
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "upcast_attention": False,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 (pooled bigG) + 6 * 256 (size/crop ids)
}

# vae/config.json of SD 1.5 (SDXL: same architecture, its own scaling factor and sample size)
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# text_encoder/config.json: CLIP ViT-L/14 text tower (SD 1.5, and SDXL's first encoder)
CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
# text_encoder_2/config.json of SDXL: OpenCLIP ViT-bigG/14 text tower with its projection
CLIP_BIGG_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "layer_norm_eps": 1e-5,
}

# scheduler/scheduler_config.json
_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD15_SCHEDULER = {
    **_SD_BETAS,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}  # PNDMScheduler
SDXL_SCHEDULER = {
    **_SD_BETAS,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}  # EulerDiscreteScheduler

_CLIP_MAX_LENGTH = 77


def unet_config(arch: str) -> dict:
    """The UNet config (``UNet2DConditionModel.from_config``) of ``arch`` ("sd15" or "sdxl")."""
    if arch == "sd15":
        return dict(SD15_UNET)
    if arch == "sdxl":
        return dict(SDXL_UNET)
    raise ValueError(f"no full-size UNet config for arch {arch!r}; choose sd15 or sdxl")


# ---- tokenizer -----------------------------------------------------------------------------------
def _byte_alphabet() -> list[str]:
    """One printable character per byte value, the byte-level BPE convention of GPT-2 and CLIP."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_clip_tokenizer(folder: str | Path, max_length: int = _CLIP_MAX_LENGTH):
    """A byte-level CLIP tokenizer (every byte a token, as word piece and as word end; no merges).

    Any text tokenizes (one token per byte), prompts are padded to ``max_length`` like the real
    tokenizer. Returns ``(tokenizer, bos_id, eos_id, vocab_size)``.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # transformers 5: CLIPTokenizer(vocab_file=...) ignores the files; from_pretrained reads them.
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    return tokenizer, len(tokens) - 2, len(tokens) - 1, len(tokens)


# ---- components ----------------------------------------------------------------------------------
def _text_encoder(config: dict, bos: int, eos: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**config, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def _build(arch: str, tmp: Path, seed: int):
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tok, bos, eos, _ = write_clip_tokenizer(tmp / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_config(arch)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL.from_config(SD15_VAE if arch == "sd15" else SDXL_VAE).eval()
    torch.manual_seed(seed + 2)
    text_encoder = _text_encoder(CLIP_L_TEXT, bos, eos, with_projection=False)
    if arch == "sd15":
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
            scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
    tok2, bos2, eos2, _ = write_clip_tokenizer(tmp / "tokenizer_2")
    torch.manual_seed(seed + 3)
    text_encoder_2 = _text_encoder(CLIP_BIGG_TEXT, bos2, eos2, with_projection=True)
    return diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def build_random_pipeline(arch: str, folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16,
                          device: str | torch.device | None = None) -> Path:
    """Write the ``arch`` pipeline ("sd15", "sdxl"; "tiny": the test pipeline) with random weights.

    Weights are initialised on ``device`` (default: CUDA when available: a 2.6B-parameter random
    init takes seconds there, a minute on a few CPU cores) and saved in ``dtype`` (default fp16,
    half the disk; the trainer casts to its own dtypes). Returns ``folder``.
    """
    folder = Path(folder)
    if arch == "tiny":
        from stepdistill.models.tiny import build_tiny_pipeline

        return Path(build_tiny_pipeline("sd15", folder, seed=seed))
    if arch not in NATIVE_RESOLUTION:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    try:
        _build_and_save(arch, folder, seed, dtype, device)
    except (RuntimeError, NotImplementedError) as e:
        if device.type == "cpu":
            raise
        logger.warning("building the random %s pipeline on %s failed (%s); building on the CPU", arch, device, e)
        shutil.rmtree(folder, ignore_errors=True)
        _build_and_save(arch, folder, seed, dtype, torch.device("cpu"))
    return folder


def _build_and_save(arch: str, folder: Path, seed: int, dtype: torch.dtype, device: torch.device) -> None:
    import tempfile

    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), tempfile.TemporaryDirectory() as tmp, device:
            pipe = _build(arch, Path(tmp), seed)
            pipe.to(dtype=dtype)
            pipe.save_pretrained(str(folder), safe_serialization=True)
            del pipe
    finally:
        if devices:
            torch.cuda.empty_cache()


def _version(arch: str) -> str:
    if arch == "tiny":
        from stepdistill.models.tiny import TINY_VERSION

        return f"tiny-{TINY_VERSION}"
    return str(RANDOM_VERSION)


def cache_root() -> Path:
    return Path(os.environ.get("STEPDISTILL_CACHE") or "~/.cache/stepdistill").expanduser()


def random_pipeline(arch: str, seed: int = 0) -> Path:
    """The cached random pipeline folder of ``arch``, built on first use."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    folder = cache_root() / "random" / (arch if seed == 0 else f"{arch}-seed{seed}")
    marker = folder / _MARKER
    version = _version(arch)
    if marker.is_file() and (folder / "model_index.json").is_file():
        try:
            info = json.loads(marker.read_text())
        except ValueError:
            info = {}
        if info.get("version") == version and info.get("seed") == seed:
            return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("building random-weight %s pipeline in %s (once)", arch, folder)
    try:
        build_random_pipeline(arch, partial, seed=seed)
        (partial / _MARKER).write_text(json.dumps({"arch": arch, "seed": seed, "version": version}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder
