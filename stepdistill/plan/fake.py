"""Networks without memory: torch's FakeTensorMode, and diffusers pipelines built from config files only.

Under ``FakeTensorMode`` every tensor carries its shape, dtype, device and storage size but no data, so the
real SDXL or FLUX.1 architecture trains one iteration on a laptop CPU: every op runs its meta kernel, which
is what the planner measures (memory, FLOPs) and what the real-size tests prove (shapes, dtypes, the SDXL
time ids, FLUX packing). Anything that reads a value (``.item()``, ``if tensor:``) fails loudly there.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorConverter, FakeTensorMode


class _OutputsUnmemoised(FakeTensorConverter):
    """torch 2.14's converter keeps a weak reference to every fake op output (keyed by the meta tensor it
    was made from, which dies at once). ``nn.Module.to`` swaps fake parameters with
    ``torch.utils.swap_tensors``, which refuses tensors that have weak references: any ``module.to(dtype)``
    under FakeTensorMode fails. Only real -> fake conversions need the memo (the same real tensor must map
    to the same fake), so outputs are no longer memoised."""

    def set_tensor_memo(self, t, v) -> None:
        if t.is_meta:
            return
        super().set_tensor_memo(t, v)


class _PlanFakeMode(FakeTensorMode):
    """A FakeTensorMode in which modules can be built, deep-copied, moved and cast."""

    def __init__(self):
        # Real inputs (prompt token ids, a scheduler's buffers) are taken as constants.
        super().__init__(allow_non_fake_inputs=True)
        self.fake_tensor_converter.__class__ = _OutputsUnmemoised

    def __deepcopy__(self, memo):
        # ``copy.deepcopy(module)`` copies each fake parameter's ``fake_mode`` attribute too: the copies
        # would belong to a second mode, whose tensors this one takes for real ones (and memoises).
        return self


def fake_mode() -> FakeTensorMode:
    """A FakeTensorMode fit for building and training networks (see ``_PlanFakeMode``); enter it with
    ``with``, as often as needed."""
    return _PlanFakeMode()


def _component(folder: Path, name: str, library: str, class_name: str, dtype: torch.dtype, mode):
    """One pipeline component from ``folder/name``: models from their config (random init, in ``mode``),
    schedulers from their config, tokenizers and processors as saved (both real: their values are read)."""
    cls = getattr(importlib.import_module(library), class_name)
    sub = folder / name
    if issubclass(cls, torch.nn.Module):
        with mode:
            if library == "diffusers" or hasattr(cls, "load_config"):
                module = cls.from_config(cls.load_config(sub))
            else:  # transformers
                from transformers import AutoConfig

                module = cls._from_config(AutoConfig.from_pretrained(sub))
            return module.to(dtype).eval()
    if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # a scheduler
        return cls.from_config(cls.load_config(sub))
    return cls.from_pretrained(sub)


def pipeline_from_configs(folder: str | Path, dtype: torch.dtype = torch.float32, mode=None):
    """The diffusers pipeline of ``folder`` (``model_index.json`` and each component's config files; no
    weights are read) with freshly initialised networks in ``dtype``. In ``mode`` (a ``fake_mode()``) the
    networks take no memory, so this builds a 12 B-parameter FLUX.1 in seconds; the schedulers stay real."""
    mode = contextlib.nullcontext() if mode is None else mode
    import diffusers

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    components, options = {}, {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, list):  # a pipeline option, e.g. SDXL's force_zeros_for_empty_prompt
            options[name] = spec
        elif len(spec) != 2 or spec[0] is None or spec[1] is None:
            components[name] = None  # e.g. SD 1.5's safety_checker: [null, null]
        else:
            components[name] = _component(folder, name, spec[0], spec[1], dtype, mode)
    pipeline_cls = getattr(diffusers, index["_class_name"])
    return pipeline_cls(**components, **options)
