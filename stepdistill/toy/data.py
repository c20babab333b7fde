"""The toy text-to-image domain: coloured shapes on a plain background, with captions.

Every image is drawn on the fly from its attributes (colour, kind, position, size jitter), so the
data set is unlimited, seeded and reproducible: ``render(attrs, rng)`` → 32×32 RGB. Captions read
"a red circle at the top left". A fixed set of colour/kind/position combinations is held out of
training (``HELD_OUT``) to test compositional prompts; ``eval_prompts()`` is the fixed evaluation split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

RESOLUTION = 32

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "white": (235, 235, 235),
}
KINDS = ("circle", "square", "triangle")
# (name in the caption, centre as a fraction of the image side: (x, y))
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "center": (0.5, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
BACKGROUND = (30, 30, 36)


@dataclass(frozen=True)
class Attributes:
    color: str
    kind: str
    position: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.color} {self.kind} {where}"

    @property
    def labels(self) -> tuple[int, int, int]:
        """Class indices (colour, kind, position) for the attribute classifier."""
        return list(COLORS).index(self.color), KINDS.index(self.kind), list(POSITIONS).index(self.position)


ALL = tuple(Attributes(c, k, p) for c in COLORS for k in KINDS for p in POSITIONS)


def _held_out() -> frozenset[Attributes]:
    # One combination in eight, chosen by a fixed seed; every colour, kind and position still occurs
    # in training, only these combinations of them do not.
    rng = random.Random(1234)
    chosen = rng.sample(ALL, len(ALL) // 8)
    return frozenset(chosen)


HELD_OUT = _held_out()
TRAIN = tuple(a for a in ALL if a not in HELD_OUT)


def parse_caption(caption: str) -> Attributes:
    """Inverse of ``Attributes.caption`` (raises ValueError for anything else)."""
    for attrs in ALL:
        if attrs.caption == caption.strip():
            return attrs
    raise ValueError(f"{caption!r} is not a toy-domain caption (e.g. {ALL[0].caption!r})")


def render(attrs: Attributes, rng: np.random.Generator | None = None, resolution: int = RESOLUTION) -> Image.Image:
    """Draw one image: the shape with a little jitter in size and position (none when rng is None)."""
    image = Image.new("RGB", (resolution, resolution), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[attrs.position]
    jitter = rng.uniform(-0.04, 0.04, size=2) if rng is not None else np.zeros(2)
    radius = (0.17 + (rng.uniform(-0.03, 0.03) if rng is not None else 0.0)) * resolution
    x, y = (cx + jitter[0]) * resolution, (cy + jitter[1]) * resolution
    color = COLORS[attrs.color]
    if attrs.kind == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    elif attrs.kind == "square":
        r = radius * 0.9
        draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius * 0.85), (x + radius, y + radius * 0.85)], fill=color)
    return image


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images → [N, 3, H, W] float tensor in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def sample_batch(n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, list[Attributes]]:
    """``n`` random images of ``split`` ("train": held-out combinations excluded; "all"; "held_out")."""
    pool = {"train": TRAIN, "all": ALL, "held_out": tuple(sorted(HELD_OUT, key=lambda a: a.caption))}[split]
    rng = np.random.default_rng(seed)
    attrs = [pool[i] for i in rng.integers(len(pool), size=n)]
    return to_tensor([render(a, rng) for a in attrs]), attrs


def eval_prompts(split: str = "all") -> list[str]:
    """The fixed evaluation prompts: every combination ("all"), only "train" ones, or "held_out"."""
    pool = {"train": TRAIN, "all": ALL, "held_out": sorted(HELD_OUT, key=lambda a: a.caption)}[split]
    return [a.caption for a in pool]


def vocabulary() -> list[str]:
    """Every word of every caption (for the toy CLIP tokenizer)."""
    words = {"a", "at", "the", "in"} | set(COLORS) | set(KINDS)
    for p in POSITIONS:
        words |= set(p.split())
    return sorted(words)
