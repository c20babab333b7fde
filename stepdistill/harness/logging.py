"""Metrics that exist without any tracker: JSONL and CSV curves in the run folder, sample grids."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("stepdistill")


def _read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line a crash cut short (or any unreadable one) is dropped with a warning."""
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif line.strip():
            logger.warning("%s line %d is incomplete or unreadable (an interrupted write?); dropped", path, number)
    return rows


class MetricsWriter:
    """Append-only ``metrics.jsonl`` and ``metrics.csv`` (columns grow as new keys appear)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        if resume_step is not None and self.jsonl.exists():
            # Drop rows the resumed run is about to write again (they came after the checkpoint).
            kept = [r for r in _read_rows(self.jsonl) if r["step"] < resume_step]
            self.rows = kept
            self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.jsonl.exists():
            self.jsonl.unlink()
        self._write_csv()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()

    def _write_csv(self) -> None:
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys or ["step"])
            writer.writeheader()
            writer.writerows(self.rows)


def image_grid(images: torch.Tensor, rows: int | None = None) -> Image.Image:
    """[N, 3, H, W] images in [-1, 1] → one PIL grid image."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, _, h, w = images.shape
    rows = rows or max(1, int(math.sqrt(n)))
    cols = math.ceil(n / rows)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i].permute(1, 2, 0).numpy()
    return Image.fromarray(grid)
