"""CLIP score of generated images against their prompts, with open_clip or transformers' CLIP.

Reported as torchmetrics' ``CLIPScore`` reports it: ``max(100 * mean_i cos(E_image_i, E_text_i), 0)``
(torchmetrics clamps the *average*; Hessel et al. 2021 clamp each image and weight by 2.5 — for
real text-image pairs the cosine is positive and the two agree up to that factor). The default model is
open_clip's ViT-g-14 with the ``laion2b_s34b_b88k`` weights, the model of the SDXL-era evaluations that
DMD2 follows (GigaGAN, DMD2 report 100 x cosine with ViT-g/14). Images reach CLIP as a user's saved PNG
would: quantised to uint8, then the model's own preprocessing (resize, center crop, normalise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["DEFAULT_MODEL", "DEFAULT_PRETRAINED", "CLIPScorer", "clip_score", "to_pil"]

DEFAULT_MODEL = "ViT-g-14"
DEFAULT_PRETRAINED = "laion2b_s34b_b88k"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [0, 1] → uint8 PIL images."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def clip_score(cosines: torch.Tensor | Sequence[float]) -> float:
    """torchmetrics' CLIPScore from per-image cosine similarities: max(100 * mean(cos), 0)."""
    cos = torch.as_tensor(cosines, dtype=torch.float64)
    if cos.numel() == 0:
        raise ValueError("CLIP score of no images")
    return float(torch.clamp(100 * cos.mean(), min=0))


class CLIPScorer:
    """Image and text embeddings (L2-normalised) of one CLIP model; ``cosine(images, prompts)`` per pair."""

    def __init__(self, encode_images: Callable[[list[Image.Image]], torch.Tensor],
                 encode_texts: Callable[[list[str]], torch.Tensor], name: str):
        self._encode_images, self._encode_texts, self.name = encode_images, encode_texts, name

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_open_clip(cls, model_name: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED,
                       device: str | torch.device = "cpu", model=None, preprocess=None, tokenizer=None
                       ) -> CLIPScorer:
        """An open_clip model: ``model_name`` (a config name, ``hf-hub:`` / ``local-dir:`` id) with the
        ``pretrained`` tag or a local checkpoint file; or an already built ``model``/``preprocess``/``tokenizer``.
        ValueError with the fix when the weights cannot be had (e.g. a tag offline)."""
        import open_clip

        if model is None:
            looks_like_file = pretrained and (Path(pretrained).suffix in (".bin", ".pt", ".pth", ".safetensors")
                                              or "/" in pretrained)
            if looks_like_file and not Path(pretrained).expanduser().is_file():
                raise ValueError(f"--clip-pretrained {pretrained!r}: no such checkpoint file")
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=str(Path(pretrained).expanduser()) if looks_like_file else pretrained,
                    device=device, require_pretrained=True)  # never a silently random CLIP
                tokenizer = open_clip.get_tokenizer(model_name)
            except Exception as e:  # open_clip raises RuntimeError for a failed download, others for bad names
                raise ValueError(
                    f"could not load the open_clip model {model_name!r} with weights {pretrained!r} "
                    f"({type(e).__name__}: {str(e)[:300]}). Offline, download the checkpoint elsewhere and pass "
                    f"--clip-pretrained PATH (or --clip-model local-dir:FOLDER / --clip-transformers FOLDER); "
                    f"or pass --no-clip") from None
        model = model.to(device).eval()

        @torch.no_grad()
        def encode_images(images):
            pixels = torch.stack([preprocess(im) for im in images]).to(device)
            return model.encode_image(pixels).float()

        @torch.no_grad()
        def encode_texts(texts):
            return model.encode_text(tokenizer(texts).to(device)).float()

        return cls(encode_images, encode_texts, f"open_clip:{model_name}/{pretrained}")

    @classmethod
    def from_transformers(cls, folder: str, device: str | torch.device = "cpu") -> CLIPScorer:
        """transformers' ``CLIPModel`` and its processor from a folder (or a cached Hub id)."""
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(folder).to(device).eval()
            processor = CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ValueError(f"--clip-transformers {folder!r}: cannot load a CLIPModel and CLIPProcessor from it "
                             f"({str(e)[:300]}); give a folder saved with save_pretrained, or pass --no-clip") from None

        def pooled(out):
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        @torch.no_grad()
        def encode_images(images):
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
            return pooled(model.get_image_features(pixel_values=pixels)).float()

        @torch.no_grad()
        def encode_texts(texts):
            tok = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
            return pooled(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                  attention_mask=tok["attention_mask"].to(device))).float()

        return cls(encode_images, encode_texts, f"transformers:{folder}")

    # -- embeddings ------------------------------------------------------------------------------
    def image_embeddings(self, images: torch.Tensor | list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (float32, CPU) of images [N, 3, H, W] in [0, 1] or PIL images."""
        pil = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
        out = [self._encode_images(pil[i:i + batch_size]).cpu() for i in range(0, len(pil), batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def text_embeddings(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        prompts = list(prompts)
        out = [self._encode_texts(prompts[i:i + batch_size]).cpu() for i in range(0, len(prompts), batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def cosine(self, images: torch.Tensor | list[Image.Image], prompts: Sequence[str], batch_size: int = 64
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine similarity [N] of each image with its prompt, image embeddings [N, D])."""
        if len(prompts) != len(images):
            raise ValueError(f"CLIP score: {len(images)} images but {len(prompts)} prompts")
        image_emb = self.image_embeddings(images, batch_size)
        text_emb = self.text_embeddings(prompts, batch_size)
        return (image_emb * text_emb).sum(-1), image_emb
