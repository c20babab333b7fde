"""VSD (SwiftBrush) and SiD: loss maths against hand values, config errors, guidance modes, export.

The registry contract (phases train the right roles, resume is exact) runs over both methods in
tests/test_methods_contract.py; this file checks what is specific to them.
"""

from __future__ import annotations

import json

import pytest
import torch

from stepdistill import lifecycle
from stepdistill.losses import sid_generator_loss, vsd_gradient, vsd_loss
from tests.helpers import tiny_config

# ---- loss maths ---------------------------------------------------------------------------------


def test_vsd_gradient_hand_values():
    eps_real = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    eps_fake = torch.tensor([[0.0, 1.0], [2.0, -2.0]])
    weight = torch.tensor([0.5, 0.25])  # w(t) per sample
    grad = vsd_gradient(eps_real, eps_fake, weight)
    assert torch.allclose(grad, torch.tensor([[0.5, 1.0], [-0.5, 0.5]]))


def test_vsd_loss_gradient_is_the_vsd_direction():
    x = torch.tensor([[1.0, 3.0]], requires_grad=True)
    eps_real, eps_fake = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    loss, grad = vsd_loss(x, eps_real, eps_fake, torch.tensor([0.5]))
    loss.backward()
    # g = 0.5 * [1, 2] = [0.5, 1]; d/dx 0.5 * mean((x - (x - g))^2) = g / N with N = 2
    assert torch.allclose(x.grad, torch.tensor([[0.25, 0.5]]))
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    assert torch.equal(grad, torch.tensor([[0.5, 1.0]]))


def test_sid_generator_loss_hand_value_and_gradients():
    x_g = torch.tensor([[0.0, 0.0]], requires_grad=True)
    real = torch.tensor([[1.0, 2.0]], requires_grad=True)
    fake = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss = sid_generator_loss(x_g, real, fake, alpha=1.2)
    # diff = real - fake = [1, 1]; per element (1 - 1.2) * diff^2 + diff * (fake - x_g) = [-0.2, 0.8];
    # weight w = mean|x_g - real| = 1.5 (no gradient); mean([-0.2, 0.8] / 1.5) = 0.2
    assert loss.item() == pytest.approx(0.2)
    loss.backward()
    n, w = 2, 1.5
    # dL/dx_g = -diff / (w N); dL/dreal = (2 (1 - a) diff + (fake - x_g)) / (w N);
    # dL/dfake = (-2 (1 - a) diff + (real - fake) - (fake - x_g)) / (w N)
    assert torch.allclose(x_g.grad, torch.tensor([[-1.0, -1.0]]) / (w * n))
    assert torch.allclose(real.grad, torch.tensor([[-0.4, 0.6]]) / (w * n))
    assert torch.allclose(fake.grad, torch.tensor([[1.4, 0.4]]) / (w * n))


def test_sid_generator_loss_alpha_and_per_sample_weight():
    x_g = torch.zeros(2, 1, 1, 2)
    real = torch.stack([torch.full((1, 1, 2), 1.0), torch.full((1, 1, 2), 4.0)])
    fake = real - 1.0
    # Sample 0: diff 1, fake - x_g = 0, w = 1 -> (1 - a); sample 1: diff 1, fake - x_g = 3, w = 4 -> ((1 - a) + 3) / 4
    for alpha in (0.5, 1.0, 1.2):
        expected = ((1 - alpha) + ((1 - alpha) + 3) / 4) / 2
        assert sid_generator_loss(x_g, real, fake, alpha).item() == pytest.approx(expected)
    # When the fake score equals the real one, the loss and its gradient vanish (at the fixed point).
    x = torch.randn(3, 4, requires_grad=True)
    r = torch.randn(3, 4)
    sid_generator_loss(x, r, r.clone()).backward()
    assert x.grad.abs().max().item() == 0.0


# ---- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, overrides, message", [
    ("vsd", ["method.weighting=snr"], "method.weighting='snr'; choose one of: sigma2, uniform"),
    ("vsd", ["method.min_t_frac=0.9", "method.max_t_frac=0.5"], "need 0 <= min < max <= 1"),
    ("vsd", ["method.regression_weight=0.25"], "regression_weight"),  # DMD's keys are not VSD's
    ("sid", ["method.guidance=negative"], "choose one of: cfg, zero_cfg, anti_cfg"),
    ("sid", ["method.guidance=zero_cfg"], "zero_cfg disables CFG"),
    ("sid", ["method.guidance=anti_cfg", "method.critic_guidance_scale=1"], "fake_guidance_scale < 1"),
    ("sid", ["method.num_steps=2", "method.generator_timesteps=[500,999]"], "strictly decreasing"),
])
def test_config_errors_name_the_key_and_the_fix(tmp_path, method, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tmp_path, method, *overrides)


def test_sid_gan_term_without_images_fails_before_models_load(tmp_path):
    from stepdistill.methods import get_method

    cfg = tiny_config(tmp_path, "sid", "method.gan_generator_weight=0.001")
    with pytest.raises(ValueError, match="need real data: set data.images"):
        get_method("sid").check_config(cfg)


def test_default_roles_follow_the_papers():
    from stepdistill.methods import get_method

    vsd = get_method("vsd").default_roles(get_method("vsd").Config())
    assert vsd["critic"].lora_rank == 64 and vsd["critic"].share_teacher_base  # SwiftBrush's LoRA teacher
    assert vsd["generator"].lora_rank == 0 and not vsd["teacher"].trainable
    sid = get_method("sid").default_roles(get_method("sid").Config())
    assert sid["critic"].lora_rank == 0 and sid["generator"].lr == sid["critic"].lr
    assert get_method("sid").Config().alpha == 1.2


# ---- behaviour on the tiny pipeline ---------------------------------------------------------------


def _generator_logs(tmp_path, method, *overrides):
    from stepdistill.harness.trainer import Trainer

    torch.manual_seed(0)
    trainer = Trainer(tiny_config(tmp_path, method, "train.sample_every=0", "export.enabled=false", *overrides))
    trainer._activate(("generator",))  # as the harness does in the generator phase
    return trainer, trainer.method.losses("generator", trainer.make_batch(0), 0)


def test_vsd_lora_critic_starts_as_the_teacher(tmp_path):
    # peft initialises LoRA B to zero: before any update the fake score IS the pretrained score, so the
    # unguided VSD gradient is exactly zero; a guided teacher makes it non-zero.
    _, plain = _generator_logs(tmp_path / "a", "vsd", "method.real_guidance_scale=1")
    assert plain["loss"].item() == 0.0 and plain["stats/vsd_grad_norm"].item() == 0.0
    _, guided = _generator_logs(tmp_path / "b", "vsd", "method.real_guidance_scale=3")
    assert guided["stats/vsd_grad_norm"].item() > 0.0


def test_sid_guidance_modes_change_the_fake_score(tmp_path):
    # The fake score starts as a copy of the teacher: with equal guidance the two scores agree exactly.
    _, same = _generator_logs(tmp_path / "cfg", "sid", "method.num_steps=1")
    assert same["stats/score_diff_abs"].item() == 0.0 and same["loss"].item() == 0.0
    zero = ["method.guidance=zero_cfg", "method.real_guidance_scale=1", "method.fake_guidance_scale=1",
            "method.critic_guidance_scale=1"]
    _, zero_cfg = _generator_logs(tmp_path / "zero", "sid", "method.num_steps=1", *zero)
    assert zero_cfg["stats/score_diff_abs"].item() > 0.0  # the fake score sees no text
    anti = ["method.guidance=anti_cfg", "method.real_guidance_scale=1", "method.fake_guidance_scale=-0.5",
            "method.critic_guidance_scale=1"]
    trainer, anti_cfg = _generator_logs(tmp_path / "anti", "sid", "method.num_steps=1", *anti)
    assert anti_cfg["stats/score_diff_abs"].item() > 0.0 and torch.isfinite(anti_cfg["loss"])
    # The SiD loss reaches the generator through the (frozen) score networks: it has a gradient.
    anti_cfg["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.roles["generator"].trainable_parameters())
    assert all(p.grad is None for p in trainer.roles["critic"].trainable_parameters())


@pytest.mark.parametrize("method, steps", [("sid", 2), ("vsd", 1)])
def test_export_loads_in_plain_diffusers_and_reproduces_the_sampler(tmp_path, method, steps):
    from diffusers import DiffusionPipeline

    from stepdistill.harness.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, method, f"method.num_steps={steps}", "train.max_steps=1",
                                  "train.sample_every=0", "train.checkpoint_every=10"))
    lifecycle.run(trainer)  # one step, so the student differs from the teacher; exports to <run>/export
    folder = tmp_path / "export"
    info = json.loads((folder / "stepdistill.json").read_text())
    assert info["method"] == method and info["num_inference_steps"] == steps
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    noise = torch.randn((1, *trainer.teacher.latent_shape(64)), generator=torch.Generator().manual_seed(0))
    ours = trainer.method.sample(noise, trainer.teacher.encode_prompt(["a red circle"]),
                                 generator=torch.Generator().manual_seed(1))
    out = pipe("a red circle", num_inference_steps=steps, guidance_scale=info["guidance_scale"], height=64,
               width=64, latents=noise, generator=torch.Generator().manual_seed(1), output_type="latent").images
    assert torch.allclose(out.float(), ours, atol=1e-4, rtol=1e-4)
    # ... and that sampler is the trained student, not the teacher.
    t0, cond = torch.full((1,), float(trainer.method.timesteps[0])), trainer.teacher.encode_prompt(["a red circle"])
    with torch.no_grad():
        student_x0 = trainer.roles["generator"].denoiser(noise, t0, cond, output="x0")
        teacher_x0 = trainer.roles["teacher"].denoiser(noise, t0, cond, output="x0")
    assert not torch.allclose(student_x0, teacher_x0, atol=1e-5), "one training step left the student unchanged"


@pytest.mark.parametrize("method, extra", [
    ("vsd", ["method.real_guidance_scale=3"]),
    # Zero-CFG: the text-free fake score differs from the teacher at once, so the first gradient is non-zero.
    ("sid", ["method.guidance=zero_cfg", "method.real_guidance_scale=1", "method.fake_guidance_scale=1",
             "method.critic_guidance_scale=1"]),
])
def test_flow_teacher_phases_run(tmp_path, method, extra):
    # Flow-matching teachers (SD3 family): the VSD gradient in noise space and SiD's x0-space loss both
    # come from the teacher's velocity through the schedule's conversions.
    from stepdistill.harness.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, method, "model.pretrained=tiny:sd3", "model.family=sd3",
                                  "method.num_steps=1", "train.sample_every=0", "export.enabled=false", *extra))
    for phase in trainer.method.phases(0):
        logs = trainer.run_phase(phase, 0)
        assert torch.isfinite(logs[f"{phase}/loss"]) and logs[f"grad_norm/{phase}"] > 0
