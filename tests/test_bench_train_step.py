"""`stepdistill bench-train` on CPU: the tiny pipeline through the real harness, and the real architectures' sizes."""

from __future__ import annotations

import csv
import warnings
from collections import Counter

import pytest
import torch

from stepdistill.bench import architectures
from stepdistill.bench.train_step import catch_syncs, main, plan_steps


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # The random tiny pipeline is built in $STEPDISTILL_CACHE (a session folder, tests/conftest.py).
    tmp = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only add contention on a shared CI machine
    try:
        out = tmp / "bench.md"
        assert main(["--arch", "tiny", "--warmup", "1", "--iters", "2", "--part-iters", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    with (tmp / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    return out.read_text(), rows


def test_report_has_iteration_rows_and_sum_of_parts(report):
    text, rows = report
    assert "critic-only iteration" in text and "iteration with generator update" in text
    assert "sum of parts" in text and "amortised per step" in text
    summary = {r["label"]: r for r in rows if r["section"] == "summary"}
    assert set(summary) == {"critic-only iteration", "iteration with generator update", "amortised per step"}
    for row in summary.values():
        assert float(row["ms"]) > 0
        assert float(row["share"]) > 0  # iteration / sum of parts
    assert int(summary["critic-only iteration"]["count"]) == 2  # --iters timed iterations of each kind


def test_parts_cover_every_role(report):
    _, rows = report
    sections = {r["section"] for r in rows if r["section"].startswith("parts: ")}
    assert sections == {"parts: critic-only iteration", "parts: iteration with generator update"}
    for section in sections:
        parts = [r for r in rows if r["section"] == section and r["kind"] == "part"]
        assert all(float(r["ms_per_call"]) > 0 and float(r["count"]) > 0 for r in parts)
        optimizer = [r for r in rows if r["section"] == section and r["kind"] == "optimizer"]
        assert optimizer and all(float(r["ms"]) > 0 for r in optimizer)  # a trained role's update
        (networks,) = [float(r["ms"]) for r in rows if r["section"] == section and r["kind"] == "networks"]
        (total,) = [float(r["ms"]) for r in rows if r["section"] == section and r["kind"] == "sum"]
        assert networks == pytest.approx(sum(float(r["ms"]) for r in parts), rel=1e-3)
        # The sum of parts counts the optimizer steps (they were left out once: a 1.48x ratio for 1.16x).
        assert total == pytest.approx(networks + sum(float(r["ms"]) for r in optimizer), rel=1e-3)
        assert [r for r in rows if r["section"] == section and r["kind"] == "iteration"]
        assert any(r["role"] == "text_encoder" for r in parts)

    def calls(section, role):
        return sum(float(r["count"]) for r in rows
                   if r["section"] == section and r["kind"] == "part" and r["role"] == role)

    gen = "parts: iteration with generator update"
    assert calls(gen, "generator") >= 1
    assert calls(gen, "teacher") >= 1
    assert calls(gen, "critic") >= 2  # the fake score in the DMD gradient, and the critic's own update
    # The teacher runs classifier-free guidance: one backbone call on the doubled batch.
    assert any(r["role"] == "teacher" and "CFG (backbone batch 4)" in r["label"] for r in rows)
    # Back-propagated calls are timed with their backward.
    assert any(r["role"] == "generator" and "fwd+bwd" in r["label"] for r in rows if r["section"] == gen)
    critic_only = "parts: critic-only iteration"
    assert calls(critic_only, "critic") >= 1 and calls(critic_only, "generator") >= 1
    assert calls(critic_only, "teacher") == 0
    assert any(r["kind"] == "optimizer" and r["role"] == "critic" for r in rows if r["section"] == critic_only)


def test_plan_interleaves_the_kinds_of_iteration():
    class TTUR:
        def phases(self, step):
            return ["generator", "critic"] if step % 5 == 0 else ["critic"]

    freq, order = plan_steps(TTUR(), 3)
    assert freq == {("generator", "critic"): pytest.approx(0.2), ("critic",): pytest.approx(0.8)}
    assert [s for _, s in order] == [0, 1, 5, 2, 10, 3]


def test_sync_sites_are_counted():
    def synchronizing_op():  # what torch does under set_sync_debug_mode("warn")
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    sites: Counter = Counter()
    with catch_syncs(sites, debug_mode=False):
        for _ in range(3):
            synchronizing_op()
    assert list(sites.values()) == [3]
    assert "synchronizing_op" in next(iter(sites))


@pytest.mark.parametrize("arch, expected", [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_real_unet_configs_have_the_published_size(arch, expected):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(architectures.unet_config(arch))
    n = sum(p.numel() for p in unet.parameters())
    assert n == pytest.approx(expected, rel=0.01)
    assert next(unet.parameters()).device == torch.device("meta")


def test_real_text_encoder_and_vae_configs_have_the_published_size():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        sizes = {
            "clip_l": CLIPTextModel(CLIPTextConfig(**architectures.CLIP_L_TEXT)),
            "bigg": CLIPTextModelWithProjection(CLIPTextConfig(**architectures.CLIP_BIGG_TEXT)),
            "vae": AutoencoderKL.from_config(architectures.SD15_VAE),
        }
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in sizes.items()}
    assert counts["clip_l"] == pytest.approx(123_060_480, rel=0.01)
    assert counts["bigg"] == pytest.approx(694_659_840, rel=0.01)
    assert counts["vae"] == pytest.approx(83_653_863, rel=0.01)


def test_clip_tokenizer_pads_to_77(tmp_path):
    tokenizer, bos, eos, vocab = architectures.write_clip_tokenizer(tmp_path / "tok")
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == bos and ids[-1] == eos
    assert max(ids) < vocab <= architectures.CLIP_L_TEXT["vocab_size"]
    assert len(set(ids)) > 5  # the vocabulary was read (transformers 5 ignores CLIPTokenizer(vocab_file=...))
