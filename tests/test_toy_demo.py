"""The main job on the shipped toy teacher: a short DMD2 run, its export, and the evaluation files."""

from __future__ import annotations

import json

import pytest

from stepdistill import lifecycle
from tests.helpers import PYTHON, REPO, run


def test_two_step_dmd2_on_toy_sd_exports_evaluates_and_loads(tmp_path):
    from stepdistill.harness.trainer import Trainer
    from stepdistill.runconfig import load_config

    out = tmp_path / "toy"
    cfg = load_config("toy/dmd2", [f"run.output_dir={out}", "run.trackers=[none]", "train.max_steps=2",
                                   "train.progress_bar=false", "data.batch_size=4", "eval.seeds_per_prompt=1",
                                   "eval.teacher_steps=4", "eval.prompts=builtin:toy_held_out",
                                   "eval.teacher_baselines=[{steps: 1, guidance: 1.0}]"])
    trainer = Trainer(cfg)
    lifecycle.run(trainer)
    # The evaluation wrote its numbers for teacher and student, on all prompts and the held-out ones.
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["results"]
    assert set(rows) == {"teacher 4-step", "teacher 1-step CFG 1", "student 1-step"}
    assert rows["teacher 1-step CFG 1"]["steps"] == 1 and rows["teacher 1-step CFG 1"]["guidance_scale"] == 1.0
    for row in rows.values():
        for split in ("all", "held_out"):
            assert 0.0 <= row[split]["alignment"] <= 1.0 and row[split]["fid"] >= 0.0
        assert row["latency_ms_per_image"] > 0
    assert (out / "comparison.png").is_file() and "| teacher 4-step |" in (out / "summary.md").read_text()
    # The data row: real renderings of the same prompts and count (the FID floor, the diversity to match).
    data = metrics["data"]
    assert data["all"]["num_images"] == rows["student 1-step"]["all"]["num_images"]
    assert data["all"]["alignment"] >= 0.95 and data["all"]["fid"] < rows["teacher 1-step CFG 1"]["all"]["fid"]
    assert (out / "summary.md").read_text().splitlines()[2].startswith("| real images (the data")
    # The export's model card carries the evaluation and the comparison grid.
    card = (out / "export" / "README.md").read_text()
    assert "| teacher 4-step |" in card and "![samples](samples.png)" in card
    # ... and the command that measures the numbers again.
    assert metrics["command"] == f"stepdistill toy eval {out} --seeds-per-prompt 1 --student-steps 1"
    # ... and the command that measured it, with the run folder as "." (the card is uploaded: no local path).
    assert metrics["command"].startswith(f"stepdistill toy eval {out} ")
    assert f"Measured with `{metrics['command'].replace(str(out), '.')}`." in card and str(tmp_path) not in card
    assert (out / "export" / "samples.png").read_bytes() == (out / "comparison.png").read_bytes()
    # Plain diffusers (a process that never imports stepdistill) loads the export and generates.
    code = (
        "import sys, diffusers\n"
        f"pipe = diffusers.DiffusionPipeline.from_pretrained({str(out / 'export')!r})\n"
        "img = pipe('a red circle at the top left', num_inference_steps=1, guidance_scale=0, height=32, width=32,\n"
        "           output_type='np').images[0]\n"
        "assert 'stepdistill' not in sys.modules\n"
        "print(type(pipe).__name__, img.shape)\n"
    )
    proc = run([PYTHON, "-c", code], cwd=REPO)
    assert "StableDiffusionPipeline (32, 32, 3)" in proc.stdout


@pytest.mark.slow
def test_full_demo_meets_the_quality_bar(tmp_path):
    """The documented main job, whole (minutes): the one-step student against the 50-step teacher."""
    out = tmp_path / "demo"
    run([PYTHON, "-m", "stepdistill.cli", "demo", f"run.output_dir={out}"], timeout=1800)
    rows = json.loads((out / "metrics.json").read_text())["results"]
    teacher, student = rows["teacher 50-step"], rows["student 1-step"]
    assert student["all"]["fid"] <= 1.5 * teacher["all"]["fid"]
    assert student["all"]["alignment"] >= teacher["all"]["alignment"] - 0.03
    assert student["held_out"]["alignment"] >= teacher["held_out"]["alignment"] - 0.03
