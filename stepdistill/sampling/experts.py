"""Run a mixture-of-experts student (Phased DMD: one network per step) in a plain diffusers pipeline.

A diffusers pipeline calls one backbone (``pipe.unet`` / ``pipe.transformer``) at every step. The export
of a Phased DMD student is an ordinary pipeline whose backbone is expert 0, plus one backbone folder per
further expert (``expert_1/``, ...) and, in ``stepdistill.json``, the timesteps that route a step to
its expert. ``ExpertSwitch`` is a ``callback_on_step_end`` that puts the next step's expert in place
after every step (and expert 0 back after the last), so the pipeline runs expert i at step i::

    from diffusers import DiffusionPipeline
    from expert_switch import ExpertSwitch        # this file; the export ships a copy of it

    pipe = DiffusionPipeline.from_pretrained(folder)
    switch = ExpertSwitch.from_folder(pipe, folder)
    image = pipe(prompt, num_inference_steps=4, guidance_scale=0.0, callback_on_step_end=switch).images[0]

Expert i owns the timesteps of its subinterval ``(t_{i+1}, t_i]`` (expert 0 everything above t_1), so
other step counts route each step to the expert trained for that noise level. Without the callback the
folder still loads and samples, with expert 0 at every step.

This module imports only ``json``, ``pathlib`` and, when loading, diffusers: it is copied verbatim into
every such export as ``expert_switch.py`` and must stay free of stepdistill imports.
"""

from __future__ import annotations

import json
from pathlib import Path

INFO_FILE = "stepdistill.json"


def route(timesteps: list[float], t: float) -> int:
    """Index of the expert whose subinterval holds timestep ``t`` (``timesteps`` highest first)."""
    return max(sum(1 for edge in timesteps if float(edge) >= float(t) - 1e-4) - 1, 0)


class ExpertSwitch:
    """``callback_on_step_end`` that swaps the pipeline's backbone to the expert of the next step."""

    def __init__(self, backbones: list, timesteps: list[float], attr: str = "unet"):
        if len(backbones) != len(timesteps):
            raise ValueError(f"{len(backbones)} expert backbones but {len(timesteps)} expert timesteps")
        self.backbones, self.timesteps, self.attr = list(backbones), [float(t) for t in timesteps], attr

    @classmethod
    def from_folder(cls, pipe, folder: str | Path) -> ExpertSwitch:
        """Load the experts of an export folder beside ``pipe`` (loaded from it), on its device and dtype."""
        folder = Path(folder)
        info = json.loads((folder / INFO_FILE).read_text())
        experts = info.get("experts")
        if not experts:
            raise ValueError(f"{folder} has one network for all steps (no 'experts' in {INFO_FILE}); "
                             "call the pipeline without an ExpertSwitch")
        attr = experts["backbone"]
        base = getattr(pipe, attr)
        model_class = type(getattr(base, "_orig_mod", base))  # the module class under a torch.compile wrapper
        backbones = [base]
        for sub in experts["subfolders"]:
            model = model_class.from_pretrained(str(folder), subfolder=sub, torch_dtype=base.dtype)
            backbones.append(model.to(base.device).eval())
        return cls(backbones, experts["timesteps"], attr)

    def map_experts(self, fn) -> ExpertSwitch:
        """Replace experts 1..k-1 by ``fn(expert)`` (e.g. ``torch.compile``); expert 0 is the pipeline's own
        backbone, which the caller treats as it treats the pipeline."""
        self.backbones[1:] = [fn(b) for b in self.backbones[1:]]
        return self

    def to(self, *args, **kwargs) -> ExpertSwitch:
        """Move every expert (as ``pipe.to``) so they follow the pipeline."""
        for b in self.backbones:
            b.to(*args, **kwargs)
        return self

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        timesteps = pipe.scheduler.timesteps
        nxt = step + 1
        index = route(self.timesteps, float(timesteps[nxt])) if nxt < len(timesteps) else 0
        setattr(pipe, self.attr, self.backbones[index])
        return {}


class SwitchedPipeline:
    """A pipeline whose calls pass ``callback_on_step_end=switch`` (for code that calls pipelines
    generically, e.g. evaluation); every other attribute is the pipeline's own."""

    def __init__(self, pipe, switch: ExpertSwitch):
        self._pipe, self.switch = pipe, switch

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("callback_on_step_end", self.switch)
        return self._pipe(*args, **kwargs)

    def __getattr__(self, item):
        return getattr(self._pipe, item)


def with_experts(pipe, folder: str | Path):
    """``pipe`` loaded from ``folder``, wrapped to run its experts when the folder has several (else as is)."""
    info_path = Path(folder) / INFO_FILE
    if not info_path.is_file() or not json.loads(info_path.read_text()).get("experts"):
        return pipe
    return SwitchedPipeline(pipe, ExpertSwitch.from_folder(pipe, folder))
