"""Running the entries of ``stepdistill bench``: pipelines loaded once, options applied, each entry timed.

Per entry (``measure_entry``, with ``bench.measure``):

* **latency per image**: the pipeline called end to end (text encoding, every denoising step,
  VAE decode, ``output_type="pt"``) on a batch of 1, ``--warmup`` untimed calls then the median of
  ``--runs`` timed calls (``time.perf_counter``; ``torch.cuda.synchronize()`` before and after
  each call on CUDA);
* **throughput** at each of ``--batch-sizes``: images / median seconds of a batch call;
* **peak memory** during the timed calls of each batch size: ``torch.cuda.max_memory_allocated``
  (reset first) on CUDA; on CPU the peak resident set size of the process (``VmHWM``, reset
  through ``/proc/self/clear_refs``), which includes everything the process holds (all loaded
  pipelines), not the entry alone — the table says which;
* **quality**: the entry's quality function (``bench.quality``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stepdistill.bench.measure import peak_mib, reset_peak, time_calls
from stepdistill.bench.quality import QUALITY_KEYS, QualityContext, quality_fn
from stepdistill.bench.report import say, write_outputs
from stepdistill.bench.spec import (
    BenchEntry,
    BenchSettings,
    export_info,
    is_toy,
    resolve_pipeline,
    scheduler_class,
    validate,
)
from stepdistill.models.loading import as_dtype, dtype_kwarg
from stepdistill.sampling.schedulers import seeded_steps


# ---- pipelines -------------------------------------------------------------------------------------------
def _dtype(settings: BenchSettings, device: torch.device) -> torch.dtype:
    name = settings.dtype if settings.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return as_dtype(name)


def _device(settings: BenchSettings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={settings.device} but CUDA is not available; use --device cpu")
    return device


class PipelineCache:
    """Pipelines loaded once per (path, in-place options); tiny VAEs once per folder."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._pipes: dict = {}
        self._vaes: dict = {}

    def pipeline(self, spec: str, channels_last: bool = False, xformers: bool = False):
        from diffusers import DiffusionPipeline

        key = (resolve_pipeline(spec), channels_last, xformers)
        if key not in self._pipes:
            say(f"loading {spec}")
            kwargs = {dtype_kwarg(): self.dtype}
            from stepdistill.models.loading import read_model_index

            index = read_model_index(key[0])  # a folder, or a Hub id in the cache (checked by validate)
            if "safety_checker" in index:  # never load (or time) the NSFW checker
                kwargs.update(safety_checker=None, requires_safety_checker=False)
            pipe = DiffusionPipeline.from_pretrained(key[0], **kwargs).to(self.device)
            pipe.set_progress_bar_config(disable=True)
            if channels_last:
                for name in ("unet", "transformer", "vae"):
                    module = getattr(pipe, name, None)
                    if module is not None:
                        module.to(memory_format=torch.channels_last)
            if xformers:
                try:
                    import xformers  # noqa: F401
                except ImportError:
                    raise ValueError("xformers=true but xformers is not installed: pip install xformers "
                                     "(or use sdpa=... for PyTorch's attention backends)") from None
                pipe.enable_xformers_memory_efficient_attention()
            self._pipes[key] = pipe
        return self._pipes[key]

    def tiny_vae(self, spec: str, like_vae):
        """``AutoencoderTiny`` from a folder, or ``random``: its default architecture with random weights."""
        from diffusers import AutoencoderTiny

        if spec not in self._vaes:
            if spec == "random":
                torch.manual_seed(0)
                latent = int(getattr(like_vae.config, "latent_channels", 4))
                vae = AutoencoderTiny(latent_channels=latent)
            else:
                vae = AutoencoderTiny.from_pretrained(spec)
            self._vaes[spec] = vae.to(self.device, self.dtype).eval().requires_grad_(False)
        return self._vaes[spec]


def apply_options(pipe, options: dict, cache: PipelineCache, compile_mode: str | None = None):
    """A pipeline sharing ``pipe``'s modules with the per-entry options applied (the tiny VAE, compile).

    ``channels_last`` and ``xformers`` change modules in place and are applied when loading
    (``PipelineCache.pipeline``); ``sdpa`` is a context around the calls (``sdpa_context``).
    """
    overrides = {}
    vae = pipe.vae
    if options.get("tiny_vae"):
        vae = cache.tiny_vae(options["tiny_vae"], pipe.vae)
        if options.get("channels_last"):
            vae.to(memory_format=torch.channels_last)
        overrides["vae"] = vae
    if options.get("compile"):
        name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        overrides[name] = torch.compile(getattr(pipe, name), mode=compile_mode)
        vae = copy.copy(vae)  # shares weights; only this pipeline's decode is compiled
        vae.decode = torch.compile(vae.decode, mode=compile_mode)
        overrides["vae"] = vae
    return _with_components(pipe, overrides) if overrides else pipe


def _with_experts(pipe, spec: str, options: dict, compile_mode: str | None):
    """A mixture-of-experts export (Phased DMD) runs expert i at step i (``sampling.experts.ExpertSwitch``), each
    expert compiled too when the entry compiles; any other pipeline as it is."""
    from stepdistill.sampling.experts import SwitchedPipeline, with_experts

    path = resolve_pipeline(spec)
    if not Path(path).is_dir():
        return pipe
    switched = with_experts(pipe, path)
    if isinstance(switched, SwitchedPipeline) and options.get("compile"):
        switched.switch.map_experts(lambda b: torch.compile(b, mode=compile_mode))
    return switched


def _with_components(pipe, overrides: dict):
    """A new pipeline object of ``pipe``'s class over the same modules, with ``overrides`` swapped in."""
    from diffusers.utils import logging as dlogging

    components = {**pipe.components, **overrides}
    params = inspect.signature(type(pipe).__init__).parameters
    for key in params:  # constructor flags kept in the config (force_zeros_for_empty_prompt, ...)
        if key not in components and key in pipe.config:
            components[key] = pipe.config[key]
    if "requires_safety_checker" in params:
        components["requires_safety_checker"] = False
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # the safety-checker notice, once per entry
    try:
        new = type(pipe)(**{k: v for k, v in components.items() if k in params})
    finally:
        dlogging.set_verbosity(verbosity)
    new.set_progress_bar_config(disable=True)
    return new


@contextlib.contextmanager
def sdpa_context(backend: str):
    """``torch.nn.attention.sdpa_kernel`` for one backend; nothing for ``auto``."""
    if backend in (None, "auto"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    with sdpa_kernel([names[backend]]):
        yield


@dataclass
class Runner:
    """A callable pipeline (or HybridSampler) and the call arguments of one entry."""

    pipe: object
    steps: int
    guidance: float
    timesteps: list | None
    resolution: int
    sdpa: str
    quality: str  # name in QUALITY, or "none"

    def __call__(self, prompts: list[str], seed: int = 0, output_type: str = "pt"):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        kwargs = {"timesteps": self.timesteps} if self.timesteps else {}
        with sdpa_context(self.sdpa), seeded_steps(self.pipe, generators):
            return self.pipe(prompts, num_inference_steps=self.steps, guidance_scale=self.guidance,
                             height=self.resolution, width=self.resolution, generator=generators,
                             output_type=output_type, **kwargs).images

    def call_pipe(self, *args, **kwargs):
        """``self.pipe(*args, **kwargs)`` under the entry's attention backend: for quality functions that pass
        their own steps, generators and sizes."""
        with sdpa_context(self.sdpa):
            return self.pipe(*args, **kwargs)


def _default_guidance(pipe) -> float:
    param = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return float(param.default) if param is not None and param.default is not inspect.Parameter.empty else 1.0


def _default_resolution(pipe) -> int:
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        backbone = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        size = backbone.config.sample_size
    size = size[0] if isinstance(size, list | tuple) else size
    return int(size) * int(getattr(pipe, "vae_scale_factor", 8))


def fit_scheduler(scheduler, steps: int):
    """An ``LCMScheduler`` (the re-noising sampler of exported students) spaces its timesteps over
    ``original_inference_steps`` and refuses more steps than that: a student exported for 1 step is
    sampled at N steps with the evenly spaced N-step grid (``sampling.schedulers.renoising_scheduler``)."""
    from diffusers import LCMScheduler

    if isinstance(scheduler, LCMScheduler) and int(scheduler.config.get("original_inference_steps") or 50) < steps:
        return LCMScheduler.from_config(scheduler.config, original_inference_steps=steps)
    return scheduler


def _trained_timesteps(info: dict, steps: int) -> list | None:
    if info.get("timesteps") and info.get("num_inference_steps") == steps:
        return list(info["timesteps"])
    return None


def _shares(a, b) -> bool:
    """Same weights in two modules (used to share text encoders / VAE between a hybrid's pipelines)."""
    if a is b:
        return True
    if a is None or b is None or type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def build_runner(entry: BenchEntry, settings: BenchSettings, cache: PipelineCache) -> Runner:
    options = {**settings.options(), **entry.options}
    load = {"channels_last": options["channels_last"], "xformers": options["xformers"]}
    if entry.is_hybrid:
        from stepdistill.sampling.hybrid import HybridSampler

        teacher = cache.pipeline(entry.teacher, **load)
        student = cache.pipeline(entry.student, **load)
        # Exports carry the teacher's text encoders and VAE: share them (one copy, one text encoding).
        shared = {name: getattr(teacher, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3",
                                                               "tokenizer", "tokenizer_2", "tokenizer_3", "vae")
                  if hasattr(student, name) and getattr(student, name) is not None
                  and (name.startswith("tokenizer") or _shares(getattr(student, name), getattr(teacher, name)))}
        if "vae" in shared or any(k.startswith("text_encoder") for k in shared):
            student = _with_components(student, shared)
        teacher = apply_options(teacher, options, cache, settings.compile_mode)
        student = apply_options(student, options, cache, settings.compile_mode)
        info = export_info(resolve_pipeline(entry.student))
        scheduler = fit_scheduler(scheduler_class(entry.sampler).from_config(student.scheduler.config)
                                  if entry.sampler else student.scheduler, entry.steps)
        pipe = HybridSampler(teacher, student, entry.teacher_steps, scheduler=scheduler,
                             student_guidance_scale=max(1.0, float(info.get("guidance_scale", 1.0))))
        guidance = entry.guidance if entry.guidance is not None else _default_guidance(teacher)
        timesteps = None if entry.sampler else _trained_timesteps(info, entry.steps)
        quality_path = resolve_pipeline(entry.teacher)
        base = teacher
    else:
        base = cache.pipeline(entry.pipeline, **load)
        pipe = base
        scheduler = base.scheduler
        if entry.sampler:
            scheduler = scheduler_class(entry.sampler).from_config(base.scheduler.config)
        scheduler = fit_scheduler(scheduler, entry.steps)
        if scheduler is not base.scheduler:
            pipe = _with_components(base, {"scheduler": scheduler})
        pipe = apply_options(pipe, options, cache, settings.compile_mode)
        if options["fast"]:
            from stepdistill.sampling.fast import FastSampler

            pipe = FastSampler(pipe)
        pipe = _with_experts(pipe, entry.pipeline, options, settings.compile_mode)
        info = export_info(resolve_pipeline(entry.pipeline))
        guidance = entry.guidance if entry.guidance is not None else float(info.get("guidance_scale", _default_guidance(base)))
        timesteps = None if entry.sampler else _trained_timesteps(info, entry.steps)
        quality_path = resolve_pipeline(entry.pipeline)
    quality = entry.quality or settings.quality
    if quality == "auto":
        quality = "toy" if is_toy(quality_path) else "none"
    if quality != "none":
        quality_fn(quality)
    resolution = settings.resolution or _default_resolution(base)
    return Runner(pipe, entry.steps, float(guidance), timesteps, resolution, options["sdpa"], quality)


# ---- measuring -------------------------------------------------------------------------------------------
def measure_entry(runner: Runner, settings: BenchSettings, device: torch.device) -> dict:
    """Latency (batch 1), throughput and peak memory at each batch size."""
    result: dict = {"throughput": {}, "peak_mib": {}, "median_s": {}}
    for batch in sorted(set([1, *settings.batch_sizes])):
        prompts = [settings.prompt] * batch
        memory_kind = reset_peak(device)
        times = time_calls(lambda p=prompts: runner(p), settings.runs, settings.warmup, device)
        median = statistics.median(times)
        result["median_s"][batch] = median
        result["throughput"][batch] = batch / median
        result["peak_mib"][batch] = peak_mib(device)
        result["memory"] = memory_kind
    result["latency_ms"] = result["median_s"][1] * 1000
    return result


# ---- the run ---------------------------------------------------------------------------------------------
def run_bench(entries: list[BenchEntry], settings: BenchSettings, progress: bool = True) -> dict:
    """Measure every entry; write bench.md / bench.csv / bench.png / bench.json to ``settings.out``."""
    from tqdm.auto import tqdm

    validate(entries, settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = _device(settings)
    dtype = _dtype(settings, device)
    cache = PipelineCache(device, dtype)
    ctx = QualityContext(settings, device)
    rows = []
    t_start = time.perf_counter()
    for entry in tqdm(entries, desc="bench", disable=not progress):
        runner = build_runner(entry, settings, cache)
        row = {"name": entry.label(), "pipeline": entry.pipeline or f"{entry.teacher} + {entry.student}",
               "sampler": type(runner.pipe.scheduler).__name__,
               "steps": entry.steps, "teacher_steps": entry.teacher_steps, "guidance": runner.guidance,
               "resolution": runner.resolution,
               "options": {k: v for k, v in {**settings.options(), **entry.options}.items()
                           if v not in (False, None, "auto")}}
        with torch.inference_mode():
            row.update(measure_entry(runner, settings, device))
            row["quality"] = {}
            if runner.quality != "none":
                t0 = time.perf_counter()
                row["quality"] = quality_fn(runner.quality)(runner, ctx)
                row["quality_s"] = time.perf_counter() - t0
        row["quality_kind"] = runner.quality
        rows.append(row)
        say(f"{row['name']}: {row['latency_ms']:.1f} ms/image" + "".join(
            f", {k} {v:.3g}" for k, v in row["quality"].items() if k in QUALITY_KEYS and v is not None))
    result = {"device": str(device), "device_name": _device_name(device), "dtype": str(dtype).replace("torch.", ""),
              "threads": torch.get_num_threads(), "settings": asdict(settings), "rows": rows,
              "total_s": time.perf_counter() - t_start}
    write_outputs(result, Path(settings.out))
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
