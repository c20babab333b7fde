"""One real training iteration of a config at its real size, without weights or memory.

The teacher is built from its folder's config files under FakeTensorMode (``plan.fake``), the real
``Trainer`` builds the method's roles, optimizers and EMA on it, every optimizer makes its states (one step
on zero gradients), and the real ``run_phase`` runs each phase of the method once (TTUR: a critic update
and a generator update), measured by ``MemoryTracker`` and torch's ``FlopCounterMode`` (``flop_counter``); a step's FLOPs are
the phases' weighted by how often they run in a generator cycle.
Precision resolves as it does on a GPU (``auto`` -> bf16 autocast, bf16 frozen weights, fp32 master
weights of trained full-weight roles); optimizers are fused AdamW as on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from omegaconf import DictConfig, OmegaConf

from stepdistill.harness.parallel import fsdp_units
from stepdistill.harness.trainer import Trainer
from stepdistill.models import check_pretrained, frozen_teacher, resolve_pretrained
from stepdistill.models.loading import as_dtype
from stepdistill.plan.architectures import ARCHITECTURES, write_architecture
from stepdistill.plan.fake import fake_mode, pipeline_from_configs
from stepdistill.plan.memory import ACTIVATIONS, MemoryTracker


@dataclass
class Measured:
    """What one process holds at the peak of a training iteration, in bytes."""

    peak: int
    peak_phase: str
    # role (or frozen pipeline component) -> kind ("params", "grads", "optimizer", "ema", "autocast": its
    # weights' bf16 casts) -> bytes at the peak
    held: dict[str, dict[str, int]]
    persistent: dict[str, dict[str, int]]  # the same, between iterations (gradients freed)
    activations: int  # at the peak: activations saved for backward, temporaries
    flops_per_step: float  # mean over one generator cycle
    phase_flops: dict[str, int]  # FLOPs of each phase (one optimizer update of its roles)
    phase_counts: dict[str, int]  # how often each phase runs in one cycle
    cycle: int  # the cycle's length in steps
    trainable: dict[str, int] = field(default_factory=dict)  # role -> trainable parameter count
    parameters: dict[str, int] = field(default_factory=dict)  # role / component -> parameter count
    # What changes with the process count: per role, the parameters a DDP wrapper buckets gradients for,
    # whether FSDP2 shards it (a trainable full-weight role or an EMA target), and its largest FSDP2 unit.
    ddp_bucketed: dict[str, int] = field(default_factory=dict)
    fsdp_sharded: list[str] = field(default_factory=list)
    largest_unit: dict[str, int] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # what ran: family, precision, batch, resolution
    students: list[str] = field(default_factory=list)  # the roles the export writes
    roles: dict[str, dict] = field(default_factory=dict)  # role -> {trainable, lora, gradient_checkpointing}
    # pipeline components the GPU run keeps off the GPU: the text encoders with data.embeddings (not loaded)
    # or model.offload_text_encoders (on the CPU); measured like the rest, left out of every estimate
    off_gpu: dict[str, str] = field(default_factory=dict)  # component -> the config key that leaves it off
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def architecture_folder(pretrained: str, workdir: Path) -> Path:
    """A pipeline folder whose config files describe ``model.pretrained``: a local folder (or tiny / toy
    teacher) as it is, a shipped Hub id written from its published configs, else the config files of a
    Hub snapshot (``*.json`` / tokenizer files only: no weights)."""
    pretrained = str(pretrained)
    if pretrained in ARCHITECTURES:
        return write_architecture(pretrained, workdir / "architecture")
    path = Path(resolve_pretrained(pretrained))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(pretrained, allow_patterns=["*.json", "*.txt", "*.model", "tokenizer*/*"]))
    except Exception as e:  # offline, unknown id, gated repo
        raise ValueError(f"model.pretrained={pretrained!r}: its config files are not here and could not be "
                         f"fetched ({type(e).__name__}); download the pipeline folder (its *.json files are "
                         f"enough) and point model.pretrained at it, or use a shipped architecture: "
                         f"{', '.join(ARCHITECTURES)}") from None


class PlanTrainer(Trainer):
    """The real trainer, with the optimizers a GPU run gets (fused AdamW, the guard on the device)."""

    def __init__(self, cfg: DictConfig, teacher=None, networks=contextlib.nullcontext):
        AcceleratorState._reset_state()  # its own mixed precision: see own_accelerator_state
        super().__init__(cfg, teacher=teacher, networks=networks)

    def fused_optimizer(self, params) -> bool:
        return True


def plan_config(cfg: DictConfig, workdir: Path) -> DictConfig:
    """The run config as the GPU run resolves it, with nothing read from this machine's disk: bf16 where
    the precision is ``auto``, built-in prompts (prompts are padded to the encoders' lengths, so their
    text does not change a byte) encoded by the teacher's encoders even where ``data.embeddings`` names a
    cache (the same shapes; ``off_gpu`` leaves the encoders out of the figures), procedural images for a method that trains on data (encoded by the
    teacher's VAE on the fly, as an image folder is), no trackers, no samples, a scratch output folder."""
    cfg = cfg.copy()
    OmegaConf.set_readonly(cfg, False)
    if cfg.train.mixed_precision == "auto":
        cfg.train.mixed_precision = "bf16"
    if cfg.model.weight_dtype == "auto":
        cfg.model.weight_dtype = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.train.mixed_precision, "fp32")
    cfg.data.prompts = "builtin:tiny"
    cfg.data.embeddings = None  # the cache's rows are the fake encoders' outputs' shapes (see off_gpu)
    if cfg.data.images:
        cfg.data.images = "builtin:toy"
    cfg.run.trackers = ["none"]
    cfg.run.output_dir = str(workdir / "run")
    cfg.train.sample_every = 0
    cfg.train.progress_bar = False
    return cfg


def _stand_in_pairs(cfg: DictConfig, teacher, workdir: Path) -> None:
    """DMD's regression term reads teacher pairs (``stepdistill cache-pairs``) from disk: the planner hands
    it one batch of random ones of the right shape instead."""
    if not cfg.method.get("regression_pairs"):
        return
    from safetensors.torch import save_file

    shape = (cfg.data.batch_size, *teacher.latent_shape(cfg.model.resolution))
    folder = workdir / "pairs"
    folder.mkdir()
    save_file({"noise": torch.randn(shape), "latents": torch.randn(shape)}, str(folder / "pairs.safetensors"))
    (folder / "prompts.json").write_text(json.dumps(["a photo"] * shape[0]))
    cfg.method.regression_pairs = str(folder)


def phase_schedule(method, horizon: int = 64) -> tuple[dict[str, int], dict[str, int], int]:
    """The method's phases over one generator cycle: for each phase the first step it runs at and how
    often it runs, and the cycle's length in steps (TTUR: the critic's k updates per generator update)."""
    first: dict[str, int] = {}
    for step in range(horizon):
        for phase in method.phases(step):
            first.setdefault(phase, step)
    length = next((n for n in range(1, horizon + 1)
                   if all(method.phases(s) == method.phases(s + n) for s in range(horizon))), horizon)
    counts = {phase: sum(method.phases(s).count(phase) for s in range(length)) for phase in first}
    return first, counts, length


def _register(tracker: MemoryTracker, trainer: Trainer) -> dict[str, dict[str, int]]:
    """Tag every persistent tensor with its owner; returns parameter counts per owner."""
    counts: dict[str, int] = {}
    for name, component in trainer.teacher.pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            tracker.register([*component.parameters(), *component.buffers()], f"params/{name}")
            counts[name] = sum(p.numel() for p in component.parameters())
    for name, role in trainer.roles.items():
        if name == "teacher":
            continue
        own = [] if role.module is trainer.teacher.backbone else [*role.module.parameters(), *role.module.buffers()]
        head = [*role.head.parameters(), *role.head.buffers()] if role.head is not None else []
        tracker.register(own + head, f"params/{name}")
        trainable = role.trainable_parameters() if role.trainable else []
        tracker.register_parameters(trainable, f"params/{name}", f"grads/{name}")
        counts[name] = sum(p.numel() for p in own + head) + (sum(p.numel() for p in trainable) if not own else 0)
        if name in trainer.emas:
            tracker.register(trainer.emas[name].shadow_params, f"ema/{name}")
    return counts


def _layout(trainer: Trainer) -> dict:
    """Per role what DDP buckets, what FSDP2 shards and its largest FSDP2 unit (``harness.parallel``)."""
    teacher = trainer.teacher
    bucketed, sharded, largest = {}, [], {}
    for name, role in trainer.roles.items():
        own = role.module is not teacher.backbone
        if role.trainable:
            head = sum(p.numel() for p in role.head.parameters()) if role.head is not None else 0
            bucketed[name] = sum(p.numel() for p in role.trainable_parameters()) if own else head
        if own and (role.trainable and not role.is_lora or name in trainer.ema_targets):
            sharded.append(name)
            units = fsdp_units(role.module)
            inner = {id(p) for unit in units for p in unit.parameters()}
            rest = sum(p.numel() for p in role.module.parameters() if id(p) not in inner)
            largest[name] = max([rest, *(sum(p.numel() for p in unit.parameters()) for unit in units)])
    if trainer.cfg.train.fsdp_shard_teacher:  # the frozen teacher's backbone, under its component name
        name = teacher.backbone_name
        sharded.append(name)
        largest[name] = max(sum(p.numel() for p in unit.parameters()) for unit in fsdp_units(teacher.backbone))
    return {"ddp_bucketed": bucketed, "fsdp_sharded": sharded, "largest_unit": largest}


def _off_gpu(cfg: DictConfig, components) -> dict[str, str]:
    """The text encoders, where the run keeps them off the GPU, with the config key that does it."""
    key = ("data.embeddings" if cfg.data.get("embeddings")
           else "model.offload_text_encoders" if cfg.model.get("offload_text_encoders") else None)
    return {name: key for name in components if key and name.startswith("text_encoder")}


def _what_ran(cfg: DictConfig, family: str) -> dict:
    return {"config": cfg.run.name, "method": cfg.method.name, "pretrained": str(cfg.model.pretrained),
            "family": family, "resolution": cfg.model.resolution, "batch_size": cfg.data.batch_size,
            "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
            "mixed_precision": cfg.train.mixed_precision, "weight_dtype": cfg.model.weight_dtype,
            "parallel": cfg.train.parallel,
            "gradient_checkpointing": {n: bool(r.gradient_checkpointing) for n, r in (cfg.get("roles") or {}).items()
                                       if "gradient_checkpointing" in r}}


def _init_optimizer_states(trainer: Trainer) -> None:
    """Every optimizer takes one step on zero gradients, so that its states exist as in a running training
    (AdamW makes them at its first step); nothing else of the run changes (under FakeTensorMode the
    weights have no values to change)."""
    for opt in trainer.optimizers.values():
        raw = getattr(opt, "optimizer", opt)
        for group in raw.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        raw.step()
        raw.zero_grad(set_to_none=True)


def _register_optimizers(tracker: MemoryTracker, trainer: Trainer) -> None:
    for name, opt in trainer.optimizers.items():
        raw = getattr(opt, "optimizer", opt)
        tracker.register([t for state in raw.state.values() for t in state.values()], f"optimizer/{name}")


def _split(totals: dict[str, int]) -> tuple[dict[str, dict[str, int]], int]:
    held: dict[str, dict[str, int]] = {}
    for key, nbytes in totals.items():
        if key == ACTIVATIONS:
            continue
        kind, owner = key.split("/", 1)
        held.setdefault(owner, {}).setdefault(kind, 0)
        held[owner][kind] += nbytes
    return held, totals.get(ACTIVATIONS, 0)


class _NoModuleTracker:
    """Stands in for FlopCounterMode's ModuleTracker: every FLOP counted under "Global" only."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter():
    """torch's ``FlopCounterMode`` (the same formulas and total) without its per-module attribution.

    Its ModuleTracker hooks every module's outputs to follow the backward, and under non-reentrant
    gradient checkpointing those hooks keep each block's recomputed activations alive until the backward
    ends: the memory measured beside it was the checkpointed run's plus every block's recomputation
    (SDXL UNet with a LoRA, 512 px, batch 2: a 4.2 GiB peak for a 0.9 GiB one). The planner needs only
    the total."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()
    return counter


@contextlib.contextmanager
def own_accelerator_state():
    """accelerate keeps one mixed-precision setting per process: a planner run sets its own (bf16 where the
    config says auto) and leaves the process as it found it, for the next Accelerator to set its own."""
    AcceleratorState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state()


def planned_trainer(cfg: DictConfig, workdir: Path, fake: bool = True) -> tuple[PlanTrainer, str]:
    """The real trainer of ``cfg`` as the planner runs it (``plan_config``), on a teacher built from its
    architecture's config files; ``(trainer, family)``. With ``fake`` only the networks are fake: schedules,
    timesteps and the random draws stay real values. ``workdir`` holds the scratch files while it runs."""
    cfg = plan_config(cfg, workdir)
    folder = architecture_folder(cfg.model.pretrained, workdir)
    family = check_pretrained(str(folder), cfg.model.family)
    mode = fake_mode() if fake else contextlib.nullcontext()
    pipeline = pipeline_from_configs(folder, as_dtype(cfg.model.weight_dtype), mode)
    teacher = frozen_teacher(pipeline, family, "cpu", resolution=cfg.model.resolution)
    _stand_in_pairs(cfg, teacher, workdir)
    return PlanTrainer(cfg, teacher=teacher, networks=lambda: mode), family


ITERATION = "stepdistill.plan.iteration"  # the profiler range of plain_iteration's phases


def plain_iteration(cfg: DictConfig, workdir: Path) -> PlanTrainer:
    """The planner's iteration with real weights and nothing measuring it: the reference its figures are
    checked against (an allocator's record of it, e.g. ``torch.profiler``). Every optimizer makes its states,
    then each phase runs once inside the profiler range ``ITERATION`` (building the trainer comes before it:
    FSDP2 shards whole models once they are built)."""
    trainer, _ = planned_trainer(cfg, workdir, fake=False)
    _init_optimizer_states(trainer)
    with torch.profiler.record_function(ITERATION):
        for phase, step in phase_schedule(trainer.method)[0].items():
            trainer.run_phase(phase, step)
    return trainer


def measure(cfg: DictConfig, fake: bool = True) -> Measured:
    """Run ``cfg``'s training iteration under FakeTensorMode on this CPU and measure it (one process).

    ``fake=False`` runs the same with real random weights (for small models: the planner's own check).
    """
    started, asked = time.perf_counter(), cfg
    with tempfile.TemporaryDirectory(prefix="stepdistill-plan-") as tmp, warnings.catch_warnings():
        # torch's own Parameter check asks a fake tensor for its data pointer; nothing reads it.
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        with _quiet(), own_accelerator_state():
            trainer, family = planned_trainer(cfg, Path(tmp), fake)
            cfg, teacher = trainer.cfg, trainer.teacher
            tracker = MemoryTracker()
            counts_by_owner = _register(tracker, trainer)
            first, counts, length = phase_schedule(trainer.method)
            flops: dict[str, int] = {}
            peak, peak_phase, at_peak = 0, "", {}
            with tracker:
                _init_optimizer_states(trainer)
                _register_optimizers(tracker, trainer)
                persistent, _ = _split(tracker.totals)
                for phase, step in first.items():
                    tracker.reset_peak()
                    counter = flop_counter()
                    with counter:
                        trainer.run_phase(phase, step)
                    flops[phase] = counter.get_total_flops()
                    if tracker.peak > peak:
                        peak, peak_phase, at_peak = tracker.peak, phase, tracker.at_peak
            tracker.close()
            held, activations = _split(at_peak)
            trainable = {name: sum(p.numel() for p in role.trainable_parameters())
                         for name, role in trainer.roles.items() if role.trainable}
            layout = _layout(trainer)
    return Measured(peak=peak, peak_phase=peak_phase, held=held, persistent=persistent, activations=activations,
                    flops_per_step=sum(flops[p] * counts[p] for p in flops) / length, phase_flops=flops,
                    phase_counts=counts, cycle=length, trainable=trainable, parameters=counts_by_owner,
                    **layout, config=_what_ran(cfg, family), students=list(trainer.method.export_roles()),
                    roles={n: {"trainable": r.trainable, "lora": r.is_lora, "shared_base": r.module is teacher.backbone,
                               "heads_only": bool(r.cfg.heads_only),
                               "gradient_checkpointing": bool(r.cfg.gradient_checkpointing)}
                           for n, r in trainer.roles.items() if n != "teacher"},
                    off_gpu=_off_gpu(asked, counts_by_owner), seconds=time.perf_counter() - started)


@contextlib.contextmanager
def _quiet():
    """diffusers / transformers warn about random initialisation and unused config keys: not news here."""
    import diffusers
    import transformers

    levels = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
