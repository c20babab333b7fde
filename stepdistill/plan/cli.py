"""``stepdistill plan --config X [--num-processes N] [--gpu-memory 80GiB] [--json] [key=value ...]``.

Runs one real training iteration of the config at its real size under FakeTensorMode on this CPU (no
weights, no memory, no download) and prints per GPU what it holds at its peak, per role, under DDP or
FSDP2 over N processes, the FLOPs per step with a time at a stated share of the GPU's bf16 peak, and,
when it does not fit, the changes that would, each with its predicted peak.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

from stepdistill.plan.estimate import GPUS, Estimate, GiB, estimate, seconds_per_step

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80 GB``, ``81920MiB`` -> bytes (a bare number is GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = (match.group(2).lower() if match else None) or "gib"
    if not match or unit not in _UNITS:
        raise ValueError(f"--gpu-memory={text!r}: give a size like 80GiB, 24GB or 81920MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepdistill plan", description=__doc__.splitlines()[0],
                                epilog="key=value overrides apply as in train.py, e.g. data.batch_size=8")
    p.add_argument("--config", required=True, help="a config file or name, as for train.py")
    p.add_argument("--num-processes", type=int, default=1, help="GPUs the run is launched on (default 1)")
    p.add_argument("--parallel", choices=("ddp", "fsdp2"), help="default: the config's train.parallel")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="for the time and the default memory")
    p.add_argument("--gpu-memory", help="memory per GPU (default: the --gpu's, e.g. 80GiB)")
    p.add_argument("--utilisation", type=float, default=0.4,
                   help="share of the GPU's dense bf16 peak the time assumes (default 0.4)")
    p.add_argument("--no-suggestions", action="store_true", help="do not try the changes that would fit")
    p.add_argument("--json", action="store_true", help="print one JSON object (bytes) instead of tables")
    return p


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"


def _table(e: Estimate, budget: int) -> list[str]:
    lines = [f"| per GPU ({e.parallel}, {e.num_processes} process{'es' if e.num_processes > 1 else ''}) "
             "| params | grads | optimizer | EMA | GiB |", "|---|---:|---:|---:|---:|---:|"]
    for owner, kinds in e.held.items():
        cells = [_gib(kinds.get(k, 0)) if kinds.get(k) else "" for k in ("params", "grads", "optimizer", "ema")]
        lines.append(f"| {owner} | " + " | ".join(cells) + f" | {_gib(sum(kinds.values()))} |")
    lines.append(f"| activations and temporaries | | | | | {_gib(e.activations)} |")
    if e.autocast:
        lines.append(f"| autocast's bf16 copies of fp32 weights | | | | | {_gib(e.autocast)} |")
    if e.communication:
        what = "DDP gradient buckets" if e.parallel == "ddp" else "FSDP2 all-gathered units"
        lines.append(f"| {what} | | | | | {_gib(e.communication)} |")
    verdict = "fits" if e.peak <= budget else "does NOT fit"
    lines.append(f"| **peak** (in the {e.peak_phase} phase) | | | | | **{_gib(e.peak)}** |")
    lines.append(f"\n{verdict} in {_gib(budget)} GiB")
    return lines


def _suggestions(m, cfg, overrides: list[str], parallel: str, n: int) -> list[Estimate]:
    """The changes that cut memory, each with its predicted peak (re-measured where activations change)."""
    from stepdistill.plan.run import measure
    from stepdistill.runconfig import load_config

    out = []
    trained = [r for r, info in m.roles.items() if info["trainable"]]

    def remeasure(label: str, extra: list[str]) -> None:
        variant = measure(load_config(cfg, [*overrides, *extra]))
        out.append(estimate(variant, parallel, n, label=f"{label}: {' '.join(extra)}"))

    ckpt = [f"roles.{r}.gradient_checkpointing=true" for r in trained if not m.roles[r]["gradient_checkpointing"]]
    if ckpt:
        remeasure("gradient checkpointing", ckpt)
    critics = [r for r in trained if r not in m.students and not m.roles[r]["lora"]
               and not m.roles[r].get("heads_only")]
    if critics:
        remeasure("a LoRA critic on the teacher's base",
                  [x for r in critics for x in (f"roles.{r}.lora_rank=64", f"roles.{r}.share_teacher_base=true")])
    if m.fsdp_sharded and (parallel == "ddp" or n == 1):
        shards = n if n > 1 else 8
        out.append(estimate(m, "fsdp2", shards, label=f"FSDP2 over {shards} GPUs: train.parallel=fsdp2"))
    batch = int(m.config["batch_size"])
    if batch > 1:
        accum = int(m.config["gradient_accumulation_steps"]) * 2
        remeasure("half the batch, twice the accumulation",
                  [f"data.batch_size={batch // 2}", f"train.gradient_accumulation_steps={accum}"])
    text = tuple(o for o in m.held if o.startswith("text_encoder") and o not in m.off_gpu)
    if text:
        out.append(estimate(m, parallel, n, off_gpu=text,
                            label="text encoders off the GPU: data.embeddings from `stepdistill cache-embeddings`, "
                                  "or model.offload_text_encoders=true"))
    return out


def _unplannable(e: Exception) -> str:
    """Where a run read a tensor's value, which a run without weights cannot give."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/stepdistill/" in f.filename]
    where = f" at {frames[-1].filename.split('/stepdistill/', 1)[1]}:{frames[-1].lineno}" if frames else ""
    return (f"the planner cannot run this config without weights: {e.func if hasattr(e, 'func') else e} needs a "
            f"tensor's value{where} (an .item(), a bool of a tensor, or a shape that depends on values). Please "
            "report it with the config: the harness is meant to need no values")


def plan_main(argv: list[str] | None = None) -> int:
    from stepdistill.plan.run import measure
    from stepdistill.runconfig import load_config

    args, overrides = build_parser().parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    try:
        if bad:
            raise ValueError(f"unknown argument {bad[0]!r}: overrides are key=value (see --help)")
        if args.num_processes < 1:
            raise ValueError(f"--num-processes={args.num_processes} must be >= 1")
        if not 0 < args.utilisation <= 1:
            raise ValueError(f"--utilisation={args.utilisation} must be in (0, 1]")
        budget = parse_bytes(args.gpu_memory) if args.gpu_memory else GPUS[args.gpu][1] * GiB
        cfg = load_config(args.config, overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parallel = args.parallel or cfg.train.parallel
    try:
        m = measure(cfg)
    except (DataDependentOutputException, DynamicOutputShapeException) as e:
        print(f"error: {_unplannable(e)}", file=sys.stderr)
        return 1
    main = estimate(m, parallel, args.num_processes)
    fits = main.peak <= budget
    suggestions = [] if args.no_suggestions or fits else _suggestions(m, args.config, overrides, parallel,
                                                                      args.num_processes)
    seconds = seconds_per_step(m.flops_per_step, args.gpu, args.utilisation)
    if args.json:
        print(json.dumps({"measured": m.to_dict(), "estimate": main.to_dict(), "budget": budget,
                          "fits": fits, "gpu": args.gpu, "utilisation": args.utilisation,
                          "seconds_per_step": seconds,
                          "suggestions": [{**s.to_dict(), "fits": s.peak <= budget} for s in suggestions]}))
        return 0
    c = m.config
    print(f"{c['config']}: {c['method']} on {c['pretrained']} ({c['family']}), {c['resolution']} px, batch "
          f"{c['batch_size']} per GPU x {c['gradient_accumulation_steps']} accumulation, mixed precision "
          f"{c['mixed_precision']}, weights {c['weight_dtype']}\n")
    print("\n".join(_table(main, budget)))
    if m.off_gpu:
        keys = sorted(set(m.off_gpu.values()))
        print(f"\n(off the GPU, left out: {', '.join(m.off_gpu)}, by {' and '.join(keys)})")
    phases = ", ".join(f"{p} {f / 1e12:.1f} TFLOP x{m.phase_counts[p]}" for p, f in m.phase_flops.items())
    print(f"\nFLOPs per step: {m.flops_per_step / 1e12:.1f} TFLOP per GPU ({phases} per {m.cycle}-step cycle); "
          f"at {args.utilisation:.0%} of the {args.gpu.upper()}'s {GPUS[args.gpu][0]:.0f} TFLOP/s bf16 peak: "
          f"{seconds * 1e3:.0f} ms per step")
    if suggestions:
        print("\nChanges that cut the peak (each alone):\n\n| change | peak GiB | fits |\n|---|---:|---|")
        for s in sorted(suggestions, key=lambda s: s.peak):
            print(f"| {s.label} | {_gib(s.peak)} | {'yes' if s.peak <= budget else 'no'} |")
    print(f"\n(measured under FakeTensorMode in {m.seconds:.0f} s; `--json` for the bytes)")
    return 0
