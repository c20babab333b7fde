"""Where a metrics.json came from: when, from which code, by which command, on how many samples."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["git_commit", "provenance"]


def git_commit(path: str | Path | None = None) -> str | None:
    """The short hash of the commit checked out at ``path`` (default: this package's folder); None outside a
    git repository or without git."""
    folder = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(command: str, num_samples: int) -> dict:
    """``date`` (UTC, ISO 8601), ``git_commit`` (short hash or None), ``command``, ``num_samples``."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "command": command, "num_samples": int(num_samples)}
