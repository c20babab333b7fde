"""The real entry points, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import PYTHON, REPO, run

ACCELERATE = [PYTHON, "-m", "accelerate.commands.launch"]

# Runs in a process that never imports stepdistill: plain diffusers must load and run the export.
LOAD_EXPORT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    folder = sys.argv[1]
    info = json.load(open(folder + "/stepdistill.json"))
    pipe = DiffusionPipeline.from_pretrained(folder)
    res = info["config"]["model"]["resolution"]
    kwargs = {"timesteps": info["timesteps"]} if info["timesteps"] else {}
    out = pipe("a prompt", num_inference_steps=info["num_inference_steps"], guidance_scale=info["guidance_scale"],
               height=res, width=res, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs)
    image = out.images[0]
    assert "stepdistill" not in sys.modules
    print(json.dumps({"shape": list(image.shape), "std": float(np.std(image)), "pipeline": type(pipe).__name__,
                      "scheduler": type(pipe.scheduler).__name__, "steps": len(pipe.scheduler.timesteps)}))
    """
)


def _load_export(folder) -> dict:
    proc = run([PYTHON, "-c", LOAD_EXPORT, str(folder)])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_accelerate_launch_train_exports_a_plain_diffusers_pipeline(tmp_path):
    out = tmp_path / "run"
    run([*ACCELERATE, "--num_processes", "1", "--mixed_precision", "no", "train.py",
         "--config", "configs/tests/tiny_dmd2.yaml", "train.max_steps=2", f"run.output_dir={out}"])
    # Run folder: resolved config, curves, sample grid, checkpoint, export.
    assert (out / "config.yaml").read_text().count("max_steps: 2") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert {"generator/loss", "generator/dmd", "critic/loss", "critic/denoising", "grad_norm/generator",
            "grad_norm/critic", "generator/stats/dmd_grad_norm"} <= set(rows[0])
    assert all(np.isfinite(v) for r in rows for v in r.values())
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "generator/loss" in header and "critic/loss" in header
    grid = sorted((out / "samples").glob("*.png"))
    assert grid and Image.open(grid[-1]).size[1] > 0
    assert (out / "checkpoints" / "checkpoint-2" / "stepdistill_state.json").is_file()
    info = json.loads((out / "export" / "stepdistill.json").read_text())
    assert info["method"] == "dmd2" and info["num_inference_steps"] >= 1

    result = _load_export(out / "export")
    res = info["config"]["model"]["resolution"]
    assert result["shape"] == [res, res, 3]
    assert result["steps"] == info["num_inference_steps"]
    assert result["std"] > 0  # not a blank image


@pytest.mark.parametrize("config, roles", [
    # (tiny DMD2 under 2-process DDP, with these checks, is tests/test_fsdp2.py's baseline run)
    # LADD's discriminator: DDP-wrapped heads on the teacher's never-wrapped backbone.
    ("tests/tiny_ladd", {"generator", "discriminator"}),
    # VSD's LoRA critic on the teacher's shared base: its gradients averaged by the harness in one bucket.
    pytest.param("tests/tiny_vsd", {"generator", "critic"}, marks=pytest.mark.slow),
])
def test_two_process_ddp_ends_with_identical_weights(tmp_path, config, roles):
    out = tmp_path / "ddp"
    run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "train.py",
         "--config", config, "train.max_steps=2", "export.enabled=false", "train.sample_every=0",
         "train.log_every=1", "roles.generator.lr_scheduler=constant_with_warmup", "roles.generator.lr_warmup_steps=4",
         f"run.output_dir={out}"], env={"CUDA_VISIBLE_DEVICES": ""})
    done = json.loads((out / "DONE.json").read_text())
    assert done["num_processes"] == 2
    for role, per_rank in done["weight_sha256"].items():
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1], f"{role} differs between ranks"
    assert set(done["weight_sha256"]) == roles
    # The warmup counts updates, not updates x processes: after the first one the LR is 1/4 of the base.
    base = yaml.safe_load((out / "config.yaml").read_text())["roles"]["generator"]["lr"]
    first = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if "lr/generator" in line)
    assert first["lr/generator"] == pytest.approx(base / 4, rel=1e-6)


@pytest.mark.parametrize("world_size, torn_down", [("2", False), ("1", True)])
def test_a_worker_of_a_launch_leaves_without_the_interpreter_teardown(world_size, torn_down):
    """A torchrun worker (WORLD_SIZE > 1) ends in ``finish`` with its status and its output flushed, and
    without the teardown in which a process group's threads can abort the process (an atexit handler
    stands for that teardown); a single process returns and is torn down as usual."""
    import subprocess

    script = ("import atexit, sys; from stepdistill.train import finish\n"
              "atexit.register(lambda: print('teardown'))\n"
              "print('written', end=''); sys.stderr.write('to stderr')\n"
              "sys.exit(finish(3))\n")
    proc = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "WORLD_SIZE": world_size})
    assert proc.returncode == 3
    assert proc.stdout.startswith("written") and proc.stderr.endswith("to stderr")
    assert ("teardown" in proc.stdout) == torn_down


def test_export_command_from_a_checkpoint(tmp_path):
    from stepdistill import lifecycle
    from tests.helpers import tiny_config

    out = tmp_path / "run"
    lifecycle.run(tiny_config(out, "dmd2", "train.max_steps=1", "export.enabled=false", "train.sample_every=0"))
    assert not (out / "export").exists()
    exported = tmp_path / "exported"
    run([PYTHON, "-m", "stepdistill.cli", "export", str(out), "--out", str(exported)])
    result = _load_export(exported)
    assert result["pipeline"] == "StableDiffusionPipeline"
    assert result["scheduler"] == "LCMScheduler"


@pytest.mark.parametrize("bad, message", [
    (["train.max_stepz=3"], "train.max_stepz"),
    (["model.family=sd99"], "sd99"),
    (["method.gan_critic_weight=0.1"], "data.images"),  # the GAN term needs real data
    (["method.regression_weight=0.25"], "stepdistill cache-pairs"),  # DMD's regression needs teacher pairs
])
def test_train_py_config_errors_exit_cleanly(bad, message):
    import subprocess

    proc = subprocess.run([PYTHON, "train.py", "--config", "tests/tiny_dmd2", *bad], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_trackers_tensorboard_and_offline_wandb(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stepdistill.lifecycle import run as train
    from tests.helpers import tiny_config

    out = tmp_path / "run"
    train(tiny_config(out, "dmd2", "run.trackers=[tensorboard,wandb]", "train.max_steps=2", "export.enabled=false",
                      "train.sample_every=1"))
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert {"generator/loss", "critic/loss", "grad_norm/critic"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("critic/loss")] == [0, 1]
    assert "samples" in acc.Tags()["images"]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs and runs[0].stat().st_size > 0, "wandb did not write an offline run"


def test_cpu_threads_use_the_available_cores(monkeypatch):
    import os

    from stepdistill.harness.trainer import cpu_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(0, 1) == cores and cpu_threads(3, 1) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads(0, 2) == max(1, cores // 2)
    # What `accelerate launch` exports (OMP_NUM_THREADS=1) does not pin a training run to one core.
    proc = run([PYTHON, "-c", "import torch\nfrom stepdistill.runconfig import load_config\n"
                "from stepdistill.harness.trainer import Trainer\n"
                "Trainer(load_config('tests/tiny_dmd2', ['run.trackers=[none]']))\n"
                "print('threads', torch.get_num_threads())"],
               env={"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1"})
    assert f"threads {cores}" in proc.stdout
