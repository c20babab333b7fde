"""LADD and the adversarial term: loss maths, timestep sampling, the heads-only discriminator role,
the discriminator learning, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from stepdistill.losses import approximate_r1, hinge_discriminator_loss, hinge_generator_loss, r1_penalty
from stepdistill.methods.adversarial_term import AdversarialConfig, logit_normal_timesteps
from stepdistill.models import FlowSchedule, VPSchedule
from tests.helpers import snapshot, tiny_config


def test_hinge_losses_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])  # [B, levels]
    fake = torch.tensor([[-3.0, 0.5], [0.0, -0.5]])
    # relu(1 - real): [0, .5, 2, 1] -> mean .875; relu(1 + fake): [0, 1.5, 1, .5] -> mean .75
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.875 + 0.75)
    assert hinge_generator_loss(fake).item() == pytest.approx(-(-3.0 + 0.5 + 0.0 - 0.5) / 4)


def test_r1_penalties_by_hand():
    w = torch.tensor([1.0, -2.0, 2.0])
    x = torch.randn(4, 3, requires_grad=True)
    logits = x @ w  # D(x) = w.x: grad_x D = w, ||w||^2 = 9 for every row
    assert r1_penalty(logits, x).item() == pytest.approx(9.0)
    # Logits of the first two rows of a joint batch: the penalty averages over those rows only.
    assert r1_penalty(logits[:2], x, num_rows=2).item() == pytest.approx(9.0)
    # The penalty back-propagates (create_graph): d/dw of ||w||^2 is 2w.
    w2 = w.clone().requires_grad_(True)
    r1_penalty(x @ w2, x).backward()
    torch.testing.assert_close(w2.grad, 2 * w.detach())
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0])
    assert approximate_r1(a, b).item() == pytest.approx((0.25 + 1.0) / 2)


def test_logit_normal_timesteps():
    torch.manual_seed(0)
    vp = logit_normal_timesteps(VPSchedule(torch.linspace(0.999, 0.01, 1000)), 20000, 1.0, 1.0, "cpu")
    assert torch.equal(vp, vp.round()) and vp.min() >= 0 and vp.max() <= 999
    # The median of sigmoid(1 + n) is sigmoid(1): high noise is favoured.
    assert vp.median().item() == pytest.approx(999 / (1 + math.exp(-1)), abs=8)
    flow = logit_normal_timesteps(FlowSchedule(1000, shift=3.0), 20000, 0.0, 1.0, "cpu")
    assert 0 < flow.min() and flow.max() < 1000
    assert flow.median().item() == pytest.approx(500, abs=10)  # no shift applied


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "wasserstein"}, "method.adversarial.loss"),
    ({"r1": "full"}, "method.adversarial.r1"),
    ({"weight": -1.0}, "method.adversarial.weight"),
    ({"levels": []}, "method.adversarial.levels"),
])
def test_adversarial_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdversarialConfig(**kwargs)


def test_ladd_needs_real_latents_before_loading_models(tmp_path):
    from stepdistill.harness.trainer import Trainer

    with pytest.raises(ValueError, match="data.images"):
        Trainer(tiny_config(tmp_path, "ladd", "data.images=null"))
    with pytest.raises(ValueError, match=r"method.adversarial.weight.*data.images"):
        Trainer(tiny_config(tmp_path, "dmd2", "method.adversarial.weight=0.5"))
    with pytest.raises(ValueError, match="adversarial.weight must be > 0"):
        tiny_config(tmp_path, "ladd", "method.adversarial.weight=0")


def test_heads_only_role_errors():
    from stepdistill.config.schema import RoleConfig

    with pytest.raises(ValueError, match="heads_only"):
        RoleConfig(heads_only=True, lora_rank=4)


def test_discriminator_is_heads_on_the_teacher(tmp_path):
    """The discriminator role owns no backbone: its module is the teacher's, never wrapped; only its
    heads train, and they learn to tell real latents from generator samples."""
    from stepdistill.harness.trainer import Trainer

    cfg = tiny_config(tmp_path, "ladd", "train.sample_every=0", "export.enabled=false",
                      "method.adversarial.r1_weight=0", "roles.discriminator.lr=1e-3", "data.batch_size=4",
                      "method.adversarial.t_mean=-2")  # mostly low noise: a clear signal for a short test
    trainer = Trainer(cfg)
    disc = trainer.roles["discriminator"]
    assert disc.module is trainer.teacher.backbone and disc.wrapped is None
    assert {id(p) for p in disc.trainable_parameters()} == {id(p) for p in disc.head.parameters()}
    assert not any(p.requires_grad for p in trainer.teacher.backbone.parameters())
    teacher_before = snapshot(trainer.teacher.backbone)
    accuracy = []
    for step in range(30):  # discriminator phases only: the generator stays where it started
        logs = trainer.run_phase("discriminator", 2 * step + 1)
        accuracy.append(logs["discriminator/stats/adv_accuracy"].item())
    assert not any(not torch.equal(v, trainer.teacher.backbone.state_dict()[k]) for k, v in teacher_before.items())
    # Toy-image latents vs the untrained student's samples: the heads separate them.
    assert sum(accuracy[-10:]) / 10 > 0.9 > sum(accuracy[:5]) / 5, accuracy
    assert logs["discriminator/loss"].item() < 1.0


def test_multi_level_heads_project_the_prompt():
    from stepdistill.models.heads import MultiLevelHeads

    torch.manual_seed(0)
    heads = MultiLevelHeads([8, 16], ["conv", "conv"], hidden=4, cond_dim=6)
    feats = [torch.randn(3, 8, 4, 4), torch.randn(3, 16, 2, 2)]
    c = torch.randn(3, 6)
    logits = heads(feats, c)
    assert logits.shape == (3, 2)
    # By hand for level 1: w.h + b + <h, P c> / sqrt(hidden)
    h = heads.heads[1].embed(feats[1])
    out = heads.heads[1].net[-1]
    expect = (h @ out.weight.T).squeeze(-1) + out.bias + (h * heads.cond_proj[1](c)).sum(-1) / 2.0
    torch.testing.assert_close(logits[:, 1], expect)
    assert not torch.allclose(heads(feats, torch.randn(3, 6)), logits)  # the prompt changes the verdict
    with pytest.raises(ValueError, match="prompt vector"):
        heads(feats)
    with pytest.raises(ValueError, match="2 discriminator heads got 1"):
        heads(feats[:1], c)
