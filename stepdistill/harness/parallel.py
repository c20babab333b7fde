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
