"""The ``stepdistill`` command line: ``stepdistill {train,export,cache-pairs,cache-embeddings,bench-train,eval} ...``.

Each subcommand imports its implementation lazily, so ``stepdistill --help`` is instant and a
subcommand only needs the modules it uses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stepdistill.train import _EPILOG, add_train_arguments, collect_overrides

__all__ = ["main", "build_parser"]


def _cmd_train(args: argparse.Namespace) -> int:
    from stepdistill.train import finish, run

    return finish(run(args))


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stepdistill.config.load import validate_out_dir
    from stepdistill.export.hub import check_repo_id, push_to_hub, write_model_card
    from stepdistill.export.pipeline import check_export_target, export_from_run

    path = Path(args.path)
    try:
        # Every argument is checked before anything is written.
        if args.private and not args.push_to_hub:
            raise ValueError("--private only applies with --push-to-hub REPO_ID")
        if args.dry_run and not args.push_to_hub:
            raise ValueError("--dry-run only applies with --push-to-hub REPO_ID")
        if args.push_to_hub:
            check_repo_id(args.push_to_hub)
        if (path / "stepdistill.json").is_file():
            # Already an export folder: refresh its card (for the repo id) and push it as it is.
            if args.out and Path(args.out).resolve() != path.resolve():
                raise ValueError(f"{path} is already an export; push it without --out, or export its run instead")
            out = path
            if args.dry_run:  # a dry run changes nothing, the card included
                print(f"dry run: the model card ({out / 'README.md'}) would be rewritten for {args.push_to_hub}")
            else:
                write_model_card(out, repo_id=args.push_to_hub, license_=args.license)
        else:
            if not args.out:
                raise ValueError("--out DIR is required to export a run or checkpoint")
            validate_out_dir(args.out)
            check_export_target(args.out)
            if args.push_to_hub and not args.dry_run:
                from huggingface_hub import get_token

                if get_token() is None:  # fail before the export, not after it
                    raise ValueError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN")
            out = export_from_run(path, args.out, dtype=args.dtype, use_ema=not args.no_ema,
                                  lora_only=args.lora, variant=args.variant, repo_id=args.push_to_hub,
                                  license_=args.license, allow_nonfinite=args.allow_nonfinite,
                                  lora_format=args.lora_format)
            print(f"exported to {out}")
        if args.push_to_hub:
            url = push_to_hub(out, args.push_to_hub, private=args.private, dry_run=args.dry_run)
            if url:
                print(f"pushed to {url}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_cache_pairs(args: argparse.Namespace) -> int:
    from stepdistill.config.load import validate_out_dir
    from stepdistill.harness.preflight import validate_paths
    from stepdistill.runconfig import load_config

    parser = args.parser
    if args.num < 1:
        parser.error(f"--num={args.num} must be >= 1")
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} must be >= 1")
    try:
        validate_out_dir(args.out)
        cfg = load_config(args.config, args.overrides)
        validate_paths_for_pairs(cfg, validate_paths)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from stepdistill.data.pairs import cache_pairs

    batch_size = args.batch_size if args.batch_size is not None else cfg.data.batch_size
    out = cache_pairs(cfg, args.out, args.num, args.steps, batch_size)
    print(f"cached {args.num} noise/teacher-output pairs in {out if out is not None else args.out}")
    return 0


def validate_paths_for_pairs(cfg, validate_paths) -> None:
    """Pairs are what ``method.regression_pairs`` will point to, so they need not exist yet, and the
    method's own data requirements (which include those pairs) do not apply to making them."""
    method = cfg.method
    if method is not None and "regression_pairs" in method and method.regression_pairs:
        saved = method.regression_pairs
        method.regression_pairs = None
        try:
            validate_paths(cfg, method_checks=False)
        finally:
            method.regression_pairs = saved
    else:
        validate_paths(cfg, method_checks=False)


def _cmd_cache_embeddings(args: argparse.Namespace) -> int:
    import time

    from stepdistill.config.load import validate_out_dir
    from stepdistill.harness.preflight import validate_paths
    from stepdistill.runconfig import load_config

    if args.batch_size is not None and args.batch_size < 1:
        args.parser.error(f"--batch-size={args.batch_size} must be >= 1")
    try:
        cfg = load_config(args.config, args.overrides)
        out = args.out or cfg.data.embeddings
        if not out:
            raise ValueError("give --out DIR (or set data.embeddings: DIR in the config) for the embedding cache")
        validate_out_dir(out, "--out")
        cfg.data.embeddings = None  # the cache being made: not checked against itself
        validate_paths_for_pairs(cfg, validate_paths)
        from stepdistill.data.embeddings import run_prompts

        prompts, negatives = run_prompts(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from stepdistill.data.embeddings import teacher_id, write_embedding_cache
    from stepdistill.harness.build import resolve_precision
    from stepdistill.models import load_teacher

    # The run's own weight dtype, so the cached rows are what its live encoding would give; the backbone
    # stays on the CPU (it is not run), the text encoders go to the GPU when there is one.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, dtype = resolve_precision(cfg.train.mixed_precision, cfg.model.weight_dtype)
    try:
        teacher = load_teacher(cfg.model.pretrained, family=cfg.model.family, device="cpu", dtype=dtype,
                               revision=cfg.model.revision, variant=cfg.model.variant,
                               resolution=cfg.model.resolution, embeddings=None, text_encoder_device=device)
        meta = {"teacher": teacher_id(cfg.model.pretrained), "family": teacher.family,
                "resolution": teacher.resolution, "max_sequence_length": teacher.max_sequence_length,
                "dtype": str(dtype).removeprefix("torch."), "revision": cfg.model.revision,
                "variant": cfg.model.variant, "config": str(args.config), "overrides": list(args.overrides),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        batch_size = args.batch_size if args.batch_size is not None else cfg.data.batch_size
        folder = write_embedding_cache(out, lambda batch: teacher.encode_prompt(batch).tensors,
                                       lambda text: teacher.encode_negative(1, text).tensors, prompts, negatives,
                                       meta, batch_size=batch_size, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cached the text embeddings of {len(prompts)} prompts and {len(negatives)} negative prompts in {folder}; "
          f"train with data.embeddings={folder}")
    return 0


def _cmd_bench_train(argv: list[str]) -> int:
    from stepdistill.bench.train_step import main as bench_main

    result = bench_main(argv)
    return result if isinstance(result, int) else 0


def _cmd_bench(argv: list[str]) -> int:
    from stepdistill.bench.cli import main as bench_main

    return bench_main(argv)


def _cmd_eval(argv: list[str]) -> int:
    from stepdistill.eval.evaluate import main as eval_main

    return eval_main(argv)


def _cmd_demo(args: argparse.Namespace) -> int:
    from stepdistill.train import main as train_main

    return train_main(["--config", "toy/dmd2", *args.overrides])


# `stepdistill toy <tool> ...`: the toy domain's own tools; arguments go verbatim to each tool's parser.
TOY_TOOLS = {
    "train-teacher": ("stepdistill.toy.train_teacher", "train a toy teacher pipeline (toy-sd / toy-flow)"),
    "train-classifier": ("stepdistill.toy.classifier", "train the toy attribute classifier (FID features)"),
    "eval": ("stepdistill.eval.compare", "evaluate a run's exported student against its toy teacher "
                                         "(= stepdistill eval RUN_DIR)"),
}


def _cmd_toy(argv: list[str]) -> int:
    import importlib

    if not argv or argv[0] not in TOY_TOOLS:
        tools = "\n".join(f"  {name:18s} {help_}" for name, (_, help_) in TOY_TOOLS.items())
        print(f"usage: stepdistill toy TOOL [args...]\n\ntools:\n{tools}", file=sys.stderr)
        return 2
    module = importlib.import_module(TOY_TOOLS[argv[0]][0])
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepdistill",
        description="Distil multi-step diffusion models into one-step / few-step generators.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("train", help="train a distilled generator from a config (same as train.py)",
                       description="Train a distilled generator from a config.", epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train, parser=p)

    p = sub.add_parser("export", help="export a run (or checkpoint) as a diffusers pipeline or LoRA, "
                                      "with a model card; optionally push it to the Hub",
                       description="Write the distilled generator of a run folder or checkpoint as a "
                                   "diffusers pipeline (with its few-step scheduler) or as LoRA weights, with "
                                   "a model card (README.md); optionally push the folder to the Hugging Face "
                                   "Hub. Given an export folder, (re)writes its card and pushes it.")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT", help="run folder, checkpoint folder or export folder")
    p.add_argument("--out", metavar="DIR", help="output folder (required unless PATH is an export folder)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weight dtype (default fp32)")
    p.add_argument("--variant", choices=("fp16", "bf16"), default=None,
                   help="save the weights as this diffusers variant (*.fp16.safetensors; load with variant=)")
    p.add_argument("--lora", action="store_true",
                   help="write only the LoRA weights of a LoRA student (pipe.load_lora_weights) and its scheduler")
    p.add_argument("--format", dest="lora_format", choices=("diffusers", "kohya", "comfyui"), default="diffusers",
                   help="a LoRA student's file: diffusers (always written), plus kohya (A1111, Forge; UNet models) "
                        "or comfyui (drop into ComfyUI/models/loras) beside it")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA weights")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write weights that hold NaN / inf (refused by default: the run diverged)")
    p.add_argument("--license", default=None, help="license id for the model card (default: the base model's)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="upload the folder to this model repo (token from HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list what would be uploaded")
    p.set_defaults(func=_cmd_export, parser=p)

    p = sub.add_parser("cache-pairs", help="cache (noise, teacher ODE output) pairs for DMD's regression loss",
                       description="Run the teacher's deterministic sampler on the config's prompts and "
                                   "store noise / output pairs for method.regression_pairs (DMD).")
    p.add_argument("--config", "-c", required=True, metavar="PATH_OR_NAME", help="config file or name")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--num", required=True, type=int, metavar="N", help="number of pairs")
    p.add_argument("--steps", type=int, default=50, help="teacher sampling steps (default 50)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="sampling batch size (default: data.batch_size)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd_cache_pairs, parser=p)

    p = sub.add_parser("cache-embeddings", help="encode the config's prompts once with the teacher's text encoders "
                                                "(data.embeddings: a run then loads no text encoders)",
                       description="Encode every prompt a run of the config uses (data.prompts, "
                                   "train.sample_prompts, the captions of data.images, data.negative_prompt and "
                                   "the empty prompt) with the teacher's own text encoders and write them as "
                                   "safetensors shards with an index.json; train with data.embeddings=DIR.")
    p.add_argument("--config", "-c", required=True, metavar="PATH_OR_NAME", help="config file or name")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the config's data.embeddings)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="prompts per encoder call (default: data.batch_size, as the run encodes them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd_cache_embeddings, parser=p)

    p = sub.add_parser("demo", help="the offline main job: DMD2 on the shipped toy teacher, then evaluation",
                       description="Distil the shipped toy-sd teacher with DMD2 into a one-step generator "
                                   "(configs/toy/dmd2.yaml), export it and compare it with the teacher.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd_demo, parser=p)

    # Listed for --help only: main() hands everything after these names to their own parsers.
    for name, (help_text, _) in VERBATIM.items():
        sub.add_parser(name, help=help_text, add_help=False).add_argument("args", nargs=argparse.REMAINDER)
    return parser


# Subcommands with their own parsers: they get everything after their name verbatim (argparse's REMAINDER
# would reorder leading options). name -> (help, function of the remaining arguments).
VERBATIM = {
    "bench-train": ("benchmark training-step time and memory (see `stepdistill bench-train --help`)",
                    _cmd_bench_train),
    "bench": ("benchmark samplers: latency, throughput, memory and quality per entry "
              "(see `stepdistill bench --help`)", _cmd_bench),
    "eval": ("FID / KID, CLIP score and diversity of a pipeline, or a run against its teacher (see `stepdistill eval --help`)", _cmd_eval),
    "toy": ("toy-domain tools: train-teacher, train-classifier, eval", _cmd_toy),
    "plan": ("memory and FLOPs per GPU of a config's training iteration at its real size, run without weights "
             "(see `stepdistill plan --help`)",
             lambda argv: __import__("stepdistill.plan.cli", fromlist=["plan_main"]).plan_main(argv)),
    "results": ("add a run's metrics to results/, render or check docs/results.md (see `stepdistill results "
                "--help`)", lambda argv: __import__("stepdistill.results", fromlist=["results_main"]).results_main(argv)),
    "docs": ("render or check docs/configuration.md from the config dataclasses (see `stepdistill docs --help`)",
             lambda argv: __import__("stepdistill.results", fromlist=["docs_main"]).docs_main(argv)),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in VERBATIM:
        status = VERBATIM[argv[0]][1](argv[1:])
        if status:
            sys.exit(status)
        return status
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help(sys.stderr)
        sys.exit(2)
    if hasattr(args, "overrides"):
        collect_overrides(args.parser, args, extra)
    elif extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    status = args.func(args)
    if status:
        sys.exit(status)
    return status


if __name__ == "__main__":
    main()
