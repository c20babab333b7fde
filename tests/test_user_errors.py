"""Bad input gets one clear error naming the key or file and the fix, before any model loads (issue 14,
items 5, 8, 9): config values, prompt files, image folders, resolutions, output folders, Hub repo ids; and
what an export records never holds a local path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from PIL import Image

from stepdistill import cli, lifecycle
from stepdistill.data.images import SCAN_CACHE, scan_images
from stepdistill.harness.preflight import preflight, validate_paths
from tests.helpers import PYTHON, REPO, tiny_config


def _cli_error(capsys, *argv: str) -> str:
    """Run ``stepdistill ARGV`` in-process; it must exit 2 with one ``error:`` line (returned)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---- config values -------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("roles.generator.lr=-1", r"roles.generator.lr=-1.0 must be > 0 .*roles.generator.trainable=false"),
    ("roles.critic.lr=0", r"roles.critic.lr=0.0 must be > 0"),
    ("train.checkpoint_every=0", r"train.checkpoint_every=0 must be >= 1"),
    ("train.checkpoint_every=-1", r"train.checkpoint_every=-1 must be >= 1"),
    ("train.sample_every=-2", r"train.sample_every=-2 must be >= 0 \(0 disables"),
    ("train.checkpoints_total_limit=-1", r"checkpoints_total_limit=-1 must be >= 0"),
    ("roles.critic.betas=[0.9,1.5]", r"roles.critic.betas=\[0.9, 1.5\] must be two values in \[0, 1\)"),
    ("roles.critic.lr_warmup_steps=-5", r"roles.critic.lr_warmup_steps=-5 must be >= 0"),
    ("roles.critic.lr_scheduler=cosinus", r"lr_scheduler='cosinus' is not valid; choose one of: .*cosine"),
    ("train.on_nonfinite=ignore", r"train.on_nonfinite='ignore' is not valid; choose one of: stop, skip"),
    ("roles.critic.lora_alpha=0", r"roles.critic.lora_alpha=0.0 must be > 0"),
    ("data.num_workers=-1", r"data.num_workers=-1 must be >= 0"),
    ("eval.teacher_guidance=-1", r"eval.teacher_guidance=-1.0 must be >= 0"),
])
def test_bad_values_are_refused_when_the_config_loads(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, "dmd2", override)


def test_a_frozen_role_may_keep_lr_zero(tmp_path):
    cfg = tiny_config(tmp_path, "dmd2", "roles.teacher.lr=0")
    assert cfg.roles.teacher.lr == 0 and not cfg.roles.teacher.trainable


def test_train_py_reports_a_bad_value_in_one_line_before_loading_anything(tmp_path):
    proc = subprocess.run([PYTHON, "train.py", "--config", "configs/tests/tiny_dmd2.yaml", f"run.output_dir={tmp_path}",
                           "roles.generator.lr=-1"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "roles.generator.lr=-1.0 must be > 0" in proc.stderr and "Loading" not in proc.stderr


def test_a_missing_resume_folder_is_named_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"train.resume='/no/such/checkpoint': no such folder; use 'latest'"):
        preflight(tiny_config(tmp_path / "run", "dmd2", "train.resume=/no/such/checkpoint"))


# ---- prompt files --------------------------------------------------------------------------------
def test_a_prompt_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a caf\xe9 at night\n".encode("latin-1"))
    cfg = tiny_config(tmp_path / "run", "dmd2", f"data.prompts={prompts}")
    with pytest.raises(ValueError, match=r"prompts.txt' is not UTF-8 text \(invalid continuation byte at byte 5"):
        validate_paths(cfg)


# ---- resolution ----------------------------------------------------------------------------------
def test_a_resolution_off_the_teachers_patch_grid_is_refused_and_another_size_warned(tmp_path, caplog):
    from stepdistill.models.loading import check_resolution

    with pytest.raises(ValueError, match=r"model.resolution=72 does not fit .*multiple of 16 .*use 64 or 80"):
        check_resolution("tiny:sd3", 72)
    assert check_resolution("tiny:sd3", 64) is None
    assert check_resolution("toy-sd", 32) is None  # the shipped toy teachers are 32 px
    cfg = tiny_config(tmp_path, "dmd2", "model.resolution=48")
    with caplog.at_level("WARNING", logger="stepdistill"):
        validate_paths(cfg)
    assert "model.resolution=48 differs from the 64 px the teacher tiny:sd15 was built for" in caplog.text


# ---- image folders -------------------------------------------------------------------------------
def _image_folder(tmp_path, n_good: int = 3):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(n_good):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"image {i}"})
    good = (folder / "0.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])  # truncated: header fine, pixel data cut short
    (folder / "text.png").write_text("not an image")
    rows += [{"file_name": "cut.png", "caption": "cut"}, {"file_name": "text.png", "caption": "text"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_unreadable_images_stop_the_run_with_their_list_before_loading(tmp_path):
    folder = _image_folder(tmp_path)
    cfg = tiny_config(tmp_path / "run", "dmd2", f"data.images={folder}")
    with pytest.raises(ValueError, match=r"2 of 5 images cannot be read: cut.png \(.*\); text.png \(.*"
                                         r"data.skip_unreadable=true"):
        validate_paths(cfg)


def test_skip_unreadable_keeps_the_readable_ones_and_the_scan_is_cached(tmp_path, caplog, monkeypatch):
    import stepdistill.data.images as images

    folder = _image_folder(tmp_path)
    files = [folder / n for n in ("0.png", "1.png", "2.png", "cut.png", "text.png")]
    with caplog.at_level("WARNING", logger="stepdistill"):
        assert scan_images(files, folder, skip_unreadable=True) == [True, True, True, False, False]
    assert "skipping 2 of 5 images" in caplog.text
    assert (folder / SCAN_CACHE).is_file()

    opened = []
    real = images._unreadable
    monkeypatch.setattr(images, "_unreadable", lambda p: opened.append(p.name) or real(p))
    scan_images(files, folder, skip_unreadable=True)
    assert opened == [], "an unchanged folder is not read again"
    Image.new("RGB", (16, 16)).save(folder / "cut.png")  # repaired: new size and mtime
    assert scan_images(files, folder, skip_unreadable=True) == [True, True, True, True, False]
    assert opened == ["cut.png"]


def test_real_latents_never_draw_a_skipped_image(tmp_path):
    from stepdistill.data.images import RealLatents

    folder = _image_folder(tmp_path)

    class NoTeacher:  # the file list is decided before any latent is encoded
        pass

    data = RealLatents(str(folder), NoTeacher(), 64, 2, skip_unreadable=True)
    assert [f.name for f in data.files] == ["0.png", "1.png", "2.png"] and len(data) == 3


@pytest.mark.parametrize("line, message", [
    ("{not json", r"metadata.jsonl line 2 is not JSON"),
    ('{"caption": "no file"}', r'metadata.jsonl line 2 has no "file_name" string'),
])
def test_bad_metadata_lines_are_named(tmp_path, line, message):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "a"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        validate_paths(tiny_config(tmp_path / "run", "dmd2", f"data.images={folder}"))


# ---- output folders ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny finished run (checkpoint + export) the CLI cases below export or push."""

    run = tmp_path_factory.mktemp("user_errors") / "run"
    lifecycle.run(tiny_config(run, "dmd2", "train.max_steps=1", "train.sample_every=0"))
    return run


def test_export_out_that_is_a_file_or_a_users_folder_is_refused(tmp_path, capsys, trained_run):
    afile = tmp_path / "model.bin"
    afile.write_bytes(b"precious")
    err = _cli_error(capsys, "export", str(trained_run), "--out", str(afile))
    assert "is an existing file" in err and afile.read_bytes() == b"precious"
    assert "is a file, so no folder" in _cli_error(capsys, "export", str(trained_run), "--out", str(afile / "x"))
    mine = tmp_path / "my_models"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    err = _cli_error(capsys, "export", str(trained_run), "--out", str(mine))
    assert "holds other files and no stepdistill export" in err and (mine / "notes.txt").read_text() == "mine"


def test_cache_pairs_eval_and_bench_check_out_first(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _cli_error(capsys, "cache-pairs", "--config", "tests/tiny_dmd", "--out", str(afile), "--num", "2")
    assert "is an existing file" in err
    assert "is a file, so no folder" in _cli_error(capsys, "eval", "toy-sd", "--out", str(afile / "x"))
    assert "is a file, so no folder" in _cli_error(capsys, "bench", "--entry", "toy-sd steps=1",
                                                    "--out", str(afile / "x"))


def test_eval_names_a_missing_or_non_pipeline_folder(tmp_path, capsys):
    err = _cli_error(capsys, "eval", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert "no such folder" in err
    (tmp_path / "plain").mkdir()
    err = _cli_error(capsys, "eval", str(tmp_path / "plain"), "--out", str(tmp_path / "out"))
    assert "not a diffusers pipeline (no model_index.json)" in err


# ---- what an export records, and the Hub -----------------------------------------------------------
def test_the_export_and_its_card_hold_no_local_paths(trained_run):
    export = trained_run / "export"
    for name in ("stepdistill.json", "README.md"):
        text = (export / name).read_text()
        assert str(trained_run.parent) not in text and "/tmp" not in text and str(REPO) not in text, name
    info = json.loads((export / "stepdistill.json").read_text())
    assert info["config"]["run"]["output_dir"] == "."
    assert "from_pretrained('export')" in info["usage"]


def test_push_dry_run_and_a_bad_repo_id_change_nothing(tmp_path, capsys, trained_run):
    export = tmp_path / "export"
    shutil.copytree(trained_run / "export", export)
    before = {p.name: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    err = _cli_error(capsys, "export", str(export), "--push-to-hub", "not a repo id!!", "--dry-run")
    assert "is not a Hub repo id" in err
    assert cli.main(["export", str(export), "--push-to-hub", "me/toy-student", "--dry-run"]) == 0
    assert "would upload" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in export.rglob("*") if p.is_file()} == before


def test_the_cards_evaluation_command_names_the_run_relatively(tmp_path, trained_run):
    from stepdistill.export.hub import write_model_card

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "metrics.json").write_text(json.dumps({
        "teacher": "toy-sd", "prompts": "builtin:toy_all", "seeds_per_prompt": 1, "results": {"x": 1},
        "command": f"stepdistill toy eval {run} --seeds-per-prompt 1"}))
    card = write_model_card(run / "export", run).read_text()
    assert "stepdistill toy eval . --seeds-per-prompt 1" in card and str(tmp_path) not in card
