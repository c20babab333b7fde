"""Phased DMD (methods/phased_dmd.py, losses/subinterval.py, sampling/experts.py).

Hand-checked subinterval maths (kernel, critic target, weight), the stage schedule, config errors, and
the export: the folder loaded by diffusers with the shipped ``expert_switch.py`` reproduces
``method.sample``. The registry contract (phases, frozen roles, resume across a stage boundary, plain
diffusers export) runs in tests/test_methods_contract.py (cases ``phased_dmd``, ``phased_dmd_lora_shared``).
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from diffusers import DiffusionPipeline

from stepdistill import lifecycle
from stepdistill.harness.trainer import Trainer
from stepdistill.losses.subinterval import (
    kernel_coefficients,
    subinterval_diffuse,
    subinterval_weight,
    subinterval_x0_target,
)
from stepdistill.methods.phased_dmd import PhasedDMD, PhasedDMDConfig, stage_of, stage_starts
from tests.helpers import tiny_config


def _t(*values):
    return tuple(torch.tensor(float(v)) for v in values)


# ---- the subinterval kernel ----------------------------------------------------------------------

def test_kernel_coefficients_by_hand():
    # VP: s with (alpha, sigma) = (0.8, 0.6), t with (0.6, 0.8): r = 0.75, c^2 = 0.64 - 0.75^2 * 0.36 = 0.4375.
    r, c = kernel_coefficients(*_t(0.8, 0.6, 0.6, 0.8))
    assert r.item() == pytest.approx(0.75)
    assert c.item() ** 2 == pytest.approx(0.4375)
    # Rectified flow: sigma_s = 0.25, sigma_t = 0.5: r = 0.5 / 0.75, c^2 = 0.25 - (2/3)^2 / 16 = 2/9.
    r, c = kernel_coefficients(*_t(0.75, 0.25, 0.5, 0.5))
    assert r.item() == pytest.approx(2 / 3)
    assert c.item() ** 2 == pytest.approx(2 / 9)
    # Diffusing a known x_s with known noise: 0.75 * 2 + sqrt(0.4375) * (-1).
    x_t = subinterval_diffuse(torch.tensor([2.0]), torch.tensor([-1.0]), *_t(0.8, 0.6, 0.6, 0.8))
    assert x_t.item() == pytest.approx(1.5 - math.sqrt(0.4375))


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_composed_transitions_equal_the_marginal(kind):
    """0 -> s then s -> t has the mean and variance of 0 -> t (alpha_t x0, sigma_t^2): by hand and by sampling."""
    if kind == "vp":
        a_s, s_s = math.sqrt(0.7), math.sqrt(0.3)
        a_t, s_t = math.sqrt(0.2), math.sqrt(0.8)
    else:
        a_s, s_s, a_t, s_t = 0.7, 0.3, 0.2, 0.8
    r, c = kernel_coefficients(*_t(a_s, s_s, a_t, s_t))
    assert (r * a_s).item() == pytest.approx(a_t, rel=1e-6)
    assert (r**2 * s_s**2 + c**2).item() == pytest.approx(s_t**2, rel=1e-5)

    g = torch.Generator().manual_seed(0)
    n, x0 = 400_000, 1.5
    x_s = a_s * x0 + s_s * torch.randn(n, generator=g)
    x_t = subinterval_diffuse(x_s, torch.randn(n, generator=g), *_t(a_s, s_s, a_t, s_t))
    assert x_t.mean().item() == pytest.approx(a_t * x0, abs=5e-3)
    assert x_t.var().item() == pytest.approx(s_t**2, rel=1e-2)


# ---- the critic target ---------------------------------------------------------------------------

def test_critic_target_and_weight_by_hand():
    coeffs = _t(0.8, 0.6, 0.6, 0.8)
    # x0 target = (x_t - sigma_t^2 e / c) / alpha_t = (1 - 0.64 * 0.5 / sqrt(0.4375)) / 0.6
    got = subinterval_x0_target(torch.tensor([1.0]), torch.tensor([0.5]), *coeffs)
    assert got.item() == pytest.approx((1 - 0.64 * 0.5 / math.sqrt(0.4375)) / 0.6)
    # weight = c^2 / sigma_t^2 = 1 - SNR(t) / SNR(s) = 1 - (0.36 / 0.64) / (0.64 / 0.36)
    w = subinterval_weight(*coeffs).item()
    assert w == pytest.approx(0.4375 / 0.64)
    assert w == pytest.approx(1 - (0.36 / 0.64) / (0.64 / 0.36))
    # A clean s (alpha 1, sigma 0): the ordinary target x0 = (x_t - sigma_t e) / alpha_t, weight 1.
    x0, e = torch.tensor([0.3]), torch.tensor([-1.2])
    clean = _t(1.0, 0.0, 0.6, 0.8)
    x_t = subinterval_diffuse(x0, e, *clean)
    assert subinterval_x0_target(x_t, e, *clean).item() == pytest.approx(0.3, abs=1e-6)
    assert subinterval_weight(*clean).item() == pytest.approx(1.0)


def test_critic_target_regresses_to_the_posterior_mean():
    """For Gaussian data x0 ~ N(m, v) the best predictor of the target given x_t is E[x0 | x_t] =
    m + alpha_t v / (alpha_t^2 v + sigma_t^2) (x_t - alpha_t m); treating the noisy x_s as clean is not."""
    g = torch.Generator().manual_seed(0)
    n, m, v = 1_000_000, 0.5, 0.25
    a_s, s_s, a_t, s_t = math.sqrt(0.6), math.sqrt(0.4), math.sqrt(0.3), math.sqrt(0.7)
    x0 = m + math.sqrt(v) * torch.randn(n, generator=g, dtype=torch.float64)
    x_s = a_s * x0 + s_s * torch.randn(n, generator=g, dtype=torch.float64)
    e = torch.randn(n, generator=g, dtype=torch.float64)
    coeffs = tuple(torch.tensor(c, dtype=torch.float64) for c in (a_s, s_s, a_t, s_t))
    x_t = subinterval_diffuse(x_s.double(), e, *coeffs).double()
    target = subinterval_x0_target(x_t, e, *coeffs).double()

    def fit(y):  # least squares y ~ intercept + slope * x_t
        xc = x_t - x_t.mean()
        slope = (xc * (y - y.mean())).sum() / (xc * xc).sum()
        return (y.mean() - slope * x_t.mean()).item(), slope.item()

    slope = a_t * v / (a_t**2 * v + s_t**2)
    intercept = m - slope * a_t * m
    got_i, got_s = fit(target)
    assert got_s == pytest.approx(slope, abs=0.01)
    assert got_i == pytest.approx(intercept, abs=0.01)
    # The naive target (x_s taken as the clean sample) learns another function.
    _, naive = fit(x_s.double())
    assert abs(naive - slope) > 0.05


# ---- the stage schedule and config errors ------------------------------------------------------

def test_stage_schedule_is_a_function_of_the_step():
    starts = stage_starts(4, [3])
    assert starts == [0, 3, 6, 9]
    assert [stage_of(s, starts) for s in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    starts = stage_starts(3, [2, 5])
    assert starts == [0, 2, 7]
    assert [stage_of(s, starts) for s in (0, 1, 2, 6, 7, 100)] == [0, 0, 1, 1, 2, 2]


def test_phases_train_one_expert_per_stage_with_ttur(tmp_path):
    cfg = tiny_config(tmp_path, "phased_dmd", "method.num_steps=3", "method.steps_per_stage=[3,2]",
                      "method.critic_steps_per_generator_step=2", "train.max_steps=8", "export.enabled=false")
    trainer = Trainer(cfg)
    m = trainer.method
    assert set(trainer.roles) == {"generator", "expert_1", "expert_2", "critic", "teacher"}
    assert [m.phases(s) for s in range(8)] == [
        ["generator", "critic"], ["critic"], ["generator", "critic"],        # stage 0: steps 0-2
        ["expert_1", "critic"], ["critic"],                                  # stage 1: steps 3-4
        ["expert_2", "critic"], ["critic"], ["expert_2", "critic"],          # stage 2: to the end
    ]
    # Subintervals (lo, hi] of the three stages (timesteps 999, 666, 333; clip 0.02-0.98 of T=1000).
    assert m.timesteps == [999.0, 666.0, 333.0]
    # The clip is VPSchedule.sample_timesteps' (20..980 inclusive): stage 0 reaches 980, the last stage 20.
    assert m.t_ranges == [(666.0, 980.0), (333.0, 666.0), (19.0, 333.0)]
    for i, (lo, hi) in enumerate(m.t_ranges):
        t = m._sample_t(i, 20000)
        assert t.min().item() == lo + 1 and t.max().item() == hi and torch.equal(t, t.round())
    with pytest.raises(ValueError, match="does not train at step 3"):
        m.losses("generator", trainer.make_batch(3), 3)


@pytest.mark.parametrize("overrides, match", [
    (["method.steps_per_stage=[1,2,3]"], "method.steps_per_stage has 3 entries"),
    (["method.steps_per_stage=[0]"], "method.steps_per_stage"),
    (["method.num_steps=1"], "method.num_steps=1"),
    (["method.dmd_t_range=above"], "method.dmd_t_range"),
    (["method.transition=sde"], "method.transition='sde'; choose one of: ddim, renoise"),
])
def test_bad_config_values_name_the_key(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(tmp_path, "phased_dmd", *overrides)


def test_stages_longer_than_the_run_are_refused(tmp_path):
    cfg = tiny_config(tmp_path, "phased_dmd", "method.steps_per_stage=[4]", "train.max_steps=4")
    with pytest.raises(ValueError, match="train.max_steps=4"):
        PhasedDMD.check_config(cfg)
    PhasedDMD.check_config(tiny_config(tmp_path, "phased_dmd", "method.steps_per_stage=[3]", "train.max_steps=4"))


def test_config_defaults_are_valid():
    cfg = PhasedDMDConfig()
    assert cfg.num_steps == 4 and cfg.dmd_t_range == "subinterval" and cfg.transition == "renoise"


def test_ddim_transition_refuses_timesteps_its_scheduler_cannot_step(tmp_path):
    cfg = tiny_config(tmp_path, "phased_dmd", "method.generator_timesteps=[999,400]", "method.transition=ddim",
                      "export.enabled=false")
    with pytest.raises(ValueError, match="generator_timesteps=.*transition=ddim.*transition=renoise"):
        Trainer(cfg)
    cfg = tiny_config(tmp_path, "phased_dmd", "method.generator_timesteps=[999,400]", "method.transition=renoise",
                      "export.enabled=false")
    assert Trainer(cfg).method.timesteps == [999.0, 400.0]


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_untrained_ddim_mixture_is_the_teachers_ddim_sampler(tmp_path, family):
    """Before training (every expert = the teacher) the ddim-transition mixture is the teacher's own k-step
    deterministic sampler with the export's scheduler: training starts from it, not from a re-noising one."""
    cfg = tiny_config(tmp_path, "phased_dmd", f"model.pretrained=tiny:{family}", f"model.family={family}",
                      "method.transition=ddim", "export.enabled=false")
    trainer = Trainer(cfg)
    m, res = trainer.method, cfg.model.resolution
    pipe = trainer.teacher.pipeline
    original = pipe.scheduler
    pipe.scheduler = m.export_scheduler()
    try:
        noise = torch.randn((1, *trainer.teacher.latent_shape(res)), generator=torch.Generator().manual_seed(0))
        ours = m.sample(noise, trainer.teacher.encode_prompt(["a red circle"]))
        theirs = pipe("a red circle", num_inference_steps=m.num_inference_steps, guidance_scale=1.0, height=res,
                      width=res, latents=noise, output_type="latent").images.float()
    finally:
        pipe.scheduler = original
    assert type(m.export_scheduler()).__name__ == ("DDIMScheduler" if family == "sd15"
                                                   else "FlowMatchEulerDiscreteScheduler")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---- export ----------------------------------------------------------------------------------------

def _shipped_switch(folder):
    spec = importlib.util.spec_from_file_location("expert_switch_under_test", folder / "expert_switch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ExpertSwitch


LORA_SHARED = [f"roles.{r}.{k}" for r in ("generator", "expert_1", "critic")
               for k in ("lora_rank=4", "share_teacher_base=true")]


@pytest.mark.parametrize("family, extra", [
    # full-weight SD 1.5 experts: also exported and loaded by test_methods_contract's every-method export
    pytest.param("sd15", [], marks=pytest.mark.slow),
    ("sd15", LORA_SHARED),  # LoRA experts on one base: each merged into its own UNet folder
    ("sd3", []),            # flow teacher: the s -> t kernel of rectified flow, transformer experts
    ("sd15", ["method.transition=ddim"]),  # deterministic DDIM transitions: exported with a DDIMScheduler
    ("sd3", ["method.transition=ddim"]),   # ... and deterministic flow Euler
], ids=["sd15", "sd15_lora_shared", "sd3", "sd15_ddim", "sd3_ddim"])
def test_export_with_expert_switch_reproduces_the_sampler(tmp_path, family, extra):
    cfg = tiny_config(tmp_path / "run", "phased_dmd", "train.sample_every=0", f"model.pretrained=tiny:{family}",
                      f"model.family={family}", *extra)
    trainer = Trainer(cfg)
    lifecycle.run(trainer)  # stage 0 then stage 1: both experts differ from the teacher and from each other
    folder = tmp_path / "run" / "export"
    info = json.loads((folder / "stepdistill.json").read_text())
    backbone = trainer.teacher.backbone_name
    assert info["experts"] == {"backbone": backbone, "subfolders": ["expert_1"],
                               "timesteps": trainer.method.timesteps, "helper": "expert_switch.py"}
    assert (folder / "expert_1" / "config.json").is_file()
    card = (folder / "README.md").read_text()
    assert "callback_on_step_end=switch" in card and "ExpertSwitch.from_folder" in card

    pipe = DiffusionPipeline.from_pretrained(folder)
    renoise = "method.transition=ddim" not in extra
    expected = {("sd15", False): "DDIMScheduler", ("sd15", True): "LCMScheduler"}.get(
        (family, renoise), "FlowMatchEulerDiscreteScheduler")
    assert type(pipe.scheduler).__name__ == expected
    if family == "sd3":
        assert pipe.scheduler.config.stochastic_sampling is renoise
    switch = _shipped_switch(folder).from_folder(pipe, folder)
    res, prompt = cfg.model.resolution, "a blue square"
    cond = trainer.teacher.encode_prompt([prompt])
    # SD3 pipelines draw the re-noising noise from the global RNG, SD pipelines from `generator`.
    global_rng = family == "sd3"
    # The trained steps, and (VP) more steps routed to the expert of each subinterval. (The SD3 export's
    # shift_terminal is that of the trained step count, so other counts run other timesteps than
    # method.sample(num_steps=...): as for every re-noising flow export.)
    for steps in ((2,) if global_rng else (2, 4)):
        noise = torch.randn((1, *trainer.teacher.latent_shape(res)), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        ours = trainer.method.sample(noise, cond, num_steps=steps,
                                     generator=None if global_rng else torch.Generator().manual_seed(1))

        def run(steps=steps, noise=noise, **kwargs):
            torch.manual_seed(1)
            return pipe(prompt, num_inference_steps=steps, guidance_scale=info["guidance_scale"], height=res,
                        width=res, latents=noise, generator=torch.Generator().manual_seed(1), output_type="latent",
                        **kwargs).images.float()

        out = run(callback_on_step_end=switch)
        assert torch.allclose(out, ours, atol=1e-4, rtol=1e-4), (
            f"{steps} steps: export differs from the sampler by {(out - ours).abs().max():.3g}")
        assert getattr(pipe, backbone) is switch.backbones[0], "the switch must put expert 0 back after the last step"
        if extra is not LORA_SHARED:  # (two tiny LoRA updates from B = 0 move the latents by < 1e-3)
            # Without the switch the pipeline runs expert 0 at every step: another result.
            assert not torch.allclose(run(), ours, atol=1e-3)
    if family == "sd15" and extra is not LORA_SHARED:
        # The usage snippet of stepdistill.json runs as written, without stepdistill, from the folder holding
        # the export (it names the export by its folder name: no local path is recorded).
        from tests.helpers import PYTHON, run

        code = info["usage"] + "\nimport sys\nassert 'stepdistill' not in sys.modules\nprint(type(image).__name__)\n"
        assert str(tmp_path) not in code
        assert run([PYTHON, "-c", code], cwd=folder.parent).stdout.strip().endswith("Image")
    # The experts are different networks (each LoRA merged into its own folder).
    w0, w1 = (dict(b.named_parameters()) for b in switch.backbones)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_bench_runs_every_expert_of_the_export(tmp_path):
    """``stepdistill bench`` runs a mixture-of-experts export with its ExpertSwitch (expert i at step i),
    and refuses it where one network per call is assumed (a hybrid's student, fast=true)."""
    from stepdistill.bench import runner as bench_runner
    from stepdistill.bench import spec as bench_spec
    from stepdistill.sampling.experts import SwitchedPipeline

    cfg = tiny_config(tmp_path / "run", "phased_dmd", "train.sample_every=0")
    lifecycle.run(cfg)
    folder = str(tmp_path / "run" / "export")
    settings = bench_spec.make_settings({"batch_sizes": [1], "runs": 1, "warmup": 0, "quality": "none", "device": "cpu",
                                    "out": str(tmp_path / "bench")})
    entry = bench_spec.parse_entry(f"{folder} steps=2 guidance=0")[0]
    runner = bench_runner.build_runner(entry, settings, bench_runner.PipelineCache(torch.device("cpu"), torch.float32))
    assert isinstance(runner.pipe, SwitchedPipeline)
    prompts = ["a blue square", "a red circle"]
    images = runner(prompts, seed=3)

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def call(**kwargs):
        gens = [torch.Generator().manual_seed(3 + i) for i in range(2)]
        return pipe(prompts, num_inference_steps=2, guidance_scale=0.0, height=runner.resolution,
                    width=runner.resolution, generator=gens, output_type="pt", **kwargs).images

    torch.testing.assert_close(images, call(callback_on_step_end=_shipped_switch(tmp_path / "run" / "export")
                                            .from_folder(pipe, folder)), atol=1e-5, rtol=0)
    assert (images - call()).abs().max() > 1e-4  # expert 0 alone is another sampler
    for text in (f"hybrid teacher=tiny:sd15 student={folder} teacher_steps=1 steps=2", f"{folder} fast=true"):
        with pytest.raises(ValueError, match="is a mixture of experts"):
            bench_spec.validate(bench_spec.parse_entry(text), settings)
    # A compiled entry: the pipeline's backbone is a torch.compile wrapper; the other experts load as the
    # module class under it and are compiled by the bench too (compilation itself is lazy: nothing runs here).
    compiled = bench_spec.parse_entry(f"{folder} steps=2 guidance=0 compile=true")[0]
    runner = bench_runner.build_runner(compiled, settings, bench_runner.PipelineCache(torch.device("cpu"), torch.float32))
    backbones = runner.pipe.switch.backbones
    assert len(backbones) == 2 and all(hasattr(b, "_orig_mod") for b in backbones)
    assert type(backbones[1]._orig_mod) is type(pipe.unet)
