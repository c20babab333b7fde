"""Model cards and Hub upload for exported students.

``write_model_card`` turns an export folder (``stepdistill.json`` written by ``export.pipeline``) into a
Hugging Face model card: base model and its license, method and paper, steps and scheduler, the
metrics of the run's last evaluation, a sample grid, the usage snippet and the resolved training
config. ``push_to_hub`` uploads the folder with ``huggingface_hub`` (``create_repo`` + ``upload_folder``).

The token comes only from huggingface_hub's standard places (``HF_TOKEN``, the cached ``hf auth
login``): this module never reads, prints or writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

# Licenses of well-known base models (their Hub cards say so; used offline, when the base card cannot
# be read). Keys are Hub ids, lower-case.
KNOWN_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "compvis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "stabilityai/stable-diffusion-3-medium-diffusers": "other",
    "stabilityai/stable-diffusion-3.5-medium": "other",
    "stabilityai/stable-diffusion-3.5-large": "other",
    "black-forest-labs/flux.1-dev": "other",
    "black-forest-labs/flux.1-schnell": "apache-2.0",
}
# The shipped toy teachers are this project's own (Apache-2.0, as the project).
_TOY_LICENSE = "apache-2.0"

CARD_FILE = "README.md"
GRID_FILE = "samples.png"


def base_license(base_model: str) -> str:
    """The license id of ``base_model``: known table, shipped toy teachers, else the base card on the Hub
    (when online), else "other" (the card then asks the uploader to check it)."""
    key = base_model.lower()
    if key in KNOWN_LICENSES:
        return KNOWN_LICENSES[key]
    if key in ("toy-sd", "toy-flow") or key.startswith("tiny:"):
        return _TOY_LICENSE
    if "/" in base_model and not Path(base_model).exists():
        try:
            from huggingface_hub import ModelCard

            license_ = ModelCard.load(base_model).data.license
            if license_:
                return str(license_)
        except Exception:  # offline, gated or missing card: fall through to "other"
            pass
    return "other"


def _relative_to_run(text: str, run_dir: Path) -> str:
    """``text`` with the run folder's local path (as given and resolved) written as "." (the card's view)."""
    for form in sorted({str(run_dir.resolve()), str(run_dir)}, key=len, reverse=True):
        if form not in (".", ""):
            text = text.replace(form, ".")
    return text


def _find_grid(run_dir: Path | None) -> Path | None:
    """The run's comparison grid (evaluation) or, failing that, its newest training sample grid."""
    if run_dir is None:
        return None
    if (run_dir / "comparison.png").is_file():
        return run_dir / "comparison.png"
    samples = sorted((run_dir / "samples").glob("step_*.png"))
    return samples[-1] if samples else None


def _metrics_table(metrics: dict) -> str:
    from stepdistill.eval.compare import summary_table

    try:  # the toy evaluation's rows (all / held_out splits)
        return summary_table(metrics["results"], metrics.get("data"))
    except (KeyError, TypeError):
        return "```json\n" + json.dumps(metrics["results"], indent=2) + "\n```"


def usage_snippet(info: dict, where: str) -> str:
    """How to sample the export described by ``info`` (its stepdistill.json), loaded from ``where`` (a folder
    or a Hub repo id): the card's usage section and ``stepdistill.json``'s ``usage``."""
    steps, guidance = info["num_inference_steps"], info["guidance_scale"]
    call = f"num_inference_steps={steps}, guidance_scale={guidance}"
    if info.get("timesteps"):
        call += f", timesteps={[int(t) for t in info['timesteps']]}"
    if info.get("experts"):
        # A mixture-of-experts student (Phased DMD): expert i runs step i through the shipped callback.
        download = (f"folder = snapshot_download({where!r})\n" if where.count("/") == 1 and not Path(where).exists()
                    else f"folder = {where!r}\n")
        return (
            "import sys\n\n"
            "from diffusers import DiffusionPipeline\n"
            + ("from huggingface_hub import snapshot_download\n" if download.startswith("folder = snap") else "")
            + "\n" + download
            + "sys.path.insert(0, folder)  # expert_switch.py ships with the weights\n"
            "from expert_switch import ExpertSwitch\n\n"
            "pipe = DiffusionPipeline.from_pretrained(folder)\n"
            "switch = ExpertSwitch.from_folder(pipe, folder)  # experts 1..k-1 from expert_*/; expert i runs step i\n"
            f'image = pipe("a photo of a cat", {call}, callback_on_step_end=switch).images[0]\n'
            "# Without callback_on_step_end the pipeline runs expert 0 at every step.\n"
            "# (After pipe.to(device), call switch.to(device) too.)"
        )
    if info.get("lora_only"):
        scheduler = info["scheduler"]
        base = info["base_model"]
        if base.startswith(("toy-", "tiny:")):  # a stepdistill name: its folder is local, never written here
            head = (f"# {base} is a stepdistill teacher: its folder is printed by\n"
                    f"# python -c \"from stepdistill.models.loading import resolve_pretrained as r; print(r('{base}'))\"\n")
            load = repr(f"path/to/{base.replace(':', '-')}")
        else:
            head, load = "", repr(base)
        return (
            f"{head}from diffusers import DiffusionPipeline, {scheduler}\n\n"
            f"pipe = DiffusionPipeline.from_pretrained({load})\n"
            f"pipe.scheduler = {scheduler}.from_pretrained({where!r}, subfolder=\"scheduler\")\n"
            f"pipe.load_lora_weights({where!r})\n"
            f'image = pipe("a photo of a cat", {call}).images[0]'
        )
    return (
        "from diffusers import DiffusionPipeline\n\n"
        f"pipe = DiffusionPipeline.from_pretrained({where!r})\n"
        f'image = pipe("a photo of a cat", {call}).images[0]'
    )


def model_card_text(info: dict, repo_id: str | None = None, license_: str | None = None,
                    metrics: dict | None = None, grid: str | None = None) -> str:
    """The card (YAML metadata + markdown) for an export described by ``info`` (its stepdistill.json)."""
    config = info.get("config") or {}
    base = str(config.get("model", {}).get("pretrained", info.get("base_model", "unknown")))
    license_ = license_ or base_license(base)
    method = info["method"]
    where = repo_id or "path/to/this/folder"
    meta = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "license": license_,
        "tags": ["stepdistill", "text-to-image", "diffusers", "distillation", method]
        + (["lora"] if info.get("lora_only") else []),
    }
    if "/" in base and not Path(base).exists():
        meta["base_model"] = base  # a Hub id (local folders and toy teachers are not Hub models)
    steps = info["num_inference_steps"]
    kind = "LoRA weights for" if info.get("lora_only") else "a distilled version of"
    lines = [
        f"# {repo_id.split('/')[-1] if repo_id else method + ' student'}",
        "",
        f"{kind} **{base}**, trained with **{method}** ({info.get('paper', '')}) by "
        "[stepdistill](https://github.com/stepdistill/stepdistill) to generate in "
        f"**{steps} step{'s' if steps != 1 else ''}** (`{info['scheduler']}`, guidance scale "
        f"{info['guidance_scale']}: guidance is distilled into the weights).",
        "",
    ]
    if license_ == "other":
        lines += ["License: the base model's own license applies; check it on the base model's page.", ""]
    if grid:
        lines += ["## Samples", "", f"![samples]({grid})", ""]
    lines += ["## Usage", "", "```python", usage_snippet({**info, "base_model": base}, where), "```", ""]
    if info.get("global_rng_steps"):
        lines += ["Between steps the scheduler re-noises with fresh noise, which the SD3 / FLUX pipelines draw from "
                  "torch's global random generator, not from `generator=`: call `torch.manual_seed(...)` before the "
                  "pipeline for repeatable images (stepdistill's evaluation routes that noise through each image's "
                  "generator).", ""]
    if metrics and metrics.get("results"):
        lines += [
            "## Evaluation",
            "",
            f"Prompts `{metrics.get('prompts', '?')}`, {metrics.get('seeds_per_prompt', '?')} seeds each, "
            f"against the teacher `{metrics.get('teacher', base)}` (same prompts and seeds):",
            "",
            _metrics_table(metrics),
            "",
        ]
        if metrics.get("command"):  # the toy evaluation and `stepdistill eval` record how they were run
            lines += [f"Measured with `{metrics['command']}`.", ""]
    if config:
        lines += [
            "## Training",
            "",
            f"Reproduce with `accelerate launch train.py --config config.yaml` (the resolved config below; "
            f"{config.get('train', {}).get('max_steps', '?')} iterations).",
            "",
        ]
        for r in info.get("resumes") or []:  # what a resumed run changed (its config.yaml holds the latest values)
            changed = "; ".join(f"`{k}` {v.get('from')!r} → {v.get('to')!r}"
                                for k, v in (r.get("changed") or {}).items())
            lines += [f"- Resumed at step {r.get('step')} from `{r.get('checkpoint')}`"
                      + (f", changing {changed}." if changed else " with the same config.")]
        if info.get("resumes"):
            lines += [""]
        lines += [
            "<details><summary>config.yaml</summary>",
            "",
            "```yaml",
            yaml.safe_dump(config, sort_keys=False).rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(lines)


def write_model_card(folder: str | Path, run_dir: str | Path | None = None, repo_id: str | None = None,
                     license_: str | None = None) -> Path:
    """Write ``folder/README.md`` (and ``samples.png`` when the run has a grid); returns the card's path."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    info_path = folder / "stepdistill.json"
    if not info_path.is_file():
        raise ValueError(f"{folder} is not a stepdistill export (no stepdistill.json); export a run first")
    info = json.loads(info_path.read_text())
    run_dir = Path(run_dir) if run_dir is not None else None
    metrics = None
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        for key in ("command", "teacher", "prompts"):  # the card is uploaded: the run folder is "."
            if isinstance(metrics.get(key), str):
                metrics[key] = _relative_to_run(metrics[key], run_dir)
    grid = _find_grid(run_dir)
    if grid is not None:
        shutil.copyfile(grid, folder / GRID_FILE)
    elif (folder / GRID_FILE).is_file():
        grid = folder / GRID_FILE
    text = model_card_text(info, repo_id, license_, metrics, GRID_FILE if grid is not None else None)
    card = ModelCard(text)  # parses the metadata block: fails here, not on the Hub, if it is malformed
    card.save(folder / CARD_FILE)
    return folder / CARD_FILE


def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """Every file ``push_to_hub`` would upload: (path relative to the folder, bytes), sorted."""
    folder = Path(folder)
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def check_repo_id(repo_id: str) -> str:
    """A Hub model repo id ``USER_OR_ORG/NAME`` (huggingface_hub's own rules), else one ValueError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("it needs exactly one '/'")
    except HFValidationError as e:
        raise ValueError(f"--push-to-hub {repo_id!r} is not a Hub repo id ({str(e).splitlines()[0]}); give one of "
                         "the form USER_OR_ORG/NAME (letters, digits, '-', '_', '.')") from None
    return repo_id


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
                api=None, commit_message: str | None = None) -> str | None:
    """Upload an export folder to the model repo ``repo_id`` (created if needed); returns its URL.

    ``dry_run`` prints what would be uploaded and contacts nobody. ``api`` defaults to
    ``huggingface_hub.HfApi()``, which finds the token itself (``HF_TOKEN`` or ``hf auth login``).
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if not (folder / CARD_FILE).is_file():
        raise ValueError(f"{folder} has no {CARD_FILE}: write the model card first (stepdistill export does)")
    plan = upload_plan(folder)
    if dry_run:
        total = sum(size for _, size in plan)
        print(f"dry run: would upload {len(plan)} files ({total / 2**20:.1f} MiB) to "
              f"{'private' if private else 'public'} model repo {repo_id}:")
        for path, size in plan:
            print(f"  {path}  ({size:,} bytes)")
        return None
    if api is None:
        from huggingface_hub import HfApi, get_token

        if get_token() is None:
            raise ValueError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, then push again")
        api = HfApi()
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                      commit_message=commit_message or "Upload distilled pipeline (stepdistill)")
    return str(url)
