"""``python -m tests.golden --regenerate --reason "why" [tiny_dmd ...]``: rewrite golden trajectories.

Without names every ``configs/tests/tiny_*.yaml`` is regenerated. ``--reason`` is required and is
recorded in each file; the commit that changes numbers says why too. ``--check`` compares instead
of writing (what tests/test_golden.py does).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import golden  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--regenerate", action="store_true", help="run and write tests/golden/<config>.json")
    mode.add_argument("--check", action="store_true", help="run and compare with the stored files")
    mode.add_argument("--emit", metavar="JSON", help=argparse.SUPPRESS)  # the subprocess of run_portable
    parser.add_argument("--reason", help="why the numbers change (required with --regenerate; stored)")
    parser.add_argument("configs", nargs="*", help="config names (default: every configs/tests/tiny_*.yaml)")
    args = parser.parse_args(argv)
    known = golden.config_names()
    names = [Path(n).stem for n in args.configs] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"error: no configs/tests/{unknown[0]}.yaml; choose from: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.regenerate and not (args.reason or "").strip():
        print('error: --regenerate needs --reason "why the numbers change" (recorded in each file)',
              file=sys.stderr)
        return 2
    if args.emit:
        golden.emit(names, Path(args.emit))
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="golden_") as tmp:
        runs = golden.run_portable(names, Path(tmp))
    for name in names:
        steps = runs[name]
        if isinstance(steps, str):
            print(f"{name}: the run failed:\n{steps}")
            failed += 1
            continue
        if args.regenerate:
            print(f"wrote {golden.write(name, steps, args.reason.strip()).relative_to(golden.REPO)}")
            continue
        path = golden.golden_path(name)
        if not path.exists():
            print(f"{name}: no {path.relative_to(golden.REPO)}; create it with {golden.REGENERATE}")
            failed += 1
            continue
        problem = golden.first_mismatch(name, golden.stored(name)["steps"], steps)
        print(problem or f"{name}: ok")
        failed += problem is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
