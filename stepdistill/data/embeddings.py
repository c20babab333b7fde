"""The text-embedding cache: every prompt of a run encoded once by the teacher's own text encoders.

``stepdistill cache-embeddings --config X --out DIR`` encodes the prompts a run will ask for (``run_prompts``:
``data.prompts``, ``train.sample_prompts``, the captions of ``data.images`` and of
``method.regression_pairs``, and the empty prompt) and the unconditional conditionings classifier-free
guidance uses (``data.negative_prompt`` and ``""``), and writes them to ``DIR``:

* ``shard-00000.safetensors``, ... : one stacked tensor per ``Conditioning`` field (``encoder_hidden_states``,
  ``text_embeds``, ``time_ids``, ``pooled_projections``, ``txt_ids``: whatever the family produces), one row
  per prompt, in the dtype the encoders produced; the cache's metadata is in each shard's header too;
* ``index.json``: the metadata (teacher, family, resolution, T5 length, dtype, fields, a hash of the prompt
  list, the command that made it) and ``prompts`` / ``negatives``: prompt text -> ``[shard, row]``.

With ``data.embeddings: DIR`` a run's ``Teacher`` answers ``encode_prompt`` / ``encode_negative`` from here
and is loaded without its text encoders (``models/loading.py``). Shards are read with ``safetensors``' memory
map, one row at a time, so a cache larger than memory (FLUX's T5 rows are 4 MiB each) costs no RAM.

This module stores and reads tensors only; it knows no model (``EmbeddingCache.lookup`` returns plain
``{field: Tensor}`` dicts, ``write_embedding_cache`` takes the encoding functions).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "stepdistill-embeddings"
VERSION = 1
INDEX = "index.json"
SHARD = "shard-{:05d}.safetensors"
SHARD_BYTES = 1 << 30  # about 1 GiB of rows per shard
# The metadata a run's teacher must match (preflight and ``EmbeddingCache.check``).
MATCHED = ("teacher", "family", "resolution", "max_sequence_length")

__all__ = ["EmbeddingCache", "INDEX", "prompt_hash", "rebuild_command", "run_prompts", "teacher_id",
           "write_embedding_cache"]


# ---- what a run encodes -------------------------------------------------------------------------------
def _image_captions(images: str | None, image_column: str = "image", caption_column: str = "caption") -> list[str]:
    """The captions ``data.images`` feeds the teacher's ``encode_prompt`` (``data/images.py RealLatents``)."""
    if not images:
        return []
    if str(images) == "builtin:toy":
        from stepdistill.data.prompts import BUILTIN_PROMPTS

        return list(BUILTIN_PROMPTS["toy"])  # the toy training combinations sample_batch draws from
    from stepdistill.data.sources import open_source

    source = open_source(str(images), image_column, caption_column)  # None: the two formats read below
    if source is not None:
        return _stream_captions(source)
    folder = Path(str(images)).expanduser()
    if (folder / "prompts.json").is_file() and (folder / "pairs.safetensors").is_file():
        return [str(p) for p in json.loads((folder / "prompts.json").read_text())]
    from stepdistill.data.images import read_metadata

    return read_metadata(folder)[1]


def _stream_captions(source) -> list[str]:
    """Every caption of a streamed ``data.images`` (``data/sources.py``), as its ``Reader`` gives them to the
    run, in the source's stored order; only the caption column or the caption members are read (no image)."""
    from stepdistill.data.sources import Reader

    reader = Reader(source)
    return [caption for unit in source.units for caption in reader.captions(unit)]


def run_prompts(cfg) -> tuple[list[str], list[str]]:
    """``(prompts, negatives)`` a run of ``cfg`` encodes, each in first-seen order without repeats.

    prompts: ``data.prompts``, ``train.sample_prompts`` (default: the first prompts, already in), the
    captions of ``data.images`` (every format: an image folder's metadata.jsonl, a cache-pairs folder,
    builtin:toy, and the streamed ones, read caption by caption without their images) and of
    ``method.regression_pairs``, and ``""`` (the empty prompt). negatives
    (the unconditional batch of CFG, ``Teacher.encode_negative``): ``""`` and ``data.negative_prompt``.
    """
    from stepdistill.data.prompts import load_prompts

    prompts = list(load_prompts(str(cfg.data.prompts), cfg.data.caption_column))
    prompts += [str(p) for p in (cfg.train.sample_prompts or [])]
    prompts += _image_captions(cfg.data.images, cfg.data.image_column, cfg.data.caption_column)
    pairs = cfg.method.get("regression_pairs") if cfg.get("method") is not None else None
    if pairs and (Path(str(pairs)).expanduser() / "prompts.json").is_file():
        prompts += [str(p) for p in json.loads((Path(str(pairs)).expanduser() / "prompts.json").read_text())]
    prompts.append("")
    negatives = ["", str(cfg.data.negative_prompt or "")]
    return list(dict.fromkeys(prompts)), list(dict.fromkeys(negatives))


def prompt_hash(prompts: Iterable[str], negatives: Iterable[str]) -> str:
    """SHA-256 of the sorted prompt and negative sets (the order a cache was written in does not count)."""
    text = json.dumps({"prompts": sorted(set(prompts)), "negatives": sorted(set(negatives))}, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def teacher_id(pretrained: str) -> str:
    """``model.pretrained`` as the cache records it: the absolute path of a local folder, else the name
    (``tiny:<family>``, ``toy-sd``, a Hub id) as written."""
    pretrained = str(pretrained)
    if pretrained.startswith("tiny:") or (pretrained.startswith("toy-") and "/" not in pretrained):
        return pretrained  # named teachers (models/loading.py resolve_pretrained): the name is the identity
    expanded = Path(pretrained).expanduser()
    return str(expanded.resolve()) if expanded.is_dir() else pretrained


def rebuild_command(folder: str | Path, config: str | None = None, overrides: Sequence[str] = ()) -> str:
    """The command that (re)builds the cache ``folder`` (``config``: as it was given to the command)."""
    import shlex

    words = ["stepdistill", "cache-embeddings", "--config", config or "<your config>", "--out", str(folder),
             *overrides]
    return " ".join(w if w == "<your config>" else shlex.quote(w) for w in words)


# ---- writing --------------------------------------------------------------------------------------------
class _ShardWriter:
    """Rows of ``{field: Tensor[1, ...]}`` into ``shard-NNNNN.safetensors`` files of about ``shard_bytes``."""

    def __init__(self, folder: Path, shard_bytes: int, metadata: dict[str, str]):
        self.folder, self.shard_bytes, self.metadata = folder, shard_bytes, metadata
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.pending_bytes = self.pending_rows = 0
        self.shards: list[str] = []
        self.fields: dict[str, dict] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        """Append a batch; returns ``(shard, first row)`` of its first row (the rest follow in order)."""
        fields = {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
                  for k, t in tensors.items()}
        if not self.fields:
            self.fields = fields
        elif fields != self.fields:
            raise ValueError(f"the teacher's conditioning changed between batches: {self.fields} then {fields}")
        where = (len(self.shards), self.pending_rows)
        for k, t in tensors.items():
            self.rows.setdefault(k, []).append(t.detach().to("cpu").contiguous())
            self.pending_bytes += t.numel() * t.element_size()
        self.pending_rows += next(iter(tensors.values())).shape[0]
        return where

    def full(self) -> bool:
        return self.pending_bytes >= self.shard_bytes

    def flush(self) -> None:
        if not self.rows:
            return
        name = SHARD.format(len(self.shards))
        save_file({k: torch.cat(v).contiguous() for k, v in self.rows.items()}, str(self.folder / name),
                  metadata=self.metadata)
        self.shards.append(name)
        self.rows, self.pending_bytes, self.pending_rows = {}, 0, 0


def write_embedding_cache(out: str | Path, encode: Callable[[list[str]], dict[str, torch.Tensor]],
                          encode_negative: Callable[[str], dict[str, torch.Tensor]], prompts: Sequence[str],
                          negatives: Sequence[str], meta: dict, batch_size: int = 16,
                          shard_bytes: int = SHARD_BYTES, progress: bool = True) -> Path:
    """Encode ``prompts`` (``encode(batch) -> {field: Tensor[B, ...]}``) and ``negatives``
    (``encode_negative(text) -> {field: Tensor[1, ...]}``) and write the cache folder ``out``.

    ``meta`` (teacher, family, resolution, max_sequence_length, config, ...) goes into ``index.json`` and
    every shard's header, with the fields, their dtype, the counts and ``prompt_hash``. The folder is written
    beside ``out`` and moved into place whole: ``out`` may be new, empty or an earlier cache (replaced).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file; give a new folder (or an earlier cache)")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX).is_file():
        raise ValueError(f"--out {str(out)!r} holds other files and no embedding cache ({INDEX}); the cache "
                         "replaces its folder whole, so give a new folder (or an earlier cache to replace)")
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} must be >= 1")
    prompts, negatives = list(dict.fromkeys(prompts)), list(dict.fromkeys(negatives))
    meta = {**meta, "prompt_hash": prompt_hash(prompts, negatives), "num_prompts": len(prompts),
            "num_negatives": len(negatives)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.writing-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, shard_bytes, {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}})
        index: dict[str, dict[str, list[int]]] = {"prompts": {}, "negatives": {}}

        def place(kind: str, texts: list[str], tensors: dict[str, torch.Tensor]) -> None:
            n = {t.shape[0] for t in tensors.values()}
            if n != {len(texts)}:
                raise ValueError(f"the encoder returned {sorted(n)} rows for {len(texts)} prompts")
            shard, row = writer.add(tensors)
            for i, text in enumerate(texts):
                index[kind][text] = [shard, row + i]
            if writer.full():
                writer.flush()

        with torch.no_grad():
            for text in negatives:
                place("negatives", [text], encode_negative(text))
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(prompts), desc="text embeddings", unit="prompt")
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                place("prompts", batch, encode(batch))
                if bar is not None:
                    bar.update(len(batch))
            if bar is not None:
                bar.close()
        writer.flush()
        record = {"format": FORMAT, "version": VERSION, "meta": {**meta, "fields": writer.fields},
                  "shards": writer.shards, **index}
        (tmp / INDEX).write_text(json.dumps(record, indent=1, ensure_ascii=False))
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- reading --------------------------------------------------------------------------------------------
class EmbeddingCache:
    """A cache folder opened for lookups: ``lookup(prompts)`` and ``negative(text)`` give ``{field: Tensor}``
    (on the CPU, in the stored dtype). Shards are memory-mapped on first use."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        index = self.folder / INDEX
        if not index.is_file():
            what = "holds no embedding cache (no index.json)" if self.folder.is_dir() else "not found"
            raise ValueError(f"data.embeddings={str(folder)!r}: {what}; make the cache with "
                             f"`{rebuild_command(folder)}`")
        try:
            record = json.loads(index.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{index} is not JSON ({e}); rebuild the cache with `{rebuild_command(folder)}`") from None
        if record.get("format") != FORMAT or record.get("version") != VERSION:
            raise ValueError(f"{index} is not a version-{VERSION} stepdistill embedding cache "
                             f"(format {record.get('format')!r}, version {record.get('version')!r}); rebuild it "
                             f"with `{rebuild_command(folder)}`")
        self.meta: dict = record["meta"]
        self.shards: list[str] = record["shards"]
        self.prompts: dict[str, list[int]] = record["prompts"]
        self.negatives: dict[str, list[int]] = record["negatives"]
        missing = [s for s in self.shards if not (self.folder / s).is_file()]
        if missing:
            raise ValueError(f"data.embeddings={str(folder)!r}: {INDEX} lists shards that are missing "
                             f"({', '.join(missing[:3])}); rebuild the cache with `{self.rebuild}`")
        self._handles: dict[int, object] = {}

    @property
    def rebuild(self) -> str:
        return rebuild_command(self.folder, self.meta.get("config"), self.meta.get("overrides") or ())

    @property
    def fields(self) -> dict[str, dict]:
        return self.meta["fields"]

    def mismatches(self, **expected) -> list[str]:
        """``"key: cache X, run Y"`` for each of ``expected`` (teacher, family, resolution, ...) that differs."""
        out = []
        for key, value in expected.items():
            if key == "teacher":
                value = teacher_id(value)
            if self.meta.get(key) != value:
                out.append(f"{key}: cache {self.meta.get(key)!r}, run {value!r}")
        return out

    def check(self, **expected) -> None:
        """ValueError naming every mismatch of ``expected`` with the cache's metadata, and the fix."""
        bad = self.mismatches(**expected)
        if bad:
            raise ValueError(f"data.embeddings={str(self.folder)!r} was made for another teacher setting "
                             f"({'; '.join(bad)}); rebuild it for this run with `{self.rebuild}` (and another "
                             "--out), or point data.embeddings at the cache made for this teacher")

    def missing(self, prompts: Iterable[str], negatives: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        return ([p for p in dict.fromkeys(prompts) if p not in self.prompts],
                [n for n in dict.fromkeys(negatives) if n not in self.negatives])

    def missing_error(self, kind: str, missing: list[str]) -> ValueError:
        shown = ", ".join(repr(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        what = "negative prompt" if kind == "negatives" else "prompt"
        return ValueError(f"{what}{'s' if len(missing) > 1 else ''} {shown} not in the embedding cache "
                          f"data.embeddings={str(self.folder)!r} ({len(self.prompts)} prompts, "
                          f"{len(self.negatives)} negatives); rebuild it with `{self.rebuild}` (it encodes "
                          "data.prompts, train.sample_prompts, the captions of data.images and "
                          "data.negative_prompt), or leave data.embeddings unset to encode live")

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / self.shards[shard]), framework="pt", device="cpu")
        return self._handles[shard]

    def _rows(self, kind: str, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        table = self.prompts if kind == "prompts" else self.negatives
        missing = [t for t in dict.fromkeys(texts) if t not in table]
        if missing:
            raise self.missing_error(kind, missing)
        out = {}
        for name in self.fields:
            rows = []
            for text in texts:
                shard, row = table[text]
                rows.append(self._handle(shard).get_slice(name)[row:row + 1])
            out[name] = torch.cat(rows) if len(rows) > 1 else rows[0]
        return out

    def lookup(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{field: Tensor[len(prompts), ...]}`` of ``prompts`` in their order; ValueError naming any prompt
        the cache does not hold and the command that rebuilds it."""
        return self._rows("prompts", list(prompts))

    def negative(self, text: str = "") -> dict[str, torch.Tensor]:
        """``{field: Tensor[1, ...]}``: the unconditional conditioning of negative prompt ``text``."""
        return self._rows("negatives", [text])

    def __repr__(self) -> str:
        return (f"EmbeddingCache({str(self.folder)!r}, {len(self.prompts)} prompts, {len(self.negatives)} negatives, "
                f"family={self.meta.get('family')!r}, teacher={self.meta.get('teacher')!r})")
