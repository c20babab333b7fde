"""Golden loss trajectories: the runner behind tests/test_golden.py and ``python -m tests.golden``.

For every ``configs/tests/tiny_*.yaml`` a seeded short CPU run (``Trainer(cfg).train()`` in-process, a
fresh empty run folder each time) logs its per-step losses to ``<run>/metrics.jsonl``; the tracked keys
(``*loss``, ``*/loss*``, ``grad_norm/*``) of every step are stored in ``tests/golden/<config>.json``.
Nothing here reads harness internals beyond ``Trainer(cfg).train()`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import traceback
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
# The runs use the kernels every x86-64 CPU executes alike: ATen's baseline (no AVX2 / AVX-512 dispatch),
# MKL's conditional numerical reproducibility and oneDNN capped at SSE4.1. The native kernels of an
# AVX-512 machine and an AVX2 one differ in the last bits, which 6 training steps grow past 1e-6 (seen:
# the files written on one machine failed on the next). Read once, when torch first runs an op: the runs
# go to a subprocess (``run_portable``), which builds its own tiny pipelines with the same kernels.
PORTABLE_ARITHMETIC = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}


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


def emit(names: list[str], out: Path) -> None:
    """Run ``names`` in this process (started by ``run_portable``) and write ``{name: steps | error}``."""
    wrong = {k: os.environ.get(k) for k, v in PORTABLE_ARITHMETIC.items() if os.environ.get(k) != v}
    if wrong or torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        raise RuntimeError(f"golden runs need the portable kernels {PORTABLE_ARITHMETIC}; this process has {wrong}")
    results: dict[str, list[dict] | str] = {}
    with tempfile.TemporaryDirectory(prefix="golden_") as tmp:
        for name in names:
            try:
                results[name] = run(name, Path(tmp))
            except Exception:  # reported by that config's test, the others still run
                results[name] = traceback.format_exc()
    out.write_text(json.dumps(results))


def run_portable(names: list[str], root: Path) -> dict[str, list[dict] | str]:
    """Train each of ``names`` (``run``) in one subprocess with ``PORTABLE_ARITHMETIC``; per name its steps,
    or the traceback of its failure."""
    root.mkdir(parents=True, exist_ok=True)
    out = root / "golden_runs.json"
    # Its own tiny pipelines, built there with the same kernels (random init rounds like the rest).
    env = {**os.environ, **PORTABLE_ARITHMETIC, "STEPDISTILL_CACHE": str(root / "stepdistill_cache")}
    done = subprocess.run([sys.executable, "-m", "tests.golden", "--emit", str(out), *names], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"the golden runs failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-5000:]}")
    return json.loads(out.read_text())


def write(name: str, steps: list[dict], reason: str) -> Path:
    path = golden_path(name)
    record = {
        "config": f"configs/tests/{name}.yaml", "overrides": overrides(name), "torch": torch.__version__,
        "arithmetic": PORTABLE_ARITHMETIC,
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
