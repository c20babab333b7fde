"""One denoiser interface for every family: ``x0`` / ``epsilon`` / ``v`` / flow predictions in float32, with CFG.

A distillation method never calls a UNet or a transformer directly. It calls a ``Denoiser``::

    x0 = denoiser(x_t, t, cond, uncond=uncond, guidance_scale=4.5, output="x0")

and gets the prediction it asked for, whatever the backbone was trained to predict, with each
family's call convention (SDXL's added conditions, SD3's pooled projections, FLUX's 2x2 latent
packing, position ids and guidance embedding) handled here. Latents are always the unpacked
``[B, C, H, W]`` VAE latents (scaled by the VAE's scaling/shift factors), timesteps are the
schedule's model timesteps (see ``schedules.py``).

``Conditioning`` is the batch of text conditioning a backbone needs, as produced by
``Teacher.encode_prompt``; it can be sliced, tiled and concatenated like a tensor batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stepdistill.families import UNET_FAMILIES
from stepdistill.models.schedules import NoiseSchedule, _canonical

# Keys of Conditioning.tensors per family (all batch-first):
#   sd15, sd2: encoder_hidden_states [B, 77, D]
#   sdxl:      encoder_hidden_states [B, 77, D1 + D2], text_embeds [B, P] (pooled, text_encoder_2),
#              time_ids [B, 6] (orig size, crop top-left, target size) — SDXL's added_cond_kwargs
#   sd3:       encoder_hidden_states [B, 77 + L, D], pooled_projections [B, P1 + P2]
#   flux:      encoder_hidden_states [B, L, D] (T5), pooled_projections [B, P] (CLIP),
#              txt_ids [B, L, 3] (the model takes one [L, 3]; tiled so that slicing/cat stay uniform)
CONDITIONING_KEYS = {
    "sd15": ("encoder_hidden_states",),
    "sd2": ("encoder_hidden_states",),
    "sdxl": ("encoder_hidden_states", "text_embeds", "time_ids"),
    "sd3": ("encoder_hidden_states", "pooled_projections"),
    "flux": ("encoder_hidden_states", "pooled_projections", "txt_ids"),
}
_SDXL_ADDED = ("text_embeds", "time_ids")


@dataclass(eq=False)
class Conditioning:
    """A batch of backbone conditioning tensors: ``{name: Tensor[B, ...]}``, all with the same batch size."""

    tensors: dict[str, Tensor]

    def __post_init__(self) -> None:
        if not self.tensors:
            raise ValueError("Conditioning needs at least one tensor")
        sizes = {name: t.shape[0] for name, t in self.tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Conditioning tensors disagree on the batch size: {sizes}")

    # ---- batch ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, idx):
        """``cond["encoder_hidden_states"]`` gives a tensor; ``cond[2:4]``/``cond[mask]`` a sub-batch."""
        if isinstance(idx, str):
            return self.tensors[idx]
        return self.index(idx)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def keys(self):
        return self.tensors.keys()

    def index(self, idx) -> Conditioning:
        """Sub-batch by int (kept as a batch of one), slice, index list/tensor or boolean mask."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        if isinstance(idx, Sequence) and not isinstance(idx, str):
            idx = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for name, t in self.tensors.items():
            i = idx.to(t.device) if torch.is_tensor(idx) else idx
            out[name] = t[i]
        return Conditioning(out)

    def repeat(self, n: int) -> Conditioning:
        """Tile the whole batch ``n`` times: [a, b] -> [a, b, a, b] (like ``torch.cat([x] * n)``)."""
        return Conditioning({k: t.repeat(n, *([1] * (t.ndim - 1))) for k, t in self.tensors.items()})

    def expand_to(self, batch: int) -> Conditioning:
        """This conditioning for a batch of ``batch``: unchanged if it already is, tiled if it has one row."""
        n = len(self)
        if n == batch:
            return self
        if n == 1:
            return self.repeat(batch)
        raise ValueError(f"Cannot expand a conditioning of batch {n} to batch {batch} (need 1 or {batch})")

    @classmethod
    def cat(cls, conds: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch; all must have the same keys."""
        if not conds:
            raise ValueError("Conditioning.cat needs at least one conditioning")
        keys = set(conds[0].tensors)
        for c in conds[1:]:
            if set(c.tensors) != keys:
                raise ValueError(
                    f"Cannot concatenate conditionings with keys {sorted(keys)} and {sorted(c.tensors)}"
                )
        return cls({k: torch.cat([c.tensors[k] for c in conds], dim=0) for k in conds[0].tensors})

    # ---- device / dtype -------------------------------------------------------------------------
    def to(self, device=None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to ``device``; cast floating-point tensors (only) to ``dtype``."""
        out = {}
        for k, t in self.tensors.items():
            out[k] = t.to(
                device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None
            )
        return Conditioning(out)

    def detach(self) -> Conditioning:
        return Conditioning({k: t.detach() for k, t in self.tensors.items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(t.shape)}" for k, t in self.tensors.items())
        return f"Conditioning({shapes})"


def unwrap_model(module: nn.Module) -> nn.Module:
    """The bare diffusers model under DDP / FSDP / DeepSpeed (``.module``) and ``torch.compile`` wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        return module


# ---- FLUX latent packing (the conventions of diffusers' FluxPipeline) -----------------------------
def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 latent patch becomes one token (row-major)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of ``pack_latents`` for latents of ``height`` x ``width``."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=None) -> Tensor:
    """FLUX position ids [(H/2)(W/2), 3] of the packed tokens: (0, row, column)."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.to(dtype=dtype or torch.float32)


@contextlib.contextmanager
def math_attention():
    """Run attention with the math SDPA backend: the one with forward-mode (JVP, sCM) and second-order
    (exact R1) derivatives; the fused CPU/GPU kernels have neither."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


class _FeaturesReady(Exception):
    """Raised by the feature hook to end a backbone forward early (``features_only``)."""


class Denoiser:
    """Calls a backbone (teacher, or any trainable copy of it) and returns float32 predictions.

    ``backbone`` may be wrapped (DDP, FSDP, ``torch.compile``): the wrapper itself is called, so its
    hooks run; the bare model under it is used for its config and for the feature hook. The denoiser
    holds no other per-backbone state, so one can be built for every copy cheaply
    (``teacher.denoiser(copy)``).
    """

    def __init__(self, backbone: nn.Module, family: str, schedule: NoiseSchedule, prediction_type: str):
        if family not in CONDITIONING_KEYS:
            raise ValueError(f"Unknown family {family!r}; supported: {', '.join(CONDITIONING_KEYS)}")
        self.backbone = backbone
        self.family = family
        self.schedule = schedule
        self.prediction_type = _canonical(prediction_type)

    # ---- introspection --------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The bare diffusers model (``UNet2DConditionModel`` / ``SD3Transformer2DModel`` / ...)."""
        return unwrap_model(self.backbone)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs are cast to: that of the backbone's (first floating-point) parameters."""
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def guidance_embedded(self) -> bool:
        """True for backbones that take the guidance scale as an input: guidance-distilled transformers
        (FLUX.1-dev) and w-conditioned UNets (``time_cond_proj_dim``, see ``models/guidance.py``)."""
        config = self.module.config
        return bool(getattr(config, "guidance_embeds", False) or getattr(config, "time_cond_proj_dim", None))

    def feature_module(self) -> nn.Module:
        """The module whose output is the bottleneck feature map (see ``__call__(return_features=True)``)."""
        model = self.module
        if self.family in UNET_FAMILIES:
            return model.mid_block
        blocks = model.transformer_blocks
        return blocks[len(blocks) // 2]

    def feature_levels(self) -> list[nn.Module]:
        """The modules whose outputs are the multi-level features (``features``), in forward order: a UNet's
        down blocks and mid block (its encoder half), a transformer's joint blocks (FLUX: the double-stream
        ones). LADD's discriminator reads every one of them by default."""
        model = self.module
        if self.family in UNET_FAMILIES:
            return [*model.down_blocks, model.mid_block]
        return list(model.transformer_blocks)

    def features(
        self,
        x_t: Tensor,
        t,
        cond: Conditioning,
        levels: Sequence[int] | None = None,
        *,
        timestep_cond: Tensor | None = None,
    ) -> list[Tensor]:
        """Intermediate features of the backbone at ``levels`` (indices into ``feature_levels()``; None: all).

        UNet levels give feature maps [B, C_l, h_l, w_l], transformer levels image tokens [B, N, D]. The
        forward stops right after the deepest requested level (a UNet never runs its decoder). The
        features are attached to the graph: gradients reach ``x_t`` (a generator through a frozen
        discriminator backbone) and the backbone's trainable parameters, if any.
        """
        if x_t.ndim != 4:
            raise ValueError(f"x_t must be [B, C, H, W] latents, got shape {tuple(x_t.shape)}")
        modules = self.feature_levels()
        levels = list(range(len(modules))) if levels is None else [int(i) for i in levels]
        bad = [i for i in levels if not -len(modules) <= i < len(modules)]
        if bad or not levels:
            raise ValueError(f"feature levels {levels}: this {type(self.module).__name__} has {len(modules)} "
                             f"levels (indices 0..{len(modules) - 1})")
        levels = sorted({i % len(modules) for i in levels})
        batch = x_t.shape[0]
        t = self._timesteps(t, batch, x_t.device)
        cond = cond.expand_to(batch)
        guidance = None
        if self.guidance_embedded:  # guidance-embedded backbones read features at guidance 1 (no CFG)
            guidance = torch.ones(batch, device=x_t.device)
        captured: dict[int, Tensor] = {}
        last = levels[-1]

        def make_hook(index: int):
            def hook(_module, _inputs, output):
                if index in captured:  # re-computation under gradient checkpointing
                    return
                if isinstance(output, tuple | list):
                    # UNet down blocks return (hidden_states, residuals); transformer blocks
                    # (encoder_hidden_states, hidden_states).
                    output = output[0] if self.family in UNET_FAMILIES else output[-1]
                captured[index] = output
                if index == last:
                    raise _FeaturesReady
            return hook

        handles = [modules[i].register_forward_hook(make_hook(i)) for i in levels]
        extra = {} if timestep_cond is None else {"timestep_cond": timestep_cond}
        try:
            self.forward_native(x_t, t, cond, guidance=guidance, **extra)
        except _FeaturesReady:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i in levels if i not in captured]
        if missing:
            raise RuntimeError(f"feature levels {missing} were not reached during the backbone forward")
        return [captured[i] for i in levels]

    # ---- prediction -----------------------------------------------------------------------------
    def __call__(
        self,
        x_t: Tensor,
        t,
        cond: Conditioning,
        *,
        uncond: Conditioning | None = None,
        guidance_scale: float = 1.0,
        output: str = "x0",
        return_features: bool = False,
        features_only: bool = False,
        true_cfg: bool | None = None,
        embedded_guidance: float | None = None,
        timestep_cond: Tensor | None = None,
    ):
        """Predict ``output`` ("x0" | "epsilon" | "v_prediction" | "flow") for noisy latents ``x_t`` at ``t``.

        Args:
            x_t: noisy latents [B, C, H, W] (any float dtype; cast to the backbone's dtype).
            t: model timesteps, a scalar or [B] (as the schedule uses: VP 0..T-1, flow sigma * T).
            cond: conditioning of batch B (or 1, tiled).
            uncond: unconditional conditioning (e.g. ``teacher.encode_negative(B)``) for classifier-free
                guidance. With ``guidance_scale != 1`` the backbone runs once on the batch
                [uncond; cond] and the two halves are combined in its native prediction space,
                ``u + w * (c - u)``, before converting to ``output``.
            guidance_scale: the CFG weight ``w`` (a float, or a [B] tensor of one weight per sample);
                for guidance-embedded models (FLUX.1-dev, w-conditioned UNets) the value given to the
                guidance embedding instead (no batch doubling, ``uncond`` ignored) unless ``true_cfg=True``.
            output: the prediction type returned (float32).
            return_features: also return the bottleneck features: the UNet ``mid_block`` output
                [B, C, h, w], or the image hidden states after transformer block ``len // 2``
                [B, N, D] (FLUX: N packed 2x2 tokens). With CFG only the conditional half. In the
                backbone's dtype and attached to the graph (for GAN heads).
            features_only: return only those features, stopping the backbone right after the feature
                module (a UNet skips its decoder half, a transformer its later blocks): what a GAN
                classifier on the bottleneck needs, at about half the cost of a full forward.
            true_cfg: force (True) or forbid (False) the two-pass CFG with ``uncond``. Default: on for
                every model except guidance-embedded ones.
            embedded_guidance: guidance-embedded models only: the value given to the guidance
                embedding. Default: ``guidance_scale`` without true CFG, 1.0 with true CFG.
            timestep_cond: UNet families only: the ``[B, time_cond_proj_dim]`` condition added to the
                timestep embedding (a w-conditioned student's guidance-scale embedding, as LCM's
                ``time_cond_proj_dim`` UNets take it); tiled for the CFG batch.

        Returns:
            the prediction, or ``(prediction, features)`` when ``return_features``.
        """
        if x_t.ndim != 4:
            raise ValueError(f"x_t must be [B, C, H, W] latents, got shape {tuple(x_t.shape)}")
        batch = x_t.shape[0]
        t = self._timesteps(t, batch, x_t.device)
        cond = cond.expand_to(batch)

        if true_cfg is None:
            true_cfg = not self.guidance_embedded
        per_sample = torch.is_tensor(guidance_scale) and guidance_scale.numel() > 1
        if per_sample:
            guidance_scale = guidance_scale.to(x_t.device, torch.float32).reshape(-1)
            if guidance_scale.shape[0] != batch:
                raise ValueError(f"got {guidance_scale.shape[0]} guidance scales for a batch of {batch}")
        elif torch.is_tensor(guidance_scale):
            guidance_scale = float(guidance_scale)
        use_cfg = bool(true_cfg) and uncond is not None and (per_sample or guidance_scale != 1.0)
        guidance = None
        if self.guidance_embedded:
            if embedded_guidance is None:
                embedded_guidance = 1.0 if use_cfg else guidance_scale
            guidance = torch.as_tensor(embedded_guidance, dtype=torch.float32, device=x_t.device)
            guidance = guidance.reshape(-1).expand(batch).repeat(2 if use_cfg else 1)

        if use_cfg:
            x_in, t_in = torch.cat([x_t, x_t]), torch.cat([t, t])
            cond_in = Conditioning.cat([uncond.expand_to(batch).to(cond.device), cond])
            if timestep_cond is not None:
                timestep_cond = torch.cat([timestep_cond, timestep_cond])
        else:
            x_in, t_in, cond_in = x_t, t, cond
        extra = {} if timestep_cond is None else {"timestep_cond": timestep_cond}

        if features_only:
            with self._capture_features(True, stop=True) as captured:
                try:
                    self.forward_native(x_in, t_in, cond_in, guidance=guidance, **extra)
                except _FeaturesReady:
                    pass
            return captured[0][batch:] if use_cfg else captured[0]

        with self._capture_features(return_features) as captured:
            native = self.forward_native(x_in, t_in, cond_in, guidance=guidance, **extra)

        if use_cfg:
            pred_uncond, pred_cond = native.chunk(2)
            w = guidance_scale.view(-1, *[1] * (native.dim() - 1)) if per_sample else guidance_scale
            native = pred_uncond + w * (pred_cond - pred_uncond)
        pred = self.schedule.convert(native, x_t, t, self.prediction_type, output)
        if not return_features:
            return pred
        features = captured[0]
        return pred, (features[batch:] if use_cfg else features)

    def forward_native(
        self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance: Tensor | None = None,
        timestep_cond: Tensor | None = None,
    ) -> Tensor:
        """One backbone call; returns its raw prediction (``self.prediction_type``) in float32, unpacked.

        ``t`` is a [B] tensor of model timesteps; ``guidance`` the [B] guidance-embedding input of
        guidance-distilled models (FLUX.1-dev), ignored otherwise.
        """
        dtype = self.dtype
        x = x_t.to(dtype)
        c = cond.to(x_t.device, dtype).tensors
        if timestep_cond is not None and self.family not in UNET_FAMILIES:
            raise ValueError(f"timestep_cond is a UNet input (time_cond_proj_dim); {self.family} has none")
        missing = [k for k in CONDITIONING_KEYS[self.family] if k not in c]
        if missing:
            raise ValueError(f"{self.family} conditioning lacks {missing}; got {sorted(c)}")

        if self.family in UNET_FAMILIES:
            kwargs = {"encoder_hidden_states": c["encoder_hidden_states"]}
            if self.family == "sdxl":
                kwargs["added_cond_kwargs"] = {k: c[k] for k in _SDXL_ADDED}
            dim = getattr(self.module.config, "time_cond_proj_dim", None)
            if timestep_cond is not None:
                kwargs["timestep_cond"] = timestep_cond.to(x_t.device, dtype)
            elif dim:  # a w-conditioned UNet: the guidance scale enters as the pipelines feed it
                from stepdistill.models.guidance import guidance_scale_embedding

                w = guidance if guidance is not None else torch.ones(x.shape[0], device=x.device)
                kwargs["timestep_cond"] = guidance_scale_embedding(w, dim, device=x.device, dtype=dtype)
            out = self.backbone(x, t, return_dict=False, **kwargs)[0]
        elif self.family == "sd3":
            out = self.backbone(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=c["encoder_hidden_states"],
                pooled_projections=c["pooled_projections"],
                return_dict=False,
            )[0]
        else:  # flux: 2x2-packed tokens, position ids, timestep in [0, 1] as FluxPipeline passes it
            h, w = x.shape[-2:]
            if h % 2 or w % 2:
                raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
            out = self.backbone(
                hidden_states=pack_latents(x),
                timestep=t / 1000,
                guidance=guidance if self.guidance_embedded else None,
                pooled_projections=c["pooled_projections"],
                encoder_hidden_states=c["encoder_hidden_states"],
                txt_ids=c["txt_ids"][0],
                img_ids=latent_image_ids(h, w, device=x.device, dtype=dtype),
                return_dict=False,
            )[0]
            out = unpack_latents(out, h, w)
        return out.float()

    # ---- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _timesteps(t, batch: int, device) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        if t.ndim == 0:
            return t.expand(batch).clone()
        t = t.reshape(-1).float()
        if t.shape[0] == 1 and batch != 1:
            return t.expand(batch).clone()
        if t.shape[0] != batch:
            raise ValueError(f"got {t.shape[0]} timesteps for a batch of {batch}")
        return t

    @contextlib.contextmanager
    def _capture_features(self, enabled: bool, stop: bool = False):
        """Record the feature module's output during the forward; the hook is removed on exit.
        With ``stop``, the hook ends the forward there by raising ``_FeaturesReady``."""
        captured: list[Tensor] = []
        if not enabled:
            yield captured
            return

        def hook(_module, _inputs, output):
            # Transformer blocks return (encoder_hidden_states, hidden_states): keep the image stream.
            feats = output[-1] if isinstance(output, tuple | list) else output
            if not captured:  # the first call only (re-computation under checkpointing is ignored)
                captured.append(feats)
            if stop:
                raise _FeaturesReady

        handle = self.feature_module().register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("the feature hook did not fire during the backbone forward")

    def __repr__(self) -> str:
        return (
            f"Denoiser(family={self.family!r}, backbone={type(self.module).__name__}, "
            f"prediction_type={self.prediction_type!r}, schedule={self.schedule!r})"
        )
