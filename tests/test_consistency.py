"""The consistency family (LCM, LCM-LoRA, PCM, sCM): loss maths against hand values and diffusers'
own components, the sCM JVP against finite differences, exports that reproduce the method's sampler
in plain diffusers (LoRA via load_lora_weights), and config errors.

The registry contract (phases, roles, EMA target, resume) is in test_methods_contract.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from stepdistill import lifecycle
from stepdistill.losses.consistency import (
    consistency_distance,
    lcm_boundary_scalings,
    scm_loss,
    scm_tangent,
    trigflow_to_flow,
)
from tests.helpers import PYTHON, REPO, run, tiny_config


# ---- pure maths -----------------------------------------------------------------------------------
def test_lcm_boundary_scalings_match_lcm_scheduler():
    from diffusers import LCMScheduler

    sched = LCMScheduler(timestep_scaling=10.0)
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = lcm_boundary_scalings(torch.tensor([float(t)]))
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip.item() == pytest.approx(float(ref_skip), rel=1e-6)
        assert c_out.item() == pytest.approx(float(ref_out), rel=1e-6)
    # By hand: t = 1, scaling 10 -> c_skip = 0.25 / 100.25, c_out = 10 / sqrt(100.25); boundary f(x, 0) = x.
    c_skip, c_out = lcm_boundary_scalings(torch.tensor([1.0, 0.0]))
    assert c_skip.tolist() == pytest.approx([0.25 / 100.25, 1.0])
    assert c_out.tolist() == pytest.approx([10 / math.sqrt(100.25), 0.0])


def test_guidance_embedding_matches_the_pipelines():
    from diffusers import StableDiffusionPipeline

    from stepdistill.models.guidance import guidance_scale_embedding

    w = torch.tensor([0.0, 0.5, 7.0])  # LCM's omega = guidance scale - 1
    ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    assert torch.allclose(guidance_scale_embedding(w + 1, 32), ref, atol=1e-6)
    assert guidance_scale_embedding(w + 1, 33).shape == (3, 33)


def test_consistency_distance_by_hand():
    a, b = torch.zeros(2, 4), torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # pseudo-Huber per sample: sqrt(25 + c^2) - c and 0; mean over the batch.
    assert consistency_distance(a, b, "pseudo_huber", c=1.0).item() == pytest.approx((math.sqrt(26) - 1) / 2)
    assert consistency_distance(a, b, "l2").item() == pytest.approx(25 / 8)
    with pytest.raises(ValueError, match="pseudo_huber, l2"):
        consistency_distance(a, b, "lpips")


def test_trigflow_is_rectified_flow_after_the_change_of_variables():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    t, sd = torch.tensor([0.1, 0.8, 1.5]), 0.5
    x_trig = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * sd * eps
    a, s = trigflow_to_flow(t, sd)
    assert torch.allclose(x_trig / a[:, None], (1 - s)[:, None] * x0 + s[:, None] * eps, atol=1e-6)
    _, s_end = trigflow_to_flow(torch.tensor([0.0, math.pi / 2]), sd)
    assert s_end.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


def test_scm_tangent_and_loss_by_hand():
    # One sample, one element: t = pi/4 -> cos^2 = cos sin = 1/2; sigma_d = 1.
    t = torch.tensor([math.pi / 4])
    f_minus, df, dx, x = (torch.tensor([[v]]) for v in (2.0, 1.0, 0.5, 3.0))
    # r = 0: g = -(1/2)(2 - 0.5) = -0.75, normalised by |g| + c = 0.75 + 0.25.
    g = scm_tangent(f_minus, df, dx, x, t, sigma_data=1.0, warmup=0.0, c=0.25)
    assert g.item() == pytest.approx(-0.75 / 1.0)
    # r = 1: g = -0.75 - (1/2 * 3 + 1 * 1) = -3.25, normalised by 3.25 + 0.25.
    g = scm_tangent(f_minus, df, dx, x, t, sigma_data=1.0, warmup=1.0, c=0.25)
    assert g.item() == pytest.approx(-3.25 / 3.5)
    # Loss ||F - F^- - g||^2 with F = F^-: g^2; its gradient w.r.t. F is -2 g.
    f = f_minus.clone().requires_grad_(True)
    loss = scm_loss(f, f_minus, g)
    loss.backward()
    assert loss.item() == pytest.approx(g.item() ** 2)
    assert f.grad.item() == pytest.approx(-2 * g.item())


# ---- methods on tiny pipelines --------------------------------------------------------------------
def _trainer(tmp_path, method, *overrides):
    from stepdistill.harness.trainer import Trainer

    cfg = tiny_config(tmp_path, method, "train.sample_every=0", *overrides)
    return Trainer(cfg)


def test_scm_jvp_matches_finite_differences(tmp_path):
    """sCM's tangent cos(t) sin(t) dF/dt from torch.func.jvp equals a finite difference along the PF-ODE,
    and the TrigFlow view of the flow student has f(x_t, t) = cos t x_t - sin t sigma_d F = its x0."""
    from stepdistill.methods.scm import _bare_denoiser
    from stepdistill.models.denoiser import math_attention

    trainer = _trainer(tmp_path, "scm", "export.enabled=false")
    m = trainer.method
    trainer.roles["generator"].module.double()  # float64 weights: a central difference with h = 1e-4 is exact enough
    torch.manual_seed(0)
    cond = trainer.teacher.encode_prompt(["a red circle", "a blue square"]).to(dtype=torch.float64)
    sd = m.cfg.sigma_data
    x_t = torch.randn(2, *m.teacher.latent_shape(64), dtype=torch.float64) * 0.7
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    den = _bare_denoiser(trainer.roles["generator"])

    def f(xs, tt):
        return m._trig_velocity(den, xs * sd, tt, cond) / sd

    v_x, v_t = torch.randn_like(x_t), torch.ones(2, dtype=torch.float64)
    h = 1e-4
    with torch.no_grad(), math_attention():
        out, tangent = torch.func.jvp(f, (x_t / sd, t), (v_x, v_t))
        fd = (f(x_t / sd + h * v_x, t + h * v_t) - f(x_t / sd - h * v_x, t - h * v_t)) / (2 * h)
        x0 = torch.cos(t).view(-1, 1, 1, 1) * x_t - torch.sin(t).view(-1, 1, 1, 1) * sd * out
        a, s = trigflow_to_flow(t, sd)
        x0_flow = den(x_t / a.view(-1, 1, 1, 1), s * 1000, cond, output="x0")
    scale = fd.abs().max().item()
    assert (tangent - fd).abs().max().item() < 2e-3 * scale
    assert (tangent - fd).abs().max().item() < 0.05 * (tangent - out).abs().max().item()  # not trivially equal
    assert torch.allclose(x0.float(), x0_flow.float(), atol=1e-4)


@pytest.mark.parametrize("method,steps", [("lcm", 2), ("pcm", 2), ("scm", 2)])
def test_export_reproduces_the_sampler(tmp_path, method, steps):
    """The exported pipeline (its own scheduler, the recorded guidance scale) gives the latents of
    ``method.sample`` for the same seed: what the student was trained for is what users run."""
    from diffusers import DiffusionPipeline

    trainer = _trainer(tmp_path, method, "train.max_steps=1", "train.checkpoint_every=100")
    lifecycle.run(trainer)
    export = tmp_path / "export"
    info = json.loads((export / "stepdistill.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(str(export))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square"]
    m = trainer.method
    noise = torch.randn((2, *m.teacher.latent_shape(64)), generator=torch.Generator().manual_seed(0))
    # SD3 pipelines draw the re-noising noise from the global RNG, SD pipelines from `generator`.
    flow = m.teacher.family == "sd3"
    torch.manual_seed(1)
    ours = m.sample(noise, m.teacher.encode_prompt(prompts), num_steps=steps,
                    generator=None if flow else torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=info["guidance_scale"], height=64, width=64,
               latents=noise, generator=torch.Generator().manual_seed(1), output_type="latent").images
    assert out.shape == ours.shape
    assert torch.allclose(out.float(), ours, atol=1e-4), (out.float() - ours).abs().max()
    assert info["num_inference_steps"] == steps


def test_lcm_w_embedding_starts_as_the_teacher(tmp_path):
    """The new time_cond_proj layer is zero-initialised: the student equals the teacher at step 0, for
    any guidance embedding, and the UNet config records time_cond_proj_dim."""
    trainer = _trainer(tmp_path, "lcm", "export.enabled=false")
    m = trainer.method
    unet = trainer.roles["generator"].module
    assert unet.config.time_cond_proj_dim == m.cfg.time_cond_proj_dim
    assert trainer.roles["target"].module.config.time_cond_proj_dim == m.cfg.time_cond_proj_dim
    torch.manual_seed(0)
    x = torch.randn(2, *m.teacher.latent_shape(64))
    cond = trainer.teacher.encode_prompt(["a", "b"])
    t = torch.tensor([500.0, 100.0])
    with torch.no_grad():
        ref = trainer.roles["teacher"].denoiser(x, t, cond, output="x0")
        ours = trainer.roles["generator"].denoiser(x, t, cond, output="x0", **m._w_cond(torch.tensor([3.0, 7.0])))
    assert torch.allclose(ref, ours, atol=1e-5)


def test_exports_load_in_plain_diffusers(tmp_path, tiny_pipeline_dir):
    """LCM (w-conditioned, LCMScheduler), LCM-LoRA (load_lora_weights on the teacher + LCMScheduler),
    PCM (DDIM over the phase edges) and sCM (flow re-noising): loaded by a process that never imports
    stepdistill, and the LoRA on the teacher gives the same images as the merged export."""
    runs = {}
    for name, method, extra in [("lcm", "lcm", []), ("pcm", "pcm", []), ("scm", "scm", []),
                                ("lcm_lora", "lcm", ["roles.generator.lora_rank=4", "method.w_embedding=false",
                                                     "method.target_ema_decay=0"])]:
        out = tmp_path / name
        trainer = _trainer(out, method, "train.max_steps=1", "train.checkpoint_every=100", "roles.generator.lr=0.01",
                           *extra)
        if name == "lcm_lora":
            lifecycle.run(trainer)  # a trained LoRA (its B matrices start at zero), then the export
        else:
            lifecycle.export_student(trainer)  # the export's loading and scheduler are checked here; sampling equality above
        runs[name] = out / "export"
    code = f"""
import json, sys, torch, diffusers
runs = {json.dumps({k: str(v) for k, v in runs.items()})}
def gen(pipe, steps, gs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=steps, guidance_scale=gs, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]
for name in ("lcm", "pcm", "scm"):
    info = json.load(open(runs[name] + "/stepdistill.json"))
    pipe = diffusers.DiffusionPipeline.from_pretrained(runs[name])
    # (SD3 exports set shift_terminal for their trained step count: other counts are not a regular grid.)
    for steps in ((2,) if name == "scm" else (1, 2, 4)):
        img = gen(pipe, steps, info["guidance_scale"])
        assert img.shape == (64, 64, 3) and (img == img).all()
    print(name, type(pipe.scheduler).__name__, getattr(pipe.unet.config, "time_cond_proj_dim", None)
          if hasattr(pipe, "unet") else None, info["guidance_scale"])
merged = diffusers.DiffusionPipeline.from_pretrained(runs["lcm_lora"])
teacher = diffusers.StableDiffusionPipeline.from_pretrained({str(tiny_pipeline_dir("sd15"))!r})
teacher.load_lora_weights(runs["lcm_lora"] + "/lora")
teacher.scheduler = diffusers.LCMScheduler.from_config(merged.scheduler.config)
a, b = gen(merged, 2, 0.0), gen(teacher, 2, 0.0)
print("lora_vs_merged", float(abs(a - b).max()))
assert "stepdistill" not in sys.modules
"""
    proc = run([PYTHON, "-c", code], cwd=REPO)
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["lcm"].startswith("LCMScheduler 32 ")  # tiny_lcm: time_cond_proj_dim 32, w-embedding on
    assert lines["pcm"].startswith("DDIMScheduler")
    assert lines["scm"].startswith("FlowMatchEulerDiscreteScheduler")
    assert float(lines["lora_vs_merged"]) < 1e-3


# ---- config errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("method,overrides,match", [
    ("lcm", ["data.images=null"], "data.images"),
    ("lcm", ["roles.generator.lora_rank=4", "method.w_embedding=false"], "target_ema_decay=0"),
    ("lcm", ["roles.generator.lora_rank=4", "method.target_ema_decay=0"], "w_embedding=false"),
    ("lcm", ["method.w_min=5", "method.w_max=2"], "w_min"),
    ("pcm", ["method.num_phases=0"], "num_phases"),
    ("scm", ["method.p_std=0"], "p_std"),
    ("scm", ["method.max_t=2.0"], "max_t"),
])
def test_config_errors_before_any_model_loads(tmp_path, method, overrides, match):
    from stepdistill.harness.preflight import validate_paths

    with pytest.raises(ValueError, match=match):
        validate_paths(tiny_config(tmp_path, method, *overrides))  # what train.py runs before loading models


@pytest.mark.parametrize("method,pretrained,family,match", [
    ("scm", "tiny:sd15", "sd15", "flow-matching teacher"),
    ("lcm", "tiny:sd3", "sd3", "flow teacher"),
])
def test_wrong_teacher_kind_is_refused(tmp_path, method, pretrained, family, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, method, f"model.pretrained={pretrained}", f"model.family={family}",
                 "export.enabled=false", "method.w_embedding=false" if method == "lcm" else "train.log_every=1")
