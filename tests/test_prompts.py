"""Prompt sources (every format and its errors) and the deterministic, rank-aware prompt sampler."""

from __future__ import annotations

import builtins
import json

import pytest

from stepdistill.data.prompts import (
    BUILTIN_PROMPTS,
    InfinitePromptLoader,
    PromptDataset,
    infinite_prompt_loader,
    load_prompts,
)

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


# ---- formats -------------------------------------------------------------------------------------


def test_builtin_tiny():
    prompts = load_prompts("builtin:tiny")
    assert len(prompts) == 8 and all(isinstance(p, str) and p for p in prompts)
    assert prompts == list(BUILTIN_PROMPTS["tiny"])
    prompts.append("x")  # a copy: callers cannot change the builtin set
    assert len(load_prompts("builtin:tiny")) == 8


def test_txt_skips_blank_lines_and_strips(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n   \n  a blue square  \r\na green triangle")
    assert load_prompts(str(f)) == PROMPTS


@pytest.mark.parametrize("ext,delim", [(".csv", ","), (".tsv", "\t")])
def test_delimited_column(tmp_path, ext, delim):
    f = tmp_path / f"p{ext}"
    rows = [delim.join(["id", "caption"])] + [delim.join([str(i), p]) for i, p in enumerate(PROMPTS)]
    f.write_text("\n".join(rows) + "\n")
    assert load_prompts(str(f)) == PROMPTS


def test_csv_custom_column_and_quoted_commas(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('text,score\n"a cat, on a mat",1\n"",2\n"a dog",3\n')
    assert load_prompts(str(f), caption_column="text") == ["a cat, on a mat", "a dog"]


def test_jsonl_strings_and_objects(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('"a red circle"\n\n{"caption": "a blue square", "id": 1}\n{"caption": "a green triangle"}\n')
    assert load_prompts(str(f)) == PROMPTS


def test_json_list_of_strings(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(PROMPTS))
    assert load_prompts(str(f)) == PROMPTS


def test_json_list_of_objects_custom_column(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"prompt": p, "n": i} for i, p in enumerate(PROMPTS)]))
    assert load_prompts(str(f), caption_column="prompt") == PROMPTS


def test_json_object_holding_a_list(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"caption": PROMPTS, "meta": "x"}))
    assert load_prompts(str(f)) == PROMPTS


def test_coco_captions_json(tmp_path):
    f = tmp_path / "captions_val2014.json"
    coco = {
        "info": {}, "images": [{"id": 1}, {"id": 2}],
        "annotations": [{"image_id": i, "id": 10 + i, "caption": p} for i, p in enumerate(PROMPTS)],
    }
    f.write_text(json.dumps(coco))
    assert load_prompts(str(f)) == PROMPTS


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": PROMPTS, "n": [1, 2, 3]}), f)
    assert load_prompts(str(f)) == PROMPTS
    with pytest.raises(ValueError, match="no column 'text'.*'caption'"):
        load_prompts(str(f), caption_column="text")


def test_parquet_without_reader_is_a_clear_error(tmp_path, monkeypatch):
    f = tmp_path / "p.parquet"
    f.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_parquet(name, *args, **kwargs):
        if name.split(".")[0] in ("pyarrow", "pandas"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_parquet)
    with pytest.raises(ValueError, match="pip install pyarrow"):
        load_prompts(str(f))


# ---- errors --------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_prompts(str(tmp_path / "nope.txt"))


def test_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_prompts(str(tmp_path))


@pytest.mark.parametrize("name,content", [("e.txt", "\n  \n"), ("e.csv", "caption\n\n"), ("e.json", "[]"),
                                          ("e.jsonl", "\n")])
def test_empty_file(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(f))


def test_missing_column_lists_available(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("text,score\na,1\n")
    with pytest.raises(ValueError, match=r"no column 'caption'.*'text', 'score'.*data.caption_column"):
        load_prompts(str(f))
    g = tmp_path / "p.jsonl"
    g.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"no column 'caption'.*'text'"):
        load_prompts(str(g))


def test_unknown_extension_lists_supported(tmp_path):
    f = tmp_path / "p.xlsx"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"unsupported extension '.xlsx'.*\.txt.*\.csv.*\.jsonl.*\.parquet"):
        load_prompts(str(f))


def test_unknown_builtin_lists_builtins():
    with pytest.raises(ValueError, match="builtin:tiny"):
        load_prompts("builtin:huge")


def test_bad_json(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('"ok"\n{broken\n')
    with pytest.raises(ValueError, match="line 2"):
        load_prompts(str(f))
    g = tmp_path / "p.json"
    g.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        load_prompts(str(g))
    h = tmp_path / "q.json"
    h.write_text(json.dumps([1.5, {"caption": "x"}]))
    with pytest.raises(ValueError, match="item 0 is a float"):
        load_prompts(str(h))


# ---- dataset -------------------------------------------------------------------------------------


def test_prompt_dataset():
    ds = PromptDataset(PROMPTS)
    assert len(ds) == 3 and ds[1] == "a blue square"
    assert len(PromptDataset.from_source("builtin:tiny")) == 8
    with pytest.raises(ValueError):
        PromptDataset([])


# ---- sampler -------------------------------------------------------------------------------------


def _many(n):
    return [f"prompt {i}" for i in range(n)]


def test_deterministic_and_seed_dependent():
    a = infinite_prompt_loader(_many(50), batch_size=4, seed=3)
    b = infinite_prompt_loader(_many(50), batch_size=4, seed=3)
    c = infinite_prompt_loader(_many(50), batch_size=4, seed=4)
    steps = range(40)
    assert [a.batch_for_step(s) for s in steps] == [b.batch_for_step(s) for s in steps]
    assert [a.batch_for_step(s) for s in steps] != [c.batch_for_step(s) for s in steps]
    assert all(len(a.batch_for_step(s)) == 4 for s in steps)


def test_resume_sees_the_same_prompts():
    """A loader created fresh at step k (a resumed run) yields what an uninterrupted one yields."""
    prompts = _many(23)
    uninterrupted = list(zip(range(60), iter(InfinitePromptLoader(prompts, 3, seed=7))))
    resumed = InfinitePromptLoader(prompts, 3, seed=7)
    for (step, batch), resumed_batch in zip(uninterrupted[37:], resumed.iter_from(37)):
        assert batch == resumed_batch, step
    # Random access in any order gives the same answer as sequential access.
    fresh = InfinitePromptLoader(prompts, 3, seed=7)
    for step in (59, 0, 41, 12):
        assert fresh.batch_for_step(step) == uninterrupted[step][1]


def test_ranks_get_disjoint_prompts_and_cover_the_epoch():
    n, batch, world = 40, 3, 4
    loaders = [InfinitePromptLoader(_many(n), batch, seed=1, rank=r, world_size=world) for r in range(world)]
    steps_per_epoch = n // (batch * world)  # 3; 4 positions of each epoch are skipped
    assert loaders[0].steps_per_epoch == steps_per_epoch
    for epoch in range(3):
        seen = []
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            per_rank = [set(ld.indices_for_step(step)) for ld in loaders]
            union = set().union(*per_rank)
            assert len(union) == batch * world, f"ranks overlap at step {step}"
            seen.extend(union)
        assert len(seen) == len(set(seen)), "a prompt repeated within an epoch"
    # Each epoch is a different permutation.
    epoch0 = [loaders[0].indices_for_step(s) for s in range(steps_per_epoch)]
    epoch1 = [loaders[0].indices_for_step(s) for s in range(steps_per_epoch, 2 * steps_per_epoch)]
    assert epoch0 != epoch1


def test_rank_view_matches_explicit_rank_argument():
    r1 = InfinitePromptLoader(_many(30), 2, seed=0, rank=1, world_size=3)
    r0 = InfinitePromptLoader(_many(30), 2, seed=0, rank=0, world_size=3)
    assert [r1.batch_for_step(s) for s in range(10)] == [r0.batch_for_step(s, rank=1) for s in range(10)]


def test_global_batch_larger_than_prompt_set():
    # builtin:tiny has 8 prompts; 2 ranks x batch 6 = 12 > 8: repeats are unavoidable but it still works.
    prompts = load_prompts("builtin:tiny")
    loaders = [InfinitePromptLoader(prompts, 6, seed=0, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        for ld in loaders:
            batch = ld.batch_for_step(step)
            assert len(batch) == 6 and set(batch) <= set(prompts)
            assert len(set(batch)) >= 4


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="at least one prompt"):
        InfinitePromptLoader([], 1)
    with pytest.raises(ValueError, match="batch_size"):
        InfinitePromptLoader(PROMPTS, 0)
    with pytest.raises(ValueError, match="rank"):
        InfinitePromptLoader(PROMPTS, 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="step"):
        InfinitePromptLoader(PROMPTS, 1).batch_for_step(-1)
