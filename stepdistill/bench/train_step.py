"""``stepdistill bench-train``: time one training iteration on the real SD 1.5 / SDXL architectures.

The benchmark builds the real architecture with random weights (``bench.architectures``, nothing is
downloaded), loads a method config through the real harness (``harness.trainer.Trainer``) and
drives the training loop itself, one step at a time, exactly as ``Trainer.train`` does (every
phase of ``method.phases(step)`` through ``Trainer.run_phase``), without logging, samples or
checkpoints. It reports:

* **iteration time**: median over ``--iters`` timed iterations after ``--warmup`` warm-up ones,
  ``torch.cuda.synchronize()`` before and after each (``time.perf_counter``, ``bench.measure``). Methods
  with a two time-scale update rule have two kinds of iteration (DMD2: critic-only, and with the generator
  update every ``critic_steps_per_generator_step`` steps); each kind is timed ``--iters`` times
  (interleaved) and the amortised time per step is the frequency-weighted mean of the kinds.
* **peak memory**: ``torch.cuda.max_memory_allocated`` (reset before every timed iteration); on
  CPU the peak resident set size of the process (``resource.getrusage``).
* **sum of parts**: every denoiser call the timed iterations make is recorded per role
  (``bench.call_recorder``: input batch, the backbone batch actually run — classifier-free guidance
  doubles it —, grad mode, and whether its outputs are back-propagated), then each distinct call is timed alone in the same
  process (same inputs and conditioning, the harness's autocast; forward under ``no_grad``, or
  forward + backward of ``output.float().square().mean()`` when the iteration back-propagates
  through it), plus the batch preparation (text encoders). Counts are means per iteration. The
  update of each role the iteration trains (clip + AdamW + LR step + zero_grad + EMA, timed alone
  as ``run_phase`` does it) is a part too. The ratio iteration / sum of parts measures what the
  harness adds around the networks and the optimizers (host synchronisations, gradient reduction,
  Python overhead).
* **host synchronisations** (CUDA only, unless ``--no-sync-report``): one extra iteration per kind
  under ``torch.cuda.set_sync_debug_mode("warn")``; each synchronising call is listed by the first
  stepdistill source line on its stack.

GPU reference (the target of this benchmark): the official DMD2 code (github.com/tianweiy/DMD2)
takes **597 ms and 33.5 GiB** per SD 1.5 iteration (generator and critic updates) at batch 8,
512 px, bf16 on one H100. Target for stepdistill on the same setting::

    stepdistill bench-train --arch sd15 --batch-size 8 --every-step-generator --no-gradient-checkpointing

iteration <= 400 ms, and iteration <= 1.05 x the sum of parts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stepdistill.bench.call_recorder import CallRecorder, CallType, flatten_outputs
from stepdistill.bench.measure import median_ms, peak_mib, peak_rss_mib, reset_peak, sync, timed_call
from stepdistill.config.load import validate_out_dir

ARCH_CONFIGS = {"sd15": "dmd2_sd15", "sdxl": "dmd2_sdxl", "tiny": "tests/tiny_dmd2"}
_PHASE_SCAN = 2520  # divisible by 1..10: exact frequencies of periodic phase schedules
_SYNC_WARNING = "synchroniz"


def _say(msg: str) -> None:
    print(f"[bench-train] {msg}", file=sys.stderr, flush=True)


# ---- arguments and config ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stepdistill bench-train",
        description="Time one training iteration of a method on the real SD 1.5 / SDXL architecture with "
                    "random weights, through the real harness; print iteration time, peak memory and the "
                    "sum of its parts as a markdown table.",
    )
    p.add_argument("--arch", choices=tuple(ARCH_CONFIGS), default="sd15",
                   help="architecture: sd15, sdxl (random weights, built once and cached) or tiny (CPU test)")
    p.add_argument("--config", default=None, metavar="NAME",
                   help="method config (default: dmd2_sd15, dmd2_sdxl, tests/tiny_dmd2 for --arch sd15/sdxl/tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size (default: the config's)")
    p.add_argument("--resolution", type=int, default=None, help="model.resolution (default: the config's)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per iteration kind (default 3)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per iteration kind (default 10)")
    p.add_argument("--part-iters", type=int, default=5,
                   help="timed repetitions of each part for the sum of parts (default 5, after 2 warm-up)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="set roles.<trainable>.gradient_checkpointing (default: the config's)")
    p.add_argument("--every-step-generator", action="store_true",
                   help="method.critic_steps_per_generator_step=1: every iteration updates generator and critic "
                        "(how the official DMD2 597 ms reference is measured)")
    p.add_argument("--no-gan", action="store_true", help="switch the method's GAN terms off")
    p.add_argument("--no-sync-report", action="store_true", help="skip the host-synchronisation report (CUDA)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE.md",
                   help="also write the report here, and a CSV beside it (same name, .csv)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (applied last)")
    return p


def _has_override(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def _pipeline_latent_channels(folder: Path) -> int:
    try:
        return int(json.loads((folder / "vae" / "config.json").read_text()).get("latent_channels", 4))
    except (OSError, ValueError):
        return 4


def _synthetic_real_data(folder: Path, num: int, shape: tuple[int, ...], prompts: list[str]) -> Path:
    """A teacher-pairs folder of random latents: stands in for real images in GAN terms (same cost)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    save_file({"noise": torch.randn((num, *shape), generator=gen),
               "latents": torch.randn((num, *shape), generator=gen)}, str(folder / "pairs.safetensors"))
    (folder / "prompts.json").write_text(json.dumps([prompts[i % len(prompts)] for i in range(num)]))
    return folder


def build_config(args: argparse.Namespace, workdir: Path):
    """The benchmark's run config: the method config + random weights + no outputs + the user's overrides."""
    from stepdistill.config.load import parse_overrides, resolve_config_path
    from stepdistill.runconfig import load_config

    config = args.config or ARCH_CONFIGS[args.arch]
    user = list(args.overrides)
    resolve_config_path(config)  # fail on a wrong name or override before building any weights
    parse_overrides(user)
    ours = [
        f"run.output_dir={workdir / 'run'}",
        "run.trackers=[none]",
        "train.sample_every=0",
        "export.enabled=false",
        "train.progress_bar=false",
    ]
    pretrained = None
    if not _has_override(user, "model.pretrained"):
        from stepdistill.bench.architectures import random_pipeline

        _say(f"random-weight {args.arch} pipeline (built once, then cached)")
        pretrained = random_pipeline(args.arch)
        ours.append(f"model.pretrained={pretrained}")
        if not _has_override(user, "model.family"):
            ours.append(f"model.family={'sd15' if args.arch == 'tiny' else args.arch}")
    if args.batch_size is not None:
        ours.append(f"data.batch_size={args.batch_size}")
    if args.resolution is not None:
        ours.append(f"model.resolution={args.resolution}")

    cfg = load_config(config, [*ours, *user])
    method_keys = set(cfg.method.keys())
    extra = []
    if args.every_step_generator:
        if "critic_steps_per_generator_step" not in method_keys:
            raise ValueError(f"--every-step-generator: method {cfg.method.name!r} has no critic_steps_per_generator_step")
        extra.append("method.critic_steps_per_generator_step=1")
    if args.no_gan:
        extra += [f"method.{k}=0" for k in ("gan_generator_weight", "gan_critic_weight") if k in method_keys]
        extra.append("data.images=null")
    if args.gradient_checkpointing is not None:
        flag = str(args.gradient_checkpointing).lower()
        extra += [f"roles.{name}.gradient_checkpointing={flag}" for name, role in cfg.roles.items() if role.trainable]
    prompts = str(cfg.data.prompts)
    if not _has_override(user, "data.prompts") and not prompts.startswith("builtin:") and not Path(prompts).is_file():
        extra.append("data.prompts=builtin:tiny")  # the text is irrelevant: prompts are padded to 77 tokens
    # Real images (GAN terms) and teacher pairs (DMD's regression loss) that are not on this machine are
    # replaced by random latents of the right shape: the benchmark needs their cost, not their content.
    def synthetic() -> Path:
        from stepdistill.data.prompts import BUILTIN_PROMPTS

        res = int(cfg.model.resolution)
        channels = _pipeline_latent_channels(Path(pretrained)) if pretrained else 4
        batch = int(cfg.data.batch_size)
        return _synthetic_real_data(workdir / "pairs", max(2 * batch, 8), (channels, res // 8, res // 8),
                                    list(BUILTIN_PROMPTS["tiny"]))

    gan = any(float(cfg.method.get(k, 0) or 0) > 0 for k in ("gan_generator_weight", "gan_critic_weight"))
    images = cfg.data.images
    if gan and not args.no_gan and (not images or not Path(str(images)).exists()):
        extra.append(f"data.images={synthetic()}")
    elif images and not gan and not Path(str(images)).exists():
        extra.append("data.images=null")
    pairs = cfg.method.get("regression_pairs")
    if float(cfg.method.get("regression_weight", 0) or 0) > 0 and (not pairs or not Path(str(pairs)).exists()):
        extra.append(f"method.regression_pairs={synthetic()}")
    if extra:
        cfg = load_config(config, [*ours, *extra, *user])
    return cfg


# ---- timing each part alone ---------------------------------------------------------------------------
def _clear_grads(trainer, extra: list[torch.Tensor] = ()) -> None:
    for role in trainer.roles.values():
        for p in role.trainable_parameters():
            p.grad = None
    for t in extra:
        t.grad = None


def time_call(trainer, call: CallType, reps: int) -> float:
    """Median ms of one denoiser call alone: forward, or forward + backward when the iteration backprops."""
    acc = trainer.accelerator
    trainer._activate(trainer.method.phase_roles(call.phase))
    role = trainer.roles[call.role]
    leaves = [a for a in (*call.args, *call.kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    used = sorted(call.used_outputs)

    def run() -> None:
        with torch.set_grad_enabled(call.grad), acc.autocast():
            out = role.denoiser(*call.args, **call.kwargs)
            if used:
                tensors = flatten_outputs(out)
                loss = sum(tensors[i].float().square().mean() for i in used)
                acc.backward(loss)

    try:
        return median_ms(run, reps, device=trainer.device, cleanup=lambda: _clear_grads(trainer, leaves))
    finally:
        _clear_grads(trainer, leaves)
        trainer._activate(())


def time_make_batch(trainer, index: int, reps: int) -> float:
    def encode():
        trainer._batch_cache = None  # the phases of a step share one batch; time a real encoding
        return trainer.make_batch(index)

    return median_ms(encode, reps, device=trainer.device)


def time_optimizer(trainer, name: str, reps: int) -> float:
    """Median ms of a role's update as ``run_phase`` does it: clip, optimizer and LR step, zero_grad, EMA."""
    acc = trainer.accelerator
    role = trainer.roles[name]
    params = role.trainable_parameters()
    max_norm = role.cfg.max_grad_norm if role.cfg.max_grad_norm > 0 else math.inf

    def fill() -> None:
        for p in params:
            p.grad = torch.zeros_like(p)

    def step() -> None:
        acc.clip_grad_norm_(params, max_norm)
        trainer.optimizers[name].step()
        trainer.schedulers[name].step()
        trainer.optimizers[name].zero_grad(set_to_none=True)
        if name in trainer.emas:
            trainer.emas[name].step(params)

    fill()
    try:
        return median_ms(step, reps, device=trainer.device, cleanup=fill)
    finally:
        _clear_grads(trainer)


# ---- host synchronisations -----------------------------------------------------------------------------
def _sync_site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost stepdistill frame (outside the benchmark) of a stack, and the frame that made the call."""
    while stack and stack[-1].filename.replace(os.sep, "/").endswith("/warnings.py"):
        stack = stack[:-1]
    inner = stack[-1] if stack else None
    for frame in reversed(stack):
        path = frame.filename.replace(os.sep, "/")
        if "/stepdistill/" in path and "/stepdistill/bench/" not in path:
            where = f"stepdistill/{path.rsplit('/stepdistill/', 1)[1]}:{frame.lineno} {frame.name}"
            if inner is not None and inner is not frame:
                ipath = inner.filename.replace(os.sep, "/")
                where += f" (in {ipath.rsplit('/', 2)[-2]}/{ipath.rsplit('/', 1)[-1]}:{inner.lineno} {inner.name})"
            return where
    if inner is None:
        return "?"
    return f"{inner.filename}:{inner.lineno} {inner.name}"


@contextlib.contextmanager
def catch_syncs(sites: Counter, debug_mode: bool | None = None):
    """Count synchronising CUDA calls by call site (``torch.cuda.set_sync_debug_mode("warn")``).

    ``debug_mode`` (default: when CUDA is available) switches torch's sync debug mode on; without it
    only warnings raised otherwise are counted (for tests).
    """
    if debug_mode is None:
        debug_mode = torch.cuda.is_available()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        fallback = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if _SYNC_WARNING in str(message):
                sites[_sync_site(traceback.extract_stack()[:-1])] += 1
            else:
                fallback(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        previous = torch.cuda.get_sync_debug_mode() if debug_mode else None
        if debug_mode:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            if debug_mode:
                torch.cuda.set_sync_debug_mode(previous)


# ---- the benchmark -------------------------------------------------------------------------------------
IterationKind = tuple[str, ...]


def iteration_name(kind: IterationKind) -> str:
    if kind == ("critic",):
        return "critic-only iteration"
    if "generator" in kind and len(kind) > 1:
        return "iteration with generator update"
    return f"iteration ({' + '.join(kind)})"


def plan_steps(method, per_kind: int) -> tuple[dict[IterationKind, float], list[tuple[IterationKind, int]]]:
    """Frequencies of the kinds of iteration, and an interleaved list of (kind, step) with ``per_kind`` each."""
    counts: Counter = Counter()
    steps: dict[IterationKind, list[int]] = {}
    for s in range(_PHASE_SCAN):
        kind = tuple(method.phases(s))
        counts[kind] += 1
        if len(steps.setdefault(kind, [])) < per_kind:
            steps[kind].append(s)
    s = _PHASE_SCAN
    while any(len(v) < per_kind for v in steps.values()) and s < 100 * _PHASE_SCAN:
        kind = tuple(method.phases(s))
        if kind in steps and len(steps[kind]) < per_kind:
            steps[kind].append(s)
        s += 1
    freq = {k: counts[k] / _PHASE_SCAN for k in steps}
    order = [(kind, steps[kind][i]) for i in range(per_kind) for kind in steps if i < len(steps[kind])]
    return freq, order


@dataclass
class Part:
    label: str
    role: str
    ms_per_call: float
    count: float

    @property
    def ms(self) -> float:
        return self.ms_per_call * self.count


@dataclass
class KindResult:
    kind: IterationKind
    frequency: float
    times_ms: list[float]
    peak_mib: float | None
    parts: list[Part]
    optimizer: list[Part]
    syncs: Counter = field(default_factory=Counter)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def networks_ms(self) -> float:
        """The denoiser calls and text encoders alone."""
        return sum(p.ms for p in self.parts)

    @property
    def sum_of_parts_ms(self) -> float:
        """Everything the iteration runs, timed part by part: the networks and the optimizer steps."""
        return self.networks_ms + sum(p.ms for p in self.optimizer)


@dataclass
class BenchResult:
    info: dict[str, str]
    kinds: list[KindResult]
    cpu_rss: tuple[float, float] | None = None  # (peak RSS MiB, growth during timing MiB) on CPU
    sync_note: str = ""

    @property
    def amortised_ms(self) -> float:
        return sum(k.frequency * k.median_ms for k in self.kinds)

    @property
    def amortised_parts_ms(self) -> float:
        return sum(k.frequency * k.sum_of_parts_ms for k in self.kinds)


def run_iteration(trainer, step: int, recorder: CallRecorder | None = None) -> None:
    for phase in trainer.method.phases(step):
        if recorder is not None:
            recorder.phase = phase
        trainer.run_phase(phase, step)


def benchmark(trainer, warmup: int, iters: int, part_iters: int = 5, sync_report: bool = True) -> BenchResult:
    """Time ``trainer``'s iterations and their parts (see the module docstring)."""
    if warmup < 0 or iters < 1 or part_iters < 1:
        raise ValueError(f"--warmup={warmup} must be >= 0, --iters={iters} and --part-iters={part_iters} >= 1")
    cuda = torch.cuda.is_available() and trainer.device.type == "cuda"
    freq, order = plan_steps(trainer.method, warmup + iters)
    seen: Counter = Counter()
    times: dict[IterationKind, list[float]] = {k: [] for k in freq}
    peaks: dict[IterationKind, float] = {k: 0.0 for k in freq}
    recorder = CallRecorder(trainer)
    rss_before = peak_rss_mib()
    with recorder.installed():
        for i, (kind, step) in enumerate(order):
            timed = seen[kind] >= warmup
            seen[kind] += 1
            if i == 0:
                _say(f"{len(order)} iterations: {warmup} warm-up + {iters} timed of each of "
                     f"{', '.join(iteration_name(k) for k in freq)}")
            recorder.kind = kind if timed else None
            if cuda:
                reset_peak(trainer.device)
            elapsed = timed_call(functools.partial(run_iteration, trainer, step, recorder), trainer.device) * 1e3
            recorder.kind = None
            if timed:
                times[kind].append(elapsed)
                recorder.iterations[kind] += 1
                if cuda:
                    peaks[kind] = max(peaks[kind], peak_mib(trainer.device))
    rss_after = peak_rss_mib()

    syncs: dict[IterationKind, Counter] = {k: Counter() for k in freq}
    sync_note = "" if cuda else "n/a (no CUDA)"
    if cuda and sync_report:
        _, extra = plan_steps(trainer.method, 1)
        try:
            for kind, step in extra:
                sync(trainer.device)
                with catch_syncs(syncs.setdefault(kind, Counter())):
                    run_iteration(trainer, step)
                sync(trainer.device)
        except Exception as e:  # a diagnostic only: never lose the timings for it
            sync_note = f"sync report failed: {type(e).__name__}: {e}"
    elif cuda:
        sync_note = "skipped (--no-sync-report)"

    _say("timing each part alone")
    part_cache: dict[tuple, float] = {}
    batch_cache: dict[int, float] = {}
    opt_cache: dict[str, float] = {}
    results = []
    for kind in freq:
        n = recorder.iterations[kind]
        parts: list[Part] = []
        indices = recorder.batches.get(kind, [])
        if indices:
            if indices[0] not in batch_cache:
                batch_cache[indices[0]] = time_make_batch(trainer, indices[0], part_iters)
            parts.append(Part("make_batch: text encoders (prompt + negative)", "text_encoder",
                              batch_cache[indices[0]], len(indices) / n))
        if kind in recorder.prompt_calls:
            prompts, count = recorder.prompt_calls[kind]
            ms = median_ms(lambda p=prompts: trainer.teacher.encode_prompt(p), part_iters, device=trainer.device)
            parts.append(Part(f"text encoders: encode_prompt by the method, batch {len(prompts)}", "text_encoder",
                              ms, count / n))
        for call in recorder.calls.get(kind, {}).values():
            key = call.replay_key()
            if key not in part_cache:
                part_cache[key] = time_call(trainer, call, part_iters)
            trains = call.role in trainer.method.phase_roles(call.phase) and trainer.roles[call.role].trainable
            parts.append(Part(call.label(trains), call.role, part_cache[key], call.count / n))
        optimizer = []
        for phase in kind:
            for name in trainer.method.phase_roles(phase):
                if not trainer.roles[name].trainable:
                    continue
                if name not in opt_cache:
                    opt_cache[name] = time_optimizer(trainer, name, part_iters)
                optimizer.append(Part(f"optimizer step: {name} (clip + AdamW + LR + zero_grad)", name,
                                      opt_cache[name], 1))
        results.append(KindResult(kind, freq[kind], times[kind], peaks[kind] if cuda else None, parts, optimizer,
                                  syncs[kind]))

    info = _describe(trainer)
    cpu_rss = None
    if not cuda and rss_before is not None and rss_after is not None:
        cpu_rss = (rss_after, rss_after - rss_before)
    return BenchResult(info, results, cpu_rss, sync_note)


def _describe(trainer) -> dict[str, str]:
    import diffusers

    cfg = trainer.cfg
    device = trainer.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        dev = f"CPU ({torch.get_num_threads()} threads)"
    roles = []
    for name, role in trainer.roles.items():
        params = sum(p.numel() for p in role.module.parameters()) / 1e6
        if not role.trainable:
            what = f"frozen, {params:.1f}M params"
        elif role.is_lora:
            base = "the teacher's" if role.module is trainer.teacher.backbone else "a frozen copy of"
            trainable = sum(p.numel() for p in role.trainable_parameters()) / 1e6
            what = f"LoRA r{role.cfg.lora_rank}: {trainable:.1f}M params on {base} {params:.1f}M"
        else:
            what = f"trainable, {params:.1f}M params"
        if role.trainable and role.cfg.gradient_checkpointing:
            what += ", gradient checkpointing"
        roles.append(f"{name} ({what})")
    method = cfg.method
    ttur = method.get("critic_steps_per_generator_step")
    every = "every step" if ttur == 1 else f"every {ttur} steps"
    return {
        "method": f"{method.name}" + (f" (generator update {every})" if ttur else ""),
        "model": f"{trainer.teacher.family}: {type(trainer.teacher.backbone).__name__}, random weights",
        "batch": f"{cfg.data.batch_size} per step, {cfg.model.resolution} px, "
                 f"{cfg.train.gradient_accumulation_steps} micro-batch(es)",
        "precision": f"mixed {trainer.accelerator.mixed_precision}, frozen weights "
                     f"{str(trainer.weight_dtype).replace('torch.', '')}",
        "roles": "; ".join(roles),
        "device": dev,
        "software": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
    }


# ---- report --------------------------------------------------------------------------------------------
def _fmt_ms(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3f}"


def _fmt_count(count: float) -> str:
    return str(int(count)) if abs(count - round(count)) < 1e-9 else f"{count:.2f}"


def _fmt_mem(kind: KindResult, result: BenchResult) -> str:
    if kind.peak_mib is not None:
        return f"{kind.peak_mib / 1024:.2f} GiB"
    if result.cpu_rss is not None:
        return f"n/a (CPU: peak RSS {result.cpu_rss[0]:.0f} MiB, +{result.cpu_rss[1]:.0f} during timing)"
    return "n/a"


def csv_rows(result: BenchResult) -> list[dict[str, Any]]:
    rows = []

    def row(section, kind, label, role="", ms_per_call="", count="", ms="", share="", peak=""):
        rows.append({"section": section, "kind": kind, "role": role, "label": label, "ms_per_call": ms_per_call,
                     "count": count, "ms": ms, "share": share, "peak_memory_mib": peak})

    for k in result.kinds:
        name = iteration_name(k.kind)
        peak = f"{k.peak_mib:.1f}" if k.peak_mib is not None else (
            f"{result.cpu_rss[0]:.1f}" if result.cpu_rss else "")
        row("summary", "iteration", name, ms=f"{k.median_ms:.4f}", count=len(k.times_ms),
            share=f"{k.median_ms / k.sum_of_parts_ms:.4f}", peak=peak)
    if len(result.kinds) > 1:
        row("summary", "amortised", "amortised per step", ms=f"{result.amortised_ms:.4f}",
            share=f"{result.amortised_ms / result.amortised_parts_ms:.4f}")
    for k in result.kinds:
        section = f"parts: {iteration_name(k.kind)}"
        total = k.sum_of_parts_ms
        for p in k.parts:
            row(section, "part", p.label, p.role, f"{p.ms_per_call:.4f}", f"{p.count:.4g}", f"{p.ms:.4f}",
                f"{p.ms / total:.4f}")
        for p in k.optimizer:
            row(section, "optimizer", p.label, p.role, f"{p.ms_per_call:.4f}", f"{p.count:.4g}", f"{p.ms:.4f}",
                f"{p.ms / total:.4f}")
        row(section, "networks", "networks alone (denoiser calls, text encoders)", ms=f"{k.networks_ms:.4f}",
            share=f"{k.networks_ms / total:.4f}")
        row(section, "sum", "sum of parts", ms=f"{total:.4f}", share="1.0000")
        row(section, "iteration", f"{iteration_name(k.kind)} (median)", ms=f"{k.median_ms:.4f}",
            count=len(k.times_ms), share=f"{k.median_ms / total:.4f}")
    return rows


def render_markdown(result: BenchResult) -> str:
    lines = ["# stepdistill bench-train", ""]
    lines += [f"- **{key}**: {value}" for key, value in result.info.items()]
    lines += ["", "| iteration | ms (median) | min – max ms | peak memory | sum of parts ms | iteration / sum |",
              "|---|---:|---:|---|---:|---:|"]
    for k in result.kinds:
        lines.append(f"| {iteration_name(k.kind)} | {_fmt_ms(k.median_ms)} | {_fmt_ms(min(k.times_ms))} – "
                     f"{_fmt_ms(max(k.times_ms))} | {_fmt_mem(k, result)} | {_fmt_ms(k.sum_of_parts_ms)} | "
                     f"{k.median_ms / k.sum_of_parts_ms:.2f}× |")
    if len(result.kinds) > 1:
        mix = ", ".join(f"{k.frequency:.0%} {iteration_name(k.kind)}" for k in result.kinds)
        lines.append(f"| **amortised per step** ({mix}) | {_fmt_ms(result.amortised_ms)} | | | "
                     f"{_fmt_ms(result.amortised_parts_ms)} | {result.amortised_ms / result.amortised_parts_ms:.2f}× |")
    for k in result.kinds:
        total = k.sum_of_parts_ms
        lines += ["", f"## Parts of the {iteration_name(k.kind)} (each timed alone; counts per iteration)", "",
                  "| part | ms per call | count | ms | share |", "|---|---:|---:|---:|---:|"]
        for p in k.parts:
            lines.append(f"| {p.label} | {_fmt_ms(p.ms_per_call)} | {_fmt_count(p.count)} | {_fmt_ms(p.ms)} | "
                         f"{p.ms / total:.1%} |")
        for p in k.optimizer:
            lines.append(f"| {p.label} | {_fmt_ms(p.ms_per_call)} | {_fmt_count(p.count)} | {_fmt_ms(p.ms)} | "
                         f"{p.ms / total:.1%} |")
        lines.append(f"| **sum of parts** | | | **{_fmt_ms(total)}** | 100% |")
        lines.append(f"| networks alone (no optimizer steps) | | | {_fmt_ms(k.networks_ms)} | "
                     f"{k.networks_ms / total:.1%} |")
        lines.append(f"| **iteration** (median of {len(k.times_ms)}) | | | **{_fmt_ms(k.median_ms)}** | "
                     f"{k.median_ms / total:.2f}× sum, {k.median_ms / k.networks_ms:.2f}× networks alone |")
    lines += ["", "## Host synchronisations per iteration (torch.cuda.set_sync_debug_mode)", ""]
    if result.sync_note:
        lines.append(f"{result.sync_note}")
    else:
        for k in result.kinds:
            lines.append(f"- {iteration_name(k.kind)}: {sum(k.syncs.values())}")
            lines += [f"  - {n} × {site}" for site, n in k.syncs.most_common(15)]
    lines += ["", "GPU reference: the official DMD2 code takes 597 ms and 33.5 GiB per SD 1.5 iteration (generator + "
              "critic) at batch 8, 512 px, bf16 on one H100; target <= 400 ms and <= 1.05× the sum of parts.", ""]
    return "\n".join(lines)


def write_report(result: BenchResult, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(result))
    csv_path = out.with_suffix(".csv")
    rows = csv_rows(result)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out, csv_path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key in ("warmup", "iters", "part_iters", "batch_size", "resolution"):
        value = getattr(args, key)
        if value is not None and value < (0 if key == "warmup" else 1):
            parser.error(f"--{key.replace('_', '-')}={value} is out of range")
    if args.out is not None:
        try:
            if args.out.is_dir():
                raise ValueError(f"--out {str(args.out)!r} is a folder; give the markdown file to write (FILE.md)")
            validate_out_dir(args.out.parent, f"the folder of --out {str(args.out)!r}:")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing to download
    from stepdistill.harness.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="stepdistill-bench-") as tmp:
        try:
            cfg = build_config(args, Path(tmp))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _say(f"config {args.config or ARCH_CONFIGS[args.arch]}: {cfg.method.name}, teacher {cfg.model.pretrained}")
        try:
            trainer = Trainer(cfg)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        result = benchmark(trainer, args.warmup, args.iters, args.part_iters, sync_report=not args.no_sync_report)
    text = render_markdown(result)
    print(text)
    if args.out is not None:
        md, csv_path = write_report(result, args.out)
        _say(f"wrote {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
