"""FSDP2 (``train.parallel=fsdp2``) on 2 CPU processes over gloo, against the same run under DDP.

The harness shards the trainable full-weight roles itself with torch's ``fully_shard`` (accelerate's
FSDP plugin is GPU-only), so these runs exercise the very code a GPU run takes, over gloo.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import PYTHON, run

ACCELERATE = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--mixed_precision", "no", "train.py"]
LOSS_TOL = 1e-5  # summation order differs (sharded reduce-scatter vs DDP's all-reduce)
WEIGHT_TOL = 1e-5


def _launch(config: str, out: Path, *overrides: str) -> None:
    run([*ACCELERATE, "--config", config, "train.log_every=1", "train.sample_every=0", "eval.enabled=false",
         "run.trackers=[none]", "train.progress_bar=false", f"run.output_dir={out}", *overrides],
        env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})


def _metrics(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _losses_close(a: dict[int, dict], b: dict[int, dict], steps) -> None:
    for step in steps:
        keys = [k for k in a[step] if "loss" in k or "grad_norm" in k or k.startswith("lr/")]
        assert keys
        for key in keys:
            assert b[step][key] == pytest.approx(a[step][key], abs=LOSS_TOL, rel=LOSS_TOL), (step, key)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, folder
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _assert_weights_close(a: Path, b: Path, tol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= tol, worst


# A 4-update warmup: the LR after update 1 is base / 4 on any number of processes (both runs log it).
WARMUP = ("roles.generator.lr_scheduler=constant_with_warmup", "roles.generator.lr_warmup_steps=4")


def _check_against_ddp(tmp_path: Path, config: str, student_dir: str, *overrides: str) -> Path:
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp2"
    _launch(config, ddp, "train.max_steps=6", *WARMUP, *overrides)
    _launch(config, fsdp, "train.max_steps=6", "train.parallel=fsdp2", "train.checkpoint_every=3",
            "train.checkpoints_total_limit=0", *WARMUP, *overrides)
    for run_dir in (ddp, fsdp):
        done = json.loads((run_dir / "DONE.json").read_text())
        assert done["num_processes"] == 2
        for role, per_rank in done["weight_sha256"].items():
            assert len(per_rank) == 2 and per_rank[0] == per_rank[1], f"{run_dir.name}: {role} differs between ranks"
    base = yaml.safe_load((ddp / "config.yaml").read_text())["roles"]["generator"]["lr"]
    first = next(m for _, m in sorted(_metrics(ddp).items()) if "lr/generator" in m)
    assert first["lr/generator"] == pytest.approx(base / 4, rel=1e-6)
    _losses_close(_metrics(ddp), _metrics(fsdp), range(6))
    _assert_weights_close(ddp / "export" / student_dir, fsdp / "export" / student_dir, WEIGHT_TOL)
    return fsdp


def test_fsdp2_dmd2_matches_ddp_resumes_exactly_and_exports(tmp_path):
    """Tiny DMD2 (full-weight generator with an export EMA, critic with its GAN head, a 2-step student):
    FSDP2 gives DDP's losses and exported (EMA) weights; a run resumed from its step-3 checkpoint ends where the uninterrupted one did; the
    checkpoint exports what the run exported; the export loads in plain diffusers."""
    from diffusers import DiffusionPipeline

    from stepdistill.export.pipeline import export_from_run

    ema = "roles.generator.ema_decay=0.9"  # the export EMA: shadows sharded like the weights, swapped in to export
    fsdp = _check_against_ddp(tmp_path, "tests/tiny_dmd2", "unet", ema)

    # Kill -> resume: the step-3 checkpoint alone, resumed to step 6 under FSDP2.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(fsdp / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    shutil.copy(fsdp / "config.yaml", resumed / "config.yaml")
    _launch("tests/tiny_dmd2", resumed, "train.max_steps=6", "train.parallel=fsdp2", "train.resume=latest", *WARMUP,
            ema)
    a, b = _metrics(fsdp), _metrics(resumed)
    for step in (3, 4, 5):
        assert b[step] == a[step], step  # bit for bit: same shards, same RNG states
    _assert_weights_close(fsdp / "export" / "unet", resumed / "export" / "unet", 0.0)

    # Onto another process count: the 2-process checkpoint resumed by one process (weights and AdamW states
    # whole in the checkpoint) continues; its step-3 weights are those a checkpoint export gives.
    from stepdistill import lifecycle
    from tests.helpers import tiny_config

    single = tmp_path / "single"
    (single / "checkpoints").mkdir(parents=True)
    shutil.copytree(fsdp / "checkpoints" / "checkpoint-3", single / "checkpoints" / "checkpoint-3")
    shutil.copy(fsdp / "config.yaml", single / "config.yaml")
    cfg = tiny_config(single, "dmd2", "train.parallel=fsdp2", "train.max_steps=3", "train.resume=latest",
                      "train.sample_every=0", "eval.enabled=false", "export.use_ema=false", *WARMUP, ema)
    lifecycle.run(cfg)  # resumed at step 3 of 3: nothing to train, the loaded weights exported
    at_3 = export_from_run(fsdp / "checkpoints" / "checkpoint-3", tmp_path / "at_3", use_ema=False)
    _assert_weights_close(at_3 / "unet", single / "export" / "unet", 0.0)
    cfg.train.max_steps = 5
    lifecycle.run(cfg)  # and two more steps, with the loaded AdamW states and schedule
    assert sorted(_metrics(single)) == [3, 4]

    # `stepdistill export` of the final checkpoint: the full weights gathered into the plain folder.
    exported = export_from_run(fsdp / "checkpoints" / "checkpoint-6", tmp_path / "from_checkpoint")
    _assert_weights_close(fsdp / "export" / "unet", exported / "unet", 0.0)

    pipe = DiffusionPipeline.from_pretrained(str(fsdp / "export"))
    pipe.set_progress_bar_config(disable=True)
    info = json.loads((fsdp / "export" / "stepdistill.json").read_text())
    res = info["config"]["model"]["resolution"]
    image = pipe("a prompt", num_inference_steps=info["num_inference_steps"], guidance_scale=0.0, height=res,
                 width=res, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (res, res, 3) and image.std() > 0


@pytest.mark.slow
@pytest.mark.parametrize("config, student_dir", [
    ("tests/tiny_vsd", "unet"),  # LoRA critic on the teacher's shared base beside a sharded generator
    ("tests/tiny_lcm", "unet"),  # a sharded student and its sharded EMA target
])
def test_fsdp2_matches_ddp(tmp_path, config, student_dir):
    _check_against_ddp(tmp_path, config, student_dir)


def test_fsdp2_is_a_config_choice():
    from stepdistill.runconfig import load_config

    cfg = load_config("tests/tiny_dmd2", ["train.parallel=fsdp2"])
    assert cfg.train.parallel == "fsdp2"
    with pytest.raises(ValueError, match="train.parallel"):
        load_config("tests/tiny_dmd2", ["train.parallel=fsdp"])


def test_accelerates_fsdp_plugin_is_refused_with_the_fix(monkeypatch, tmp_path):
    from stepdistill.harness.preflight import preflight
    from stepdistill.runconfig import load_config

    cfg = load_config("tests/tiny_dmd2", [f"run.output_dir={tmp_path / 'run'}"])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for distributed_type: FSDP
    with pytest.raises(ValueError, match="train.parallel=fsdp2"):
        preflight(cfg)


@pytest.mark.slow  # the default DMD2 test resumes a 2-process checkpoint on one process and exports it
def test_one_process_fsdp2_run_keeps_the_fsdp2_layout_and_resumes(tmp_path):
    """One process has nothing to shard over: the roles stay whole, but the checkpoint has the fsdp2 layout
    (weights, AdamW states and schedule whole beside accelerate's files), so it resumes and exports."""
    from stepdistill import lifecycle
    from stepdistill.export.pipeline import export_from_run
    from tests.helpers import tiny_config

    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, "dmd2", "train.parallel=fsdp2", "train.max_steps=2", "train.checkpoint_every=1",
                      "train.checkpoints_total_limit=0", "train.sample_every=0", "eval.enabled=false")
    lifecycle.run(cfg)
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()  # no role is accelerate's: both are in extra states
    resumed = tiny_config(tmp_path / "resumed", "dmd2", "train.parallel=fsdp2", "train.max_steps=2",
                          "train.sample_every=0", "eval.enabled=false")
    shutil.copytree(run_dir / "checkpoints" / "checkpoint-1", tmp_path / "resumed" / "checkpoints" / "checkpoint-1")
    shutil.copy(run_dir / "config.yaml", tmp_path / "resumed" / "config.yaml")
    resumed.train.resume = "latest"
    lifecycle.run(resumed)
    assert _metrics(tmp_path / "resumed")[1] == _metrics(run_dir)[1]
    _assert_weights_close(run_dir / "export" / "unet", tmp_path / "resumed" / "export" / "unet", 0.0)
    exported = export_from_run(checkpoint, tmp_path / "from_checkpoint")
    _assert_weights_close(run_dir / "export" / "unet", exported / "unet", 0.0)


# ---- one process, in-process: what sharding does to a forward and a backward ---------------------

@pytest.fixture
def one_process_group():
    """A 1-process gloo group in this process: ``fully_shard`` installs its hooks, casts and DTensors as
    on N processes (nothing is split), so a forward and backward can be compared with the unsharded ones."""
    import torch.distributed as dist

    from tests.helpers import free_port

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tiny_unet(tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_pipeline_dir("sd15") / "unet"))


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    # 999 and 561 are not bf16 numbers (bf16 rounds them to 1000 and 560)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999.0, 561.0]), torch.randn(2, 7, 32, generator=g)


def test_fsdp2_bf16_sees_the_timesteps_and_gives_the_autocast_forward(one_process_group, tiny_pipeline_dir):
    """bf16 mixed precision: the sharded UNet gathers bf16 weights, but its inputs keep their dtype (the
    trainer's autocast casts activations, as under DDP). FSDP's default input cast rounded the timesteps
    to bf16 (999 -> 1000): a sharded critic saw other noise levels than the unsharded teacher, and its
    prediction was 3.4% off the DDP one."""
    from stepdistill.harness.parallel import is_sharded, shard

    unet = _tiny_unet(tiny_pipeline_dir)
    x, t, c = _unet_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ddp = unet(x, t, c).sample.float()  # what DDP runs: float32 weights under autocast
    seen = []
    unet.time_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    shard(unet, "bf16")
    assert is_sharded(next(unet.parameters()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fsdp = unet(x, t, c).sample.float()
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [999.0, 561.0]
    assert (fsdp - ddp).abs().max().item() == 0.0, ((fsdp - ddp).norm() / ddp.norm()).item()


def test_fsdp2_gradient_checkpointing_recomputes_and_gives_the_same_gradients(one_process_group,
                                                                                 tiny_pipeline_dir):
    """Activation checkpointing (``roles.<role>.gradient_checkpointing``) under FSDP2: the blocks are run
    again in backward (inside the sharded units, whose weights are gathered for it) and the gradients are
    those of the sharded UNet without checkpointing, bit for bit."""
    import copy

    from stepdistill.harness.parallel import full_tensor, shard
    from stepdistill.models.lora import enable_adapter_aware_checkpointing

    x, t, c = _unet_inputs()
    grads, calls = {}, {}
    base = _tiny_unet(tiny_pipeline_dir).train()
    for checkpointing in (False, True):
        unet = copy.deepcopy(base)
        if checkpointing:
            enable_adapter_aware_checkpointing(unet)
        n = []
        # a pre-hook: checkpoint's recomputation stops once it has what backward needs (no post-hook)
        unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_, n=n: n.append(1))
        shard(unet)
        unet(x, t, c).sample.square().mean().backward()
        calls[checkpointing] = len(n)
        grads[checkpointing] = {k: full_tensor(p.grad).clone() for k, p in unet.named_parameters()}
    assert calls == {False: 1, True: 2}  # the checkpointed resnet ran again in backward
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 100
    for k, g in grads[False].items():
        assert torch.equal(grads[True][k], g), k
