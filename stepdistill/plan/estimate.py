"""Per-GPU memory under DDP or FSDP2 over N processes, from the one-process measurement (``plan.run``).

What changes with the process count is known exactly from the harness's layout, so it is derived, not
measured again:

- **DDP** (N > 1): every DDP-wrapped trainable module keeps gradient buckets of its own size (float32,
  ``gradient_as_bucket_view`` off as accelerate leaves it) for the whole run. Shared-base LoRA gradients are
  averaged in one flat temporary bucket (``harness.parallel.all_reduce_mean_``): small, left out. One
  process wraps nothing.
- **FSDP2** (N > 1): the parameters, gradients, optimizer states and EMA of every sharded role (trainable
  full-weight roles, EMA targets, and the teacher's backbone with ``train.fsdp_shard_teacher``) are divided
  by N. Their weights are all-gathered per unit (bf16 under bf16 mixed precision, else float32) as the
  forward and backward reach it: the largest unit and the one prefetched after it, plus that unit's float32
  gradients before the reduce-scatter, are added. Autocast no longer keeps bf16 copies of their float32
  weights (the mixed-precision policy computes in bf16 parameters), so those copies are taken out. The
  activations are those of the one-process run: FSDP2 does not change them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from stepdistill.plan.run import Measured

GiB = 2**30

# Dense bf16 tensor-core peak (TFLOP/s) and memory (GiB) of common training GPUs, from the vendors' sheets.
GPUS = {
    "h100": (989.0, 80), "h200": (989.0, 141), "b200": (2250.0, 180), "a100": (312.0, 80),
    "a100-40gb": (312.0, 40), "l40s": (362.0, 48), "rtx4090": (165.0, 24), "rtx5090": (209.0, 32),
}


@dataclass
class Estimate:
    """One configuration's figures per GPU (bytes) under ``parallel`` over ``num_processes``."""

    label: str
    parallel: str
    num_processes: int
    held: dict[str, dict[str, int]]  # owner -> kind -> bytes at the peak, per GPU
    activations: int
    autocast: int  # autocast's bf16 copies of float32 weights, at the peak
    communication: int  # DDP buckets, or FSDP2's all-gathered units
    peak: int
    peak_phase: str
    flops_per_step: float

    @property
    def total_held(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.held.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "total_held": self.total_held}


def estimate(m: Measured, parallel: str, num_processes: int, label: str = "as configured",
             off_gpu: tuple[str, ...] = ()) -> Estimate:
    """Per-GPU figures of ``m`` under ``parallel`` over ``num_processes``; the owners in ``off_gpu`` (e.g. the
    text encoders, with an embedding cache) hold nothing on the GPU, nor do those the run keeps off it
    (``m.off_gpu``)."""
    n = max(1, int(num_processes))
    off_gpu = (*off_gpu, *m.off_gpu)
    held = {owner: {k: v for k, v in kinds.items() if k != "autocast"} for owner, kinds in m.held.items()
            if owner not in off_gpu}
    autocast = {owner: kinds.get("autocast", 0) for owner, kinds in m.held.items() if owner not in off_gpu}
    communication = 0
    if n > 1 and parallel == "ddp":
        communication = 4 * sum(m.ddp_bucketed.values())
    elif n > 1 and parallel == "fsdp2":
        for owner in m.fsdp_sharded:
            held[owner] = {kind: -(-nbytes // n) for kind, nbytes in held.get(owner, {}).items()}
            autocast[owner] = 0
        units = sorted((m.largest_unit[o] for o in m.fsdp_sharded), reverse=True)
        # the mixed-precision policy gathers bf16 / fp16 weights; without one they are gathered float32
        gathered = 2 if m.config.get("mixed_precision") in ("bf16", "fp16") else 4
        if units:  # two units gathered (the current one, the prefetched next), fp32 grads of one
            communication = 2 * gathered * units[0] + 4 * units[0]
    auto = sum(autocast.values())
    peak = sum(sum(k.values()) for k in held.values()) + m.activations + auto + communication
    return Estimate(label, parallel, n, held, m.activations, auto, communication, peak, m.peak_phase,
                    m.flops_per_step)


def seconds_per_step(flops: float, gpu: str, utilisation: float) -> float:
    return flops / (GPUS[gpu][0] * 1e12 * utilisation)
