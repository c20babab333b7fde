"""LoRA roles with peft: add an adapter, switch adapters per call, merge for export.

Several roles may keep their LoRA adapters on ONE frozen base (the teacher's backbone) to save the
memory of extra copies. Calls then have to select which adapter is active. peft's own
``set_adapter`` / ``enable_adapters`` also flip ``requires_grad`` of the adapters, which would fight
the harness (it decides per phase which role trains), so ``use_adapter`` switches the active adapter
by the layer attributes alone and restores them afterwards.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict


def add_lora(backbone: torch.nn.Module, name: str, rank: int, alpha: float | None, target_modules) -> None:
    """Add a trainable LoRA adapter called ``name`` (float32 weights) to a diffusers backbone."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(target_modules),
        init_lora_weights="gaussian",
    )
    try:
        backbone.add_adapter(config, adapter_name=name)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(
            f"roles.{name}.lora_target_modules={list(target_modules)} do not match modules of "
            f"{type(backbone).__name__}: {err}"
        ) from err
    for param_name, param in backbone.named_parameters():
        if f".{name}." in param_name and "lora_" in param_name:
            param.data = param.data.float()


def lora_parameters(backbone: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in backbone.named_parameters() if "lora_" in n and f".{name}." in n]


def _tuner_layers(backbone: torch.nn.Module):
    return [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]


_NOT_SET = object()


@contextlib.contextmanager
def use_adapter(backbone: torch.nn.Module, name: str | None):
    """Run calls inside with only adapter ``name`` active (``None``: the bare base model)."""
    layers = _tuner_layers(backbone)
    saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    saved_name = getattr(backbone, "_stepdistill_adapter", _NOT_SET)
    try:
        for layer in layers:
            if name is None:
                layer._disable_adapters = True
            else:
                layer._active_adapter = [name]
                layer._disable_adapters = False
        backbone._stepdistill_adapter = name
        yield
    finally:
        for layer, (active, disabled) in zip(layers, saved):
            layer._active_adapter, layer._disable_adapters = active, disabled
        if saved_name is _NOT_SET:
            del backbone._stepdistill_adapter
        else:
            backbone._stepdistill_adapter = saved_name


def enable_adapter_aware_checkpointing(backbone: torch.nn.Module) -> None:
    """Gradient checkpointing that recomputes each block with the adapter that was active in its forward.

    Recomputation happens during ``backward``, long after ``use_adapter`` has switched to another role
    (or back to the bare teacher): with plain checkpointing, a generator block would be recomputed with
    the critic's adapter, or none. ``context_fn`` re-enters the forward-time adapter for recomputation.
    """

    def checkpoint(function, *args):
        name = getattr(backbone, "_stepdistill_adapter", _NOT_SET)

        def context_fn():
            if name is _NOT_SET:
                return contextlib.nullcontext(), contextlib.nullcontext()
            return contextlib.nullcontext(), use_adapter(backbone, name)

        return torch.utils.checkpoint.checkpoint(function.__call__, *args, use_reentrant=False,
                                                 context_fn=context_fn)

    backbone.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)


def lora_state_dict(backbone: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's key format (what diffusers' ``save_lora_weights`` expects)."""
    return get_peft_model_state_dict(backbone, adapter_name=name)


def merged_copy(backbone: torch.nn.Module, name: str) -> torch.nn.Module:
    """A plain copy of ``backbone`` with adapter ``name`` merged into the base weights and every
    LoRA layer removed, so it saves as an ordinary diffusers model."""
    model = copy.deepcopy(backbone)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                if name in child.lora_A:
                    child.merge(adapter_names=[name])
                setattr(parent, child_name, child.get_base_layer())
    # diffusers records loaded adapters on the model; a merged model has none.
    if hasattr(model, "peft_config"):
        del model.peft_config
    model._hf_peft_config_loaded = False
    return model
