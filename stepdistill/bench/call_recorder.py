"""Recording the denoiser calls of training iterations (``stepdistill bench-train``'s sum of parts).

While ``CallRecorder.installed()`` is active and a kind of iteration is being recorded, every role's denoiser
call is kept once per distinct kind (phase, role, batch, backbone batches, CFG, grad mode, features) with a
replayable copy of its arguments and a count, and so are the batch preparations (``make_batch``) and the
method's own ``encode_prompt`` calls; gradient hooks note which outputs were back-propagated.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a denoiser output (a tensor, or tuples / lists / dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for item in out for t in flatten_outputs(item)]
    return []


def _detach(value: Any) -> Any:
    """A replayable copy of a call argument: tensors detached (leaves that require grad stay so)."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad and value.is_floating_point())
    return value


@dataclass
class CallType:
    """One distinct kind of denoiser call of an iteration kind, with a replayable instance."""

    phase: str
    role: str
    batch: int
    backbone_batches: tuple[int, ...]
    cfg: bool
    grad: bool
    input_grad: bool
    features: bool | str  # True: prediction and features; "features only": the backbone stops there
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    count: int = 0
    used_outputs: set = field(default_factory=set)  # output indices that received gradients

    @property
    def backprop(self) -> bool:
        return bool(self.used_outputs)

    def replay_key(self) -> tuple:
        return (self.phase, self.role, self.batch, self.backbone_batches, self.cfg, self.grad, self.input_grad,
                self.features, tuple(sorted(self.used_outputs)))

    def label(self, trains_role: bool) -> str:
        kind = "fwd+bwd" if self.backprop else ("fwd (grad mode)" if self.grad else "fwd")
        if self.features and self.used_outputs == {1}:
            kind = "fwd+bwd from the features"
        if self.features == "features only":
            kind = ("fwd+bwd" if self.backprop else "fwd") + " to the features"
        text = f"{self.role} {kind}, batch {self.batch}"
        calls = self.backbone_batches
        if self.cfg and calls == (2 * self.batch,):
            text += " + CFG (backbone batch " + str(2 * self.batch) + ")"
        elif calls and calls != (self.batch,):
            text += f" (backbone batches {'+'.join(map(str, calls))})"
        elif self.cfg:
            text += " + CFG"
        if self.features and "features" not in kind:
            text += " + features"
        if self.backprop and not trains_role:
            text += ", grad to inputs only"
        return f"{text} · {self.phase} phase"


class _RecordingDenoiser:
    def __init__(self, denoiser, role: str, recorder: CallRecorder):
        self._denoiser, self._role, self._recorder = denoiser, role, recorder

    def __call__(self, *args, **kwargs):
        rec = self._recorder
        grad = torch.is_grad_enabled()
        input_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))
        frame: list[int] = []
        rec.stack.append(frame)
        try:
            out = self._denoiser(*args, **kwargs)
        finally:
            rec.stack.pop()
        rec.add(self._role, args, kwargs, grad, input_grad, tuple(frame), out)
        return out

    def __getattr__(self, item):
        return getattr(self._denoiser, item)


class CallRecorder:
    """Records every denoiser call of the iterations run while ``recording`` (see ``installed``)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.kind: tuple[str, ...] | None = None
        self.phase: str | None = None
        self.calls: dict[tuple[str, ...], dict[tuple, CallType]] = {}
        self.batches: dict[tuple[str, ...], list[int]] = {}  # make_batch indices per kind
        # teacher.encode_prompt calls a method makes itself (outside make_batch): first prompts, count
        self.prompt_calls: dict[tuple[str, ...], tuple[list[str], int]] = {}
        self._in_batch = False
        self.iterations: Counter = Counter()
        self.stack: list[list[int]] = []

    @property
    def recording(self) -> bool:
        return self.kind is not None

    def add(self, role: str, args, kwargs, grad: bool, input_grad: bool, frame: tuple[int, ...], out) -> None:
        if not self.recording:
            return
        x = args[0] if args else kwargs.get("x_t")
        batch = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim else 0
        uncond = kwargs.get("uncond")
        cfg = uncond is not None and float(kwargs.get("guidance_scale", 1.0)) != 1.0
        features = "features only" if kwargs.get("features_only") else bool(kwargs.get("return_features", False))
        key = (self.phase, role, batch, frame, cfg, grad, input_grad, features)
        calls = self.calls.setdefault(self.kind, {})
        call = calls.get(key)
        if call is None:
            call = calls[key] = CallType(self.phase, role, batch, frame, cfg, grad, input_grad, features,
                                         tuple(_detach(a) for a in args),
                                         {k: _detach(v) for k, v in kwargs.items()})
        call.count += 1
        for i, t in enumerate(flatten_outputs(out)):
            if t.requires_grad:
                t.register_hook(_mark_used(call, i))

    @contextlib.contextmanager
    def installed(self):
        """Wrap every role's denoiser, count backbone calls, count ``make_batch`` calls."""
        from stepdistill.models import unwrap_model
        from stepdistill.models.roles import Role

        original = Role.denoiser
        recorder = self

        def denoiser(role):
            inner = original.fget(role)
            return _RecordingDenoiser(inner, role.name, recorder) if recorder.recording else inner

        def pre_hook(_module, args, kwargs):
            if recorder.stack:
                sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                if isinstance(sample, torch.Tensor):
                    recorder.stack[-1].append(int(sample.shape[0]))

        trainer = self.trainer
        make_batch = trainer.make_batch

        def recording_make_batch(index: int):
            cached = trainer._batch_cache is not None and trainer._batch_cache[0] == index
            if recorder.recording and not cached:  # the phases of one step share a batch
                recorder.batches.setdefault(recorder.kind, []).append(index)
            recorder._in_batch = True
            try:
                return make_batch(index)
            finally:
                recorder._in_batch = False

        teacher = trainer.teacher
        encode_prompt = teacher.encode_prompt

        def recording_encode_prompt(prompts, *args, **kwargs):
            if recorder.recording and not recorder._in_batch:
                first, count = recorder.prompt_calls.get(recorder.kind, (prompts, 0))
                recorder.prompt_calls[recorder.kind] = (first, count + 1)
            return encode_prompt(prompts, *args, **kwargs)

        modules = {id(unwrap_model(r.module)): unwrap_model(r.module) for r in trainer.roles.values()}
        handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules.values()]
        Role.denoiser = property(denoiser)
        trainer.make_batch = recording_make_batch
        teacher.encode_prompt = recording_encode_prompt
        try:
            yield self
        finally:
            Role.denoiser = original
            del trainer.make_batch  # back to the class methods
            del teacher.encode_prompt
            for h in handles:
                h.remove()


def _mark_used(call: CallType, index: int):
    def hook(grad):
        call.used_outputs.add(index)
        return grad

    return hook
