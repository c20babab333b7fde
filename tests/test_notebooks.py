"""The notebooks run top to bottom (their code cells as one script, in a fresh process)."""

from __future__ import annotations

import json

from tests.helpers import PYTHON, REPO, run


def notebook_script(path) -> str:
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4 and nb["cells"], f"{path} is not an nbformat-4 notebook"
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    # A bare expression ending a cell is what the notebook displays; keep it evaluated.
    return "\n\n".join(cells)


def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(notebook_script(REPO / "notebooks" / "quickstart.ipynb"))
    run_dir = tmp_path / "run"
    proc = run([PYTHON, str(script)], cwd=REPO,
               env={"STEPDISTILL_NOTEBOOK_QUICK": "1", "STEPDISTILL_NOTEBOOK_RUN_DIR": str(run_dir)})
    assert "torch.Size([3, 3, 32, 32])" in proc.stdout and "would upload" in proc.stdout
    assert (run_dir / "export" / "README.md").is_file() and (run_dir / "comparison.png").is_file()
