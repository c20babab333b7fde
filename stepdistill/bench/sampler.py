"""The former home of ``stepdistill bench``, kept so that ``from stepdistill.bench import sampler`` goes on
working: every public name of the sampler benchmark, from the modules that now define it
(``bench.spec``, ``bench.runner``, ``bench.quality``, ``bench.report``, ``bench.cli``, ``bench.measure``).
New code imports from those modules."""

from __future__ import annotations

from stepdistill.bench.cli import build_parser, main
from stepdistill.bench.measure import time_calls
from stepdistill.bench.quality import (
    HIGHER_IS_BETTER,
    QUALITY,
    QUALITY_KEYS,
    QualityContext,
    QualityFn,
    quality_fn,
    register_quality,
    toy_quality,
)
from stepdistill.bench.report import markdown_table, plot, write_csv, write_outputs
from stepdistill.bench.runner import (
    PipelineCache,
    Runner,
    apply_options,
    build_runner,
    fit_scheduler,
    measure_entry,
    run_bench,
    sdpa_context,
)
from stepdistill.bench.spec import (
    ENTRY_KEYS,
    OPTION_KEYS,
    SAMPLERS,
    SDPA_BACKENDS,
    SETTING_KEYS,
    BenchEntry,
    BenchSettings,
    check_pipeline,
    check_tiny_vae,
    entries_from_dict,
    export_info,
    is_toy,
    load_bench_file,
    make_settings,
    parse_entry,
    random_init_entries,
    resolve_pipeline,
    validate,
)

__all__ = [
    "ENTRY_KEYS", "HIGHER_IS_BETTER", "OPTION_KEYS", "QUALITY", "QUALITY_KEYS", "SAMPLERS", "SDPA_BACKENDS",
    "SETTING_KEYS", "BenchEntry", "BenchSettings", "PipelineCache", "QualityContext", "QualityFn", "Runner",
    "apply_options", "build_parser", "build_runner", "check_pipeline", "check_tiny_vae", "entries_from_dict",
    "export_info", "fit_scheduler", "is_toy", "load_bench_file", "main", "make_settings", "markdown_table",
    "measure_entry", "parse_entry", "plot", "quality_fn", "random_init_entries", "register_quality",
    "resolve_pipeline", "run_bench", "sdpa_context", "time_calls", "toy_quality", "validate", "write_csv",
    "write_outputs",
]
