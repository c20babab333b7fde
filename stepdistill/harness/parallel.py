"""Collectives the harness runs itself, outside the DDP wrappers accelerate builds.

A LoRA role on the teacher's shared frozen base has no DDP wrapper (the base belongs to the teacher,
whose forward is not this role's), so its gradients are averaged here. A UNet's LoRA holds hundreds of
small tensors (rank-64 SD1.5: 512 of them); one all-reduce per tensor pays the collective's latency
hundreds of times per step. They go as one flat buffer per dtype and device instead, which gives the
same numbers: each element is still summed over the processes, then divided by their count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_mean_(tensors: list[torch.Tensor]) -> int:
    """Average ``tensors`` in place over every process, one collective per (dtype, device) bucket.

    Returns the number of collectives run (0 when there is nothing to reduce or one process)."""
    if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    world = dist.get_world_size()
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for group in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world
        for t, chunk in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(chunk.view_as(t))
    return len(buckets)


# ---- FSDP2 ----------------------------------------------------------------------------------------
# accelerate applies its FSDP plugin only to GPU process groups (on a CPU it falls back to DDP), so the
# harness shards roles itself with torch's ``fully_shard``: the same code on gloo and NCCL.

# The repeated blocks of the backbones the families use: each becomes one FSDP unit (its parameters
# all-gathered for its forward, freed after), the rest of the backbone the root unit.
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks")
SINGLE_BLOCKS = ("mid_block",)


def fsdp_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules ``shard`` wraps one by one (the root is wrapped last, around them)."""
    units: list[torch.nn.Module] = []
    for name in BLOCK_LISTS:
        blocks = getattr(module, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            units.extend(blocks)
    for name in SINGLE_BLOCKS:
        block = getattr(module, name, None)
        if isinstance(block, torch.nn.Module):
            units.append(block)
    return units


def shard(module: torch.nn.Module, mixed_precision: str = "no", reshard_after_forward: bool = True,
          cpu_offload: bool = False) -> torch.nn.Module:
    """Shard ``module`` in place over every process (``fully_shard`` per block, then the root).

    Parameters become DTensors holding this process's shard; build optimizers after this. With bf16
    mixed precision the all-gathered parameters are bf16 and gradients are reduced in float32. The
    forward inputs keep their dtype: the trainer's autocast casts activations as it does under DDP,
    where FSDP's own input cast would round float timesteps to bf16 (999 -> 1000, 561 -> 560), so a
    sharded student or critic would see other noise levels than the unsharded teacher."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision in ("bf16", "fp16"):
        param_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                                   cast_forward_inputs=False)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for unit in fsdp_units(module):
        fully_shard(unit, **kwargs)
    fully_shard(module, **kwargs)
    return module


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every process calls it), else ``tensor``."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def load_full_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into ``dst``; a DTensor ``dst`` takes its own shard of it (every process
    holds ``full``, so no communication is needed)."""
    if is_sharded(dst):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements,
                                 src_data_rank=None)
        dst.to_local().copy_(full.to_local())
    else:
        dst.copy_(full)
