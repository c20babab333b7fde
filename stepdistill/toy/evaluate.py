"""Teacher vs student on the toy domain: FID, prompt alignment, diversity, latency, comparison grid.

Both sides are run as plain diffusers pipelines (the exported student folder and the shipped
teacher), with the same prompts and seeds, so the numbers describe what a user would load.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stepdistill.eval.evaluate import generate_images, labelled_grid  # noqa: F401  (labelled_grid: re-export)


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


@dataclass
class Entry:
    """One row of the comparison: a pipeline sampled at a number of steps and a guidance scale."""

    name: str
    pipe: object
    steps: int
    guidance: float
    timesteps: list | None = None


def generate(entry: Entry, prompts: list[str], seeds: list[int], resolution: int, batch_size: int = 64,
             progress: bool = True) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] for every (prompt, seed) pair, prompt-major (seed ``s`` for every prompt); and
    seconds per image."""
    pairs = [(p, s) for p in prompts for s in seeds]
    images, seconds = generate_images(entry.pipe, [p for p, _ in pairs], [s for _, s in pairs], entry.steps,
                                      entry.guidance, resolution, batch_size, entry.timesteps, progress=progress,
                                      desc=f"eval: {entry.name}", leave=False)
    return images * 2 - 1, seconds


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
    from stepdistill.toy.metrics import evaluate_by_split, reference_images

    ref_all = reference_images(num_reference, seed=10_000, split="all")
    ref_held = reference_images(num_reference, seed=20_000, split="held_out")
    groups = [i for i in range(len(prompts)) for _ in seeds]  # one group per prompt (its seeds)
    caps = [p for p in prompts for _ in seeds]
    results, images, out = {}, {}, {}
    from stepdistill.toy.data import RESOLUTION

    if data_row and resolution == RESOLUTION:  # real images exist at the procedural data's own size only
        out["data_images"] = real_images(prompts, seeds)
        out["data"] = evaluate_by_split(out["data_images"], caps, ref_all, ref_held, groups)
    for entry in entries:
        imgs, latency = generate(entry, prompts, seeds, resolution, batch_size)
        metrics = evaluate_by_split(imgs, caps, ref_all, ref_held, groups)
        metrics["latency_ms_per_image"] = latency * 1000
        metrics["steps"], metrics["guidance_scale"] = entry.steps, entry.guidance
        results[entry.name], images[entry.name] = metrics, imgs
        if progress is not None:
            progress(entry.name, metrics)
    return {"results": results, "images": images, **out}


DATA_ROW = "real images (the data: FID floor, diversity to match)"


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

    run_dir = Path(run_dir)
    export = run_dir / "export"
    info = json.loads((export / "stepdistill.json").read_text())
    with _quiet_diffusers():
        student = DiffusionPipeline.from_pretrained(str(export))
        teacher_pipe = DiffusionPipeline.from_pretrained(resolve_pretrained(teacher))
    for pipe in (student, teacher_pipe):
        pipe.set_progress_bar_config(disable=True)
    from stepdistill.sampling.experts import with_experts

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
               "command": command, "results": out["results"], "data": out.get("data")}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(table, flush=True)
    return metrics


def baseline_rows(ev) -> list[tuple[int, float]]:
    """``eval.teacher_baselines`` of a config (a run's config.yaml may predate the key)."""
    return [(int(row["steps"]), float(row["guidance"])) for row in ev.get("teacher_baselines") or []]


def main(argv=None) -> int:
    """``stepdistill toy eval RUN_DIR``: evaluate a finished run again (settings from its config.yaml)."""
    import argparse

    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(prog="stepdistill toy eval", description=main.__doc__)
    parser.add_argument("run_dir", help="run folder with config.yaml and export/")
    parser.add_argument("--seeds-per-prompt", type=int, default=None)
    parser.add_argument("--student-steps", type=int, nargs="*", default=None)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "export" / "stepdistill.json").is_file():
        parser.error(f"{run_dir} is not a finished run folder (needs config.yaml and export/stepdistill.json)")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    ev = cfg.eval
    info = json.loads((run_dir / "export" / "stepdistill.json").read_text())
    steps = args.student_steps or list(ev.student_steps) or [info["num_inference_steps"]]
    evaluate_run(run_dir, str(cfg.model.pretrained), ev.teacher_steps, ev.teacher_guidance, steps,
                 args.seeds_per_prompt or ev.seeds_per_prompt, cfg.model.resolution, ev.prompts,
                 teacher_baselines=baseline_rows(ev))
    return 0
