"""One contract for every registered method (DESIGN.md, testing conventions).

For each method: each phase runs and returns a finite "loss"; the generator's parameters change;
the teacher stays bit-identical; the critic gets no gradient in the generator phase; and a run
saved and resumed gives the same weights and the same next losses as an uninterrupted run.
"""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch

from stepdistill import lifecycle
from stepdistill.harness.trainer import Trainer
from stepdistill.methods import DistillMethod
from stepdistill.methods.registry import all_methods, get_method
from tests.helpers import PYTHON, REPO, changed, run, snapshot, tiny_config

EXPORT_HOOKS = ("export_experts", "export_timesteps", "export_guidance_scale")

# Every registered method runs with its tiny config; extra cases switch on optional loss terms.
CASES = {name: name for name in sorted(all_methods())}
CASES["dmd2_gan"] = "dmd2"
CASES["dmd2_gan_toy"] = "dmd2"  # GAN against procedural toy images drawn on the fly
CASES["dmd2_lora_shared"] = "dmd2"  # LoRA generator and critic on the teacher's own frozen base
CASES["sid_gan_toy"] = "sid"  # SiD's optional Diffusion-GAN term against procedural toy images
CASES["sid_zero_cfg"] = "sid"  # Zero-CFG: unguided teacher, text-free fake score
CASES["lcm_lora"] = "lcm"  # LCM-LoRA: LoRA student, no w-embedding, the online student as target
CASES["phased_dmd_lora_shared"] = "phased_dmd"  # LoRA experts and critic: an MoE of adapters on one frozen base
CASES["pcm_sd3"] = "pcm"  # PCM on a flow-matching (SD3) teacher
CASES["scm_flux"] = "scm"  # sCM's JVP through a FLUX transformer (packed tokens, guidance embedding)
CASES["dmd2_ladd"] = "dmd2"  # DMD2 + the LADD term: heads on the frozen teacher's features, own phase
CASES["scm_ladd"] = "scm"  # sCM + LADD (SANA-Sprint): transformer-token heads on a flow teacher
CASES["pcm_ladd"] = "pcm"  # PCM + LADD term on the student's x0 prediction
CASES["vsd_ladd"] = "vsd"  # VSD + LADD: the heads read the teacher base with the critic's LoRA switched off
CASES["lcm_ladd"] = "lcm"  # LCM + LADD term on f_theta(x_t), with an EMA target role beside the heads
CASES["ladd_exact_r1"] = "ladd"  # non-saturating loss, exact R1 (double backward through the teacher)


@pytest.fixture(scope="session")
def teacher_pairs(tmp_path_factory):
    """Teacher (noise -> ODE output) pairs: DMD's regression data and the GAN's "real" samples."""
    from stepdistill.data.pairs import cache_pairs

    pairs = tmp_path_factory.mktemp("pairs")
    cfg = tiny_config(tmp_path_factory.mktemp("pairs_run"), "dmd")
    cache_pairs(cfg, pairs, num=4, steps=2, batch_size=2)
    return pairs


def _case(case, pairs) -> tuple[str, list[str]]:
    extra = {
        "dmd": [f"method.regression_pairs={pairs}"],
        "dmd2_gan": [f"data.images={pairs}", "method.gan_critic_weight=0.01", "method.gan_generator_weight=0.001"],
        "dmd2_gan_toy": ["data.images=builtin:toy", "method.gan_critic_weight=0.01",
                         "method.gan_generator_weight=0.001"],
        "dmd2_lora_shared": ["roles.generator.lora_rank=4", "roles.generator.share_teacher_base=true",
                             "roles.critic.lora_rank=4", "roles.critic.share_teacher_base=true",
                             "roles.critic.gradient_checkpointing=true"],
        "sid_gan_toy": ["data.images=builtin:toy", "method.gan_critic_weight=0.01",
                        "method.gan_generator_weight=0.001"],
        "sid_zero_cfg": ["method.guidance=zero_cfg", "method.real_guidance_scale=1", "method.fake_guidance_scale=1",
                         "method.critic_guidance_scale=1"],
        "lcm_lora": ["roles.generator.lora_rank=4", "method.w_embedding=false", "method.target_ema_decay=0"],
        "phased_dmd_lora_shared": [f"roles.{r}.{k}" for r in ("generator", "expert_1", "critic")
                                   for k in ("lora_rank=4", "share_teacher_base=true")],
        "pcm_sd3": ["model.pretrained=tiny:sd3", "model.family=sd3"],
        "scm_flux": ["model.pretrained=tiny:flux", "model.family=flux"],
        "dmd2_ladd": ["data.images=builtin:toy", "method.adversarial.weight=0.5", "method.adversarial.levels=[0,2]"],
        "scm_ladd": ["method.adversarial.weight=0.5"],
        "pcm_ladd": ["method.adversarial.weight=0.5", "method.adversarial.r1_weight=0.1"],
        "lcm_ladd": ["method.adversarial.weight=0.5"],
        "vsd_ladd": ["data.images=builtin:toy", "method.adversarial.weight=0.5"],
        "ladd_exact_r1": ["method.adversarial.loss=non_saturating", "method.adversarial.r1=exact",
                          "method.adversarial.r1_weight=1.0"],
    }
    return CASES[case], extra.get(case, [])


@pytest.mark.parametrize("case", sorted(CASES))
def test_phases_train_the_right_roles(case, tmp_path, teacher_pairs):
    method, extra = _case(case, teacher_pairs)
    cfg = tiny_config(tmp_path, method, "train.sample_every=0", "export.enabled=false", *extra)
    trainer = Trainer(cfg)
    roles = trainer.roles
    # The teacher's own weights (LoRA adapters that roles keep on its base are theirs, not the teacher's).
    teacher_before = {k: v for k, v in snapshot(trainer.teacher.backbone).items() if "lora_" not in k}
    phases = trainer.method.phases(0)
    assert "generator" in phases, f"{method}: step 0 must update the generator"
    for phase in phases:
        trained = set(trainer.method.phase_roles(phase))
        before = {name: _params(role) for name, role in roles.items() if role.trainable}
        head_before = {name: snapshot(role.head) for name, role in roles.items() if role.head is not None}
        seen_grads = {}

        def watch(name, role, record=seen_grads):
            # Record, before the optimizer clears them, which roles received gradients.
            def hook(*_):
                record[name] = any(p.grad is not None for p in role.trainable_parameters())
            return hook

        for name, role in roles.items():
            if role.trainable:
                trainer.optimizers[name].optimizer.register_step_pre_hook(watch(name, role))
        # EMA target roles (DistillMethod.ema_targets): frozen copies the harness moves after their source.
        target_before = {t: _module_params(roles[t]) for t in trainer.ema_targets}
        logs = trainer.run_phase(phase, 0)
        for target, (source, decay, *_) in trainer.ema_targets.items():
            after, src = _module_params(roles[target]), _module_params(roles[source])
            assert all(p.grad is None for p in roles[target].module.parameters()), f"{method}: {target} got gradients"
            if source in trained:
                expect = [decay * b + (1 - decay) * s for b, s in zip(target_before[target], src)]
                assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(after, expect)), (
                    f"{method}/{phase}: {target} is not the EMA ({decay}) of {source}")
                assert any(not torch.equal(a, b) for a, b in zip(after, target_before[target])), (
                    f"{method}/{phase}: EMA target {target} did not move")
            else:
                assert all(torch.equal(a, b) for a, b in zip(after, target_before[target]))
        assert torch.isfinite(logs[f"{phase}/loss"]), f"{method}/{phase}: loss {logs[f'{phase}/loss']}"
        for name, role in roles.items():
            if not role.trainable:
                continue
            diff = _changed_params(before[name], role)
            if name in trained:
                assert diff, f"{method}/{phase}: role {name} did not change"
                assert seen_grads.get(name), f"{method}/{phase}: role {name} got no gradient"
            else:
                assert not diff, f"{method}/{phase}: role {name} changed but is not trained in this phase: {diff[:3]}"
                assert all(p.grad is None for p in role.trainable_parameters()), (
                    f"{method}/{phase}: role {name} received gradients in a phase that does not train it")
            if name in head_before:
                assert bool(changed(head_before[name], role.head)) == (name in trained), (
                    f"{method}/{phase}: the GAN head of {name} must change exactly when {name} trains")
        if "_gan" in case:
            assert f"{phase}/gan" in logs, f"{phase} has no GAN term"
        if "ladd" in case and phase in ("generator", "discriminator"):
            assert f"{phase}/adversarial" in logs, f"{phase} has no LADD term"
        if "r1" in case and phase == "discriminator":
            assert logs["discriminator/r1"] > 0, "the R1 penalty is zero"
    assert not changed(teacher_before, trainer.teacher.backbone), f"{method}: the teacher changed"


def _module_params(role) -> list[torch.Tensor]:
    return [p.detach().clone() for p in role.module.parameters()]


def _params(role) -> list[torch.Tensor]:
    return [p.detach().clone() for p in role.trainable_parameters()]


def _changed_params(before: list[torch.Tensor], role) -> list[int]:
    return [i for i, (a, p) in enumerate(zip(before, role.trainable_parameters())) if not torch.equal(a, p)]


def _role_weights(trainer):
    return {name: _params(role) for name, role in trainer.roles.items() if role.trainable}


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.endswith("loss")} for r in rows}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_continues_exactly(case, tmp_path, teacher_pairs):
    method, extra = _case(case, teacher_pairs)
    common = ["train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.sample_every=0",
              "export.enabled=false", "roles.generator.ema_decay=0.9", *extra]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = Trainer(tiny_config(straight_dir, method, *common))
    lifecycle.run(straight)
    assert (straight_dir / "checkpoints" / "checkpoint-2").is_dir()
    assert (straight_dir / "checkpoints" / "checkpoint-4").is_dir()

    # A second run starts from the step-2 checkpoint of the first one.
    shutil.copytree(straight_dir / "checkpoints" / "checkpoint-2", resumed_dir / "checkpoints" / "checkpoint-2")
    resumed = Trainer(tiny_config(resumed_dir, method, *common, "train.resume=latest"))
    lifecycle.run(resumed)

    a, b = _losses(straight_dir), _losses(resumed_dir)
    assert sorted(b) == [2, 3], "the resumed run must log exactly the steps after the checkpoint"
    for step in (2, 3):
        assert a[step] == b[step], f"{method}: losses at step {step} differ after resume: {a[step]} vs {b[step]}"
    wa, wb = _role_weights(straight), _role_weights(resumed)
    for name in wa:
        assert not _changed_params(wa[name], resumed.roles[name]), f"{method}: {name} weights differ after resume"
    for target in straight.ema_targets:  # EMA target roles are checkpointed with the run
        assert all(torch.equal(x, y) for x, y in zip(_module_params(straight.roles[target]),
                                                     _module_params(resumed.roles[target]))), (
            f"{method}: EMA target {target} differs after resume")
    ema_a = straight.emas["generator"].shadow_params
    ema_b = resumed.emas["generator"].shadow_params
    assert all(torch.equal(x, y) for x, y in zip(ema_a, ema_b)), f"{method}: EMA differs after resume"
    assert wb  # at least one trainable role was compared


def test_every_method_exports_what_plain_diffusers_loads(tmp_path, teacher_pairs):
    """Each registered method's export is loaded and sampled, as its stepdistill.json says, by a process
    that never imports stepdistill."""
    folders = []
    for name in sorted(all_methods()):
        method, extra = _case(name, teacher_pairs)
        out = tmp_path / name
        lifecycle.run(tiny_config(out, method, "train.max_steps=1", "train.sample_every=0", *extra))
        folders.append(str(out / "export"))
    code = (
        "import json, sys\nfrom pathlib import Path\nimport diffusers\n"
        f"for folder in {folders!r}:\n"
        "    info = json.loads((Path(folder) / 'stepdistill.json').read_text())\n"
        "    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)\n"
        "    kwargs = {'timesteps': info['timesteps']} if info['timesteps'] else {}\n"
        "    image = pipe('a red circle', num_inference_steps=info['num_inference_steps'], height=64, width=64,\n"
        "                 guidance_scale=info['guidance_scale'], output_type='np', **kwargs).images[0]\n"
        "    assert image.shape == (64, 64, 3) and (Path(folder) / 'README.md').is_file()\n"
        "    print(info['method'], type(pipe).__name__, 'ok')\n"
        "assert 'stepdistill' not in sys.modules\n"
    )
    proc = run([PYTHON, "-c", code], cwd=REPO)
    loaded = {line.split()[0] for line in proc.stdout.splitlines() if line.endswith("Pipeline ok")}
    assert loaded == set(all_methods())


def test_every_method_module_is_discovered_in_a_fresh_process():
    """A fresh interpreter finds every module of stepdistill/methods that registers a method (no list)."""
    proc = run([PYTHON, "-c", "from stepdistill.methods import all_methods\n"
                "print(' '.join(sorted({c.__module__ for c in all_methods().values()})))"], cwd=REPO)
    found = set(proc.stdout.split())
    files = sorted((REPO / "stepdistill" / "methods").glob("*.py"))
    registering = {f"stepdistill.methods.{f.stem}" for f in files if "\n@register\n" in f.read_text()}
    assert found == registering and len(found) >= 8


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_export_hooks_are_declared_and_callable_with_defaults(name):
    cls = get_method(name)
    for hook in EXPORT_HOOKS:
        assert hook in vars(DistillMethod), f"DistillMethod declares no {hook}"
        # Overrides take nothing but self: the export calls them with no arguments.
        inspect.signature(getattr(cls, hook)).bind(object())
    for hook in EXPORT_HOOKS:
        assert getattr(DistillMethod, hook)(object()) is None  # the defaults: "nothing beyond the pipeline"
