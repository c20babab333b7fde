"""Generated documentation pages: the results page (from run records) and the configuration reference.

``stepdistill results``
    Records of finished runs live in ``results/`` (one JSON file per run: a copy of the run's
    ``metrics.json`` and its provenance: date, commit, command, sample count, method, config path).
    ``stepdistill results --add runs/<run> --command "..."`` writes one; ``stepdistill results --out
    docs/results.md`` renders every record (or the runs / JSON files named on the command line) into the
    results page, and ``--check`` fails when the committed page differs from what the records give.

``stepdistill docs``
    Renders ``docs/configuration.md`` from the config dataclasses (``stepdistill/config/schema.py`` and each
    method's ``Config``): every key with its type, default, choices and the source comment written beside
    it. ``--check`` fails when the committed page is stale.

Both pages are pure functions of their inputs (no clock, no paths of this machine), so ``--check`` is exact.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import inspect
import io
import json
import shlex
import subprocess
import sys
import tokenize
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ResultsError",
    "build_record",
    "load_record",
    "load_records",
    "render_results",
    "add_record",
    "render_config_reference",
    "results_main",
    "docs_main",
]

RESULTS_DIR = Path("results")
RESULTS_PAGE = Path("docs/results.md")
CONFIG_PAGE = Path("docs/configuration.md")
RECORD_VERSION = 1


class ResultsError(ValueError):
    """A user error of ``stepdistill results``: one line that names the file and what is wrong."""


# ====================================================================================================
# Run records
# ====================================================================================================
def _read_json(path: Path) -> Any:
    if not path.exists():
        raise ResultsError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path} is not JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def _metrics_path(path: Path) -> Path:
    """A run folder's ``metrics.json``, or the JSON file itself."""
    if path.is_dir():
        if not (path / "metrics.json").is_file():
            raise ResultsError(f"{path} is a folder without metrics.json (not an evaluated run)")
        return path / "metrics.json"
    return path


def _check_metrics(metrics: Any, where: Path) -> None:
    if not isinstance(metrics, dict):
        raise ResultsError(f"{where}: expected a JSON object, found {type(metrics).__name__}")
    toy = isinstance(metrics.get("results"), dict) and metrics["results"]
    single = isinstance(metrics.get("metrics"), dict) and metrics["metrics"]
    if not (toy or single):
        raise ResultsError(f"{where} holds no metrics: expected a non-empty 'results' (a training run's "
                           "evaluation) or 'metrics' (stepdistill eval) object")


def _num_samples(metrics: dict) -> int | None:
    if isinstance(metrics.get("num_samples"), int):
        return metrics["num_samples"]
    if isinstance(metrics.get("num_images"), int):
        return metrics["num_images"]
    for row in (metrics.get("results") or {}).values():
        count = (row.get("all") or {}).get("num_images") if isinstance(row, dict) else None
        if isinstance(count, int):
            return count
    return None


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _config_from_command(command: str) -> str | None:
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word in ("--config", "-c") and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--config="):
            return word.split("=", 1)[1]
    return None


def _method_of_run(run_dir: Path) -> str | None:
    """``method.name`` from a run folder's resolved config.yaml, else its export's stepdistill.json."""
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            from omegaconf import OmegaConf

            name = OmegaConf.select(OmegaConf.load(config), "method.name")
        except Exception:  # a damaged config.yaml only loses this one fact
            name = None
        if name:
            return str(name)
    info = run_dir / "export" / "stepdistill.json"
    if info.is_file():
        try:
            return json.loads(info.read_text(encoding="utf-8")).get("method")
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def build_record(path: str | Path, command: str | None = None, config: str | None = None,
                 method: str | None = None, commit: str | None = None) -> dict:
    """A results record for the run folder (or ``metrics.json``) at ``path``.

    Provenance is read from the metrics' own ``date`` / ``commit`` / ``command`` / ``num_samples`` /
    ``method`` / ``config`` fields when present; the arguments override them. Otherwise the date is the
    file's modification date, the commit ``git rev-parse --short HEAD`` of the current folder, the config
    the ``--config`` of the command, the method the run's config.yaml; the command must be given.
    """
    path = Path(path)
    source = _metrics_path(path)
    metrics = _read_json(source)
    _check_metrics(metrics, source)
    command = command or metrics.get("command")
    if not command:
        raise ResultsError(f"{source} records no command: pass --command \"...\" (the command that made the run)")
    date = metrics.get("date")
    if not date:
        mtime = source.stat().st_mtime
        date = datetime.datetime.fromtimestamp(mtime, tz=datetime.timezone.utc).date().isoformat()
    commit = commit or metrics.get("commit") or _git_commit(Path.cwd())
    if not commit:
        raise ResultsError(f"{source}: no commit recorded and `git rev-parse HEAD` failed here: pass --commit")
    num_samples = _num_samples(metrics)
    if num_samples is None:
        raise ResultsError(f"{source}: no sample count found (num_samples, num_images, or results.*.all.num_images)")
    run_dir = path if path.is_dir() else path.parent
    method = method or metrics.get("method") or _method_of_run(run_dir)
    if not method:
        raise ResultsError(f"{source}: the method is not recorded (no config.yaml beside it): pass --method NAME")
    config = config or metrics.get("config") or _config_from_command(command)
    if not config:
        raise ResultsError(f"{source}: the config is not recorded and the command names no --config: pass --config")
    return {"record": RECORD_VERSION, "name": run_dir.name, "date": str(date), "commit": str(commit),
            "command": command, "num_samples": num_samples, "method": str(method), "config": str(config),
            "metrics": metrics}


def load_record(path: str | Path, **provenance) -> dict:
    """A record: a file of ``results/`` as it is, or one built from a run folder / ``metrics.json``."""
    path = Path(path)
    data = _read_json(_metrics_path(path))
    if isinstance(data, dict) and "record" in data:
        missing = [k for k in ("date", "commit", "command", "num_samples", "method", "config", "metrics")
                   if k not in data]
        if missing:
            raise ResultsError(f"{path}: record without {', '.join(missing)}")
        _check_metrics(data["metrics"], path)
        return data
    return build_record(path, **provenance)


def load_records(paths: Iterable[str | Path] = (), results_dir: str | Path = RESULTS_DIR, **provenance) -> list[dict]:
    """The records of ``paths``, or of every ``*.json`` in ``results_dir``; sorted by date, then name."""
    paths = list(paths)
    if not paths:
        folder = Path(results_dir)
        paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    records = [load_record(p, **provenance) for p in paths]
    return sorted(records, key=lambda r: (r["date"], r.get("name", ""), r["config"]))


def add_record(run: str | Path, results_dir: str | Path = RESULTS_DIR, name: str | None = None, **provenance) -> Path:
    """Copy ``run``'s metrics.json into ``results_dir`` with its provenance; returns the new file.

    An existing record is never replaced: choose another ``name`` or remove the file first."""
    record = build_record(run, **provenance)
    folder = Path(results_dir)
    stem = name or f"{record['date'][:10]}-{record['name']}"
    out = folder / f"{stem}.json"
    if out.exists():
        raise ResultsError(f"{out} exists: pass --name NAME for another record, or remove it first")
    folder.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out


# ---- rendering --------------------------------------------------------------------------------------
def _fmt(value, fmt: str) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    if fmt == "%":
        return f"{100 * value:.1f}%"
    return format(value, fmt)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_TOY_COLUMNS = [("toy FID ↓", "all", "fid", ".2f"), ("alignment ↑", "all", "alignment", "%"),
                ("held-out FID", "held_out", "fid", ".2f"), ("held-out alignment", "held_out", "alignment", "%"),
                ("diversity", "all", "diversity", ".2f"), ("aligned diversity", "all", "aligned_diversity", ".2f")]
_EVAL_COLUMNS = [("FID ↓", "fid", ".2f"), ("KID ↓", "kid_mean", ".5f"), ("CLIP score ↑", "clip_score", ".2f"),
                 ("alignment ↑", "alignment", "%"), ("held-out alignment", "held_out_alignment", "%"),
                 ("diversity", "diversity", ".2f")]


def _rows(record: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one record's table; the provenance columns come last in every row."""
    m, prov = record["metrics"], [record["date"][:10], f"`{record['commit']}`"]
    if isinstance(m.get("results"), dict) and m["results"]:
        header = ["model", "steps", "images", *[c[0] for c in _TOY_COLUMNS], "ms / image", "date", "commit"]
        rows = []
        entries = ([("real images (the data)", {**m["data"], "steps": None})] if isinstance(m.get("data"), dict)
                   else []) + list(m["results"].items())
        for name, row in entries:
            count = (row.get("all") or {}).get("num_images", record["num_samples"])
            cells = [_cell(name), _fmt(row.get("steps"), "d"), _fmt(count, "d")]
            cells += [_fmt((row.get(split) or {}).get(key), fmt) for _, split, key, fmt in _TOY_COLUMNS]
            cells.append(_fmt(row.get("latency_ms_per_image"), ".1f"))
            rows.append(cells + prov)
        return header, rows
    metrics = m["metrics"]
    header = ["model", "steps", "images", *[c[0] for c in _EVAL_COLUMNS], "ms / image", "date", "commit"]
    seconds = m.get("seconds_per_image")
    cells = [_cell(m.get("pipeline", record.get("name", "?"))), _fmt(m.get("steps"), "d"),
             _fmt(record["num_samples"], "d")]
    cells += [_fmt(metrics.get(key), fmt) for _, key, fmt in _EVAL_COLUMNS]
    cells.append(_fmt(seconds * 1000 if isinstance(seconds, (int, float)) else None, ".1f"))
    return header, [cells + prov]


_RESULTS_INTRO = """# Results

Measured numbers of finished runs, generated by `stepdistill results --out docs/results.md` from the
records in `results/` (one JSON file per run: a copy of the run's `metrics.json` with its provenance).
Do not edit this page by hand; add a record instead:

```bash
stepdistill results --add runs/toy_dmd2 --command "accelerate launch train.py --config configs/toy/dmd2.yaml"
stepdistill results --out docs/results.md          # re-render this page
stepdistill results --check --out docs/results.md  # fails when this page is stale (a test runs it)
```

Every number below comes with the date and commit it was measured at, the command that made it and the
number of images it rests on. Toy FID is computed in the toy classifier's feature space (see
[Evaluation](evaluation.md)); FID is biased upward at small sample counts, so compare rows of one
record, or records with the same image count.
"""


def render_results(records: Sequence[dict]) -> str:
    """The results page (markdown) of ``records``."""
    lines = [_RESULTS_INTRO]
    if not records:
        lines += ["No run has been recorded yet.", ""]
        return "\n".join(lines)
    for record in records:
        lines += [f"## {_cell(record['method'])}: `{_cell(record['config'])}`", "",
                  f"- command: `{record['command']}`",
                  f"- date {record['date'][:10]}, commit `{record['commit']}`, {record['num_samples']} images", ""]
        header, rows = _rows(record)
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def _check_or_write(text: str, out: Path, check: bool, command: str) -> int:
    if check:
        current = out.read_text(encoding="utf-8") if out.is_file() else None
        if current != text:
            state = "missing" if current is None else "stale"
            print(f"error: {out} is {state}: run `{command}`", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    if out.exists() and out.is_dir():
        raise ResultsError(f"--out {out} is a folder; give the page's file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


def results_main(argv: Sequence[str] | None = None) -> int:
    """``stepdistill results``: add a run's record, render the results page, or check it."""
    p = argparse.ArgumentParser(prog="stepdistill results", description=results_main.__doc__)
    p.add_argument("inputs", nargs="*", metavar="RUN_DIR_OR_JSON",
                   help="run folders, metrics.json files or records to render (default: every record in --results)")
    p.add_argument("--out", default=str(RESULTS_PAGE), help=f"the page to write (default {RESULTS_PAGE})")
    p.add_argument("--check", action="store_true", help="fail (exit 1) if --out differs from the rendered page")
    p.add_argument("--add", metavar="RUN_DIR", help="copy this run's metrics.json into --results with its provenance")
    p.add_argument("--results", default=str(RESULTS_DIR), metavar="DIR", help=f"records folder (default {RESULTS_DIR})")
    p.add_argument("--command", help="the command that made the run (when its metrics.json records none)")
    p.add_argument("--config", help="the run's config path (default: the --config of the command)")
    p.add_argument("--method", help="the run's method (default: method.name of the run's config.yaml)")
    p.add_argument("--commit", help="the commit measured (default: the metrics' own, else git rev-parse HEAD)")
    p.add_argument("--name", help="file name of the new record, without .json (default DATE-RUN)")
    args = p.parse_args(argv)
    provenance = {"command": args.command, "config": args.config, "method": args.method, "commit": args.commit}
    try:
        if args.add:
            if args.inputs or args.check:
                raise ResultsError("--add RUN_DIR takes no other inputs and no --check")
            out = add_record(args.add, args.results, name=args.name, **provenance)
            print(f"added {out}; render the page with `stepdistill results --out {args.out}`")
            return 0
        records = load_records(args.inputs, args.results, **provenance)
        return _check_or_write(render_results(records), Path(args.out), args.check,
                               f"stepdistill results --out {args.out}")
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ====================================================================================================
# Configuration reference
# ====================================================================================================
_SECTIONS = [  # (key prefix, dataclass name in config/schema.py, what the section is)
    ("run", "RunConfig", "The run's name, folder, seed and trackers."),
    ("model", "ModelConfig", "The teacher pipeline."),
    ("data", "DataConfig", "Prompts and, for methods with a GAN, adversarial or consistency term, real latents."),
    ("train", "TrainConfig", "The training loop of the harness."),
    ("roles.<role>", "RoleConfig", "One network of the method (`roles.generator`, `roles.critic`, ...): "
                                   "where it starts, full weights or LoRA, its optimizer. A method declares its "
                                   "roles and their defaults (listed under each method below); the `roles:` "
                                   "section overrides them."),
    ("export", "ExportConfig", "The diffusers pipeline written at the end of training."),
    ("eval", "EvalConfig", "Teacher vs student after training (toy teachers)."),
    ("eval.teacher_baselines[]", "TeacherRow", "One extra teacher row of the evaluation."),
]


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line number -> (comment text, whether the line holds nothing else)."""
    out = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            own_line = lines[row - 1].strip().startswith("#")
            out[row] = (tok.string.lstrip("#").strip(), own_line)
    return out


class _ClassInfo:
    """Per-field comments, annotations and choices of one dataclass, read from its module's source."""

    def __init__(self, cls: type) -> None:
        module = sys.modules[cls.__module__]
        source = inspect.getsource(module)
        comments = _comments(source)
        tree = ast.parse(source)
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        self.doc = ast.get_docstring(node) or ""
        self.fields: dict[str, tuple[str, str]] = {}  # name -> (annotation, comment)
        # A comment above the first of several adjacent fields speaks for all of them: the others point to it.
        group_end, group_first = None, ""
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                ann = ast.unparse(stmt.annotation)
                above, row = [], stmt.lineno - 1
                while row in comments and comments[row][1]:
                    above.insert(0, comments[row][0])
                    row -= 1
                inline = [comments[r][0] for r in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                          if r in comments and not comments[r][1]]
                comment = " ".join(above + inline)
                if above:
                    group_end, group_first = stmt.end_lineno, stmt.target.id
                elif not comment and group_end == stmt.lineno - 1 and _siblings(stmt.target.id, group_first):
                    comment, group_end = _SEE + group_first, stmt.end_lineno
                else:
                    group_end = None
                self.fields[stmt.target.id] = (ann, comment)
            else:
                group_end = None
        self.choices: dict[str, tuple] = {}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and getattr(sub.func, "id", None) == "_check_choice" and len(sub.args) == 4:
                key, choices = sub.args[1], sub.args[3]
                value = self._resolve(choices, module)
                if isinstance(key, ast.Constant) and value is not None:
                    self.choices[key.value] = value
            elif (isinstance(sub, ast.Compare) and len(sub.ops) == 1 and isinstance(sub.ops[0], ast.NotIn)
                  and isinstance(sub.left, ast.Attribute) and isinstance(sub.left.value, ast.Name)
                  and sub.left.value.id == "self"):
                value = self._resolve(sub.comparators[0], module)
                if value is not None:
                    self.choices.setdefault(sub.left.attr, value)

    @staticmethod
    def _resolve(node: ast.AST, module) -> tuple | None:
        if isinstance(node, ast.Name):
            value = getattr(module, node.id, None)
            return tuple(value) if isinstance(value, (tuple, list)) else None
        if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
            return tuple(e.value for e in node.elts)
        return None


def _siblings(a: str, b: str) -> bool:
    """Names that differ in one word only (real_guidance_scale / fake_guidance_scale, w_min / w_max)."""
    wa, wb = a.split("_"), b.split("_")
    return len(wa) == len(wb) >= 2 and sum(x != y for x, y in zip(wa, wb)) == 1


_SEE = "\x00see:"  # a field's comment that points to the first field of its group
_INFO: dict[type, _ClassInfo] = {}


def _info(cls: type) -> _ClassInfo:
    if cls not in _INFO:
        _INFO[cls] = _ClassInfo(cls)
    return _INFO[cls]


def _field_facts(cls: type, name: str) -> tuple[str, str, tuple | None]:
    """(annotation, comment, choices) of field ``name``: the nearest class in the MRO that declares it, its
    comment (or an ancestor's, when the redeclaration only changes the default)."""
    ann, comment, choices = "", "", None
    for base in cls.__mro__:
        if not dataclasses.is_dataclass(base) or base is object:
            continue
        info = _info(base)
        if name in info.fields:
            a, c = info.fields[name]
            ann = ann or a
            comment = comment or c
        if choices is None and name in info.choices:
            choices = info.choices[name]
        if ann and comment and choices is not None:
            break
    return ann, comment, choices


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "required" if value == "???" else (value if value else '""')
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _md(text: str) -> str:
    return (text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
            .replace("[", "\\[").replace("]", "\\]"))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _nested_note(value: Any) -> str:
    """A nested dataclass default: the fields that differ from its class's own defaults."""
    changed = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
               if getattr(value, f.name) != _default(f)}
    return ("{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in changed.items()) + "}") if changed else "(its defaults)"


def _table(cls: type, prefix: str, nested: dict[type, str]) -> list[str]:
    lines = ["| key | type | default | notes |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        ann, comment, choices = _field_facts(cls, f.name)
        value = _default(f)
        if comment.startswith(_SEE):
            comment = f"See `{prefix}.{comment[len(_SEE):]}`."
        if dataclasses.is_dataclass(value):
            nested.setdefault(type(value), f"{prefix}.{f.name}")
            default = _nested_note(value)
            comment = f"{comment} See `{nested[type(value)]}` below.".strip()
        else:
            default = _yaml(value)
        note = _md(comment)
        if note and not note.endswith("."):
            note += "."
        if choices:
            note = (note + " " if note else "") + "Choices: " + ", ".join(f"`{c}`" for c in choices) + "."
        lines.append(f"| `{prefix}.{f.name}` | `{ann}` | `{default}` | {note} |")
    return lines


def _role_summary(name: str, role) -> str:
    from stepdistill.config.schema import RoleConfig

    blank = RoleConfig(trainable=role.trainable, lr=role.lr if role.trainable else RoleConfig.lr)
    parts = ["trainable" if role.trainable else "frozen"]
    for f in dataclasses.fields(role):
        if f.name == "trainable":
            continue
        value = getattr(role, f.name)
        if value != getattr(blank, f.name) or (f.name == "lr" and role.trainable):
            parts.append(f"{f.name} {_yaml(value)}")
    return f"`{name}` ({', '.join(parts)})"


def _method_classes() -> dict[str, type]:
    """Every registered method, by name (the registry; else the ``stepdistill.methods`` entry points)."""
    try:
        from stepdistill.methods.registry import all_methods

        return dict(sorted(all_methods().items()))
    except ImportError:  # pragma: no cover - registry replaced by entry-point discovery
        from importlib.metadata import entry_points

        return dict(sorted((ep.name, ep.load()) for ep in entry_points(group="stepdistill.methods")))


_CONFIG_INTRO = """# Configuration reference

<!-- Generated by `stepdistill docs` from stepdistill/config/schema.py and each method's Config class. Do not
edit: change the comment beside the field in the code, then run `stepdistill docs` (a test checks this page). -->

A run is one YAML file merged onto these dataclasses (OmegaConf), in this order, later winning:
schema defaults < the method's default roles < `base:` config(s) < the YAML file < `key=value` overrides on
the command line. An unknown key, a value of the wrong type or outside its choices stops the run before any
model loads, with one message that names the key. `python train.py --config NAME --dryrun` prints the fully
resolved config; a bare NAME is looked up in `configs/`.

The notes are the comments written beside each field in the code; they name the paper or recipe a default
comes from, or say "toy choice" / "stepdistill choice" where it is not a paper value. `required` marks a key
without a default.
"""


def render_config_reference() -> str:
    """The configuration reference page (markdown), rendered from the config dataclasses."""
    from stepdistill.config import schema

    lines = [_CONFIG_INTRO]
    nested: dict[type, str] = {}
    for prefix, name, what in _SECTIONS:
        cls = getattr(schema, name)
        lines += [f"## `{prefix}`", "", what, "", *_table(cls, prefix, nested), ""]
    lines += ["## `method`", "",
              "`method.name` picks the method; the other keys of the section are that method's own `Config`. "
              "The roles each method declares are listed with their defaults (a `roles.<role>` key overrides "
              "them).", ""]
    for mname, mcls in _method_classes().items():
        cfg_cls = mcls.Config
        lines += [f"### `method.name: {mname}`", ""]
        paper = getattr(mcls, "paper", "")
        lines += [f"`{mcls.__module__}.{mcls.__name__}`" + (f": {_md(paper)}." if paper else "."), ""]
        try:
            roles = mcls.default_roles(cfg_cls())
            lines += ["Default roles: " + "; ".join(_role_summary(r, c) for r, c in roles.items()) + ".", ""]
        except Exception:  # a method whose roles depend on more than its defaults
            pass
        lines += [*_table(cfg_cls, "method", nested), ""]
    done: set[type] = set()
    while set(nested) - done:  # nested sections, each once (they may nest further)
        for cls in sorted(set(nested) - done, key=lambda c: nested[c]):
            done.add(cls)
            doc = _info(cls).doc
            lines += [f"## `{nested[cls]}`", "", *([_md(doc), ""] if doc else []), *_table(cls, nested[cls], nested), ""]
    return "\n".join(lines)


def docs_main(argv: Sequence[str] | None = None) -> int:
    """``stepdistill docs``: write (or ``--check``) the configuration reference page."""
    p = argparse.ArgumentParser(prog="stepdistill docs", description=docs_main.__doc__)
    p.add_argument("--out", default=str(CONFIG_PAGE), help=f"the page to write (default {CONFIG_PAGE})")
    p.add_argument("--check", action="store_true", help="fail (exit 1) if --out differs from the rendered page")
    args = p.parse_args(argv)
    try:
        return _check_or_write(render_config_reference(), Path(args.out), args.check,
                               f"stepdistill docs --out {args.out}")
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
