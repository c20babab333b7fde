"""Roles: copies, LoRA adapters on a shared frozen base, adapter switching, merging for export."""

from __future__ import annotations

import pytest
import torch

from stepdistill.config.schema import RoleConfig
from stepdistill.methods.score import gan_head
from stepdistill.models import load_teacher
from stepdistill.models.lora import merged_copy
from stepdistill.models.roles import build_roles
from tests.helpers import snapshot


@pytest.fixture()
def teacher():
    return load_teacher("tiny:sd15")


def _inputs(teacher, n=2, res=64):
    torch.manual_seed(0)
    x = torch.randn(n, *teacher.latent_shape(res))
    t = torch.full((n,), 500.0)
    return x, t, teacher.encode_prompt(["a red circle"] * n)


def _perturb_lora(module, adapter, value):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name and f".{adapter}." in name:
                p.fill_(value)


def test_lora_roles_share_the_teachers_base(teacher):
    x, t, cond = _inputs(teacher)
    with torch.no_grad():
        reference = teacher.denoiser()(x, t, cond, output="x0")
    base_before = snapshot(teacher.backbone)
    lora = dict(lora_rank=4, share_teacher_base=True)
    roles = build_roles(teacher, {
        "generator": RoleConfig(**lora), "critic": RoleConfig(**lora), "teacher": RoleConfig(trainable=False),
    }, heads={}, device=torch.device("cpu"))
    assert roles["generator"].module is teacher.backbone is roles["critic"].module  # one copy of the base
    _perturb_lora(teacher.backbone, "generator", 0.01)
    _perturb_lora(teacher.backbone, "critic", -0.02)
    with torch.no_grad():
        out_teacher = roles["teacher"].denoiser(x, t, cond, output="x0")
        out_gen = roles["generator"].denoiser(x, t, cond, output="x0")
        out_critic = roles["critic"].denoiser(x, t, cond, output="x0")
    assert torch.equal(out_teacher, reference), "adapters must be off for the teacher"
    assert not torch.allclose(out_gen, reference) and not torch.allclose(out_critic, reference)
    assert not torch.allclose(out_gen, out_critic), "each role must run its own adapter"
    # Switching adapters leaves requires_grad to the harness.
    assert all(p.requires_grad for p in roles["generator"].trainable_parameters())
    roles["generator"].set_requires_grad(False)
    with torch.no_grad():
        roles["critic"].denoiser(x, t, cond, output="x0")
    assert not any(p.requires_grad for p in roles["generator"].trainable_parameters())
    # The frozen base itself is untouched: peft moved wrapped weights under `.base_layer`.
    after = teacher.backbone.state_dict()
    for key, value in base_before.items():
        prefix, leaf = key.rsplit(".", 1)
        new_key = key if key in after else f"{prefix}.base_layer.{leaf}"
        assert torch.equal(after[new_key], value), key
    # Merging the generator adapter gives a plain model with the same output.
    merged = merged_copy(teacher.backbone, "generator")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        out_merged = teacher.denoiser(merged)(x, t, cond, output="x0")
    assert torch.allclose(out_merged, out_gen, atol=1e-5)


def test_full_copy_role_is_independent_float32(teacher):
    seen = []

    def head(denoiser):  # a method's head factory gets the role's own backbone as a Denoiser
        seen.append(denoiser.backbone)
        return gan_head(denoiser)

    roles = build_roles(teacher, {"generator": RoleConfig(), "teacher": RoleConfig(trainable=False)},
                        heads={"generator": head}, device=torch.device("cpu"))
    gen = roles["generator"]
    assert gen.module is not teacher.backbone
    assert seen == [gen.module]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in gen.module.parameters())
    assert gen.head is not None and all(p.requires_grad for p in gen.head.parameters())
    assert gen.head.in_channels == teacher.backbone.config.block_out_channels[-1]  # sized for the bottleneck
    assert not any(p.requires_grad for p in teacher.backbone.parameters())


def test_bad_role_configs(teacher, tmp_path):
    with pytest.raises(ValueError, match="teacher is the frozen reference"):
        build_roles(teacher, {"teacher": RoleConfig(trainable=True)}, {}, torch.device("cpu"))
    with pytest.raises(ValueError, match="not a UNet2DConditionModel folder"):
        build_roles(teacher, {"generator": RoleConfig(init_from=str(tmp_path))}, {}, torch.device("cpu"))
    with pytest.raises(ValueError, match="role head 'gan' is not callable"):
        build_roles(teacher, {"generator": RoleConfig()}, {"generator": "gan"}, torch.device("cpu"))
    with pytest.raises(ValueError, match="lora_target_modules"):
        build_roles(teacher, {"generator": RoleConfig(lora_rank=2, lora_target_modules=["nope"])}, {},
                    torch.device("cpu"))


def _lora_grads(teacher, checkpointing: bool):
    x, t, cond = _inputs(teacher)
    roles = build_roles(teacher, {
        "generator": RoleConfig(lora_rank=4, share_teacher_base=True, gradient_checkpointing=checkpointing),
        "critic": RoleConfig(lora_rank=4, share_teacher_base=True),
        "teacher": RoleConfig(trainable=False),
    }, heads={}, device=torch.device("cpu"))
    torch.manual_seed(1)
    for name in ("generator", "critic"):
        for p in roles[name].trainable_parameters():
            torch.nn.init.normal_(p, std=0.05)
    roles["critic"].set_requires_grad(False)
    out = roles["generator"].denoiser(x, t, cond, output="x0")
    # Other roles run on the same base before backward (as in DMD's generator phase).
    with torch.no_grad():
        roles["teacher"].denoiser(x, t, cond, output="x0")
        roles["critic"].denoiser(x, t, cond, output="x0")
    out.square().mean().backward()
    return [p.grad.clone() for p in roles["generator"].trainable_parameters()]


def test_gradient_checkpointing_recomputes_with_the_right_adapter():
    plain = _lora_grads(load_teacher("tiny:sd15"), checkpointing=False)
    checkpointed = _lora_grads(load_teacher("tiny:sd15"), checkpointing=True)
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_a_roles_lr_schedule_spans_its_own_updates(tmp_path):
    """Under TTUR the generator updates every 2nd iteration (tiny_dmd2): a linear decay over 10 iterations
    reaches zero at the generator's 5th update, not half way."""
    from stepdistill.harness.trainer import Trainer
    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path, "dmd2", "train.max_steps=10", "roles.generator.lr_scheduler=linear",
                      "roles.critic.lr_scheduler=linear")
    trainer = Trainer(cfg)
    lrs = {}
    for name, updates in (("generator", 5), ("critic", 10)):
        sched = trainer.schedulers[name]
        for _ in range(updates - 1):
            sched.step()
        lrs[name] = sched.get_last_lr()[0]
        sched.step()
        assert sched.get_last_lr()[0] == 0.0, name  # the last update's schedule ends here
    assert lrs["generator"] == pytest.approx(cfg.roles.generator.lr / 5)
    assert lrs["critic"] == pytest.approx(cfg.roles.critic.lr / 10)
