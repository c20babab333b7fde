"""Checks a run passes before any model loads: the folder is its own, writable and big enough, and a
resumed run is the run its checkpoint recorded.

``preflight(cfg)`` is called by ``train.py`` before the ``Trainer`` is built (so a mistake costs seconds,
not the minutes of loading a teacher) and again by ``Trainer.train`` for API users. It reads files
only; what it must change (moving an old run aside for ``run.overwrite=true``) is done by the trainer's
main process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stepdistill.config.load import validate_out_dir
from stepdistill.config.schema import Config
from stepdistill.data.images import read_metadata, scan_images
from stepdistill.data.prompts import BUILTIN_PROMPTS, load_prompts
from stepdistill.data.sources import check_enough_samples, check_first_sample, open_source
from stepdistill.harness.checkpoint import (
    latest_checkpoint,
    mount_point,
    read_state,
    resolve_resume,
    scan_checkpoints,
)
from stepdistill.methods import get_method
from stepdistill.models.loading import check_pretrained, check_resolution, resolve_pretrained

# Config keys a resumed run may not change: they define what the checkpoint's tensors are (or, for the
# seed, batch size and accumulation, which data and noise each step sees). Everything else may change
# on resume and is applied for real (learning rates and schedules, max_steps, cadences, logging, export).
_FIXED_SECTIONS = ("method.", "model.")
# train.parallel: an fsdp2 checkpoint holds sharded roles whole beside accelerate's files, a ddp one in them;
# train.fsdp_checkpoint: whole in extra_state.safetensors (gathered) or as each process's shards in dcp/ (sharded).
_FIXED_KEYS = {"run.seed", "data.batch_size", "train.gradient_accumulation_steps", "train.mixed_precision",
               "train.parallel", "train.fsdp_checkpoint"}
_FIXED_ROLE_FIELDS = {"init_from", "trainable", "lora_rank", "lora_alpha", "lora_target_modules",
                      "share_teacher_base", "heads_only", "guidance_embedding_dim", "ema_decay"}
# Fixed keys added after checkpoints were written without them: such a checkpoint has the default.
_ADDED_DEFAULTS = {"train.fsdp_checkpoint": "gathered"}
# Keys of a fixed section that say where a tensor lives, not what it is: free on resume.
_FREE_KEYS = {"model.offload_text_encoders"}
# Where the run is and how this launch was told to start: never a change of the run.
_IGNORED = {"run.output_dir", "train.resume", "run.overwrite"}

logger = logging.getLogger("stepdistill")


def validate_paths(cfg: DictConfig | Config, *, method_checks: bool = True) -> Any:
    """Check that the files and folders the config names exist; returns ``check_pretrained``'s result.

    Checked: ``data.prompts`` (a file, or ``builtin:<name>``), ``data.images`` (if set: an image folder
    scanned whole, or a streamed source's metadata, columns, tar captions and first sample),
    ``roles.*.init_from`` (``teacher`` or a folder), ``method.regression_pairs`` (if the method has it
    and it is set) and ``model.pretrained`` (via ``models.loading.check_pretrained``: tiny:<family>,
    a local diffusers folder or a Hub id in the local cache; reads model_index.json, no weights).
    """
    prompts = str(cfg.data.prompts)
    if prompts.startswith("builtin:"):
        builtin = prompts.split(":", 1)[1]
        if builtin not in BUILTIN_PROMPTS:
            raise ValueError(f"data.prompts={prompts!r}: unknown builtin prompt set; choose one of: "
                             f"{', '.join('builtin:' + k for k in BUILTIN_PROMPTS)}")
    else:
        p = Path(prompts).expanduser()
        if not p.is_file():
            raise ValueError(f"data.prompts={prompts!r}: file not found"
                             f"{' (it is a directory)' if p.is_dir() else ''} (working directory: {Path.cwd()}); "
                             f"give a .txt/.csv/.tsv/.json/.jsonl/.parquet file or builtin:tiny")
        load_prompts(prompts, cfg.data.caption_column)  # an unreadable file fails now, not after the model loads
    if cfg.data.images and str(cfg.data.images) != "builtin:toy":
        # A wrong path, a missing column, an empty shard set or a tar sample without a caption fails here.
        source = open_source(str(cfg.data.images), str(cfg.data.get("image_column", "image")),
                             str(cfg.data.caption_column))
        if source is None:  # an image folder (metadata.jsonl) or a cache-pairs folder
            images = Path(str(cfg.data.images)).expanduser()
            if not (images / "pairs.safetensors").is_file():
                files, _ = read_metadata(images)
                scan_images(files, images, bool(cfg.data.get("skip_unreadable", False)))
        else:
            check_first_sample(source)
            consumers = max(1, int(cfg.data.get("num_workers", 0))) * int(os.environ.get("WORLD_SIZE", "1") or 1)
            check_enough_samples(source.num_samples, consumers, f"data.images={str(cfg.data.images)!r}")
    for role_name, role in (cfg.roles or {}).items():
        init_from = str(role.init_from)
        if init_from != "teacher" and not Path(init_from).expanduser().exists():
            raise ValueError(f"roles.{role_name}.init_from={init_from!r}: not found; use 'teacher' or the path "
                             f"of a diffusers backbone folder")
    pairs = getattr(cfg.method, "regression_pairs", None) if cfg.method is not None else None
    if pairs and not Path(str(pairs)).expanduser().exists():
        raise ValueError(f"method.regression_pairs={str(pairs)!r}: not found; create it with "
                         f"`stepdistill cache-pairs --config <config> --out {pairs} --num N`")

    # What the method itself needs of the rest of the config (e.g. a GAN term needs data.images).
    if cfg.eval.enabled:
        if not str(cfg.model.pretrained).startswith("toy-"):
            raise ValueError(f"eval.enabled=true evaluates toy teachers only so far (model.pretrained=toy-sd or "
                             f"toy-flow), not {cfg.model.pretrained!r}; set eval.enabled=false")
        if not cfg.export.enabled:
            raise ValueError("eval.enabled=true evaluates the exported student: set export.enabled=true")
    if method_checks:
        get_method(str(cfg.method.name)).check_config(cfg)
        if cfg.train.get("fsdp_shard_teacher", False):
            check_teacher_sharding(cfg)

    family = check_pretrained(cfg.model.pretrained, cfg.model.family)
    warning = check_resolution(str(cfg.model.pretrained), int(cfg.model.resolution), cfg.model.revision)
    if warning:
        logger.warning(warning)
    if getattr(cfg.data, "embeddings", None):
        check_embeddings(cfg, family)
    return family


def check_teacher_sharding(cfg) -> None:
    """``train.fsdp_shard_teacher`` shards the teacher's backbone: no role may live on it."""
    from stepdistill.harness.build import role_configs

    if cfg.train.parallel != "fsdp2":
        raise ValueError("train.fsdp_shard_teacher=true shards the teacher with FSDP2: set train.parallel=fsdp2")
    method_cls = get_method(str(cfg.method.name))
    method_cfg = OmegaConf.to_object(cfg.method) if isinstance(cfg.method, DictConfig) else cfg.method
    on_base = [name for name, role in role_configs(cfg, method_cls, method_cfg).items()
               if name != "teacher" and (role.share_teacher_base or role.heads_only)]
    if on_base:
        raise ValueError(f"train.fsdp_shard_teacher=true, but roles {', '.join(on_base)} live on the teacher's "
                         "backbone (share_teacher_base / heads_only): keep the teacher whole "
                         "(train.fsdp_shard_teacher=false) or give them their own copy (share_teacher_base=false)")


def check_embeddings(cfg: DictConfig | Config, family: str) -> None:
    """``data.embeddings``: a cache made for this teacher, family and resolution that holds every prompt and
    negative prompt the run encodes (``data.embeddings.run_prompts``). Reads index.json only."""
    from stepdistill.data.embeddings import EmbeddingCache, run_prompts

    cache = EmbeddingCache(str(cfg.data.embeddings))
    cache.check(teacher=str(cfg.model.pretrained), family=family, resolution=int(cfg.model.resolution),
                max_sequence_length=None)
    prompts, negatives = run_prompts(cfg)
    missing_prompts, missing_negatives = cache.missing(prompts, negatives)
    if missing_prompts:
        raise cache.missing_error("prompts", missing_prompts)
    if missing_negatives:
        raise cache.missing_error("negatives", missing_negatives)

@dataclass
class Plan:
    """What preflight found: where a resumed run starts and what its config changes."""

    checkpoint: Path | None = None
    changes: dict[str, dict] = field(default_factory=dict)  # key -> {"from": old, "to": new}
    used_by_another_run: bool = False  # a fresh run with run.overwrite=true: the old contents move aside


def flat(tree, prefix: str = "") -> dict:
    """``{"train": {"max_steps": 4}}`` -> ``{"train.max_steps": 4}`` (lists kept whole)."""
    out = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _fixed(key: str) -> bool:
    if key in _FREE_KEYS:
        return False
    if key in _FIXED_KEYS or key.startswith(_FIXED_SECTIONS):
        return True
    parts = key.split(".")
    return parts[0] == "roles" and (len(parts) == 2 or parts[-1] in _FIXED_ROLE_FIELDS)


def config_changes(recorded: dict, current: dict) -> tuple[dict, dict]:
    """``(fixed, free)`` differences between a checkpoint's recorded config and this launch's."""
    old, new = {**_ADDED_DEFAULTS, **flat(recorded)}, {**_ADDED_DEFAULTS, **flat(current)}
    fixed, free = {}, {}
    old_roles, new_roles = set(recorded.get("roles") or {}), set(current.get("roles") or {})
    for role in sorted(old_roles ^ new_roles):  # a role added or removed: one entry, not one per field
        fixed[f"roles.{role}"] = {"from": "a role" if role in old_roles else "<unset>",
                                  "to": "a role" if role in new_roles else "<unset>"}
    for key in sorted(set(old) | set(new)):
        if key in _IGNORED or old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        if key.startswith("roles.") and key.split(".")[1] in old_roles ^ new_roles:
            continue
        change = {"from": old.get(key, "<unset>"), "to": new.get(key, "<unset>")}
        (fixed if _fixed(key) else free)[key] = change
    return fixed, free


def _resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


# ---- the folder ----------------------------------------------------------------------------------
def holds_a_run(run_dir: Path) -> list[str]:
    """What in ``run_dir`` belongs to an earlier run (checkpoints, an export, a finished marker)."""
    found = []
    scan = scan_checkpoints(run_dir)
    if scan.complete:
        found.append(f"{len(scan.complete)} checkpoint(s)")
    if scan.damaged:
        found.append(f"{len(scan.damaged)} damaged checkpoint(s)")
    for name in ("DONE.json", "export"):
        if (run_dir / name).exists():
            found.append(name)
    return found


def move_aside(run_dir: Path) -> Path:
    """``run.overwrite=true``: the old contents go to ``<run_dir>.previous-<time>`` (never deleted)."""
    target = run_dir.with_name(f"{run_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(run_dir, target)
    run_dir.mkdir(parents=True)
    return target


# ---- disk room -----------------------------------------------------------------------------------
def _safetensors_params(path: Path) -> int:
    """Number of parameters in a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
    return total


def backbone_params(pretrained: str) -> int | None:
    """Parameters of the teacher's UNet / transformer from its weight headers, or None if not local."""
    try:
        folder = Path(resolve_pretrained(pretrained))
    except ValueError:
        return None
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(pretrained, local_files_only=True,
                                            allow_patterns=["unet/*.json", "transformer/*.json"]))
        except Exception:  # noqa: BLE001 - not in the local cache: no estimate
            return None
    for sub in ("unet", "transformer"):
        files = sorted((folder / sub).glob("*.safetensors"))
        if files:
            return sum(_safetensors_params(f) for f in files)
    return None


def checkpoint_bytes(cfg: DictConfig, params: int) -> int:
    """Bytes one checkpoint takes: fp32 weights + AdamW's two moments per trainable full-weight role, an
    EMA copy where kept, frozen full copies (EMA targets) once; LoRA and head-only roles ~1 % of that."""
    total = 0
    for name, role in cfg.roles.items():
        if name == "teacher":
            continue
        if role.trainable:
            per = 12 + (4 if role.ema_decay > 0 else 0)
            share = 0.01 if (role.lora_rank or role.heads_only) else 1.0
            total += int(params * per * share)
        elif not role.lora_rank and not role.heads_only:
            total += params * 4
    return total


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_room(cfg: DictConfig, run_dir: Path) -> None:
    params = backbone_params(str(cfg.model.pretrained))
    if params is None:
        return
    need = 2 * checkpoint_bytes(cfg, params)
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need > free:
        raise ValueError(f"not enough disk space for two checkpoints in run.output_dir={str(run_dir)!r}: they need "
                         f"about {_gb(need)}, {mount_point(existing)} has {_gb(free)} free; free space or choose "
                         "another run.output_dir")


# ---- the whole check -----------------------------------------------------------------------------
def preflight(cfg: DictConfig) -> Plan:
    """Check the run folder and a resume against the recorded run; returns the plan. Raises ValueError."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ValueError("this launch uses accelerate's FSDP plugin (an accelerate config with distributed_type: "
                         "FSDP); stepdistill shards the roles itself with FSDP2: launch with --multi_gpu (or "
                         "--config_file launch/multi_gpu_ddp.yaml) and set train.parallel=fsdp2")
    run_dir = Path(cfg.run.output_dir)
    validate_out_dir(run_dir, "run.output_dir")  # not a file, not below one, writable
    plan = Plan()
    resume = cfg.train.resume
    if not resume:
        used = holds_a_run(run_dir)
        if used and not cfg.run.overwrite:
            raise ValueError(
                f"run.output_dir={str(run_dir)!r} already holds another run ({', '.join(used)}); a fresh run there "
                "would mix its metrics with the old ones and have keep-last-K delete its new checkpoints. "
                "Continue that run with train.resume=latest, start this one in a new run.output_dir (or run.name), "
                "or pass run.overwrite=true to move the old contents aside (nothing is deleted)")
        plan.used_by_another_run = bool(used)
    else:
        plan.checkpoint = resolve_resume(run_dir, resume)
        if plan.checkpoint is None and holds_a_run(run_dir):
            raise ValueError(f"train.resume=latest: {run_dir} holds no complete checkpoint to resume (see the "
                             "warnings above); pass train.resume=<checkpoint folder>, start fresh in a new "
                             "run.output_dir, or pass train.resume=null run.overwrite=true to move this one aside")
        if plan.checkpoint is not None:
            recorded = read_state(plan.checkpoint).get("config")
            if recorded is not None:
                fixed, plan.changes = config_changes(recorded, _resolved(cfg))
                if fixed:
                    if "method.name" in fixed:  # another method: its settings differ wholesale
                        fixed = {"method.name": fixed["method.name"],
                                 **{k: v for k, v in fixed.items() if not k.startswith("method.")}}
                    shown = [f"{k}: {v['from']!r} -> {v['to']!r}" for k, v in fixed.items()]
                    lines = "; ".join(shown[:8]) + (f"; and {len(shown) - 8} more" if len(shown) > 8 else "")
                    layout = ("" if "train.fsdp_checkpoint" not in fixed else
                              f" (train.fsdp_checkpoint is how the checkpoint holds the sharded roles' states: "
                              f"resume with train.fsdp_checkpoint={fixed['train.fsdp_checkpoint']['from']}; "
                              "`stepdistill export` reads either layout)")
                    raise ValueError(
                        f"train.resume: {plan.checkpoint} was trained with another setting of keys a resumed run "
                        f"cannot change: {lines}{layout}. Resume with the recorded values (they are in "
                        f"{run_dir / 'config.yaml'}), or start a new run in another run.output_dir")
    check_room(cfg, run_dir)
    return plan


def record_resume(run_dir: Path, plan: Plan, step: int) -> None:
    """Append this resume and what it changed to ``<run>/resumes.jsonl`` (read by the model card)."""
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": plan.checkpoint.name, "step": step,
           "changed": plan.changes}
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


__all__ = ["Plan", "check_room", "config_changes", "holds_a_run", "latest_checkpoint", "move_aside", "preflight",
           "record_resume"]
