"""The one training loop every method plugs into.

The harness owns devices, wrapping (DDP via accelerate), precision, optimizers, LR schedulers,
gradient accumulation and clipping, EMA, checkpoints, logging and sample grids. What follows training
(export, evaluation, the model card) is ``stepdistill.lifecycle``'s.
A method only declares roles and phases and returns losses (``methods.base.DistillMethod``).

One *step* runs every phase of ``method.phases(step)``; each phase is one optimizer update of the
roles it trains, over ``gradient_accumulation_steps`` micro-batches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from stepdistill.harness.build import (
    build,
    export_ema,
    is_sharded_role,
    resolve_precision,
    saved_modules,
    student_states,
)
from stepdistill.harness.checkpoint import (
    ExtraState,
    ModuleState,
    OptimizerState,
    clean_stale_temps,
    first_error,
    latest_checkpoint,
    list_checkpoints,
    load_extra_states,
    read_state,
    save_checkpoint,
)
from stepdistill.harness.guard import NonFiniteError, NonFiniteGuard
from stepdistill.harness.logging import MetricsWriter, image_grid
from stepdistill.harness.parallel import all_reduce_mean_, full_tensor, shard
from stepdistill.harness.preflight import Plan, move_aside, preflight, record_resume
from stepdistill.harness.signals import GracefulStop
from stepdistill.models import Teacher

logger = logging.getLogger("stepdistill")



def cpu_threads(requested: int, num_processes: int) -> int:
    """Torch threads for one CPU process: ``requested``, or (0) the cores available to this process shared
    among the processes on this machine (``LOCAL_WORLD_SIZE`` when a launcher sets it)."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes) or 1)
    return max(1, cores // max(local, 1))


def _flat_config(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"max_steps": 4}}`` → ``{"train.max_steps": 4}``; lists and None become strings
    (TensorBoard's hparams accept only scalars)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_config(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """In-place all-reduce of a small tensor over every process (``op``: min, max or sum)."""
    ops = {"min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX,
           "sum": torch.distributed.ReduceOp.SUM}
    torch.distributed.all_reduce(tensor, op=ops[op])
    return tensor


def _unsharded(module: torch.nn.Module, skeleton: torch.nn.Module, keep: bool,
               device: torch.device) -> torch.nn.Module | None:
    """A whole copy of an FSDP2-sharded ``module`` built from its meta ``skeleton`` (on the process
    that ``keep``s it; every process takes part in the gathering)."""
    state = {k: full_tensor(v.detach()) for k, v in module.state_dict().items()}
    if not keep:
        return None
    whole = copy.deepcopy(skeleton).to_empty(device=device)
    whole.load_state_dict(state)
    for name, buffer in module.named_buffers():  # buffers are not sharded (non-persistent ones too)
        whole.get_buffer(name).copy_(buffer)
    return whole.requires_grad_(False)


class Trainer:
    def __init__(self, cfg: DictConfig, teacher: Teacher | None = None, networks=contextlib.nullcontext):
        """``teacher`` (a ready teacher instead of ``model.pretrained``) and ``networks`` (the context the
        roles' networks are built in): the planner's, which trains without weights (``harness.build``)."""
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        self.stopped_by: str | None = None  # the signal that stopped train(), if one did
        mixed_precision, self.weight_dtype = resolve_precision(cfg.train.mixed_precision, cfg.model.weight_dtype)
        trackers = [t for t in cfg.run.trackers if t != "none"]
        if "wandb" in trackers:
            os.environ.setdefault("WANDB_MODE", cfg.run.wandb_mode)
            os.environ.setdefault("WANDB_DIR", str(self.run_dir))
        self.accelerator = Accelerator(
            # On a CPU-only machine, `accelerate launch --multi_gpu` must still give gloo DDP: accelerate
            # only sets up a CPU process group when told it runs on CPU.
            cpu=not torch.cuda.is_available(),
            mixed_precision=mixed_precision,
            # One LR-schedule step per optimizer step, whatever the process count: train.max_steps and
            # lr_warmup_steps count iterations. (accelerate's default steps a prepared scheduler
            # num_processes times per call, which on 8 GPUs would end a 500-step warmup after 63.)
            step_scheduler_with_optimizer=False,
            log_with=trackers or None,
            project_dir=str(self.run_dir),
        )
        self.device = self.accelerator.device
        # FSDP2 shards over the processes; one process has nothing to shard over (the checkpoint still has
        # the fsdp2 layout, so the run resumes on N processes).
        self.fsdp = cfg.train.parallel == "fsdp2" and self.accelerator.num_processes > 1
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg.train.cpu_threads, self.accelerator.num_processes))
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
            if cfg.train.allow_tf32:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True

        from stepdistill.data.prompts import InfinitePromptLoader, load_prompts

        prompts = load_prompts(cfg.data.prompts, cfg.data.caption_column)
        self.prompts = InfinitePromptLoader(
            prompts, cfg.data.batch_size, seed=cfg.run.seed,
            rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
        )
        self.sample_prompts = list(cfg.train.sample_prompts) or prompts[:4]

        set_seed(cfg.run.seed)  # identical initialisation on every rank
        built = build(cfg, self.device, self.weight_dtype, teacher, networks, for_training=True)
        self.method_cls, self.method_cfg, self.method = built.method_cls, built.method_cfg, built.method
        self.teacher, self.roles = built.teacher, built.roles
        if self.accelerator.num_processes > 1:
            self.method.ctx.agree = self._agree
        self.real_data = None
        if cfg.data.images:
            from stepdistill.data.images import RealLatents

            self.real_data = RealLatents(cfg.data.images, self.teacher, cfg.model.resolution, cfg.data.batch_size,
                                         seed=cfg.run.seed, rank=self.accelerator.process_index,
                                         world_size=self.accelerator.num_processes,
                                         skip_unreadable=cfg.data.skip_unreadable,
                                         image_column=cfg.data.image_column, caption_column=cfg.data.caption_column,
                                         num_workers=cfg.data.num_workers)
        self._batch_cache: tuple[int, dict] | None = None
        self._prepare_optimizers()
        self._prepare_ema_targets()
        if self.fsdp and cfg.train.fsdp_shard_teacher:  # frozen: only 1/N of its weights on each process
            self._shard_module(self.teacher.backbone)
        acc = self.accelerator
        self.guard = NonFiniteGuard(
            cfg.train.on_nonfinite, cfg.train.max_nonfinite_skips, self.device,
            device_side=self.all_fused,  # fused optimizers take the verdict on the device
            reduce=_all_reduce if acc.num_processes > 1 else None,
            last_checkpoint=lambda: latest_checkpoint(self.run_dir, warn=False),
        )
        set_seed(cfg.run.seed, device_specific=True)  # different noise on every rank from here on

    def _agree(self, value: int) -> int:
        """The first process's ``value`` on every process (``MethodContext.agree``)."""
        t = torch.tensor([value], device=self.device)
        torch.distributed.broadcast(t, src=0)
        return int(t.item())

    # ---- setup --------------------------------------------------------------------------------
    def _prepare_optimizers(self) -> None:
        from diffusers.optimization import get_scheduler

        self.optimizers, self.schedulers, self.emas = {}, {}, {}
        self.all_fused = True
        # Training state outside accelerate's models / optimizers, checkpointed as safetensors by name.
        self.extra_states: dict[str, ExtraState] = {}
        acc = self.accelerator
        prepared: list[torch.nn.Module] = []  # the models accelerate checkpoints, in order
        for name, role in self.roles.items():
            if not role.trainable:
                continue
            shared = role.module is self.teacher.backbone
            sharded = is_sharded_role(role, self.teacher, self.cfg.train.parallel)
            if sharded:  # before the optimizer: it holds the sharded (DTensor) parameters
                self._shard(role)
            params = role.trainable_parameters()
            if not params:
                raise ValueError(f"role {name!r} is trainable but has no parameters to train")
            rc = role.cfg
            # One kernel per step instead of a loop over tensors; fused AdamW also takes the guard's found_inf.
            fused = self.fused_optimizer(params)
            self.all_fused = self.all_fused and fused
            opt = torch.optim.AdamW(params, lr=rc.lr, betas=tuple(rc.betas), weight_decay=rc.weight_decay,
                                    eps=rc.adam_eps, fused=fused or None)
            sched = get_scheduler(rc.lr_scheduler, opt, num_warmup_steps=rc.lr_warmup_steps,
                                  num_training_steps=self._updates(name))
            if sharded:
                # fully_shard hooks the module itself: no wrapper; weights, optimizer and schedule are
                # extra states outside accelerate: gathered whole, or each process's shards (train.fsdp_checkpoint).
                role.wrapped, role.wrapped_head = role.module, role.head
                self.extra_states[f"optimizer.{name}"] = OptimizerState(opt, sched)
            elif shared:
                # The base belongs to the teacher: no DDP wrapper; LoRA gradients are averaged by hand,
                # heads (a heads-only role's whole trainable part) are DDP-wrapped on their own.
                opt, sched = acc.prepare(opt, sched)
                if role.head is not None:
                    role.wrapped_head = acc.prepare(role.head)
                    prepared.append(role.head)
            elif role.head is not None:
                role.wrapped, role.wrapped_head, opt, sched = acc.prepare(role.module, role.head, opt, sched)
                prepared += [role.module, role.head]
            else:
                role.wrapped, opt, sched = acc.prepare(role.module, opt, sched)
                prepared.append(role.module)
            self.optimizers[name], self.schedulers[name] = opt, sched
            ema = export_ema(role)
            if ema is not None:
                ema.to(self.device)
                self.emas[name] = ema
            self.extra_states.update(student_states(role, self.teacher, ema, self.cfg.train.parallel))
        # export_from_run reads the checkpoint by this layout: keep the two in step.
        assert [id(m) for m in prepared] == [id(m) for _, m in saved_modules(self.roles, self.teacher,
                                                                            self.cfg.train.parallel)]

    def fused_optimizer(self, params: list[torch.nn.Parameter]) -> bool:
        """Fused AdamW (one kernel per step, takes the guard's found_inf) where every parameter is on a GPU."""
        return all(p.is_cuda for p in params)

    def _updates(self, name: str) -> int:
        """How many optimizer updates role ``name`` gets in ``train.max_steps`` iterations: the length of its
        LR schedule (under TTUR the generator updates only every k-th iteration, so a decaying schedule
        over max_steps would stop at 1/k of its course)."""
        method = self.method
        return max(1, sum(1 for step in range(self.cfg.train.max_steps)
                          if any(name in method.phase_roles(phase) for phase in method.phases(step))))

    def _shard(self, role) -> None:
        """FSDP2: shard a role's backbone (and head) over the processes, keeping an unsharded skeleton on
        the meta device (no memory) into which ``gathered_role`` loads whole weights for an export."""
        if not self.fsdp:
            return
        role.skeleton = copy.deepcopy(role.module).to("meta")
        role.head_skeleton = copy.deepcopy(role.head).to("meta") if role.head is not None else None
        for module in (role.module, role.head):
            if module is not None:
                self._shard_module(module)

    def _shard_module(self, module: torch.nn.Module) -> None:
        tc = self.cfg.train
        shard(module, self.accelerator.mixed_precision, tc.fsdp_reshard_after_forward, tc.fsdp_cpu_offload)

    def _prepare_ema_targets(self) -> None:
        """Check the method's EMA target roles (``DistillMethod.ema_targets``) and checkpoint them."""
        self.ema_targets: dict[str, tuple[str, float, list, list]] = {}
        for target, (source, decay) in self.method.ema_targets().items():
            if target not in self.roles or source not in self.roles:
                raise ValueError(f"{self.method_cls.__name__}.ema_targets: {target!r} <- {source!r} names a role "
                                 f"that does not exist; roles: {', '.join(self.roles)}")
            tgt, src = self.roles[target], self.roles[source]
            if tgt.trainable or tgt.is_lora or target == "teacher":
                raise ValueError(f"roles.{target} is the EMA target of {source}: it must be a frozen full-weight "
                                 "copy (trainable=false, lora_rank=0)")
            if not src.trainable or src.is_lora:
                raise ValueError(f"roles.{source} is the EMA source of {target}: it must be a trainable full-weight "
                                 "role (an EMA target of a LoRA role is not supported)")
            if not 0.0 <= decay < 1.0:
                raise ValueError(f"EMA decay {decay} of target role {target!r} must be in [0, 1)")
            tgt.module.to(torch.float32)  # the average accumulates small updates: float32 like the source
            if self.fsdp:  # sharded like its source: averaged shard by shard
                self._shard_module(tgt.module)
            tp, sp = list(tgt.module.parameters()), list(src.module.parameters())
            if [p.shape for p in tp] != [p.shape for p in sp]:
                raise ValueError(f"roles.{target} and roles.{source} have different architectures")
            with torch.no_grad():  # theta^- starts as theta (a resumed run then loads its checkpointed target)
                for q, p in zip(tp, sp):
                    q.copy_(p.detach())
            self.extra_states[f"ema_target.{target}"] = ModuleState(tgt.module)
            self.ema_targets[target] = (source, float(decay), tp, sp)

    @torch.no_grad()
    def update_ema_targets(self, source: str) -> None:
        """``target <- decay * target + (1 - decay) * source`` for every target of ``source``."""
        for _, (src, decay, tp, sp) in self.ema_targets.items():
            if src == source:
                torch._foreach_lerp_(tp, [p.detach().to(q.dtype) for p, q in zip(sp, tp)], 1.0 - decay)

    # ---- one step -----------------------------------------------------------------------------
    def make_batch(self, index: int) -> dict:
        """The batch of micro-batch ``index`` (prompts, their encodings, real data); the phases of one
        step share it, so the text encoders run once per micro-batch."""
        if self._batch_cache is not None and self._batch_cache[0] == index:
            return self._batch_cache[1]
        prompts = self.prompts.batch_for_step(index)
        with torch.no_grad():
            cond = self.teacher.encode_prompt(prompts)
            uncond = self.teacher.encode_negative(len(prompts), self.cfg.data.negative_prompt)
        batch = {"prompts": prompts, "cond": cond, "uncond": uncond}
        if self.real_data is not None:
            batch["real"] = self.real_data.batch_for_step(index)
        self._batch_cache = (index, batch)
        return batch

    def _activate(self, phase_roles: tuple[str, ...]) -> None:
        for name, role in self.roles.items():
            role.active = name in phase_roles
            if role.trainable:
                role.set_requires_grad(role.active)

    def run_phase(self, phase: str, step: int) -> dict[str, torch.Tensor]:
        acc = self.accelerator
        phase_roles = self.method.phase_roles(phase)
        self._activate(phase_roles)
        accum = self.cfg.train.gradient_accumulation_steps
        wrapped = [self.roles[r].wrapped for r in phase_roles if self.roles[r].wrapped is not None]
        logs: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = self.make_batch(step * accum + micro)
            sync = micro == accum - 1
            no_sync = contextlib.ExitStack()
            if not sync:
                for module in wrapped:
                    no_sync.enter_context(acc.no_sync(module))
            with no_sync, acc.autocast():
                losses = self.method.losses(phase, batch, step)
                if "loss" not in losses:
                    raise RuntimeError(f"{self.method_cls.__name__}.losses({phase!r}) returned no 'loss' entry")
                acc.backward(losses["loss"] / accum)
            for key, value in losses.items():
                value = value.detach().float()
                logs[f"{phase}/{key}"] = logs.get(f"{phase}/{key}", 0) + value / accum
        trained = [name for name in phase_roles if self.roles[name].trainable]
        grad_norms = {}
        for name in trained:
            role = self.roles[name]
            params = role.trainable_parameters()
            if role.wrapped is None and acc.num_processes > 1:
                in_head = {id(p) for p in role.head.parameters()} if role.wrapped_head is not None else set()
                # the head's DDP wrapper averaged its own; the rest (shared-base LoRA) in one flat bucket
                all_reduce_mean_([p.grad for p in params if p.grad is not None and id(p) not in in_head])
            max_norm = role.cfg.max_grad_norm if role.cfg.max_grad_norm > 0 else math.inf
            grad_norms[name] = full_tensor(acc.clip_grad_norm_(params, max_norm)).detach().float()
            logs[f"grad_norm/{name}"] = grad_norms[name]
        # Nothing non-finite reaches the weights (train.on_nonfinite; harness/guard.py).
        verdict = self.guard.check(step, phase, logs[f"{phase}/loss"], grad_norms)
        for name in trained:
            optimizer = self.optimizers[name]
            if verdict is False:  # host path, skip: the update is dropped
                optimizer.zero_grad(set_to_none=True)
                continue
            if verdict is not True:  # device path: the fused optimizer skips where found_inf is 1
                raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper, or a sharded role's own
                raw.found_inf, raw.grad_scale = verdict, None
            params = self.roles[name].trainable_parameters()
            optimizer.step()
            self.schedulers[name].step()
            optimizer.zero_grad(set_to_none=True)
            if name in self.emas:
                self.emas[name].step(params)
            self.update_ema_targets(name)
            logs[f"lr/{name}"] = torch.tensor(self.schedulers[name].get_last_lr()[0])
        self._activate(())
        return logs

    # ---- outputs ------------------------------------------------------------------------------
    @torch.no_grad()
    def save_samples(self, step: int) -> Path | None:
        if not self.accelerator.is_main_process and not self.fsdp:
            return None  # (sharded networks need every process in their forward: all sample, main saves)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.accelerator.autocast():
            gen = torch.Generator(self.device).manual_seed(self.cfg.run.seed)
            n = len(self.sample_prompts)
            shape = (n, *self.teacher.latent_shape(self.cfg.model.resolution))
            noise = torch.randn(shape, generator=gen, device=self.device)
            cond = self.teacher.encode_prompt(self.sample_prompts)
            uncond = self.teacher.encode_negative(n, self.cfg.data.negative_prompt)
            latents = self.method.sample(noise, cond, uncond, generator=gen)
            images = self.teacher.decode(latents)
        if not self.accelerator.is_main_process:
            return None
        path = self.run_dir / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(images, rows=1 if n <= 4 else None)
        grid.save(path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [grid]}, step=step)
        return path

    @contextlib.contextmanager
    def ema_weights(self, roles: tuple[str, ...] | None = None, enabled: bool = True):
        """Within the block, the export EMA weights (``RoleConfig.ema_decay``) stand in for the trained ones
        of ``roles`` (default: every role the method exports); roles without an EMA keep their weights."""
        swapped = []
        try:
            for name in roles if roles is not None else self.method.export_roles():
                ema = self.emas.get(name) if enabled else None
                if ema is not None:
                    params = self.roles[name].trainable_parameters()
                    # per tensor, not EMAModel.store / copy_to: their torch._foreach_copy_ has no DTensor rule
                    with torch.no_grad():
                        swapped.append((params, [p.detach().clone() for p in params]))
                        for p, shadow in zip(params, ema.shadow_params):
                            p.copy_(shadow.to(p.device, p.dtype))
            yield
        finally:
            with torch.no_grad():
                for params, stored in swapped:
                    for p, value in zip(params, stored):
                        p.copy_(value)

    @contextlib.contextmanager
    def gathered_roles(self, roles: tuple[str, ...] | None = None):
        """Within the block, ``self.roles`` (the method's too) holds whole, unsharded copies of the
        FSDP2-sharded ``roles`` (default: every role the method exports) on the main process, for an
        export; other processes keep theirs. Every process enters it (the weights are gathered
        collectively). Without sharded roles it changes nothing."""
        main = self.accelerator.is_main_process
        originals = {}
        try:
            for name in roles if roles is not None else self.method.export_roles():
                role = self.roles[name]
                if role.skeleton is None:
                    continue
                whole = {"module": _unsharded(role.module, role.skeleton, main, self.device)}
                if role.head is not None:
                    whole["head"] = _unsharded(role.head, role.head_skeleton, main, self.device)
                if main:
                    originals[name] = role
                    self.roles[name] = dataclasses.replace(role, wrapped=None, wrapped_head=None, skeleton=None,
                                                           head_skeleton=None, _denoisers={}, **whole)
            yield
        finally:
            self.roles.update(originals)

    # ---- the loop -----------------------------------------------------------------------------
    def _resume(self, plan: Plan) -> int:
        """Load ``plan.checkpoint`` (with ``resume=latest``, fall back to older complete ones if it fails to
        load) and apply this launch's learning rates and schedules; returns the step to continue from."""
        if plan.checkpoint is None:
            return 0
        candidates = [plan.checkpoint]
        if self.cfg.train.resume == "latest":
            candidates = [c for c in reversed(list_checkpoints(self.run_dir))
                          if read_state(c)["step"] <= read_state(plan.checkpoint)["step"]]
        acc = self.accelerator
        for i, checkpoint in enumerate(candidates):
            error = None
            try:
                rng = checkpoint / f"random_states_{acc.process_index}.pkl"
                # A checkpoint of another process count (a resume that cannot be exact: the batches split
                # otherwise) holds no RNG state for the processes it did not have: they keep this launch's seeding.
                written_by = len(list(checkpoint.glob("random_states_*.pkl")))
                own_rng = rng.is_file() or written_by == acc.num_processes
                if not own_rng:
                    logger.warning("%s was written by %d processes: process %d keeps this launch's random state",
                                   checkpoint, written_by, acc.process_index)
                acc.load_state(str(checkpoint))
                load_extra_states(checkpoint, self.extra_states)  # sharded states: a collective (DCP)
                # accelerate only logs an RNG state it cannot read (a resume that is then not exact): refuse it.
                if own_rng:
                    accelerate_load(rng)
            except Exception as e:  # noqa: BLE001 - a damaged file: say which, try the one before
                error = e
            # every process falls back together (each would otherwise load another checkpoint and wait forever)
            error = first_error(acc, error)
            if error is not None:
                if i + 1 == len(candidates):
                    raise ValueError(f"could not load checkpoint {checkpoint}: {error}; resume from another one "
                                     "(train.resume=<folder>) or start fresh in a new run.output_dir") from error
                logger.warning("could not load checkpoint %s (%s); falling back to %s", checkpoint, error,
                               candidates[i + 1])
                continue
            plan.checkpoint = checkpoint
            self._apply_optimizer_settings()
            start = read_state(checkpoint)["step"]
            logger.info("resumed from %s at step %d", checkpoint, start)
            return start
        raise AssertionError("unreachable")

    def _apply_optimizer_settings(self) -> None:
        """Set every optimizer's hyper-parameters from this launch's config (a resumed run's optimizer state
        carries the old ones): learning rate through the current LR schedule at its current step, betas,
        weight decay, eps. A no-op when nothing changed."""
        for name, optimizer in self.optimizers.items():
            rc, sched = self.roles[name].cfg, getattr(self.schedulers[name], "scheduler", self.schedulers[name])
            groups = optimizer.param_groups
            for i, group in enumerate(groups):
                group.update(initial_lr=rc.lr, betas=tuple(rc.betas), weight_decay=rc.weight_decay, eps=rc.adam_eps)
                group["lr"] = rc.lr * sched.lr_lambdas[i](sched.last_epoch)
            sched.base_lrs = [rc.lr] * len(groups)
            sched._last_lr = [g["lr"] for g in groups]

    def _dcp_states(self) -> set[str]:
        """The extra states each process writes its own shards of (``train.fsdp_checkpoint: sharded``):
        every state of an FSDP2-sharded role (weights, optimizer and schedule, export EMA) and the EMA
        target roles. Chosen by the config, not by the process count: one process writes the same layout."""
        tc = self.cfg.train
        if tc.parallel != "fsdp2" or tc.fsdp_checkpoint != "sharded":
            return set()
        names = {f"ema_target.{target}" for target in self.ema_targets}
        for name, role in self.roles.items():
            if is_sharded_role(role, self.teacher, tc.parallel):
                names |= {f"optimizer.{name}", *student_states(role, self.teacher, self.emas.get(name), tc.parallel)}
        return names & set(self.extra_states)

    def _checkpoint(self, step: int) -> None:
        self.guard.poll()  # never write a checkpoint after a non-finite update (device path)
        save_checkpoint(self.accelerator, self.run_dir, step,
                        {"method": self.cfg.method.name, "config": OmegaConf.to_container(self.cfg, resolve=True)},
                        self.cfg.train.checkpoints_total_limit, extra_states=self.extra_states,
                        sharded=self._dcp_states())

    def train(self, plan: Plan | None = None) -> Path:
        """Train to ``train.max_steps``; nothing else (``lifecycle.run`` then exports, evaluates and calls
        ``finish``). Raises ``NonFiniteError`` (no update applied, no checkpoint written after it) or
        ``CheckpointWriteError``; after SIGTERM / SIGINT it checkpoints and returns early with
        ``self.stopped_by`` set to the signal's name. ``plan``: what ``preflight(cfg)`` found (run here
        when not given)."""
        cfg, acc = self.cfg, self.accelerator
        self.stopped_by = None
        if plan is None:  # train.py runs it before any model loads and hands over its plan
            plan = preflight(cfg)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if plan.used_by_another_run:
                logger.warning("run.overwrite=true: moved the earlier run in %s to %s", self.run_dir,
                               move_aside(self.run_dir))
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in clean_stale_temps(self.run_dir):
                logger.info("removed %s, left by an interrupted save", stale)
        acc.wait_for_everyone()
        start = self._resume(plan)
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            if plan.checkpoint is not None:
                record_resume(self.run_dir, plan, start)
                for key, change in plan.changes.items():
                    logger.warning("resumed with %s = %r (was %r)", key, change["to"], change["from"])
        resumed = plan.checkpoint is not None
        writer = MetricsWriter(self.run_dir, resume_step=start if resumed else None) if acc.is_main_process else None
        if acc.log_with:
            acc.init_trackers(cfg.run.name, config=_flat_config(OmegaConf.to_container(cfg, resolve=True)))

        bar = tqdm(range(start, cfg.train.max_steps), initial=start, total=cfg.train.max_steps,
                   disable=not (acc.is_main_process and cfg.train.progress_bar), desc=f"{cfg.method.name}")
        try:
            with GracefulStop(acc) as stop:
                for step in bar:
                    logs: dict[str, torch.Tensor] = {}
                    for phase in self.method.phases(step):
                        logs.update(self.run_phase(phase, step))
                    last = step + 1 == cfg.train.max_steps
                    if step % cfg.train.log_every == 0 or last:
                        # One device-to-host copy for all metrics (each float() would wait for the GPU).
                        values = torch.stack([v.detach().float().reshape(()).to(self.device)
                                              for v in logs.values()]).tolist()
                        metrics = dict(zip(logs, values))
                        metrics.update(self.guard.poll())
                        if acc.is_main_process:
                            writer.write(step, metrics)
                            bar.set_postfix({k.split("/", 1)[1] if k.endswith("/loss") else k: f"{v:.4g}"
                                             for k, v in metrics.items() if k.endswith("loss")})
                        acc.log(metrics, step=step)
                    if cfg.train.sample_every and ((step + 1) % cfg.train.sample_every == 0 or last):
                        self.save_samples(step + 1)
                    self.stopped_by = stop.requested()
                    if (step + 1) % cfg.train.checkpoint_every == 0 or last or self.stopped_by:
                        self._checkpoint(step + 1)
                    if self.stopped_by:
                        if acc.is_main_process:
                            logger.warning("%s: stopped after step %d with a checkpoint; resume with "
                                           "train.resume=latest", self.stopped_by, step + 1)
                        break
                self.guard.poll()
        except NonFiniteError:
            acc.end_training()
            raise
        finally:
            bar.close()
        return self.run_dir

    def finish(self) -> None:
        """End the run: close the trackers; after a run that trained to the end (not stopped by a signal),
        write ``DONE.json`` with every process's weight digests (equal under correct DDP)."""
        acc = self.accelerator
        if self.stopped_by:
            acc.end_training()
            return
        digests = self.weight_digests()
        acc.end_training()
        if acc.is_main_process:
            desync = [name for name, per_rank in digests.items() if len(set(per_rank)) > 1]
            if desync:
                logger.warning("processes ended with different weights for roles %s (DDP desync)", desync)
            (self.run_dir / "DONE.json").write_text(json.dumps(
                {"steps": self.cfg.train.max_steps, "num_processes": acc.num_processes, "weight_sha256": digests},
                indent=2))

    def weight_digests(self) -> dict[str, list[str]]:
        """SHA-256 of every trainable role's weights on every process (equal under correct DDP)."""
        from accelerate.utils import gather_object

        digests = {}
        for name, role in self.roles.items():
            if not role.trainable:
                continue
            h = hashlib.sha256()
            for p in role.trainable_parameters():
                h.update(full_tensor(p.detach()).float().cpu().contiguous().numpy().tobytes())
            digests[name] = gather_object([h.hexdigest()])
        return digests

