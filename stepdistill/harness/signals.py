"""Graceful stop: SIGTERM (SLURM preemption, ``kill``) or SIGINT (Ctrl-C) end a run after the current step
with a checkpoint, instead of losing up to ``train.checkpoint_every`` steps.

The handler only records the signal; the loop asks ``requested()`` once per step. With several processes
they must stop after the same step (each writes its part of the checkpoint), so the flag is all-reduced
(max) over a CPU (gloo) group of its own: a host-side collective that never waits for the GPU. (On the
default group, that per-step all-reduce made 3 of 4 two-process CPU runs abort at exit with "terminate
called without an active exception"; the own group ends with a barrier, then is destroyed.) A second signal
restores the default behaviour and re-raises it: Ctrl-C twice interrupts at once.
"""

from __future__ import annotations

import signal
import threading

import torch

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: str | None = None
        self._previous: dict = {}
        self._group = None

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
        if self.received is not None:  # the second one: do what it would have done without us
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name

    def requested(self) -> str | None:
        """The signal's name once any process received one (the same answer on every process)."""
        if self.accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([_SIGNALS.index(signal.Signals[self.received]) + 1 if self.received else 0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return signal.Signals(_SIGNALS[int(flag) - 1]).name if int(flag) else None
