"""Structured configuration: one dataclass per part of a run.

The YAML files in ``configs/`` are merged onto these dataclasses with OmegaConf, so an unknown key
or a value of the wrong type fails before any model is loaded (see ``config/load.py``). Method
configs are dataclasses too; each method declares its own (``DistillMethod.Config``) and the loader
picks it by ``method.name``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from stepdistill.families import FAMILY_CHOICES

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
WEIGHT_DTYPES = ("auto", "fp32", "bf16", "fp16")
TRACKERS = ("wandb", "tensorboard", "none")
# diffusers.optimization.get_scheduler's names (kept here: the config floor imports no model library).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")


def _check_choice(section: str, key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


@dataclass
class RunConfig:
    name: str = "stepdistill"
    output_dir: str = "runs/${run.name}"
    seed: int = 0
    # wandb runs offline unless wandb_mode=online; "none" keeps only the CSV/JSONL metrics in the run folder.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_mode: str = "offline"
    # A fresh run (train.resume=null) into a folder that holds another run's checkpoints or export stops
    # before anything loads; true moves the old contents to <output_dir>.previous-<time> (never deleted).
    overwrite: bool = False

    def __post_init__(self) -> None:
        for t in self.trackers:
            _check_choice("run", "trackers", t, TRACKERS)
        _check_choice("run", "wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))


@dataclass
class ModelConfig:
    # Hub id, local diffusers folder, or "tiny:<family>" (a tiny random pipeline for tests).
    pretrained: str = MISSING
    family: str = "auto"
    revision: str | None = None
    variant: str | None = None
    # dtype of frozen weights (teacher); "auto" = bf16 on GPU when mixed precision is bf16, else fp32.
    weight_dtype: str = "auto"
    resolution: int = 512
    # Keep the text encoders in CPU memory and encode the prompts there (only the conditioning moves to the
    # GPU): the GPU holds no T5 / CLIP weights, at the cost of encoding on the CPU. Not needed with
    # data.embeddings (the run then loads no text encoders at all).
    offload_text_encoders: bool = False

    def __post_init__(self) -> None:
        _check_choice("model", "family", self.family, FAMILY_CHOICES)
        _check_choice("model", "weight_dtype", self.weight_dtype, WEIGHT_DTYPES)
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"model.resolution={self.resolution} must be a positive multiple of 8")


@dataclass
class DataConfig:
    # Prompt source: a .txt file (one per line), .csv/.jsonl/.json with a caption column, or
    # "builtin:tiny" (a few fixed prompts, for tests and smoke runs).
    prompts: str = MISSING
    # The caption column of a table data.prompts or data.images (save_to_disk, parquet, arrow), and the key
    # of a tar shard's .json captions (there caption, then text, if it is absent).
    caption_column: str = "caption"
    # Real data for GAN terms (DMD2): a folder of images with a metadata.jsonl of captions, a folder of
    # teacher samples written by `stepdistill cache-pairs`, builtin:toy (procedural toy-domain images), or a
    # streamed source: a datasets save_to_disk folder, a .parquet file or folder of them, .arrow files, or
    # webdataset .tar shards (a folder, or a brace pattern like shards/{00000..00003}.tar). Methods with a
    # GAN term require it.
    images: str | None = None
    # The image column of a save_to_disk / parquet / arrow data.images (image bytes, a datasets Image, or
    # a path relative to the data); data.caption_column names its captions.
    image_column: str = "image"
    # Every image of an image-folder data.images is opened and decoded once before training (cached by size
    # and mtime); unreadable ones stop the run with their list, or with true are left out (one warning). A
    # streamed source is decoded as it is drawn: an unreadable image stops the run, or with true is replaced
    # by another sample of its batch (one warning each).
    skip_unreadable: bool = False
    batch_size: int = 1  # per process
    negative_prompt: str = ""
    # DataLoader worker processes that read and decode a streamed data.images (0: the training process).
    num_workers: int = 0
    # A folder written by `stepdistill cache-embeddings` (the prompts above encoded once by the teacher's text
    # encoders): the run loads no text encoders and reads the conditioning from it. It must match the
    # teacher, family and resolution and hold every prompt; both are checked before anything loads.
    embeddings: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")


@dataclass
class RoleConfig:
    """One network of the method: where it starts, whether it trains, full weights or LoRA."""

    init_from: str = "teacher"  # "teacher" or a path to a diffusers backbone folder
    trainable: bool = True
    lora_rank: int = 0  # 0 = full weights; >0 = peft LoRA of that rank
    lora_alpha: float | None = None  # default: = rank
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # LoRA only: put the adapter on the teacher's frozen base instead of a second copy (saves memory).
    share_teacher_base: bool = False
    # The role trains only its head modules, on the teacher's own frozen backbone (no copy, no LoRA):
    # LADD's discriminator = trainable heads on the teacher's features.
    heads_only: bool = False
    gradient_checkpointing: bool = False
    # > 0: the role's UNet takes the guidance scale as an input of this width (diffusers'
    # time_cond_proj_dim, zero-initialised; models/guidance.py): guidance distillation, LCM.
    guidance_embedding_dim: int = 0
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    lr_scheduler: str = "constant"  # any name of diffusers.optimization.get_scheduler; it spans the role's own updates in train.max_steps
    lr_warmup_steps: int = 0  # counted in this role's optimizer updates, the same on any number of processes
    max_grad_norm: float = 10.0  # <= 0 disables clipping
    ema_decay: float = 0.0  # > 0 keeps an EMA copy (used for export)

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"roles.*.lora_rank={self.lora_rank} must be >= 0")
        if self.guidance_embedding_dim < 0:
            raise ValueError(f"roles.*.guidance_embedding_dim={self.guidance_embedding_dim} must be >= 0")
        if self.guidance_embedding_dim and self.lora_rank:
            raise ValueError("roles.*.guidance_embedding_dim > 0 adds a full-weight input layer, which a LoRA "
                             "role neither trains nor exports: use lora_rank=0, or drop the guidance input "
                             "(guidance_embedding_dim=0; LCM-LoRA: method.w_embedding=false; guidance "
                             "distillation: guidance_min = guidance_max)")
        if self.heads_only and (self.lora_rank or self.init_from != "teacher" or self.guidance_embedding_dim):
            raise ValueError("roles.*.heads_only=true trains heads on the teacher's frozen backbone: it needs "
                             "init_from=teacher, lora_rank=0 and guidance_embedding_dim=0")
        if self.share_teacher_base and self.lora_rank == 0:
            raise ValueError("roles.*.share_teacher_base=true needs lora_rank > 0 (only a LoRA can share the base)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"roles.*.ema_decay={self.ema_decay} must be in [0, 1)")
        if self.trainable and not self.lr > 0:
            raise ValueError(f"roles.*.lr={self.lr} must be > 0 for a trainable role (to freeze it, set "
                             "roles.*.trainable=false)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"roles.*.betas={list(self.betas)} must be two values in [0, 1), e.g. [0.9, 0.999]")
        if self.weight_decay < 0 or not self.adam_eps > 0:
            raise ValueError(f"roles.*.weight_decay={self.weight_decay} must be >= 0 and roles.*.adam_eps="
                             f"{self.adam_eps} > 0")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"roles.*.lora_alpha={self.lora_alpha} must be > 0 (or null: = lora_rank)")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"roles.*.lr_warmup_steps={self.lr_warmup_steps} must be >= 0")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"roles.*.lr_scheduler={self.lr_scheduler!r} is not valid; choose one of: "
                             f"{', '.join(LR_SCHEDULERS)}")


@dataclass
class TrainConfig:
    # Training iterations; one iteration runs every phase of method.phases(step) (for DMD2: a critic
    # update every iteration, a generator update every critic_steps_per_generator_step iterations).
    max_steps: int = 1000
    mixed_precision: str = "auto"  # auto: bf16 on GPU (fp16 diverges for these methods), no on CPU
    gradient_accumulation_steps: int = 1
    allow_tf32: bool = True
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    log_every: int = 10
    sample_every: int = 500  # 0 disables sample grids
    sample_prompts: list[str] = field(default_factory=list)  # default: the first prompts of the data
    progress_bar: bool = True
    # CPU only: torch threads per process; 0 = the available cores / local processes. (`accelerate launch`
    # exports OMP_NUM_THREADS=1 when it is unset, which would leave all but one core idle.)
    cpu_threads: int = 0
    # A NaN / inf loss or gradient norm: "stop" (no update applied; the run ends with a non-zero exit naming
    # the step, phase, role and the last finite checkpoint) or "skip" (the update is dropped and counted in
    # nonfinite/skipped; more than max_nonfinite_skips in a row stop the run as "stop" does).
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    # How several processes share the work. ddp: every process holds every network whole and gradients
    # are averaged (accelerate's DDP). fsdp2: each trainable full-weight role (and EMA target role) is
    # sharded over the processes with torch's fully_shard, one unit per UNet / transformer block, so its
    # weights, gradients and AdamW states take 1/N of the memory each; the frozen teacher stays whole and
    # LoRA roles on its shared base train as under ddp. Same launch: accelerate launch --multi_gpu ...
    parallel: str = "ddp"
    fsdp_checkpoint: str = "gathered"  # fsdp2 checkpoints: gathered (sharded roles written whole by the first process) or sharded (each process writes its own shards through torch.distributed.checkpoint into dcp/; for roles too large for one process's memory); fixed on resume
    fsdp_reshard_after_forward: bool = True  # free each block's gathered weights after its forward (less memory, one more all-gather in backward)
    fsdp_cpu_offload: bool = False  # keep the sharded weights, gradients and optimizer states in CPU memory
    # fsdp2: shard the frozen teacher's backbone too (1/N of its weights per process, gathered block by block
    # as it runs). Not with roles on its shared base (LoRA share_teacher_base, heads_only): they train as under ddp.
    fsdp_shard_teacher: bool = False

    def __post_init__(self) -> None:
        _check_choice("train", "mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("train", "on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _check_choice("train", "parallel", self.parallel, ("ddp", "fsdp2"))
        _check_choice("train", "fsdp_checkpoint", self.fsdp_checkpoint, ("gathered", "sharded"))
        if self.max_nonfinite_skips < 0:
            raise ValueError(f"train.max_nonfinite_skips={self.max_nonfinite_skips} must be >= 0")
        if self.cpu_threads < 0:
            raise ValueError(f"train.cpu_threads={self.cpu_threads} must be >= 0 (0: all available cores)")
        for key in ("max_steps", "gradient_accumulation_steps", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.sample_every < 0:
            raise ValueError(f"train.sample_every={self.sample_every} must be >= 0 (0 disables sample grids)")
        if self.checkpoints_total_limit < 0:
            raise ValueError(f"train.checkpoints_total_limit={self.checkpoints_total_limit} must be >= 0 "
                             "(0 keeps every checkpoint)")


@dataclass
class ExportConfig:
    enabled: bool = True  # write a diffusers pipeline into <output_dir>/export at the end of training
    dtype: str = "fp32"
    use_ema: bool = True  # export the generator's EMA weights when it has some

    def __post_init__(self) -> None:
        _check_choice("export", "dtype", self.dtype, ("fp32", "bf16", "fp16"))


@dataclass
class TeacherRow:
    """One extra teacher setting evaluated beside the student (for context, e.g. the teacher at 1 step)."""

    steps: int = 1
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.guidance < 0:
            raise ValueError(f"eval.teacher_baselines entry steps={self.steps}, guidance={self.guidance}: "
                             "need steps >= 1 and guidance >= 0")


@dataclass
class EvalConfig:
    """Evaluation after training: teacher vs exported student, same prompts and seeds.

    Writes metrics.json (FID, alignment, diversity, latency for teacher and student), comparison.png
    and summary.md into the run folder. Toy teachers (toy-sd, toy-flow) only for now: their FID
    feature space and alignment score come with the project (stepdistill/eval/spaces.py, ToySpace).
    """

    enabled: bool = False
    prompts: str = "builtin:toy_all"
    seeds_per_prompt: int = 4
    teacher_steps: int = 50
    teacher_guidance: float = 3.0
    # Student step counts to evaluate; empty = the trained number of steps.
    student_steps: list[int] = field(default_factory=list)
    # Further teacher rows for context, e.g. [{steps: 1, guidance: 1.0}]: the teacher sampled at the
    # student's step count, i.e. what distillation starts from.
    teacher_baselines: list[TeacherRow] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.seeds_per_prompt < 1 or self.teacher_steps < 1:
            raise ValueError("eval.seeds_per_prompt and eval.teacher_steps must be >= 1")
        if self.teacher_guidance < 0:
            raise ValueError(f"eval.teacher_guidance={self.teacher_guidance} must be >= 0")
        if any(s < 1 for s in self.student_steps):
            raise ValueError(f"eval.student_steps={list(self.student_steps)}: every entry must be >= 1")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Per-role overrides of the method's default roles (keys must be roles the method declares).
    roles: dict[str, RoleConfig] = field(default_factory=dict)
    method: Any = None  # the method's own Config dataclass, chosen by method.name
