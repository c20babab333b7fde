"""Method discovery (methods/registry.py): package modules and third-party entry points, no hand-kept list.

The plugin of tests/plugins/stepdistill_kd_plugin is made discoverable the way an installed distribution
is: its package folder and a ``<name>.dist-info`` (METADATA + entry_points.txt) on sys.path, which is what
``importlib.metadata`` reads. Nothing is installed into the environment.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stepdistill.methods import DistillMethod, registry
from stepdistill.methods.registry import all_methods, get_method, register
from tests.helpers import REPO

PLUGIN_ROOT = REPO / "tests" / "plugins" / "stepdistill_kd_plugin"


@pytest.fixture()
def clean_registry(monkeypatch):
    """Registered methods, imported plugin modules and the discovery cache are restored after the test."""
    before = dict(registry.METHODS)
    modules = set(sys.modules)
    monkeypatch.setattr(registry, "_discovered_for", None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    registry.METHODS.clear()
    registry.METHODS.update(before)
    for name in set(sys.modules) - modules:
        if name.startswith(("stepdistill_", "zz_")) or name.startswith("stepdistill.methods.zz_"):
            del sys.modules[name]


def _distribution(where: Path, name: str, entry_points: dict[str, str]) -> None:
    """A dist-info folder as pip writes it: METADATA and the ``stepdistill.methods`` entry points."""
    info = where / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[stepdistill.methods]\n{lines}")


def _plugin_entry_point() -> dict[str, str]:
    text = (PLUGIN_ROOT / "pyproject.toml").read_text()
    key, value = re.search(r'^(\w+) = "([\w.:]+)"$', text.split('"stepdistill.methods"]')[1], re.M).groups()
    return {key: value}


def test_a_plugin_method_is_found_through_its_entry_point(tmp_path, clean_registry):
    assert "kd_plugin" not in all_methods()
    _distribution(tmp_path, "stepdistill-kd-plugin", _plugin_entry_point())
    sys.path[:0] = [str(tmp_path), str(PLUGIN_ROOT)]
    cls = get_method("kd_plugin")
    assert cls.__module__ == "stepdistill_kd_plugin.method" and issubclass(cls, DistillMethod)
    assert "kd_plugin" in all_methods() and "dmd2" in all_methods()
    # Discovering again (the same module, the same class: here after a change of sys.path) is no error.
    sys.path.append(str(tmp_path / "elsewhere"))
    assert get_method("kd_plugin") is cls


def test_a_plugin_method_validates_and_trains_one_step(tmp_path, clean_registry):
    from stepdistill.harness.trainer import Trainer
    from stepdistill.runconfig import load_config

    _distribution(tmp_path / "site", "stepdistill-kd-plugin", _plugin_entry_point())
    sys.path[:0] = [str(tmp_path / "site"), str(PLUGIN_ROOT)]
    # The tiny DMD2 run (tiny SD-1.5 pipeline, builtin prompts) with the plugin's method section.
    raw = OmegaConf.load(REPO / "configs" / "tests" / "tiny_dmd2.yaml")
    raw.method, raw.roles = {"name": "kd_plugin", "guidance_scale": 1.5}, {}
    path = tmp_path / "tiny_kd_plugin.yaml"
    OmegaConf.save(raw, path)
    cfg = load_config(path, [f"run.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.sample_every=0",
                             "export.enabled=false"])
    assert cfg.method.guidance_scale == 1.5 and cfg.method.num_steps == 1
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.roles["generator"].trainable_parameters()]
    logs = trainer.run_phase("generator", 0)
    assert logs["generator/loss"].isfinite()
    after = trainer.roles["generator"].trainable_parameters()
    assert any(not a.equal(b) for a, b in zip(before, after)), "the plugin's generator did not train"
    with pytest.raises(ValueError, match="guidance_scal"):  # the plugin's Config types the section as any method's
        load_config(path, [f"run.output_dir={tmp_path}", "method.guidance_scal=2"])


def test_a_broken_entry_point_names_itself_and_its_package(tmp_path, clean_registry):
    _distribution(tmp_path, "stepdistill-broken-plugin", {"broken": "stepdistill_no_such_module:Method"})
    sys.path.insert(0, str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        get_method("dmd2")
    message = str(err.value)
    assert "'broken' = 'stepdistill_no_such_module:Method'" in message
    assert "stepdistill-broken-plugin 0.1.0" in message and "ModuleNotFoundError" in message


def test_an_entry_point_to_something_else_is_refused(tmp_path, clean_registry):
    _distribution(tmp_path, "stepdistill-odd-plugin", {"odd": "stepdistill.methods.registry:ENTRY_POINT_GROUP"})
    sys.path.insert(0, str(tmp_path))
    with pytest.raises(RuntimeError, match="'odd'.*stepdistill-odd-plugin.*neither a module nor a DistillMethod"):
        all_methods()


def test_a_new_module_in_the_package_is_found_without_listing_it(tmp_path, clean_registry, monkeypatch):
    import stepdistill.methods as package

    (tmp_path / "zz_extra.py").write_text(
        "from stepdistill.methods.guidance import GuidanceDistillation\n"
        "from stepdistill.methods.registry import register\n\n\n"
        "@register\nclass Extra(GuidanceDistillation):\n    name = 'zz_extra'\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    assert get_method("zz_extra").__module__ == "stepdistill.methods.zz_extra"


def test_registering_is_idempotent_but_a_name_is_owned_by_one_class(clean_registry):
    dmd = get_method("dmd")
    assert register(dmd) is dmd  # the same class again: nothing happens

    class Impostor(dmd):
        name = "dmd"

    with pytest.raises(ValueError, match=r"method 'dmd' registered twice: stepdistill.methods.dmd.DMD and "):
        register(Impostor)
    assert get_method("dmd") is dmd
    with pytest.raises(TypeError, match="DistillMethod subclass"):
        register(object)
    with pytest.raises(ValueError, match=r"method.name='nope' is not a known method; choose one of: dmd, dmd2, "):
        get_method("nope")
