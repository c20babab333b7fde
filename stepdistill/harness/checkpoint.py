"""Checkpoints: ``accelerator.save_state`` into a temporary folder, renamed into place when complete.

A run folder holds ``checkpoints/checkpoint-<step>``; a crash mid-save leaves only a ``.tmp-`` folder
that is ignored and cleaned up, never a half-written checkpoint that ``resume=latest`` would pick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` → fresh run; ``latest`` → newest complete checkpoint (or fresh if none); else a folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "stepdistill_state.json").is_file():
        raise ValueError(
            f"train.resume={resume!r} is not a stepdistill checkpoint folder (no stepdistill_state.json); "
            f"use 'latest' or one of: {[str(p) for p in list_checkpoints(run_dir)] or 'none saved yet'}"
        )
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "stepdistill_state.json").read_text())


def save_checkpoint(accelerator, run_dir: str | Path, step: int, extra: dict, keep: int) -> Path | None:
    """Save the accelerator state for ``step`` (the next step to run) atomically; keep the last ``keep``."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"checkpoint-{step}"
    tmp = folder / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its RNG state; main writes the weights
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "stepdistill_state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
