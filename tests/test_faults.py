"""Fault injection: a diverged, interrupted, damaged or mis-configured run never silently loses or corrupts
the user's work (issue 14).

Each test breaks one thing the way it breaks in practice (a learning rate that diverges, a second run
into the same folder, a killed save, a full disk, a planted pickle, SIGTERM) and checks what the user
gets: the exit code, the one message, which files exist, and that a resumed run continues exactly.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from stepdistill import lifecycle
from stepdistill.harness.checkpoint import (
    CheckpointWriteError,
    latest_checkpoint,
    list_checkpoints,
    scan_checkpoints,
)
from stepdistill.harness.guard import NonFiniteError, NonFiniteGuard
from stepdistill.harness.preflight import preflight
from stepdistill.harness.trainer import Trainer
from tests.helpers import PYTHON, REPO, tiny_config, with_free_port

FAST = ["train.sample_every=0", "train.log_every=1", "export.enabled=false"]


def _train(run_dir: Path, *overrides: str, method: str = "dmd2") -> Trainer:
    trainer = Trainer(tiny_config(run_dir, method, *FAST, *overrides))
    lifecycle.run(trainer)
    return trainer


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([PYTHON, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _tiny_cli(run_dir: Path, *overrides: str) -> list[str]:
    return ["--config", "configs/tests/tiny_dmd2.yaml", f"run.output_dir={run_dir}", "run.trackers=[none]",
            "train.progress_bar=false", "train.cpu_threads=1", *overrides]


# ---- divergence ----------------------------------------------------------------------------------
def test_divergence_stops_loudly_and_keeps_the_last_finite_checkpoint(tmp_path):
    """lr=1e6 gives NaN at step 1: exit 3, one message naming step, phase, role and the checkpoint; no
    NaN checkpoint, no DONE.json, no export; keep-last-K=1 keeps the finite one."""
    run = tmp_path / "run"
    proc = _cli(*_tiny_cli(run, "roles.generator.lr=1e6", "train.max_steps=6", "train.checkpoint_every=1",
                           "train.checkpoints_total_limit=1", "train.sample_every=0"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "non-finite" in errors[0] and "at step 1" in errors[0] and "phase 'critic'" in errors[0]
    assert "roles critic" in errors[0] and "checkpoint-1" in errors[0]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"]
    assert not (run / "DONE.json").exists() and not (run / "export").exists()
    state = torch.load(run / "checkpoints" / "checkpoint-1" / "optimizer.bin", weights_only=True)
    assert all(torch.isfinite(v).all() for s in state["state"].values() for v in s.values() if torch.is_tensor(v))


def _inject_nan(trainer: Trainer, phase: str, steps: set[int]) -> None:
    """Make ``phase``'s loss NaN at ``steps`` (the rest of the step runs as usual)."""
    losses = trainer.method.losses

    def poisoned(ph, batch, step):
        out = losses(ph, batch, step)
        if ph == phase and step in steps:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    trainer.method.losses = poisoned


def _weights_before(trainer: Trainer, phase: str, step: int, params: list) -> dict:
    """``seen["before"]``: a copy of ``params`` taken as ``phase`` of ``step`` starts."""
    seen = {}
    run_phase = trainer.run_phase

    def spy(ph, st):
        if ph == phase and st == step:
            seen["before"] = [p.detach().clone() for p in params]
        return run_phase(ph, st)

    trainer.run_phase = spy
    return seen


def test_skip_drops_the_update_counts_it_and_stops_after_too_many_in_a_row(tmp_path):
    cfg = tiny_config(tmp_path / "skip", "dmd2", *FAST, "train.max_steps=5", "train.on_nonfinite=skip",
                      "train.max_nonfinite_skips=2")
    trainer = Trainer(cfg)
    _inject_nan(trainer, "critic", {1, 2})
    critic = trainer.roles["critic"].trainable_parameters()
    seen = _weights_before(trainer, "critic", 1, critic)
    run_phase = trainer.run_phase

    def check(phase, step):
        logs = run_phase(phase, step)
        if phase == "critic" and step == 2:  # two dropped updates: the critic has not moved since step 1
            assert all(torch.equal(a, p) for a, p in zip(seen["before"], critic))
        return logs

    trainer.run_phase = check
    lifecycle.run(trainer)
    rows = _rows(tmp_path / "skip")
    assert [r["nonfinite/skipped"] for r in rows] == [0, 1, 2, 2, 2]
    assert all(torch.isfinite(p).all() for p in critic)
    assert (tmp_path / "skip" / "DONE.json").exists()

    trainer = Trainer(tiny_config(tmp_path / "many", "dmd2", *FAST, "train.max_steps=5", "train.on_nonfinite=skip",
                                  "train.max_nonfinite_skips=1"))
    _inject_nan(trainer, "critic", {1, 2})
    with pytest.raises(NonFiniteError, match=r"2 non-finite updates in a row .*at step 2, phase .critic."):
        lifecycle.run(trainer)
    assert not (tmp_path / "many" / "DONE.json").exists()


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_device_side_guard_skips_inside_the_fused_optimizer(mode):
    """The accelerator path: no host read per phase; the fused AdamW skips on found_inf, poll() raises."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = NonFiniteGuard(mode, max_skips=0 if mode == "skip" else 10, device=torch.device("cpu"),
                           device_side=True)
    for step, loss in enumerate([1.0, float("nan"), 1.0]):
        p.grad = torch.ones(3)
        found_inf = guard.check(step, "generator", torch.tensor(loss), {"generator": torch.tensor(1.0)})
        assert torch.is_tensor(found_inf)
        opt.found_inf, opt.grad_scale = found_inf, None
        opt.step()
        if step == 0:
            after_first = p.detach().clone()
    if mode == "stop":  # sticky: neither step 1 nor step 2 was applied
        assert torch.equal(p.detach(), after_first)
    else:  # only step 1 dropped
        assert not torch.equal(p.detach(), after_first) and int(opt.state[p]["step"]) == 2
    with pytest.raises(NonFiniteError, match="at step 1, phase 'generator'"):
        guard.poll()


def test_export_refuses_nonfinite_weights_unless_allowed(tmp_path):
    trainer = _train(tmp_path / "run", "train.max_steps=1")
    with torch.no_grad():
        next(iter(trainer.roles["generator"].trainable_parameters())).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf values: student"):
        lifecycle.export_student(trainer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert (lifecycle.export_student(trainer, tmp_path / "out", allow_nonfinite=True) / "model_index.json").is_file()


# ---- the run folder ------------------------------------------------------------------------------
def test_fresh_run_into_a_used_folder_is_refused_before_loading(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.max_steps=1")
    started = time.perf_counter()
    proc = _cli(*_tiny_cli(run, "train.max_steps=1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already holds another run" in proc.stderr and "train.resume=latest" in proc.stderr
    assert "run.overwrite=true" in proc.stderr and "Loading pipeline" not in proc.stderr
    assert time.perf_counter() - started < 60

    old = (run / "checkpoints" / "checkpoint-1" / "model.safetensors").read_bytes()
    _train(run, "train.max_steps=1", "run.overwrite=true", "run.seed=1")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert len(aside) == 1, "the old run must be moved aside, not deleted"
    assert (aside[0] / "checkpoints" / "checkpoint-1" / "model.safetensors").read_bytes() == old
    assert len(_rows(run)) == 1


# ---- resume --------------------------------------------------------------------------------------
def test_resume_applies_a_changed_learning_rate_and_records_it(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.max_steps=2")
    _train(run, "train.max_steps=4", "train.resume=latest", "roles.generator.lr=3e-5", "roles.critic.lr=2e-5")
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    lrs = {r["step"]: r["lr/critic"] for r in rows}
    assert lrs[1] == pytest.approx(1e-4) and lrs[2] == pytest.approx(2e-5) and lrs[3] == pytest.approx(2e-5)
    assert [r["lr/generator"] for r in rows if "lr/generator" in r][-1] == pytest.approx(3e-5)
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumes[0]["checkpoint"] == "checkpoint-2" and resumes[0]["step"] == 2
    assert resumes[0]["changed"]["roles.critic.lr"] == {"from": 1e-4, "to": 2e-5}
    assert resumes[0]["changed"]["train.max_steps"] == {"from": 2, "to": 4}
    assert "lr: 2.0e-05" in (run / "config.yaml").read_text()


def test_resume_with_another_method_or_role_layout_is_refused(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.max_steps=1")
    with pytest.raises(ValueError, match=r"cannot change: method.name: 'dmd2' -> 'lcm'"):
        preflight(tiny_config(run, "lcm", "train.resume=latest"))
    with pytest.raises(ValueError, match=r"roles.generator.lora_rank: 0 -> 4"):
        preflight(tiny_config(run, "dmd2", "train.resume=latest", "roles.generator.lora_rank=4"))


# ---- checkpoints ---------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: the proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_pickles_are_never_executed(tmp_path, caplog):
    from stepdistill.export.pipeline import export_from_run

    run = tmp_path / "run"
    _train(run, "train.max_steps=2", "train.checkpoint_every=1", "roles.generator.ema_decay=0.9")
    assert not list(run.rglob("*.pkl.*")) and not list(run.rglob("custom_checkpoint_*")), "extra states are no pickles"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    newest = run / "checkpoints" / "checkpoint-2"
    (newest / "custom_checkpoint_0.pkl").write_bytes(payload)  # what accelerate would unpickle, weights_only=False
    with caplog.at_level("WARNING", logger="stepdistill"):
        export_from_run(run, tmp_path / "export")  # the tampered checkpoint is skipped, named, never read
    assert "skipping damaged checkpoint" in caplog.text and "custom_checkpoint_0.pkl" in caplog.text
    with pytest.raises(ValueError, match="files it was not written with .custom_checkpoint_0.pkl"):
        preflight(tiny_config(run, "dmd2", f"train.resume={newest}", "roles.generator.ema_decay=0.9"))
    _train(run, "train.max_steps=3", "train.resume=latest", "roles.generator.ema_decay=0.9")  # from checkpoint-1
    assert json.loads((run / "resumes.jsonl").read_text())["checkpoint"] == "checkpoint-1"
    assert not marker.exists()
    # The RNG state file accelerate does read: a payload in its place is refused by weights_only=True.
    rng = run / "checkpoints" / "checkpoint-3" / "random_states_0.pkl"
    size = rng.stat().st_size
    rng.write_bytes(payload.ljust(size, b"\0"))  # same size: it passes the manifest, then must fail to load
    with pytest.raises(ValueError, match="could not load checkpoint"):
        _train(run, "train.max_steps=4", f"train.resume={run / 'checkpoints' / 'checkpoint-3'}",
               "roles.generator.ema_decay=0.9")
    assert not marker.exists()


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    _train(run, "train.max_steps=2", "train.checkpoint_every=1", "train.checkpoints_total_limit=0")
    (run / "checkpoints" / "checkpoint-99").mkdir()  # empty: a save that never started
    with open(run / "checkpoints" / "checkpoint-2" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    found = scan_checkpoints(run)
    assert [p.name for p in found.complete] == ["checkpoint-1"]
    assert {p.name: why for p, why in found.damaged}.keys() == {"checkpoint-2", "checkpoint-99"}
    with caplog.at_level("WARNING", logger="stepdistill"):
        assert latest_checkpoint(run).name == "checkpoint-1"
    assert "checkpoint-99" in caplog.text and "model.safetensors is truncated" in caplog.text
    # A line cut short by a crash at the end of metrics.jsonl is dropped, not fatal.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "critic/lo')
    _train(run, "train.max_steps=3", "train.resume=latest")
    assert [r["step"] for r in _rows(run)] == [0, 1, 2]


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, "dmd2", *FAST, "train.max_steps=3", "train.checkpoint_every=1"))
    save_state = trainer.accelerator.save_state

    def full_disk(output_dir, **kwargs):
        if output_dir.endswith("checkpoint-2"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(output_dir, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "save_state", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"no space left on /.*checkpoint-2 \(kept .*checkpoint-1\)"):
        lifecycle.run(trainer)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_stale_temp_folders_are_removed_at_start(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.max_steps=1")
    (run / "checkpoints" / ".tmp-checkpoint-7").mkdir()
    (run / ".tmp-export-123").mkdir()
    _train(run, "train.max_steps=2", "train.resume=latest")
    assert not [p for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name.startswith(".tmp-")]


# ---- graceful stop -------------------------------------------------------------------------------
class _OneProcess:
    num_processes = 1
    is_main_process = True


@pytest.mark.parametrize("first", ["SIGTERM", "SIGINT"])
def test_a_repeated_sigterm_keeps_stopping_and_a_sigint_while_stopping_interrupts(first, caplog):
    """In-process: the launcher's and SLURM's copies of a SIGTERM are ignored (logged once); Ctrl-C while
    stopping (twice in all, or after a SIGTERM) interrupts at once; the handlers are restored at the end."""
    from stepdistill.harness.signals import GracefulStop

    passed_on = []  # a SIGTERM that reached the handler from before GracefulStop ("stop now")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda signum, frame: passed_on.append(signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        outer = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        with caplog.at_level("WARNING", logger="stepdistill"):
            with pytest.raises(KeyboardInterrupt), GracefulStop(_OneProcess()) as stop:
                assert stop.requested() is None
                signal.raise_signal(signal.Signals[first])
                assert stop.requested() == first
                for _ in range(3):
                    signal.raise_signal(signal.SIGTERM)
                assert stop.requested() == first and passed_on == []
                signal.raise_signal(signal.SIGINT)
                raise AssertionError("a SIGINT while stopping must interrupt at once")
        assert caplog.text.count("SIGTERM again while stopping") == 1
        assert {sig: signal.getsignal(sig) for sig in outer} == outer
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


# A training process (train.py's main) held once its stop has begun (after the step the first SIGTERM came
# in, before the checkpoint): it writes <prefix>.<rank> and waits for <prefix>.go, which the test writes after
# it has sent the second SIGTERM. That one then lands in the stop for certain, instead of racing the checkpoint
# or merging with the first while both are pending (a process inside a C++ call runs Python handlers later).
_HELD_TRAIN = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())  # the repository's code, also when started as a script from elsewhere
from stepdistill.harness.signals import GracefulStop
prefix = sys.argv.pop(1)
requested = GracefulStop.requested
def held(self):
    answer = requested(self)
    mark = Path(prefix + "." + os.environ.get("RANK", "0"))
    if answer and not mark.exists():
        mark.write_text(answer)
        deadline = time.time() + 60
        while not Path(prefix + ".go").exists() and time.time() < deadline:
            time.sleep(0.05)
    return answer
GracefulStop.requested = held
from stepdistill.train import main
sys.exit(main(sys.argv[1:]))
"""


def _wait(paths: list[Path], proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not all(p.exists() for p in paths):
        time.sleep(0.05)


def test_sigterm_even_twice_checkpoints_and_the_resumed_run_continues_exactly(tmp_path):
    """SIGTERM, then SIGTERM again while the run stops (a launcher forwarding its own, or SLURM signalling
    every process): one checkpoint, exit 0, and the resumed run ends with the uninterrupted run's weights."""
    run, straight, held = tmp_path / "run", tmp_path / "straight", str(tmp_path / "stopping")
    proc = subprocess.Popen([PYTHON, "-c", _HELD_TRAIN, held,
                             *_tiny_cli(run, "train.max_steps=100000", "train.log_every=1",
                                        "train.checkpoint_every=100000", "train.sample_every=0",
                                        "export.enabled=false")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline:
        rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if len(rows) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _wait([Path(held + ".0")], proc)
    proc.send_signal(signal.SIGTERM)  # the second copy, while the stop is under way
    time.sleep(0.5)  # its handler runs in the held loop
    Path(held + ".go").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out and "train.resume=latest" in out
    assert err.count("SIGTERM again while stopping after SIGTERM: ignored") == 1
    (checkpoint,) = list_checkpoints(run)
    stopped_at = int(checkpoint.name.split("-")[1])
    assert stopped_at >= 2 and not (run / "DONE.json").exists()

    total = stopped_at + 2
    args = ["train.log_every=1", "train.sample_every=0", "export.enabled=false", f"train.max_steps={total}"]
    assert _cli(*_tiny_cli(run, *args, "train.resume=latest")).returncode == 0
    assert _cli(*_tiny_cli(straight, *args)).returncode == 0
    done = [json.loads((d / "DONE.json").read_text())["weight_sha256"] for d in (run, straight)]
    assert done[0] == done[1], "the resumed run must end with the uninterrupted run's weights"
    shutil.rmtree(run)


# ---- preflight -----------------------------------------------------------------------------------
def test_preflight_refuses_a_disk_without_room_for_two_checkpoints(tmp_path, monkeypatch):
    import stepdistill.harness.preflight as pf

    cfg = tiny_config(tmp_path / "run", "dmd2")
    params = pf.backbone_params(str(cfg.model.pretrained))
    assert params and params > 1000  # read from the teacher's safetensors headers, no weights loaded
    need = 2 * pf.checkpoint_bytes(cfg, params)
    assert need >= 2 * 2 * 12 * params  # generator and critic: fp32 weights + two AdamW moments each
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: usage._replace(free=need - 1))
    with pytest.raises(ValueError, match=r"not enough disk space for two checkpoints .* need about"):
        preflight(cfg)
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: usage._replace(free=need + 1))
    preflight(cfg)


def test_preflight_refuses_an_output_dir_inside_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"run.output_dir '.*/file/run': .*file is a file, so no folder can be made"):
        preflight(tiny_config(tmp_path / "file" / "run", "dmd2"))


def _children(pid: int) -> list[int]:
    """The ids of the processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_two_process_sigterm_all_ranks_stop_at_one_step_and_resume_exactly(tmp_path):
    """SLURM's step signal (`--signal=TERM@...`, `scancel --signal=TERM`) under `accelerate launch --multi_gpu
    --num_processes 2` (gloo): SIGTERM to the launcher, which forwards it to both training processes, and
    SIGTERM to each of them while they stop (SLURM signals every process of the step), so each gets two;
    both ranks stop after the same step, one checkpoint; the resumed run ends with the uninterrupted run's
    weights. (~70 s: slow.)"""
    launch = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--mixed_precision", "no", "train.py"]
    driver = tmp_path / "held_train.py"
    driver.write_text(_HELD_TRAIN)
    held = str(tmp_path / "stopping")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    common = ["train.log_every=1", "train.sample_every=0", "export.enabled=false"]
    run, straight = tmp_path / "run", tmp_path / "straight"
    proc = subprocess.Popen(with_free_port([*launch[:-1], str(driver), held,
                                            *_tiny_cli(run, *common, "train.max_steps=100000",
                                                       "train.checkpoint_every=100000")]),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (
            (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.2)
    workers = _children(proc.pid)  # torchrun starts them in sessions of their own: the group signal misses them
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher forwards it
    _wait([Path(f"{held}.{rank}") for rank in (0, 1)], proc)
    for pid in workers:
        os.kill(pid, signal.SIGTERM)  # SLURM's copy to every process, while they stop
    time.sleep(0.5)
    Path(held + ".go").touch()
    out, err = proc.communicate(timeout=180)
    assert out.count("stopped by SIGTERM") == 1, err[-3000:]  # printed by the main process only
    assert err.count("SIGTERM again while stopping after SIGTERM: ignored") == 1  # logged by the main process
    (checkpoint,) = list_checkpoints(run)
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    total = int(checkpoint.name.split("-")[1]) + 2
    for folder, extra in ((run, ["train.resume=latest"]), (straight, [])):
        subprocess.run(with_free_port([*launch, *_tiny_cli(folder, *common, f"train.max_steps={total}", *extra)]),
                       cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    done = [json.loads((d / "DONE.json").read_text())["weight_sha256"] for d in (run, straight)]
    assert done[0] == done[1]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_device_side_guard_on_cuda(tmp_path, mode):
    """On CUDA the verdict never reaches the host per phase: the fused AdamW skips on found_inf and the run
    stops (stop) at the next synchronising point, with the weights from before the bad update."""
    cfg = tiny_config(tmp_path / mode, "dmd2", *FAST, "train.max_steps=4", f"train.on_nonfinite={mode}",
                      "train.log_every=100", "train.checkpoint_every=2")
    trainer = Trainer(cfg)
    assert trainer.guard.device_side
    _inject_nan(trainer, "critic", {1})
    critic = trainer.roles["critic"].trainable_parameters()
    seen = _weights_before(trainer, "critic", 1, critic)
    if mode == "stop":
        with pytest.raises(NonFiniteError, match="at step 1, phase 'critic'"):
            lifecycle.run(trainer)
        assert all(torch.equal(a, p) for a, p in zip(seen["before"], critic))
        assert list_checkpoints(tmp_path / mode) == []
    else:
        lifecycle.run(trainer)
        assert _rows(tmp_path / mode)[-1]["nonfinite/skipped"] == 1
        assert all(torch.isfinite(p).all() for p in critic)
