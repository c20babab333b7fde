"""Streamed data.images (data/sources.py): every format gives the image folder's samples; sharding over
processes and DataLoader workers; exact resume; the preflight errors; a tiny run trains from parquet."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from stepdistill.data.images import RealLatents, _load_image
from stepdistill.data.sources import ImageStream, Order, expand_braces, open_source
from stepdistill.harness.preflight import validate_paths
from tests.helpers import add_to_tar, png_bytes, tiny_config

datasets = pytest.importorskip("datasets")

N = 8  # samples
RES = 32


def _png(i: int) -> bytes:
    return png_bytes(i, RES)


_add = add_to_tar


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path | str]:
    """The same 8 samples as an image folder, save_to_disk folders (a Dataset; a DatasetDict with a test
    split), parquet (one file; image paths; a folder of two; a Hub layout with a test split),
    arrow files and webdataset shards (4 tars of 2, captions in .txt, and .json in the last shard; beside
    them img2dataset's metadata parquets)."""
    root = tmp_path_factory.mktemp("data")
    captions = [f"image {i}" for i in range(N)]
    folder = root / "folder"
    folder.mkdir()
    for i in range(N):
        (folder / f"{i}.png").write_bytes(_png(i))
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "caption": c}) + "\n"
                                                   for i, c in enumerate(captions)))
    # image paths (relative to the parquet's folder) instead of bytes
    datasets.Dataset.from_dict({"image": [f"{i}.png" for i in range(N)], "caption": captions}).to_parquet(
        str(folder / "paths.parquet"))
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _png(i), "path": None} for i in range(N)],
                                     "caption": captions}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(root / "disk"))
    test_split = datasets.Dataset.from_dict({"image": [{"bytes": _png(99), "path": None}], "caption": ["test split"]})
    test_split = test_split.cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": test_split, "train": ds}).save_to_disk(str(root / "dict"))  # train is read
    ds.to_parquet(str(root / "one.parquet"))
    (root / "parquets").mkdir()
    for k in range(2):
        ds.shard(2, k, contiguous=True).to_parquet(str(root / "parquets" / f"part-{k}.parquet"))
    (root / "hub" / "data").mkdir(parents=True)  # a Hub download: only the train split is read
    ds.to_parquet(str(root / "hub" / "data" / "train-00000-of-00001.parquet"))
    test_split.to_parquet(str(root / "hub" / "data" / "test-00000-of-00001.parquet"))
    (root / "arrow").mkdir()
    for f in (root / "disk").glob("*.arrow"):
        (root / "arrow" / f.name).write_bytes(f.read_bytes())
    (root / "shards").mkdir()
    for s in range(4):
        with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as tar:
            for i in (2 * s, 2 * s + 1):
                _add(tar, f"{i:06d}.png", _png(i))
                if s == 3:
                    _add(tar, f"{i:06d}.json", json.dumps({"caption": captions[i], "url": "x"}).encode())
                else:
                    _add(tar, f"{i:06d}.txt", captions[i].encode())
        # img2dataset's layout: a metadata parquet (no images) and stats next to each shard
        datasets.Dataset.from_dict({"url": ["x", "y"], "caption": captions[2 * s:2 * s + 2]}).to_parquet(
            str(root / "shards" / f"{s:05d}.parquet"))
        (root / "shards" / f"{s:05d}_stats.json").write_text("{}")
    return {"root": root, "folder": folder, "paths": folder / "paths.parquet", "disk": root / "disk", "dict": root / "dict",
            "parquet": root / "one.parquet",
            "parquets": root / "parquets", "hub": root / "hub", "arrow": root / "arrow", "shards": root / "shards",
            "braces": str(root / "shards" / "{00000..00003}.tar")}


def _epoch(location, **kw) -> list[tuple[str, torch.Tensor]]:
    """The first N batches of size 1 (one epoch with one process and one worker)."""
    stream = ImageStream(open_source(str(location)), RES, 1, seed=0, **kw)
    out = []
    for i in range(N):
        pixels, captions = stream.batch(i)
        out.append((captions[0], pixels[0]))
    return out


@pytest.mark.parametrize("fmt", ["disk", "dict", "parquet", "paths", "parquets", "hub", "arrow", "shards", "braces"])
def test_every_format_yields_the_image_folders_samples(data, fmt):
    folder = RealLatents(str(data["folder"]), None, RES, 1)
    expected = {c: _load_image(f, RES) for f, c in zip(folder.files, folder.captions)}
    got = _epoch(data[fmt])
    assert sorted(c for c, _ in got) == sorted(expected)  # each sample once in the epoch
    for caption, pixels in got:
        assert pixels.shape == (3, RES, RES)
        torch.testing.assert_close(pixels, expected[caption], rtol=0, atol=0)


def test_order_is_seeded_and_the_sample_of_a_batch_depends_on_its_index_only(data):
    a = [c for c, _ in _epoch(data["parquet"])]
    assert a == [c for c, _ in _epoch(data["parquet"])]
    other = ImageStream(open_source(str(data["parquet"])), RES, 1, seed=1)
    assert [other.batch(i)[1][0] for i in range(N)] != a
    jumped = ImageStream(open_source(str(data["parquet"])), RES, 1, seed=0, num_workers=1)
    rng = torch.get_rng_state()
    assert jumped.batch(5)[1][0] == a[5] and jumped.batch(2)[1][0] == a[2]
    # Starting the workers leaves the global RNG alone: a resumed run starts them at another step
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("fmt, whole_units", [("shards", True), ("parquet", False)])
def test_two_processes_of_two_workers_cover_every_sample_once_per_epoch(data, fmt, whole_units):
    source = open_source(str(data[fmt]))
    assert Order([u.length for u in source.units], 0, 4).whole_units is whole_units
    seen: dict[int, list[str]] = {}
    for rank in (0, 1):
        stream = ImageStream(source, RES, 1, seed=7, rank=rank, world_size=2, num_workers=2)
        seen[rank] = []
        for i in range(3 * N):
            state = stream.state_dict()["workers"]
            if min(w["epoch"] for w in state) >= 1:
                break
            epoch = state[i % 2]["epoch"]  # batch i comes from worker i % 2
            _, captions = stream.batch(i)
            if epoch == 0:
                seen[rank] += captions
        stream.close()
    assert len(seen[0]) == len(seen[1]) == N // 2
    assert sorted(seen[0] + seen[1]) == sorted(f"image {i}" for i in range(N))


@pytest.mark.parametrize("fmt, stop, workers", [
    ("shards", 4, [{"epoch": 1, "position": 0}, {"epoch": 1, "position": 0}]),
    ("parquet", 5, [{"epoch": 1, "position": 2}, {"epoch": 1, "position": 0}]),  # worker 0 made 3 batches
])
def test_resume_from_a_saved_state_continues_with_the_uninterrupted_samples(data, fmt, stop, workers):
    source = open_source(str(data[fmt]))
    kw = {"seed": 3, "num_workers": 2}
    whole = ImageStream(source, RES, 2, **kw)
    expected = [whole.batch(i) for i in range(10)]  # 2 workers x 4 samples an epoch: crosses epochs 0 -> 2
    first = ImageStream(source, RES, 2, **kw)
    for i in range(stop):
        first.batch(i)
    state = json.loads(json.dumps(first.state_dict()))  # plain data: it can go into a checkpoint
    assert state["next_index"] == stop and state["workers"] == workers
    first.close()
    resumed = ImageStream(source, RES, 2, **kw)
    resumed.load_state_dict(state)
    for i, (pixels, captions) in zip(range(stop, 10), resumed):
        assert captions == expected[i][1]
        torch.testing.assert_close(pixels, expected[i][0], rtol=0, atol=0)
    resumed.close()
    # The trainer's path: a resumed run asks for the batch of its step, and the stream seeks there.
    seek = ImageStream(source, RES, 2, **kw)
    assert seek.batch(7)[1] == expected[7][1]
    seek.close()


def test_brace_patterns():
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


# ---- preflight -----------------------------------------------------------------------------------------
def _validate(tmp_path, images, *overrides):
    validate_paths(tiny_config(tmp_path / "run", "dmd2", f"data.images={images}", *overrides))


def test_preflight_accepts_every_format(data, tmp_path):
    for fmt in ("disk", "parquet", "parquets", "arrow", "shards", "braces"):
        _validate(tmp_path, data[fmt])


@pytest.mark.parametrize("images, overrides, message", [
    ("{root}/nope", [], r"data.images='.*/nope': file or folder not found"),
    ("{root}/one.parquet", ["data.image_column=img"],
     r"has no column 'img' \(data.image_column\); its columns are: image, caption. Set data.image_column"),
    ("{root}/disk", ["data.caption_column=text"],
     r"has no column 'text' \(data.caption_column\); its columns are: image, caption"),
    ("{root}/shards/{{00004..00005}}.tar", [], r"2 of the 2 files it names are not found, e.g. .*00004.tar"),
    ("{root}/shards/*.tgz", [], r"matches no files \(an empty shard set\)"),
    ("{root}/one.parquet", ["data.num_workers=9"], r"has 8 samples, fewer than processes x data.num_workers = 9"),
])
def test_preflight_errors_name_the_problem(data, tmp_path, images, overrides, message):
    with pytest.raises(ValueError, match=message):
        _validate(tmp_path, images.format(root=data["root"]), *overrides)


@pytest.mark.parametrize("shards, message", [
    ([[], []], r"holds no samples: its 2 tar shards are empty \(an empty set\)"),
    ([[("a.jpg", 0), ("a.txt", b"captioned"), ("b.png", 1)]],  # b has no caption
     r"0.tar: 1 of 2 samples have an image but no caption, e.g. 'b'; each sample needs <key>.txt or <key>.json"),
    ([[("a.png", 0), ("a.json", b'{"url": "x"}')]],
     r"a.json has no caption key 'caption' \(data.caption_column; its keys: url\)"),
], ids=["empty", "no_caption", "json_without_caption_key"])
def test_preflight_refuses_bad_tar_shards(tmp_path, shards, message):
    """Shards given as members: (name, seed of a PNG) or (name, bytes)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for s, members in enumerate(shards):
        with tarfile.open(folder / f"{s}.tar", "w") as tar:
            for name, data in members:
                _add(tar, name, _png(data) if isinstance(data, int) else data)
    with pytest.raises(ValueError, match=message):
        _validate(tmp_path, folder)


def test_unreadable_streamed_image_is_named_or_replaced_within_its_batch(tmp_path, caplog):
    ds = datasets.Dataset.from_dict({"image": [_png(0), b"not an image", _png(2), _png(3)],
                                     "caption": ["a", "b", "c", "d"]})
    ds.to_parquet(str(tmp_path / "bad.parquet"))
    source = open_source(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"cannot read the image of .*bad.parquet row group 0 row 1 .*"
                                         r"data.skip_unreadable=true"):
        stream = ImageStream(source, RES, 4)
        stream.batch(0)
    stream = ImageStream(source, RES, 4, skip_unreadable=True)
    with caplog.at_level("WARNING", logger="stepdistill"):
        pixels, captions = stream.batch(0)
    assert pixels.shape == (4, 3, RES, RES) and "b" not in captions and len(set(captions)) == 3
    assert "row group 0 row 1 cannot be read" in caplog.text


# ---- a run ---------------------------------------------------------------------------------------------
def test_tiny_dmd2_trains_two_steps_on_parquet_images(data, tmp_path):
    from stepdistill.harness.trainer import Trainer
    from tests.helpers import changed, snapshot

    cfg = tiny_config(tmp_path, "dmd2", f"data.images={data['parquet']}", "data.num_workers=1",
                      "method.gan_critic_weight=0.1", "method.gan_generator_weight=0.01", "train.max_steps=2",
                      "train.sample_every=0", "export.enabled=false")
    validate_paths(cfg)
    trainer = Trainer(cfg)
    assert trainer.real_data.stream is not None and len(trainer.real_data) == N
    head = trainer.roles["critic"].head
    before = snapshot(head)
    trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    gan = [v for m in metrics for k, v in m.items() if k.startswith("critic/gan")]
    assert len(gan) == 2 and np.isfinite(gan).all(), metrics
    assert changed(before, head), "the GAN head trained on the real (parquet) latents"
    assert trainer.real_data.state_dict()["next_index"] == 2  # one real batch per step (no accumulation)


@pytest.mark.slow  # three tiny trainings (about 50 s on 2 shared cores)
def test_a_resumed_run_on_streamed_images_matches_the_uninterrupted_run(data, tmp_path):
    from stepdistill.harness.trainer import Trainer

    common = [f"data.images={data['parquets']}", "data.num_workers=2", "data.batch_size=3",
              "method.gan_critic_weight=0.1", "method.gan_generator_weight=0.01", "train.sample_every=0",
              "export.enabled=false", "train.checkpoint_every=1"]
    Trainer(tiny_config(tmp_path / "whole", "dmd2", *common, "train.max_steps=4")).train()
    Trainer(tiny_config(tmp_path / "cut", "dmd2", *common, "train.max_steps=3")).train()  # odd: worker 1 next
    Trainer(tiny_config(tmp_path / "cut", "dmd2", *common, "train.max_steps=4", "train.resume=latest")).train()
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("whole", "cut")}
    assert [r["step"] for r in rows["cut"]] == [0, 1, 2, 3]
    assert rows["cut"] == rows["whole"]  # every loss and gradient norm, bit for bit


def test_shard_headers_are_scanned_once_and_cached(data, tmp_path, monkeypatch):
    import shutil

    import stepdistill.data.sources as sources

    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards, ignore=shutil.ignore_patterns(sources.SHARD_CACHE))
    scanned = []
    real = sources._tar_samples
    monkeypatch.setattr(sources, "_tar_samples", lambda tar, name: scanned.append(Path(name).name) or real(tar, name))
    assert open_source(str(shards)).num_samples == N and len(scanned) == 4
    assert json.loads((shards / sources.SHARD_CACHE).read_text())["00001.tar"][2] == 2
    scanned.clear()
    assert open_source(str(shards)).num_samples == N and scanned == [], "an unchanged shard is not scanned again"
    with tarfile.open(shards / "00001.tar", "a") as tar:  # a third sample: new size and mtime
        _add(tar, "extra.png", _png(9))
        _add(tar, "extra.txt", b"extra")
    assert open_source(str(shards)).num_samples == N + 1 and scanned == ["00001.tar"]
