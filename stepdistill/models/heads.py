"""Discriminator heads on backbone features (DMD2's GAN term, LADD).

A ``GANHead`` turns the bottleneck features a ``Denoiser`` returns with ``return_features=True``
into one real/fake logit per sample:

* ``kind="conv"`` for UNet feature maps [B, C, h, w]:
  conv 4x4 stride 2 -> GroupNorm -> SiLU -> conv 3x3 -> adaptive average pool -> linear
  (the DMD2 classifier branch on the SD/SDXL mid-block; needs h, w >= 2);
* ``kind="tokens"`` for transformer tokens [B, N, D]:
  LayerNorm -> Linear -> SiLU -> mean over tokens -> Linear.

Build it with the known width (``GANHead(in_channels, kind=...)`` or ``GANHead.for_backbone``), or
lazily (``GANHead()``), in which case the layers are created on the first forward: run one forward
before creating the optimizer or loading a state dict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stepdistill.models.denoiser import unwrap_model


def _groups(channels: int, max_groups: int = 32) -> int:
    """The largest number of GroupNorm groups <= max_groups that divides ``channels``."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class GANHead(nn.Module):
    """Small classifier: backbone features -> one logit per sample, shape [B]."""

    KINDS = ("conv", "tokens")

    def __init__(self, in_channels: int | None = None, kind: str | None = None, hidden: int = 256):
        super().__init__()
        if kind is not None and kind not in self.KINDS:
            raise ValueError(f"GANHead kind={kind!r}; choose one of {self.KINDS}")
        self.in_channels = in_channels
        self.kind = kind
        self.hidden = hidden
        self.net: nn.Module | None = None
        if in_channels is not None and kind is not None:
            self._build(in_channels, kind)

    def _build(self, in_channels: int, kind: str) -> None:
        h = self.hidden
        if kind == "conv":
            self.net = nn.Sequential(
                nn.Conv2d(in_channels, h, kernel_size=4, stride=2, padding=1),
                nn.GroupNorm(_groups(h), h),
                nn.SiLU(),
                nn.Conv2d(h, h, kernel_size=3, padding=1),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(h, 1),
            )
        else:
            self.net = _TokenHead(in_channels, h)
        self.in_channels, self.kind = in_channels, kind

    @classmethod
    def for_backbone(cls, backbone: nn.Module, family: str | None = None, hidden: int = 256) -> GANHead:
        """A head sized for the bottleneck of ``backbone`` (a UNet's mid block or a transformer's blocks).

        UNet: ``block_out_channels[-1]`` channels, conv head. Transformers (SD3, FLUX): the inner
        width ``num_attention_heads * attention_head_dim``, token head. ``family`` is only checked
        for consistency when given.
        """
        config = unwrap_model(backbone).config
        if "block_out_channels" in config:
            if family in ("sd3", "flux"):
                raise ValueError(f"family={family!r} but the backbone is a UNet")
            return cls(int(config["block_out_channels"][-1]), kind="conv", hidden=hidden)
        if "num_attention_heads" in config and "attention_head_dim" in config:
            return cls(
                int(config["num_attention_heads"] * config["attention_head_dim"]),
                kind="tokens",
                hidden=hidden,
            )
        raise ValueError(f"Cannot infer the feature width of {type(unwrap_model(backbone)).__name__}")

    def forward(self, features: Tensor) -> Tensor:
        if self.net is None:  # lazy build from the first features
            if features.ndim == 4:
                self._build(features.shape[1], "conv")
            elif features.ndim == 3:
                self._build(features.shape[-1], "tokens")
            else:
                raise ValueError(
                    f"GANHead expects [B, C, h, w] or [B, N, D] features, got {tuple(features.shape)}"
                )
            self.to(features.device)
        expected_ndim = 4 if self.kind == "conv" else 3
        if features.ndim != expected_ndim:
            raise ValueError(
                f"GANHead(kind={self.kind!r}) expects {expected_ndim}-D features, got {tuple(features.shape)}"
            )
        weight = next(self.parameters())
        return self.net(features.to(weight.dtype)).squeeze(-1)

    def embed(self, features: Tensor) -> Tensor:
        """The pooled hidden vector [B, hidden] the final linear layer reads (built heads only)."""
        weight = next(self.parameters())
        x = features.to(weight.dtype)
        if self.kind == "conv":
            return self.net[:-1](x)
        return self.net.act(self.net.proj(self.net.norm(x))).mean(dim=1)

    def project(self, hidden: Tensor) -> Tensor:
        """The final linear layer: [B, hidden] -> logits [B]."""
        out = self.net[-1] if self.kind == "conv" else self.net.out
        return out(hidden).squeeze(-1)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, kind={self.kind!r}, hidden={self.hidden}"


class _TokenHead(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.out = nn.Linear(hidden, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.act(self.proj(self.norm(tokens)))
        return self.out(x.mean(dim=1))


class MultiLevelHeads(nn.Module):
    """One ``GANHead`` per feature level of a frozen backbone (LADD's discriminator, Sauer et al. 2024, Sec. 3).

    ``forward(features, cond)`` takes the list ``Denoiser.features`` returns (one tensor per level, UNet
    maps or transformer tokens) and gives logits [B, L], one column per level; the adversarial losses
    average over levels. With ``cond_dim``, each head is also conditioned on a prompt vector ``cond``
    [B, cond_dim] by projection (Miyato & Koyama 2018): ``logit = w.h + <h, P c> / sqrt(hidden)``, so
    a sample that fits its image statistics but not its prompt can still be told apart.
    """

    def __init__(self, in_channels: list[int], kinds: list[str], hidden: int = 128, cond_dim: int = 0):
        super().__init__()
        if not in_channels:
            raise ValueError("MultiLevelHeads needs at least one feature level")
        self.heads = nn.ModuleList(GANHead(c, kind=k, hidden=hidden) for c, k in zip(in_channels, kinds))
        self.hidden, self.cond_dim = hidden, cond_dim
        self.cond_proj = nn.ModuleList(nn.Linear(cond_dim, hidden) for _ in in_channels) if cond_dim else None

    @classmethod
    def for_denoiser(cls, denoiser, levels: list[int] | None, hidden: int = 128,
                     text_conditioning: bool = False) -> MultiLevelHeads:
        """Heads sized for ``denoiser.features(..., levels)`` (UNet: each level's output channels;
        transformers: the inner width of every block); with ``text_conditioning`` a projection of the
        mean prompt token (width: the backbone's text-conditioning width)."""
        model = unwrap_model(denoiser.module)
        modules = denoiser.feature_levels()
        index = sorted({i % len(modules) for i in (range(len(modules)) if levels is None else levels)})
        config = model.config
        if "block_out_channels" in config:
            channels = list(config["block_out_channels"])
            widths = [channels[i] if i < len(channels) else channels[-1] for i in index]  # the mid block: last
            kinds = ["conv"] * len(widths)
            text_dim = config["cross_attention_dim"]
        else:
            widths = [int(config["num_attention_heads"] * config["attention_head_dim"])] * len(index)
            kinds = ["tokens"] * len(index)
            text_dim = config["joint_attention_dim"]
        if isinstance(text_dim, list | tuple):
            text_dim = text_dim[0]
        return cls(widths, kinds, hidden, cond_dim=int(text_dim) if text_conditioning else 0)

    def forward(self, features: list[Tensor], cond: Tensor | None = None) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"{len(self.heads)} discriminator heads got {len(features)} feature levels")
        if (cond is None) != (self.cond_proj is None):
            raise ValueError("text-conditioned heads need a prompt vector (and unconditioned heads take none)")
        logits = []
        for i, (head, f) in enumerate(zip(self.heads, features)):
            h = head.embed(f)
            logit = head.project(h)
            if self.cond_proj is not None:
                c = self.cond_proj[i](cond.to(h.dtype))
                logit = logit + (h * c).sum(dim=-1) / self.hidden**0.5
            logits.append(logit)
        return torch.stack(logits, dim=1)
