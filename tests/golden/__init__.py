"""Golden loss trajectories: the runner behind tests/test_golden.py and ``python -m tests.golden``.

For every ``configs/tests/tiny_*.yaml`` a seeded short CPU run (``Trainer(cfg).train()`` in-process, a
fresh empty run folder each time) logs its per-step losses to ``<run>/metrics.jsonl``; the tracked keys
(``*loss``, ``*/loss*``, ``grad_norm/*``) of every step are stored in ``tests/golden/<config>.json``.
Nothing here reads harness internals beyond ``Trainer(cfg).train()`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import datetime
import json
import tempfile
from pathlib import Path

import torch

from stepdistill.data.pairs import cache_pairs
from stepdistill.harness.trainer import Trainer
from stepdistill.runconfig import load_config

GOLDEN_DIR = Path(__file__).resolve().parent
REPO = GOLDEN_DIR.parents[1]
CONFIG_DIR = REPO / "configs" / "tests"
REGENERATE = 'python -m tests.golden --regenerate --reason "<why the numbers change>"'
ABS_TOL = REL_TOL = 1e-6

# Steps per run: every phase of every method runs at least twice (TTUR generators on steps 0, 2, 4; Phased
# DMD's two stages on steps 0-1 and 2-5).
STEPS = 6
# Overrides of every run: no trackers, samples, export or evaluation; one CPU thread; a metrics row a step.
# The configs' checkpoints (every 2 steps) stay: saving one must not change a number. {run_dir} per run.
COMMON = [
    "run.output_dir={run_dir}", "run.trackers=[none]", "train.progress_bar=false", f"train.max_steps={STEPS}",
    "train.log_every=1", "train.sample_every=0", "train.cpu_threads=1", "export.enabled=false",
    "eval.enabled=false",
]
# Per-config extras. DMD's regression term reads teacher pairs (cache-pairs): made fresh for each run.
EXTRA = {"tiny_dmd": ["method.regression_pairs={pairs}"]}
PAIRS = {"num": 4, "steps": 2, "batch_size": 2}


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("tiny_*.yaml"))


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def overrides(name: str) -> list[str]:
    """The overrides of ``name``'s run, with ``{run_dir}`` / ``{pairs}`` placeholders (as stored)."""
    return COMMON + EXTRA.get(name, [])


def tracked(key: str) -> bool:
    return key.endswith("loss") or "/loss" in key or key.startswith("grad_norm/")


def _fresh_dir(root: Path, prefix: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def _pairs(root: Path) -> Path:
    out = _fresh_dir(root, "pairs_")
    cfg = load_config(CONFIG_DIR / "tiny_dmd.yaml", [f"run.output_dir={_fresh_dir(root, 'pairs_run_')}",
                                                    "run.trackers=[none]"])
    return cache_pairs(cfg, out / "pairs", **PAIRS)


def run(name: str, root: Path) -> list[dict]:
    """Train ``name`` once into a fresh folder under ``root``; ``[{"step": k, "losses": {key: value}}]``."""
    run_dir = _fresh_dir(root, f"{name}_")
    # One CPU thread for everything the run computes, the teacher pairs included (a float sum over 2 threads
    # differs from one over 1 in the last bits): the numbers then do not depend on what ran before in the process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pairs = _pairs(root) if "{pairs}" in " ".join(overrides(name)) else None
        cfg = load_config(CONFIG_DIR / f"{name}.yaml",
                          [o.format(run_dir=run_dir, pairs=pairs) for o in overrides(name)])
        Trainer(cfg).train()
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "losses": {k: v for k, v in r.items() if tracked(k)}} for r in rows]


def write(name: str, steps: list[dict], reason: str) -> Path:
    path = golden_path(name)
    record = {
        "config": f"configs/tests/{name}.yaml", "overrides": overrides(name), "torch": torch.__version__,
        "reason": reason, "generated": datetime.date.today().isoformat(), "steps": steps,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def stored(name: str) -> dict:
    return json.loads(golden_path(name).read_text())


def close(stored: float, now: float) -> bool:
    """Within abs + rel tolerance (equal infinities match; a NaN never does)."""
    return stored == now or abs(now - stored) <= ABS_TOL + REL_TOL * abs(stored)


def first_mismatch(name: str, stored: list[dict], now: list[dict]) -> str | None:
    """The first (step, key) where ``now`` differs from ``stored``, as a message; None if all match.
    Keys only ``now`` has are fine; a stored step or key missing now is a mismatch."""
    by_step = {row["step"]: row["losses"] for row in now}
    for row in stored:
        step, losses = row["step"], row["losses"]
        if step not in by_step:
            return f"{name}: step {step} is stored but the run logged no row for it (steps now: {sorted(by_step)})"
        for key, value in losses.items():
            if key not in by_step[step]:
                return f"{name}: step {step}: stored key {key!r} is missing now (keys now: {sorted(by_step[step])})"
            if not close(value, by_step[step][key]):
                return (f"{name}: step {step}: {key}: stored {value!r}, now {by_step[step][key]!r} "
                        f"(tolerance {ABS_TOL:g} + {REL_TOL:g} * |stored|)")
    return None
