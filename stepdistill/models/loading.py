"""Teacher loading: any diffusers text-to-image pipeline -> family -> ``Teacher``.

``model.pretrained`` is one of

* a Hub id (``stabilityai/sdxl-base-1.0``), fetched by diffusers (or read from the HF cache offline);
* a local folder written by ``DiffusionPipeline.save_pretrained``;
* ``tiny:<family>`` — a tiny random pipeline of that family, built once by ``models/tiny.py`` and
  cached under ``$STEPDISTILL_CACHE/tiny/<family>`` (default ``~/.cache/stepdistill``), for tests
  and smoke runs.

The family is read from the pipeline's ``model_index.json`` (``_class_name``) before any weight is
loaded (``check_pretrained``), so a wrong path or family fails in a second, not after minutes of
loading. ``load_teacher`` then loads the pipeline, freezes it, and wraps it in a ``Teacher``: the
pipeline's own prompt encoding, the backbone, its noise schedule, the VAE, and ``Denoiser`` s for
the backbone or any trainable copy of it.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import Tensor, nn

from stepdistill.data.embeddings import EmbeddingCache
from stepdistill.families import FAMILIES, PIPELINE_FAMILIES
from stepdistill.models.denoiser import Conditioning, Denoiser
from stepdistill.models.schedules import NoiseSchedule

# Weight dtypes by name (config values, CLI flags): the one table of them.
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


# ---- locating and identifying a pipeline ----------------------------------------------------------
def _cache_root() -> Path:
    return Path(os.environ.get("STEPDISTILL_CACHE") or Path.home() / ".cache" / "stepdistill")


def _tiny_is_current(folder: Path) -> bool:
    from stepdistill.models.tiny import TINY_VERSION

    marker = folder / ".stepdistill_tiny.json"
    try:
        return json.loads(marker.read_text()).get("version") == TINY_VERSION
    except (OSError, ValueError):
        return False


def _build_tiny_cached(family: str) -> Path:
    """Build ``tiny:<family>`` once; safe when several processes (DDP ranks) race to build it."""
    from stepdistill.models.tiny import TINY_VERSION, build_tiny_pipeline

    folder = _cache_root() / "tiny" / family
    if _tiny_is_current(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{family}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build_tiny_pipeline(family, tmp, seed=0)
        (tmp / ".stepdistill_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "seed": 0}))
        if folder.exists() and not _tiny_is_current(folder):
            shutil.rmtree(folder, ignore_errors=True)  # a stale build of an older TINY_VERSION
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _tiny_is_current(folder):  # not another process's finished build: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_pretrained(pretrained: str) -> str:
    """``tiny:<family>`` -> its cached folder (built on first use); ``toy-sd`` / ``toy-flow`` -> the shipped
    toy teacher folder (``stepdistill/toy/assets``; a local folder of that name is ``./toy-sd``); a local
    folder -> itself; else a Hub id."""
    pretrained = str(pretrained)
    if pretrained.startswith("toy-") and "/" not in pretrained:
        from stepdistill.toy.teachers import TEACHERS, teacher_path

        # A shipped name always means the shipped folder; another bare "toy-..." that is no local folder
        # is a misspelt one. teacher_path raises ValueError naming the teachers / the training command.
        if pretrained in TEACHERS or not os.path.isdir(pretrained):
            return str(teacher_path(pretrained))
    if pretrained.startswith("tiny:"):
        family = pretrained.split(":", 1)[1]
        if family not in FAMILIES:
            raise ValueError(
                f"{pretrained!r}: unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}"
            )
        return str(_build_tiny_cached(family))
    expanded = os.path.expanduser(pretrained)
    if os.path.isdir(expanded):
        return expanded
    return pretrained


def _hub_file(repo_id: str, filename: str, revision: str | None) -> str:
    """Download (or find in the HF cache) one small file of a Hub repo; ValueError with the fix on failure."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except HFValidationError as e:
        raise ValueError(
            f"{repo_id!r} is neither an existing local folder nor a valid Hugging Face Hub repo id. "
            "Point model.pretrained at a folder written by DiffusionPipeline.save_pretrained, a Hub id "
            "(e.g. stabilityai/sdxl-turbo), or tiny:<family>."
        ) from e
    except (OSError, HfHubHTTPError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = (
            "HF_HUB_OFFLINE is set, so only models already in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}/hub) can be used: download it once with "
            f"`hf download {repo_id}` on a machine with internet, or point to a local folder."
            if offline
            else "Check the repo id, your network, and your access to the repo (gated models need `hf auth login`); "
            "with no network, set HF_HUB_OFFLINE=1 and use a model in the Hugging Face cache or a local folder."
        )
        raise ValueError(
            f"Could not fetch {filename} of {repo_id!r} from the Hub ({type(e).__name__}). {hint}"
        ) from e


def read_model_index(pretrained: str, revision: str | None = None) -> dict:
    """The ``model_index.json`` of a pipeline (local folder, ``tiny:<family>`` or Hub id; only that file)."""
    path = resolve_pretrained(pretrained)
    if os.path.isdir(path):
        index = Path(path) / "model_index.json"
        if not index.is_file():
            raise ValueError(
                f"{path} is not a diffusers pipeline folder (no model_index.json). Point model.pretrained at a "
                "folder written by DiffusionPipeline.save_pretrained (a single backbone folder such as unet/ "
                "is not enough), a Hub id, or tiny:<family>."
            )
        return json.loads(index.read_text())
    return json.loads(Path(_hub_file(path, "model_index.json", revision)).read_text())


def read_scheduler_config(pretrained: str, revision: str | None = None) -> dict | None:
    """The pipeline's ``scheduler/scheduler_config.json``, or None when it has none / cannot be fetched."""
    path = resolve_pretrained(pretrained)
    if os.path.isdir(path):
        config = Path(path) / "scheduler" / "scheduler_config.json"
        return json.loads(config.read_text()) if config.is_file() else None
    try:
        return json.loads(Path(_hub_file(path, "scheduler/scheduler_config.json", revision)).read_text())
    except ValueError:
        return None


def detect_family(model_index: dict, scheduler_config: dict | None = None) -> str:
    """The family of a pipeline from its ``model_index.json`` (and scheduler config for SD 1.x vs 2.x).

    ``StableDiffusionPipeline`` is SD 1.x or SD 2.x. The two share every code path here; the only
    difference that matters for distillation is the prediction type, so the decision is made on it:
    ``sd2`` when the scheduler predicts ``v_prediction`` (SD 2.x 768 px), ``sd15`` otherwise. SD 2.x
    *base* (512 px, epsilon) is therefore reported as ``sd15``; forcing ``family: sd2`` for it is
    accepted (see ``check_pretrained``). The text encoder is not inspected (that would need its config).
    """
    cls = model_index.get("_class_name")
    if cls not in PIPELINE_FAMILIES:
        supported = ", ".join(f"{name} ({'/'.join(f)})" for name, f in PIPELINE_FAMILIES.items())
        raise ValueError(f"Unsupported pipeline class {cls!r}; stepdistill supports: {supported}.")
    families = PIPELINE_FAMILIES[cls]
    if len(families) == 1:
        return families[0]
    prediction_type = (scheduler_config or {}).get("prediction_type", "epsilon")
    return "sd2" if prediction_type == "v_prediction" else "sd15"


def check_pretrained(pretrained: str, family: str = "auto", revision: str | None = None) -> str:
    """Resolve ``pretrained``, detect its family (no weights loaded) and check a forced ``family`` matches.

    Returns the family (the forced one when given: ``sd15`` and ``sd2`` may be forced onto each other,
    both being a ``StableDiffusionPipeline``).
    """
    if family != "auto" and family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is not valid; choose auto or one of {', '.join(FAMILIES)}")
    model_index = read_model_index(pretrained, revision)
    detected = detect_family(model_index, read_scheduler_config(pretrained, revision))
    if family == "auto" or family == detected:
        return detected
    if (
        family in PIPELINE_FAMILIES["StableDiffusionPipeline"]
        and detected in PIPELINE_FAMILIES["StableDiffusionPipeline"]
    ):
        return family
    raise ValueError(
        f"model.family={family!r} but {pretrained} is a {model_index.get('_class_name')} (family {detected!r}). "
        f"Set model.family to auto or {detected}."
    )


def _component_config(pretrained: str, name: str, revision: str | None) -> dict | None:
    """``<name>/config.json`` of a pipeline (local, or the Hub cache / Hub), or None when it has none."""
    path = resolve_pretrained(pretrained)
    if os.path.isdir(path):
        config = Path(path) / name / "config.json"
        return json.loads(config.read_text()) if config.is_file() else None
    try:
        return json.loads(Path(_hub_file(path, f"{name}/config.json", revision)).read_text())
    except ValueError:
        return None


def check_resolution(pretrained: str, resolution: int, revision: str | None = None) -> str | None:
    """Refuse a ``model.resolution`` the teacher cannot take (ValueError); return a warning when it differs
    from the size the teacher was trained at. Reads the backbone's and VAE's config.json only.

    The side must be a multiple of the VAE's downsampling, and for a transformer of its patch grid too
    (``patch_size``; FLUX's pipeline packs 2x2 latent patches).
    """
    vae = _component_config(pretrained, "vae", revision)
    unet = _component_config(pretrained, "unet", revision)
    backbone = unet or _component_config(pretrained, "transformer", revision)
    if vae is None or backbone is None:
        return None
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    if unet is not None:  # diffusers' UNets take any latent size (they pass the skip sizes to the upsamplers)
        grid, what = 1, "UNet"
    else:
        # SD3 patchifies 2x2 (patch_size 2); FLUX has patch_size 1 but its pipeline packs 2x2 latent patches.
        grid, what = max(int(backbone.get("patch_size") or 1), 2), "transformer patches"
    multiple = vae_factor * grid
    if resolution % multiple:
        lower, upper = resolution // multiple * multiple, (resolution // multiple + 1) * multiple
        raise ValueError(f"model.resolution={resolution} does not fit the teacher {pretrained}: it must be a multiple "
                         f"of {multiple} (VAE x{vae_factor} times {what} x{grid}); use {lower or upper} or {upper}")
    size = backbone.get("sample_size")
    if isinstance(size, int) and size * vae_factor != resolution:
        return (f"model.resolution={resolution} differs from the {size * vae_factor} px the teacher {pretrained} was "
                f"built for ({'unet' if unet else 'transformer'}/config.json sample_size={size} x VAE {vae_factor}); "
                "its samples there may be poor, and so will the student's")
    return None


# ---- the teacher ------------------------------------------------------------------------------------
class Teacher:
    """A frozen diffusers pipeline seen through the interfaces distillation needs.

    Attributes:
        pipeline: the ``DiffusionPipeline`` (components on ``device``, frozen, eval mode).
        family: "sd15" | "sd2" | "sdxl" | "sd3" | "flux".
        backbone: ``pipeline.unet`` or ``pipeline.transformer``; ``backbone_name`` says which.
        schedule: the ``NoiseSchedule`` of the pipeline's scheduler (at ``resolution`` for FLUX's
            resolution-dependent shift).
        prediction_type: "epsilon" | "v_prediction" | "flow" (what the backbone predicts).
        resolution: pixel resolution of training; used for SDXL's size conditioning and FLUX's shift.
        vae, vae_scale_factor: the autoencoder and its downsampling factor (8 for all families).
    """

    def __init__(self, pipeline, family: str, resolution: int | None = None):
        self.pipeline = pipeline
        self.family = family
        self.backbone_name = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
        self.backbone: nn.Module = getattr(pipeline, self.backbone_name)
        self.vae = pipeline.vae
        self.vae_scale_factor = int(getattr(pipeline, "vae_scale_factor", 8))
        self.resolution = int(resolution or self.default_resolution)
        # Maximum text length for T5 (SD3 / FLUX); None keeps the pipeline's own default (256 / 512).
        self.max_sequence_length: int | None = None
        self.schedule: NoiseSchedule = NoiseSchedule.from_scheduler(
            pipeline.scheduler, image_seq_len=self.image_seq_len(self.resolution)
        )
        self.prediction_type = self.schedule.prediction_type
        self._negative_cache: dict[tuple[str, int, str], Conditioning] = {}
        # Where the conditioning comes from when not from the text encoders: an ``EmbeddingCache``
        # (``use_embeddings``). ``source``: how ``load_teacher`` loaded the pipeline (to load dropped
        # text encoders back); ``dropped``: the text encoders it was loaded without.
        self.embeddings: EmbeddingCache | None = None
        self.source: dict | None = None
        self.dropped: list[str] = []

    # ---- basic facts ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the backbone (and the conditioning it is given) lives."""
        return next(self.backbone.parameters()).device

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        """The pipeline's loaded text encoders by component name (none when it answers from a cache)."""
        return {name: module for name, module in self.pipeline.components.items()
                if name.startswith("text_encoder") and isinstance(module, nn.Module)}

    @property
    def text_encoder_device(self) -> torch.device:
        """Where the text encoders run: the CPU under ``model.offload_text_encoders``, else ``device``."""
        encoders = self.text_encoders
        return next(next(iter(encoders.values())).parameters()).device if encoders else self.device

    @property
    def dtype(self) -> torch.dtype:
        """The weight dtype of the backbone."""
        return next(self.backbone.parameters()).dtype

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def default_resolution(self) -> int:
        """The resolution the pipeline generates at by default (e.g. 512 for SD 1.5, 1024 for SDXL)."""
        size = getattr(self.pipeline, "default_sample_size", None)
        if size is None:
            size = getattr(self.backbone.config, "sample_size", None) or 64
        if isinstance(size, list | tuple):
            size = size[0]
        return int(size) * self.vae_scale_factor

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, H, W) of the (unpacked) latents for square images of ``resolution`` pixels."""
        # SD3 patchifies 2x2 and FLUX packs 2x2 latent patches: the latent side must be even there.
        multiple = self.vae_scale_factor * (2 if self.family in ("sd3", "flux") else 1)
        if resolution <= 0 or resolution % multiple:
            raise ValueError(
                f"resolution={resolution} must be a positive multiple of {multiple} for {self.family}"
            )
        side = resolution // self.vae_scale_factor
        return (int(self.vae.config.latent_channels), side, side)

    def image_seq_len(self, resolution: int) -> int:
        """Number of image tokens of a transformer at ``resolution`` (2x2 patches of the latent)."""
        side = resolution // self.vae_scale_factor
        return (side // 2) * (side // 2)

    def denoiser(self, backbone: nn.Module | None = None) -> Denoiser:
        """A ``Denoiser`` for ``backbone`` (default: the frozen teacher backbone) with this family's conventions."""
        return Denoiser(
            backbone if backbone is not None else self.backbone,
            self.family,
            self.schedule,
            self.prediction_type,
        )

    # ---- prompts ----------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str] | str, resolution: int | None = None) -> Conditioning:
        """Conditioning of ``prompts`` through the pipeline's own ``encode_prompt`` (no gradients).

        ``resolution`` (default ``self.resolution``) only matters for SDXL's size conditioning
        (``time_ids``: original size = target size = resolution, crop (0, 0)). With an embedding cache
        (``use_embeddings``) the rows come from it, and a prompt it lacks is a ValueError.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.embeddings is not None:
            return self._from_cache(self.embeddings.lookup(prompts), resolution or self.resolution)
        with torch.no_grad():
            return self._encode(prompts, negative=None, resolution=resolution or self.resolution)

    def encode_negative(
        self, batch_size: int, negative_prompt: str = "", resolution: int | None = None
    ) -> Conditioning:
        """The unconditional ("negative") conditioning for classifier-free guidance, tiled to ``batch_size``.

        Computed exactly as the pipeline computes its negative embeddings when called with
        ``negative_prompt`` (``""`` = no negative prompt: e.g. SDXL then uses zeros, as its pipeline
        does with ``force_zeros_for_empty_prompt``). Cached per (prompt, resolution, device).
        """
        resolution = resolution or self.resolution
        key = (negative_prompt, resolution, str(self.device))
        if key not in self._negative_cache:
            if self.embeddings is not None:
                self._negative_cache[key] = self._from_cache(self.embeddings.negative(negative_prompt), resolution)
            else:
                with torch.no_grad():
                    self._negative_cache[key] = self._encode(
                        [""], negative=negative_prompt, resolution=resolution
                    )
        return self._negative_cache[key].expand_to(batch_size)

    # ---- the embedding cache ------------------------------------------------------------------------
    def use_embeddings(self, cache: EmbeddingCache | str | os.PathLike) -> None:
        """Answer ``encode_prompt`` / ``encode_negative`` from ``cache`` (a folder written by ``stepdistill
        cache-embeddings``, or an opened ``EmbeddingCache``) and free the text encoders if they are loaded.

        ValueError when the cache was made for another teacher, family, resolution or T5 length.
        """
        cache = cache if isinstance(cache, EmbeddingCache) else EmbeddingCache(cache)
        expected = {"family": self.family, "resolution": self.resolution,
                    "max_sequence_length": self.max_sequence_length}
        if self.source is not None:
            expected["teacher"] = self.source["pretrained"]
        cache.check(**expected)
        self.embeddings = cache
        self._negative_cache.clear()
        loaded = self.text_encoders
        if loaded:
            on_gpu = any(next(m.parameters()).is_cuda for m in loaded.values())
            for name in loaded:
                setattr(self.pipeline, name, None)
            self.dropped = sorted({*self.dropped, *loaded})
            if on_gpu:
                torch.cuda.empty_cache()

    def _from_cache(self, tensors: dict[str, Tensor], resolution: int) -> Conditioning:
        """Cached rows as the live encoding gives them: on ``device``, floating fields in the weight dtype."""
        cached = self.embeddings.meta.get("resolution")
        if self.family == "sdxl" and resolution != cached:
            raise ValueError(f"SDXL's size conditioning (time_ids) at resolution {resolution} is not in the embedding "
                             f"cache {self.embeddings.folder}, which was made at {cached}; rebuild it with "
                             f"`{self.embeddings.rebuild}` and model.resolution={resolution}")
        dtype = self.dtype
        return Conditioning({k: t.to(device=self.device, dtype=dtype if t.is_floating_point() else None)
                             for k, t in tensors.items()})

    def dropped_text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders this teacher was loaded without (``data.embeddings``), loaded now from its
        pipeline (on the CPU, in its weight dtype, frozen): ``{component name: module}``, ``{}`` when none
        were dropped. The export writes them, so its pipeline is complete."""
        if not self.dropped:
            return {}
        if self.source is None:
            raise ValueError("this Teacher's text encoders were freed and it does not know where it was loaded "
                             "from; load it with load_teacher to export it")
        src = self.source
        index = read_model_index(src["pretrained"], src["revision"])
        return {name: _load_component(src["pretrained"], name, index[name], src["dtype"], src["revision"],
                                      src["variant"]) for name in self.dropped}

    def _encode(self, prompts: list[str], negative: str | None, resolution: int) -> Conditioning:
        """Positive conditioning of ``prompts`` or, when ``negative`` is a string, the pipeline's negative one."""
        if self.text_encoder_device != self.device:  # offloaded text encoders: encode there, hand over here
            return self._encode_on(self.text_encoder_device, prompts, negative, resolution).to(self.device)
        return self._encode_on(self.device, prompts, negative, resolution)

    def _encode_on(self, device: torch.device, prompts: list[str], negative: str | None, resolution: int
                   ) -> Conditioning:
        pipe = self.pipeline
        cfg = negative is not None
        # The pipelines' convention: negative_prompt=None means "no negative prompt".
        neg_list = [negative] if negative else None
        t5_kwargs = (
            {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        )

        if self.family in ("sd15", "sd2"):
            pos, neg = pipe.encode_prompt(prompts, device, 1, cfg, negative_prompt=neg_list)
            return Conditioning({"encoder_hidden_states": neg if cfg else pos})

        if self.family == "sdxl":
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=neg_list,
            )
            embeds, pooled = (neg, neg_pooled) if cfg else (pos, pooled)
            time_ids = self._sdxl_time_ids(resolution, pooled).to(device=device, dtype=embeds.dtype)
            return Conditioning(
                {
                    "encoder_hidden_states": embeds,
                    "text_embeds": pooled,
                    "time_ids": time_ids.repeat(embeds.shape[0], 1),
                }
            )

        if self.family == "sd3":
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=neg_list,
                **t5_kwargs,
            )
            embeds, pooled = (neg, neg_pooled) if cfg else (pos, pooled)
            return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})

        # flux: no CFG inside encode_prompt; the negative prompt is encoded like a prompt (true CFG).
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=[negative] if cfg else prompts,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            **t5_kwargs,
        )
        if text_ids.ndim == 3:  # older diffusers returned batched ids
            text_ids = text_ids[0]
        txt_ids = text_ids.to(device=device, dtype=embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return Conditioning(
            {
                "encoder_hidden_states": embeds,
                "pooled_projections": pooled,
                "txt_ids": txt_ids.contiguous(),
            }
        )

    def _sdxl_time_ids(self, resolution: int, pooled: Tensor) -> Tensor:
        """SDXL's size/crop conditioning [1, 6] for an uncropped square image of ``resolution`` px."""
        pipe, size = self.pipeline, (resolution, resolution)
        if hasattr(pipe, "_get_add_time_ids"):
            encoder_2 = getattr(pipe, "text_encoder_2", None)
            proj_dim = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
            return pipe._get_add_time_ids(
                size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=proj_dim
            )
        return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=pooled.dtype)

    # ---- VAE --------------------------------------------------------------------------------------
    def _vae_factors(self) -> tuple[float, float]:
        config = self.vae.config
        return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)

    def decode(self, latents: Tensor, clamp: bool = True) -> Tensor:
        """Latents (as the backbone sees them) -> images in [-1, 1], float32 [B, 3, H, W].

        Undoes the VAE's scaling and shift factors (``z / scaling + shift``; shift is SD3/FLUX only).
        Not wrapped in ``no_grad``: gradients flow to ``latents`` when the caller wants them.
        ``clamp=False`` returns the raw decoder output.
        """
        scale, shift = self._vae_factors()
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype) / scale + shift
        images = self.vae.decode(z, return_dict=False)[0].float()
        return images.clamp(-1, 1) if clamp else images

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] [B, 3, H, W] -> scaled latents (float32), deterministic (mode of the posterior)."""
        scale, shift = self._vae_factors()
        x = images.to(device=self.vae.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(x, return_dict=False)[0]
        latents = posterior.mode() if hasattr(posterior, "mode") else posterior
        return ((latents.float() - shift) * scale).float()

    def __repr__(self) -> str:
        return (
            f"Teacher(family={self.family!r}, pipeline={type(self.pipeline).__name__}, "
            f"backbone={self.backbone_name}, prediction_type={self.prediction_type!r}, "
            f"schedule={self.schedule!r}, dtype={self.dtype}, device={self.device})"
        )


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not valid; use a torch.dtype or one of {', '.join(DTYPES)}")


def dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` in recent diffusers, ``torch_dtype`` before."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


def _text_encoder_names(model_index: dict) -> list[str]:
    """The pipeline's text-encoder components that it has (``model_index.json`` entries not null)."""
    return sorted(name for name, entry in model_index.items() if name.startswith("text_encoder")
                  and isinstance(entry, list) and entry and entry[0] is not None)


def _load_component(pretrained: str, name: str, entry: list, dtype: torch.dtype, revision: str | None,
                    variant: str | None) -> nn.Module:
    """One model component of a pipeline (``model_index.json`` entry ``[library, class]``), on the CPU, frozen."""
    library, class_name = entry
    cls = getattr(importlib.import_module(library), class_name)
    kwargs = {"subfolder": name}
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    if library == "transformers":
        import transformers
        from packaging.version import Version

        kwargs["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = dtype
    else:
        kwargs[dtype_kwarg()] = dtype
    module = cls.from_pretrained(resolve_pretrained(pretrained), **kwargs)
    return module.requires_grad_(False).eval()


def load_teacher(
    pretrained: str,
    family: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
    *,
    resolution: int | None = None,
    embeddings: str | None = None,
    text_encoder_device: str | torch.device | None = None,
) -> Teacher:
    """Load a diffusers pipeline as a frozen ``Teacher``.

    The family is checked first from ``model_index.json`` (``check_pretrained``) so errors come before
    the weights load. Every component is frozen (``requires_grad_(False)``, eval mode), moved to
    ``device`` in ``dtype``; the progress bar is disabled. ``resolution`` (default: the pipeline's
    own, ``TINY_RESOLUTION`` for ``tiny:<family>``) sets SDXL's size conditioning and FLUX's
    resolution-dependent timestep shift: pass the training resolution.

    ``embeddings``: a folder written by ``stepdistill cache-embeddings``; the pipeline is then loaded with
    ``text_encoder*=None`` and the teacher answers prompts from the cache (checked first: a cache made for
    another teacher, family or resolution is a ValueError before any weight loads). ``text_encoder_device``:
    where the text encoders live (default ``device``; ``"cpu"`` keeps them off the GPU, the encoding runs
    there). The trainer passes a run's ``data.embeddings`` and ``model.offload_text_encoders`` (``harness.build``).
    """
    from diffusers import DiffusionPipeline

    family = check_pretrained(pretrained, family, revision=revision)
    if resolution is None and str(pretrained).startswith("tiny:"):
        from stepdistill.models.tiny import TINY_RESOLUTION

        resolution = TINY_RESOLUTION[family]
    cache = None
    text_names: list[str] = []
    if embeddings:
        cache = EmbeddingCache(embeddings)
        checks = {"teacher": str(pretrained), "family": family}
        if resolution is not None:
            checks["resolution"] = int(resolution)
        cache.check(**checks)  # before the weights load
        text_names = _text_encoder_names(read_model_index(pretrained, revision))
    path = resolve_pretrained(pretrained)
    kwargs = {name: None for name in text_names}  # never loaded: the cache answers for them
    if family in ("sd15", "sd2"):
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # never load the NSFW checker
    kwargs[dtype_kwarg()] = as_dtype(dtype)
    pipeline = DiffusionPipeline.from_pretrained(path, revision=revision, variant=variant, **kwargs)
    teacher = frozen_teacher(pipeline, family, device, resolution=resolution,
                             text_encoder_device=None if cache is not None else text_encoder_device)
    teacher.source = {"pretrained": str(pretrained), "revision": revision, "variant": variant,
                      "dtype": as_dtype(dtype)}
    if cache is not None:
        teacher.dropped = text_names
        teacher.use_embeddings(cache)
    return teacher


def frozen_teacher(pipeline, family: str, device: str | torch.device = "cpu", *, resolution: int | None = None,
                   text_encoder_device: str | torch.device | None = None) -> Teacher:
    """``pipeline`` as a frozen ``Teacher``: every component on ``device`` (the text encoders on
    ``text_encoder_device`` when given), ``requires_grad_(False)``, in eval mode, without a progress bar.
    ``load_teacher`` loads the weights first; ``stepdistill plan`` builds the pipeline from its config files
    under FakeTensorMode instead."""
    for name, component in pipeline.components.items():
        if isinstance(component, nn.Module):
            on_cpu = text_encoder_device is not None and name.startswith("text_encoder")
            component.to(text_encoder_device if on_cpu else device)
            component.requires_grad_(False)
            component.eval()
    pipeline.set_progress_bar_config(disable=True)
    return Teacher(pipeline, family, resolution=resolution)
