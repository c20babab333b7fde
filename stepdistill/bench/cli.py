"""``stepdistill bench``: one-step vs few-step samplers — latency, throughput, memory and quality, one table.

The command line of the sampler benchmark. What it compares and how entries are written: ``bench.spec``;
how each entry is run and timed: ``bench.runner`` (with ``bench.measure``); quality: ``bench.quality``;
the files it writes: ``bench.report``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from stepdistill.bench.quality import QUALITY_KEYS
from stepdistill.bench.runner import run_bench
from stepdistill.bench.spec import (
    SAMPLERS,
    SDPA_BACKENDS,
    BenchSettings,
    load_bench_file,
    make_settings,
    parse_entry,
    random_init_entries,
    validate,
)
from stepdistill.config.load import validate_out_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stepdistill bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare samplers (one-step vs few-step students, teachers, hybrids): latency, throughput, "
                    "peak memory and quality in one table (markdown + CSV) and one plot.",
        epilog="entries: --entry \"PIPELINE steps=50,25 sampler=ddim guidance=1.5 name=... compile=true "
               "channels_last=true sdpa=math tiny_vae=DIR quality=toy\"\n"
               "         --entry \"hybrid teacher=toy-sd student=DIR teacher_steps=1 steps=4 guidance=1.5\"\n"
               "PIPELINE: a folder, a Hub id, toy-sd / toy-flow, tiny:<family>, random:sd15 / random:sdxl\n"
               f"samplers: {', '.join(SAMPLERS)} or a diffusers scheduler class name")
    p.add_argument("--config", "-c", metavar="YAML", help="file with entries: and settings: (e.g. configs/bench/toy.yaml)")
    p.add_argument("--entry", "-e", action="append", default=[], metavar="SPEC", help="an entry (repeatable)")
    p.add_argument("--random-init", metavar="ARCH", choices=("sd15", "sdxl"),
                   help="add the GPU target entries: the random-weight ARCH architecture at 1 step, guidance 0, "
                        "eager, compiled, and compiled with a random AutoencoderTiny")
    p.add_argument("--batch-sizes", type=str, default=None, metavar="B,B", help="throughput batch sizes (default 1)")
    p.add_argument("--runs", type=int, default=None, help="timed calls per batch size (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda[:N]")
    p.add_argument("--dtype", default=None, choices=("auto", "fp32", "bf16", "fp16"),
                   help="weights and activations (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: each pipeline's own)")
    p.add_argument("--prompt", default=None, help="prompt of the timed calls")
    p.add_argument("--quality", default=None, help="auto (default: toy metrics for toy pipelines, n/a otherwise), "
                                                   "none, a registered quality function, or package.module:function")
    p.add_argument("--quality-prompts", default=None, help="prompt source of the quality samples (default builtin:toy_all)")
    p.add_argument("--quality-seeds", type=int, default=None, help="seeds per prompt (default 2)")
    p.add_argument("--quality-num-prompts", type=int, default=None, help="use this many of the prompts (spread)")
    p.add_argument("--quality-num-reference", type=int, default=None, help="toy reference images (default 1000)")
    p.add_argument("--plot-metric", default=None, help="quality metric of the plot's y axis (default: the first of "
                                                       f"{', '.join(QUALITY_KEYS)} that is present)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile backbone and VAE decode")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune)")
    p.add_argument("--channels-last", action="store_true", default=None, help="channels_last UNet / VAE")
    p.add_argument("--sdpa", default=None, choices=SDPA_BACKENDS, help="scaled_dot_product_attention backend")
    p.add_argument("--xformers", action="store_true", default=None, help="xformers attention (must be installed)")
    p.add_argument("--tiny-vae", default=None, metavar="DIR", help="AutoencoderTiny folder for decoding (or random)")
    p.add_argument("--fast", action="store_true", default=None,
                   help="one host-sync-free program per call, a CUDA graph on CUDA (SD/SDXL: lcm, ddim; SD3/FLUX: flow_euler)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (toy models on a shared CPU: 1 is much faster than 2)")
    p.add_argument("--out", default=None, help="output folder (default bench/)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        entries, values = load_bench_file(args.config) if args.config else ([], {})
        for text in args.entry:
            entries.extend(parse_entry(text))
        if args.random_init:
            entries.extend(random_init_entries(args.random_init))
        cli = {f.name: getattr(args, f.name) for f in fields(BenchSettings) if getattr(args, f.name, None) is not None}
        settings = make_settings({**values, **cli})
        validate(entries, settings)
        validate_out_dir(settings.out)  # before any pipeline loads, not when the tables are written
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_bench(entries, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
