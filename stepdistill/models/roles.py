"""Roles: the named networks of a method (generator, teacher, critic, experts, ...).

Each role starts from the teacher's backbone (or a backbone folder), trains or not, and holds full
weights or a LoRA. A LoRA role may put its adapter on the teacher's own frozen backbone
(``share_teacher_base``) instead of a second copy; calls then switch adapters (``models.lora``).

During a phase, roles the phase does not train are called through their *unwrapped* module: a
DDP wrapper expects every forward in grad mode to be followed by gradients for all its parameters,
which is false for, e.g., the critic when the generator loss back-propagates through it.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.models.denoiser import Denoiser, unwrap_model
from stepdistill.models.guidance import add_guidance_embedding, guidance_embedding_dim
from stepdistill.models.loading import Teacher
from stepdistill.models.lora import add_lora, enable_adapter_aware_checkpointing, lora_parameters, use_adapter


@dataclass
class Role:
    name: str
    cfg: RoleConfig
    module: torch.nn.Module  # the backbone as built (unwrapped)
    denoiser_fn: Any = None  # Teacher.denoiser, to rebuild the denoiser on a wrapped module
    head: torch.nn.Module | None = None
    adapter: str | None = None  # LoRA adapter name when this role lives on a shared base
    wrapped: torch.nn.Module | None = None  # set by the harness after accelerator.prepare
    wrapped_head: torch.nn.Module | None = None
    active: bool = False  # True while the current phase trains this role
    # FSDP2 (train.parallel=fsdp2): the unsharded module / head on the meta device, kept to rebuild them whole
    skeleton: torch.nn.Module | None = None
    head_skeleton: torch.nn.Module | None = None
    _denoisers: dict = field(default_factory=dict)

    @property
    def trainable(self) -> bool:
        return self.cfg.trainable

    @property
    def is_lora(self) -> bool:
        return self.cfg.lora_rank > 0

    def _current_module(self) -> torch.nn.Module:
        return self.wrapped if (self.active and self.wrapped is not None) else self.module

    @property
    def denoiser(self) -> Denoiser:
        module = self._current_module()
        key = id(module)
        if key not in self._denoisers:
            self._denoisers[key] = _AdapterDenoiser(self.denoiser_fn(module), module, self.adapter)
        return self._denoisers[key]

    @property
    def gan_head(self) -> torch.nn.Module | None:
        if self.head is None:
            return None
        return self.wrapped_head if (self.active and self.wrapped_head is not None) else self.head

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if not self.trainable:
            return []
        if self.cfg.heads_only:
            return list(self.head.parameters()) if self.head is not None else []
        if self.is_lora:
            params = lora_parameters(self.module, self.adapter or self.name)
        else:
            params = [p for p in self.module.parameters()]
        if self.head is not None:
            params += list(self.head.parameters())
        return params

    def set_requires_grad(self, flag: bool) -> None:
        for p in self.trainable_parameters():
            p.requires_grad_(flag)


class _AdapterDenoiser:
    """A Denoiser whose calls run with this role's adapter active on a shared base."""

    def __init__(self, denoiser: Denoiser, module: torch.nn.Module, adapter: str | None):
        self._denoiser, self._module, self._adapter = denoiser, module, adapter

    def _context(self):
        return use_adapter(unwrap_model(self._module), self._adapter) if _has_lora(self._module) else contextlib.nullcontext()

    def __call__(self, *args, **kwargs):
        with self._context():
            return self._denoiser(*args, **kwargs)

    def features(self, *args, **kwargs):
        with self._context():
            return self._denoiser.features(*args, **kwargs)

    def __getattr__(self, item):
        return getattr(self._denoiser, item)


def _has_lora(module: torch.nn.Module) -> bool:
    return bool(getattr(unwrap_model(module), "peft_config", None))


def _load_backbone(teacher: Teacher, path: str) -> torch.nn.Module:
    folder = Path(path)
    cls = type(teacher.backbone)
    if (folder / teacher.backbone_name).is_dir():
        folder = folder / teacher.backbone_name
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"init_from={path!r} is not a {cls.__name__} folder (no config.json there or in "
            f"{teacher.backbone_name}/); use 'teacher' or a folder written by save_pretrained"
        )
    return cls.from_pretrained(folder)


def _build_head(factory, module: torch.nn.Module, teacher: Teacher) -> torch.nn.Module:
    """A role's head: the method's ``factory(denoiser)`` (``DistillMethod.role_heads``) on the role's backbone."""
    if not callable(factory):
        raise ValueError(f"role head {factory!r} is not callable: DistillMethod.role_heads maps a role to a "
                         "factory denoiser -> nn.Module")
    return factory(teacher.denoiser(module))


def build_roles(
    teacher: Teacher, role_cfgs: dict[str, RoleConfig], heads: dict, device: torch.device
) -> dict[str, Role]:
    """Build every role the method asked for. The teacher role is the teacher's frozen backbone.

    ``heads`` maps role names to the head they carry (``DistillMethod.role_heads``). A ``heads_only``
    role is its head alone on the teacher's own frozen backbone (LADD's discriminator).
    """
    roles: dict[str, Role] = {}
    for name, cfg in role_cfgs.items():
        if name == "teacher":
            if cfg.trainable:
                raise ValueError("roles.teacher.trainable=true: the teacher is the frozen reference; train a copy")
            roles[name] = Role(name, cfg, teacher.backbone, denoiser_fn=teacher.denoiser, adapter=None)
            continue
        if cfg.heads_only:
            if name not in heads:
                raise ValueError(f"roles.{name}.heads_only=true, but the method gives role {name!r} no head")
            head = _build_head(heads[name], teacher.backbone, teacher).to(device)
            roles[name] = Role(name, cfg, teacher.backbone, denoiser_fn=teacher.denoiser, head=head, adapter=None)
            continue
        adapter = None
        if cfg.lora_rank > 0 and cfg.share_teacher_base:
            if cfg.init_from != "teacher":
                raise ValueError(f"roles.{name}.share_teacher_base=true needs init_from=teacher")
            module = teacher.backbone
            adapter = name
            add_lora(module, name, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        else:
            if cfg.init_from == "teacher":
                module = copy.deepcopy(teacher.backbone)
            else:
                module = _load_backbone(teacher, cfg.init_from)
            module.to(device)
            if cfg.guidance_embedding_dim > 0 and guidance_embedding_dim(module) is None:
                add_guidance_embedding(module, cfg.guidance_embedding_dim)  # (an LCM teacher already has one)
            if cfg.lora_rank > 0:
                module.requires_grad_(False)
                adapter = name
                add_lora(module, name, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
            elif cfg.trainable and module.dtype != torch.float32:
                module.to(torch.float32)  # full-weight roles keep float32 master weights
        module.requires_grad_(False)
        head = None
        if name in heads:
            head = _build_head(heads[name], module, teacher).to(device)
        role = Role(name, cfg, module, denoiser_fn=teacher.denoiser, head=head, adapter=adapter)
        if cfg.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
            enable_adapter_aware_checkpointing(module)
        if cfg.trainable:
            module.train()
        roles[name] = role
    # Only now: peft's add_adapter re-freezes the adapters already on a shared base.
    for role in roles.values():
        if role.trainable:
            role.set_requires_grad(True)
    return roles
