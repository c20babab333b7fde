"""Golden loss trajectories: every tiny config's seeded 6-step CPU run logs the losses stored in tests/golden/.

A change of structure must not change a number; a change of numbers says why in its commit.

Each ``configs/tests/tiny_*.yaml`` is trained in-process (``Trainer(cfg).train()``, fresh run folder,
overrides in ``tests/golden/__init__.py``: one CPU thread, no samples, export or evaluation) and every
stored key (``*loss``, ``*/loss*``, ``grad_norm/*``) of every stored step of ``<run>/metrics.jsonl`` must
match ``tests/golden/<config>.json`` within 1e-6 absolute + 1e-6 relative. Keys logged now but not
stored are fine; a stored key or step missing now fails. Regenerate (all, or the named configs) with::

    python -m tests.golden --regenerate --reason "why the numbers change" [tiny_dmd2 ...]

(``--check`` runs the comparison without pytest). The runs use portable CPU kernels
(``golden.PORTABLE_ARITHMETIC``, in one subprocess) so that any x86-64 CPU gives the stored numbers; another
torch version may still differ beyond 1e-6: regenerate with that as reason.
"""

from __future__ import annotations

import pytest

from tests import golden
from tests.golden.__main__ import main as golden_main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every tiny config trained once, in one subprocess with the portable kernels (``run_portable``)."""
    return golden.run_portable(golden.config_names(), tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("name", golden.config_names())
def test_losses_match_the_golden_trajectory(name, runs):
    path = golden.golden_path(name)
    assert path.exists(), f"no golden trajectory {path.relative_to(golden.REPO)}; create it with " \
        f"{golden.REGENERATE} {name}"
    record = golden.stored(name)
    assert record["overrides"] == golden.overrides(name), (
        f"{name}: the runner's overrides changed since the file was written; regenerate with {golden.REGENERATE}")
    assert not isinstance(runs[name], str), f"{name}: the run failed:\n{runs[name]}"
    problem = golden.first_mismatch(name, record["steps"], runs[name])
    assert problem is None, f"{problem}\nIf the change of numbers is intended: {golden.REGENERATE} {name}"


def test_every_tiny_config_is_covered():
    names = golden.config_names()
    assert "tiny_dmd2" in names and len(names) >= 10
    assert sorted(p.stem for p in golden.GOLDEN_DIR.glob("*.json")) == names, "tests/golden/*.json and configs/tests/tiny_*.yaml differ: a stale file or a config without one"


def _steps(**losses):
    return [{"step": 0, "losses": dict(losses)}]


def test_comparison_reports_the_first_mismatch():
    stored = [{"step": 0, "losses": {"critic/loss": 1.0, "grad_norm/critic": 2.0}},
              {"step": 1, "losses": {"critic/loss": 1.5}}]
    same = [{"step": 0, "losses": {"critic/loss": 1.0 + 1e-7, "grad_norm/critic": 2.0, "critic/new_loss": 9.0}},
            {"step": 1, "losses": {"critic/loss": 1.5}}]
    assert golden.first_mismatch("x", stored, same) is None  # within tolerance; an extra key is fine
    moved = [same[0], {"step": 1, "losses": {"critic/loss": 1.5 + 1e-5}}]
    assert golden.first_mismatch("x", stored, moved) == (
        "x: step 1: critic/loss: stored 1.5, now 1.50001 (tolerance 1e-06 + 1e-06 * |stored|)")
    assert "stored key 'grad_norm/critic' is missing now" in golden.first_mismatch(
        "x", stored, [{"step": 0, "losses": {"critic/loss": 1.0}}] + same[1:])
    assert "step 1 is stored but the run logged no row" in golden.first_mismatch("x", stored, same[:1])
    assert golden.first_mismatch("x", _steps(a=float("nan")), _steps(a=float("nan"))) is not None


def test_tracked_keys():
    assert [k for k in ("generator/loss", "critic/denoising_loss", "grad_norm/critic", "lr/critic",
                        "generator/dmd", "discriminator/loss_r1") if golden.tracked(k)] == [
        "generator/loss", "critic/denoising_loss", "grad_norm/critic", "discriminator/loss_r1"]


@pytest.mark.parametrize("argv, message", [
    (["--regenerate", "tiny_dmd2"], "--regenerate needs --reason"),
    (["--regenerate", "--reason", "  ", "tiny_dmd2"], "--regenerate needs --reason"),
    (["--regenerate", "--reason", "x", "tiny_nope"], "no configs/tests/tiny_nope.yaml"),
])
def test_regeneration_refuses_without_a_reason_or_config(argv, message, capsys):
    assert golden_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
