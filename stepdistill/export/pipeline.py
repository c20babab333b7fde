"""Export: the teacher's pipeline with the student backbone swapped in and a matching scheduler.

The folder is an ordinary diffusers pipeline (``DiffusionPipeline.from_pretrained(folder)``); the
scheduler is configured so that ``pipe(prompt, num_inference_steps=N, guidance_scale=...)`` runs the
trained sampler. ``stepdistill.json`` beside it records the method, steps, timesteps and the call.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path

import torch

from stepdistill.export.hub import usage_snippet, write_model_card
from stepdistill.export.lora_formats import check_format, write_lora_file
from stepdistill.harness.checkpoint import damage, fsync_dir, fsync_tree, latest_checkpoint, load_extra_states
from stepdistill.models.denoiser import unwrap_model
from stepdistill.models.loading import as_dtype
from stepdistill.models.lora import lora_state_dict, merged_copy


def student_backbone(role) -> torch.nn.Module:
    """A plain diffusers model holding the role's weights (LoRA merged in)."""
    module = unwrap_model(role.module)
    if role.is_lora:
        return merged_copy(module, role.adapter)
    return copy.deepcopy(module)


def nonfinite_parameters(module: torch.nn.Module, limit: int = 5) -> tuple[int, list[str]]:
    """``(count, first names)`` of the parameters of ``module`` that hold a NaN or inf."""
    bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
    return len(bad), bad[:limit]


def check_finite(roles: dict) -> None:
    """Refuse to export weights that hold NaN / inf (a diverged run): one error naming the roles."""
    problems = []
    for name, role in roles.items():
        count, names = nonfinite_parameters(unwrap_model(role.module))
        if count:
            problems.append(f"{name} ({count} tensors, e.g. {', '.join(names)})")
    if problems:
        raise ValueError(f"the weights to export hold NaN or inf values: {'; '.join(problems)}. The run diverged; "
                         "export an earlier checkpoint (stepdistill export RUN/checkpoints/checkpoint-N), or pass "
                         "--allow-nonfinite to write them anyway")


def portable_config(config: dict, run_dir: str | Path | None) -> dict:
    """The run's config as the export records it (stepdistill.json, the model card, the Hub): absolute local
    paths become paths relative to the run folder (``run.output_dir`` is "."); names, Hub ids and relative
    paths are kept as written."""
    base = Path(run_dir).resolve() if run_dir is not None else None

    def portable(value):
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items()}
        if isinstance(value, list):
            return [portable(v) for v in value]
        if isinstance(value, str) and value.startswith(("/", "~")):
            path = Path(value).expanduser().resolve()
            return os.path.relpath(path, base) if base is not None else path.name
        return value

    return portable(config)


def check_export_target(out: str | Path) -> Path:
    """``out`` may be new, empty or an earlier export (which the new one replaces whole), nothing else: an
    export never replaces a folder of the user's (``--out ~/models``) or a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file; give a new folder (or an earlier export to replace)")
    if out.is_dir() and any(out.iterdir()) and not (out / "stepdistill.json").is_file():
        raise ValueError(f"--out {str(out)!r} is a folder that holds other files and no stepdistill export; an export "
                         "replaces its folder whole, so give a new folder (or an earlier export to replace)")
    return out


@contextlib.contextmanager
def atomic_folder(out: Path):
    """Yield a fresh folder named like ``out`` inside ``<parent>/.tmp-<name>-<pid>/``; on success it replaces
    ``out`` in one rename (files fsynced first), so ``out`` is the old export or the new one, never half of
    either. On failure the temporary folder is removed and ``out`` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    holder = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(holder, ignore_errors=True)
    tmp = holder / out.name
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            os.replace(out, holder / f"{out.name}.old")
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def export_lora(teacher, role, out: str | Path) -> Path:
    """Save a LoRA student as diffusers LoRA weights (``pipe.load_lora_weights(out)`` on the teacher).

    Written with the pipeline class's own ``save_lora_weights``, with the adapter's LoraConfig as
    metadata so rank and alpha survive the round trip.
    """
    module = unwrap_model(role.module)
    name = role.adapter
    weights = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(module, name).items()}
    metadata = module.peft_config[name].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    prefix = teacher.backbone_name
    type(teacher.pipeline).save_lora_weights(
        str(out), **{f"{prefix}_lora_layers": weights, f"{prefix}_lora_adapter_metadata": metadata},
        safe_serialization=True,
    )
    return Path(out)


def export_pipeline(teacher, method, role, out: str | Path, dtype: str = "fp32", config: dict | None = None,
                    lora_only: bool = False, variant: str | None = None, run_dir: str | Path | None = None,
                    repo_id: str | None = None, license_: str | None = None, allow_nonfinite: bool = False,
                    lora_format: str = "diffusers") -> Path:
    """Write the student to ``out`` with ``stepdistill.json`` and a model card (README.md).

    Default: the whole pipeline (weights in ``dtype``; with ``variant`` = "fp16"/"bf16" they are saved as
    that diffusers variant, ``*.fp16.safetensors``). ``lora_only``: just the LoRA weights of a LoRA
    student (``pipe.load_lora_weights(out)`` on the base pipeline) and the scheduler to sample them with.
    ``run_dir`` supplies the card's metrics and sample grid; ``repo_id`` its usage snippet. Weights with
    NaN / inf are refused unless ``allow_nonfinite``. ``lora_format`` ("kohya" / "comfyui") also writes a
    LoRA student's weights as that tool's file beside the diffusers one (``export.lora_formats``). The
    folder is written whole, then renamed into place.
    """
    out = check_export_target(out)
    check_format(lora_format, teacher.family, role.is_lora)
    if variant is not None:
        if variant not in ("fp16", "bf16"):
            raise ValueError(f"variant={variant!r}: choose fp16 or bf16")
        dtype = variant
    experts = method.export_experts()
    if lora_only:
        if experts:
            raise ValueError(f"--lora: the {method.name} student has one network per step; export the whole "
                             "pipeline with its expert folders (drop --lora)")
        if not role.is_lora:
            raise ValueError(f"--lora: the {method.name} student is full weights, not a LoRA; export the whole "
                             "pipeline (drop --lora) or train with roles.generator.lora_rank > 0")
    if not allow_nonfinite:
        check_finite({"student": role, **(experts["roles"] if experts else {})})
    config = portable_config(config, run_dir) if config is not None else None
    resumes = portable_config({"resumes": read_resumes(run_dir)}, run_dir)["resumes"]
    with atomic_folder(out) as tmp:
        _write_export(tmp, teacher, method, role, experts, dtype, config, lora_only, variant, resumes, lora_format)
        write_model_card(tmp, run_dir, repo_id, license_)
    return out


def _write_export(out: Path, teacher, method, role, experts, dtype, config, lora_only, variant, resumes,
                  lora_format: str = "diffusers") -> None:
    if lora_only:
        export_lora(teacher, role, out)
        scheduler = method.export_scheduler()
        scheduler.save_pretrained(str(out / "scheduler"))
        info = _write_info(out, teacher, method, scheduler, lora=".", config=config, lora_only=True,
                           resumes=resumes, lora_file=_lora_file_name(method, lora_format))
        _write_lora_format(out, role, info, lora_format, scheduler)
        return
    torch_dtype = as_dtype(dtype)
    pipe = student_pipeline(teacher, method, role, torch_dtype)
    pipe.save_pretrained(str(out), safe_serialization=True, variant=variant)

    lora_dir = None
    expert_info = _export_experts(out, teacher, experts, torch_dtype) if experts else None
    if role.is_lora and not experts:
        # LoRA students are also written as LoRA weights for the teacher's own pipeline (LCM-LoRA style).
        lora_dir = export_lora(teacher, role, out / "lora")
    info = _write_info(out, teacher, method, pipe.scheduler,
                       lora="lora" if lora_dir is not None else None, config=config, variant=variant,
                       experts=expert_info, resumes=resumes,
                       lora_file=_lora_file_name(method, lora_format) if lora_dir is not None else None)
    if lora_dir is not None:
        _write_lora_format(lora_dir, role, info, lora_format, pipe.scheduler)


def _lora_file_name(method, lora_format: str) -> str | None:
    """The kohya / ComfyUI file's name (None for diffusers: its file is ``pytorch_lora_weights.safetensors``)."""
    if lora_format == "diffusers":
        return None
    return f"{method.name}_{method.num_inference_steps}step_{lora_format}.safetensors"


def _write_lora_format(folder: Path, role, info: dict, lora_format: str, scheduler) -> None:
    """The kohya / ComfyUI file (``info["lora_file"]``) of a LoRA student, beside its diffusers file."""
    if lora_format == "diffusers":
        return
    module = unwrap_model(role.module)
    config = module.peft_config[role.adapter]
    weights = {k: v.detach().float().cpu() for k, v in lora_state_dict(module, role.adapter).items()}
    base = str(((info.get("config") or {}).get("model") or {}).get("pretrained", "unknown"))
    write_lora_file(folder / info["lora_file"], lora_format, weights, int(config.r), float(config.lora_alpha),
                    {**info, "teacher": base, "scheduler_config": dict(scheduler.config)})


def student_pipeline(teacher, method, role, torch_dtype: torch.dtype):
    """The exported pipeline in memory: the teacher's pipeline class and components, the student's backbone
    (in ``torch_dtype``, as every other network) and the method's export scheduler."""
    student = student_backbone(role).eval()
    if student.dtype != torch_dtype:
        student.to(torch_dtype)
    components = {}
    # A teacher trained from data.embeddings has no text encoders: load them back, or the pipeline has none.
    for key, value in {**teacher.pipeline.components, **teacher.dropped_text_encoders()}.items():
        if key == teacher.backbone_name:
            value = student
        elif isinstance(value, torch.nn.Module) and getattr(value, "dtype", torch_dtype) != torch_dtype:
            value = copy.deepcopy(value).to(torch_dtype)
        components[key] = value
    components["scheduler"] = method.export_scheduler()
    return type(teacher.pipeline)(**components)


def _export_experts(out: Path, teacher, experts: dict, torch_dtype) -> dict:
    """Write experts 1..k-1 of a mixture-of-experts student as backbone folders beside the pipeline (whose
    own backbone is expert 0) and ship ``expert_switch.py``, the callback that runs expert i at step i."""
    import shutil

    from stepdistill.sampling import experts as switch_module

    subfolders = []
    for name, expert_role in experts["roles"].items():
        model = student_backbone(expert_role).eval()
        if model.dtype != torch_dtype:
            model.to(torch_dtype)
        model.save_pretrained(str(out / name), safe_serialization=True)
        subfolders.append(name)
    shutil.copyfile(switch_module.__file__, out / "expert_switch.py")
    return {"backbone": teacher.backbone_name, "subfolders": subfolders,
            "timesteps": [float(t) for t in experts["timesteps"]], "helper": "expert_switch.py"}


def read_resumes(run_dir: str | Path | None) -> list[dict]:
    """The run's resumes (``<run>/resumes.jsonl``: step, checkpoint, changed keys), oldest first."""
    path = Path(run_dir) / "resumes.jsonl" if run_dir is not None else None
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return rows


def _write_info(out: Path, teacher, method, scheduler, lora: str | None, config: dict | None,
                lora_only: bool = False, variant: str | None = None, experts: dict | None = None,
                resumes: list[dict] | None = None, lora_file: str | None = None) -> dict:
    """``stepdistill.json``: how to sample the export (steps, timesteps, guidance), method and config;
    returns what it wrote."""
    steps = method.num_inference_steps
    timesteps = method.export_timesteps()
    # Guidance is distilled into the student: CFG at sampling time would double the cost and
    # over-saturate; diffusers pipelines skip CFG at guidance_scale <= 1. Guidance-embedded FLUX
    # students were called with the embedding at 1.0 during training, so they are sampled with it.
    guidance = 1.0 if teacher.family == "flux" else 0.0
    scale = method.export_guidance_scale()
    if scale is not None:
        # w-input students (LCM, guidance distillation) are sampled at their scale, in one pass each step.
        guidance = scale
    info = {
        "lora": lora,
        "lora_only": lora_only,
        "lora_file": lora_file,  # the kohya / ComfyUI file in the LoRA folder, if one was asked for
        "variant": variant,
        "method": method.name,
        "paper": method.paper,
        "family": teacher.family,
        "num_inference_steps": steps,
        "timesteps": timesteps,
        "guidance_scale": guidance,
        "scheduler": type(scheduler).__name__,
        # A re-noising flow scheduler draws steps 2..N's noise from torch's global RNG in the SD3 / FLUX
        # pipelines (they do not pass `generator` to scheduler.step): the card says how to make images repeatable.
        "global_rng_steps": bool(scheduler.config.get("stochastic_sampling", False)) and steps > 1,
        "experts": experts,
        "config": config,
        "resumes": [{k: r.get(k) for k in ("step", "checkpoint", "changed")} for r in resumes or []],
    }
    base = str(((config or {}).get("model") or {}).get("pretrained", "unknown"))
    # Named by the folder's name (``out`` is still the temporary folder here): no local path is recorded.
    info["usage"] = usage_snippet({**info, "base_model": base}, out.name)
    (out / "stepdistill.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def _checkpoint_and_run(path: Path) -> tuple[Path, Path]:
    """``(checkpoint, run folder)`` of a run folder (its newest complete checkpoint) or a checkpoint folder."""
    if (path / "stepdistill_state.json").is_file() or path.parent.name == "checkpoints":
        problem = damage(path)
        if problem is not None:
            raise ValueError(f"{path} is not a complete checkpoint: {problem}; export the run folder (its newest "
                             "complete checkpoint) or another checkpoint")
        return path, path.parent.parent
    if (path / "config.yaml").is_file():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise ValueError(f"{path} has no complete checkpoints/checkpoint-* folder to export from")
        return checkpoint, path
    raise ValueError(f"{path} is neither a run folder (config.yaml) nor a checkpoint (stepdistill_state.json)")


def _load_module(module: torch.nn.Module, file: Path) -> None:
    """Load one of accelerate's ``model*.safetensors`` into ``module`` (keys of a DDP or compiled wrapper,
    ``module.`` / ``_orig_mod.``, are the module's own)."""
    from safetensors.torch import load_file

    if not file.is_file():
        raise ValueError(f"{file.parent} has no {file.name}: it was not written by a single-file-per-model "
                         "accelerate save (an FSDP sharded checkpoint?); export it from the machine that trained it")
    state = {}
    for key, value in load_file(str(file)).items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        state[key] = value
    module.load_state_dict(state, strict=True)


def load_student(checkpoint: Path, built, use_ema: bool) -> None:
    """Load the exported roles' weights of ``checkpoint`` into a freshly ``harness.build``-t run: their
    backbones and heads (accelerate's model files), LoRAs on the shared teacher backbone, and, with
    ``use_ema``, their export EMA weights in place of the trained ones."""
    from stepdistill.harness.build import export_ema, saved_modules, student_states

    exported = set(built.method.export_roles())
    parallel = built.parallel
    for i, (label, module) in enumerate(saved_modules(built.roles, built.teacher, parallel)):
        if label.split(".")[0] in exported:
            _load_module(module, checkpoint / ("model.safetensors" if i == 0 else f"model_{i}.safetensors"))
    states, emas = {}, []
    for name in built.method.export_roles():
        role = built.roles[name]
        ema = export_ema(role) if use_ema else None
        if ema is not None:
            emas.append((ema, role))
        states.update(student_states(role, built.teacher, ema, parallel))
    load_extra_states(checkpoint, states)
    for ema, role in emas:
        ema.copy_to(role.trainable_parameters())


def export_from_run(path: str | Path, out: str | Path, dtype: str = "fp32", use_ema: bool = True,
                    **export_kwargs) -> Path:
    """Export from a run folder (its newest complete checkpoint) or from one checkpoint folder.

    Builds only the run's networks (teacher, roles, method: no optimizers, data or accelerator) and loads
    the student's weights. ``export_kwargs``: ``lora_only``, ``variant``, ``repo_id``, ``license_``,
    ``allow_nonfinite`` of ``export_pipeline``.
    """
    from omegaconf import OmegaConf

    from stepdistill.harness.build import build, resolve_precision
    from stepdistill.runconfig import load_config

    checkpoint, run_dir = _checkpoint_and_run(Path(path))
    cfg = load_config(str(run_dir / "config.yaml"), ["run.trackers=[none]", "train.resume=null"])
    lora_format = export_kwargs.get("lora_format", "diffusers")
    if lora_format != "diffusers":  # before the teacher is built
        from stepdistill.models import check_pretrained

        generator = cfg.roles.get("generator")
        check_format(lora_format, check_pretrained(str(cfg.model.pretrained), cfg.model.family),
                     generator is None or generator.lora_rank > 0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, weight_dtype = resolve_precision(cfg.train.mixed_precision, cfg.model.weight_dtype)
    built = build(cfg, device, weight_dtype)
    load_student(checkpoint, built, use_ema)
    return export_pipeline(built.teacher, built.method, built.roles[built.method.student_role], out, dtype=dtype,
                           config=OmegaConf.to_container(cfg, resolve=True), run_dir=run_dir, **export_kwargs)
