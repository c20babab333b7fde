"""``train.fsdp_checkpoint: sharded``: FSDP2 checkpoints written shard by shard through
torch.distributed.checkpoint (safetensors in ``dcp/``), on 2 gloo CPU processes and on one.

Against the default ``gathered`` layout the training numbers are the same bit for bit; a sharded
checkpoint resumes exactly on the same process count and onto another one (DCP reshards on load), and
``stepdistill export`` (one process, no process group) reads it into the same pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import PYTHON, run, tiny_config

ACCELERATE = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--mixed_precision", "no", "train.py"]
EMA = "roles.generator.ema_decay=0.9"  # the export EMA: its shadows are sharded states too
SHARDED = ("train.parallel=fsdp2", "train.fsdp_checkpoint=sharded", EMA)
GATHERED = ("train.parallel=fsdp2", "train.fsdp_checkpoint=gathered", EMA)
# What the sharded layout puts in dcp/ for tiny DMD2 (a generator with an export EMA, a critic).
DCP_STATES = ["ema.generator", "fsdp.critic", "fsdp.generator", "optimizer.critic",
              "optimizer.generator"]


def _launch(out: Path, *overrides: str, config: str = "tests/tiny_dmd2") -> None:
    run([*ACCELERATE, "--config", config, "train.log_every=1", "train.sample_every=0", "eval.enabled=false", "run.trackers=[none]",
         "train.progress_bar=false", f"run.output_dir={out}", *overrides],
        env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})


def _metrics(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, folder
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _worst(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def _resume_dir(tmp_path: Path, name: str, source: Path, step: int) -> Path:
    """A run folder holding only ``source``'s checkpoint-``step`` (a run killed after it)."""
    out = tmp_path / name
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / f"checkpoint-{step}", out / "checkpoints" / f"checkpoint-{step}")
    shutil.copy(source / "config.yaml", out / "config.yaml")
    return out


def _dcp_keys(checkpoint: Path) -> dict[str, list[str]]:
    """Each shard file of ``checkpoint/dcp`` and the tensor names it holds."""
    out = {}
    for path in sorted((checkpoint / "dcp").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[path.name] = list(f.keys())
    return out


def _assert_sharded_layout(checkpoint: Path, processes: int) -> None:
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    shards = [f"dcp/shard-{i:05d}-model-00001-of-00001.safetensors" for i in range(1, processes + 1)]
    # accelerate's RNG states (read back weights_only) are the only .pkl; no model/optimizer files of the
    # sharded roles, no pickled or torch-saved state anywhere else.
    assert files == sorted([*shards, "extra_state.safetensors", "stepdistill_state.json",
                            *(f"random_states_{i}.pkl" for i in range(processes))]), files
    with safe_open(str(checkpoint / "extra_state.safetensors"), "pt") as f:
        assert list(f.keys()) == []  # nothing of the sharded roles is gathered into it
        assert json.loads(f.metadata()["dcp"]) == DCP_STATES
        scalars = json.loads(f.metadata()["scalars"])
    assert scalars["optimizer.generator"]["scheduler"]["last_epoch"] >= 1
    keys = _dcp_keys(checkpoint)
    assert {k.split("/")[0] for names in keys.values() for k in names} == set(DCP_STATES)
    if processes > 1:  # every process wrote its own half of each weight and moment
        for name in keys.values():
            assert any(k.startswith("fsdp.generator/") for k in name) and any(k.endswith(".exp_avg") for k in name)
        shapes = {}
        for path in sorted((checkpoint / "dcp").glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                shapes[path.name] = f.get_slice("fsdp.generator/conv_in.weight").get_shape()
        rows = [s[0] for s in shapes.values()]
        assert len(rows) == processes and sum(rows) > max(rows), shapes


@pytest.mark.slow  # three 2-process launches (~25 s each here) and two 1-process resumes: ~2 min
def test_sharded_checkpoints_resume_exactly_reshard_and_export(tmp_path):
    from stepdistill import lifecycle
    from stepdistill.export.pipeline import export_from_run

    sharded, gathered = tmp_path / "sharded", tmp_path / "gathered"
    _launch(sharded, "train.max_steps=6", "train.checkpoint_every=3", "train.checkpoints_total_limit=0", *SHARDED)
    _launch(gathered, "train.max_steps=6", "train.checkpoint_every=3", "train.checkpoints_total_limit=0", *GATHERED)
    a, g = _metrics(sharded), _metrics(gathered)
    assert sorted(a) == list(range(6)) and all(a[s] == g[s] for s in range(6))  # the layout changes no number
    for step in (3, 6):
        _assert_sharded_layout(sharded / "checkpoints" / f"checkpoint-{step}", processes=2)
    assert not (gathered / "checkpoints" / "checkpoint-3" / "dcp").exists()
    done = json.loads((sharded / "DONE.json").read_text())
    assert all(len(set(per_rank)) == 1 for per_rank in done["weight_sha256"].values())

    # Kill -> resume on 2 processes from the step-3 checkpoint: the same losses and weights, bit for bit.
    resumed = _resume_dir(tmp_path, "resumed", sharded, 3)
    _launch(resumed, "train.max_steps=6", "train.resume=latest", *SHARDED)
    b = _metrics(resumed)
    assert sorted(b) == [3, 4, 5] and all(b[s] == a[s] for s in (3, 4, 5))
    assert _worst(sharded / "export" / "unet", resumed / "export" / "unet") == 0.0
    assert _worst(sharded / "export" / "unet", gathered / "export" / "unet") == 0.0

    # `stepdistill export` of a sharded checkpoint (one process, no process group): the gathered layout's export.
    for step in (3, 6):
        for use_ema in (True, False):
            tag = f"{step}-{use_ema}"
            ex_s = export_from_run(sharded / "checkpoints" / f"checkpoint-{step}", tmp_path / f"xs-{tag}",
                                   use_ema=use_ema)
            ex_g = export_from_run(gathered / "checkpoints" / f"checkpoint-{step}", tmp_path / f"xg-{tag}",
                                   use_ema=use_ema)
            assert _worst(ex_s / "unet", ex_g / "unet") <= 1e-6
    assert _worst(tmp_path / "xs-6-True" / "unet", sharded / "export" / "unet") == 0.0
    assert _worst(tmp_path / "xs-3-True" / "unet", tmp_path / "xs-3-False" / "unet") > 0  # the EMA was read

    # 2 -> 1 process: DCP reshards onto whole tensors. Resumed at step 3 of 3 the run exports what it loaded
    # (the 2-process checkpoint's export), then trains on exactly as the gathered checkpoint resumed on 1 does.
    one = {}
    for layout, source, extra in (("sharded", sharded, SHARDED), ("gathered", gathered, GATHERED)):
        folder = _resume_dir(tmp_path, f"one-{layout}", source, 3)
        cfg = tiny_config(folder, "dmd2", "train.max_steps=3", "train.resume=latest", "train.sample_every=0",
                          "eval.enabled=false", "train.log_every=1", "train.checkpoint_every=2", *extra)
        lifecycle.run(cfg)
        assert _worst(tmp_path / "xs-3-True" / "unet", folder / "export" / "unet") == 0.0
        cfg.train.max_steps = 5
        lifecycle.run(cfg)
        one[layout] = folder
    m_s, m_g = _metrics(one["sharded"]), _metrics(one["gathered"])
    assert sorted(m_s) == [3, 4] and all(m_s[s] == m_g[s] for s in (3, 4))
    assert _worst(one["sharded"] / "export" / "unet", one["gathered"] / "export" / "unet") == 0.0
    _assert_sharded_layout(one["sharded"] / "checkpoints" / "checkpoint-5", processes=1)

    # 1 -> 2 processes: the one-process sharded checkpoint resumes on two, where the gathered one does.
    for layout, extra in (("sharded", SHARDED), ("gathered", GATHERED)):
        _launch(one[layout], "train.max_steps=6", "train.resume=latest", *extra)
    m_s, m_g = _metrics(one["sharded"]), _metrics(one["gathered"])
    assert 5 in m_s and m_s[5] == m_g[5]
    assert _worst(one["sharded"] / "export" / "unet", one["gathered"] / "export" / "unet") == 0.0
    _assert_sharded_layout(one["sharded"] / "checkpoints" / "checkpoint-6", processes=2)


@pytest.mark.slow  # two 2-process launches per method
@pytest.mark.parametrize("method, in_dcp, in_file", [
    ("lcm", ["ema_target.target", "fsdp.generator", "optimizer.generator"], []),  # a sharded EMA target
    ("vsd", ["fsdp.generator", "optimizer.generator"], ["lora.critic/"]),  # beside a shared-base LoRA critic
])
def test_sharded_checkpoints_of_other_layouts_resume_exactly(tmp_path, method, in_dcp, in_file):
    first = tmp_path / "first"
    layout = ("train.parallel=fsdp2", "train.fsdp_checkpoint=sharded", "train.max_steps=4")
    _launch(first, *layout, "train.checkpoint_every=2", "train.checkpoints_total_limit=0",
            config=f"tests/tiny_{method}")
    with safe_open(str(first / "checkpoints" / "checkpoint-2" / "extra_state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["dcp"]) == in_dcp
        assert all(any(k.startswith(prefix) for k in f.keys()) for prefix in in_file)  # the LoRA stays whole here
    resumed = _resume_dir(tmp_path, "resumed", first, 2)
    _launch(resumed, *layout, "train.resume=latest", config=f"tests/tiny_{method}")
    a, b = _metrics(first), _metrics(resumed)
    assert sorted(b) == [2, 3] and all(a[s] == b[s] for s in (2, 3))
    assert _worst(first / "export" / "unet", resumed / "export" / "unet") == 0.0


def test_sharded_states_round_trip_without_a_process_group(tmp_path):
    """One process, no process group: a module and its AdamW (states created on load, as a fresh run's
    optimizer has none) come back exactly and train on identically; a mismatch is one clear error."""
    from stepdistill.harness.checkpoint import (
        ModuleState,
        OptimizerState,
        load_extra_states,
        save_extra_states,
        save_sharded_states,
    )

    def make(seed: int):
        torch.manual_seed(seed)
        module = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.01)
        return module, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    def step(module, opt, sched, seed):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
        module(x).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    module, opt, sched = make(0)
    for i in range(2):
        step(module, opt, sched, i)
    states = {"fsdp.x": ModuleState(module), "optimizer.x": OptimizerState(opt, sched)}
    save_sharded_states(tmp_path, states, rank=0)
    save_extra_states(tmp_path, {}, sharded=states)
    assert sorted(p.name for p in (tmp_path / "dcp").iterdir()) == ["shard-00001-model-00001-of-00001.safetensors"]

    module2, opt2, sched2 = make(1)
    assert not torch.equal(module.weight, module2.weight) and not opt2.state
    load_extra_states(tmp_path, {"fsdp.x": ModuleState(module2), "optimizer.x": OptimizerState(opt2, sched2)})
    assert torch.equal(module.weight, module2.weight) and torch.equal(module.bias, module2.bias)
    for p, q in zip(module.parameters(), module2.parameters()):
        assert opt.state[p].keys() == opt2.state[q].keys()
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key
    assert sched2.last_epoch == 2 and sched2.get_last_lr() == sched.get_last_lr()
    step(module, opt, sched, 7)
    step(module2, opt2, sched2, 7)
    assert torch.equal(module.weight, module2.weight)

    with pytest.raises(ValueError, match=r"fsdp.x/weight has shape \(3, 4\) where this run has \(3, 5\)"):
        load_extra_states(tmp_path, {"fsdp.x": ModuleState(torch.nn.Linear(5, 3))})


def _fake_checkpoint(run_dir: Path, recorded: dict) -> None:
    """A complete checkpoint folder recording ``recorded`` as its run's config (for preflight only)."""
    checkpoint = run_dir / "checkpoints" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "extra_state.safetensors").write_bytes(b"x")
    (checkpoint / "stepdistill_state.json").write_text(json.dumps(
        {"step": 1, "method": "dmd2", "config": recorded, "files": {"extra_state.safetensors": 1}}))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(recorded))


def test_changing_the_checkpoint_layout_on_resume_is_refused(tmp_path):
    from stepdistill.harness.preflight import preflight
    from stepdistill.runconfig import load_config

    with pytest.raises(ValueError, match="train.fsdp_checkpoint='shards' is not valid; choose one of: gathered, sharded"):
        load_config("tests/tiny_dmd2", ["train.fsdp_checkpoint=shards"])
    run_dir = tmp_path / "run"
    recorded = OmegaConf.to_container(tiny_config(run_dir, "dmd2", *SHARDED), resolve=True)
    _fake_checkpoint(run_dir, recorded)
    with pytest.raises(ValueError, match=r"cannot change: train.fsdp_checkpoint: 'sharded' -> 'gathered' "
                                         r"\(.*resume with train.fsdp_checkpoint=sharded"):
        preflight(tiny_config(run_dir, "dmd2", *GATHERED, "train.resume=latest"))
    assert preflight(tiny_config(run_dir, "dmd2", *SHARDED, "train.resume=latest")).checkpoint is not None

    # A checkpoint written before the key existed has the gathered layout: it resumes as gathered only.
    old = tmp_path / "old"
    recorded = OmegaConf.to_container(tiny_config(old, "dmd2", *GATHERED), resolve=True)
    del recorded["train"]["fsdp_checkpoint"]
    _fake_checkpoint(old, recorded)
    assert preflight(tiny_config(old, "dmd2", *GATHERED, "train.resume=latest")).checkpoint is not None
    with pytest.raises(ValueError, match=r"train.fsdp_checkpoint: 'gathered' -> 'sharded'"):
        preflight(tiny_config(old, "dmd2", *SHARDED, "train.resume=latest"))
