"""Guidance distillation and the w-input (time_cond_proj_dim) of UNet students."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from stepdistill import lifecycle
from stepdistill.harness.trainer import Trainer
from stepdistill.models.guidance import add_guidance_embedding, guidance_scale_embedding
from tests.helpers import tiny_config


def test_w_input_starts_as_the_teacher_and_round_trips(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from stepdistill.models import load_teacher

    teacher = load_teacher("tiny:sd15", family="sd15", device="cpu", dtype=torch.float32, resolution=64)
    unet = add_guidance_embedding(copy.deepcopy(teacher.backbone), 32)
    base, student = teacher.denoiser(), teacher.denoiser(unet)
    assert student.guidance_embedded and not base.guidance_embedded
    x = torch.randn(2, *teacher.latent_shape(64))
    t, cond = torch.tensor([600.0, 200.0]), teacher.encode_prompt(["a red circle", "a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, cond, guidance_scale=torch.tensor([2.0, 7.0])), base(x, t, cond))
        unet.time_embedding.cond_proj.weight.normal_(std=0.1)
        a = student(x, t, cond, guidance_scale=torch.tensor([2.0, 7.0]))
        b = student(x, t, cond, guidance_scale=2.0)
    assert torch.allclose(a[:1], b[:1], atol=1e-5) and not torch.allclose(a[1:], b[1:], atol=1e-3)
    # The embedding is the one the pipelines compute from guidance_scale (of w - 1).
    pipe_emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([6.0]), embedding_dim=32)
    torch.testing.assert_close(guidance_scale_embedding(torch.tensor([7.0]), 32), pipe_emb)
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert loaded.config.time_cond_proj_dim == 32
    torch.testing.assert_close(loaded.time_embedding.cond_proj.weight, unet.time_embedding.cond_proj.weight)
    with pytest.raises(ValueError, match="already takes a guidance embedding"):
        add_guidance_embedding(unet, 32)


def test_loss_is_the_distance_to_the_cfg_combined_teacher(tmp_path, monkeypatch):
    """At initialisation the student is the conditional teacher, so the loss is ||(w - 1)(c - u)||^2 / n."""
    trainer = Trainer(tiny_config(tmp_path, "guidance", "train.sample_every=0", "export.enabled=false"))
    method, teacher = trainer.method, trainer.teacher
    batch = trainer.make_batch(0)
    n = len(batch["cond"])
    x_t = torch.randn(n, *teacher.latent_shape(64))
    t = torch.full((n,), 500.0)
    w = torch.tensor([1.5, 4.0])
    monkeypatch.setattr(method, "_scales", lambda n: w)
    monkeypatch.setattr(method, "training_point", lambda batch, w: (x_t, t))
    loss = method.losses("generator", batch, 0)["loss"]
    d = teacher.denoiser()
    with torch.no_grad():
        c = d(x_t, t, batch["cond"], output="epsilon")
        u = d(x_t, t, batch["uncond"], output="epsilon")
    expected = (((w - 1).view(-1, 1, 1, 1) * (c - u)) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-7)
    assert expected > 0


def test_trajectory_points_follow_the_guided_teacher(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "guidance", "train.sample_every=0", "export.enabled=false",
                                  "method.trajectory_steps=3"))
    method = trainer.method
    batch = trainer.make_batch(0)
    torch.manual_seed(0)
    x, t = method.training_point(batch, torch.tensor([3.0, 3.0]))
    assert x.shape == (2, *trainer.teacher.latent_shape(64)) and t.shape == (2,) and t[0] == t[1]
    # The same draws by hand: t, the noise, then DDIM steps of the CFG teacher from the top down to t.
    torch.manual_seed(0)
    t_ref = method.schedule.sample_timesteps(1)
    x_ref = torch.randn_like(x)
    top = 999.0
    steps = -(-3 * (top - float(t_ref)) // top) if float(t_ref) < top else 0
    grid = torch.linspace(top, float(t_ref), int(steps) + 1).tolist()
    for a, b in zip(grid, grid[1:]):
        x_ref = method._ddim_step(x_ref, a, b, batch["cond"], batch["uncond"], torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(x, x_ref)


def test_export_honours_guidance_scale_in_one_pass(tmp_path):
    from diffusers import DiffusionPipeline

    cfg = tiny_config(tmp_path / "run", "guidance", "train.max_steps=2", "train.sample_every=0",
                      "roles.generator.lr=0.01")
    lifecycle.run(cfg)
    folder = tmp_path / "run" / "export"
    info = json.loads((folder / "stepdistill.json").read_text())
    assert info["guidance_scale"] == 3.0 and info["num_inference_steps"] == 2
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert pipe.unet.config.time_cond_proj_dim == 32
    batches = []
    pipe.unet.register_forward_hook(lambda m, args, kwargs, out: batches.append(args[0].shape[0]), with_kwargs=True)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="latent")
    low = pipe("a red circle", guidance_scale=2.0, generator=torch.Generator().manual_seed(0), **kwargs).images
    high = pipe("a red circle", guidance_scale=6.0, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert batches == [1, 1, 1, 1], "the pipeline doubled the batch for CFG"
    assert not torch.allclose(low, high, atol=1e-5), "guidance_scale did not reach the student"


@pytest.mark.parametrize("overrides, message", [
    (["roles.generator.lora_rank=4"], "adds a full-weight input layer"),
    (["roles.generator.guidance_embedding_dim=0"], "needs a student that takes the scale as input"),
    (["method.trajectory_steps=0"], "trains on noised real latents: set data.images"),
    (["method.guidance_min=0.5"], "need 1 <= guidance_min <= guidance_max"),
])
def test_config_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_config(tmp_path, "guidance", *overrides))


def test_one_scale_lora_student_exports_loadable_lora(tmp_path):
    cfg = tiny_config(tmp_path / "run", "guidance", "method.guidance_min=3.0", "method.guidance_max=3.0",
                      "roles.generator.lora_rank=4", "roles.generator.share_teacher_base=true",
                      "train.max_steps=1", "train.sample_every=0")
    trainer = Trainer(cfg)
    assert not trainer.roles["generator"].denoiser.guidance_embedded
    lifecycle.run(trainer)
    info = json.loads((tmp_path / "run" / "export" / "stepdistill.json").read_text())
    assert info["guidance_scale"] == 0.0 and info["lora"] == "lora"
    assert (tmp_path / "run" / "export" / "lora" / "pytorch_lora_weights.safetensors").is_file()
