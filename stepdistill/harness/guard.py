"""The non-finite guard: no NaN/inf loss or gradient ever reaches the weights (``train.on_nonfinite``).

Every phase hands the guard its loss and the gradient norms of the roles it trains, before any
optimizer steps. The check is one fused ``isfinite`` over those scalars, on the device.

- ``stop`` (default): the update is not applied and the run ends with ``NonFiniteError`` naming the step,
  phase, role and quantity; the caller writes no checkpoint after it, so the newest checkpoint is the
  last finite one and keep-last-K never deletes it.
- ``skip``: the update is dropped and counted (``nonfinite/skipped``); more than
  ``train.max_nonfinite_skips`` dropped updates in a row end the run as ``stop`` does.

Where the check costs nothing (CPU tensors) it is read at once. On an accelerator, reading it every
phase would stall the host, so the decision stays on the device: the optimizers are fused AdamW, which
skip their whole update when handed ``found_inf = 1`` (the mechanism ``GradScaler`` uses), and the host
reads the guard's counters only where it synchronises anyway (logging, checkpoints, the end), raising
then. Under ``stop`` every update after the first non-finite one is skipped too, so the weights the host
finally sees are those before it. (A dropped update still advances the LR schedule by one step there.)
"""

from __future__ import annotations

import math

import torch


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient: the run stopped before applying it."""


class NonFiniteGuard:
    def __init__(self, mode: str, max_skips: int, device: torch.device, device_side: bool,
                 reduce=None, last_checkpoint=None):
        if mode not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite={mode!r}: choose stop or skip")
        self.mode, self.max_skips, self.device_side = mode, max_skips, device_side
        self.reduce = reduce  # all ranks agree (an all-reduce of the flag) in multi-process runs
        self.last_checkpoint = last_checkpoint or (lambda: None)
        self.skipped = 0  # host side: dropped updates in all, and per phase in a row
        self.in_a_row: dict[str, int] = {}
        self._roles: dict[str, tuple[str, ...]] = {}  # phase -> the roles it trains
        if device_side:
            # [first bad step, its phase index]; per phase [dropped, dropped in a row, longest run in a row]
            self._first = torch.tensor([-1.0, -1.0], device=device)
            self._counts: dict[str, torch.Tensor] = {}
            self._phases: list[str] = []
            self._device = device

    # ---- per phase ------------------------------------------------------------------------------
    def check(self, step: int, phase: str, loss: torch.Tensor, grad_norms: dict[str, torch.Tensor]):
        """Returns ``True`` (apply the update) / ``False`` (drop it) on the host path; on the device path,
        the ``found_inf`` tensor to hand the fused optimizers (they skip the update where it is 1)."""
        values = torch.stack([loss.detach().float().reshape(()),
                              *[g.detach().float().reshape(()) for g in grad_norms.values()]])
        finite = torch.isfinite(values).all()
        if self.reduce is not None:
            finite = self.reduce(finite.float(), "min") > 0
        self._roles[phase] = tuple(grad_norms)
        if self.device_side:
            return self._device_check(step, phase, finite)
        if bool(finite):
            self.in_a_row[phase] = 0
            return True
        what = self._describe(phase, loss, grad_norms)
        if self.mode == "stop":
            raise NonFiniteError(self._message(step, phase, what))
        self.skipped += 1
        self.in_a_row[phase] = self.in_a_row.get(phase, 0) + 1
        if self.in_a_row[phase] > self.max_skips:
            raise NonFiniteError(self._message(step, phase, what, in_a_row=self.in_a_row[phase]))
        return False

    def _device_check(self, step, phase, finite):
        if phase not in self._phases:
            self._phases.append(phase)
            self._counts[phase] = torch.zeros(3, device=self._device)
        f, c = self._first, self._counts[phase]
        bad = (~finite).float()
        first = (f[0] < 0) & ~finite
        f[0] = torch.where(first, float(step), f[0])
        f[1] = torch.where(first, float(self._phases.index(phase)), f[1])
        c[0] += bad
        c[1] = (c[1] + bad) * bad
        c[2] = torch.maximum(c[2], c[1])
        if self.mode == "stop":
            return (f[0] >= 0).float()  # sticky: nothing is applied after the first non-finite update
        return bad

    # ---- where the host synchronises anyway ----------------------------------------------------
    def poll(self) -> dict[str, float]:
        """Raise if the device path saw what ends the run; returns the counters to log."""
        if not self.device_side:
            return {"nonfinite/skipped": float(self.skipped)} if self.mode == "skip" else {}
        values = torch.cat([self._first, *self._counts.values()]).tolist() if self._counts else [-1.0, -1.0]
        first, phase_index = values[:2]
        counts = {ph: values[2 + 3 * i: 5 + 3 * i] for i, ph in enumerate(self._counts)}
        skipped = sum(c[0] for c in counts.values())
        longest = {ph: c[2] for ph, c in counts.items()}
        worst = max(longest, key=longest.get) if longest else None
        if first >= 0 and self.mode == "stop":
            phase = self._phases[int(phase_index)]
            raise NonFiniteError(self._message(int(first), phase, self._unknown(phase)))
        if worst is not None and longest[worst] > self.max_skips:
            raise NonFiniteError(self._message(int(first), worst, self._unknown(worst), in_a_row=int(longest[worst]),
                                               which="first"))
        return {"nonfinite/skipped": skipped} if self.mode == "skip" else {}

    def _unknown(self, phase: str) -> str:
        return f"a non-finite loss or gradient norm of {', '.join(self._roles[phase]) or 'no role'}"

    # ---- messages -------------------------------------------------------------------------------
    @staticmethod
    def _describe(phase: str, loss: torch.Tensor, grad_norms: dict[str, torch.Tensor]) -> str:
        if not math.isfinite(float(loss)):
            return f"{phase}/loss = {float(loss)}"
        bad = [f"grad_norm/{r} = {float(g)}" for r, g in grad_norms.items() if not math.isfinite(float(g))]
        return ", ".join(bad) or "a non-finite value on another process"

    def _message(self, step: int, phase: str, what: str, in_a_row: int | None = None, which: str = "last") -> str:
        roles = ", ".join(self._roles.get(phase, ()))
        checkpoint = self.last_checkpoint()
        last = (f"the last finite checkpoint is {checkpoint} (resume from it with train.resume=latest)"
                if checkpoint is not None else "no checkpoint was written before it")
        head = (f"{in_a_row} non-finite updates in a row (train.max_nonfinite_skips={self.max_skips}), the {which} "
                if in_a_row is not None else "non-finite training ")
        where = f"at step {step}, phase {phase!r}" + (f" (roles {roles})" if roles else "")
        skip = "" if self.mode == "skip" else ", or train.on_nonfinite=skip to drop such updates"
        return (f"{head}{where}: {what}; the update was not applied and training stopped; {last}. Usual fixes: "
                "a lower learning rate (roles.<role>.lr), gradient clipping (roles.<role>.max_grad_norm), "
                f"fp32 or bf16 instead of fp16 (train.mixed_precision){skip}")
