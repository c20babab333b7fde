"""``stepdistill bench`` and the hybrid sampler, on the shipped toy-sd teacher (CPU, offline).

The "student" is toy-sd's UNet with perturbed weights and an LCMScheduler (what an export holds:
the teacher's pipeline with another backbone and the re-noising scheduler), saved as a folder.
"""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from PIL import Image

from stepdistill.bench.quality import QUALITY, quality_fn, register_quality
from stepdistill.bench.runner import PipelineCache, build_runner, run_bench
from stepdistill.bench.spec import load_bench_file, make_settings, parse_entry, random_init_entries, validate
from stepdistill.sampling.hybrid import HybridSampler

PROMPTS = ["a red circle at the top left", "a blue square in the center"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The toy networks are tiny ops: one thread is several times faster than two on a shared CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def teacher():
    from diffusers import DiffusionPipeline

    from stepdistill.models.loading import resolve_pretrained

    pipe = DiffusionPipeline.from_pretrained(resolve_pretrained("toy-sd"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def student(teacher):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    unet = copy.deepcopy(teacher.unet)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    scheduler = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=4)
    pipe = StableDiffusionPipeline(**{**teacher.components, "unet": unet, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def student_dir(student, tmp_path_factory):
    folder = tmp_path_factory.mktemp("student", numbered=False) / "export"
    student.save_pretrained(str(folder))
    (folder / "stepdistill.json").write_text(json.dumps(
        {"num_inference_steps": 4, "timesteps": None, "guidance_scale": 0.0, "config": {"model": {"pretrained": "toy-sd"}}}))
    return folder


def _gens(n=2):
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


def _call(pipe, steps=4, guidance=1.5, **kw):
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                generator=_gens(), output_type="pt", **kw).images


# ---- hybrid sampler ----------------------------------------------------------------------------------
def test_hybrid_ends_are_the_plain_pipelines(teacher, student):
    """k = 0 is the student's own pipeline; k = N is the teacher's pipeline run with that scheduler."""
    from diffusers import StableDiffusionPipeline

    only_student = _call(student, guidance=0.0)
    hybrid0 = _call(HybridSampler(teacher, student, teacher_steps=0))
    torch.testing.assert_close(hybrid0, only_student, atol=1e-5, rtol=0)

    teacher_lcm = StableDiffusionPipeline(**{**teacher.components, "scheduler": student.scheduler})
    teacher_lcm.set_progress_bar_config(disable=True)
    hybrid4 = _call(HybridSampler(teacher, student, teacher_steps=4))
    torch.testing.assert_close(hybrid4, _call(teacher_lcm), atol=1e-5, rtol=0)


@torch.no_grad()
def test_hybrid_is_k_teacher_steps_then_student_steps(teacher, student):
    """k = 1 of 4 equals a hand-run loop: teacher UNet with CFG 1.5 at the first timestep, the student's
    UNet at the other three, every step the LCM scheduler's; and differs from both pure samplers."""
    from diffusers.utils.torch_utils import randn_tensor

    k, steps, w = 1, 4, 1.5
    out = _call(HybridSampler(teacher, student, teacher_steps=k), guidance=w)

    cond, uncond = teacher.encode_prompt(PROMPTS, "cpu", 1, True)
    scheduler = copy.deepcopy(student.scheduler)
    scheduler.set_timesteps(steps)
    gens = _gens()
    x = randn_tensor((2, 4, 8, 8), generator=gens, dtype=torch.float32) * scheduler.init_noise_sigma
    used = []
    for i, t in enumerate(scheduler.timesteps):
        if i < k:
            eps_u, eps_c = teacher.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            eps = eps_u + w * (eps_c - eps_u)
            used.append("teacher")
        else:
            eps = student.unet(x, t, encoder_hidden_states=cond).sample
            used.append("student")
        x = scheduler.step(eps, t, x, generator=gens).prev_sample
    expected = (teacher.vae.decode(x / teacher.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert used == ["teacher", "student", "student", "student"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert (out - _call(student, guidance=0.0)).abs().max() > 0.05
    assert (out - _call(HybridSampler(teacher, student, teacher_steps=4))).abs().max() > 0.05


@pytest.mark.parametrize("family, guidance", [("sdxl", 3.0), ("sd3", 3.0), ("flux", 3.5)])
def test_hybrid_reproduces_each_family_pipeline(family, guidance):
    """The hybrid's loop (conditioning, timesteps, scheduler steps, decode) is the family's own pipeline:
    with one pipeline as both teacher and student it gives that pipeline's images, whatever k."""
    from diffusers import DiffusionPipeline

    from stepdistill.models.loading import resolve_pretrained

    pipe = DiffusionPipeline.from_pretrained(resolve_pretrained(f"tiny:{family}"))
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 3, "guidance_scale": guidance, "height": 64, "width": 64, "output_type": "pt"}
    expected = pipe(PROMPTS, generator=_gens(), **kwargs).images
    for k in (0, 2):
        hybrid = HybridSampler(pipe, pipe, teacher_steps=k, student_guidance_scale=guidance)
        torch.testing.assert_close(hybrid(PROMPTS, generator=_gens(), **kwargs).images, expected, atol=1e-4, rtol=0)


def test_hybrid_bad_inputs(teacher, student):
    with pytest.raises(ValueError, match="teacher_steps=-1"):
        HybridSampler(teacher, student, teacher_steps=-1)
    with pytest.raises(ValueError, match="more than the 2 steps"):
        HybridSampler(teacher, student, teacher_steps=3)(PROMPTS, num_inference_steps=2)


# ---- the benchmark -----------------------------------------------------------------------------------
def _settings(tmp_path, **kw):
    values = {"batch_sizes": [1, 2], "runs": 2, "warmup": 0, "quality_num_prompts": 6, "quality_seeds": 2,
              "quality_num_reference": 200, "out": str(tmp_path / "out"), **kw}
    return make_settings(values)


def test_bench_table_csv_and_plot(tmp_path, student_dir):
    entries = (parse_entry("toy-sd steps=3 guidance=1.5")
               + parse_entry(f"{student_dir} steps=1,2")
               + parse_entry(f"hybrid teacher=toy-sd student={student_dir} teacher_steps=1 steps=2 guidance=1.5"))
    result = run_bench(entries, _settings(tmp_path), progress=False)
    out = tmp_path / "out"
    names = ["toy-sd 3-step CFG 1.5", "student 1-step", "student 2-step",
             "hybrid toy-sd 1 + student 1 of 2-step CFG 1.5"]
    assert [r["name"] for r in result["rows"]] == names

    table = (out / "bench.md").read_text().splitlines()
    assert table[0].startswith("| entry | steps | sampler | guidance | ms / image (batch 1) | images/s @1 | images/s @2")
    assert "fid ↓" in table[0] and "alignment ↑" in table[0] and "diversity ↑" in table[0]
    for name, line in zip(names, table[2:6]):
        assert line.startswith(f"| {name} |") and "n/a" not in line

    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == names
    assert [r["sampler"] for r in rows] == ["DDIMScheduler", "LCMScheduler", "LCMScheduler", "LCMScheduler"]
    for r in rows:
        assert float(r["latency_ms"]) > 0 and float(r["images_per_s_b2"]) > 0 and float(r["peak_mib_b1"]) > 0
        assert 0 <= float(r["alignment"]) <= 1 and float(r["fid"]) >= 0 and float(r["diversity"]) > 0
    # The exported student runs without CFG (its stepdistill.json); the hybrid's teacher step with CFG 1.5.
    assert [float(r["guidance"]) for r in rows] == [1.5, 0.0, 0.0, 1.5]
    assert rows[0]["memory_kind"].startswith("CPU peak RSS")
    # (No timing comparison here: on a shared machine a 2-step latency was measured below a 1-step one.)
    assert [r["steps"] for r in rows[1:3]] == ["1", "2"]

    with Image.open(out / "bench.png") as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300
    saved = json.loads((out / "bench.json").read_text())
    assert saved["plot_metric"] == "fid" and len(saved["rows"]) == 4


def test_options_channels_last_tiny_vae_sdpa(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae_dir = tmp_path / "taesd"
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                    num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4).save_pretrained(vae_dir)
    settings = _settings(tmp_path, batch_sizes=[1], quality="none", channels_last=True, sdpa="math")
    entry = parse_entry(f"toy-sd steps=2 guidance=1 tiny_vae={vae_dir}")[0]
    cache = PipelineCache(torch.device("cpu"), torch.float32)
    runner = build_runner(entry, settings, cache)
    assert isinstance(runner.pipe.vae, AutoencoderTiny)
    conv = runner.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert runner.sdpa == "math"
    images = runner(PROMPTS)
    assert images.shape == (2, 3, 32, 32)

    result = run_bench([entry], settings, progress=False)
    row = result["rows"][0]
    assert row["options"] == {"channels_last": True, "sdpa": "math", "tiny_vae": str(vae_dir)}
    assert row["quality"] == {} and row["quality_kind"] == "none"
    assert "quality: n/a" in (tmp_path / "out" / "bench.md").read_text()
    assert (tmp_path / "out" / "bench.png").is_file()


def test_compile_option_is_applied(tmp_path):
    """torch.compile is applied to the backbone and the VAE decode (not run: compiling takes minutes on CPU)."""
    settings = _settings(tmp_path, quality="none")
    entry = parse_entry("toy-sd steps=1 compile=true")[0]
    cache = PipelineCache(torch.device("cpu"), torch.float32)
    runner = build_runner(entry, settings, cache)
    cached = cache.pipeline("toy-sd")
    assert isinstance(runner.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert runner.pipe.unet._orig_mod is cached.unet
    assert "decode" in vars(runner.pipe.vae) and runner.pipe.vae.encoder is cached.vae.encoder
    # The shared, cached pipeline is left eager.
    assert not isinstance(cached.unet, torch._dynamo.eval_frame.OptimizedModule) and "decode" not in vars(cached.vae)


def test_quality_hook_for_other_pipelines(tmp_path):
    """A registered quality function (the hook for stepdistill.eval) fills the table; auto picks n/a otherwise."""
    calls = []

    @register_quality("test-const")
    def const(runner, ctx):
        images = runner(["a photo"], seed=3)
        calls.append((tuple(images.shape), runner.steps))
        return {"clip_score": 0.25, "fid": 12.0}

    try:
        entries = parse_entry("tiny:sd15 steps=1 guidance=1 quality=test-const") + \
            parse_entry("tiny:sd15 steps=2 guidance=1")
        result = run_bench(entries, _settings(tmp_path, batch_sizes=[1], quality="auto"), progress=False)
    finally:
        QUALITY.pop("test-const")
    assert calls == [((1, 3, 64, 64), 1)]
    assert result["rows"][0]["quality"] == {"clip_score": 0.25, "fid": 12.0}
    assert result["rows"][1]["quality_kind"] == "none"
    table = (tmp_path / "out" / "bench.md").read_text().splitlines()
    assert "fid ↓" in table[0] and "clip_score ↑" in table[0]
    assert table[2].endswith("| 12 | 0.25 |") and table[3].endswith("| n/a | n/a |")


def test_fast_entry_gives_the_pipelines_images(tmp_path):
    """fast=true (sampling/fast.py) is its own row, and samples the same images as the pipeline."""
    seen = {}

    @register_quality("test-images")
    def images(runner, ctx):
        seen[runner.pipe.__class__.__name__] = runner(["a red circle", "a blue square"], seed=5)
        return {"fid": float(seen[runner.pipe.__class__.__name__].mean())}

    try:
        entries = (parse_entry("tiny:sd15 steps=2 guidance=0 sampler=lcm quality=test-images name=plain")
                   + parse_entry("tiny:sd15 steps=2 guidance=0 sampler=lcm quality=test-images fast=true "
                                       "name=fast"))
        result = run_bench(entries, _settings(tmp_path, batch_sizes=[1, 2]), progress=False)
    finally:
        QUALITY.pop("test-images")
    assert sorted(seen) == ["FastSampler", "StableDiffusionPipeline"]
    torch.testing.assert_close(seen["FastSampler"], seen["StableDiffusionPipeline"], atol=1e-5, rtol=0)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["fast"]["options"].get("fast") is True and rows["fast"]["latency_ms"] > 0
    assert set(rows["fast"]["throughput"]) == {1, 2}


def test_bench_config_files():
    entries, settings = load_bench_file("configs/bench/toy.yaml")
    assert [(e.pipeline, e.steps, e.guidance) for e in entries if not e.is_hybrid] == [
        ("toy-sd", 50, 1.5), ("toy-sd", 25, 1.5),
        ("runs/toy_dmd2/export", 1, None), ("runs/toy_dmd2/export", 2, None), ("runs/toy_dmd2/export", 4, None)]
    hybrid = [e for e in entries if e.is_hybrid]
    assert [(e.teacher, e.student, e.teacher_steps, e.steps) for e in hybrid] == [
        ("toy-sd", "runs/toy_dmd2/export", 1, 4)]
    assert make_settings(settings).batch_sizes == [1, 8]
    entries, settings = load_bench_file("configs/bench/sdxl_gpu.yaml")
    assert {e.pipeline for e in entries} == {"random:sdxl"} and make_settings(settings).resolution == 1024
    assert [e.options for e in random_init_entries("sdxl")] == [
        {}, {"compile": True}, {"compile": True, "tiny_vae": "random"}, {"compile": True, "fast": True},
        {"compile": True, "fast": True, "tiny_vae": "random"}]
    assert [e.sampler for e in random_init_entries("sdxl")][3:] == ["lcm", "lcm"]
    assert {e.name: e.options.get("fast", False) for e in entries}["sdxl 1-step compiled + CUDA graph tiny VAE"]


@pytest.mark.parametrize("text, message", [
    ("", "--entry is empty"),
    ("toy-sd stesp=3", "unknown key.*stesp"),
    ("toy-sd steps=0", "steps=0 must be >= 1"),
    ("toy-sd steps=two", "steps='two' is not an integer"),
    ("toy-sd guidance=high", "guidance='high' is not a number"),
    ("toy-sd sampler=warp", "sampler='warp' is not a diffusers scheduler"),
    ("toy-sd sdpa=fastest", "sdpa='fastest' is not a backend"),
    ("toy-sd compile=maybe", "compile='maybe' is not a boolean"),
    ("toy-sd 50", "'50' is not key=value"),
    ("hybrid teacher=toy-sd steps=4", "needs teacher, student and teacher_steps"),
    ("hybrid teacher=toy-sd student=toy-sd teacher_steps=3 steps=2", "teacher_steps=3 is more than steps=2"),
    ("hybrid teacher=toy-sd student=toy-sd teacher_steps=1 steps=2 fast=true", "a hybrid entry runs two"),
    ("toy-sd fast=sometimes", "fast='sometimes' is not a boolean"),
])
def test_bad_entries(text, message):
    with pytest.raises(ValueError, match=message):
        parse_entry(text)


def test_bad_inputs_fail_before_loading(tmp_path, capsys):
    settings = _settings(tmp_path)
    with pytest.raises(ValueError, match="pipeline folder .*missing/export does not exist"):
        validate(parse_entry(f"{tmp_path}/missing/export steps=1"), settings)
    with pytest.raises(ValueError, match="no entries"):
        validate([], settings)
    with pytest.raises(ValueError, match="tiny_vae=.*no config.json"):
        validate(parse_entry(f"toy-sd tiny_vae={tmp_path}"), settings)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        validate(parse_entry(f"toy-sd tiny_vae={tmp_path}"), settings)
    with pytest.raises(ValueError, match="replays sampler=lcm, ddim or flow_euler .*not sampler=euler"):
        validate(parse_entry("toy-sd fast=true sampler=euler"), settings)
    with pytest.raises(ValueError, match="a hybrid entry runs two"):
        validate(parse_entry("hybrid teacher=toy-sd student=toy-sd teacher_steps=1 steps=2"),
                       make_settings({**settings.__dict__, "fast": True}))
    with pytest.raises(ValueError, match="same name"):
        validate(parse_entry("toy-sd steps=2,2"), settings)
    with pytest.raises(ValueError, match="quality='clip'"):
        make_settings({"quality": "clip"})
    with pytest.raises(ValueError, match="cannot import nothing from stepdistill.bench.quality"):
        make_settings({"quality": "stepdistill.bench.quality:nothing"})
    assert quality_fn("stepdistill.bench.quality:toy_quality") is QUALITY["toy"]
    with pytest.raises(ValueError, match="batch_sizes=0 must be >= 1"):
        make_settings({"batch_sizes": "1,0"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  - {pipeline: toy-sd, stpes: 2}\n")
    with pytest.raises(ValueError, match=r"entries\[0\]: unknown key.*stpes"):
        load_bench_file(bad)
    bad.write_text("entries: []\nsetings: {}\n")
    with pytest.raises(ValueError, match="unknown top-level key.*setings"):
        load_bench_file(bad)

    from stepdistill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--entry", "toy-sd steps=0", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "steps=0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
