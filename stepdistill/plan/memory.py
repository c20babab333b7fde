"""Device memory of a training iteration, measured op by op.

``MemoryTracker`` is a TorchDispatchMode: every op's outputs are looked at, each new storage is counted
once (views and in-place results share their input's), and a weak reference to it subtracts it again
when autograd, the optimizer or Python frees it. So the live total follows the caching allocator's
"allocated" figure without its rounding, on real tensors and under FakeTensorMode alike, however many
times a module runs per step (torch.distributed._tools' MemTracker follows modules, and counts a module
called twice in one step wrongly: every method here calls its networks several times).

Each storage is counted under a category: what the caller registered (``register``: parameters, EMA
shadows, optimizer states, ``"<kind>/<role>"``), gradients (tagged as autograd accumulates them into a
registered parameter), the casts of registered weights (``"autocast/<owner>"``: autocast keeps them for its
whole region), else ``"activations"`` (activations saved for backward, temporaries). ``peak`` is the largest live total, and ``at_peak`` its split.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ACTIVATIONS = "activations"


class MemoryTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._live: dict[int, list] = {}  # storage key -> [nbytes, category, weakref]
        self.totals: dict[str, int] = defaultdict(int)
        self.live_bytes = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self._grad_category: dict[int, str] = {}  # id(parameter) -> its gradients' category
        self._hooks = []

    # ---- counting ----------------------------------------------------------------------------
    def _add(self, storage: torch.UntypedStorage, category: str) -> None:
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        ref = weakref.ref(storage, lambda _, key=key: self._free(key))
        self._live[key] = [nbytes, category, ref]
        self.totals[category] += nbytes
        self.live_bytes += nbytes
        if self.live_bytes > self.peak:
            self.peak = self.live_bytes
            self.at_peak = {k: v for k, v in self.totals.items() if v}

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]
            self.live_bytes -= entry[0]

    def _move(self, storage: torch.UntypedStorage, category: str) -> None:
        entry = self._live.get(storage._cdata)
        if entry is None:
            self._add(storage, category)
        elif entry[1] != category:
            self.totals[entry[1]] -= entry[0]
            self.totals[category] += entry[0]
            entry[1] = category

    # ---- what the caller knows ---------------------------------------------------------------
    def register(self, tensors, category: str) -> None:
        """Count ``tensors`` (already allocated) under ``category``, or move them there."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._move(t.untyped_storage(), category)

    def register_parameters(self, parameters, category: str, grad_category: str | None = None) -> None:
        """Parameters under ``category``; their gradients, once autograd accumulates them, under
        ``grad_category`` (a post-accumulate-grad hook re-tags the new ``.grad``)."""
        parameters = list(parameters)
        self.register(parameters, category)
        if grad_category is None:
            return
        for p in parameters:
            if p.requires_grad and id(p) not in self._grad_category:
                self._grad_category[id(p)] = grad_category
                self._hooks.append(p.register_post_accumulate_grad_hook(self._tag_grad))

    def _tag_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._move(p.grad.untyped_storage(), self._grad_category[id(p)])

    def reset_peak(self) -> None:
        self.peak, self.at_peak = self.live_bytes, {k: v for k, v in self.totals.items() if v}

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category = ACTIVATIONS
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor):
            # autocast's cast of a weight (cached for the whole autocast region): "autocast/<owner>"
            source = self._live.get(args[0].untyped_storage()._cdata)
            if source is not None and source[1].startswith("params/"):
                category = "autocast/" + source[1].split("/", 1)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), category)
        return out
