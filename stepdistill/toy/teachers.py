"""The shipped toy teachers: real diffusers pipelines trained on the procedural shapes of ``toy.data``.

Two pipelines live under ``stepdistill/toy/assets/`` and load exactly as a user loads SDXL,
``DiffusionPipeline.from_pretrained(folder)``; ``model.pretrained: toy-sd`` resolves to them
(``teacher_path``, used by ``models.loading.resolve_pretrained``):

* ``toy-sd`` — a ``StableDiffusionPipeline``: tiny ``AutoencoderKL`` (32x32x3 <-> 8x8x4, two
  downsamplings), tiny ``CLIPTextModel`` with a real ``CLIPTokenizer`` whose BPE merges spell every
  caption word as one token, ``UNet2DConditionModel`` predicting epsilon on SD's scaled-linear betas,
  shipped with a DDIM scheduler ("trailing" spacing, good at 50 steps and usable at 8).
* ``toy-flow`` — a ``StableDiffusion3Pipeline``: tiny ``SD3Transformer2DModel`` (patch 2 on the same
  8x8x4 latents, so 16 image tokens), ``FlowMatchEulerDiscreteScheduler`` (shift ``FLOW_SHIFT``), the
  toy-sd VAE, two small CLIP encoders with projection, and a tiny T5 encoder (kept, not ``None``, so
  a plain ``from_pretrained`` reloads the folder — see ``models/tiny.py``).

This module builds the components (architectures and tokenizers); ``toy.train_teacher`` trains
them and writes the folders.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from stepdistill.toy.data import RESOLUTION, vocabulary

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# Shipped teacher name -> the ``--kind`` of ``stepdistill toy train-teacher`` that builds it.
TEACHERS = {"toy-sd": "sd", "toy-flow": "flow"}

LATENT_CHANNELS = 4
LATENT_SIZE = RESOLUTION // 4  # two 2x downsamplings in the VAE: 32 px -> 8x8 latents
TEXT_MAX_LENGTH = 16  # BOS + the longest caption (7 words) + EOS fits with room to spare
TEXT_HIDDEN = 64

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def teacher_path(name: str) -> Path:
    """The shipped folder of toy teacher ``name`` ("toy-sd" or "toy-flow"); ValueError when unknown or missing."""
    if name not in TEACHERS:
        raise ValueError(f"Unknown toy teacher {name!r}; the shipped toy teachers are: {', '.join(TEACHERS)}")
    folder = ASSETS_DIR / name
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"The toy teacher {name!r} is missing ({folder} has no model_index.json). Train it with "
            f"`stepdistill toy train-teacher --kind {TEACHERS[name]}`"
            + (" (after toy-sd: it reuses toy-sd's VAE and text encoder)" if name == "toy-flow" else "")
            + f". Shipped toy teachers: {', '.join(TEACHERS)}."
        )
    return folder


# ---- tokenizers ---------------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE (GPT-2/CLIP) uses for the 256 byte values."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE training on ``words`` (each counted once), CLIP-style ("</w>" ends a word), to one token per word.

    Repeatedly merges the most frequent adjacent pair (ties broken by the pair itself, so the result
    is deterministic) until every word is a single symbol. Applying the merges in this order, as
    the tokenizer does, reproduces the same segmentation: every word becomes exactly one token.
    """
    seqs = [[*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for s in seqs for pair in zip(s, s[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out


def write_clip_tokenizer(folder: str | Path):
    """A real ``CLIPTokenizer`` over the toy vocabulary, written to ``folder`` and loaded from it.

    vocab = the 256 byte symbols, the same with "</w>", the merged symbols, BOS and EOS: any text
    tokenizes (unknown words fall back to bytes), and every caption word is a single token.
    ``model_max_length`` is ``TEXT_MAX_LENGTH`` (the text encoders have as many positions).
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(vocabulary())
    tokens = _byte_symbols() + [s + "</w>" for s in _byte_symbols()]
    tokens += list(dict.fromkeys(a + b for a, b in merges))
    tokens += [_BOS, _EOS]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=TEXT_MAX_LENGTH)


def write_t5_tokenizer(folder: str | Path):
    """A T5 (SentencePiece-Unigram) tokenizer: <pad>=0, </s>=1, <unk>=2, one piece per caption word.

    Other words fall back to single characters, so any plain-ASCII text tokenizes.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in vocabulary()]
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars if c not in vocabulary()]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(folder / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), extra_ids=0, model_max_length=512)


# ---- components ---------------------------------------------------------------------------------
def build_vae(scaling_factor: float = 1.0, channels: tuple[int, ...] = (16, 32, 64)):
    """32x32x3 <-> 8x8x4 KL autoencoder: three blocks, two downsamplings, no attention.

    ``shift_factor`` is 0.0 (not None): the SD3 pipeline adds it when decoding.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        scaling_factor=scaling_factor,
        shift_factor=0.0,
        mid_block_add_attention=False,
    )


def build_clip_text_model(vocab_size: int, with_projection: bool = False, layers: int = 2):
    """Tiny CLIP text encoder (``TEXT_HIDDEN`` wide, ``TEXT_MAX_LENGTH`` positions).

    Token ids follow ``write_clip_tokenizer``: BOS and EOS are the last two ids; padding is EOS.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_unet(channels: tuple[int, ...] = (48, 96), layers_per_block: int = 1):
    """Conditional UNet on 8x8x4 latents, one level per channel count (three: 8x8, 4x4, 2x2 — the
    2x2 bottleneck sees the image as quadrants), cross-attention to the text at every level."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        norm_num_groups=16,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=16,
        # The attention-pooled text also joins the timestep embedding (driven by encoder_hidden_states
        # alone, so the SD pipeline needs nothing extra): a global colour/kind/position signal in every
        # resnet, besides the cross-attention.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_t5_encoder(vocab_size: int, d_model: int = 2 * TEXT_HIDDEN):
    """Tiny T5 encoder. Its width is the transformer's ``joint_attention_dim``: the SD3 pipeline
    zero-pads the two concatenated CLIP hidden states (2 x ``TEXT_HIDDEN``) to it."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def build_sd3_transformer(num_layers: int = 4, heads: int = 4, head_dim: int = 16):
    """SD3 MMDiT on 8x8x4 latents with 2x2 patches: 16 image tokens, ``heads * head_dim`` wide."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=2 * TEXT_HIDDEN,  # = T5 width
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * TEXT_HIDDEN,  # both CLIP pooled projections concatenated
        pos_embed_max_size=LATENT_SIZE // 2,
    )


# ---- schedulers ---------------------------------------------------------------------------------
# SD's scaled-linear betas; the UNet is trained with DDPM on them.
_VP_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

FLOW_SHIFT = 2.0


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_VP_BETAS, prediction_type="epsilon", clip_sample=False)


def sampling_scheduler():
    """toy-sd's shipped scheduler: DDIM on the training betas, "trailing" spacing (the first step is
    t=999 at any step count, so 8-step and 50-step sampling both start from noise)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **_VP_BETAS,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
        steps_offset=1,  # ignored by "trailing"; 1 keeps the SD pipeline from rewriting the config
    )


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


# ---- pipelines ----------------------------------------------------------------------------------
def assemble_sd(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def assemble_flow(vae, text_encoders, tokenizers, transformer):
    """``text_encoders``/``tokenizers``: the two CLIPs with projection and the T5 (three each)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(),
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=text_encoders[2],
        tokenizer_3=tokenizers[2],
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def folder_size(folder: str | Path) -> int:
    """Total bytes of the files under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
