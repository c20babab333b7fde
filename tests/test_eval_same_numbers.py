"""The evaluator gives the numbers the two evaluators it replaced gave (stepdistill.toy.evaluate and
stepdistill.eval.evaluate before the merge), to the last digit, on the shipped toy teachers (CPU, ~20 s).

The values were recorded with the old code on the same prompts, seeds and references, on an AVX2 machine.
AVX-512 kernels give the same numbers to about 1e-5 relative, so they are compared to 1e-4 (a refactor that
changes the maths moves them far more). A change here means a change of the published numbers: make it on
purpose, not as a side effect of a refactor.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import pytest
import torch

from stepdistill.eval.provenance import git_commit
from tests.helpers import REPO


@pytest.fixture(autouse=True)
def one_thread():
    """The pinned numbers were computed on one CPU thread; more threads reorder float sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# teacher toy-sd, 3 steps, CFG 3, the 11 held-out prompts x seeds 0 and 1, 2000 procedural references each
TEACHER = {
    "all": {"num_images": 22, "num_reference": 2000, "fid": 101.2673110961914, "kid_mean": 1.0863940715789795,
            "kid_std": 0.9920207262039185, "alignment": 0.9545454382896423, "color_accuracy": 0.9545454382896423,
            "kind_accuracy": 1.0, "position_accuracy": 1.0, "diversity": 1.9038600833386274,
            "aligned_diversity": 1.694113320834375},
    "held_out": {"num_images": 22, "num_reference": 2000, "fid": 9.750364303588867,
                 "kid_mean": -0.28361397981643677, "kid_std": 1.046291470527649, "alignment": 0.9545454382896423,
                 "color_accuracy": 0.9545454382896423, "kind_accuracy": 1.0, "position_accuracy": 1.0,
                 "diversity": 1.9038600833386274, "aligned_diversity": 1.694113320834375},
}
DATA = {
    "all": {"num_images": 22, "num_reference": 2000, "fid": 81.39908599853516, "kid_mean": 0.6659226417541504,
            "kid_std": 0.7477853894233704, "alignment": 1.0, "color_accuracy": 1.0, "kind_accuracy": 1.0,
            "position_accuracy": 1.0, "diversity": 2.2268611941094947, "aligned_diversity": 2.2268611941094947},
    "held_out": {"num_images": 22, "num_reference": 2000, "fid": 3.1633617877960205,
                 "kid_mean": -0.2762800455093384, "kid_std": 0.8878063559532166, "alignment": 1.0,
                 "color_accuracy": 1.0, "kind_accuracy": 1.0, "position_accuracy": 1.0,
                 "diversity": 2.2268611941094947, "aligned_diversity": 2.2268611941094947},
}
# stepdistill eval toy-sd --steps 2 --guidance 3 --seeds 0 1 --num-images 12 --no-fid --num-reference 64 ...
EVAL = {"kid_mean": 0.7013149254496116, "kid_std": 0.3824449383163276, "kid_subset_size": 12,
        "diversity": 2.95085943005984, "alignment": 0.25, "color_accuracy": 0.25,
        "kind_accuracy": 0.8333333134651184, "position_accuracy": 0.8333333134651184, "held_out_alignment": 1.0}


def same(expected: dict) -> dict:
    """``expected`` with every float compared to 1e-4 relative (integers and keys exactly), nested too."""
    def one(v):
        return same(v) if isinstance(v, dict) else pytest.approx(v, rel=1e-4, abs=1e-6) if isinstance(v, float) else v

    return {k: one(v) for k, v in expected.items()}


def test_teacher_comparison_rows_keep_their_numbers():
    from diffusers import DiffusionPipeline

    from stepdistill.data.prompts import load_prompts
    from stepdistill.eval.compare import evaluate_entries
    from stepdistill.eval.generate import Entry
    from stepdistill.toy.teachers import teacher_path

    pipe = DiffusionPipeline.from_pretrained(str(teacher_path("toy-sd")))
    pipe.set_progress_bar_config(disable=True)
    out = evaluate_entries([Entry("teacher 3-step", pipe, 3, 3.0)], load_prompts("builtin:toy_held_out"), [0, 1],
                           32)
    assert out["results"]["teacher 3-step"]["all"] == same(TEACHER["all"])
    assert out["results"]["teacher 3-step"]["held_out"] == same(TEACHER["held_out"])
    assert out["data"] == same(DATA)


def test_pipeline_evaluation_keeps_its_numbers_and_records_provenance(tmp_path):
    from stepdistill.cli import main as cli_main

    command = ["eval", "toy-sd", "--steps", "2", "--guidance", "3", "--seeds", "0", "1", "--num-images", "12",
               "--no-fid", "--num-reference", "64", "--batch-size", "6", "--shuffle-prompts", "3",
               "--out", str(tmp_path)]
    assert cli_main(command) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["metrics"] == same(EVAL)
    prov = result["provenance"]
    assert prov["num_samples"] == 12 and prov["command"] == "stepdistill " + " ".join(command)
    assert datetime.fromisoformat(prov["date"]).utcoffset() == timedelta(0)
    assert re.fullmatch(r"[0-9a-f]{4,40}", prov["git_commit"] or "") or not (REPO / ".git").exists()
    assert git_commit(tmp_path) is None  # not a git repository
