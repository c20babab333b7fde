"""``stepdistill eval``: FID / KID, CLIP score and diversity of any diffusers text-to-image pipeline.

Given a pipeline (a folder — a teacher, or a student exported by stepdistill — or a Hub id), a prompt
source and reference statistics, it generates ``--num-images`` images (prompt-major: the first
``ceil(N / len(seeds))`` prompts, each with every seed of ``--seeds``), in batches, split over the
processes of ``accelerate launch`` (each process generates its share and measures its features; the
features are gathered on the main process), and writes to ``--out``:

* ``metrics.json`` — every number and the settings that produced it,
* ``summary.md`` — a short table and the command line,
* ``grid.png`` — the first prompts (rows) with each seed (columns).

Protocol, so that numbers are comparable with papers: FID/KID on torchmetrics' Inception (pool3) with
clean-fid resizing (``stepdistill.eval.fid``), reference statistics computed once and cached as .npz;
CLIP score as torchmetrics reports it, open_clip ViT-g-14 / laion2b_s34b_b88k by default
(``stepdistill.eval.clip_score``); diversity = mean pairwise feature distance across the seeds of one
prompt (``stepdistill.eval.diversity``). The noise of image (prompt i, seed s) is drawn from a CPU
generator seeded with ``s * 1_000_000 + i``: the same for every model, different for every image. The
re-noising steps of few-step flow students draw from it too (``sampling.schedulers.seeded_steps``: the SD3 and
FLUX pipelines would draw them from torch's global RNG), so an image is fixed by its seed alone.

The feature space is chosen once, up front, by the pipeline's kind (``stepdistill.eval.spaces``): real
pipelines are measured with Inception and CLIP; the toy domain (the shipped toy-sd / toy-flow teachers
and students exported from them) with the toy classifier's features and its prompt alignment in place of
CLIP score, with procedural shapes as the default reference. The evaluation itself is the same for both.
metrics.json carries its provenance (date, git commit, command line, sample count).

Given a finished run folder instead of a pipeline, ``stepdistill eval RUN_DIR`` compares the run's
exported student with its toy teacher (``stepdistill.eval.compare``, also ``stepdistill toy eval``).

Every user error (missing weights, empty prompt file, unreadable reference images, too few images for
FID, mismatched resolutions) is raised as one ValueError before anything is generated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stepdistill.config.load import validate_out_dir
from stepdistill.eval.generate import generate_images, labelled_grid, noise_seed
from stepdistill.eval.provenance import provenance
from stepdistill.models.loading import dtype_kwarg, resolve_pretrained

__all__ = ["EvalSettings", "evaluate", "generate_images", "labelled_grid", "main", "noise_seed"]


# ----------------------------------------------------------------------------------------------------
# Settings and checks


@dataclass
class EvalSettings:
    """What ``stepdistill eval`` was asked (the parsed command line)."""

    pipeline: str
    out: str
    prompts: str | None = None
    caption_column: str = "caption"
    num_images: int | None = None
    shuffle_prompts: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = 16
    resolution: int | None = None
    reference: str | None = None
    reference_cache: str | None = None
    center_crop_reference: bool = False
    num_reference: int = 2000
    inception_weights: str | None = None
    no_fid: bool = False
    kid_subsets: int = 100
    kid_subset_size: int | None = None
    clip_model: str = "ViT-g-14"
    clip_pretrained: str | None = "laion2b_s34b_b88k"
    clip_transformers: str | None = None
    no_clip: bool = False
    dtype: str = "auto"
    fast: bool = False
    domain: str = "auto"
    grid_prompts: int = 8
    command: str = ""


def _read_info(folder: Path) -> dict:
    path = folder / "stepdistill.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def detect_toy(folder: Path | None, info: dict) -> bool:
    """A shipped toy teacher, or a pipeline exported from one (its stepdistill.json config names it)."""
    from stepdistill.toy.teachers import TEACHERS, teacher_path

    if folder is None:
        return False
    if (folder / "stepdistill_toy.json").is_file():
        return True
    for name in TEACHERS:
        try:
            if folder.resolve() == teacher_path(name).resolve():
                return True
        except ValueError:
            pass
    model = ((info.get("config") or {}).get("model") or {}) if isinstance(info.get("config"), dict) else {}
    return str(model.get("pretrained", "")) in TEACHERS


def _check_settings(s: EvalSettings) -> None:
    if s.num_images is not None and s.num_images < 1:
        raise ValueError(f"--num-images {s.num_images} must be >= 1")
    if s.batch_size < 1:
        raise ValueError(f"--batch-size {s.batch_size} must be >= 1")
    if not s.seeds:
        raise ValueError("--seeds needs at least one seed")
    if len(set(s.seeds)) != len(s.seeds):
        raise ValueError(f"--seeds {s.seeds} repeats a seed; give distinct seeds")
    if s.steps is not None and s.steps < 1:
        raise ValueError(f"--steps {s.steps} must be >= 1")
    if s.resolution is not None and s.resolution < 8:
        raise ValueError(f"--resolution {s.resolution} is too small")
    if s.domain not in ("auto", "toy", "real"):
        raise ValueError(f"--domain {s.domain!r}: choose auto, toy or real")


def plan_images(prompts: list[str], seeds: list[int], num_images: int | None, source: str
                ) -> list[tuple[int, str, int]]:
    """(prompt index, prompt, seed) of every image, prompt-major, ``num_images`` of them (default: all
    prompts x seeds). ValueError when the source has too few prompts."""
    if num_images is None:
        num_images = len(prompts) * len(seeds)
    needed = math.ceil(num_images / len(seeds))
    if needed > len(prompts):
        raise ValueError(f"--num-images {num_images} with {len(seeds)} seed(s) per prompt needs {needed} prompts, "
                         f"but {source!r} has {len(prompts)}; lower --num-images, add --seeds, or use a larger "
                         f"prompt source (e.g. the COCO captions JSON)")
    plan = [(i, prompts[i], s) for i in range(needed) for s in seeds]
    return plan[:num_images]


def _fid_size_check(n_generated: int, n_reference: int | None, num_features: int, space: str) -> None:
    from stepdistill.eval.fid import min_images_for_fid

    need = min_images_for_fid(num_features)
    if n_generated < need:
        raise ValueError(f"FID in the {space} feature space ({num_features}-d) needs at least {need} generated "
                         f"images (for a full-rank covariance), but this evaluation makes {n_generated}; raise "
                         f"--num-images to {need} or more (papers use 10k-30k), or pass --no-fid to report KID, "
                         f"which is unbiased at small sample counts")
    if n_reference is not None and n_reference < need:
        raise ValueError(f"FID in the {space} feature space needs at least {need} reference images, the "
                         f"reference has {n_reference}; use a larger reference set, or --no-fid for KID only")


def _resolution_step(pipe) -> int:
    """Generated sides must be multiples of this (the VAE's downsampling times the transformer's patch)."""
    vae_factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    backbone = getattr(pipe, "transformer", None)
    patch = int(getattr(getattr(backbone, "config", None), "patch_size", 1) or 1) if backbone is not None else 1
    return vae_factor * patch


def _default_resolution(pipe, info: dict) -> int:
    model = ((info.get("config") or {}).get("model") or {}) if isinstance(info.get("config"), dict) else {}
    if model.get("resolution"):
        return int(model["resolution"])
    vae_factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        backbone = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        size = getattr(getattr(backbone, "config", None), "sample_size", 64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * vae_factor


def _load_pipeline(name: str, dtype: torch.dtype, device: torch.device):
    from diffusers import DiffusionPipeline

    path = resolve_pretrained(name)
    try:
        # Newer diffusers call the argument dtype (torch_dtype is deprecated there); fp32 is the default.
        kwargs = {} if dtype == torch.float32 else {dtype_kwarg(): dtype}
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a diffusers pipeline from {name!r} ({str(e)[:300]}); give a pipeline folder "
                         f"(model_index.json) or a Hub id that is in the local cache when offline") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    from stepdistill.sampling.experts import with_experts

    return with_experts(pipe, path) if Path(str(path)).is_dir() else pipe


# ----------------------------------------------------------------------------------------------------
# Distributed feature extraction


def _split(state, items: list) -> list:
    if state.num_processes == 1:
        return list(items)
    with state.split_between_processes(list(items)) as mine:
        return list(mine)


def _gather(state, records: list) -> list:
    if state.num_processes == 1:
        return records
    from accelerate.utils import gather_object

    return gather_object(records)


# ----------------------------------------------------------------------------------------------------
# The evaluation


def _pipeline_kind(s: EvalSettings) -> tuple[str, dict]:
    """Check the pipeline argument; "toy" or "real" (``--domain`` or detected) and its stepdistill.json."""
    resolved = resolve_pretrained(s.pipeline)
    folder = Path(resolved) if Path(resolved).is_dir() else None
    if folder is None and (os.sep in str(s.pipeline) or str(s.pipeline).startswith((".", "~"))):
        raise ValueError(f"pipeline {s.pipeline!r}: no such folder (working directory: {Path.cwd()}); give a "
                         "folder written by save_pretrained (a stepdistill export), a Hub id, or toy-sd / toy-flow")
    if folder is not None and not (folder / "model_index.json").is_file():
        raise ValueError(f"pipeline {s.pipeline!r} is a folder but not a diffusers pipeline (no model_index.json); "
                         "give a folder written by save_pretrained (a stepdistill export), a Hub id, or toy-sd")
    info = _read_info(folder) if folder else {}
    if s.domain != "auto":
        return s.domain, info
    return ("toy" if detect_toy(folder, info) else "real"), info


def evaluate(s: EvalSettings) -> dict | None:
    """Run the evaluation; returns the metrics dict on the main process (None on the others)."""
    from accelerate import PartialState

    from stepdistill.data.prompts import load_prompts
    from stepdistill.eval.fid import FeatureStats, fid_from_stats, kid_from_features
    from stepdistill.eval.reference import reference_stats
    from stepdistill.eval.spaces import SPACES

    _check_settings(s)
    # On a CPU-only machine `accelerate launch --multi_gpu` gives a gloo group only when told it runs on CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device

    # 1. What is evaluated, on which prompts (cheap checks first).
    validate_out_dir(s.out)
    kind, info = _pipeline_kind(s)
    space_class = SPACES[kind]  # the feature space, chosen once: everything below is the same for every kind
    source = s.prompts or space_class.default_prompts
    if source is None:
        raise ValueError("--prompts is required (a .txt file, a CSV/JSONL/parquet with a caption column, or a COCO "
                         "captions JSON)")
    prompts = load_prompts(source, s.caption_column)
    if s.shuffle_prompts is not None:  # a fixed random subset, as COCO-10k/30k evaluations draw their captions
        order = np.random.default_rng(s.shuffle_prompts).permutation(len(prompts))
        prompts = [prompts[i] for i in order]
    plan = plan_images(prompts, list(s.seeds), s.num_images, source)
    space_class.check([p for _, p, _ in plan], s.resolution)
    if s.reference and not Path(s.reference).expanduser().exists():
        raise ValueError(f"--reference {s.reference!r} does not exist (give a folder of real images or an .npz)")
    if s.reference and Path(s.reference).suffix != ".npz" and not Path(s.reference).expanduser().is_dir():
        raise ValueError(f"--reference {s.reference!r} is neither a folder of images nor an .npz of statistics")

    # 2. The feature space's networks (before the pipeline, so that missing weights stop us early).
    space = space_class.build(s, device)
    want_fid = space.has_features and not s.no_fid

    # 3. The pipeline, its resolution, the sampler settings.
    dtype = space.pipeline_dtype(s.dtype, device)
    pipe = _load_pipeline(s.pipeline, dtype, device)
    resolution = s.resolution or _default_resolution(pipe, info)
    step = _resolution_step(pipe)
    if resolution % step:
        raise ValueError(f"--resolution {resolution} is not a multiple of {step} (the pipeline's VAE downsampling"
                         f"{' times its patch size' if step != getattr(pipe, 'vae_scale_factor', step) else ''}); "
                         f"use {resolution // step * step} or {(resolution // step + 1) * step}")
    steps = s.steps if s.steps is not None else info.get("num_inference_steps")
    guidance = s.guidance if s.guidance is not None else info.get("guidance_scale")
    timesteps = info.get("timesteps") if info.get("timesteps") and steps == info.get("num_inference_steps") else None
    if s.fast:  # text encoders, steps and decode as one program (a CUDA graph on CUDA): the same images
        from stepdistill.sampling.fast import FastSampler

        pipe = FastSampler(pipe)

    # 4. Reference statistics (also checks the reference images) and the sample-size requirement.
    ref_stats, ref_info = None, {}
    if space.has_features:
        min_reference = None
        if want_fid:
            _fid_size_check(len(plan), None, space.num_features, space.name)

            def min_reference(n):
                _fid_size_check(len(plan), n, space.num_features, space.name)
        ref_stats, ref_info = reference_stats(
            space, s.reference, resolution=resolution, batch_size=s.batch_size, num_default=s.num_reference,
            split=lambda items: _split(state, items), gather=lambda records: _gather(state, records),
            cache=s.reference_cache, center_crop=s.center_crop_reference, is_main=state.is_main_process,
            check_count=min_reference)

    # 5. Generate this process's share; measure features and prompt scores where the images are.
    mine = _split(state, list(range(len(plan))))
    grid_limit = min(s.grid_prompts, len({i for i, _, _ in plan}))
    records, seconds = [], 0.0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc=f"eval {Path(s.pipeline).name or s.pipeline} (process {state.process_index})",
               unit="img", disable=not state.is_local_main_process)
    for start in range(0, len(mine), s.batch_size):
        idx = mine[start:start + s.batch_size]
        batch_prompts = [plan[i][1] for i in idx]
        images, per_image = generate_images(pipe, batch_prompts, [noise_seed(plan[i][2], plan[i][0]) for i in idx],
                                            steps, guidance, resolution, s.batch_size, timesteps)
        seconds += per_image * len(idx)
        # float64 features: stepdistill eval reports FID and KID in float64 (stepdistill.eval.fid)
        feats = space.features(images, s.batch_size).double().numpy() if space.has_features else None
        scores = space.prompt_scores(images, batch_prompts, s.batch_size)
        for j, i in enumerate(idx):
            image = None
            if plan[i][0] < grid_limit:
                image = images[j]
                if max(image.shape[-2:]) > 256:
                    image = torch.nn.functional.interpolate(image[None], size=(256, 256), mode="bilinear",
                                                            antialias=True)[0]
                image = (image * 255).round().to(torch.uint8).numpy()
            records.append({"index": i, "feature": None if feats is None else feats[j],
                            "scores": {k: v[j] for k, v in scores.items()}, "image": image})
        bar.update(len(idx))
    bar.close()
    records = _gather(state, records)
    seconds_all = _gather(state, [(seconds, len(mine))])
    if not state.is_main_process:
        return None
    records.sort(key=lambda r: r["index"])

    # 6. Metrics.
    group = [plan[r["index"]][0] for r in records]
    captions = [plan[r["index"]][1] for r in records]
    metrics: dict = {}
    feats = np.stack([r["feature"] for r in records]) if space.has_features else None
    if feats is not None and ref_stats is not None:
        if want_fid:
            metrics["fid"] = fid_from_stats(FeatureStats.from_features(feats, space.name, keep_features=False),
                                            ref_stats)
        if ref_stats.features is not None and len(records) >= 2:
            size = s.kid_subset_size or min(1000, len(records), ref_stats.features.shape[0])
            metrics["kid_mean"], metrics["kid_std"] = kid_from_features(feats, ref_stats.features,
                                                                        s.kid_subsets, size)
            metrics["kid_subset_size"] = size
    has_groups = len(set(group)) < len(group)
    if feats is not None and has_groups:
        metrics["diversity"] = _diversity(feats, group, "l2")
    scores = {k: np.stack([r["scores"][k] for r in records]) for k in (records[0]["scores"] if records else {})}
    metrics.update(space.prompt_metrics(scores, captions, group))
    total_seconds = sum(t for t, _ in seconds_all)
    result = {
        "pipeline": s.pipeline,
        "domain": kind,
        "prompts": source,
        "shuffle_prompts": s.shuffle_prompts,
        "num_images": len(records),
        "num_prompts": len(set(group)),
        "seeds": list(s.seeds),
        "steps": steps,
        "guidance_scale": guidance,
        "resolution": resolution,
        "dtype": str(dtype).replace("torch.", ""),
        "fast": s.fast,
        "feature_space": space.name if space.has_features else None,
        "reference": ref_info or None,
        "metrics": metrics,
        "seconds_per_image": total_seconds / max(1, len(records)),  # generation time of one image on one process
        "num_processes": state.num_processes,
        "noise_seed": "seed * 1000000 + prompt_index",
        "command": s.command,
        "provenance": provenance(s.command, len(records)),
    }
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default))
    (out / "summary.md").write_text(summary_markdown(result))
    grid_rows = []
    for p in range(grid_limit):
        kept = [r for r in records if plan[r["index"]][0] == p and r["image"] is not None]
        if kept:
            grid_rows.append((_short(plan[kept[0]["index"]][1]),
                              torch.from_numpy(np.stack([r["image"] for r in kept])).float() / 127.5 - 1))
    if grid_rows:
        width = min(420, 12 + 6 * max(len(name) for name, _ in grid_rows))  # PIL's default font: ~6 px a character
        labelled_grid(grid_rows, label_width=width).save(out / "grid.png")
    return result


def _diversity(features: np.ndarray, groups: list[int], metric: str) -> float:
    from stepdistill.eval.diversity import mean_pairwise_distance

    return mean_pairwise_distance(torch.from_numpy(np.asarray(features)), groups, metric)


def _short(text: str, n: int = 64) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def summary_markdown(result: dict) -> str:
    m = result["metrics"]
    names = {
        "fid": ("FID ↓", ".2f"), "kid_mean": ("KID ↓", ".5f"), "kid_std": ("KID std", ".5f"),
        "clip_score": ("CLIP score ↑", ".2f"), "alignment": ("alignment ↑", ".1%"),
        "held_out_alignment": ("held-out alignment ↑", ".1%"), "diversity": ("diversity ↑", ".4f"),
        "diversity_clip": ("diversity (CLIP, 1 - cos) ↑", ".4f"),
    }
    rows = [f"| {label} | {format(m[key], fmt)} |" for key, (label, fmt) in names.items() if m.get(key) is not None]
    ref = result.get("reference") or {}
    lines = [
        f"# Evaluation of `{result['pipeline']}`",
        "",
        f"{result['num_images']} images ({result['num_prompts']} prompts × seeds {result['seeds']}) from "
        f"`{result['prompts']}`, {result['steps'] if result['steps'] is not None else 'default'} steps, guidance "
        f"{result['guidance_scale'] if result['guidance_scale'] is not None else 'default'}, "
        f"{result['resolution']} px, {result['seconds_per_image'] * 1000:.1f} ms / image "
        f"({result['num_processes']} process(es)). Features: {result['feature_space'] or 'none'}; reference: "
        f"{ref.get('source', 'none')} ({ref.get('n', '?')} images).",
        "",
        "| metric | value |",
        "|---|---:|",
        *rows,
        "",
        f"`{result['command']}`" if result.get("command") else "",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stepdistill eval",
        description="FID / KID, CLIP score and diversity of a diffusers text-to-image pipeline (a teacher, or a "
                    "student exported by stepdistill). Multi-GPU: accelerate launch -m stepdistill.cli eval ...")
    p.add_argument("pipeline", help="pipeline folder, Hub id, or a shipped toy teacher (toy-sd, toy-flow); a "
                                    "finished run folder (config.yaml, export/) compares its student with its "
                                    "teacher (options: --seeds-per-prompt, --student-steps)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (metrics.json, summary.md, grid.png)")
    p.add_argument("--prompts", metavar="SOURCE",
                   help="prompt file (.txt, .csv/.tsv/.jsonl/.parquet with --caption-column, COCO captions .json) "
                        "or builtin:<name>; default for toy pipelines: builtin:toy_all")
    p.add_argument("--caption-column", default="caption", help="column of the prompts (default: caption)")
    p.add_argument("--num-images", type=int, default=None, metavar="N",
                   help="images in total (default: every prompt x every seed)")
    p.add_argument("--shuffle-prompts", type=int, default=None, metavar="SEED",
                   help="take the prompts in a random order drawn with SEED (e.g. a random COCO-10k subset) "
                        "instead of file order")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                   help="seeds per prompt (default: 0); two or more give diversity")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the export's, else the pipeline's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the export's, else the pipeline's)")
    p.add_argument("--batch-size", type=int, default=16, help="generation and feature batch size per process")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="pipeline weights (auto: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--fast", action="store_true",
                   help="generate with stepdistill.sampling.fast.FastSampler (one host-sync-free program per "
                        "batch, a CUDA graph on CUDA; the pipeline's own images): SD 1.x/2.x, SDXL with "
                        "LCM / DDIM, SD3 / FLUX with flow Euler")
    g = p.add_argument_group("FID / KID")
    g.add_argument("--reference", metavar="DIR_OR_NPZ",
                   help="real images (a folder; statistics cached as .npz) or saved statistics (.npz with mu, "
                        "sigma, n); toy pipelines default to procedural shapes")
    g.add_argument("--reference-cache", metavar="NPZ",
                   help="where the folder's statistics are cached (default: ~/.cache/stepdistill/fid/)")
    g.add_argument("--center-crop-reference", action="store_true",
                   help="center-crop reference images to squares and resize them to --resolution (PIL bicubic)")
    g.add_argument("--num-reference", type=int, default=2000, help="toy: number of procedural reference images")
    g.add_argument("--inception-weights", metavar="PATH",
                   help="local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (offline)")
    g.add_argument("--no-fid", action="store_true", help="skip FID (KID is still reported when a reference is given)")
    g.add_argument("--kid-subsets", type=int, default=100)
    g.add_argument("--kid-subset-size", type=int, default=None, help="default: min(1000, set sizes)")
    g = p.add_argument_group("CLIP score")
    g.add_argument("--clip-model", default="ViT-g-14", help="open_clip model name (default ViT-g-14)")
    g.add_argument("--clip-pretrained", default="laion2b_s34b_b88k",
                   help="open_clip pretrained tag or a local checkpoint file (default laion2b_s34b_b88k)")
    g.add_argument("--clip-transformers", metavar="FOLDER", help="use transformers' CLIPModel from this folder instead")
    g.add_argument("--no-clip", action="store_true", help="skip CLIP score")
    p.add_argument("--domain", choices=("auto", "toy", "real"), default="auto",
                   help="toy: toy feature space and prompt alignment (auto-detected for toy-sd / toy-flow and "
                        "their exports)")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts (rows) in grid.png")
    return p


def main(argv=None) -> int:
    """``stepdistill eval PIPELINE --out DIR ...``, or ``stepdistill eval RUN_DIR`` for a finished run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from stepdistill.eval.compare import is_run_folder
    from stepdistill.eval.compare import main as compare_main

    if argv and not argv[0].startswith("-") and is_run_folder(argv[0]):
        return compare_main(argv, prog="stepdistill eval")
    args = build_parser().parse_args(argv)
    settings = EvalSettings(**{k: v for k, v in vars(args).items()},
                            command="stepdistill eval " + " ".join(shlex.quote(a) for a in argv))
    try:
        result = evaluate(settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(summary_markdown(result))
        print(f"wrote {Path(settings.out) / 'metrics.json'}, summary.md, grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
