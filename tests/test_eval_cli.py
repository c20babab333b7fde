"""`stepdistill eval` end to end (toy domain and a tiny real pipeline) and its bad-input errors, offline."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import stepdistill.eval.evaluate as ev
from stepdistill.cli import main as cli_main
from tests.helpers import REPO, run


def _no_generation(*args, **kwargs):
    raise AssertionError("generation started before the input error was reported")


@pytest.fixture
def forbid_generation(monkeypatch):
    monkeypatch.setattr(ev, "generate_images", _no_generation)


def _eval_error(capsys, argv) -> str:
    assert ev.main(argv) == 2
    return capsys.readouterr().err


def _write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_toy_eval_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert cli_main(["eval", "toy-sd", "--steps", "2", "--guidance", "3", "--seeds", "0", "1", "--num-images",
                     "12", "--no-fid", "--num-reference", "64", "--batch-size", "6", "--shuffle-prompts", "3",
                     "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["domain"] == "toy" and result["feature_space"] == "toy"
    assert result["num_images"] == 12 and result["num_prompts"] == 6 and result["steps"] == 2
    m = result["metrics"]
    assert "fid" not in m and m["kid_subset_size"] == 12
    assert 0.0 <= m["alignment"] <= 1.0 and m["diversity"] > 0
    assert {"color_accuracy", "kind_accuracy", "position_accuracy"} <= set(m)
    assert "alignment" in (out / "summary.md").read_text()
    assert result["shuffle_prompts"] == 3
    grid = Image.open(out / "grid.png")
    assert grid.height == 6 * 32 * 3  # one row per prompt, 3x enlarged


@pytest.mark.parametrize("teacher", ["toy-sd", "toy-flow"])
def test_fast_eval_gives_the_pipelines_numbers(tmp_path, teacher, monkeypatch):
    """--fast (sampling/fast.py) generates the pipeline's own images: the same metrics to float precision."""
    from stepdistill.sampling.fast import FastSampler

    calls = []
    real_call = FastSampler.__call__
    monkeypatch.setattr(FastSampler, "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    results = {}
    for fast in (False, True):
        out = tmp_path / f"fast_{fast}"
        args = ["eval", teacher, "--steps", "3", "--guidance", "1.5", "--seeds", "0", "1", "--num-images", "8",
                "--no-fid", "--num-reference", "32", "--batch-size", "4", "--out", str(out)]
        assert cli_main(args + (["--fast"] if fast else [])) == 0
        results[fast] = json.loads((out / "metrics.json").read_text())
    assert results[True]["fast"] is True and results[False]["fast"] is False
    assert len(calls) == 2  # the --fast run generated its two batches through FastSampler, the other run none
    for key in ("alignment", "diversity", "kid_mean"):
        assert results[True]["metrics"][key] == pytest.approx(results[False]["metrics"][key], abs=1e-4)


def test_toy_fid_needs_enough_images(tmp_path, capsys, forbid_generation):
    err = _eval_error(capsys, ["toy-sd", "--num-images", "16", "--out", str(tmp_path)])
    assert "at least 129 generated images" in err and "--no-fid" in err
    err = _eval_error(capsys, ["toy-sd", "--num-images", "130", "--seeds", "0", "1", "--num-reference", "50",
                               "--out", str(tmp_path)])
    assert "at least 129 reference images" in err and "has 50" in err


def test_bad_prompt_sources(tmp_path, capsys, forbid_generation):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "contains no prompts" in _eval_error(capsys, ["toy-sd", "--prompts", str(empty), "--out", str(tmp_path)])
    few = tmp_path / "few.txt"
    few.write_text("a red circle at the top left\n")
    err = _eval_error(capsys, ["toy-sd", "--prompts", str(few), "--num-images", "4", "--no-fid", "--out",
                               str(tmp_path)])
    assert "needs 4 prompts" in err
    cats = tmp_path / "cats.txt"
    cats.write_text("a photo of a cat\n")
    assert "a photo of a cat" in _eval_error(capsys, ["toy-sd", "--prompts", str(cats), "--no-fid", "--out",
                                                      str(tmp_path)])


def test_bad_reference_folders(tmp_path, capsys, forbid_generation):
    base = ["toy-sd", "--no-fid", "--num-images", "4", "--out", str(tmp_path / "out"), "--reference"]
    assert "does not exist" in _eval_error(capsys, [*base, str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    assert "holds no images" in _eval_error(capsys, [*base, str(tmp_path / "empty")])
    broken = _write_images(tmp_path / "broken", [(32, 32)] * 3)
    (broken / "002.png").write_bytes(b"not a png")
    err = _eval_error(capsys, [*base, str(broken)])
    assert "002.png" in err and "cannot be read" in err
    mixed = _write_images(tmp_path / "mixed", [(32, 32), (40, 40), (32, 32)])
    err = _eval_error(capsys, [*base, str(mixed)])
    assert "2 different resolutions" in err and "--center-crop-reference" in err
    large = _write_images(tmp_path / "large", [(64, 64)] * 3)
    err = _eval_error(capsys, [*base, str(large)])
    assert "64x64 but the generated images will be 32x32" in err
    assert "toy pipelines generate 32x32" in _eval_error(capsys, ["toy-sd", "--resolution", "64", "--out",
                                                                  str(tmp_path)])


def test_reference_folder_stats_are_cached_and_npz_reused(tmp_path):
    """A folder reference is measured once (cached .npz); the .npz then serves as --reference directly."""
    from stepdistill.toy.data import sample_batch

    images = (sample_batch(20, seed=3)[0] + 1) * 127.5
    folder = tmp_path / "real"
    folder.mkdir()
    for i, im in enumerate(images.round().byte().permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(folder / f"{i}.png")
    # Different sizes are fine with --center-crop-reference (cropped and resized to 32).
    Image.fromarray(np.full((48, 40, 3), 200, np.uint8)).save(folder / "odd.png")
    cache = tmp_path / "ref.npz"
    common = ["toy-sd", "--steps", "1", "--num-images", "4", "--no-fid", "--center-crop-reference"]
    assert ev.main([*common, "--reference", str(folder), "--reference-cache", str(cache),
                    "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert first["reference"]["n"] == 21 and first["reference"]["cached"] is False and cache.is_file()
    assert ev.main([*common, "--reference", str(folder), "--reference-cache", str(cache),
                    "--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert second["reference"]["cached"] is True
    assert second["metrics"]["kid_mean"] == pytest.approx(first["metrics"]["kid_mean"], rel=1e-6)
    assert ev.main([*common, "--reference", str(cache), "--out", str(tmp_path / "c")]) == 0
    third = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert third["metrics"]["kid_mean"] == pytest.approx(first["metrics"]["kid_mean"], rel=1e-6)


def test_real_pipeline_missing_weights(tmp_path, capsys, monkeypatch, forbid_generation):
    ref = _write_images(tmp_path / "ref", [(64, 64)] * 2)
    err = _eval_error(capsys, ["tiny:sd15", "--prompts", "builtin:tiny", "--reference", str(ref),
                               "--inception-weights", str(tmp_path / "inception.pth"), "--out", str(tmp_path)])
    assert "--inception-weights" in err and "no such file" in err
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    err = _eval_error(capsys, ["tiny:sd15", "--prompts", "builtin:tiny", "--reference", str(ref),
                               "--out", str(tmp_path)])
    assert "--inception-weights PATH" in err and "offline" in err
    err = _eval_error(capsys, ["tiny:sd15", "--prompts", "builtin:tiny", "--clip-pretrained",
                               str(tmp_path / "clip.bin"), "--out", str(tmp_path)])
    assert "--clip-pretrained" in err and "no such checkpoint file" in err
    assert "--prompts is required" in _eval_error(capsys, ["tiny:sd15", "--no-clip", "--out", str(tmp_path)])
    assert "nothing to measure" in _eval_error(capsys, ["tiny:sd15", "--prompts", "builtin:tiny", "--no-clip",
                                                        "--out", str(tmp_path)])


def test_real_pipeline_with_tiny_open_clip_checkpoint(tmp_path):
    """A real (tiny SD1.5) pipeline, CLIP score with an open_clip model given as config name + local
    checkpoint file, diversity in CLIP space."""
    import open_clip

    config = tmp_path / "stepdistill-test-eval-clip.json"
    config.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("stepdistill-test-eval-clip", pretrained=None)
    checkpoint = tmp_path / "clip.pt"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "out"
    assert ev.main(["tiny:sd15", "--prompts", "builtin:tiny", "--num-images", "6", "--seeds", "0", "1", "--steps",
                    "2", "--clip-model", "stepdistill-test-eval-clip", "--clip-pretrained", str(checkpoint),
                    "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    m = result["metrics"]
    assert result["domain"] == "real" and result["feature_space"] is None and result["num_prompts"] == 3
    assert 0 <= m["clip_score"] <= 100 and m["clip_model"].startswith("open_clip:stepdistill-test-eval-clip")
    assert 0 < m["diversity_clip"] <= 2
    assert (out / "grid.png").is_file() and "CLIP score" in (out / "summary.md").read_text()


def test_toy_detection(tmp_path):
    from stepdistill.toy.teachers import teacher_path

    assert ev.detect_toy(teacher_path("toy-flow"), {})
    export = tmp_path / "export"
    export.mkdir()
    info = {"num_inference_steps": 1, "config": {"model": {"pretrained": "toy-sd", "resolution": 32}}}
    (export / "stepdistill.json").write_text(json.dumps(info))
    assert ev.detect_toy(export, ev._read_info(export))
    assert not ev.detect_toy(export, {"config": {"model": {"pretrained": "stabilityai/sdxl-turbo"}}})


def test_plan_images_prompt_major_and_noise_seeds():
    plan = ev.plan_images(["a", "b", "c"], [0, 7], 5, "x")
    assert plan == [(0, "a", 0), (0, "a", 7), (1, "b", 0), (1, "b", 7), (2, "c", 0)]
    assert len({ev.noise_seed(s, i) for i, _, s in plan}) == 5  # every image its own noise


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): each process generates half,
    the features are gathered, and the metrics equal a one-process run (~40 s on 2 busy cores)."""
    args = ["eval", "toy-sd", "--steps", "2", "--guidance", "3", "--seeds", "0", "1", "--num-images", "10",
            "--no-fid", "--num-reference", "64", "--batch-size", "4"]
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--mixed_precision", "no", "-m", "stepdistill.cli", *args, "--out", str(tmp_path / "two")],
        cwd=REPO, env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["num_processes"] == 2 and two["num_images"] == 10
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-4), key


def test_run_folder_evaluation_through_both_commands(tmp_path):
    """`stepdistill eval RUN_DIR` and its alias `stepdistill toy eval RUN_DIR`: the teacher-vs-student files,
    the same numbers from either, and metrics.json's provenance."""
    import shutil

    from stepdistill.toy.teachers import teacher_path

    run_dir = tmp_path / "run"
    shutil.copytree(teacher_path("toy-flow"), run_dir / "export")  # stands in for an exported student
    (run_dir / "export" / "stepdistill.json").write_text(json.dumps(
        {"num_inference_steps": 1, "guidance_scale": 1.0, "timesteps": None}))
    (run_dir / "config.yaml").write_text(
        "model: {pretrained: toy-sd, resolution: 32}\n"
        "eval: {prompts: 'builtin:toy_held_out', seeds_per_prompt: 1, teacher_steps: 1, teacher_guidance: 1.0, "
        "student_steps: [], teacher_baselines: []}\n")
    results = {}
    for command in (["eval"], ["toy", "eval"]):
        assert cli_main([*command, str(run_dir)]) == 0
        results[" ".join(command)] = json.loads((run_dir / "metrics.json").read_text())
        assert (run_dir / "comparison.png").is_file() and "| student 1-step |" in (run_dir / "summary.md").read_text()
    one, other = results.values()
    assert set(one["results"]) == {"teacher 1-step", "student 1-step"}
    for row in ("teacher 1-step", "student 1-step"):
        assert one["results"][row]["all"] == other["results"][row]["all"]
    assert one["command"] == f"stepdistill toy eval {run_dir} --seeds-per-prompt 1 --student-steps 1"
    assert one["provenance"]["num_samples"] == 11 and one["provenance"]["command"] == one["command"]
