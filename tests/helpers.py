"""Shared helpers for the tests: tiny configs, training runs, weight snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, method: str = "dmd2", *overrides: str):
    """The tiny test config of ``method`` (configs/tests/tiny_<method>.yaml), writing into ``tmp_path``."""
    from stepdistill.runconfig import load_config

    return load_config(
        f"tests/tiny_{method}",
        [f"run.output_dir={tmp_path}", "run.trackers=[none]", "train.progress_bar=false", *overrides],
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    after = module.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def run(cmd: list[str], cwd: Path = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


PYTHON = sys.executable
