"""What a run is made of, built from its config: the teacher, the method's roles and the method.

Shared by the trainer (which adds data, optimizers and accelerate) and by exporting a checkpoint
(``export.pipeline.export_from_run``, which only needs the networks). ``saved_modules`` and
``student_states`` name what a checkpoint holds for each role, so both read it the same way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from stepdistill.config.schema import RoleConfig
from stepdistill.harness.checkpoint import EMAState, ExtraState, ModuleState, ParamsState
from stepdistill.methods import DistillMethod, MethodContext, get_method
from stepdistill.models import Teacher, load_teacher
from stepdistill.models.loading import as_dtype
from stepdistill.models.roles import Role, build_roles


def resolve_precision(mixed_precision: str, weight_dtype: str) -> tuple[str, torch.dtype]:
    """``auto`` → bf16 on GPU (fp16 is known to diverge for these methods), no mixed precision on CPU."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    if weight_dtype == "auto":
        weight_dtype = {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision, "fp32")
    return mixed_precision, as_dtype(weight_dtype)


def role_configs(cfg: DictConfig, method_cls, method_cfg) -> dict[str, RoleConfig]:
    """The method's default roles with the config's ``roles:`` section applied."""
    roles = dict(method_cls.default_roles(method_cfg))
    for name, role in (cfg.get("roles") or {}).items():
        if name not in roles:
            raise ValueError(f"roles.{name} is not a role of method {method_cls.name!r}; roles: {', '.join(roles)}")
        roles[name] = OmegaConf.to_object(role) if isinstance(role, DictConfig) else role
    return roles


@dataclass
class Built:
    method_cls: type
    method_cfg: Any
    teacher: Teacher
    roles: dict[str, Role]
    method: DistillMethod
    parallel: str = "ddp"  # train.parallel: the checkpoint layout (``saved_modules``, ``student_states``)


def build(cfg: DictConfig, device: torch.device, weight_dtype: torch.dtype, teacher: Teacher | None = None,
          networks=contextlib.nullcontext, for_training: bool = False) -> Built:
    """Load the teacher, build the roles the method asks for, then the method (in that order: the
    roles' fresh heads draw from torch's global RNG, which the caller seeds).

    ``stepdistill plan`` trains without weights: it gives a ``teacher`` built under FakeTensorMode, and
    ``networks``, the context in which the roles' new networks (copies, heads, LoRA adapters) are made.
    ``for_training``: the trainer's teacher follows ``data.embeddings`` (no text encoders) and
    ``model.offload_text_encoders`` (they stay on the CPU); an export loads them whole.
    """
    method_cls = get_method(cfg.method.name)
    method_cfg = OmegaConf.to_object(cfg.method)
    role_cfgs = role_configs(cfg, method_cls, method_cfg)
    if teacher is None:
        teacher = load_teacher(
            cfg.model.pretrained, family=cfg.model.family, device=device, dtype=weight_dtype,
            revision=cfg.model.revision, variant=cfg.model.variant, resolution=cfg.model.resolution,
            embeddings=cfg.data.embeddings if for_training else None,
            text_encoder_device="cpu" if for_training and cfg.model.offload_text_encoders else None,
        )
    with networks():
        roles = build_roles(teacher, role_cfgs, method_cls.role_heads(method_cfg), device)
    method = method_cls(method_cfg, MethodContext(teacher=teacher, roles=roles, resolution=cfg.model.resolution,
                                                  device=device, has_real_data=bool(cfg.data.images)))
    return Built(method_cls, method_cfg, teacher, roles, method, cfg.train.parallel)


def is_sharded_role(role: Role, teacher: Teacher, parallel: str) -> bool:
    """Under ``train.parallel=fsdp2``: every trainable role with its own backbone (not the teacher's)."""
    return parallel == "fsdp2" and role.trainable and role.module is not teacher.backbone


def saved_modules(roles: dict[str, Role], teacher: Teacher, parallel: str = "ddp") -> list[tuple[str, torch.nn.Module]]:
    """The modules accelerate checkpoints as ``model.safetensors``, ``model_1.safetensors``, ... in the
    order the trainer prepares them: per trainable role its own backbone (not when it lives on the
    teacher's), then its head. Labels are ``<role>`` and ``<role>.head``. FSDP2-sharded roles are not
    accelerate's: ``student_states`` names them."""
    modules = []
    for name, role in roles.items():
        if not role.trainable or is_sharded_role(role, teacher, parallel):
            continue
        if role.module is not teacher.backbone:
            modules.append((name, role.module))
        if role.head is not None:
            modules.append((f"{name}.head", role.head))
    return modules


def lora_state_name(role: str) -> str:
    """The checkpoint's extra-state name of a LoRA trained on the teacher's shared backbone."""
    return f"lora.{role}"


def sharded_state_name(module: str) -> str:
    """The checkpoint's extra-state name of an FSDP2-sharded role's weights (``<role>`` or ``<role>.head``),
    stored whole (or, with ``train.fsdp_checkpoint: sharded``, as each process's shards in ``dcp/``)."""
    return f"fsdp.{module}"


def ema_state_name(role: str) -> str:
    """The checkpoint's extra-state name of a role's export EMA (``RoleConfig.ema_decay``)."""
    return f"ema.{role}"


def export_ema(role: Role):
    """The export EMA of ``role`` (a diffusers ``EMAModel`` over its trainable parameters), or None when
    ``RoleConfig.ema_decay`` is 0 or the role does not train. The trainer updates it; an export from a
    checkpoint loads it: both build it here, so its shadow tensors line up."""
    if not role.trainable or role.cfg.ema_decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(role.trainable_parameters(), decay=role.cfg.ema_decay, foreach=True)


def student_states(role: Role, teacher: Teacher, ema=None, parallel: str = "ddp") -> dict[str, ExtraState]:
    """The extra states of ``role`` that hold its weights outside accelerate's models: a LoRA on the
    shared teacher backbone, an FSDP2-sharded role's backbone and head, and the export EMA ``ema`` (a
    diffusers ``EMAModel``) when given."""
    states: dict[str, ExtraState] = {}
    if is_sharded_role(role, teacher, parallel):
        states[sharded_state_name(role.name)] = ModuleState(role.module)
        if role.head is not None:
            states[sharded_state_name(f"{role.name}.head")] = ModuleState(role.head)
    if role.module is teacher.backbone and role.adapter is not None:
        states[lora_state_name(role.name)] = ParamsState(role.trainable_parameters())
    if ema is not None:
        states[ema_state_name(role.name)] = EMAState(ema)
    return states
