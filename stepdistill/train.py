"""``train.py`` / ``stepdistill train``: load a config, check it, train.

    accelerate launch train.py --config dmd2_sdxl train.max_steps=2000 roles.generator.lr=1e-6
    python train.py --config configs/tests/tiny_dmd2.yaml --dryrun      # print the resolved config

``--config`` takes a YAML path or a bare name from configs/; trailing ``key=value`` arguments override
any key. ``--dryrun`` prints the fully resolved config (every role included) and exits before any
model is loaded. User errors (unknown keys, wrong types, missing files, a run folder that holds another
run, a resume that changes what cannot change) print ``error: ...`` and exit with status 2, without a
traceback. A run stopped to protect the user's work (a non-finite loss or gradient, a checkpoint that
could not be written) exits with status 3; SIGTERM / SIGINT checkpoint and exit 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from omegaconf import OmegaConf

__all__ = ["build_parser", "collect_overrides", "finish", "main", "parse_args", "run"]

_EPILOG = """\
overrides:
  key=value pairs after the options override the config, e.g.
    train.max_steps=100 data.batch_size=4 roles.critic.lr=1e-6 run.trackers=[none]
  values are parsed as YAML (1e-6 is a float, [a,b] a list, null is None).
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Distil a diffusion model into a few-step generator.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, metavar="PATH_OR_NAME",
                        help="YAML config file, or a config name from configs/ (e.g. dmd2_sdxl, tiny_dmd2)")
    parser.add_argument("--dryrun", "--dry-run", action="store_true",
                        help="print the fully resolved config and exit without loading any model")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def collect_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: Sequence[str]) -> None:
    """Merge the arguments parse_known_args left over into ``args.overrides``; reject non key=value ones.

    parse_known_args lets overrides come before, between or after the options; whatever is left and
    is not key=value (a mistyped option, a stray word) is a user error (exit 2 with the usage).
    """
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are key=value, "
                     f"e.g. train.max_steps=100)")
    args.overrides = [*args.overrides, *extra]
    bad = [a for a in args.overrides if "=" not in a or a.startswith("=")]
    if bad:
        parser.error(f"arguments {' '.join(repr(a) for a in bad)} are not key=value config overrides "
                     f"(e.g. train.max_steps=100)")


def parse_args(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> argparse.Namespace:
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    collect_overrides(parser, args, extra)
    return args


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Load + validate the config, then dry-run or train. Returns the process exit status."""
    from stepdistill.harness.preflight import validate_paths
    from stepdistill.runconfig import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dryrun:
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        validate_paths(cfg)
        from stepdistill.harness.preflight import preflight

        plan = preflight(cfg)  # the run folder and a resume, before any model loads
    except ValueError as e:
        return _fail(str(e))

    from stepdistill.harness.checkpoint import CheckpointWriteError
    from stepdistill.harness.guard import NonFiniteError
    from stepdistill.harness.trainer import Trainer
    from stepdistill.lifecycle import run as run_lifecycle

    try:
        trainer = Trainer(cfg)
        run_dir = run_lifecycle(trainer, plan)
    except ValueError as e:
        return _fail(str(e))
    except (NonFiniteError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        _close_process_group()
    if not trainer.accelerator.is_main_process:
        return 0
    if trainer.stopped_by:
        print(f"stopped by {trainer.stopped_by}: checkpoint written in {run_dir / 'checkpoints'}; "
              f"resume with train.resume=latest")
        return 0
    print(f"run folder: {run_dir}")
    return 0


def _close_process_group() -> None:
    """Leave the process group once the run is over, if ``Accelerator.end_training`` has not."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish(status: int) -> int:
    """``status``; a process of a multi-process launch (torchrun sets ``WORLD_SIZE``) ends here at once
    (``_exit_worker``)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_worker(status)
    return status


def _exit_worker(status: int) -> None:
    """End a process of a multi-process run without the interpreter's teardown.

    A process group's worker threads outlive ``destroy_process_group`` (a DDP wrapper, even deleted,
    keeps the group alive), and one that is still releasing the output tensors of the last collective (the final weight
    digests' all-gather) when the interpreter finalizes must take the GIL, which makes it exit mid
    C++ destructor: ``terminate called without an active exception``, SIGABRT, and the launcher reports a
    finished run as failed (1 run in 10 on gloo, seen in a core dump: ``ProcessGroupGloo::runLoop`` ->
    ``~AsyncAllgatherWork`` -> ``PyEval_RestoreThread`` during ``Py_FinalizeEx``). Everything the run
    makes is on disk before this point (checkpoints, export, DONE.json, trackers ended), so the process
    flushes its streams and logs and leaves with ``os._exit``."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``train.py``; exits the process with the status (0 ok, 2 user error)."""
    parser = build_parser(prog="train.py")
    args = parse_args(argv, parser)
    status = finish(run(args))
    if status:
        sys.exit(status)
    return status
