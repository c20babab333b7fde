"""Graceful stop: SIGTERM (SLURM preemption, ``kill``) or SIGINT (Ctrl-C) end a run after the current step
with a checkpoint, instead of losing up to ``train.checkpoint_every`` steps.

The handler only records the signal; the loop asks ``requested()`` once per step. With several processes
they must stop after the same step (each writes its part of the checkpoint), so the flag is all-reduced
(max) over a CPU (gloo) group of its own: a host-side collective that never waits for the GPU. (On the
default group, that per-step all-reduce made 3 of 4 two-process CPU runs abort at exit with "terminate
called without an active exception"; the own group ends with a barrier, then is destroyed.)

While a stop is under way (from the first signal until the checkpoint is written and the loop has left the
``with`` block):

- a further SIGTERM is ignored (logged once, by the main process). Launchers and schedulers send one SIGTERM
  to every process: under torchrun / ``accelerate launch`` a SIGTERM to the launcher is forwarded to the
  workers, and SLURM's ``--signal=TERM@...`` or ``scancel --signal=TERM`` signal every process of the step,
  the launcher included, so each worker gets two. Treating the second as "now" killed them before the
  checkpoint (exit 143).
- a SIGINT restores the behaviour from before ``GracefulStop`` and re-raises it: Ctrl-C twice (or Ctrl-C
  after a SIGTERM) interrupts at once, without a checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
logger = logging.getLogger("stepdistill")


class GracefulStop:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: str | None = None
        self._previous: dict = {}
        self._group = None
        self._repeats_logged = False

    def __enter__(self) -> GracefulStop:
        if self.accelerator.num_processes > 1:
            self._group = torch.distributed.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._group is not None:
            if exc[0] is None:  # both ranks done with the group before either closes its connections
                torch.distributed.barrier(group=self._group)
            torch.distributed.destroy_process_group(self._group)
            self._group = None

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            return
        if signum == signal.SIGTERM:  # the launcher's or the scheduler's copy of the same request: keep stopping
            if not self._repeats_logged and self.accelerator.is_main_process:
                logger.warning("SIGTERM again while stopping after %s: ignored (a launcher or SLURM signals every "
                               "process); the run still stops after this step with a checkpoint. A SIGINT "
                               "(Ctrl-C) stops it at once, without one", self.received)
            self._repeats_logged = True
            return
        # SIGINT while stopping: do what it would have done without us (Ctrl-C twice interrupts at once)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        signal.raise_signal(signum)

    def requested(self) -> str | None:
        """The signal's name once any process received one (the same answer on every process)."""
        if self.accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([_SIGNALS.index(signal.Signals[self.received]) + 1 if self.received else 0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return signal.Signals(_SIGNALS[int(flag) - 1]).name if int(flag) else None
