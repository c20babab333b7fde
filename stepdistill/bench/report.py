"""What ``stepdistill bench`` writes: ``bench.md`` (markdown table), ``bench.csv``, ``bench.png`` (quality
against latency, one point per entry) and ``bench.json``, all from the result of ``runner.run_bench``."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from stepdistill.bench.quality import HIGHER_IS_BETTER, QUALITY_KEYS


def say(msg: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _quality_columns(rows: list[dict]) -> list[str]:
    present = {k for r in rows for k, v in r["quality"].items() if v is not None}
    return [k for k in QUALITY_KEYS if k in present]


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(result: dict) -> str:
    rows = result["rows"]
    batches = sorted({b for r in rows for b in r["throughput"]})
    qcols = _quality_columns(rows)
    memory = rows[0]["memory"] if rows else ""
    arrow = {k: " ↑" if HIGHER_IS_BETTER.get(k) else " ↓" for k in qcols}
    head = (["entry", "steps", "sampler", "guidance", "ms / image (batch 1)"]
            + [f"images/s @{b}" for b in batches] + [f"peak MiB @{max(batches)}"]
            + [f"{k}{arrow[k]}" for k in qcols])
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|---:|" + "---:|" * (len(head) - 4)]
    for r in rows:
        q = r["quality"]
        cells = ([r["name"], str(r["steps"]), r["sampler"], f"{r['guidance']:g}", f"{r['latency_ms']:.1f}"]
                 + [_fmt(r["throughput"].get(b), ".1f") for b in batches]
                 + [_fmt(r["peak_mib"].get(max(batches)), ".0f")]
                 + [_fmt(100 * q[k] if k == "alignment" and q.get(k) is not None else q.get(k),
                         ".1f" if k == "alignment" else ".3g") + ("%" if k == "alignment" and q.get(k) is not None else "")
                    for k in qcols])
        lines.append("| " + " | ".join(cells) + " |")
    if not qcols:
        lines.append("\nquality: n/a (no quality function for these pipelines; see stepdistill.bench.quality.register_quality)")
    notes = (f"\n{result['device_name']}, {result['dtype']}; latency: median of {result['settings']['runs']} "
             f"end-to-end calls after {result['settings']['warmup']} warm-up; memory: {memory}.")
    return "\n".join(lines) + "\n" + notes + "\n"


def write_csv(result: dict, path: Path) -> None:
    rows = result["rows"]
    batches = sorted({b for r in rows for b in r["throughput"]})
    qkeys = sorted({k for r in rows for k in r["quality"]})
    header = (["name", "pipeline", "sampler", "steps", "teacher_steps", "guidance", "resolution", "options",
               "latency_ms"] + [f"images_per_s_b{b}" for b in batches] + [f"peak_mib_b{b}" for b in batches]
              + ["memory_kind", "quality_kind"] + qkeys)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            writer.writerow([r["name"], r["pipeline"], r["sampler"], r["steps"], r["teacher_steps"] or "",
                             r["guidance"], r["resolution"], json.dumps(r["options"]), f"{r['latency_ms']:.3f}"]
                            + [f"{r['throughput'].get(b, float('nan')):.3f}" for b in batches]
                            + [f"{r['peak_mib'].get(b, float('nan')):.1f}" for b in batches]
                            + [r["memory"], r["quality_kind"]] + [r["quality"].get(k, "") for k in qkeys])


def plot(result: dict, path: Path, metric: str | None = None) -> str | None:
    """Quality against latency (log x), one labelled point per entry; entries without quality sit on the
    lower edge, marked x. Returns the metric plotted (None: no entry has quality)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = result["rows"]
    qcols = _quality_columns(rows)
    if metric is None:
        metric = qcols[0] if qcols else None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    have = [r for r in rows if metric and r["quality"].get(metric) is not None]
    missing = [r for r in rows if r not in have]
    for r in have:
        ax.scatter(r["latency_ms"], r["quality"][metric], s=40)
        ax.annotate(r["name"], (r["latency_ms"], r["quality"][metric]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    if missing:
        ys = [r["quality"][metric] for r in have]
        y0 = (min(ys) - 0.05 * (max(ys) - min(ys) + 1e-9)) if ys else 0.0
        for r in missing:
            ax.scatter(r["latency_ms"], y0, marker="x", color="grey")
            ax.annotate(f"{r['name']} (quality n/a)", (r["latency_ms"], y0), textcoords="offset points",
                        xytext=(5, 4), fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency, ms / image (batch 1, {result['device']})")
    if metric:
        better = "higher is better" if HIGHER_IS_BETTER.get(metric) else "lower is better"
        ax.set_ylabel(f"{metric} ({better})")
    else:
        ax.set_ylabel("quality n/a")
        ax.set_yticks([])
    ax.set_title("stepdistill bench: quality vs latency")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return metric


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    (out / "bench.md").write_text(table)
    write_csv(result, out / "bench.csv")
    result["plot_metric"] = plot(result, out / "bench.png", result["settings"].get("plot_metric"))
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    print(table, flush=True)
    say(f"wrote {out}/bench.md, bench.csv, bench.png, bench.json ({result['total_s']:.0f} s in all)")
