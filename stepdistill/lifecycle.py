"""A run from start to end: train, then export the student, evaluate it and write its model card.

The one module that knows the order of a run's stages; it sits above the harness (which only trains)
and export / eval (which know nothing of training). ``train.py`` and ``stepdistill train`` call ``run``;
so can scripts and tests that want the whole run in-process.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from stepdistill.eval.compare import evaluate_config_run
from stepdistill.export.hub import write_model_card
from stepdistill.export.pipeline import export_pipeline
from stepdistill.harness.preflight import Plan
from stepdistill.harness.trainer import Trainer

logger = logging.getLogger("stepdistill")


def export_student(trainer: Trainer, out: str | Path | None = None, dtype: str | None = None,
                   use_ema: bool | None = None, **export_kwargs) -> Path:
    """Write the trained student as a diffusers pipeline (default: ``<run>/export``) with its model card,
    its export EMA weights swapped in (``export.use_ema``). ``export_kwargs`` go to
    ``export.pipeline.export_pipeline`` (lora_only, variant, repo_id, license_, allow_nonfinite)."""
    cfg = trainer.cfg
    out = Path(out) if out is not None else trainer.run_dir / "export"
    dtype = dtype or cfg.export.dtype
    use_ema = cfg.export.use_ema if use_ema is None else use_ema
    with trainer.ema_weights(enabled=use_ema), trainer.gathered_roles():
        if trainer.accelerator.is_main_process:
            export_pipeline(trainer.teacher, trainer.method, trainer.roles[trainer.method.student_role], out,
                            dtype=dtype, config=OmegaConf.to_container(cfg, resolve=True), run_dir=trainer.run_dir,
                            **export_kwargs)
    trainer.accelerator.wait_for_everyone()
    return out


def evaluate(trainer: Trainer) -> dict:
    """Teacher vs exported student on the toy domain (the config's ``eval`` section); writes the run's
    ``metrics.json``, ``summary.md`` and comparison grid."""
    return evaluate_config_run(trainer.run_dir, trainer.cfg, num_inference_steps=trainer.method.num_inference_steps)


def complete(trainer: Trainer) -> Path:
    """What follows training, in order: export (``export.enabled``), evaluation and the model card again
    with its results (``eval.enabled``), then ``Trainer.finish`` (trackers closed, ``DONE.json``). A run
    stopped by a signal only finishes: it resumes later and completes then."""
    cfg, acc = trainer.cfg, trainer.accelerator
    if not trainer.stopped_by and cfg.export.enabled:
        out = export_student(trainer)
        if acc.is_main_process:
            logger.info("exported diffusers pipeline to %s", out)
        if cfg.eval.enabled and acc.is_main_process:
            evaluate(trainer)
            write_model_card(out, trainer.run_dir)  # again, now with the evaluation and its grid
    trainer.finish()
    return trainer.run_dir


def run(cfg: DictConfig | Trainer, plan: Plan | None = None) -> Path:
    """The whole run for a resolved config (``runconfig.load_config``) or a built ``Trainer``: train to
    ``train.max_steps`` (resuming per ``train.resume``), then ``complete``. Returns the run folder.
    ``plan``: what ``harness.preflight.preflight(cfg)`` found, when the caller ran it already."""
    trainer = cfg if isinstance(cfg, Trainer) else Trainer(cfg)
    trainer.train(plan)
    return complete(trainer)
