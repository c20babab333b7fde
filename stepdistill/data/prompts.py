"""Prompt sources and a deterministic, resumable, rank-aware prompt sampler.

``load_prompts`` reads prompts from a text, CSV/TSV, JSON/JSONL (incl. COCO captions) or Parquet
file, or a builtin set. ``InfinitePromptLoader`` hands out the batch of any training step as a pure
function of ``(seed, step, rank)``: a resumed run sees exactly the prompts an uninterrupted run would
have seen, without saving loader state, and the ranks of one step get disjoint prompts.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = [
    "BUILTIN_PROMPTS",
    "SUPPORTED_EXTENSIONS",
    "load_prompts",
    "PromptDataset",
    "InfinitePromptLoader",
    "infinite_prompt_loader",
]

# Small fixed prompt sets, addressed as "builtin:<name>". "tiny" matches the toy domain's captions
# (coloured shapes at a position) and is what the test configs use.
BUILTIN_PROMPTS: dict[str, tuple[str, ...]] = {
    "tiny": (
        "a red circle at the top left",
        "a blue square at the bottom right",
        "a green triangle in the center",
        "a yellow circle at the bottom left",
        "a purple square at the top right",
        "an orange triangle at the top left",
        "a white circle in the center",
        "a cyan square at the bottom left",
    ),
}


def _toy(split: str) -> tuple[str, ...]:
    from stepdistill.toy.data import eval_prompts

    return tuple(eval_prompts(split))


# The toy domain's captions (stepdistill/toy/data.py): its training combinations, all of them, and
# the held-out ones that no toy teacher saw in training.
BUILTIN_PROMPTS["toy"] = _toy("train")
BUILTIN_PROMPTS["toy_all"] = _toy("all")
BUILTIN_PROMPTS["toy_held_out"] = _toy("held_out")

SUPPORTED_EXTENSIONS = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet")


def load_prompts(source: str, caption_column: str = "caption") -> list[str]:
    """Read prompts from ``source``; raises ValueError with the fix for every user error.

    - ``builtin:<name>``: a fixed set (``builtin:tiny``: 8 short prompts for tests).
    - ``.txt``: one prompt per line, blank lines skipped.
    - ``.csv`` / ``.tsv``: the ``caption_column`` column.
    - ``.jsonl``: one JSON string, or object with ``caption_column``, per line.
    - ``.json``: a list of strings, a list of objects with ``caption_column``, an object holding such a
      list under ``caption_column``, or a COCO captions file (``annotations[*].caption``).
    - ``.parquet``: the ``caption_column`` column (needs pandas or pyarrow).
    """
    source = str(source)
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_PROMPTS:
            raise ValueError(f"unknown builtin prompt set {source!r}; choose one of: "
                             f"{', '.join('builtin:' + k for k in BUILTIN_PROMPTS)}")
        return list(BUILTIN_PROMPTS[name])

    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"prompt file {source!r} not found (working directory: {Path.cwd()}); give a "
                         f"{'/'.join(SUPPORTED_EXTENSIONS)} file or builtin:tiny")
    if path.is_dir():
        raise ValueError(f"prompt source {source!r} is a directory; give a file "
                         f"({', '.join(SUPPORTED_EXTENSIONS)}) or builtin:tiny")
    ext = path.suffix.lower()
    readers = {
        ".txt": _read_txt,
        ".csv": lambda p, c: _read_delimited(p, c, ","),
        ".tsv": lambda p, c: _read_delimited(p, c, "\t"),
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".parquet": _read_parquet,
    }
    if ext not in readers:
        raise ValueError(f"prompt file {source!r} has an unsupported extension {ext or '(none)'!r}; "
                         f"supported: {', '.join(SUPPORTED_EXTENSIONS)} or builtin:<name>")
    try:
        prompts = readers[ext](path, caption_column)
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {source!r} is not UTF-8 text ({e.reason} at byte {e.start}: "
                         f"{e.object[max(0, e.start - 10):e.end + 10]!r}); save it as UTF-8 "
                         f"(e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix})") from None
    if not prompts:
        raise ValueError(f"prompt file {source!r} contains no prompts")
    return prompts


def _clean(values: Any) -> list[str]:
    """Strip, drop empty/None/NaN values, and turn the rest into strings."""
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        text = str(v).strip()
        if text:
            out.append(text)
    return out


def _read_txt(path: Path, caption_column: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return _clean(f.read().splitlines())


def _missing_column(path: Path, column: str, available: Sequence[str]) -> ValueError:
    cols = ", ".join(repr(c) for c in available) if available else "(none)"
    return ValueError(f"prompt file {str(path)!r} has no column {column!r}; available columns: {cols} "
                      f"(set data.caption_column)")


def _read_delimited(path: Path, caption_column: str, delimiter: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        if caption_column not in header:
            raise _missing_column(path, caption_column, header)
        return _clean(row.get(caption_column) for row in reader)


def _from_records(path: Path, records: Sequence[Any], caption_column: str, where: str) -> list[str]:
    """Prompts from a list whose items are strings or objects holding ``caption_column``."""
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            out.append(rec)
        elif isinstance(rec, dict):
            if caption_column not in rec:
                raise ValueError(f"prompt file {str(path)!r}: {where} item {i} has no column {caption_column!r}; "
                                 f"available columns: {', '.join(map(repr, rec)) or '(none)'} "
                                 f"(set data.caption_column)")
            out.append(rec[caption_column])
        else:
            raise ValueError(f"prompt file {str(path)!r}: {where} item {i} is a {type(rec).__name__}; "
                             f"expected a string or an object with a {caption_column!r} key")
    return _clean(out)


def _read_jsonl(path: Path, caption_column: str) -> list[str]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"prompt file {str(path)!r}, line {lineno}: invalid JSON ({e.msg})") from None
    return _from_records(path, records, caption_column, "line")


def _read_json(path: Path, caption_column: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"prompt file {str(path)!r}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if isinstance(data, list):
        return _from_records(path, data, caption_column, "list")
    if isinstance(data, dict):
        # COCO captions (captions_train2014.json ...): {"annotations": [{"caption": ...}, ...]}
        if isinstance(data.get("annotations"), list):
            return _from_records(path, data["annotations"], caption_column, "annotations")
        if isinstance(data.get(caption_column), list):
            return _from_records(path, data[caption_column], caption_column, caption_column)
        raise ValueError(f"prompt file {str(path)!r} is a JSON object without an 'annotations' list (COCO) "
                         f"or a {caption_column!r} list; top-level keys: {', '.join(map(repr, data)) or '(none)'}")
    raise ValueError(f"prompt file {str(path)!r} holds a JSON {type(data).__name__}; expected a list of "
                     f"prompts or objects, or a COCO captions object")


def _read_parquet(path: Path, caption_column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        names = pq.read_schema(path).names
        if caption_column not in names:
            raise _missing_column(path, caption_column, names)
        return _clean(pq.read_table(path, columns=[caption_column]).column(caption_column).to_pylist())
    try:
        import pandas as pd
    except ImportError:
        raise ValueError(f"reading {str(path)!r} needs pyarrow (or pandas with a parquet engine): "
                         f"pip install pyarrow; or convert the prompts to .txt/.csv/.jsonl") from None
    frame = pd.read_parquet(path)
    if caption_column not in frame.columns:
        raise _missing_column(path, caption_column, list(frame.columns))
    return _clean(frame[caption_column].tolist())


class PromptDataset(Dataset):
    """A map-style dataset over a list of prompts (item ``i`` is the prompt string)."""

    def __init__(self, prompts: Sequence[str]) -> None:
        if len(prompts) == 0:
            raise ValueError("PromptDataset needs at least one prompt")
        self.prompts = list(prompts)

    @classmethod
    def from_source(cls, source: str, caption_column: str = "caption") -> PromptDataset:
        return cls(load_prompts(source, caption_column))

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]


class InfinitePromptLoader:
    """Deterministic, resumable, rank-aware batches of prompts: ``batch_for_step(step)``.

    Sampling without replacement, epoch by epoch: epoch ``e`` is a random permutation of the prompt
    indices drawn from a ``torch.Generator`` seeded by ``(seed, e)`` (repeated ``k`` times when the
    global batch ``batch_size * world_size`` exceeds the number of prompts). Each step takes the next
    contiguous chunk of ``batch_size * world_size`` positions of the epoch, and rank ``r`` gets the
    ``r``-th slice of it; the tail of an epoch too short for a whole step is skipped (like
    ``drop_last``). So the ranks of one step get disjoint prompts (unless the global batch is larger
    than the prompt set, where repeats are unavoidable), no prompt repeats within an epoch, and the
    batch of any step is computed directly from the step index.
    """

    def __init__(self, prompts: Sequence[str], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if len(prompts) == 0:
            raise ValueError("the prompt loader needs at least one prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        n = len(self.prompts)
        global_batch = batch_size * world_size
        # Repeat the permutation when one epoch cannot fill a single global batch (tiny prompt sets).
        self.repeats = max(1, math.ceil(global_batch / n))
        self.epoch_length = self.repeats * n
        self.steps_per_epoch = self.epoch_length // global_batch
        self._cached: tuple[int, torch.Tensor] | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The order of prompt indices in ``epoch``, a pure function of (seed, epoch)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        n = len(self.prompts)
        parts = []
        for k in range(self.repeats):
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch, k))
            parts.append(torch.randperm(n, generator=gen))
        order = torch.cat(parts)
        self._cached = (epoch, order)
        return order

    def indices_for_step(self, step: int, rank: int | None = None) -> list[int]:
        """Prompt indices of generator step ``step`` for ``rank`` (default: this loader's rank)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        rank = self.rank if rank is None else rank
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        start = (step_in_epoch * self.world_size + rank) * self.batch_size
        return self._epoch_order(epoch)[start:start + self.batch_size].tolist()

    def batch_for_step(self, step: int, rank: int | None = None) -> list[str]:
        """The prompts of generator step ``step`` for ``rank`` (default: this loader's rank)."""
        return [self.prompts[i] for i in self.indices_for_step(step, rank)]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def iter_from(self, start_step: int = 0) -> Iterator[list[str]]:
        """Batches of steps ``start_step, start_step + 1, ...`` (for resuming at ``start_step``)."""
        step = start_step
        while True:
            yield self.batch_for_step(step)
            step += 1

    def __iter__(self) -> Iterator[list[str]]:
        return self.iter_from(0)


def _mix(seed: int, epoch: int, repeat: int) -> int:
    """A 63-bit generator seed from (seed, epoch, repeat); distinct tuples give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + repeat * 0x94D049BB133111EB) & (2**64 - 1)
    # splitmix64 finaliser: spreads nearby inputs over the whole range.
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def infinite_prompt_loader(prompts: Sequence[str], batch_size: int, seed: int = 0, rank: int = 0,
                           world_size: int = 1) -> InfinitePromptLoader:
    """An ``InfinitePromptLoader``; use ``loader.batch_for_step(step)`` each generator step."""
    return InfinitePromptLoader(prompts, batch_size, seed=seed, rank=rank, world_size=world_size)
