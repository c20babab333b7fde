"""Shared helpers for the tests: tiny configs, training runs, weight snapshots."""

from __future__ import annotations

import os
import socket
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


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_free_port(cmd: list[str]) -> list[str]:
    """``cmd`` with its own rendezvous port after ``accelerate.commands.launch`` (unless it names one): two
    launches at once (a helper's next to the suite's) would otherwise meet on accelerate's default 29500."""
    if "accelerate.commands.launch" not in cmd or "--main_process_port" in cmd:
        return cmd
    at = cmd.index("accelerate.commands.launch") + 1
    return [*cmd[:at], "--main_process_port", str(free_port()), *cmd[at:]]


def run(cmd: list[str], cwd: Path = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    cmd = with_free_port(cmd)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


PYTHON = sys.executable


def allocator_peak(prof, after: str | None = None) -> int:
    """The CPU allocator's own peak over a ``torch.profiler.profile(profile_memory=True)`` block: every
    allocation and free in time order; with ``after``, only from the start of that profiler range on (the
    bytes allocated before it still count as live)."""
    events = prof.profiler.kineto_results.events()
    start = min(e.start_ns() for e in events if e.name() == after) if after else None
    live = peak = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        if start is None or event.start_ns() >= start:
            peak = max(peak, live)
    return peak


def png_bytes(seed: int, size: int = 32) -> bytes:
    """A random RGB image of ``size`` px as PNG bytes (the same bytes for the same seed)."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def add_to_tar(tar, name: str, data: bytes) -> None:
    """One member ``name`` holding ``data`` in an open ``tarfile.TarFile`` (a webdataset sample's part)."""
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
