"""Config loading: every shipped config, lookup by name, overrides, errors as users see them, the CLIs."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stepdistill import cli
from stepdistill.config.load import (
    CONFIGS_DIR,
    list_configs,
    resolve_config_path,
    to_dataclass,
)
from stepdistill.config.schema import Config, RoleConfig
from stepdistill.harness.preflight import validate_paths
from stepdistill.methods.registry import get_method
from stepdistill.runconfig import load_config
from stepdistill.train import main

REPO = Path(__file__).resolve().parents[1]
# Training configs (configs/bench/ holds `stepdistill bench` entry lists, tested with the bench).
ALL_CONFIGS = sorted(p for p in CONFIGS_DIR.rglob("*.yaml") if p.relative_to(CONFIGS_DIR).parts[0] != "bench")
TINY = "tiny_dmd2"


def dryrun(capsys, *args: str):
    """Run ``train.py --dryrun`` in-process; returns the printed config, parsed."""
    assert main(["--config", *args, "--dryrun"]) == 0
    return OmegaConf.create(capsys.readouterr().out)


def user_error(capsys, argv, entry=main) -> str:
    """A CLI user error: exit status 2, ``error: ...`` on stderr, no traceback. Returns stderr."""
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


# ---- every shipped config ------------------------------------------------------------------------


def test_configs_exist():
    names = {p.relative_to(CONFIGS_DIR).as_posix() for p in ALL_CONFIGS}
    for required in ("base.yaml", "dmd2_sd15.yaml", "dmd2_sdxl.yaml", "dmd2_sdxl_1step.yaml",
                     "dmd2_sdxl_4step_lora.yaml", "dmd_sd15.yaml", "tests/tiny_dmd2.yaml", "tests/tiny_dmd.yaml"):
        assert required in names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.relative_to(CONFIGS_DIR).as_posix())
def test_every_config_dryruns(capsys, path):
    cfg = dryrun(capsys, str(path))
    assert set(cfg) >= {"run", "model", "data", "train", "export", "roles", "method"}
    assert "base" not in cfg
    assert "${" not in OmegaConf.to_yaml(cfg)  # interpolations resolved
    # Every role of the method, fully resolved (all RoleConfig keys), e.g. the frozen teacher.
    # (e.g. LCM's EMA "target" and no critic; guidance distillation: generator and teacher only)
    expected = get_method(cfg.method.name).default_roles(OmegaConf.to_object(load_config(str(path)).method))
    assert set(cfg.roles) == set(expected) and {"generator", "teacher"} <= set(cfg.roles)
    for role in cfg.roles.values():
        assert set(role) == set(RoleConfig.__dataclass_fields__)
    assert cfg.roles.teacher.trainable is False
    # The same config by its bare name.
    name = path.relative_to(CONFIGS_DIR).with_suffix("").as_posix()
    assert resolve_config_path(path.stem).resolve() == path.resolve()
    assert load_config(name).run.name == cfg.run.name


def test_recipe_values(capsys):
    sdxl = load_config("dmd2_sdxl")
    assert list(sdxl.method.generator_timesteps) == [999, 749, 499, 249]
    assert sdxl.method.real_guidance_scale == 8.0 and sdxl.method.critic_steps_per_generator_step == 5
    one = load_config("dmd2_sdxl_1step")  # inherits dmd2_sdxl through `base:`
    assert list(one.method.generator_timesteps) == [399] and one.method.num_steps == 1
    assert one.roles.generator.lr == sdxl.roles.generator.lr == 5e-7
    lora = load_config("dmd2_sdxl_4step_lora")
    assert lora.roles.generator.lora_rank == 64 and lora.roles.critic.share_teacher_base is True
    sd15 = load_config("dmd2_sd15")
    assert sd15.method.real_guidance_scale == 1.75 and sd15.method.critic_steps_per_generator_step == 10
    dmd = load_config("dmd_sd15")
    assert dmd.method.name == "dmd" and dmd.method.regression_weight == 0.25
    assert dmd.method.real_guidance_scale == 3.0


def test_dryrun_subprocess_with_override(tmp_path):
    """As a user runs it: `python train.py --config NAME --dryrun key=value`, from another directory."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", TINY, "--dryrun", "train.max_steps=7"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.train.max_steps == 7
    assert "max_steps: 7" in proc.stdout


# ---- lookup --------------------------------------------------------------------------------------


def test_lookup_by_name_path_and_suffix(tmp_path, monkeypatch):
    target = (CONFIGS_DIR / "tests" / "tiny_dmd2.yaml").resolve()
    for spec in ("tiny_dmd2", "tiny_dmd2.yaml", "tests/tiny_dmd2", "configs/tests/tiny_dmd2.yaml", str(target)):
        monkeypatch.chdir(tmp_path)
        assert resolve_config_path(spec).resolve() == target, spec
    assert "tests/tiny_dmd2" in list_configs() and "dmd2_sdxl" in list_configs()


def test_missing_config_suggests_near_names(capsys):
    with pytest.raises(ValueError, match=r"not found.*Did you mean: .*tiny_dmd2") as exc:
        resolve_config_path("tiny_dmd3")
    assert str(CONFIGS_DIR) in str(exc.value)
    err = user_error(capsys, ["--config", "dmd2_sdx", "--dryrun"])
    assert "dmd2_sdxl" in err


def test_configs_dir_env(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("base: tiny_dmd2\ntrain:\n  max_steps: 3\n")
    (tmp_path / "tiny_dmd2.yaml").write_text((CONFIGS_DIR / "tests" / "tiny_dmd2.yaml").read_text())
    monkeypatch.setenv("STEPDISTILL_CONFIGS", str(tmp_path))
    assert resolve_config_path("mine") == tmp_path / "mine.yaml"
    assert load_config("mine").train.max_steps == 3
    with pytest.raises(ValueError, match="dmd2_sdxl.*not found|not found"):
        resolve_config_path("dmd2_sdxl")  # only the env folder is searched by name


def test_base_inheritance_and_errors(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny_dmd2\nrun:\n  name: child\nroles:\n  critic:\n    lr: 3.0e-6\n")
    cfg = load_config(str(child))
    assert cfg.run.name == "child" and cfg.run.output_dir == "runs/tests/child"  # interpolation after merge
    assert cfg.roles.critic.lr == 3e-6 and cfg.roles.generator.lr == 1e-4  # role keys merge, not replace
    assert cfg.train.max_steps == 4
    # base given relative to the child file
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\ntrain:\n  max_steps: 9\n")
    assert load_config(str(tmp_path / "grandchild.yaml")).run.name == "child"
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(str(a))
    (tmp_path / "orphan.yaml").write_text("base: no_such_config\n")
    with pytest.raises(ValueError, match="orphan.yaml: base: config 'no_such_config' not found"):
        load_config(str(tmp_path / "orphan.yaml"))


def test_empty_sections_set_nothing(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("base: tiny_dmd2\ntrain:\nmethod:\nroles:\n  critic:\n")
    cfg = load_config(str(f))
    assert cfg.train.max_steps == 4 and cfg.method.num_steps == 2 and cfg.roles.critic.lr == 1e-4


def test_interpolation_between_roles():
    cfg = load_config(TINY, ["roles.critic.lr=${roles.generator.lr}", "roles.generator.lr=0.5"])
    assert cfg.roles.critic.lr == 0.5


def test_bad_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="could not parse config file"):
        load_config(str(f))
    g = tmp_path / "list.yaml"
    g.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(str(g))


# ---- overrides -----------------------------------------------------------------------------------


def test_overrides_change_values_and_types(capsys):
    cfg = dryrun(capsys, TINY, "train.max_steps=7", "roles.critic.lr=1e-6", "run.trackers=[none]",
                 "run.name=other", "method.real_guidance_scale=4", "data.images=null")
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.roles.critic.lr == 1e-6 and cfg.roles.generator.lr == 1e-4
    assert cfg.method.real_guidance_scale == 4.0 and isinstance(cfg.method.real_guidance_scale, float)
    assert cfg.run.output_dir == "runs/tests/other"
    # overrides may come before options too
    assert main(["train.max_steps=5", "--config", TINY, "--dryrun"]) == 0
    assert OmegaConf.create(capsys.readouterr().out).train.max_steps == 5


def test_overrides_without_a_file():
    cfg = load_config(None, ["model.pretrained=tiny:sd15", "data.prompts=builtin:tiny"])
    assert cfg.method.name == "dmd2" and cfg.roles.teacher.trainable is False
    with pytest.raises(ValueError, match="model.pretrained is required"):
        load_config(None, ["data.prompts=builtin:tiny"])


def test_method_switch_by_override():
    cfg = load_config(TINY, ["method.name=dmd", "method.regression_weight=0"])
    assert cfg.method.name == "dmd" and OmegaConf.get_type(cfg.method).__name__ == "DMDConfig"


def test_to_dataclass():
    obj = to_dataclass(load_config(TINY))
    assert isinstance(obj, Config)
    assert type(obj.method).__name__ == "DMD2Config" and isinstance(obj.roles["critic"], RoleConfig)
    assert obj.roles["teacher"].trainable is False


# ---- user errors ---------------------------------------------------------------------------------


def test_wrong_type_names_key_and_type(capsys):
    err = user_error(capsys, ["--config", TINY, "--dryrun", "train.max_steps=abc"])
    assert "train.max_steps" in err and "'abc'" in err and "expected int" in err
    with pytest.raises(ValueError, match=r"roles.critic.lr='fast'.*expected float"):
        load_config(TINY, ["roles.critic.lr=fast"])
    with pytest.raises(ValueError, match=r"roles.critic.betas\[0\]='a'.*expected float"):
        load_config(TINY, ["roles.critic.betas=[a,0.9]"])
    with pytest.raises(ValueError, match="run.trackers.*expected list of str"):
        load_config(TINY, ["run.trackers=wandb"])
    with pytest.raises(ValueError, match="train in command-line overrides must be a section with keys.*max_steps"):
        load_config(TINY, ["train=5"])


def test_unknown_key_top_level_and_nested(capsys):
    err = user_error(capsys, ["--config", TINY, "--dryrun", "train.max_stepz=1"])
    assert "'train.max_stepz'" in err and "did you mean train.max_steps" in err
    assert "valid keys of train:" in err and "checkpoint_every" in err
    with pytest.raises(ValueError, match=r"unknown config key 'trainer'.*valid top-level sections: run, model"):
        load_config(TINY, ["trainer.max_steps=1"])
    with pytest.raises(ValueError, match=r"'method.guidance'.*valid keys of method: name, num_steps"):
        load_config(TINY, ["method.guidance=3"])
    with pytest.raises(ValueError, match=r"'roles.critic.learning_rate'.*valid keys of roles.critic:.*lora_rank"):
        load_config(TINY, ["roles.critic.learning_rate=1"])


def test_list_entries_are_checked_and_named():
    cfg = load_config("toy/dmd2", ["eval.teacher_baselines=[{steps: 2, guidance: 1.5}]"])
    assert [dict(row) for row in cfg.eval.teacher_baselines] == [{"steps": 2, "guidance": 1.5}]
    with pytest.raises(ValueError, match=r"'eval.teacher_baselines\[\].step'.*did you mean "
                                         r"eval.teacher_baselines\[\].steps\?.*: steps, guidance"):
        load_config("toy/dmd2", ["eval.teacher_baselines=[{step: 1}]"])
    with pytest.raises(ValueError, match=r"eval.teacher_baselines entry steps=0.*need steps >= 1"):
        load_config("toy/dmd2", ["eval.teacher_baselines=[{steps: 0}]"])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("base: tiny_dmd2\ndata:\n  batchsize: 4\n")
    with pytest.raises(ValueError, match=r"'data.batchsize' in config file .*typo.yaml.*did you mean data.batch_size"):
        load_config(str(f))


def test_unknown_method_lists_valid(capsys):
    err = user_error(capsys, ["--config", TINY, "--dryrun", "method.name=dmd3"])
    assert "method.name='dmd3'" in err and "dmd2" in err and "dmd," in err


def test_unknown_role(tmp_path):
    with pytest.raises(ValueError, match=r"unknown role roles.discriminator.*has roles: generator, critic, teacher"):
        load_config(TINY, ["roles.discriminator.lr=1"])
    f = tmp_path / "r.yaml"
    f.write_text("base: tiny_dmd2\nroles:\n  critc:\n    lr: 1.0\n")
    with pytest.raises(ValueError, match=r"roles.critc in config file .*r.yaml \(did you mean roles.critic\?\)"):
        load_config(str(f))


def test_invalid_choices(capsys):
    err = user_error(capsys, ["--config", TINY, "--dryrun", "train.mixed_precision=fp8"])
    assert "train.mixed_precision='fp8'" in err and "bf16" in err and "fp16" in err
    with pytest.raises(ValueError, match=r"model.family='sd99'.*auto, sd15, sd2, sdxl, sd3, flux"):
        load_config(TINY, ["model.family=sd99"])
    with pytest.raises(ValueError, match=r"method.num_steps=0 must be >= 1"):
        load_config(TINY, ["method.num_steps=0"])


def test_role_checks_name_the_role():
    with pytest.raises(ValueError, match=r"roles.critic.share_teacher_base=true needs lora_rank > 0"):
        load_config(TINY, ["roles.critic.share_teacher_base=true"])


def test_interpolation_error():
    with pytest.raises(ValueError, match=r"interpolation in run.output_dir.*run.nam"):
        load_config(TINY, ["run.output_dir=runs/${run.nam}"])


def test_non_override_arguments_rejected(capsys):
    err = user_error(capsys, ["--config", TINY, "--dryrun", "max_steps"])
    assert "key=value" in err
    err = user_error(capsys, ["--config", TINY, "--dryrun", "--max-steps", "3"])
    assert "unrecognized arguments: --max-steps" in err
    user_error(capsys, ["--dryrun"])  # --config is required


# ---- paths ---------------------------------------------------------------------------------------


def test_validate_paths_missing_prompts(capsys, tmp_path):
    cfg = load_config(TINY, [f"data.prompts={tmp_path}/missing.txt"])
    with pytest.raises(ValueError, match=r"data.prompts=.*missing.txt.*file not found"):
        validate_paths(cfg)
    # train.py (no --dryrun) reports it as a user error before loading any model
    err = user_error(capsys, ["--config", TINY, f"data.prompts={tmp_path}/missing.txt"])
    assert "missing.txt" in err


def test_validate_paths_other_paths(tmp_path):
    with pytest.raises(ValueError, match="data.images=.*folder not found"):
        validate_paths(load_config(TINY, [f"data.images={tmp_path}/nope"]))
    with pytest.raises(ValueError, match="unknown builtin prompt set"):
        validate_paths(load_config(TINY, ["data.prompts=builtin:huge"]))
    with pytest.raises(ValueError, match="roles.generator.init_from=.*not found"):
        validate_paths(load_config(TINY, [f"roles.generator.init_from={tmp_path}/unet"]))
    with pytest.raises(ValueError, match="method.regression_pairs=.*stepdistill cache-pairs"):
        validate_paths(load_config("tiny_dmd", [f"method.regression_pairs={tmp_path}/pairs"]))


def test_validate_paths_checks_the_model(monkeypatch):
    from stepdistill.harness import preflight

    calls = []
    monkeypatch.setattr(preflight, "check_pretrained",
                        lambda pretrained, family: calls.append((pretrained, family)) or "sd15")
    monkeypatch.setattr(preflight, "check_resolution",
                        lambda pretrained, resolution, revision: calls.append(("resolution", resolution)))
    assert validate_paths(load_config(TINY)) == "sd15"
    assert calls == [("tiny:sd15", "sd15"), ("resolution", 64)]


def test_validate_paths_real_tiny_model():
    """The real check on the tiny pipeline (built in a cache folder, no download)."""
    assert validate_paths(load_config(TINY)) == "sd15"


# ---- the stepdistill CLI -------------------------------------------------------------------------


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "export", "cache-pairs", "bench-train"):
        assert command in out


def test_cli_train_dryrun_and_errors(capsys):
    assert cli.main(["train", "--config", TINY, "--dryrun", "train.max_steps=6"]) == 0
    assert OmegaConf.create(capsys.readouterr().out).train.max_steps == 6
    err = user_error(capsys, ["train", "--config", TINY, "--dryrun", "train.max_stepz=1"], entry=cli.main)
    assert "train.max_stepz" in err


def _fake_module(monkeypatch, name: str, **attrs):
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_cli_export_dispatch(monkeypatch, capsys, tmp_path):
    calls = []
    _fake_module(monkeypatch, "stepdistill.export.pipeline",
                 export_from_run=lambda path, out, dtype, use_ema, **kw: calls.append(
                     (str(path), out, dtype, use_ema, kw)) or out,
                 check_export_target=lambda out: out)
    assert cli.main(["export", "runs/x", "--out", str(tmp_path), "--dtype", "fp16", "--no-ema"]) == 0
    no_extras = dict(lora_only=False, variant=None, repo_id=None, license_=None, allow_nonfinite=False,
                     lora_format="diffusers")
    assert calls == [("runs/x", str(tmp_path), "fp16", False, no_extras)]
    assert cli.main(["export", "runs/x", "--out", str(tmp_path), "--lora", "--variant", "bf16",
                     "--license", "mit", "--format", "comfyui"]) == 0
    assert calls[-1] == ("runs/x", str(tmp_path), "fp32", True,
                         dict(lora_only=True, variant="bf16", repo_id=None, license_="mit", allow_nonfinite=False,
                              lora_format="comfyui"))
    capsys.readouterr()
    user_error(capsys, ["export", "runs/x", "--out", "o", "--dtype", "int8"], entry=cli.main)
    assert "--out DIR is required" in user_error(capsys, ["export", "runs/x"], entry=cli.main)
    err = user_error(capsys, ["export", "runs/x", "--out", "o", "--private"], entry=cli.main)
    assert "--private only applies with --push-to-hub" in err
    assert len(calls) == 2  # the errors stopped before any export


def test_cli_cache_pairs_dispatch(monkeypatch, tmp_path):
    calls = []
    _fake_module(monkeypatch, "stepdistill.data.pairs",
                 cache_pairs=lambda cfg, out, num, steps, batch_size: calls.append(
                     (cfg.method.name, cfg.train.max_steps, out, num, steps, batch_size)) or out)
    _fake_module(monkeypatch, "stepdistill.models.loading", check_pretrained=lambda p, f: "sd15",
                 check_resolution=lambda p, r, rev: None)
    out = str(tmp_path / "pairs")
    # the pairs folder named by the config need not exist yet: it is what this command writes
    assert cli.main(["cache-pairs", "--config", "tiny_dmd", "--out", out, "--num", "8", "--steps", "4",
                     "train.max_steps=3"]) == 0
    assert calls == [("dmd", 3, out, 8, 4, 2)]  # batch size defaults to data.batch_size
    assert cli.main(["cache-pairs", "--config", "tiny_dmd", "--out", out, "--num", "8", "--batch-size", "5"]) == 0
    assert calls[-1] == ("dmd", 4, out, 8, 50, 5)


def test_cli_bench_train_passes_arguments(monkeypatch):
    seen = []
    _fake_module(monkeypatch, "stepdistill.bench.train_step", main=lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench-train", "--config", TINY, "--steps", "3", "--foo"]) == 0
    assert seen == [["--config", TINY, "--steps", "3", "--foo"]]


def test_schema_lists_every_lr_scheduler_of_diffusers():
    from diffusers.optimization import SchedulerType

    from stepdistill.config.schema import LR_SCHEDULERS

    assert sorted(LR_SCHEDULERS) == sorted(s.value for s in SchedulerType)
