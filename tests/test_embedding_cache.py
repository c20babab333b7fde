"""The text-embedding cache (data/embeddings.py, ``stepdistill cache-embeddings``, ``data.embeddings``).

A teacher loaded with a cache has no text encoders and gives, field for field and bit for bit, the
conditioning its text encoders give; a tiny DMD2 run from the cache logs the losses of the run that encodes
live and exports a complete pipeline; a missing prompt and a cache of another teacher are refused with the
command that rebuilds it, the latter before any weight loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from stepdistill.data.embeddings import EmbeddingCache, prompt_hash, run_prompts, write_embedding_cache
from stepdistill.data.prompts import BUILTIN_PROMPTS
from stepdistill.harness.preflight import validate_paths
from stepdistill.models.loading import load_teacher
from tests.helpers import add_to_tar, png_bytes, tiny_config

PROMPTS = list(BUILTIN_PROMPTS["tiny"])
NEGATIVES = ["", "blurry, low quality"]


def _cache(teacher, out: Path, batch_size: int = 2, **kwargs) -> Path:
    meta = {"teacher": f"tiny:{teacher.family}", "family": teacher.family, "resolution": teacher.resolution,
            "max_sequence_length": None, "config": "tests/tiny_dmd2"}
    return write_embedding_cache(out, lambda b: teacher.encode_prompt(b).tensors,
                                 lambda t: teacher.encode_negative(1, t).tensors, [*PROMPTS, ""], NEGATIVES, meta,
                                 batch_size=batch_size, progress=False, **kwargs)


def _same(a, b) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a.keys():
        assert a[key].dtype == b[key].dtype, key
        assert a[key].device == b[key].device, key
        assert torch.equal(a[key], b[key]), f"{key} differs: max {(a[key] - b[key]).abs().max()}"


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_the_cached_conditioning_is_the_live_encoding_bit_for_bit(family, tmp_path):
    torch.set_num_threads(1)
    live = load_teacher(f"tiny:{family}")
    folder = _cache(live, tmp_path / "emb", shard_bytes=1)  # one shard per batch: lookups cross shards
    index = json.loads((folder / "index.json").read_text())
    assert len(index["shards"]) > 2 and set(index["prompts"]) == {*PROMPTS, ""}
    assert index["meta"]["prompt_hash"] == prompt_hash([*PROMPTS, ""], NEGATIVES)

    cached = load_teacher(f"tiny:{family}", embeddings=str(folder))
    assert cached.text_encoders == {} and cached.pipeline.text_encoder is None
    assert all(getattr(cached.pipeline, n, None) is None for n in ("text_encoder_2", "text_encoder_3"))
    assert cached.dropped == sorted(live.text_encoders)
    keys = {"sd15": ["encoder_hidden_states"], "sdxl": ["encoder_hidden_states", "text_embeds", "time_ids"],
            "sd3": ["encoder_hidden_states", "pooled_projections"],
            "flux": ["encoder_hidden_states", "pooled_projections", "txt_ids"]}[family]
    for batch in (PROMPTS[:2], PROMPTS[5:7], [PROMPTS[3], PROMPTS[0]]):  # batches the cache did not make
        cond = cached.encode_prompt(batch)
        assert list(cond.keys()) == keys
        _same(cond, live.encode_prompt(batch))
    _same(cached.encode_prompt([""]), live.encode_prompt([""]))
    for negative in NEGATIVES:
        _same(cached.encode_negative(3, negative), live.encode_negative(3, negative))


def test_a_prompt_missing_from_the_cache_names_it_and_the_rebuild_command(tmp_path):
    folder = _cache(load_teacher("tiny:sd15"), tmp_path / "emb")
    teacher = load_teacher("tiny:sd15", embeddings=str(folder))
    with pytest.raises(ValueError, match="'a pink hexagon' not in the embedding cache") as e:
        teacher.encode_prompt([PROMPTS[0], "a pink hexagon"])
    assert f"stepdistill cache-embeddings --config tests/tiny_dmd2 --out {folder}" in str(e.value)
    with pytest.raises(ValueError, match="negative prompt 'ugly' not in the embedding cache"):
        teacher.encode_negative(2, "ugly")


def test_a_cache_of_another_teacher_family_or_resolution_is_refused_before_loading(tmp_path, monkeypatch):
    folder = _cache(load_teacher("tiny:sd15"), tmp_path / "emb")
    ok = tiny_config(tmp_path / "run", "dmd2", f"data.embeddings={folder}")
    assert validate_paths(ok) == "sd15"

    import diffusers

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the cache was checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_loading)
    cases = {("model.pretrained=tiny:sdxl", "model.family=sdxl"): "family: cache 'sd15', run 'sdxl'",
             ("model.pretrained=tiny:sd2", "model.family=sd2"): "teacher: cache 'tiny:sd15', run 'tiny:sd2'",
             ("model.resolution=128",): "resolution: cache 64, run 128"}
    for overrides, message in cases.items():
        cfg = tiny_config(tmp_path / "run", "dmd2", f"data.embeddings={folder}", *overrides)
        with pytest.raises(ValueError, match="was made for another teacher setting") as e:
            validate_paths(cfg)
        assert message in str(e.value) and "stepdistill cache-embeddings --config tests/tiny_dmd2" in str(e.value)
    with pytest.raises(ValueError, match="family: cache 'sd15', run 'sdxl'"):
        load_teacher("tiny:sdxl", embeddings=str(folder))  # the API checks before loading too

    # A prompt the run will ask for and the cache lacks, and a cache that is not there, stop preflight.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([*PROMPTS, "a pink hexagon"]))
    with pytest.raises(ValueError, match="'a pink hexagon' not in the embedding cache"):
        validate_paths(tiny_config(tmp_path / "run", "dmd2", f"data.embeddings={folder}", f"data.prompts={prompts}"))
    with pytest.raises(ValueError, match="negative prompt 'ugly' not in"):
        validate_paths(tiny_config(tmp_path / "run", "dmd2", f"data.embeddings={folder}", "data.negative_prompt=ugly"))
    with pytest.raises(ValueError, match="data.embeddings=.*nowhere.*not found; make the cache with `stepdistill "
                                         "cache-embeddings"):
        validate_paths(tiny_config(tmp_path / "run", "dmd2", f"data.embeddings={tmp_path / 'nowhere'}"))


def test_run_prompts_are_every_prompt_the_run_encodes(tmp_path):
    cfg = tiny_config(tmp_path, "dmd2", "data.images=builtin:toy", "train.sample_prompts=[a sample prompt]",
                      "data.negative_prompt=blurry")
    prompts, negatives = run_prompts(cfg)
    assert prompts[:len(PROMPTS)] == PROMPTS and "a sample prompt" in prompts and "" in prompts
    assert set(BUILTIN_PROMPTS["toy"]) <= set(prompts) and len(prompts) == len(set(prompts))
    assert negatives == ["", "blurry"]


def test_the_cli_writes_the_shards_and_a_run_from_them_matches_the_live_run(tmp_path):
    from stepdistill.cli import main
    from stepdistill.harness.trainer import Trainer
    from stepdistill.lifecycle import complete

    out = tmp_path / "emb"
    common = ["data.negative_prompt=blurry", "train.max_steps=2", "train.sample_every=1", "train.cpu_threads=1",
              "train.log_every=1"]
    assert main(["cache-embeddings", "--config", "tests/tiny_dmd2", "--out", str(out), "--quiet", *common]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["shards"] == ["shard-00000.safetensors"] and set(index["negatives"]) == {"", "blurry"}
    assert set(index["prompts"]) == {*PROMPTS, ""}
    assert index["meta"]["teacher"] == "tiny:sd15" and index["meta"]["overrides"] == common
    with safe_open(str(out / "shard-00000.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["family"]) == "sd15" and list(f.keys()) == ["encoder_hidden_states"]
        assert f.get_slice("encoder_hidden_states").get_shape() == [len(PROMPTS) + 3, 77, 32]

    def losses(run: Path, *overrides: str):
        trainer = Trainer(tiny_config(run, "dmd2", *common, *overrides))
        trainer.train()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return trainer, [{k: v for k, v in r.items() if "loss" in k or k.startswith("grad_norm")} for r in rows]

    _, live = losses(tmp_path / "live", "export.enabled=false")
    trainer, cached = losses(tmp_path / "cached", f"data.embeddings={out}")
    assert len(live) == 2 and live[0]["generator/loss"] > 0
    assert cached == live  # the same floats
    assert trainer.teacher.pipeline.text_encoder is None and trainer.teacher.embeddings is not None
    assert (tmp_path / "cached" / "samples" / "step_000001.png").is_file()  # the sample prompts came from the cache

    # The export of a run without text encoders loads them back: a complete pipeline, the teacher's encoder.
    complete(trainer)
    from diffusers import DiffusionPipeline

    exported = DiffusionPipeline.from_pretrained(str(tmp_path / "cached" / "export"))
    teacher = load_teacher("tiny:sd15")
    assert exported.text_encoder is not None
    for (name, a), b in zip(exported.text_encoder.state_dict().items(), teacher.pipeline.text_encoder.state_dict().values()):
        assert torch.equal(a, b), name


# ---- streamed data.images (data/sources.py) -------------------------------------------------------------
STREAMED = [f"a streamed photo {i}" for i in range(6)] + ["café au lait", "a photo of a dog"]
GAN = ["method.gan_critic_weight=0.1", "method.gan_generator_weight=0.01"]


def _png(i: int) -> bytes:
    return png_bytes(i, 32)


def _streamed(tmp_path: Path, fmt: str) -> Path:
    """The 8 samples of STREAMED as one parquet file of two row groups, a datasets save_to_disk folder (an
    Image column), or two webdataset tar shards (the first with .txt captions, the second with .json ones)."""
    if fmt == "disk":
        import datasets

        ds = datasets.Dataset.from_dict({"image": [{"bytes": _png(i), "path": None} for i in range(8)],
                                         "caption": STREAMED}).cast_column("image", datasets.Image())
        ds.save_to_disk(str(tmp_path / "disk"))
        return tmp_path / "disk"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "images.parquet"
        pq.write_table(pa.table({"image": [_png(i) for i in range(8)], "caption": STREAMED}), str(path),
                       row_group_size=4)
        return path
    import tarfile

    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(2):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(4 * s, 4 * s + 4):
                caption = STREAMED[i].encode() if s == 0 else json.dumps({"caption": STREAMED[i], "url": "x"}).encode()
                for name, data in ((f"{i:06d}.png", _png(i)), (f"{i:06d}.{'txt' if s == 0 else 'json'}", caption)):
                    add_to_tar(tar, name, data)
    return folder


@pytest.mark.parametrize("fmt", ["parquet", "disk", "shards"])
def test_run_prompts_hold_every_caption_of_a_streamed_source_read_without_its_images(fmt, tmp_path, monkeypatch):
    from PIL import Image

    from stepdistill.data.sources import ImageStream, open_source

    images = _streamed(tmp_path, fmt)
    cfg = tiny_config(tmp_path / "run", "dmd2", f"data.images={images}")

    def no_decoding(*args, **kwargs):
        raise AssertionError("run_prompts decoded an image")

    with monkeypatch.context() as m:
        m.setattr(Image, "open", no_decoding)
        prompts, _ = run_prompts(cfg)
    assert prompts[:len(PROMPTS)] == PROMPTS and prompts[-1] == ""
    assert prompts[len(PROMPTS):-1] == STREAMED  # in the source's order, after data.prompts
    stream = ImageStream(open_source(str(images)), 32, 2)  # what the run's batches hold
    assert {c for i in range(4) for c in stream.batch(i)[1]} == set(STREAMED)


def test_a_run_on_streamed_images_trains_from_the_embedding_cache(tmp_path):
    """`stepdistill cache-embeddings` then a run with data.embeddings, on parquet and on tar shards: preflight
    finds every caption in the cache and the GAN terms' real batches are encoded from it; the losses are the
    live run's."""
    from stepdistill.cli import main
    from stepdistill.harness.trainer import Trainer

    common = [*GAN, "train.max_steps=2", "train.sample_every=0", "train.cpu_threads=1", "train.log_every=1",
              "export.enabled=false"]

    def losses(run: Path, *overrides: str):
        cfg = tiny_config(run, "dmd2", *common, *overrides)
        validate_paths(cfg)  # preflight: with data.embeddings, every prompt and caption must be in the cache
        trainer = Trainer(cfg)
        trainer.train()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return trainer, [{k: v for k, v in r.items() if "loss" in k or "/gan" in k or k.startswith("grad_norm")}
                         for r in rows]

    parquet = _streamed(tmp_path, "parquet")
    for images in (parquet, _streamed(tmp_path, "shards")):
        out = tmp_path / f"emb-{images.stem}"
        assert main(["cache-embeddings", "--config", "tests/tiny_dmd2", "--out", str(out), "--quiet", *common,
                     f"data.images={images}"]) == 0
        assert set(STREAMED) <= set(json.loads((out / "index.json").read_text())["prompts"])
        trainer, cached = losses(tmp_path / f"cached-{images.stem}", f"data.images={images}", f"data.embeddings={out}")
        assert trainer.teacher.pipeline.text_encoder is None and trainer.real_data.stream is not None
        assert any(k.startswith("critic/gan") for row in cached for k in row), cached
        if images == parquet:
            _, live = losses(tmp_path / "live", f"data.images={images}")
            assert cached == live  # the same floats


def test_the_cli_refuses_a_folder_that_is_not_a_cache(tmp_path, capsys):
    from stepdistill.cli import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main(["cache-embeddings", "--config", "tests/tiny_dmd2", "--out", str(tmp_path / "mine"), "--quiet"])
    assert e.value.code == 2 and "holds other files and no embedding cache" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_an_embedding_cache_index_of_another_format_is_refused(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a version-1 stepdistill embedding cache"):
        EmbeddingCache(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloaded_text_encoders_stay_on_the_cpu_and_give_the_conditioning_on_the_gpu():
    live = load_teacher("tiny:sdxl", device="cuda")
    offloaded = load_teacher("tiny:sdxl", device="cuda", text_encoder_device="cpu")
    assert {next(m.parameters()).device.type for m in offloaded.text_encoders.values()} == {"cpu"}
    assert offloaded.device.type == "cuda" and offloaded.backbone.device.type == "cuda"
    cond, ref = offloaded.encode_prompt(PROMPTS[:2]), live.encode_prompt(PROMPTS[:2])
    for key in ref.keys():
        assert cond[key].device.type == "cuda"
        torch.testing.assert_close(cond[key], ref[key], rtol=1e-4, atol=1e-5)


def test_offloaded_text_encoders_stay_where_they_are_and_hand_the_conditioning_over():
    # The "meta" device stands in for a GPU on a CPU-only machine: the backbone goes there, the text encoders
    # stay on the CPU, and the conditioning they compute is handed to the backbone's device.
    # what the trainer's build does for model.offload_text_encoders=true
    teacher = load_teacher("tiny:sdxl", device="meta", text_encoder_device="cpu")
    assert teacher.device.type == "meta" and teacher.text_encoder_device.type == "cpu"
    assert {next(m.parameters()).device.type for m in teacher.text_encoders.values()} == {"cpu"}
    cond = teacher.encode_prompt(PROMPTS[:2])
    assert {t.device.type for t in cond.tensors.values()} == {"meta"}
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)
    assert load_teacher("tiny:sdxl", device="meta").text_encoder_device.type == "meta"  # default: all on device


def test_the_cache_and_the_offload_may_change_on_resume():
    from stepdistill.harness.preflight import config_changes

    recorded = {"model": {"pretrained": "tiny:sd15"}, "data": {"prompts": "builtin:tiny"}}  # made before the keys
    now = {"model": {"pretrained": "tiny:sd15", "offload_text_encoders": True},
           "data": {"prompts": "builtin:tiny", "embeddings": "emb"}}
    fixed, free = config_changes(recorded, now)
    assert fixed == {} and set(free) == {"model.offload_text_encoders", "data.embeddings"}
    assert config_changes(recorded, {**now, "model": {"pretrained": "tiny:sd2"}})[0]  # the teacher still is fixed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cli_encodes_on_the_gpu_and_the_cache_serves_a_gpu_teacher(tmp_path):
    from stepdistill.cli import main

    out = tmp_path / "emb"
    assert main(["cache-embeddings", "--config", "tests/tiny_dmd2", "--out", str(out), "--quiet",
                 "model.pretrained=tiny:sdxl", "model.family=sdxl"]) == 0
    cached = load_teacher("tiny:sdxl", device="cuda", embeddings=str(out))
    live = load_teacher("tiny:sdxl", device="cuda")
    assert cached.text_encoders == {}
    cond, ref = cached.encode_prompt(PROMPTS[:2]), live.encode_prompt(PROMPTS[:2])
    for key in ref.keys():
        assert cond[key].device.type == "cuda" and cond[key].dtype == ref[key].dtype
        torch.testing.assert_close(cond[key], ref[key], rtol=1e-5, atol=1e-6)
