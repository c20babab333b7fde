"""The front door and the docs site: README shape and links, the strict mkdocs build, the generated pages
(configuration reference, results) and the ``stepdistill results`` command."""

from __future__ import annotations

import calendar
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stepdistill import results as R

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
INSTALL = 'pip install -e ".[dev]"'
DEMO = "accelerate launch train.py --config configs/toy/dmd2.yaml"
TESTS = "HF_HUB_OFFLINE=1 python -m pytest -q"


# ---- README -----------------------------------------------------------------------------------------
def test_readme_is_a_short_front_door_with_install_then_demo_then_tests():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    positions = [text.find(cmd) for cmd in (INSTALL, DEMO, TESTS)]
    assert all(p >= 0 for p in positions), positions
    assert positions == sorted(positions), "README: install command, then the demo, then the tests"
    assert "DESIGN.md" not in text


def test_every_relative_link_in_readme_resolves():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    missing = []
    for link in links:
        if re.match(r"^[a-z]+:", link) or link.startswith("#"):
            continue
        if not (REPO / link.split("#", 1)[0]).exists():
            missing.append(link)
    assert not missing, f"README links to missing files: {missing}"


# ---- the site ---------------------------------------------------------------------------------------
def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs / mkdocs-material not installed (pip install -e '.[dev]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # No -q: mkdocs counts the warnings that --strict turns into a failure only at its default log level.
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_configuration_page_is_generated_from_the_schema():
    page = REPO / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == R.render_config_reference(), \
        "docs/configuration.md is stale: run `stepdistill docs`"


def test_configuration_page_lists_fields_defaults_and_source_comments():
    text = R.render_config_reference()
    assert "| `train.max_steps` | `int` | `1000` |" in text
    assert "| `model.pretrained` | `str` | `required` |" in text
    assert "Choices: `stop`, `skip`." in text  # train.on_nonfinite
    assert "(DMD Sec. 3.3, Eq. 9)" in text  # a method field's source comment
    assert "### `method.name: dmd2`" in text and "## `method.adversarial`" in text


def test_results_page_is_generated_from_the_committed_records():
    records = R.load_records(results_dir=REPO / "results")
    assert (REPO / "docs" / "results.md").read_text(encoding="utf-8") == R.render_results(records), \
        "docs/results.md is stale: run `stepdistill results --out docs/results.md`"


# ---- stepdistill results ----------------------------------------------------------------------------
def _toy_run(tmp_path: Path, **extra) -> Path:
    """A run folder with a toy evaluation's metrics.json (the shape toy evaluation writes) and config.yaml."""
    run = tmp_path / "toy_dmd2"
    run.mkdir()
    row = {"all": {"num_images": 900, "fid": 1.2934, "alignment": 0.979, "diversity": 2.0, "aligned_diversity": 1.91},
           "held_out": {"num_images": 110, "fid": 2.47, "alignment": 0.964}}
    metrics = {"teacher": "toy-sd", "prompts": "builtin:toy_all", "seeds_per_prompt": 10,
               "results": {"teacher 50-step": {**row, "steps": 50, "guidance_scale": 1.5, "latency_ms_per_image": 113.0},
                           "student 1-step": {**row, "steps": 1, "guidance_scale": 0.0, "latency_ms_per_image": 2.4}},
               "data": {"all": {"num_images": 900, "fid": 0.62, "alignment": 1.0}, "held_out": {"fid": 0.82}},
               **extra}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.yaml").write_text("method:\n  name: dmd2\n")
    noon = calendar.timegm((2026, 1, 2, 12, 0, 0))
    os.utime(run / "metrics.json", (noon, noon))
    return run


def test_add_and_render_a_run(tmp_path, capsys):
    run = _toy_run(tmp_path)
    records, page = tmp_path / "results", tmp_path / "results.md"
    command = "accelerate launch train.py --config configs/toy/dmd2.yaml"
    assert R.results_main(["--add", str(run), "--command", command, "--commit", "abc1234",
                           "--results", str(records)]) == 0
    [record_file] = records.glob("*.json")
    assert record_file.name == "2026-01-02-toy_dmd2.json"
    record = json.loads(record_file.read_text())
    assert record["date"] == "2026-01-02"  # the file's mtime: metrics.json records no date
    assert (record["commit"], record["command"], record["num_samples"]) == ("abc1234", command, 900)
    assert (record["method"], record["config"]) == ("dmd2", "configs/toy/dmd2.yaml")  # config.yaml, the command
    assert record["metrics"] == json.loads((run / "metrics.json").read_text())

    assert R.results_main(["--results", str(records), "--out", str(page)]) == 0
    text = page.read_text()
    assert "| student 1-step | 1 | 900 | 1.29 | 97.9% | 2.47 | 96.4% | 2.00 | 1.91 | 2.4 | 2026-01-02 | `abc1234` |" in text
    assert "| real images (the data) | — | 900 | 0.62 | 100.0% | 0.82 |" in text
    assert f"- command: `{command}`" in text and "## dmd2: `configs/toy/dmd2.yaml`" in text
    # The same record refuses to be written twice.
    assert R.results_main(["--add", str(run), "--command", command, "--commit", "abc1234",
                           "--results", str(records)]) == 2
    assert "exists" in capsys.readouterr().err


def test_provenance_recorded_by_the_evaluation_wins(tmp_path):
    """Metrics that carry date / commit / command / num_samples (and an eval-shaped 'metrics' object) need no
    flags; the command's --config is the record's config."""
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({
        "pipeline": "runs/x/export", "num_images": 4000, "num_samples": 4000, "steps": 4, "seconds_per_image": 0.05,
        "metrics": {"fid": 12.345, "kid_mean": 0.00123, "clip_score": 31.2}, "method": "lcm",
        "date": "2026-12-05T10:00:00+00:00", "commit": "deadbee",
        "command": "stepdistill eval runs/x/export --config configs/lcm_sd15.yaml"}))
    record = R.build_record(path)
    assert (record["date"], record["commit"], record["method"], record["config"]) == (
        "2026-12-05T10:00:00+00:00", "deadbee", "lcm", "configs/lcm_sd15.yaml")
    text = R.render_results([record])
    assert "| runs/x/export | 4 | 4000 | 12.35 | 0.00123 | 31.20 | — | — | — | 50.0 | 2026-12-05 | `deadbee` |" in text


def test_check_detects_a_stale_page(tmp_path, capsys):
    run = _toy_run(tmp_path, command="stepdistill toy eval . --seeds-per-prompt 10 --student-steps 1",
                   commit="abc1234")
    records, page = tmp_path / "results", tmp_path / "results.md"
    assert R.results_main(["--results", str(records), "--out", str(page)]) == 0  # no records yet
    assert "No run has been recorded yet." in page.read_text()
    assert R.results_main(["--check", "--results", str(records), "--out", str(page)]) == 0
    assert R.results_main(["--add", str(run), "--config", "configs/toy/dmd2.yaml", "--results", str(records)]) == 0
    capsys.readouterr()
    assert R.results_main(["--check", "--results", str(records), "--out", str(page)]) == 1
    assert "stale" in capsys.readouterr().err
    assert R.results_main(["--results", str(records), "--out", str(page)]) == 0
    assert R.results_main(["--check", "--results", str(records), "--out", str(page)]) == 0


def test_cli_wiring(tmp_path):
    from stepdistill.cli import main

    out = tmp_path / "results.md"
    assert main(["results", "--results", str(tmp_path / "none"), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Results")
    assert main(["docs", "--out", str(tmp_path / "configuration.md")]) == 0
    assert main(["docs", "--check", "--out", str(tmp_path / "configuration.md")]) == 0


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("folder", "folder without metrics.json"),
    ("not_json", "is not JSON"),
    ("no_metrics", "holds no metrics"),
    ("no_command", "pass --command"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, case, message):
    target = tmp_path / "run"
    if case == "folder":
        target.mkdir()
    elif case == "not_json":
        target.mkdir()
        (target / "metrics.json").write_text("{not json")
    elif case == "no_metrics":
        target.mkdir()
        (target / "metrics.json").write_text(json.dumps({"teacher": "toy-sd", "results": {}}))
    elif case == "no_command":
        target = _toy_run(tmp_path)
    assert R.results_main([str(target), "--out", str(tmp_path / "page.md"), "--commit", "abc1234"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "page.md").exists()
