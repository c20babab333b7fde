"""`stepdistill plan`: the memory tracker, the FakeTensorMode iteration against a real one, the per-GPU
projection, the command, and real-size architectures trained one iteration without weights."""

from __future__ import annotations

import json

import pytest
import torch

from stepdistill.plan.cli import parse_bytes, plan_main
from stepdistill.plan.estimate import estimate
from stepdistill.plan.memory import ACTIVATIONS, MemoryTracker
from stepdistill.plan.run import measure, phase_schedule
from stepdistill.runconfig import load_config
from tests.helpers import allocator_peak

MiB = 2**20


@pytest.fixture(autouse=True)
def accelerator_state_left_as_found():
    """A planner trainer (bf16) must not leave its accelerate state to the next test's Accelerator."""
    from stepdistill.plan.run import own_accelerator_state

    with own_accelerator_state():
        yield


def test_tracker_counts_each_storage_once_and_frees_it():
    tracker = MemoryTracker()
    with tracker:
        a = torch.zeros(256, 1024)  # 1 MiB
        view = a[:128]  # same storage: not counted again
        b = a + 1  # 1 MiB
        assert tracker.live_bytes == 2 * MiB
        del b
        c = torch.zeros(128, 1024)  # 0.5 MiB
    assert tracker.live_bytes == 1.5 * MiB and tracker.peak == 2 * MiB
    assert tracker.at_peak == {ACTIVATIONS: 2 * MiB}
    del view, a, c
    assert tracker.live_bytes == 0


def test_tracker_tags_parameters_gradients_and_autocast_copies():
    layer = torch.nn.Linear(512, 512, bias=False)  # 1 MiB of float32 weight
    tracker = MemoryTracker()
    tracker.register_parameters(layer.parameters(), "params/net", "grads/net")
    x = torch.randn(4, 512)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)  # the bf16 copy of the weight is autocast's
            assert tracker.totals["autocast/net"] == MiB // 2
        y.float().sum().backward()
    assert tracker.totals["params/net"] == MiB and tracker.totals["grads/net"] == MiB
    tracker.close()


def test_phase_schedule_covers_one_ttur_cycle():
    class TTUR:
        def phases(self, step):
            return ["critic", "generator"] if step % 5 == 0 else ["critic"]

    first, counts, length = phase_schedule(TTUR())
    assert first == {"critic": 0, "generator": 0} and counts == {"critic": 5, "generator": 1} and length == 5


@pytest.fixture(scope="module")
def tiny_dmd2():
    return measure(load_config("tests/tiny_dmd2", ["run.trackers=[none]"]))


@pytest.mark.slow
def test_a_fake_iteration_measures_what_the_real_one_holds(tiny_dmd2):
    fake = tiny_dmd2
    cfg = load_config("tests/tiny_dmd2", ["run.trackers=[none]"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        real = measure(cfg, fake=False)
    allocator = allocator_peak(prof)
    # Same harness, same ops: the same persistent bytes and FLOPs with and without weights, and the same peak
    # but for a few bytes (a CPU kernel's own scratch: 2 KiB in 31 MiB here).
    assert fake.persistent == real.persistent
    assert fake.phase_flops == real.phase_flops and fake.flops_per_step > 0
    assert abs(fake.peak - real.peak) <= 1e-3 * real.peak
    trainable = fake.trainable["generator"]
    assert fake.persistent["generator"]["optimizer"] >= 2 * 4 * trainable  # AdamW: two fp32 moments
    assert fake.persistent["generator"]["params"] == 4 * trainable
    # The real run's allocator peak (model building included) is within 15 % of the planner's.
    print(f"planner {fake.peak} B, allocator {allocator} B")
    assert abs(allocator - fake.peak) <= 0.15 * allocator, (allocator, fake.peak)


def test_ddp_and_fsdp2_per_gpu_figures(tiny_dmd2):
    m = tiny_dmd2
    assert m.persistent["generator"]["params"] == 4 * m.trainable["generator"]  # fp32 master weights
    one = estimate(m, "ddp", 1)
    assert one.peak == m.peak and one.communication == 0
    ddp = estimate(m, "ddp", 4)
    assert ddp.communication == 4 * sum(m.ddp_bucketed.values()) and ddp.peak == m.peak + ddp.communication
    fsdp = estimate(m, "fsdp2", 4)
    assert set(m.fsdp_sharded) == {"generator", "critic"}
    for role in m.fsdp_sharded:
        for kind, nbytes in m.held[role].items():
            if kind != "autocast":
                assert fsdp.held[role][kind] == -(-nbytes // 4)
    assert fsdp.held["unet"] == m.held["unet"]  # the frozen teacher stays whole
    assert fsdp.peak < m.peak


@pytest.mark.parametrize("override, key", [("data.embeddings=/no/such/cache", "data.embeddings"),
                                           ("model.offload_text_encoders=true", "model.offload_text_encoders")])
def test_text_encoders_the_run_keeps_off_the_gpu_are_left_out(tiny_dmd2, override, key):
    """With an embedding cache (not read: the planner encodes its own prompts, the same shapes) or offloaded
    encoders, the text encoders hold nothing on the GPU; everything else is measured as without."""
    m = measure(load_config("tests/tiny_dmd2", ["run.trackers=[none]", override]))
    assert m.off_gpu == {"text_encoder": key}
    text = sum(tiny_dmd2.held["text_encoder"].values())
    assert text > 0 and m.held == tiny_dmd2.held and m.activations == tiny_dmd2.activations
    one = estimate(m, "ddp", 1)
    assert "text_encoder" not in one.held and one.peak == tiny_dmd2.peak - text


def test_plan_command_prints_json_and_refuses_bad_input(capsys):
    assert plan_main(["--config", "tests/tiny_dmd2", "--json", "--num-processes", "2", "--parallel", "fsdp2",
                      "--gpu-memory", "1MiB", "--no-suggestions", "data.batch_size=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured"]["config"]["batch_size"] == 2 and out["estimate"]["num_processes"] == 2
    assert out["budget"] == MiB and out["fits"] is False and out["seconds_per_step"] > 0
    assert plan_main(["--config", "tests/tiny_dmd2", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory='lots'" in capsys.readouterr().err
    assert plan_main(["--config", "tests/tiny_dmd2", "data.nope=1"]) == 2
    assert "data.nope" in capsys.readouterr().err
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("24 GB") == 24 * 10**9 and parse_bytes("2") == 2 * 2**30


@pytest.mark.slow
def test_suggestions_are_measured_when_it_does_not_fit(capsys):
    assert plan_main(["--config", "tests/tiny_dmd2", "--gpu-memory", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit in 0.00 GiB" in out and "Changes that cut the peak" in out
    assert "gradient checkpointing: roles.generator.gradient_checkpointing=true" in out
    assert "FSDP2 over 8 GPUs" in out


def test_checkpointed_lora_iteration_matches_a_plain_run(tmp_path):
    """The planner against the allocator of a plain iteration (no tracker, no FLOP counter), with gradient
    checkpointing and a LoRA critic on the shared base. torch's FlopCounterMode keeps every checkpointed
    block's recomputed activations alive through the backward (+6 % here, x4.5 on SDXL): the planner's
    FLOP counter must not change what it measures."""
    from stepdistill.plan.run import plain_iteration

    cfg = load_config("tests/tiny_dmd2", ["run.trackers=[none]", "roles.generator.gradient_checkpointing=true",
                                          "roles.critic.gradient_checkpointing=true", "roles.critic.lora_rank=4",
                                          "roles.critic.share_teacher_base=true"])
    fake = measure(cfg)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        plain_iteration(cfg, tmp_path)
    peak = allocator_peak(prof)
    assert abs(fake.peak - peak) <= 0.01 * peak, (fake.peak, peak)


# One planner iteration with real weights on each process of a launch: its allocator peak from the first
# phase on (the building of the roles before it is left out: FSDP2 shards whole models after building them).
RANK_SCRIPT = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])  # the repository, for tests.helpers
from stepdistill.plan.run import ITERATION, plain_iteration
from stepdistill.runconfig import load_config
from stepdistill.train import finish
from tests.helpers import allocator_peak
out = Path(sys.argv[1])
cfg = load_config("tests/tiny_dmd2", ["run.trackers=[none]", *sys.argv[3:]])
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
    trainer = plain_iteration(cfg, out)
rank = trainer.accelerator.process_index
(out / f"rank{rank}.json").write_text(json.dumps(allocator_peak(prof, after=ITERATION)))
sys.exit(finish(0))
"""


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_process_figures_match_each_process_allocator(tmp_path, tiny_pipeline_dir, parallel):
    """The DDP and FSDP2 figures are derived from the one-process run (``plan.estimate``); here they meet
    the allocator peak of each process of a real 2-process gloo launch of the same iteration, within the
    issue's 15 %. (DDP: at times one process also holds a role's gradient bucket twice for a moment, when
    the reducer rebuilds its buckets after the first backward: +10 % on this 1 M-parameter model.)"""
    import subprocess
    import sys

    from tests.helpers import REPO, with_free_port

    tiny_pipeline_dir("sd15")  # built here once: two processes building it at once would race
    script = tmp_path / "rank_peak.py"
    script.write_text(RANK_SCRIPT)
    overrides = [f"train.parallel={parallel}"]
    cmd = with_free_port([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          str(script), str(tmp_path), str(REPO), *overrides])
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-4000:]
    measured = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    planned = estimate(measure(load_config("tests/tiny_dmd2", ["run.trackers=[none]", *overrides])), parallel, 2)
    one = measure(load_config("tests/tiny_dmd2", ["run.trackers=[none]"])).peak
    print(f"{parallel} over 2: planner {planned.peak} B per process (one process {one} B), allocator {measured} B")
    assert abs(planned.peak - max(measured)) <= 0.15 * max(measured), (planned.peak, measured)
    # what N changes is a real part of the figure: DDP's buckets add, FSDP2's shards take away
    assert (planned.peak > one) if parallel == "ddp" else (planned.peak < one)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_planner_matches_the_allocator_on_a_mid_size_unet(precision, tmp_path, tiny_pipeline_dir):
    """A 70 M-parameter SD-style UNet, DMD2 at batch 4: the planner's peak against the CPU allocator's."""
    import shutil

    folder = tmp_path / "mid"
    shutil.copytree(tiny_pipeline_dir("sd15"), folder)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    unet.update(block_out_channels=[128, 256, 512], layers_per_block=2, attention_head_dim=8, norm_num_groups=32,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    cfg = load_config("tests/tiny_dmd2", ["run.trackers=[none]", f"model.pretrained={folder}", "data.batch_size=4",
                                          "model.resolution=256"]
                      + (["train.mixed_precision=bf16", "model.weight_dtype=bf16"] if precision == "bf16" else []))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        real = measure(cfg, fake=False)
    allocator = allocator_peak(prof)
    fake = measure(cfg)
    assert 50e6 <= fake.parameters["unet"] <= 100e6
    print(f"mid-size UNet, mixed precision {precision} ({fake.parameters['unet'] / 1e6:.0f} M): planner {fake.peak / 2**20:.1f} MiB, "
          f"allocator {allocator / 2**20:.1f} MiB, real-weights tracker {real.peak / 2**20:.1f} MiB")
    assert abs(allocator - fake.peak) <= 0.15 * allocator


# ---- real-size architectures, one iteration each, no weights ------------------------------------
def _student_runs_in_its_export(cfg_name: str, overrides: list[str]):
    """One training iteration of the real architecture, then its exported pipeline samples (latents)."""
    import tempfile
    from pathlib import Path

    from stepdistill.export.pipeline import student_pipeline
    from stepdistill.models.loading import as_dtype
    from stepdistill.plan.run import planned_trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer, family = planned_trainer(load_config(cfg_name, overrides), Path(tmp))
        cfg, teacher = trainer.cfg, trainer.teacher
        first, _, _ = phase_schedule(trainer.method)
        logs = {}
        for phase, step in first.items():
            logs.update(trainer.run_phase(phase, step))
        exported = student_pipeline(teacher, trainer.method, trainer.roles[trainer.method.student_role],
                                    as_dtype(cfg.model.weight_dtype))
        timesteps = trainer.method.export_timesteps()
        steps = {"timesteps": timesteps} if timesteps else {"num_inference_steps": getattr(cfg.method, "num_steps", 1)}
        # The networks are fake; the scheduler and the initial noise stay real, as in training.
        latents = exported(["a photo of a cat"], **steps, height=cfg.model.resolution, width=cfg.model.resolution,
                           output_type="latent").images
    return family, logs, latents


@pytest.mark.parametrize("cfg_name, overrides, family, latent", [
    ("dmd2_sd15", ["data.batch_size=1"], "sd15", (1, 4, 64, 64)),
    pytest.param("dmd2_sdxl_4step_lora", ["data.batch_size=1"], "sdxl", (1, 4, 128, 128), marks=pytest.mark.slow),
    pytest.param("scm_sd3", ["data.batch_size=1"], "sd3", (1, 16, 128, 128), marks=pytest.mark.slow),
    pytest.param("dmd2_sd15", ["data.batch_size=1", "model.pretrained=black-forest-labs/FLUX.1-dev",
                               "model.family=flux", "model.resolution=1024", "method.generator_timesteps=null"],
                 "flux", (1, 4096, 64),
                 marks=pytest.mark.slow),
])
def test_real_size_iteration_and_export_without_weights(cfg_name, overrides, family, latent):
    got, logs, latents = _student_runs_in_its_export(cfg_name, overrides)
    assert got == family
    losses = [k for k in logs if k.endswith("/loss")]
    assert losses and all(logs[k].shape == () for k in losses)
    assert tuple(latents.shape) == latent


def test_fsdp2_arithmetic_on_a_known_layout():
    from stepdistill.plan.run import Measured

    m = Measured(peak=1450, peak_phase="generator", activations=50, flops_per_step=1.0, phase_flops={"generator": 1},
                 phase_counts={"generator": 1}, cycle=1,
                 held={"unet": {"params": 100}, "generator": {"params": 400, "grads": 400, "optimizer": 400,
                                                              "autocast": 100}},
                 persistent={}, ddp_bucketed={"generator": 100}, fsdp_sharded=["generator", "unet"],
                 largest_unit={"generator": 10, "unet": 5}, config={"mixed_precision": "bf16"})
    assert estimate(m, "ddp", 1).peak == 1450
    ddp = estimate(m, "ddp", 2)
    assert ddp.communication == 400 and ddp.peak == 1850
    fsdp = estimate(m, "fsdp2", 2)  # the sharded teacher (unet) and the generator halve; no autocast copies
    assert fsdp.held == {"unet": {"params": 50}, "generator": {"params": 200, "grads": 200, "optimizer": 200}}
    assert fsdp.autocast == 0 and fsdp.communication == 2 * 2 * 10 + 4 * 10
    assert fsdp.peak == 50 + 600 + 50 + 80
    m.config["mixed_precision"] = "no"  # no mixed-precision policy: the units are gathered in float32
    assert estimate(m, "fsdp2", 2).communication == 2 * 4 * 10 + 4 * 10
    cached = estimate(m, "ddp", 1, off_gpu=("unet",))  # an owner off the GPU holds nothing there
    assert "unet" not in cached.held and cached.peak == 1450 - 100
