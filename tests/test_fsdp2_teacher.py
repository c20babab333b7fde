"""train.fsdp_shard_teacher: the frozen teacher's backbone sharded with FSDP2 too (2 gloo processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stepdistill.harness.preflight import validate_paths
from stepdistill.runconfig import load_config
from tests.helpers import REPO, with_free_port


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k.endswith("loss") or k.startswith("grad_norm/")} for r in rows]


# Trains as train.py does, and says whether the teacher's weights are sharded (DTensors) on this process.
SCRIPT = """
import sys
from torch.distributed.tensor import DTensor
from stepdistill.harness.trainer import Trainer
from stepdistill.runconfig import load_config
trainer = Trainer(load_config("tests/tiny_dmd2", sys.argv[1:]))
print("teacher sharded:", all(isinstance(p, DTensor) for p in trainer.teacher.backbone.parameters()))
trainer.train()
trainer.finish()
# as train.py ends a launched process: a process group's threads can abort the interpreter's teardown
from stepdistill.train import finish
sys.exit(finish(0))
"""


def _launch(run_dir, *overrides):
    script = run_dir.parent / "train_and_say.py"
    script.write_text(SCRIPT)
    cmd = with_free_port([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          str(script), f"run.output_dir={run_dir}", "run.trackers=[none]",
                          "train.max_steps=4", "train.log_every=1", "train.sample_every=0", "export.enabled=false",
                          "eval.enabled=false", "train.progress_bar=false", *overrides])
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return _losses(run_dir), done.stdout.count("teacher sharded: True")


@pytest.mark.slow
def test_a_sharded_teacher_trains_like_a_whole_one(tmp_path, tiny_pipeline_dir):
    tiny_pipeline_dir("sd15")  # built here once: two processes building it at once would race
    whole, n_whole = _launch(tmp_path / "ddp")
    sharded, n_sharded = _launch(tmp_path / "fsdp2_teacher", "train.parallel=fsdp2", "train.fsdp_shard_teacher=true")
    assert (n_whole, n_sharded) == (0, 2)  # both processes hold only shards of the teacher
    assert len(whole) == len(sharded) == 4
    for a, b in zip(whole, sharded):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_a_sharded_teacher_refuses_roles_on_its_base():
    cfg = load_config("tests/tiny_vsd", ["train.parallel=fsdp2", "train.fsdp_shard_teacher=true"])
    with pytest.raises(ValueError, match="live on the teacher's backbone"):
        validate_paths(cfg)
    cfg = load_config("tests/tiny_dmd2", ["train.fsdp_shard_teacher=true"])
    with pytest.raises(ValueError, match="set train.parallel=fsdp2"):
        validate_paths(cfg)
