"""Checkpoints that are complete or absent, hold no pickles, and say what run they belong to.

A run folder holds ``checkpoints/checkpoint-<step>``. Writing one:

1. ``accelerator.save_state`` into ``.tmp-checkpoint-<step>`` (weights as safetensors; optimizer, LR
   scheduler and RNG states as torch files that accelerate reads back with ``weights_only=True``);
2. the harness's own extra states (EMA shadows, shared-base LoRA parameters, EMA target roles) as one
   ``extra_state.safetensors`` (scalars as JSON metadata): never accelerate's custom-object registration, whose
   ``custom_checkpoint_*.pkl`` accelerate unpickles with ``weights_only=False``;
   With ``train.fsdp_checkpoint: sharded`` the FSDP2-sharded roles' states (weights, AdamW moments, export
   EMA shadows, EMA target roles) are not gathered: every process writes its own shards through
   ``torch.distributed.checkpoint`` into ``dcp/`` (``HuggingFaceStorageWriter``: safetensors files with the
   shards' offsets in their metadata, no pickle), fsyncs them, and all processes meet before the state
   file is written; their scalars stay in ``extra_state.safetensors``, which names the states in ``dcp/``.
   Loading reshards onto any process count, or onto none (an export);
3. every file fsynced, then ``stepdistill_state.json`` written last: the step, the resolved config of
   the run and a manifest of every file with its size;
4. the folder renamed into place and the parent folder fsynced.

A checkpoint is *complete* when its state file parses and every file of its manifest is there with its
size; ``latest`` is the newest complete one, and newer damaged ones are skipped with a warning naming
them. A crash at any point leaves at most a ``.tmp-`` folder, removed at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stepdistill.harness.parallel import full_tensor, is_sharded, load_full_

logger = logging.getLogger("stepdistill")

STATE_FILE = "stepdistill_state.json"
EXTRA_FILE = "extra_state.safetensors"
DCP_DIR = "dcp"  # the sharded states (``train.fsdp_checkpoint: sharded``), one safetensors file per process
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the previous one is kept)."""


# ---- the harness's extra states ------------------------------------------------------------------
class ExtraState:
    """A named piece of training state outside accelerate's models/optimizers: tensors + JSON scalars."""

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def scalars(self) -> dict:
        return {}

    def load(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        raise NotImplementedError

    # A state stored through torch.distributed.checkpoint is read in place: ``targets`` are the tensors
    # (this process's shards, or whole tensors) that DCP fills, ``loaded`` finishes with the scalars.
    def targets(self, saved: dict) -> dict[str, torch.Tensor]:
        """The tensors to load ``saved`` (key -> DCP ``TensorStorageMetadata``) into; by default this
        state's own tensors, which alias the live ones."""
        return self.tensors()

    def loaded(self, scalars: dict) -> None:
        """After DCP filled ``targets``."""


class ParamsState(ExtraState):
    """A list of parameters trained in place (a shared-base LoRA role: no accelerate-wrapped module)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params

    def tensors(self):
        return {str(i): p.detach() for i, p in enumerate(self.params)}

    @torch.no_grad()
    def load(self, tensors, scalars):
        _check_keys(tensors, [str(i) for i in range(len(self.params))])
        for i, p in enumerate(self.params):
            load_full_(p, tensors[str(i)])


class ModuleState(ExtraState):
    """A whole module's state dict (a frozen EMA target role; an FSDP2-sharded role's weights)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def tensors(self):
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    @torch.no_grad()
    def load(self, tensors, scalars):
        own = self.module.state_dict()
        _check_keys(tensors, list(own))
        for k, dst in own.items():
            load_full_(dst, tensors[k])


class OptimizerState(ExtraState):
    """An optimizer and its LR schedule outside accelerate (an FSDP2-sharded role): the per-parameter
    states as whole tensors, or through DCP as each process's shards (either way a run resumes onto any
    process count), hyper-parameters and the schedule's counters as scalars."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler):
        self.optimizer, self.scheduler = optimizer, scheduler

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def tensors(self):
        out = {}
        for i, p in enumerate(self._params()):
            for key, value in self.optimizer.state.get(p, {}).items():
                out[f"{i}.{key}"] = value.detach()
        return out

    def scalars(self):
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {"param_groups": groups, "scheduler": sched}

    @torch.no_grad()
    def load(self, tensors, scalars):
        from torch.distributed.tensor import distribute_tensor

        for i, p in enumerate(self._params()):
            state = {}
            for key in sorted(k.split(".", 1)[1] for k in tensors if k.split(".", 1)[0] == str(i)):
                full = tensors[f"{i}.{key}"]
                if is_sharded(p) and full.shape == p.shape:  # a moment: this process's shard of it
                    full = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements,
                                             src_data_rank=None)
                state[key] = full
            if state:
                self.optimizer.state[p] = state
        self._load_scalars(scalars)

    def _load_scalars(self, scalars):
        for group, saved in zip(self.optimizer.param_groups, scalars["param_groups"]):
            group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **scalars["scheduler"]})

    def targets(self, saved):
        """Fresh per-parameter states shaped as ``saved`` says (a fresh optimizer has none yet): a moment
        (the parameter's shape) like its parameter, a DTensor shard of it where the parameter is sharded;
        anything else (AdamW's ``step``) where AdamW keeps it."""
        groups = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        params = self._params()
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        out = {}
        for key, meta in saved.items():
            index, sub = key.split(".", 1)
            if not index.isdigit() or int(index) >= len(params):
                raise ValueError(f"checkpoint optimizer state {key!r} names no parameter of this run "
                                 f"({len(params)} parameters)")
            p = params[int(index)]
            dtype = meta.properties.dtype
            if tuple(meta.size) == tuple(p.shape):
                value = torch.zeros_like(p, dtype=dtype)
            else:
                group = groups[id(p)]
                on_device = group.get("fused") or group.get("capturable")
                value = torch.zeros(tuple(meta.size), dtype=dtype,
                                    device=_local_device(p) if on_device else "cpu")
            self._pending.setdefault(int(index), {})[sub] = out[key] = value
        return out

    def loaded(self, scalars):
        params = self._params()
        for index, state in sorted(self._pending.items()):
            self.optimizer.state[params[index]] = dict(sorted(state.items()))
        self._pending = {}
        self._load_scalars(scalars)


class EMAState(ExtraState):
    """diffusers' ``EMAModel``: its shadow parameters as tensors, its counters and decay as scalars."""

    _SCALARS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma",
                "power")

    def __init__(self, ema):
        self.ema = ema

    def tensors(self):
        return {f"shadow.{i}": p.detach() for i, p in enumerate(self.ema.shadow_params)}

    def scalars(self):
        return {k: getattr(self.ema, k) for k in self._SCALARS}

    @torch.no_grad()
    def load(self, tensors, scalars):
        _check_keys(tensors, [f"shadow.{i}" for i in range(len(self.ema.shadow_params))])
        for i, p in enumerate(self.ema.shadow_params):
            load_full_(p, tensors[f"shadow.{i}"])
        self.loaded(scalars)

    def loaded(self, scalars):
        for k in self._SCALARS:
            if k in scalars:
                setattr(self.ema, k, scalars[k])


def _local_device(tensor: torch.Tensor) -> torch.device:
    return tensor.to_local().device if is_sharded(tensor) else tensor.device


def _check_keys(tensors: dict, expected: list[str]) -> None:
    if sorted(tensors) != sorted(expected):
        raise ValueError(f"checkpoint extra state holds {len(tensors)} tensors where this run has {len(expected)}")


def gather_extra_states(states: dict[str, ExtraState], keep: bool) -> tuple[dict, dict]:
    """The flat tensors and scalars of ``states``, whole. Every process calls it: a sharded (DTensor)
    tensor is gathered, which takes all of them; only where ``keep`` (the process that writes) are the
    tensors copied to the CPU and returned."""
    tensors, scalars = {}, {}
    for name, state in states.items():
        for key, value in state.tensors().items():
            value = full_tensor(value.detach())
            if keep:
                tensors[f"{name}/{key}"] = value.cpu().contiguous()
        scalars[name] = state.scalars()
    return tensors, scalars


def save_extra_states(folder: Path, states: dict[str, ExtraState],
                      gathered: tuple[dict, dict] | None = None, sharded: dict[str, ExtraState] | None = None) -> None:
    """Write ``extra_state.safetensors``: the tensors of ``states`` (``gathered``: already gathered) and
    the scalars of both ``states`` and the ``sharded`` ones, whose tensors ``save_sharded_states`` wrote."""
    tensors, scalars = gathered if gathered is not None else gather_extra_states(states, keep=True)
    scalars = {**scalars, **{name: state.scalars() for name, state in (sharded or {}).items()}}
    save_file(tensors, str(folder / EXTRA_FILE),
              metadata={"scalars": json.dumps(scalars), "dcp": json.dumps(sorted(sharded or {}))})


def _no_dist() -> bool:
    """No process group (one process, an export): DCP reads and writes alone."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def _alone_is_intended():
    """DCP warns on every save and load without a process group; one process or an export means it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _shard_files(folder: Path, rank: int) -> list[Path]:
    """The files process ``rank`` wrote in ``folder`` (HuggingFaceStorageWriter numbers them from 1)."""
    return sorted(folder.glob(f"shard-{rank + 1:05d}-*.safetensors"))


def save_sharded_states(folder: Path, states: dict[str, ExtraState], rank: int) -> None:
    """Every process: write its shards of ``states``' tensors into ``folder/dcp`` through
    ``torch.distributed.checkpoint`` (a collective under a process group) and fsync them."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

    flat = {f"{name}/{key}": value.detach() for name, state in states.items()
            for key, value in state.tensors().items()}
    out = folder / DCP_DIR
    out.mkdir(parents=True, exist_ok=True)
    with _alone_is_intended():
        save(flat, storage_writer=HuggingFaceStorageWriter(str(out), save_distributed=True), no_dist=_no_dist())
    for path in _shard_files(out, rank):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_sharded_states(folder: Path, states: dict[str, ExtraState], scalars: dict) -> None:
    """Load ``states`` from ``folder/dcp`` in place, resharded onto this run's layout: every process
    of a process group calls it (a collective); without one (an export) the tensors are read whole."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load

    path = folder / DCP_DIR
    if not path.is_dir():
        raise ValueError(f"{folder} has no {DCP_DIR}/ folder, where its {EXTRA_FILE} says "
                         f"{', '.join(states)} are stored")
    saved = HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
    flat = {}
    for name, state in states.items():
        prefix = f"{name}/"
        mine = {k[len(prefix):]: meta for k, meta in saved.items() if k.startswith(prefix)}
        targets = state.targets(mine)
        if sorted(targets) != sorted(mine):
            raise ValueError(f"{path}: {name} holds {len(mine)} tensors where this run has {len(targets)}")
        for key, target in targets.items():
            if tuple(target.shape) != tuple(mine[key].size):
                raise ValueError(f"{path}: {name}/{key} has shape {tuple(mine[key].size)} where this run has "
                                 f"{tuple(target.shape)}")
            flat[prefix + key] = target
    if flat:
        with _alone_is_intended():
            load(flat, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=_no_dist())
    for name, state in states.items():
        state.loaded(scalars[name])


def load_extra_states(folder: Path, states: dict[str, ExtraState]) -> None:
    path = folder / EXTRA_FILE
    if not states:
        return
    if not path.is_file():
        raise ValueError(f"{folder} has no {EXTRA_FILE}: it was written by an older stepdistill or another run")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    scalars = json.loads(metadata.get("scalars", "{}"))
    in_dcp = set(json.loads(metadata.get("dcp", "[]")))  # train.fsdp_checkpoint=sharded: their tensors in dcp/
    flat = load_file(str(path))
    missing = [name for name in states if name not in scalars]
    if missing:
        raise ValueError(f"{path} has no state for {', '.join(missing)} (it holds {', '.join(scalars) or 'none'})")
    for name, state in states.items():
        if name in in_dcp:
            continue
        prefix = f"{name}/"
        state.load({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, scalars[name])
    sharded = {name: state for name, state in states.items() if name in in_dcp}
    if sharded:
        load_sharded_states(folder, sharded, scalars)


# ---- finding checkpoints -------------------------------------------------------------------------
@dataclass
class Found:
    complete: list[Path]
    damaged: list[tuple[Path, str]]  # (folder, what is wrong)


def _numbered(run_dir: str | Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def damage(checkpoint: Path) -> str | None:
    """What makes ``checkpoint`` unusable (``None`` when it is complete)."""
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE} (empty, or a save that never finished)"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({e})"
    manifest = state.get("files")
    if not isinstance(manifest, dict) or not manifest:
        return f"{STATE_FILE} lists no files (written by an older stepdistill?)"
    for name, size in manifest.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is truncated or changed ({path.stat().st_size} bytes, {size} written)"
    added = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*")
                   if p.is_file() and p.name != STATE_FILE and str(p.relative_to(checkpoint)) not in manifest)
    if added:  # e.g. a custom_checkpoint_*.pkl planted for accelerate to unpickle: never load such a folder
        return f"it holds files it was not written with ({', '.join(added[:3])}); refusing to load it"
    return None


def scan_checkpoints(run_dir: str | Path) -> Found:
    found = Found([], [])
    for path in _numbered(run_dir):
        problem = damage(path)
        if problem is None:
            found.complete.append(path)
        else:
            found.damaged.append((path, problem))
    return found


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return scan_checkpoints(run_dir).complete


def latest_checkpoint(run_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint; damaged newer ones are skipped with a warning naming them."""
    found = scan_checkpoints(run_dir)
    newest = found.complete[-1] if found.complete else None
    if warn:
        for path, problem in found.damaged:
            if newest is None or _step(path) > _step(newest):
                logger.warning("skipping damaged checkpoint %s: %s", path, problem)
    return newest


def _step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` → fresh run; ``latest`` → newest complete checkpoint (or fresh if none); else a folder."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"train.resume={resume!r}: no such folder; use 'latest' or one of: "
                         f"{[str(p) for p in list_checkpoints(run_dir)] or 'none saved yet'}")
    problem = damage(path)
    if problem is not None:
        raise ValueError(f"train.resume={resume!r} is not a complete stepdistill checkpoint: {problem}; use "
                         f"'latest' (the newest complete one) or one of: "
                         f"{[str(p) for p in list_checkpoints(run_dir)] or 'none saved yet'}")
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


# ---- writing -------------------------------------------------------------------------------------
def fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder`` and the folders themselves (data before the state file)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mount_point(path: Path) -> Path:
    """The mount point holding ``path`` (named in "no space left on ..." errors)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    dev = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, however the writer reports it (OSError, safetensors' IoError, torch's stream errors)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left", "StorageFull", "os error 28", "Disk quota exceeded"))


def save_checkpoint(accelerator, run_dir: str | Path, step: int, extra: dict, keep: int,
                    extra_states: dict[str, ExtraState] | None = None, sharded: set[str] | frozenset = frozenset()
                    ) -> Path:
    """Save the training state for ``step`` (the next step to run), complete or not at all; keep the
    newest ``keep`` complete checkpoints (0: all). ``sharded``: the names of the ``extra_states`` every
    process writes its own shards of through DCP (``train.fsdp_checkpoint: sharded``). Raises ``CheckpointWriteError`` (the folder removed,
    earlier checkpoints untouched) when the disk is full or a write fails."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"checkpoint-{step}"
    tmp = folder / f"{_TMP_PREFIX}checkpoint-{step}"
    error: BaseException | None = None
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    gathered = None
    states = extra_states or {}
    in_dcp = {name: state for name, state in states.items() if name in sharded}
    whole = {name: state for name, state in states.items() if name not in sharded}
    try:
        accelerator.save_state(str(tmp))  # every process writes its RNG state; main writes the rest
        # every process: sharded states are gathered collectively (the main process keeps them)
        gathered = gather_extra_states(whole, keep=accelerator.is_main_process)
        if in_dcp:  # or each process writes its own shards (every process has written before the barrier below)
            save_sharded_states(tmp, in_dcp, accelerator.process_index)
    except Exception as e:  # noqa: BLE001 - reported below, on every process, with the disk named
        error = e
    error = first_error(accelerator, error)
    if accelerator.is_main_process and error is None:
        try:
            save_extra_states(tmp, whole, gathered, in_dcp)
            fsync_tree(tmp)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_json_atomic(tmp / STATE_FILE, {"step": step, **extra, "files": files})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(folder)
        except Exception as e:  # noqa: BLE001
            error = e
    error = first_error(accelerator, error)
    if error is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir, warn=False)
        kept = f"kept {previous}" if previous is not None else "no earlier checkpoint exists"
        if is_disk_full(error):
            raise CheckpointWriteError(
                f"no space left on {mount_point(folder)} while writing checkpoint-{step} ({kept}); free space "
                "and resume with train.resume=latest") from error
        raise CheckpointWriteError(f"could not write checkpoint-{step} in {folder}: {error} ({kept})") from error
    if accelerator.is_main_process and keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def first_error(accelerator, error: BaseException | None) -> BaseException | None:
    """Every process learns whether any process failed (so none waits at a barrier for a dead one)."""
    if accelerator.num_processes == 1:
        return error
    texts = gather_object([None if error is None else str(error)])
    if error is None and any(t is not None for t in texts):
        return OSError(next(t for t in texts if t is not None))
    return error


def clean_stale_temps(run_dir: str | Path) -> list[Path]:
    """Remove the ``.tmp-`` folders a crashed save or export left behind; returns what was removed."""
    run_dir = Path(run_dir)
    stale = [p for parent in (run_dir, run_dir / "checkpoints") if parent.is_dir()
             for p in parent.iterdir() if p.name.startswith(_TMP_PREFIX)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
