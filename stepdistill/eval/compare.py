"""Teacher vs student on the toy domain: FID, prompt alignment, diversity, latency and a comparison grid.

``evaluate_run`` measures a finished run (``<run>/export`` against its toy teacher) and writes
metrics.json, comparison.png and summary.md into the run folder; ``stepdistill eval RUN_DIR`` and
``stepdistill toy eval RUN_DIR`` run it again with the settings of the run's config.yaml (``main``).

Both sides are run as plain diffusers pipelines (the exported student folder and the shipped teacher),
with the same prompts and seeds, so the numbers describe what a user would load. Each row is measured by
``stepdistill.eval.toy`` on all prompts and on the held-out combinations.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from stepdistill.eval.generate import Entry, generate, labelled_grid
from stepdistill.eval.provenance import provenance

__all__ = ["DATA_ROW", "baseline_rows", "evaluate_entries", "evaluate_run", "is_run_folder", "main", "real_images",
           "summary_table"]

DATA_ROW = "real images (the data: FID floor, diversity to match)"


@contextlib.contextmanager
def _quiet_diffusers():
    """Load pipelines without diffusers' per-component progress bars and its safety-checker notice
    (the toy pipelines have no safety checker by design)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)
        dlogging.enable_progress_bar()


def real_images(prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """The procedural data itself for every (prompt, seed) pair, prompt-major as ``generate``: one fresh
    rendering (size and place jitter) per pair, from seeds no reference set uses."""
    import numpy as np

    from stepdistill.toy.data import parse_caption, render, to_tensor

    pairs = [(p, s) for p in prompts for s in seeds]
    return to_tensor([render(parse_caption(p), np.random.default_rng(30_000 + i)) for i, (p, _) in enumerate(pairs)])


def evaluate_entries(entries: list[Entry], prompts: list[str], seeds: list[int], resolution: int,
                     num_reference: int = 2000, batch_size: int = 64, progress=None, data_row: bool = True) -> dict:
    """Toy FID / alignment / diversity / latency of every entry, for all prompts and the held-out ones.

    ``data_row``: also measure real images of the same prompts and count (``out["data"]``): the FID a perfect
    generator gets at this sample count (FID is biased upward for small sets) and the diversity of the data,
    which a generator should match rather than exceed (a student above it is noisier, not more varied).
    """
    from stepdistill.eval.toy import reference_images, toy_metrics_by_split
    from stepdistill.toy.data import RESOLUTION

    ref_all = reference_images(num_reference, seed=10_000, split="all")
    ref_held = reference_images(num_reference, seed=20_000, split="held_out")
    groups = [i for i in range(len(prompts)) for _ in seeds]  # one group per prompt (its seeds)
    caps = [p for p in prompts for _ in seeds]
    results, images, out = {}, {}, {}
    if data_row and resolution == RESOLUTION:  # real images exist at the procedural data's own size only
        out["data_images"] = real_images(prompts, seeds)
        out["data"] = toy_metrics_by_split(out["data_images"], caps, ref_all, ref_held, groups)
    for entry in entries:
        imgs, latency = generate(entry, prompts, seeds, resolution, batch_size)
        metrics = toy_metrics_by_split(imgs, caps, ref_all, ref_held, groups)
        metrics["latency_ms_per_image"] = latency * 1000
        metrics["steps"], metrics["guidance_scale"] = entry.steps, entry.guidance
        results[entry.name], images[entry.name] = metrics, imgs
        if progress is not None:
            progress(entry.name, metrics)
    return {"results": results, "images": images, **out}


def summary_table(results: dict, data: dict | None = None) -> str:
    """The markdown table of ``results`` (rows of ``evaluate_entries``), led by the data row when given."""
    head = ("| model | steps | FID ↓ | alignment ↑ | held-out FID | held-out alignment | diversity | "
            "aligned diversity | ms / image |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def num(value, fmt=".2f"):
        return "n/a" if value is None else format(value, fmt)

    rows = []
    if data:
        a, h = data["all"], data["held_out"]
        rows.append(f"| {DATA_ROW} | — | {num(a['fid'])} | {num(100 * a['alignment'], '.1f')}% | {num(h['fid'])} | "
                    f"{num(100 * h['alignment'], '.1f')}% | {num(a.get('diversity'), '.3f')} | "
                    f"{num(a.get('aligned_diversity'), '.3f')} | — |")
    for name, m in results.items():
        a, h = m["all"], m["held_out"]
        rows.append(f"| {name} | {m['steps']} | {num(a['fid'])} | {num(100 * a['alignment'], '.1f')}% | "
                    f"{num(h['fid'])} | {num(100 * h['alignment'], '.1f')}% | {num(a.get('diversity'), '.3f')} | "
                    f"{num(a.get('aligned_diversity'), '.3f')} | {m['latency_ms_per_image']:.1f} |")
    return "\n".join([head, *rows])


def evaluate_run(run_dir: str | Path, teacher: str, teacher_steps: int, teacher_guidance: float,
                 student_steps: list[int], seeds_per_prompt: int, resolution: int,
                 prompts_source: str = "builtin:toy_all", grid_prompts: int = 12,
                 teacher_baselines: list[tuple[int, float]] = ()) -> dict:
    """Evaluate ``<run_dir>/export`` against the teacher; write metrics.json, comparison.png, summary.md.

    Rows: ``teacher {teacher_steps}-step`` (the reference of the quality bar), one per
    ``teacher_baselines`` (steps, guidance) entry named ``teacher {steps}-step CFG {guidance}``, then
    ``student {steps}-step`` for each of ``student_steps``.
    """
    from diffusers import DiffusionPipeline

    from stepdistill.data.prompts import load_prompts
    from stepdistill.models.loading import resolve_pretrained
    from stepdistill.sampling.experts import with_experts

    run_dir = Path(run_dir)
    export = run_dir / "export"
    info = json.loads((export / "stepdistill.json").read_text())
    with _quiet_diffusers():
        student = DiffusionPipeline.from_pretrained(str(export))
        teacher_pipe = DiffusionPipeline.from_pretrained(resolve_pretrained(teacher))
    for pipe in (student, teacher_pipe):
        pipe.set_progress_bar_config(disable=True)
    student = with_experts(student, export)  # a mixture-of-experts student (Phased DMD): expert i at step i
    entries = [Entry(f"teacher {teacher_steps}-step", teacher_pipe, teacher_steps, teacher_guidance)]
    for steps, guidance in teacher_baselines:
        if (steps, guidance) != (teacher_steps, teacher_guidance):
            entries.append(Entry(f"teacher {steps}-step CFG {guidance:g}", teacher_pipe, steps, guidance))
    for steps in student_steps:
        trained = steps == info["num_inference_steps"]
        entries.append(Entry(f"student {steps}-step", student, steps, info["guidance_scale"],
                             info["timesteps"] if trained else None))
    prompts = load_prompts(prompts_source)
    seeds = list(range(seeds_per_prompt))

    def progress(name, m):
        print(f"[eval] {name}: FID {m['all']['fid']:.2f}, alignment {100 * m['all']['alignment']:.1f}%, "
              f"{m['latency_ms_per_image']:.1f} ms/image", flush=True)

    out = evaluate_entries(entries, prompts, seeds, resolution, progress=progress)
    # Comparison grid: the same prompts and seeds in every row.
    # Prompts spread over the whole list (the toy lists are sorted by colour), first seed of each.
    n = min(grid_prompts, len(prompts))
    idx = torch.linspace(0, len(prompts) - 1, n).round().long() * len(seeds)
    rows = [("real images", out["data_images"][idx])] if "data_images" in out else []
    grid = labelled_grid(rows + [(name, imgs[idx]) for name, imgs in out["images"].items()])
    grid.save(run_dir / "comparison.png")
    table = summary_table(out["results"], out.get("data"))
    (run_dir / "summary.md").write_text(table + "\n")
    # The command that measures these numbers again (settings not in the run's config.yaml are spelled out).
    command = (f"stepdistill toy eval {run_dir} --seeds-per-prompt {seeds_per_prompt} --student-steps "
               + " ".join(str(k) for k in student_steps))
    metrics = {"teacher": teacher, "prompts": prompts_source, "seeds_per_prompt": seeds_per_prompt,
               "command": command, "results": out["results"], "data": out.get("data"),
               "provenance": provenance(command, len(prompts) * len(seeds))}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(table, flush=True)
    return metrics


def baseline_rows(ev) -> list[tuple[int, float]]:
    """``eval.teacher_baselines`` of a config (a run's config.yaml may predate the key)."""
    return [(int(row["steps"]), float(row["guidance"])) for row in ev.get("teacher_baselines") or []]


def evaluate_config_run(run_dir: str | Path, cfg, student_steps: list[int] | None = None,
                        seeds_per_prompt: int | None = None, num_inference_steps: int | None = None) -> dict:
    """``evaluate_run`` with the settings of a run's config (its ``eval`` and ``model`` sections).

    ``student_steps`` / ``seeds_per_prompt`` override the config's; with neither there nor in the config,
    the student is measured at ``num_inference_steps`` (default: the export's).
    """
    ev = cfg.eval
    if num_inference_steps is None:
        num_inference_steps = json.loads((Path(run_dir) / "export" / "stepdistill.json").read_text())[
            "num_inference_steps"]
    steps = list(student_steps or []) or list(ev.student_steps) or [num_inference_steps]
    return evaluate_run(run_dir, str(cfg.model.pretrained), ev.teacher_steps, ev.teacher_guidance, steps,
                        seeds_per_prompt or ev.seeds_per_prompt, cfg.model.resolution, ev.prompts,
                        teacher_baselines=baseline_rows(ev))


def is_run_folder(path: str | Path) -> bool:
    """A finished run folder: its config.yaml and an export with stepdistill.json."""
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "export" / "stepdistill.json").is_file()


def main(argv=None, prog: str = "stepdistill toy eval") -> int:
    """Evaluate a finished run again: its exported student against its toy teacher (settings from its
    config.yaml); writes metrics.json, comparison.png and summary.md into the run folder."""
    import argparse

    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("run_dir", help="run folder with config.yaml and export/")
    parser.add_argument("--seeds-per-prompt", type=int, default=None)
    parser.add_argument("--student-steps", type=int, nargs="*", default=None)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not is_run_folder(run_dir):
        parser.error(f"{run_dir} is not a finished run folder (needs config.yaml and export/stepdistill.json)")
    evaluate_config_run(run_dir, OmegaConf.load(run_dir / "config.yaml"), args.student_steps, args.seeds_per_prompt)
    return 0
