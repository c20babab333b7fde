"""Streamed image-caption sources for ``data.images``: datasets folders, parquet, arrow, webdataset shards.

Formats (``open_source``): a folder written by ``datasets``' ``save_to_disk``; a ``.parquet`` file or a
folder of them; ``.arrow`` files (``datasets``' own stream format); webdataset ``.tar`` shards (a folder,
one file or a brace pattern like ``shards/{00000..00003}.tar``), each sample ``<key>.jpg|jpeg|png|webp``
with ``<key>.txt`` or ``<key>.json`` (the caption under ``data.caption_column``, else ``caption`` or
``text``). The columns of the table formats are ``data.image_column`` and ``data.caption_column``.

Only metadata is read up front (parquet footers, arrow schemas, tar member headers): a source is a list of
*units* (a parquet row group, a block of ``BLOCK_ROWS`` rows of an arrow table, one tar shard), and the
images are read and decoded in the DataLoader workers as they are drawn.

The order is a pure function of the seed and the layout, ``C = processes * max(1, data.num_workers)``
consumers (consumer ``c = rank * W + worker``). Epoch ``e`` takes the units in a permutation drawn from
``(seed, e)`` and the rows of each unit in a permutation drawn from ``(seed, e, unit)``:

- with at least ``C`` units, consumer ``c`` reads the units ``perm[c::C]`` whole (each unit is read by one
  worker of one process: no read is wasted);
- with fewer, every consumer walks the epoch's concatenated order and keeps positions ``c, c + C, ...``.

Either way each sample goes to exactly one consumer per epoch. A consumer's stream is its epoch 0, then
its epoch 1, and so on; each worker makes whole batches of its own stream, and the DataLoader hands them
out round robin, so batch ``i`` of a process is batch ``i // W`` of worker ``i % W``. The samples of any
batch therefore follow from its index alone: ``ImageStream.batch(index)`` seeks there when the index is not
the next one (a resumed run), and ``state_dict()`` / ``load_state_dict()`` carry the same position.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

logger = logging.getLogger("stepdistill")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
BLOCK_ROWS = 1024  # rows of an arrow table (save_to_disk, .arrow) per unit
KINDS = {"dataset": "save_to_disk folder", "parquet": "parquet file", "arrow": "arrow file",
         "webdataset": "tar shard"}
FORMATS_HINT = ("give a folder of images with a metadata.jsonl, a `stepdistill cache-pairs` folder, a datasets "
                "save_to_disk folder, a .parquet file or folder of them, .arrow files, webdataset .tar shards "
                "(a folder, or a brace pattern like shards/{00000..00003}.tar), or builtin:toy")


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` -> ``a00bx, a00by, a01bx, ...`` (numeric ranges keep the zero padding)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        a, b = numeric.groups()
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0" for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        options = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        options = body.split(",")
    head, tails = pattern[:match.start()], expand_braces(pattern[match.end():])
    return [head + option + tail for option in options for tail in tails]


@dataclass(frozen=True)
class Unit:
    """A piece of a source read at once: a parquet row group, an arrow block or a tar shard."""

    path: str
    index: int  # parquet: the row group; arrow / dataset: the first row; tar: 0
    length: int


@dataclass
class Source:
    """What ``data.images`` names, as units (metadata only: nothing decoded)."""

    kind: str  # "dataset", "parquet", "arrow" or "webdataset"
    location: str
    units: list[Unit]
    image_column: str
    caption_column: str
    root: str  # image paths stored as strings are relative to it

    @property
    def num_samples(self) -> int:
        return sum(u.length for u in self.units)

    def describe(self, unit: Unit, row: int) -> str:
        if self.kind == "parquet":
            return f"{unit.path} row group {unit.index} row {row}"
        if self.kind == "webdataset":
            return f"{unit.path} sample {row}"
        return f"{unit.path} row {unit.index + row}"


# ---- finding and checking a source -----------------------------------------------------------------
def _error(location: str, problem: str) -> ValueError:
    return ValueError(f"data.images={location!r}: {problem}")


def _kind_of(files: list[str], location: str) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    kinds = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
    if len(suffixes) != 1 or next(iter(suffixes)) not in kinds:
        raise _error(location, f"names files ending in {', '.join(sorted(suffixes)) or 'nothing'}; all must be "
                               ".parquet, all .arrow or all .tar")
    return kinds[suffixes.pop()]


_TRAIN = re.compile(r"(^|[^a-z0-9])train([^a-z0-9]|$)", re.IGNORECASE)  # a train split's file or folder


def find_source(location: str) -> tuple[str, list[str]] | None:
    """``(kind, files)`` of ``data.images``, or ``None`` for the formats ``RealLatents`` reads itself (an image
    folder with metadata.jsonl, a cache-pairs folder). Raises one ValueError for a path that is not there."""
    location = str(location)
    if "{" in location or any(ch in location for ch in "*?["):
        files = []
        for pattern in expand_braces(location):
            pattern = os.path.expanduser(pattern)
            files += sorted(glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise _error(location, f"{len(missing)} of the {len(files)} files it names are not found, e.g. "
                                   f"{missing[0]}; fix the pattern (working directory: {Path.cwd()})")
        if not files:
            raise _error(location, "the pattern matches no files (an empty shard set); fix the pattern")
        return _kind_of(files, location), files
    path = Path(location).expanduser()
    if path.is_file():
        return _kind_of([str(path)], location), [str(path)]
    if not path.is_dir():
        raise _error(location, f"file or folder not found (working directory: {Path.cwd()}); {FORMATS_HINT}, or "
                               "leave it empty (null)")
    if (path / "pairs.safetensors").is_file() or (path / "metadata.jsonl").is_file():
        return None
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return "dataset", [str(path)]
    # Tars first: img2dataset writes a metadata .parquet (url, caption, status) next to each shard.
    for suffix, kind in ((".tar", "webdataset"), (".parquet", "parquet"), (".arrow", "arrow")):
        files = sorted(str(f) for f in path.rglob(f"*{suffix}") if f.is_file())
        # A Hub download holds every split (data/train-*.parquet, data/test-*.parquet): train only.
        train = [f for f in files if _TRAIN.search(os.path.relpath(f, path))]
        if train and len(train) < len(files):
            logger.info("data.images=%r: reading the %d train files of %d (the other splits are left out)",
                        location, len(train), len(files))
            files = train
        if files:
            return kind, files
    raise _error(location, f"the folder holds none of the known formats; {FORMATS_HINT}")


def _check_columns(location: str, names: list[str], image_column: str, caption_column: str) -> None:
    for key, column in (("data.image_column", image_column), ("data.caption_column", caption_column)):
        if column not in names:
            raise _error(location, f"has no column {column!r} ({key}); its columns are: {', '.join(names)}. "
                                   f"Set {key} to one of them")


def _open_table(kind: str, path: str, location: str):
    """A ``dataset`` folder or an ``arrow`` file as a ``datasets.Dataset`` (memory-mapped, nothing decoded)."""
    import datasets

    return _open_dataset(path, location) if kind == "dataset" else datasets.Dataset.from_file(path)


def _open_dataset(path: str, location: str):
    """A ``datasets.Dataset`` (memory-mapped) from a save_to_disk folder: its train split, or its only one."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" not in splits and len(splits) != 1:
            raise _error(location, f"holds the splits {', '.join(splits)} and none is 'train'; point data.images "
                                   f"at one of them (e.g. {Path(path) / splits[0]})")
        ds = ds["train" if "train" in splits else splits[0]]
    return ds


def _tar_samples(tar: tarfile.TarFile, name: str) -> list[tuple[str, tarfile.TarInfo, tarfile.TarInfo]]:
    """``(key, image member, caption member)`` of every sample of a shard, in the shard's order (webdataset
    keys: the member path up to the first dot of its file name). A sample without a caption is an error."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in tar.getmembers():
        if not member.isfile():
            continue
        folder, _, file = member.name.rpartition("/")
        stem, dot, extension = file.partition(".")
        if not dot:
            continue
        groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[extension.lower()] = member
    samples, uncaptioned = [], []
    for key, members in groups.items():
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None:
            continue
        caption = next((members[e] for e in CAPTION_EXTENSIONS if e in members), None)
        if caption is None:
            uncaptioned.append(key)
            continue
        samples.append((key, image, caption))
    if uncaptioned:
        raise ValueError(f"data.images: {name}: {len(uncaptioned)} of {len(uncaptioned) + len(samples)} samples "
                         f"have an image but no caption, e.g. {uncaptioned[0]!r}; each sample needs <key>.txt or "
                         f"<key>.json next to <key>.{'|'.join(IMAGE_EXTENSIONS)}")
    return samples


SHARD_CACHE = ".stepdistill_shards.json"  # per shard folder: {file name: [size, mtime_ns, samples]}


def shard_lengths(files: list[str]) -> list[int]:
    """The number of samples of each tar shard, from its member headers (no image is read), checking that
    every sample has a caption. Cached in ``<shard folder>/.stepdistill_shards.json`` by size and mtime, so
    a large shard set is scanned once (not by every process of every launch); a read-only folder is scanned
    again next time."""
    by_folder: dict[Path, dict] = {}
    lengths, dirty = [], set()
    for f in files:
        path = Path(f)
        folder = path.parent
        if folder not in by_folder:
            try:
                by_folder[folder] = json.loads((folder / SHARD_CACHE).read_text())
            except (OSError, ValueError):
                by_folder[folder] = {}
        cache, st = by_folder[folder], path.stat()
        entry = cache.get(path.name)
        if not (isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns]):
            try:
                with tarfile.open(path, "r:") as tar:
                    entry = [st.st_size, st.st_mtime_ns, len(_tar_samples(tar, str(path)))]
            except tarfile.TarError as e:
                raise ValueError(f"data.images: {path} is not an uncompressed tar file ({e})") from None
            cache[path.name] = entry
            dirty.add(folder)
        lengths.append(int(entry[2]))
    for folder in dirty:
        try:
            tmp = folder / f".tmp-{os.getpid()}{SHARD_CACHE}"
            tmp.write_text(json.dumps(by_folder[folder]))
            os.replace(tmp, folder / SHARD_CACHE)
        except OSError:  # a read-only data folder
            pass
    return lengths


def open_source(location: str, image_column: str = "image", caption_column: str = "caption") -> Source | None:
    """The units of ``data.images`` (metadata only), or ``None`` for an image folder or a cache-pairs folder.

    One ValueError names each problem: a path that is not there, a missing column (with the columns there
    are), an empty set, a tar sample without a caption."""
    found = find_source(location)
    if found is None:
        return None
    kind, files = found
    location = str(location)
    units: list[Unit] = []
    folder = Path(location).expanduser()
    root = str(folder) if folder.is_dir() else str(Path(files[0]).parent)  # for relative image paths
    if kind == "parquet":
        import pyarrow.parquet as pq

        for f in files:
            try:
                meta = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged footer
                raise _error(location, f"{f} is not a readable parquet file ({type(e).__name__}: {e})") from None
            _check_columns(location, meta.schema_arrow.names, image_column, caption_column)
            units += [Unit(f, g, meta.metadata.row_group(g).num_rows) for g in range(meta.metadata.num_row_groups)]
    elif kind in ("dataset", "arrow"):
        for f in files:
            try:
                ds = _open_table(kind, f, location)
            except ValueError:
                raise
            except Exception as e:  # noqa: BLE001 - arrow / datasets raise several types
                raise _error(location, f"{f} cannot be read as a datasets {KINDS[kind]} "
                                       f"({type(e).__name__}: {e})") from None
            _check_columns(location, ds.column_names, image_column, caption_column)
            units += [Unit(f, start, min(BLOCK_ROWS, len(ds) - start)) for start in range(0, len(ds), BLOCK_ROWS)]
    else:
        units = [Unit(f, 0, n) for f, n in zip(files, shard_lengths(files))]
    units = [u for u in units if u.length > 0]
    if not units:
        raise _error(location, f"holds no samples: its {len(files)} {KINDS[kind]}{'s' if len(files) > 1 else ''} "
                               f"{'are' if len(files) > 1 else 'is'} empty (an empty set); give data with samples")
    return Source(kind, location, units, image_column, caption_column, root)


# ---- the order ---------------------------------------------------------------------------------------
def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**61 - 1)
    return torch.Generator().manual_seed(seed)


def check_enough_samples(num_samples: int, consumers: int, images: str = "data.images") -> None:
    """Every consumer (process x DataLoader worker) needs at least one sample of the set."""
    if num_samples < consumers:
        raise ValueError(f"{images} has {num_samples} samples, fewer than processes x data.num_workers = "
                         f"{consumers}: every worker needs at least one; lower data.num_workers")


class Order:
    """Which sample each consumer draws: a pure function of ``(seed, lengths, consumers)``."""

    def __init__(self, lengths: list[int], seed: int, consumers: int):
        self.lengths, self.seed, self.consumers = list(lengths), int(seed), consumers
        self.total = sum(self.lengths)
        check_enough_samples(self.total, consumers)
        self.whole_units = len(self.lengths) >= consumers
        self._perm: tuple[int, list[int]] | None = None

    def unit_order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            order = torch.randperm(len(self.lengths), generator=_generator(self.seed, epoch)).tolist()
            self._perm = (epoch, order)
        return self._perm[1]

    def row_order(self, epoch: int, unit: int) -> list[int]:
        return torch.randperm(self.lengths[unit], generator=_generator(self.seed, epoch, unit)).tolist()

    def epoch_length(self, consumer: int, epoch: int) -> int:
        if self.whole_units:
            return sum(self.lengths[u] for u in self.unit_order(epoch)[consumer::self.consumers])
        return len(range(consumer, self.total, self.consumers))

    def locate(self, consumer: int, position: int) -> tuple[int, int]:
        """``(epoch, position in that epoch)`` of the ``position``-th sample of the consumer's stream."""
        epoch = 0
        while position >= (n := self.epoch_length(consumer, epoch)):
            position -= n
            epoch += 1
        return epoch, position

    def epoch_items(self, consumer: int, epoch: int, start: int = 0) -> Iterator[tuple[int, int]]:
        """``(unit, row)`` of the consumer's epoch from its ``start``-th sample on."""
        units = self.unit_order(epoch)
        if self.whole_units:
            skip = start
            for u in units[consumer::self.consumers]:
                if skip >= self.lengths[u]:
                    skip -= self.lengths[u]
                    continue
                rows = self.row_order(epoch, u)
                for j in range(skip, self.lengths[u]):
                    yield u, rows[j]
                skip = 0
            return
        position, base = consumer + start * self.consumers, 0
        for u in units:
            end = base + self.lengths[u]
            if position < end:
                rows = self.row_order(epoch, u)
                while position < end:
                    yield u, rows[position - base]
                    position += self.consumers
            base = end

    def stream(self, consumer: int, position: int = 0) -> Iterator[tuple[int, int, int]]:
        """``(epoch, unit, row)`` of the consumer's endless stream from its ``position``-th sample on."""
        epoch, start = self.locate(consumer, position)
        while True:
            for unit, row in self.epoch_items(consumer, epoch, start):
                yield epoch, unit, row
            epoch, start = epoch + 1, 0


# ---- reading ---------------------------------------------------------------------------------------
def to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """An image as a ``[3, resolution, resolution]`` tensor in [-1, 1]: resized so its short side fits, then
    centre-cropped."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _open_image(value: Any, root: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # datasets' Image feature undecoded: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(value)))
    if isinstance(value, str):  # a relative path: next to the data, else from the working directory
        path = Path(value).expanduser()
        if not path.is_absolute() and (Path(root) / path).is_file():
            path = Path(root) / path
        return Image.open(path)
    raise ValueError(f"an image value of type {type(value).__name__} (expected image bytes, a path, or a datasets "
                     "Image)")


def _caption(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


class Reader:
    """Reads rows of one source's units; keeps the unit it read last open (a worker reads unit after unit)."""

    def __init__(self, source: Source):
        self.source = source
        self._open: tuple[Unit, Any] | None = None
        self._datasets: dict[str, Any] = {}

    def _unit_data(self, unit: Unit) -> Any:
        if self._open is not None and self._open[0] == unit:
            return self._open[1]
        if self._open is not None and self.source.kind == "webdataset":
            self._open[1][0].close()
        src = self.source
        if src.kind == "parquet":
            import pyarrow.parquet as pq

            data = pq.ParquetFile(unit.path).read_row_group(unit.index, columns=[src.image_column, src.caption_column])
        elif src.kind == "webdataset":
            tar = tarfile.open(unit.path, "r:")
            data = (tar, _tar_samples(tar, unit.path))
        else:
            if unit.path not in self._datasets:
                import datasets

                ds = _open_table(src.kind, unit.path, src.location).select_columns([src.image_column,
                                                                                     src.caption_column])
                if isinstance(ds.features[src.image_column], datasets.Image):
                    ds = ds.cast_column(src.image_column, datasets.Image(decode=False))
                self._datasets[unit.path] = ds
            data = self._datasets[unit.path]
        self._open = (unit, data)
        return data

    def read(self, unit: Unit, rows: list[int]) -> list[tuple[Any, str]]:
        """``(image value, caption)`` of ``rows`` of ``unit``; the image value is opened by ``_open_image``."""
        src, data = self.source, self._unit_data(unit)
        if src.kind == "parquet":
            table = data.take(rows).to_pydict()
            return list(zip(table[src.image_column], map(_caption, table[src.caption_column])))
        if src.kind == "webdataset":
            tar, samples = data
            out = []
            for r in rows:
                key, image, caption = samples[r]
                out.append((tar.extractfile(image).read(), self._member_caption(tar, caption, unit.path)))
            return out
        batch = data[[unit.index + r for r in rows]]
        return list(zip(batch[src.image_column], map(_caption, batch[src.caption_column])))

    def captions(self, unit: Unit) -> list[str]:
        """Every caption of ``unit``, as ``read`` gives them, reading only the caption column or the caption
        members (no image): what ``stepdistill cache-embeddings`` encodes for a streamed source."""
        src = self.source
        if src.kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(unit.path).read_row_group(unit.index, columns=[src.caption_column])
            return list(map(_caption, table.column(src.caption_column).to_pylist()))
        if src.kind == "webdataset":
            with tarfile.open(unit.path, "r:") as tar:
                return [self._member_caption(tar, member, unit.path) for _, _, member in _tar_samples(tar, unit.path)]
        column = _open_table(src.kind, unit.path, src.location).select_columns([src.caption_column])
        return list(map(_caption, column[unit.index:unit.index + unit.length][src.caption_column]))

    def _member_caption(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> str:
        """A sample's caption member: the text of a .txt, the caption key of a .json."""
        text = tar.extractfile(member).read().decode("utf-8", errors="replace")
        if member.name.lower().endswith(".json"):
            text = self._json_caption(text, f"{path}:{member.name}")
        return text

    def _json_caption(self, text: str, name: str) -> str:
        try:
            meta = json.loads(text)
        except ValueError as e:
            raise ValueError(f"data.images: {name} is not JSON ({e})") from None
        for key in (self.source.caption_column, "caption", "text"):
            if isinstance(meta, dict) and key in meta:
                return _caption(meta[key])
        keys = ", ".join(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"data.images: {name} has no caption key {self.source.caption_column!r} "
                         f"(data.caption_column; its keys: {keys}); set data.caption_column or add .txt captions")


def check_first_sample(source: Source) -> None:
    """Read and decode the first sample (before any model loads): a caption key a .json lacks, an image path
    that points nowhere, or bytes that are no image fail now."""
    unit = source.units[0]
    value, _ = Reader(source).read(unit, [0])[0]
    try:
        with _open_image(value, source.root) as image:
            image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ValueError(f"data.images: cannot read the image of {source.describe(unit, 0)} "
                         f"({type(e).__name__}: {e})") from None


# ---- batches -----------------------------------------------------------------------------------------
class StreamDataset(IterableDataset):
    """One process's batches: each DataLoader worker makes whole batches of its own stream."""

    def __init__(self, source: Source, order: Order, resolution: int, batch_size: int, rank: int,
                 workers: int, start_index: int = 0, skip_unreadable: bool = False):
        self.source, self.order, self.resolution, self.batch_size = source, order, resolution, batch_size
        self.rank, self.workers, self.start_index, self.skip_unreadable = rank, workers, start_index, skip_unreadable

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if (info.num_workers if info is not None else 1) != self.workers:
            raise RuntimeError("StreamDataset runs under as many DataLoader workers as it was built for")
        # The DataLoader's first batch comes from its worker 0, and batch start_index is the order's worker
        # start_index % W: DataLoader worker k plays the order's worker (k + start_index) % W.
        worker = ((info.id if info is not None else 0) + self.start_index) % self.workers
        consumer = self.rank * self.workers + worker
        done = len(range(worker, self.start_index, self.workers))  # batches of this worker before start_index
        items = self.order.stream(consumer, done * self.batch_size)
        reader = Reader(self.source)
        while True:
            drawn = [next(items) for _ in range(self.batch_size)]
            samples: list[tuple[Any, str]] = []
            described = []
            i = 0
            while i < len(drawn):  # read the rows of one unit together
                j = i
                while j < len(drawn) and drawn[j][1] == drawn[i][1]:
                    j += 1
                unit = self.source.units[drawn[i][1]]
                samples += reader.read(unit, [d[2] for d in drawn[i:j]])
                described += [self.source.describe(unit, d[2]) for d in drawn[i:j]]
                i = j
            yield self._decode(samples, described)

    def _decode(self, samples: list[tuple[Any, str]], described: list[str]) -> dict:
        pixels: list[torch.Tensor | None] = []
        for (value, _), where in zip(samples, described):
            try:
                with _open_image(value, self.source.root) as image:
                    pixels.append(to_pixels(image, self.resolution))
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                if not self.skip_unreadable:
                    raise ValueError(f"data.images: cannot read the image of {where} ({type(e).__name__}: {e}); "
                                     "fix or remove it, or set data.skip_unreadable=true to replace unreadable "
                                     "samples by another sample of their batch") from None
                logger.warning("data.skip_unreadable=true: the image of %s cannot be read (%s); another sample "
                               "of its batch takes its place", where, e)
                pixels.append(None)
        good = [k for k, p in enumerate(pixels) if p is not None]
        if not good:
            raise ValueError(f"data.images: no image of a batch can be read ({'; '.join(described)})")
        keep = [k if pixels[k] is not None else good[k % len(good)] for k in range(len(pixels))]
        return {"pixels": torch.stack([pixels[k] for k in keep]), "captions": [samples[k][1] for k in keep]}


class ImageStream:
    """Batches of ``(pixels, captions)`` of a streamed source for one process, from a DataLoader with
    ``num_workers`` workers; ``batch(index)`` is a pure function of the index (see the module's docstring)."""

    def __init__(self, source: Source, resolution: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, skip_unreadable: bool = False):
        self.source, self.resolution, self.batch_size, self.seed = source, resolution, batch_size, int(seed)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers = max(1, num_workers)
        self.skip_unreadable = skip_unreadable
        self.order = Order([u.length for u in source.units], self.seed, world_size * self.workers)
        self._next = 0
        self._iterator: Iterator[dict] | None = None

    def __len__(self) -> int:
        return self.source.num_samples

    def _layout(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "num_workers": self.workers,
                "batch_size": self.batch_size, "samples": self.source.num_samples, "units": len(self.source.units)}

    def _start(self, index: int) -> None:
        self.close()
        dataset = StreamDataset(self.source, self.order, self.resolution, self.batch_size, self.rank,
                                self.workers, index, self.skip_unreadable)
        # Its own generator: a DataLoader iterator draws a seed from the global RNG otherwise, and a resumed run
        # (which starts the iterator at another step) would then see other training noise.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=2 if self.num_workers else None,
                            generator=torch.Generator().manual_seed(self.seed))
        self._iterator, self._next = iter(loader), index

    def batch(self, index: int) -> tuple[torch.Tensor, list[str]]:
        """The pixels ``[batch_size, 3, resolution, resolution]`` and captions of batch ``index``."""
        if self._iterator is None or index != self._next:
            self._start(index)
        out = next(self._iterator)
        self._next = index + 1
        return out["pixels"], out["captions"]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        while True:
            yield self.batch(self._next)

    def close(self) -> None:
        """Stop the workers (a new iterator starts at the next ``batch``)."""
        self._iterator = None

    def state_dict(self) -> dict:
        """Where the stream stands: the next batch index, and for each worker of this process the epoch and
        the position in that epoch of the next sample it draws (plus the layout these hold for)."""
        workers = []
        for w in range(self.workers):
            done = len(range(w, self._next, self.workers)) * self.batch_size
            epoch, position = self.order.locate(self.rank * self.workers + w, done)
            workers.append({"epoch": epoch, "position": position})
        return {"next_index": self._next, "rank": self.rank, "workers": workers, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (from ``state_dict``) stood: the next ``batch()`` / iteration gives the batch
        an uninterrupted stream would have given. A different layout (processes, workers, batch size, seed or
        data) cannot continue exactly: the stream then starts at the same batch index of the new layout's order,
        with a warning."""
        changed = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if state.get("rank", self.rank) != self.rank:
            changed["rank"] = (state.get("rank"), self.rank)
        if changed:
            logger.warning("data.images: the saved data position was for a different layout (%s); the stream "
                           "continues at batch %d of the new order, not at the exact sample",
                           ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), state["next_index"])
        self.close()
        self._next = int(state["next_index"])

