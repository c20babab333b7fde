"""Every supported family end to end on its tiny random pipeline: detection, loading, prompts, Denoiser, VAE."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from stepdistill.models import (
    FAMILIES,
    TINY_RESOLUTION,
    Conditioning,
    Denoiser,
    GANHead,
    build_tiny_pipeline,
    check_pretrained,
    detect_family,
    load_teacher,
    read_model_index,
    resolve_pretrained,
)
from stepdistill.models.denoiser import CONDITIONING_KEYS, latent_image_ids, pack_latents, unpack_latents
from tests.helpers import free_port

OUTPUT_TYPES = ("x0", "epsilon", "v_prediction", "flow")
NATIVE = {"sd15": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon", "sd3": "flow", "flux": "flow"}
PROMPTS = ["a red circle", "a blue square at the top left", "two green triangles"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def teacher(family, tiny_pipeline_dir):
    return load_teacher(str(tiny_pipeline_dir(family)), resolution=TINY_RESOLUTION[family])


@pytest.fixture(scope="module")
def inputs(teacher):
    """A batch of noisy latents, timesteps and (un)conditioning for the teacher's family."""
    g = torch.Generator().manual_seed(0)
    shape = (len(PROMPTS), *teacher.latent_shape(TINY_RESOLUTION[teacher.family]))
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor(teacher.schedule.timesteps_for_steps(4)[1:])  # away from the pure-noise end
    x_t = teacher.schedule.add_noise(x0, noise, t)
    return x_t, t, teacher.encode_prompt(PROMPTS), teacher.encode_negative(len(PROMPTS))


def raw_backbone(teacher, x_t, t, cond: Conditioning, guidance: float | None = None) -> torch.Tensor:
    """The backbone called by hand, the way each diffusers pipeline calls it in its denoising loop."""
    c, backbone = cond.tensors, teacher.backbone
    with torch.no_grad():
        if teacher.family in ("sd15", "sd2"):
            return backbone(x_t, t, encoder_hidden_states=c["encoder_hidden_states"]).sample
        if teacher.family == "sdxl":
            added = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}
            return backbone(
                x_t, t, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added
            ).sample
        if teacher.family == "sd3":
            return backbone(
                hidden_states=x_t,
                timestep=t,
                encoder_hidden_states=c["encoder_hidden_states"],
                pooled_projections=c["pooled_projections"],
            ).sample
        b, ch, h, w = x_t.shape
        out = backbone(
            hidden_states=FluxPipeline._pack_latents(x_t, b, ch, h, w),
            timestep=t / 1000,
            guidance=torch.full((b,), guidance),
            pooled_projections=c["pooled_projections"],
            encoder_hidden_states=c["encoder_hidden_states"],
            txt_ids=torch.zeros(c["encoder_hidden_states"].shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
        ).sample
        # _unpack_latents takes pixel sizes; with vae_scale_factor=1 they are the latent sizes.
        return FluxPipeline._unpack_latents(out, h, w, 1)


# ---- detection (no weights) ----------------------------------------------------------------------
def test_check_pretrained_reads_only_the_index(family, tiny_pipeline_dir, tmp_path):
    assert check_pretrained(str(tiny_pipeline_dir(family))) == family
    # Only model_index.json and the scheduler config are needed: no weights are loaded.
    (tmp_path / "scheduler").mkdir()
    shutil.copy(tiny_pipeline_dir(family) / "model_index.json", tmp_path)
    shutil.copy(tiny_pipeline_dir(family) / "scheduler" / "scheduler_config.json", tmp_path / "scheduler")
    assert check_pretrained(str(tmp_path)) == family
    assert check_pretrained(f"tiny:{family}") == family
    assert resolve_pretrained(f"tiny:{family}") == str(tiny_pipeline_dir(family))


def test_forced_family(tiny_pipeline_dir):
    sd15 = str(tiny_pipeline_dir("sd15"))
    assert check_pretrained(sd15, "sd15") == "sd15"
    assert check_pretrained(sd15, "sd2") == "sd2", "SD 1.x and 2.x share a pipeline class: forcing is allowed"
    with pytest.raises(ValueError, match=r"model.family='flux'.*StableDiffusionPipeline.*auto or sd15"):
        check_pretrained(sd15, "flux")
    with pytest.raises(ValueError, match="sdxl"):
        load_teacher(str(tiny_pipeline_dir("sd3")), family="sdxl")
    with pytest.raises(ValueError, match="not valid"):
        check_pretrained(sd15, "sd4")


def test_folder_without_model_index_is_a_clear_error(tmp_path, tiny_pipeline_dir):
    shutil.copytree(tiny_pipeline_dir("sd15") / "unet", tmp_path / "unet")
    with pytest.raises(ValueError, match="not a diffusers pipeline folder \\(no model_index.json\\)"):
        check_pretrained(str(tmp_path / "unet"))


def test_unknown_pipeline_class_lists_supported_families(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError, match="KandinskyV22Pipeline") as err:
        check_pretrained(str(tmp_path))
    for name in FAMILIES:
        assert name in str(err.value)
    assert (
        detect_family({"_class_name": "StableDiffusionPipeline"}, {"prediction_type": "v_prediction"})
        == "sd2"
    )
    assert detect_family({"_class_name": "StableDiffusionPipeline"}) == "sd15"


def test_hub_and_path_errors_offline():
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        read_model_index("stepdistill-tests/no-such-model")
    with pytest.raises(ValueError, match="neither an existing local folder nor a valid"):
        read_model_index("/no/such/folder/anywhere")
    with pytest.raises(ValueError, match="unknown tiny family"):
        resolve_pretrained("tiny:sd4")
    assert resolve_pretrained("org/model") == "org/model"


def test_build_is_deterministic(tmp_path, tiny_pipeline_dir):
    from safetensors.torch import load_file

    build_tiny_pipeline("sd15", tmp_path / "again", seed=0)
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tiny_pipeline_dir("sd15") / name), load_file(tmp_path / "again" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the loaded teacher --------------------------------------------------------------------------
def test_teacher_is_frozen_and_generates(teacher, family):
    assert teacher.family == family
    assert teacher.backbone_name == ("unet" if family in ("sd15", "sd2", "sdxl") else "transformer")
    assert teacher.prediction_type == NATIVE[family]
    assert teacher.schedule.kind == ("flow" if family in ("sd3", "flux") else "vp")
    for component in teacher.pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training
            assert not any(p.requires_grad for p in component.parameters())
    res = TINY_RESOLUTION[family]
    image = teacher.pipeline(
        "a red circle", num_inference_steps=2, height=res, width=res, output_type="np"
    ).images
    assert image.shape == (1, res, res, 3)


def test_encode_prompt_shapes(teacher, family):
    cond = teacher.encode_prompt(PROMPTS)
    assert tuple(cond.keys()) == CONDITIONING_KEYS[family] and len(cond) == len(PROMPTS)
    assert not any(t.requires_grad for t in cond.tensors.values())
    uncond = teacher.encode_negative(5)
    assert len(uncond) == 5 and tuple(uncond.keys()) == CONDITIONING_KEYS[family]
    assert teacher.encode_negative(1) is teacher.encode_negative(1), "cached per prompt"
    emb = cond["encoder_hidden_states"]
    assert emb.ndim == 3 and emb.shape[0] == len(PROMPTS)
    assert not torch.equal(emb[0], emb[1]), "different prompts, different embeddings"
    if family == "sdxl":
        res = TINY_RESOLUTION[family]
        assert cond["time_ids"].tolist() == [[res, res, 0, 0, res, res]] * len(PROMPTS)
        # SDXL's pipeline uses zeros for an empty negative prompt (force_zeros_for_empty_prompt).
        assert not uncond["encoder_hidden_states"].any() and not uncond["text_embeds"].any()
        assert teacher.encode_negative(1, "blurry")["encoder_hidden_states"].any()
    if family == "flux":
        assert cond["txt_ids"].shape == (*emb.shape[:2], 3)


# ---- the denoiser --------------------------------------------------------------------------------
def test_denoiser_outputs_every_type(teacher, inputs):
    x_t, t, cond, _ = inputs
    denoiser = teacher.denoiser()
    for output in OUTPUT_TYPES:
        pred = denoiser(x_t, t, cond, output=output)
        assert pred.shape == x_t.shape and pred.dtype == torch.float32 and torch.isfinite(pred).all()
    # a scalar t and a batch-1 conditioning are broadcast
    assert denoiser(x_t, float(t[0]), cond.index(0)).shape == x_t.shape


def test_denoiser_matches_the_raw_backbone(teacher, inputs, family):
    x_t, t, cond, _ = inputs
    denoiser, native = teacher.denoiser(), NATIVE[family]
    guidance = 3.5 if family == "flux" else 1.0  # FLUX.1-dev style: guidance goes into the embedding
    raw = raw_backbone(teacher, x_t, t, cond, guidance=guidance)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x_t, t, cond, output=native, guidance_scale=guidance), raw)
        x0 = denoiser(x_t, t, cond, output="x0", guidance_scale=guidance)
    torch.testing.assert_close(teacher.schedule.convert(x0, x_t, t, "x0", native), raw, rtol=1e-4, atol=1e-4)


def test_classifier_free_guidance(teacher, inputs, family):
    x_t, t, cond, uncond = inputs
    d = teacher.denoiser()
    with torch.no_grad():
        if family == "flux":
            # Guidance-distilled: the scale goes into the guidance embedding, uncond is ignored ...
            embedded = d(x_t, t, cond, guidance_scale=4.0)
            torch.testing.assert_close(d(x_t, t, cond, uncond=uncond, guidance_scale=4.0), embedded)
            assert not torch.allclose(embedded, d(x_t, t, cond, guidance_scale=1.0))
            kwargs = {"true_cfg": True}  # ... unless true CFG is asked for (embedding then 1.0)
            c = d(x_t, t, cond, output="flow", embedded_guidance=1.0)
            u = d(x_t, t, uncond, output="flow", embedded_guidance=1.0)
        else:
            kwargs = {}
            c, u = d(x_t, t, cond, output=NATIVE[family]), d(x_t, t, uncond, output=NATIVE[family])
            torch.testing.assert_close(d(x_t, t, cond, uncond=uncond, guidance_scale=1.0), d(x_t, t, cond))
        w = 3.0
        cfg = d(x_t, t, cond, uncond=uncond, guidance_scale=w, output=NATIVE[family], **kwargs)
        torch.testing.assert_close(cfg, u + w * (c - u), rtol=1e-4, atol=1e-4)
        # conversions are affine in the prediction, so the same combination holds for x0
        cfg_x0 = d(x_t, t, cond, uncond=uncond, guidance_scale=w, output="x0", **kwargs)
        torch.testing.assert_close(
            cfg_x0, teacher.schedule.to_x0(u + w * (c - u), x_t, t, NATIVE[family]), rtol=1e-4, atol=1e-4
        )


def test_return_features(teacher, inputs, family):
    x_t, t, cond, uncond = inputs
    d = teacher.denoiser()
    b, _, h, w = x_t.shape
    pred, feats = d(x_t, t, cond, return_features=True)
    torch.testing.assert_close(pred, d(x_t, t, cond))
    config = teacher.backbone.config
    if family in ("sd15", "sd2", "sdxl"):
        assert feats.shape == (b, config.block_out_channels[-1], h // 2, w // 2)  # two-level UNet
    else:
        assert feats.shape == (b, h * w // 4, config.num_attention_heads * config.attention_head_dim)
    assert not d.feature_module()._forward_hooks, "the hook is removed after the call"
    # With CFG only the conditional half is returned, and it matches a conditional-only forward.
    _, feats_cfg = d(x_t, t, cond, uncond=uncond, guidance_scale=2.0, return_features=True, true_cfg=True)
    torch.testing.assert_close(feats_cfg, feats, rtol=1e-4, atol=1e-4)
    # GAN heads on these features: one logit per sample, from the config or built lazily.
    for head in (GANHead.for_backbone(teacher.backbone, family), GANHead()):
        logits = head(feats)
        assert logits.shape == (b,) and logits.dtype == torch.float32


def test_gan_head_gradients_reach_a_trainable_copy(teacher, inputs, family):
    x_t, t, cond, _ = inputs
    trainable = copy.deepcopy(teacher.backbone).requires_grad_(True)
    d = teacher.denoiser(trainable)
    x = x_t.clone().requires_grad_(True)
    pred, feats = d(x, t, cond, return_features=True)
    torch.testing.assert_close(pred, teacher.denoiser()(x_t, t, cond), rtol=1e-5, atol=1e-5)
    head = GANHead.for_backbone(trainable, family)
    (head(feats).sum() + pred.square().mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert any(p.grad is not None for p in trainable.parameters())
    assert all(p.grad is not None for p in head.parameters())
    assert not any(p.grad is not None for p in teacher.backbone.parameters()), "the teacher stays frozen"


def test_vae_decode_and_encode(teacher, inputs, family):
    x_t = inputs[0][:2]
    res = TINY_RESOLUTION[family]
    images = teacher.decode(x_t)
    assert images.shape == (2, 3, res, res) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    latents = teacher.encode_images(images)
    assert latents.shape == x_t.shape and latents.dtype == torch.float32
    torch.testing.assert_close(teacher.encode_images(images), latents)  # deterministic (posterior mode)
    with pytest.raises(ValueError, match="multiple"):
        teacher.latent_shape(res + 4)


# ---- family-independent pieces -------------------------------------------------------------------
def test_flux_packing_matches_the_pipeline():
    x = torch.randn(2, 16, 6, 8)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x)
    torch.testing.assert_close(
        latent_image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    )


def test_conditioning_batch_operations():
    cond = Conditioning({"a": torch.arange(4.0).view(4, 1), "ids": torch.arange(4).view(4, 1)})
    assert len(cond) == 4
    assert cond[1:3]["a"].flatten().tolist() == [1.0, 2.0]
    assert cond.index(2)["a"].shape == (1, 1)
    assert cond[torch.tensor([3, 0])]["a"].flatten().tolist() == [3.0, 0.0]
    assert cond[torch.tensor([True, False, True, False])]["a"].flatten().tolist() == [0.0, 2.0]
    assert cond.repeat(2)["a"].flatten().tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert Conditioning.cat([cond[:1], cond[3:]])["a"].flatten().tolist() == [0.0, 3.0]
    assert cond.expand_to(4) is cond and len(cond[:1].expand_to(3)) == 3
    with pytest.raises(ValueError):
        cond[:2].expand_to(3)
    half = cond.to(dtype=torch.bfloat16)
    assert half["a"].dtype == torch.bfloat16 and half["ids"].dtype == torch.int64
    with pytest.raises(ValueError, match="batch size"):
        Conditioning({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)})


def test_denoiser_calls_a_ddp_wrapped_backbone(tiny_pipeline_dir):
    """DDP (gloo, one process): the wrapper is called and the feature hook finds the inner model."""
    import torch.distributed as dist

    teacher = load_teacher("tiny:sd15")
    x = torch.randn(2, *teacher.latent_shape(64))
    t = torch.tensor([500.0, 200.0])
    cond = teacher.encode_prompt(PROMPTS[:2])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(teacher.backbone).requires_grad_(True))
        d = teacher.denoiser(ddp)
        assert isinstance(d, Denoiser) and d.module is ddp.module
        pred, feats = d(x, t, cond, return_features=True)
        torch.testing.assert_close(pred, teacher.denoiser()(x, t, cond), rtol=1e-5, atol=1e-5)
        assert feats.shape[:2] == (2, 64)
    finally:
        dist.destroy_process_group()


def test_tiny_pipeline_loads_with_plain_diffusers(tiny_pipeline_dir):
    pipe = DiffusionPipeline.from_pretrained(str(tiny_pipeline_dir("flux")))
    assert type(pipe).__name__ == "FluxPipeline" and pipe.transformer.config.guidance_embeds


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_bf16_teacher_gives_float32_predictions(family):
    teacher = load_teacher(f"tiny:{family}", dtype="bf16")
    assert teacher.dtype == torch.bfloat16
    x = torch.randn(2, *teacher.latent_shape(64))
    t = torch.tensor(teacher.schedule.timesteps_for_steps(2))
    cond = teacher.encode_prompt(PROMPTS[:2])
    pred, feats = teacher.denoiser()(
        x, t, cond, uncond=teacher.encode_negative(2), guidance_scale=2.0, return_features=True
    )
    assert pred.dtype == torch.float32 and torch.isfinite(pred).all()
    assert feats.dtype == torch.bfloat16
    assert teacher.decode(pred).dtype == torch.float32


def test_features_only_stops_at_the_bottleneck(teacher, inputs, family):
    """``features_only`` gives the same features as a full forward, without running the rest of the backbone."""
    x_t, t, cond, uncond = inputs
    d = teacher.denoiser()
    _, full = d(x_t, t, cond, return_features=True)
    later = teacher.backbone.conv_out if family in ("sd15", "sd2", "sdxl") else teacher.backbone.proj_out
    calls = []
    handle = later.register_forward_hook(lambda *_: calls.append(1))
    try:
        feats = d(x_t, t, cond, features_only=True)
        feats_cfg = d(x_t, t, cond, uncond=uncond, guidance_scale=2.0, features_only=True, true_cfg=True)
    finally:
        handle.remove()
    assert calls == [], "the backbone ran past its feature module"
    torch.testing.assert_close(feats, full)
    torch.testing.assert_close(feats_cfg, full, rtol=1e-4, atol=1e-4)
    assert not d.feature_module()._forward_hooks


def test_multi_level_features(teacher, inputs, family):
    """``Denoiser.features``: one tensor per level in forward order, the deepest equal to the bottleneck
    features, the backbone stopped after the deepest requested level, gradients reaching the input."""
    x_t, t, cond, _ = inputs
    d = teacher.denoiser()
    levels = d.feature_levels()
    feats = d.features(x_t, t, cond)
    assert len(feats) == len(levels) >= 2
    n = len(PROMPTS)
    if family in ("sd15", "sd2", "sdxl"):
        channels = list(teacher.backbone.config.block_out_channels)
        assert [f.shape[1] for f in feats] == channels + [channels[-1]]
        assert all(f.ndim == 4 and f.shape[0] == n for f in feats)
        _, mid = d(x_t, t, cond, return_features=True)
        torch.testing.assert_close(feats[-1], mid)  # the last level is the mid block, the bottleneck
    else:
        assert all(f.ndim == 3 and f.shape[0] == n for f in feats)
    # Only the first level: nothing after it runs.
    later = levels[1]
    calls = []
    handle = later.register_forward_hook(lambda *_: calls.append(1))
    try:
        (first,) = d.features(x_t, t, cond, levels=[0])
    finally:
        handle.remove()
    assert calls == [] and not any(m._forward_hooks for m in levels)
    torch.testing.assert_close(first, feats[0])
    x = x_t.clone().requires_grad_(True)
    d.features(x, t, cond, levels=[-1])[0].float().square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="levels"):
        d.features(x_t, t, cond, levels=[len(levels)])
