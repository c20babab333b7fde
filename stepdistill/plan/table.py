"""``python -m stepdistill.plan.table --out docs/planner-table.md [CONFIG ...]``: the planner's figures for
every shipped recipe (default: ``configs/*.yaml`` but ``base.yaml``) as one markdown table, and the JSON of
each beside it (``<out>.json``). Each config runs once under FakeTensorMode (``plan.run.measure``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stepdistill.plan.estimate import GPUS, GiB, estimate, seconds_per_step

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def shipped_recipes() -> list[Path]:
    return sorted(p for p in REPO_CONFIGS.glob("*.yaml") if p.stem != "base")


def _kind(info: dict) -> str:
    if info.get("heads_only"):
        return "heads on the teacher"
    return ("LoRA" if info["lora"] else "full") + (" (shared base)" if info["shared_base"] else "")


def row(name: str, m, gpu: str = "h100", utilisation: float = 0.4) -> str:
    c = m.config
    one = estimate(m, c["parallel"], 1)
    ddp8 = estimate(m, "ddp", 8)
    fsdp8 = estimate(m, "fsdp2", 8) if m.fsdp_sharded else None
    trained = ", ".join(f"{r} {_kind(info)}{' ckpt' if info['gradient_checkpointing'] else ''}"
                        for r, info in m.roles.items() if info["trainable"])
    ms = seconds_per_step(m.flops_per_step, gpu, utilisation) * 1e3
    accum = f" x {c['gradient_accumulation_steps']} accumulation" if c["gradient_accumulation_steps"] > 1 else ""
    return (f"| `{name}` | {c['family']} {c['resolution']} px, batch {c['batch_size']}{accum} | {trained} | "
            f"{one.peak / GiB:.1f} | {ddp8.peak / GiB:.1f} | "
            f"{f'{fsdp8.peak / GiB:.1f}' if fsdp8 else '–'} | {m.flops_per_step / 1e12:.1f} | {ms:.0f} |")


HEADER = ("| config | setting | trained roles | 1 GPU GiB | 8 GPUs DDP GiB | 8 GPUs FSDP2 GiB | TFLOP / step | "
          "ms / step at 40 % of H100 bf16 |\n|---|---|---|---:|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> int:
    from stepdistill.plan.run import measure
    from stepdistill.runconfig import load_config

    parser = argparse.ArgumentParser(prog="python -m stepdistill.plan.table", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file to write (the JSON goes beside it)")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("configs", nargs="*", help="default: every shipped recipe, configs/*.yaml")
    args = parser.parse_args(argv)
    configs = [Path(c) for c in args.configs] or shipped_recipes()
    rows, records = [], {}
    for path in configs:
        started = time.perf_counter()
        try:
            m = measure(load_config(str(path)))
        except Exception as e:  # one recipe the planner cannot run does not hide the others
            rows.append(f"| `{path.stem}` | the planner failed: {type(e).__name__}: {str(e)[:200]} |" + " |" * 6)
            records[path.stem] = {"error": f"{type(e).__name__}: {e}"}
        else:
            rows.append(row(path.stem, m, args.gpu))
            records[path.stem] = m.to_dict()
        print(f"{path.stem}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        out = Path(args.out)  # written after every config: a long run keeps what it has
        out.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
        out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
