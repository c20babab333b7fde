"""What ``stepdistill bench`` compares: entries, settings, their parsing and their checks.

An *entry* is a sampler to compare: a pipeline (a folder, a Hub id, a shipped toy teacher ``toy-sd`` /
``toy-flow``, ``tiny:<family>``, or ``random:sd15`` / ``random:sdxl``: the real architecture with random
weights, built once, no download), a number of steps, a scheduler ("sampler") and a guidance scale —
or a *hybrid* (``stepdistill.sampling.hybrid``: the teacher for the first ``k`` steps, then the
student). Entries come from ``--entry`` strings and/or a YAML file (``configs/bench/*.yaml``)::

    --entry "toy-sd steps=50,25 guidance=1.5"                 # two entries (50 and 25 steps)
    --entry "runs/toy_dmd2/export steps=1,2,4"                # an exported student (its stepdistill.json
                                                                # gives guidance and trained timesteps)
    --entry "hybrid teacher=toy-sd student=runs/toy_dmd2/export teacher_steps=1 steps=4 guidance=1.5"
    --entry "random:sdxl steps=1 guidance=0 compile=true tiny_vae=random"

Options, global or per entry: ``compile`` (``torch.compile`` of the backbone and the VAE decoder),
``channels_last``, ``sdpa`` (``torch.nn.attention.sdpa_kernel`` backend: auto, math, efficient,
flash, cudnn), ``xformers`` (``enable_xformers_memory_efficient_attention``, when installed),
``tiny_vae`` (an ``AutoencoderTiny`` folder, e.g. madebyollin/taesdxl downloaded by the user, or
``random``: the AutoencoderTiny architecture with random weights, for timing only), ``fast``
(``stepdistill.sampling.fast.FastSampler``: text encoders, steps and decode as one program without host
syncs, captured into a CUDA graph on CUDA; SD 1.x/2.x / SDXL with LCM or DDIM, SD3 / FLUX with flow Euler,
CFG included).

``validate`` finds every user error (missing folders, unknown samplers or quality functions, options that
do not fit) before any weights load.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from stepdistill.bench.quality import quality_fn

# Short sampler names -> diffusers scheduler classes (any other diffusers scheduler class name works too).
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
SDPA_BACKENDS = ("auto", "math", "efficient", "flash", "cudnn")
OPTION_KEYS = ("compile", "channels_last", "sdpa", "xformers", "tiny_vae", "fast")
ENTRY_KEYS = ("pipeline", "steps", "sampler", "guidance", "name", "teacher", "student", "teacher_steps",
              "quality", *OPTION_KEYS)
SETTING_KEYS = ("batch_sizes", "runs", "warmup", "device", "dtype", "resolution", "prompt", "quality",
                "quality_prompts", "quality_seeds", "quality_num_prompts", "quality_num_reference",
                "quality_batch_size", "plot_metric", "compile_mode", "threads", "out", *OPTION_KEYS)


# ---- entries and settings ------------------------------------------------------------------------------
@dataclass
class BenchEntry:
    """One sampler of the table. A hybrid has ``teacher``/``student``/``teacher_steps`` and no ``pipeline``."""

    pipeline: str | None = None
    steps: int = 1
    sampler: str | None = None
    guidance: float | None = None
    name: str | None = None
    teacher: str | None = None
    student: str | None = None
    teacher_steps: int | None = None
    quality: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def is_hybrid(self) -> bool:
        return self.teacher is not None

    def label(self) -> str:
        if self.name:
            return self.name
        opts = [k if v is True else f"{k}={_short(str(v)) if k == 'tiny_vae' else v}"
                for k, v in sorted(self.options.items()) if v not in (False, None, "auto")]
        extra = f" [{', '.join(opts)}]" if opts else ""
        sampler = f" {self.sampler}" if self.sampler else ""
        cfg = f" CFG {self.guidance:g}" if self.guidance is not None and self.guidance > 1 else ""
        if self.is_hybrid:
            return (f"hybrid {_short(self.teacher)} {self.teacher_steps} + {_short(self.student)} "
                    f"{self.steps - self.teacher_steps} of {self.steps}-step{sampler}{cfg}{extra}")
        return f"{_short(self.pipeline)} {self.steps}-step{sampler}{cfg}{extra}"


@dataclass
class BenchSettings:
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    runs: int = 5
    warmup: int = 1
    device: str = "auto"
    dtype: str = "auto"
    resolution: int | None = None
    prompt: str = "a red circle at the top left"
    quality: str = "auto"
    quality_prompts: str = "builtin:toy_all"
    quality_seeds: int = 2
    quality_num_prompts: int | None = None
    quality_num_reference: int = 1000
    quality_batch_size: int = 64
    plot_metric: str | None = None
    compile_mode: str | None = None
    threads: int | None = None
    out: str = "bench"
    compile: bool = False
    channels_last: bool = False
    sdpa: str = "auto"
    xformers: bool = False
    tiny_vae: str | None = None
    fast: bool = False

    def options(self) -> dict:
        return {k: getattr(self, k) for k in OPTION_KEYS}


def _short(spec: str | None) -> str:
    spec = str(spec)
    if spec.startswith(("toy-", "tiny:", "random:")) or not os.path.isdir(os.path.expanduser(spec)):
        return spec
    path = Path(spec).resolve()
    return path.parent.name if path.name == "export" else path.name


def _bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key}={value!r} is not a boolean; use true or false")


def _int(key: str, value, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not an integer") from None
    if number < minimum:
        raise ValueError(f"{key}={number} must be >= {minimum}")
    return number


def _float(key: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a number") from None


def _check_option(key: str, value):
    if key in ("compile", "channels_last", "xformers", "fast"):
        return _bool(key, value)
    if key == "sdpa":
        value = str(value)
        if value not in SDPA_BACKENDS:
            raise ValueError(f"sdpa={value!r} is not a backend; choose one of {', '.join(SDPA_BACKENDS)}")
        return value
    if key == "tiny_vae":
        return None if value in (None, "", "none") else str(value)
    raise AssertionError(key)


def _check_fast(options: dict, hybrid: bool, sampler: str | None, where: str) -> None:
    """``fast=true`` (sampling/fast.py) replays one pipeline's sampler (LCM, DDIM or flow Euler): not a hybrid,
    not another sampler. Checked per entry when parsed and again in ``validate`` with the global settings merged
    in; which of the three fits which pipeline, FastSampler checks when it is built."""
    from stepdistill.sampling.fast import SCHEDULERS

    if not options.get("fast"):
        return
    if hybrid:
        raise ValueError(f"{where}: fast=true replays one pipeline's sampler (sampling/fast.py); a hybrid entry "
                         "runs two: drop fast")
    if sampler and scheduler_class(str(sampler)).__name__ not in SCHEDULERS:
        raise ValueError(f"{where}: fast=true replays sampler=lcm, ddim or flow_euler (sampling/fast.py), not "
                         f"sampler={sampler}")


def entries_from_dict(spec: dict, where: str = "entry") -> list[BenchEntry]:
    """Entries from one mapping (a YAML list item or a parsed ``--entry``); ``steps`` may be a list."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping of {', '.join(ENTRY_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(ENTRY_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(ENTRY_KEYS)}")
    hybrid = any(spec.get(k) is not None for k in ("teacher", "student", "teacher_steps"))
    if hybrid:
        missing = [k for k in ("teacher", "student", "teacher_steps") if spec.get(k) is None]
        if missing:
            raise ValueError(f"{where}: a hybrid entry needs teacher, student and teacher_steps "
                             f"(missing {', '.join(missing)})")
        if spec.get("pipeline") is not None:
            raise ValueError(f"{where}: a hybrid entry has teacher and student, not pipeline")
    elif spec.get("pipeline") is None:
        raise ValueError(f"{where}: needs pipeline (a folder, Hub id, toy-sd, tiny:<family> or random:<arch>) "
                         "or teacher + student + teacher_steps for a hybrid")
    steps = spec.get("steps", 1)
    steps = steps if isinstance(steps, list | tuple) else str(steps).split(",")
    if not steps:
        raise ValueError(f"{where}: steps is empty")
    options = {k: _check_option(k, spec[k]) for k in OPTION_KEYS if k in spec}
    _check_fast(options, hybrid, spec.get("sampler"), where)
    sampler = spec.get("sampler")
    if sampler is not None:
        sampler = str(sampler)
        scheduler_class(sampler)  # raises for an unknown name
    guidance = None if spec.get("guidance") is None else _float(f"{where}: guidance", spec["guidance"])
    out = []
    for s in steps:
        n = _int(f"{where}: steps", s)
        entry = BenchEntry(
            pipeline=None if hybrid else str(spec["pipeline"]), steps=n, sampler=sampler, guidance=guidance,
            name=spec.get("name") if len(steps) == 1 else None,
            teacher=str(spec["teacher"]) if hybrid else None, student=str(spec["student"]) if hybrid else None,
            teacher_steps=_int(f"{where}: teacher_steps", spec["teacher_steps"], 0) if hybrid else None,
            quality=spec.get("quality"), options=options)
        if hybrid and entry.teacher_steps > n:
            raise ValueError(f"{where}: teacher_steps={entry.teacher_steps} is more than steps={n}")
        out.append(entry)
    return out


def parse_entry(text: str) -> list[BenchEntry]:
    """``"PIPELINE key=value ..."`` or ``"hybrid teacher=... student=... teacher_steps=K steps=N ..."``."""
    tokens = shlex.split(text)
    if not tokens:
        raise ValueError("--entry is empty; write e.g. --entry \"toy-sd steps=50 guidance=1.5\"")
    spec: dict = {}
    head, rest = tokens[0], tokens[1:]
    if "=" in head:
        rest = tokens
    elif head != "hybrid":
        spec["pipeline"] = head
    for token in rest:
        if "=" not in token:
            raise ValueError(f"--entry {text!r}: {token!r} is not key=value (valid keys: {', '.join(ENTRY_KEYS)})")
        key, value = token.split("=", 1)
        spec[key] = value
    return entries_from_dict(spec, where=f"--entry {text!r}")


def load_bench_file(path: str | Path) -> tuple[list[BenchEntry], dict]:
    """``entries:`` (a list of mappings) and ``settings:`` (BenchSettings fields) of a YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"bench config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with entries: and settings:")
    unknown = sorted(set(data) - {"entries", "settings"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; use entries: and settings:")
    raw = data.get("entries") or []
    if not isinstance(raw, list):
        raise ValueError(f"{path}: entries: must be a list")
    entries = [e for i, spec in enumerate(raw) for e in entries_from_dict(spec, f"{path}: entries[{i}]")]
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: settings: must be a mapping")
    bad = sorted(set(settings) - set(SETTING_KEYS))
    if bad:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(bad)}; valid: {', '.join(SETTING_KEYS)}")
    return entries, settings


def make_settings(values: dict) -> BenchSettings:
    """BenchSettings from a mapping, each value checked (ValueError naming the key)."""
    s = BenchSettings()
    for key, value in values.items():
        if value is None and key not in ("resolution", "tiny_vae", "quality_num_prompts", "plot_metric", "threads"):
            continue
        if key == "batch_sizes":
            value = [_int("batch_sizes", v) for v in (value if isinstance(value, list | tuple) else str(value).split(","))]
            if not value:
                raise ValueError("batch_sizes is empty")
        elif key in ("runs", "quality_seeds", "quality_num_reference", "quality_batch_size"):
            value = _int(key, value)
        elif key == "warmup":
            value = _int(key, value, 0)
        elif key in ("resolution", "quality_num_prompts", "threads") and value is not None:
            value = _int(key, value)
        elif key in OPTION_KEYS:
            value = _check_option(key, value)
        elif key == "device" and str(value) not in ("auto", "cpu") and not str(value).startswith("cuda"):
            raise ValueError(f"device={value!r}; use auto, cpu or cuda[:N]")
        elif key == "dtype" and value not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype={value!r}; use auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
        setattr(s, key, value)
    if s.quality not in ("auto", "none"):
        quality_fn(s.quality)
    return s


def random_init_entries(arch: str) -> list[BenchEntry]:
    """The GPU targets of ``--random-init ARCH``: one step of the random-weight architecture, five ways."""
    spec = f"random:{arch}"
    return [BenchEntry(spec, 1, guidance=0.0, name=f"{arch} 1-step eager"),
            BenchEntry(spec, 1, guidance=0.0, name=f"{arch} 1-step compiled", options={"compile": True}),
            BenchEntry(spec, 1, guidance=0.0, name=f"{arch} 1-step compiled, tiny VAE",
                       options={"compile": True, "tiny_vae": "random"}),
            BenchEntry(spec, 1, sampler="lcm", guidance=0.0, name=f"{arch} 1-step compiled + CUDA graph",
                       options={"compile": True, "fast": True}),
            BenchEntry(spec, 1, sampler="lcm", guidance=0.0, name=f"{arch} 1-step compiled + CUDA graph, tiny VAE",
                       options={"compile": True, "fast": True, "tiny_vae": "random"})]


# ---- pipelines: where they are and what they hold (no weights loaded) ----------------------------------
def scheduler_class(name: str):
    import diffusers

    cls_name = SAMPLERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise ValueError(f"sampler={name!r} is not a diffusers scheduler; use one of {', '.join(SAMPLERS)} "
                         "or a diffusers scheduler class name (e.g. DPMSolverMultistepScheduler)")
    return cls


def resolve_pipeline(spec: str) -> str:
    """A folder for ``random:<arch>`` (built once), toy and tiny names; else the path or Hub id as given."""
    from stepdistill.models.loading import resolve_pretrained

    if spec.startswith("random:"):
        from stepdistill.bench.architectures import ARCHS, random_pipeline

        arch = spec.split(":", 1)[1]
        if arch not in ARCHS:
            raise ValueError(f"{spec!r}: unknown architecture; choose random:{' / random:'.join(ARCHS)}")
        return str(random_pipeline(arch))
    return resolve_pretrained(spec)


def check_pipeline(spec: str) -> None:
    """Fail early (no weights loaded) on a missing folder or an unsupported pipeline."""
    from stepdistill.models.loading import check_pretrained

    if spec.startswith("random:"):
        from stepdistill.bench.architectures import ARCHS

        if spec.split(":", 1)[1] not in ARCHS:
            raise ValueError(f"{spec!r}: unknown architecture; choose random:{' / random:'.join(ARCHS)}")
        return
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1
    if looks_local and not os.path.isdir(os.path.expanduser(spec)):
        raise ValueError(f"pipeline folder {spec} does not exist")
    check_pretrained(spec)


def export_info(path: str) -> dict:
    """``stepdistill.json`` of an exported student (guidance, trained timesteps), or {}."""
    file = Path(path) / "stepdistill.json"
    if file.is_file():
        try:
            return json.loads(file.read_text())
        except ValueError:
            return {}
    return {}


def is_toy(path: str) -> bool:
    """A shipped toy teacher, or a folder exported from a toy-domain run."""
    from stepdistill.toy.teachers import ASSETS_DIR

    p = Path(path).resolve()
    if ASSETS_DIR.resolve() in p.parents or (p / "stepdistill_toy.json").is_file():
        return True
    config = export_info(path).get("config") or {}
    pretrained = str((config.get("model") or {}).get("pretrained", "")) if isinstance(config, dict) else ""
    return pretrained.startswith("toy-")


def check_tiny_vae(spec: str | None) -> None:
    if spec in (None, "random"):
        return
    config = Path(spec) / "config.json"
    if not config.is_file():
        raise ValueError(f"tiny_vae={spec}: no config.json there; give an AutoencoderTiny folder "
                         "(e.g. a download of madebyollin/taesd or madebyollin/taesdxl) or tiny_vae=random")
    cls = json.loads(config.read_text()).get("_class_name")
    if cls != "AutoencoderTiny":
        raise ValueError(f"tiny_vae={spec} holds a {cls}, not an AutoencoderTiny")


# ---- the whole run -------------------------------------------------------------------------------------
def validate(entries: list[BenchEntry], settings: BenchSettings) -> None:
    """Every user error before any weights load: pipelines, tiny VAE folders, xformers."""
    if not entries:
        raise ValueError("no entries: give --entry \"PIPELINE steps=N ...\" or --config FILE.yaml with entries:")
    for entry in entries:
        for spec in ([entry.teacher, entry.student] if entry.is_hybrid else [entry.pipeline]):
            check_pipeline(spec)
        options = {**settings.options(), **entry.options}
        check_tiny_vae(options.get("tiny_vae"))
        experts = [spec for spec in ([entry.student] if entry.is_hybrid else [entry.pipeline])
                   if not spec.startswith("random:") and export_info(resolve_pipeline(spec)).get("experts")]
        if experts and (entry.is_hybrid or options.get("fast")):
            raise ValueError(f"entry {entry.label()}: {experts[0]} is a mixture of experts (one network per step): "
                             "it runs as its own entry without fast=true, not as a hybrid's student or fast")
        _check_fast(options, entry.is_hybrid, entry.sampler, f"entry {entry.label()}")
        if options.get("xformers"):
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ValueError("xformers=true but xformers is not installed: pip install xformers "
                                 "(or use sdpa=... for PyTorch's attention backends)") from None
        quality = entry.quality or settings.quality
        if quality not in ("auto", "none"):
            quality_fn(quality)
    labels = [e.label() for e in entries]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"entries with the same name: {', '.join(dupes)}; give them name=...")
