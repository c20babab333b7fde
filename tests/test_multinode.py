"""Multi-node launch (launch/node_launch.sh, launch/slurm_multinode.sh) without a cluster.

SLURM cannot run here, so ``srun`` and ``scontrol`` are stubs on PATH: the srun stub records its argv and
runs the task command once per "node" with SLURM_NODEID set, forwards SIGUSR1/SIGUSR2 to every process of
every task (what a step signal does under proctrack/cgroup) and turns SIGTERM into SIGKILL (what srun
does); the scontrol stub records its argv and answers ``show hostnames``. The fast tests put a stand-in
for ``python -m accelerate.commands.launch`` behind PYTHON; the slow ones train the tiny DMD2 config for
real, two "nodes" of one process each over 127.0.0.1, against one machine's 2-process run.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import PYTHON, REPO, free_port

NODE_LAUNCH = REPO / "launch" / "node_launch.sh"
SLURM_SCRIPT = REPO / "launch" / "slurm_multinode.sh"
JOB_ID = 4242

def process_tree(root: int) -> list[int]:
    """Every pid below ``root`` (itself first), from /proc. The stand-in srun runs this same function: its
    script text includes this source (``inspect.getsource``)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


SRUN = f"""#!{PYTHON}
import json, os, signal, subprocess, sys

args = sys.argv[1:]
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"tool": "srun", "opts": opts, "command": args}}) + "\\n")
nodes = int(next(o.split("=", 1)[1] for o in opts if o.startswith("--nodes=")))
tasks = [subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i)}})
         for i in range(nodes)]


""" + inspect.getsource(process_tree) + """

def send(sig):
    for task in tasks:
        for pid in process_tree(task.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


signal.signal(signal.SIGUSR1, lambda s, f: send(s))
signal.signal(signal.SIGUSR2, lambda s, f: send(s))
signal.signal(signal.SIGTERM, lambda s, f: send(signal.SIGKILL))
codes = [task.wait() for task in tasks]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
"""

SCONTROL = f"""#!{PYTHON}
import json, os, sys

with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"tool": "scontrol", "argv": sys.argv[1:]}}) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(os.environ["STUB_HOSTS"].split()))
"""

# Stands in for `python -m accelerate.commands.launch ...`: records its argv; with FAKE_WORKER it starts one
# "training process" (in its own session, as torchrun does) that counts the SIGTERMs it gets.
FAKE_PYTHON = f"""#!{PYTHON}
import json, os, signal, subprocess, sys

out, rank = os.environ["FAKE_OUT"], os.environ.get("NODE_RANK", "unset")
usr1 = "ignored" if signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN else "not ignored"
with open(f"{{out}}/launch-{{rank}}.json", "w") as f:
    json.dump({{"argv": sys.argv[1:], "usr1": usr1}}, f)
if os.environ.get("FAKE_SLEEP"):  # still meeting the other nodes: no training process yet
    open(f"{{out}}/launcher-{{rank}}.ready", "w").close()
    import time
    time.sleep(float(os.environ["FAKE_SLEEP"]))
if os.environ.get("FAKE_WORKER"):
    worker = subprocess.Popen([sys.executable, os.environ["FAKE_WORKER"], f"{{out}}/worker-{{rank}}"],
                              start_new_session=True)
    sys.exit(worker.wait())
"""

WORKER = """
import signal, sys, time

path = sys.argv[1]
log = open(path + ".log", "a", buffering=1)
log.write("usr1 " + ("ignored" if signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN else "not ignored") + "\\n")
terms = []
signal.signal(signal.SIGTERM, lambda s, f: (terms.append(s), log.write("TERM\\n")))
open(path + ".ready", "w").close()
deadline = time.time() + 60
while not terms and time.time() < deadline:
    time.sleep(0.05)
time.sleep(1.0)  # a second SIGTERM would be logged in this time
sys.exit(0 if len(terms) == 1 else 1)
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def stubs(tmp_path):
    """PATH with the srun/scontrol stubs, a fake PYTHON, and where they write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "srun", SRUN)
    _write_exe(bin_dir / "scontrol", SCONTROL)
    fake = _write_exe(tmp_path / "fake_python", FAKE_PYTHON)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "stub.jsonl"),
           "STUB_HOSTS": "gpu-node-07 gpu-node-08", "PYTHON": str(fake), "FAKE_OUT": str(out),
           "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_SUBMIT_DIR": str(REPO), "PROCS_PER_NODE": "2"}
    for key in ("NODE_RANK", "MAIN_PORT", "MAIN_ADDR", "NUM_NODES", "SLURM_RESTART_COUNT", "ACCELERATE_CONFIG"):
        env.pop(key, None)
    return {"env": env, "out": out, "log": tmp_path / "stub.jsonl", "worker": worker}


def _stub_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _requeues(path: Path) -> list[list[str]]:
    return [e["argv"] for e in _stub_log(path) if e["tool"] == "scontrol" and e["argv"][:1] == ["requeue"]]


def _wait_for(paths: list[Path], proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{paths} never appeared"
        time.sleep(0.05)


# ---- fast: parsing, arguments, refusals, signals ---------------------------------------------------
def test_scripts_parse():
    for script in (NODE_LAUNCH, SLURM_SCRIPT):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


# Overrides a nested `bash -c '...'` would have split or expanded.
ODD = ["run.name=two nodes", "data.prompts=['it''s', \"$HOME\"]", "x.y=*", "a.b=semi;colon `tick` $(echo no)",
       "tab=a\tb", "empty="]


def test_slurm_script_hands_every_override_intact_to_every_node(stubs):
    proc = subprocess.run(["bash", str(SLURM_SCRIPT), "tests/tiny_dmd2", *ODD], env=stubs["env"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (srun,) = [e for e in _stub_log(stubs["log"]) if e["tool"] == "srun"]
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"} <= set(srun["opts"])
    assert srun["command"][-len(ODD) - 2:] == ["tests/tiny_dmd2", "train.resume=latest", *ODD]
    port = str(10000 + JOB_ID % 20000)
    for rank in (0, 1):
        launch = json.loads((stubs["out"] / f"launch-{rank}.json").read_text())
        assert launch["argv"] == [
            "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "multi_node.yaml"),
            "--num_machines", "2", "--num_processes", "4", "--machine_rank", str(rank),
            "--main_process_ip", "gpu-node-07", "--main_process_port", port, "--rdzv_backend", "c10d",
            "--rdzv_conf", f"is_host={int(rank == 0)},join_timeout=900,read_timeout=900", "--max_restarts", "0",
            str(REPO / "train.py"), "--config", "tests/tiny_dmd2", "train.resume=latest", *ODD]
        assert launch["usr1"] == "ignored"  # SIGUSR1 reaches the training processes only as one SIGTERM
    assert _requeues(stubs["log"]) == []  # not signalled: no requeue


@pytest.mark.parametrize("env, message", [
    ({"NODE_RANK": None}, "NODE_RANK is not set"),
    ({"NODE_RANK": "2"}, "NODE_RANK=2 must be below NUM_NODES=2"),
    ({"MAIN_PORT": "70000"}, "MAIN_PORT=70000 is not a TCP port"),
    ({"PROCS_PER_NODE": "eight"}, "PROCS_PER_NODE=eight is not a whole number"),
    ({"ACCELERATE_CONFIG": str(REPO / "launch" / "multi_gpu_ddp.yaml")}, "same_network: true"),
])
def test_node_launch_refuses_bad_settings_before_starting_anything(stubs, env, message):
    full = {**stubs["env"], "NUM_NODES": "2", "NODE_RANK": "0", "MAIN_ADDR": "127.0.0.1", "MAIN_PORT": "29400",
            "PROCS_PER_NODE": "1"}
    full.update({k: v for k, v in env.items() if v is not None})
    for key in (k for k, v in env.items() if v is None):
        del full[key]
    proc = subprocess.run(["bash", str(NODE_LAUNCH), "tests/tiny_dmd2"], env=full, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not list(stubs["out"].iterdir())  # accelerate was never started


def test_a_signal_to_the_whole_node_gives_each_training_process_one_sigterm(stubs):
    """SIGUSR1 to every process of the node's tree (twice, as a step signal under proctrack/cgroup can
    arrive): the launcher survives it and the training process gets exactly one SIGTERM, then exits 0."""
    env = {**stubs["env"], "NUM_NODES": "1", "NODE_RANK": "0", "MAIN_ADDR": "127.0.0.1", "MAIN_PORT": "29400",
           "PROCS_PER_NODE": "1", "FAKE_WORKER": str(stubs["worker"])}
    proc = subprocess.Popen(["bash", str(NODE_LAUNCH), "tests/tiny_dmd2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for([stubs["out"] / "worker-0.ready"], proc)
    for _ in range(2):
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (stubs["out"] / "worker-0.log").read_text().splitlines() == ["usr1 ignored", "TERM"]
    assert "asking the training processes" in err


def test_a_stop_before_the_training_processes_start_ends_the_launcher(stubs):
    env = {**stubs["env"], "NUM_NODES": "1", "NODE_RANK": "0", "MAIN_ADDR": "127.0.0.1", "MAIN_PORT": "29400",
           "PROCS_PER_NODE": "1", "FAKE_SLEEP": "60"}
    proc = subprocess.Popen(["bash", str(NODE_LAUNCH), "tests/tiny_dmd2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for([stubs["out"] / "launcher-0.ready"], proc)
    started = time.time()
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and time.time() - started < 20, err
    assert "before the training processes started" in err


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGUSR2, False)], ids=["USR1", "USR2"])
def test_the_batch_shell_signal_stops_every_node_once_then_requeues(stubs, sig, requeued):
    """`--signal=B:USR1@300` signals the batch shell only: it reaches each node through srun, every training
    process gets one SIGTERM, and the job is requeued once srun has ended (SIGUSR2: stop, no requeue)."""
    env = {**stubs["env"], "FAKE_WORKER": str(stubs["worker"])}
    proc = subprocess.Popen(["bash", str(SLURM_SCRIPT), "tests/tiny_dmd2", "run.name=a b"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for([stubs["out"] / f"worker-{r}.ready" for r in (0, 1)], proc)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    for rank in (0, 1):
        assert (stubs["out"] / f"worker-{rank}.log").read_text().splitlines() == ["usr1 ignored", "TERM"]
    assert _requeues(stubs["log"]) == ([["requeue", str(JOB_ID)]] if requeued else [])


def test_no_requeue_past_max_requeues(stubs):
    env = {**stubs["env"], "FAKE_WORKER": str(stubs["worker"]), "SLURM_RESTART_COUNT": "3", "MAX_REQUEUES": "3"}
    proc = subprocess.Popen(["bash", str(SLURM_SCRIPT), "tests/tiny_dmd2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for([stubs["out"] / f"worker-{r}.ready" for r in (0, 1)], proc)
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "not requeueing" in err, err
    assert _requeues(stubs["log"]) == []


# ---- slow: real training over loopback --------------------------------------------------------------
TRAIN_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _overrides(run_dir: Path, *extra: str) -> list[str]:
    return [f"run.output_dir={run_dir}", "run.trackers=[none]", "train.progress_bar=false", "train.cpu_threads=1",
            "train.log_every=1", "train.sample_every=0", "export.enabled=false", *extra]


def _one_machine(run_dir: Path, *extra: str) -> None:
    """The reference: `accelerate launch --multi_gpu --num_processes 2` on one machine."""
    subprocess.run([PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--mixed_precision", "no", "--main_process_port", str(free_port()), "train.py",
                    "--config", "tests/tiny_dmd2", *_overrides(run_dir, *extra)],
                   cwd=REPO, env={**os.environ, **TRAIN_ENV}, check=True, capture_output=True, timeout=600)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _digests(run_dir: Path) -> dict:
    return json.loads((run_dir / "DONE.json").read_text())["weight_sha256"]


@pytest.mark.slow
def test_two_nodes_over_loopback_give_the_one_machine_losses(tmp_path):
    """Two node_launch.sh processes (NODE_RANK 0 and 1, one process each, FSDP2) meet over 127.0.0.1 and
    train 3 steps: both exit 0, with the losses, gradient norms and weights of the one-machine 2-process
    run, bit for bit. (~100 s on the shared 2-core CPU machine: slow.)"""
    two, one = tmp_path / "two", tmp_path / "one"
    extra = ("train.max_steps=3", "train.parallel=fsdp2")
    env = {**os.environ, **TRAIN_ENV, "PYTHON": PYTHON, "NUM_NODES": "2", "MAIN_ADDR": "127.0.0.1",
           "MAIN_PORT": str(free_port()), "PROCS_PER_NODE": "1"}
    nodes = [subprocess.Popen(["bash", str(NODE_LAUNCH), "tests/tiny_dmd2", *_overrides(two, *extra)],
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    _one_machine(one, *extra)
    assert [r["step"] for r in _rows(two)] == [0, 1, 2]
    assert _rows(two) == _rows(one)
    assert json.loads((two / "DONE.json").read_text())["num_processes"] == 2
    assert _digests(two) == _digests(one)


@pytest.mark.slow
def test_slurm_cycle_signal_checkpoint_requeue_resume(stubs, tmp_path):
    """The whole cycle through launch/slurm_multinode.sh, real training on two loopback "nodes": SIGUSR1 to
    the batch shell after step 2 -> every process stops after the same step with one checkpoint, exit 0
    -> `scontrol requeue` -> the same command started again (SLURM_RESTART_COUNT=1) resumes it and ends
    with the uninterrupted one-machine run's losses and weights. (~120 s on the shared 2-core CPU machine: slow.)"""
    run, straight = tmp_path / "run", tmp_path / "straight"
    extra = ("train.max_steps=8", "train.checkpoint_every=100", "run.name=tiny on two nodes")
    env = {**stubs["env"], **TRAIN_ENV, "PYTHON": PYTHON, "STUB_HOSTS": "127.0.0.1", "PROCS_PER_NODE": "1",
           "MAIN_PORT": str(free_port())}
    cmd = ["bash", str(SLURM_SCRIPT), "tests/tiny_dmd2", *_overrides(run, *extra)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and len(_rows(run)) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("stopped by SIGTERM") == 1
    assert _requeues(stubs["log"]) == [["requeue", str(JOB_ID)]]
    (checkpoint,) = sorted((run / "checkpoints").glob("checkpoint-*"))
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped_at < 8 and not (run / "DONE.json").exists()

    env["SLURM_RESTART_COUNT"] = "1"
    again = subprocess.run(cmd, env={**env, "MAIN_PORT": str(free_port())}, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumes] == [stopped_at]
    _one_machine(straight, *extra)
    assert _rows(run) == _rows(straight)
    assert _digests(run) == _digests(straight)
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["name"] == "tiny on two nodes"
