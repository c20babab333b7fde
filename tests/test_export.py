"""Export: for every teacher family, the exported diffusers pipeline reproduces the student sampler."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from stepdistill import lifecycle
from stepdistill.harness.trainer import Trainer
from tests.helpers import tiny_config

FAMILIES = ["sd15", "sd2", "sdxl", "sd3", "flux"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_steps", [1, 2])
def test_export_reproduces_the_student_sampler(family, num_steps, tmp_path):
    cfg = tiny_config(tmp_path / "run", "dmd2", f"model.pretrained=tiny:{family}", f"model.family={family}",
                      f"method.num_steps={num_steps}", "train.max_steps=1", "train.sample_every=0")
    trainer = Trainer(cfg)
    lifecycle.run(trainer)  # one step, so the student differs from the teacher; exports to run/export
    folder = tmp_path / "run" / "export"
    info = json.loads((folder / "stepdistill.json").read_text())
    assert info["num_inference_steps"] == num_steps and info["family"] == family
    # Flow few-step exports re-noise from the global RNG in plain diffusers: the card says so, and how to seed.
    from stepdistill.export.hub import model_card_text

    global_rng = family in ("sd3", "flux") and num_steps > 1
    assert info["global_rng_steps"] is global_rng
    assert ("torch.manual_seed" in model_card_text(info)) is global_rng

    pipe = DiffusionPipeline.from_pretrained(folder)
    res = cfg.model.resolution
    prompt = "a blue square"
    noise = torch.randn((1, *trainer.teacher.latent_shape(res)), generator=torch.Generator().manual_seed(0))
    # SD3/FLUX pipelines draw the re-noising noise from the global RNG, SD pipelines from `generator`.
    torch.manual_seed(1)
    ours = trainer.method.sample(noise, trainer.teacher.encode_prompt([prompt]),
                                 generator=torch.Generator().manual_seed(1) if family not in ("sd3", "flux") else None)
    torch.manual_seed(1)

    latents_in = noise
    if family == "flux":  # FluxPipeline takes and returns packed latents
        latents_in = pipe._pack_latents(noise, 1, noise.shape[1], noise.shape[2], noise.shape[3])
    out = pipe(prompt, num_inference_steps=info["num_inference_steps"], guidance_scale=info["guidance_scale"],
               height=res, width=res, latents=latents_in, generator=torch.Generator().manual_seed(1),
               output_type="latent").images
    if family == "flux":
        out = pipe._unpack_latents(out, res, res, pipe.vae_scale_factor)
    assert len(pipe.scheduler.timesteps) == num_steps
    assert pipe.scheduler.timesteps.tolist() == pytest.approx(trainer.method.timesteps)
    if family != "flux" or num_steps == 1:
        # (FluxPipeline draws the re-noising noise in its packed token layout: the same seed gives the
        # same numbers in another arrangement, equal in distribution but not elementwise.)
        assert torch.allclose(out.float(), ours, atol=1e-4, rtol=1e-4), (
            f"{family}: exported pipeline differs from the student sampler by {(out.float() - ours).abs().max():.3g}")
    # And it produces an image.
    image = pipe(prompt, num_inference_steps=num_steps, guidance_scale=info["guidance_scale"], height=res,
                 width=res, output_type="np").images[0]
    assert image.shape == (res, res, 3)


def test_lora_student_exports_merged_pipeline_and_loadable_lora(tmp_path):
    cfg = tiny_config(tmp_path / "run", "dmd2", "method.num_steps=1", "train.max_steps=1", "train.sample_every=0",
                      "roles.generator.lora_rank=4", "roles.generator.lora_alpha=2",
                      "roles.generator.share_teacher_base=true", "roles.generator.lr=0.01")
    lifecycle.run(cfg)
    folder = tmp_path / "run" / "export"
    info = json.loads((folder / "stepdistill.json").read_text())
    assert info["lora"] == "lora" and (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()
    merged = DiffusionPipeline.from_pretrained(folder)
    # The teacher pipeline with the LoRA loaded by plain diffusers gives the merged student's output.
    from stepdistill.models import resolve_pretrained

    base = DiffusionPipeline.from_pretrained(resolve_pretrained("tiny:sd15"))
    base.scheduler = merged.scheduler
    plain = base(["a red circle"], num_inference_steps=1, guidance_scale=0, height=64, width=64, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    base.load_lora_weights(str(folder / "lora"))
    kwargs = dict(num_inference_steps=1, guidance_scale=0, height=64, width=64, output_type="latent")
    with_lora = base(["a red circle"], generator=torch.Generator().manual_seed(0), **kwargs).images
    student = merged(["a red circle"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.allclose(plain, student, atol=1e-4), "the LoRA did not change the student"
    assert torch.allclose(with_lora, student, atol=1e-4)


@pytest.mark.parametrize("family, fmt", [("sd15", "kohya"), ("sdxl", "comfyui"), ("flux", "comfyui")])
def test_kohya_and_comfyui_lora_files_fuse_to_the_diffusers_weights(tmp_path, family, fmt):
    """The kohya / ComfyUI file, loaded by diffusers' own ``load_lora_weights`` (which converts those
    formats), fuses into the same backbone weights as the diffusers file, at the adapter's alpha / rank."""
    from safetensors import safe_open

    from stepdistill.export.pipeline import export_from_run
    from stepdistill.models import resolve_pretrained

    cfg = tiny_config(tmp_path / "run", "dmd2", f"model.pretrained=tiny:{family}", f"model.family={family}",
                      "method.num_steps=1", "train.max_steps=1", "train.sample_every=0", "export.enabled=false",
                      "roles.generator.lora_rank=4", "roles.generator.lora_alpha=2",
                      "roles.generator.share_teacher_base=true", "roles.generator.lr=0.01")
    lifecycle.run(cfg)
    out = export_from_run(tmp_path / "run", tmp_path / "lora", lora_only=True, lora_format=fmt)
    info = json.loads((out / "stepdistill.json").read_text())
    assert info["lora_file"] == f"dmd2_1step_{fmt}.safetensors"
    with safe_open(str(out / info["lora_file"]), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["stepdistill.method"] == "dmd2" and meta["stepdistill.num_inference_steps"] == "1"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    if family == "flux":
        assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    else:
        assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)

    def fused(weight_name):
        pipe = DiffusionPipeline.from_pretrained(resolve_pretrained(f"tiny:{family}"))
        backbone = pipe.unet if family != "flux" else pipe.transformer
        before = {k: v.clone() for k, v in backbone.state_dict().items()}
        pipe.load_lora_weights(str(out), weight_name=weight_name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        return before, {k: v for k, v in backbone.state_dict().items()}

    base, reference = fused("pytorch_lora_weights.safetensors")
    _, converted = fused(info["lora_file"])
    assert reference.keys() == converted.keys() == base.keys()
    assert any(not torch.equal(base[k], reference[k]) for k in base), "the LoRA changed nothing"
    for k in reference:
        torch.testing.assert_close(converted[k], reference[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_distilled_lora_stacks_with_another_lora(tmp_path):
    """Users stack an acceleration LoRA with a style LoRA on one base (``set_adapters`` with per-adapter
    weights): a style weight of 0 gives the distilled LoRA alone, another weight changes the output, and
    the stack fuses into the same output it gives unfused."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from stepdistill.models import resolve_pretrained

    cfg = tiny_config(tmp_path / "run", "dmd2", "method.num_steps=1", "train.max_steps=1", "train.sample_every=0",
                      "roles.generator.lora_rank=4", "roles.generator.lora_alpha=2",
                      "roles.generator.share_teacher_base=true", "roles.generator.lr=0.01")
    lifecycle.run(cfg)
    export = tmp_path / "run" / "export"
    # a "style" LoRA of another rank on the same base, with non-zero weights
    style = DiffusionPipeline.from_pretrained(resolve_pretrained("tiny:sd15"))
    style.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "conv1"]))
    with torch.no_grad():
        for name, p in style.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    type(style).save_lora_weights(str(tmp_path / "style"), unet_lora_layers=get_peft_model_state_dict(style.unet))

    pipe = DiffusionPipeline.from_pretrained(resolve_pretrained("tiny:sd15"))
    pipe.scheduler = DiffusionPipeline.from_pretrained(export).scheduler
    pipe.load_lora_weights(str(export / "lora"), adapter_name="distilled")
    pipe.load_lora_weights(str(tmp_path / "style"), adapter_name="style")

    def sample():
        return pipe(["a red circle"], num_inference_steps=1, guidance_scale=0, height=64, width=64,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    pipe.set_adapters(["distilled"])
    alone = sample()
    pipe.set_adapters(["distilled", "style"], adapter_weights=[1.0, 0.0])
    torch.testing.assert_close(sample(), alone)
    pipe.set_adapters(["distilled", "style"], adapter_weights=[1.0, 0.7])
    stacked = sample()
    assert (stacked - alone).abs().max() > 1e-3, "the style LoRA changed nothing"
    pipe.fuse_lora(adapter_names=["distilled", "style"])
    pipe.unload_lora_weights()
    torch.testing.assert_close(sample(), stacked, rtol=1e-4, atol=1e-4)


def test_kohya_names_exist_only_for_unet_models(tmp_path):
    from stepdistill.export.lora_formats import check_format

    with pytest.raises(ValueError, match="--format=kohya.*not for flux.*--format comfyui"):
        check_format("kohya", "flux")
    check_format("comfyui", "flux")
    check_format("kohya", "sdxl")
    with pytest.raises(ValueError, match="--format=comfyui: the student is full weights, not a LoRA"):
        check_format("comfyui", "sdxl", lora_student=False)
    check_format("diffusers", "flux", lora_student=False)  # the diffusers pipeline export needs no LoRA


def test_one_step_export_runs_at_more_steps(tmp_path):
    """The exported scheduler runs the trained step count exactly and any other step count too."""
    cfg = tiny_config(tmp_path / "run", "dmd2", "method.num_steps=1", "train.max_steps=1", "train.sample_every=0")
    lifecycle.run(cfg)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "export")
    for steps, expected in [(1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])]:
        pipe.scheduler.set_timesteps(steps)
        assert pipe.scheduler.timesteps.tolist() == expected
        image = pipe("a red circle", num_inference_steps=steps, guidance_scale=0, height=64, width=64,
                     output_type="np").images[0]
        assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("method", ["dmd2", "phased_dmd"])
def test_hand_set_timesteps_are_refused_where_the_pipeline_cannot_take_them(method, tmp_path):
    """SD3 / FLUX pipelines have no timesteps= argument: an export could not run hand-set generator timesteps."""
    cfg = tiny_config(tmp_path / "a", method, "model.pretrained=tiny:sd3", "model.family=sd3", "method.num_steps=2",
                      "method.generator_timesteps=[999,400]", "export.enabled=false")
    with pytest.raises(ValueError, match=r"generator_timesteps=\[999, 400\]: the sd3 pipeline takes no timesteps="):
        Trainer(cfg)
    # VP pipelines take them (the export says timesteps=[999, 400] in its usage).
    cfg = tiny_config(tmp_path / "b", method, "method.num_steps=2", "method.generator_timesteps=[999,400]",
                      "export.enabled=false")
    assert Trainer(cfg).method.export_timesteps() == [999.0, 400.0]


@pytest.mark.parametrize("overrides", [
    ("roles.generator.ema_decay=0.5",),
    ("roles.generator.lora_rank=4", "roles.generator.lora_alpha=4", "roles.generator.share_teacher_base=true",
     "roles.generator.lr=0.01", "roles.generator.ema_decay=0.5"),
], ids=["full_weights", "shared_base_lora"])
def test_export_from_a_checkpoint_equals_the_in_process_export(overrides, tmp_path):
    """export_from_run builds only the networks and reads the checkpoint: the same weights as the export the
    finished run wrote (EMA swapped in), and different ones without the EMA."""
    from safetensors.torch import load_file

    from stepdistill.export.pipeline import export_from_run

    run_dir = tmp_path / "run"
    # Two generator updates: after the first, diffusers' EMA (no warmup) equals the weights.
    lifecycle.run(tiny_config(run_dir, "dmd2", "train.max_steps=2", "train.sample_every=0",
                              "method.critic_steps_per_generator_step=1", *overrides))
    again = export_from_run(run_dir, tmp_path / "again")
    raw = export_from_run(run_dir, tmp_path / "raw", use_ema=False)
    files = sorted((run_dir / "export").rglob("*.safetensors"))
    assert any(f.parent.name == "unet" for f in files)
    for f in files:
        ours, theirs = load_file(f), load_file(again / f.relative_to(run_dir / "export"))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f
    unet = next(f for f in files if f.parent.name == "unet").relative_to(run_dir / "export")
    ema, plain = load_file(again / unet), load_file(raw / unet)
    assert any(not torch.equal(ema[k], plain[k]) for k in ema)
