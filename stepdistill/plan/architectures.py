"""The real architectures of the common Hub teachers, as pipeline folders of config files (no weights).

``stepdistill plan`` builds a teacher from its folder's config files under FakeTensorMode. A local folder
or a downloaded Hub snapshot already has them; for the ids below, which the shipped recipes use, the
folder is written from the published ``config.json`` values, so the planner runs offline. Tokenizers are
byte-level stand-ins padded to the real lengths (77 CLIP tokens; 256 / 512 T5 tokens as the SD3 / FLUX
pipelines pad): the networks' cost depends on the lengths, not on the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from stepdistill.bench.architectures import (
    CLIP_BIGG_TEXT,
    CLIP_L_TEXT,
    SD15_SCHEDULER,
    SD15_UNET,
    SD15_VAE,
    SDXL_SCHEDULER,
    SDXL_UNET,
    SDXL_VAE,
    write_clip_tokenizer,
)
from stepdistill.models.tiny import write_t5_tokenizer

# text_encoder_3 of SD3 and text_encoder_2 of FLUX.1: T5 v1.1 XXL's encoder (google/t5-v1_1-xxl).
T5_XXL = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "is_encoder_decoder": False, "use_cache": False,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "tie_word_embeddings": False,
}
# The 16-channel VAE of SD3 and FLUX.1 (same layout, each its own scale and shift).
_VAE16 = {**SD15_VAE, "latent_channels": 16, "sample_size": 1024, "use_quant_conv": False,
          "use_post_quant_conv": False, "force_upcast": True}
SD3_VAE = {**_VAE16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {**_VAE16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# stabilityai/stable-diffusion-3-medium-diffusers: transformer/config.json
SD3_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
# black-forest-labs/FLUX.1-dev: transformer/config.json (FLUX.1-schnell: guidance_embeds false)
FLUX1_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLOW_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_SCHEDULER = {**FLOW_SCHEDULER, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096}

_CLIP_PROJ = "CLIPTextModelWithProjection"


def _write(folder: Path, name: str, data: dict, filename: str = "config.json") -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / filename).write_text(json.dumps(data, indent=1))


def _clip(folder: Path, encoder: str, tokenizer: str, config: dict, cls: str) -> dict:
    tok, bos, eos, _ = write_clip_tokenizer(folder / tokenizer)
    tok.save_pretrained(folder / tokenizer)  # with model_max_length=77
    _write(folder, encoder, {**config, "architectures": [cls], "model_type": "clip_text_model",
                             "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos})
    return {encoder: ["transformers", cls], tokenizer: ["transformers", "CLIPTokenizer"]}


def _t5(folder: Path, encoder: str, tokenizer: str, max_length: int) -> dict:
    write_t5_tokenizer(folder / tokenizer).save_pretrained(folder / tokenizer)
    config = json.loads((folder / tokenizer / "tokenizer_config.json").read_text())
    config["model_max_length"] = max_length
    (folder / tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    _write(folder, encoder, {**T5_XXL, "architectures": ["T5EncoderModel"], "model_type": "t5"})
    return {encoder: ["transformers", "T5EncoderModel"], tokenizer: ["transformers", "T5TokenizerFast"]}


def _diffusers(folder: Path, name: str, cls: str, config: dict, scheduler: bool = False) -> dict:
    _write(folder, name, {"_class_name": cls, **config}, "scheduler_config.json" if scheduler else "config.json")
    return {name: ["diffusers", cls]}


def _sd15(folder: Path) -> dict:
    return {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
            "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
            **_diffusers(folder, "unet", "UNet2DConditionModel", SD15_UNET),
            **_diffusers(folder, "vae", "AutoencoderKL", SD15_VAE),
            **_diffusers(folder, "scheduler", "PNDMScheduler", SD15_SCHEDULER, scheduler=True),
            **_clip(folder, "text_encoder", "tokenizer", CLIP_L_TEXT, "CLIPTextModel")}


def _sdxl(folder: Path) -> dict:
    return {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
            **_diffusers(folder, "unet", "UNet2DConditionModel", SDXL_UNET),
            **_diffusers(folder, "vae", "AutoencoderKL", SDXL_VAE),
            **_diffusers(folder, "scheduler", "EulerDiscreteScheduler", SDXL_SCHEDULER, scheduler=True),
            **_clip(folder, "text_encoder", "tokenizer", CLIP_L_TEXT, "CLIPTextModel"),
            **_clip(folder, "text_encoder_2", "tokenizer_2", CLIP_BIGG_TEXT, _CLIP_PROJ)}


def _sd3_medium(folder: Path) -> dict:
    return {"_class_name": "StableDiffusion3Pipeline",
            **_diffusers(folder, "transformer", "SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER),
            **_diffusers(folder, "vae", "AutoencoderKL", SD3_VAE),
            **_diffusers(folder, "scheduler", "FlowMatchEulerDiscreteScheduler", FLOW_SCHEDULER, scheduler=True),
            **_clip(folder, "text_encoder", "tokenizer", CLIP_L_TEXT, _CLIP_PROJ),
            **_clip(folder, "text_encoder_2", "tokenizer_2", CLIP_BIGG_TEXT, _CLIP_PROJ),
            **_t5(folder, "text_encoder_3", "tokenizer_3", 256)}


def _flux(folder: Path, guidance: bool) -> dict:
    return {"_class_name": "FluxPipeline",
            **_diffusers(folder, "transformer", "FluxTransformer2DModel",
                         {**FLUX1_DEV_TRANSFORMER, "guidance_embeds": guidance}),
            **_diffusers(folder, "vae", "AutoencoderKL", FLUX_VAE),
            **_diffusers(folder, "scheduler", "FlowMatchEulerDiscreteScheduler",
                         FLUX_DEV_SCHEDULER if guidance else FLOW_SCHEDULER, scheduler=True),
            **_clip(folder, "text_encoder", "tokenizer", CLIP_L_TEXT, "CLIPTextModel"),
            **_t5(folder, "text_encoder_2", "tokenizer_2", 512)}


ARCHITECTURES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _sd15,
    "runwayml/stable-diffusion-v1-5": _sd15,
    "stabilityai/stable-diffusion-xl-base-1.0": _sdxl,
    "stabilityai/stable-diffusion-3-medium-diffusers": _sd3_medium,
    "black-forest-labs/FLUX.1-dev": lambda folder: _flux(folder, guidance=True),
    "black-forest-labs/FLUX.1-schnell": lambda folder: _flux(folder, guidance=False),
}


def write_architecture(hub_id: str, folder: str | Path) -> Path:
    """Write the config-only pipeline folder of ``hub_id`` (one of ``ARCHITECTURES``) to ``folder``."""
    if hub_id not in ARCHITECTURES:
        raise ValueError(f"no shipped architecture for {hub_id!r}; shipped: {', '.join(ARCHITECTURES)}. "
                         "Point model.pretrained at a local pipeline folder (its config files are enough)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = ARCHITECTURES[hub_id](folder)
    (folder / "model_index.json").write_text(json.dumps({**index, "_diffusers_version": "0.42.0"}, indent=1))
    return folder
