"""Tiny random diffusers pipelines, one per supported family, for tests and smoke runs.

Each pipeline has the real architecture classes and the real pipeline class of its family (so the
same code path as a full-size teacher runs: ``DiffusionPipeline.from_pretrained``, the pipeline's
own ``encode_prompt``, its scheduler), but with a few thousand parameters per component and random
weights. They are built from configs, seeded, and written with ``save_pretrained`` (safetensors);
nothing is downloaded. ``resolve_pretrained("tiny:<family>")`` builds and caches them on demand.

Shapes kept faithful to the full-size models where it matters to the code around them:

* the VAE downsamples 8x (four encoder blocks), like every real SD/SDXL/SD3/FLUX VAE;
* 4 latent channels for SD 1.5/2.x/SDXL, 16 for SD3/FLUX, with their real scaling/shift factors;
* SDXL has two CLIP text encoders (the second with a projection) and ``text_time`` added conditions;
* SD3 has two CLIP encoders with projection and a T5 encoder (a pipeline saved with
  ``text_encoder_3=None`` cannot be re-loaded without passing ``text_encoder_3=None`` again, so the
  tiny one keeps T5 and loads with a plain ``from_pretrained``, like the real one);
* FLUX has CLIP + T5, guidance embedding (like FLUX.1-dev) and dynamic timestep shifting.

The tokenizers are built here too: a byte-level CLIP BPE vocabulary (every byte is a token, no
merges, so any text tokenizes) written as ``vocab.json``/``merges.txt`` and loaded with
``CLIPTokenizer.from_pretrained`` (transformers 5 ignores ``CLIPTokenizer(vocab_file=...)``), and a
character-level T5 Unigram tokenizer built with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

from stepdistill.families import FAMILIES

# Pixel resolution each tiny pipeline is meant to run at. With the 8x VAE this gives 8x8 latents:
# a 2-level UNet bottleneck of 4x4, and 4x4 = 16 image tokens for SD3 (patch 2) and FLUX (2x2 packing).
TINY_RESOLUTION = {"sd15": 64, "sd2": 64, "sdxl": 64, "sd3": 64, "flux": 64}

# Bump when the tiny architectures change, so cached folders (resolve_pretrained) are rebuilt.
TINY_VERSION = 1

_CLIP_MAX_LENGTH = 77
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


# ---- tokenizers ---------------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for the 256 byte values (GPT-2/CLIP convention).

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points 256+.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _write_clip_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer: vocab = 256 bytes + 256 word-final bytes + BOS/EOS (514 tokens)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [_BOS, _EOS]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per byte
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=_CLIP_MAX_LENGTH)


def _clip_vocab_size() -> int:
    return 2 * 256 + 2


def write_t5_tokenizer(folder: Path):
    """A character-level T5 (SentencePiece-Unigram style) tokenizer: <pad>=0, </s>=1, <unk>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(folder / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), extra_ids=0, model_max_length=512)


# ---- model components ---------------------------------------------------------------------------
def _clip_text_model(
    seed: int, with_projection: bool = False, hidden_size: int = 32, projection_dim: int = 32
):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=_clip_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=_clip_vocab_size() - 2,
        eos_token_id=_clip_vocab_size() - 1,
        pad_token_id=_clip_vocab_size() - 1,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _t5_encoder(seed: int, vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _vae(seed: int, latent_channels: int, scaling_factor: float, shift_factor: float | None = None):
    """An 8x-downsampling KL autoencoder (four blocks), like the real ones."""
    from diffusers import AutoencoderKL

    flux_like = latent_channels == 16  # SD3/FLUX VAEs have no quant convs
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION["sd15"],
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=not flux_like,
        use_post_quant_conv=not flux_like,
    ).eval()


def _unet(seed: int, cross_attention_dim: int, sdxl: bool = False, linear_projection: bool = False):
    from diffusers import UNet2DConditionModel

    kwargs = {}
    if sdxl:
        # SDXL's added conditioning: pooled text embeds (projection_dim of text_encoder_2 = 32) and
        # six size/crop ids, each embedded with addition_time_embed_dim channels: 32 + 6 * 8 = 80.
        kwargs = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION["sd15"] // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        use_linear_projection=linear_projection,
        **kwargs,
    ).eval()


def _sd_scheduler(prediction_type: str, cls_name: str = "DDIMScheduler"):
    import diffusers

    # SD's scaled-linear betas; "leading" spacing with offset 1 as in the released SD/SDXL configs.
    return getattr(diffusers, cls_name)(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
        **({"clip_sample": False, "set_alpha_to_one": False} if cls_name == "DDIMScheduler" else {}),
    )


# ---- pipelines ----------------------------------------------------------------------------------
def _build_sd(family: str, seed: int, tmp: Path):
    from diffusers import StableDiffusionPipeline

    v_pred = family == "sd2"  # SD 2.x 768 px: v-prediction (and OpenCLIP; irrelevant at this size)
    return StableDiffusionPipeline(
        vae=_vae(seed, 4, 0.18215),
        text_encoder=_clip_text_model(seed),
        tokenizer=_write_clip_tokenizer(tmp / "tokenizer"),
        unet=_unet(seed, cross_attention_dim=32, linear_projection=v_pred),
        scheduler=_sd_scheduler("v_prediction" if v_pred else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int, tmp: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=_vae(seed, 4, 0.13025),
        text_encoder=_clip_text_model(seed),
        text_encoder_2=_clip_text_model(seed + 1, with_projection=True),
        tokenizer=_write_clip_tokenizer(tmp / "tokenizer"),
        tokenizer_2=_write_clip_tokenizer(tmp / "tokenizer_2"),
        # cross-attention sees both encoders' hidden states concatenated: 32 + 32
        unet=_unet(seed, cross_attention_dim=64, sdxl=True, linear_projection=True),
        scheduler=_sd_scheduler("epsilon", "EulerDiscreteScheduler"),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_sd3(seed: int, tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    t5_tokenizer = write_t5_tokenizer(tmp / "tokenizer_3")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION["sd3"] // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        # = T5 width; the CLIP hidden states (32 + 32) are zero-padded to it, as in the real model.
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,  # both CLIP pooled projections concatenated
        pos_embed_max_size=16,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(seed, 16, 1.5305, 0.0609),
        text_encoder=_clip_text_model(seed, with_projection=True),
        tokenizer=_write_clip_tokenizer(tmp / "tokenizer"),
        text_encoder_2=_clip_text_model(seed + 1, with_projection=True),
        tokenizer_2=_write_clip_tokenizer(tmp / "tokenizer_2"),
        text_encoder_3=_t5_encoder(seed + 2, vocab_size=len(t5_tokenizer), d_model=64),
        tokenizer_3=t5_tokenizer,
    )


def _build_flux(seed: int, tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    t5_tokenizer = write_t5_tokenizer(tmp / "tokenizer_2")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=2,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP pooled output
        guidance_embeds=True,  # like FLUX.1-dev (guidance-distilled)
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ).eval()
    # FLUX.1-dev's scheduler config: the shift grows with the number of image tokens.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed, 16, 0.3611, 0.1159),
        text_encoder=_clip_text_model(seed),
        tokenizer=_write_clip_tokenizer(tmp / "tokenizer"),
        text_encoder_2=_t5_encoder(seed + 1, vocab_size=len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def build_tiny_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build the tiny random pipeline of ``family`` and ``save_pretrained`` it (safetensors) to ``path``.

    Every component is created right after ``torch.manual_seed`` (``seed``; ``seed + 1`` and
    ``seed + 2`` for the second and third text encoders), so the same seed gives bit-identical weights. The global RNG state is
    restored afterwards. Returns ``path``.
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; tiny pipelines exist for: {', '.join(FAMILIES)}")
    path = Path(path)
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if family in ("sd15", "sd2"):
            pipe = _build_sd(family, seed, tmp)
        elif family == "sdxl":
            pipe = _build_sdxl(seed, tmp)
        elif family == "sd3":
            pipe = _build_sd3(seed, tmp)
        else:
            pipe = _build_flux(seed, tmp)
        pipe.save_pretrained(str(path), safe_serialization=True)
    return path
