"""The host-sync-free few-step sampler (sampling/fast.py) gives the pipeline's own images."""

from __future__ import annotations

import pytest
import torch

from stepdistill.sampling.fast import FastSampler

PROMPTS = ["a red circle at the top left", "a blue square in the center"]


def _gens(n=2, seed=100):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _pipe(family: str, w_embedding: bool = False):
    from diffusers import DiffusionPipeline, LCMScheduler

    from stepdistill.models.guidance import add_guidance_embedding
    from stepdistill.models.loading import resolve_pretrained

    pipe = DiffusionPipeline.from_pretrained(resolve_pretrained(f"tiny:{family}"))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if w_embedding:
        add_guidance_embedding(pipe.unet, 32)
        torch.manual_seed(0)
        torch.nn.init.normal_(pipe.unet.time_embedding.cond_proj.weight, std=0.5)  # make w matter
    return pipe


@pytest.mark.parametrize("family, steps", [("sd15", 1), ("sd15", 3), ("sd2", 2), ("sdxl", 1), ("sdxl", 2)])
def test_fast_sampler_reproduces_the_pipeline(family, steps):
    pipe = _pipe(family)
    kwargs = {"num_inference_steps": steps, "guidance_scale": 0.0, "height": 64, "width": 64, "output_type": "pt"}
    expected = pipe(PROMPTS, generator=_gens(), **kwargs).images
    fast = FastSampler(pipe)
    got = fast(PROMPTS, generator=_gens(), **kwargs).images
    assert got.shape == expected.shape == (2, 3, 64, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The program is built once per shape and reused: a second call with other seeds differs, reproducibly.
    other = fast(PROMPTS, generator=_gens(seed=7), **kwargs).images
    assert len(fast._programs) == 1
    assert (other - got).abs().max() > 1e-3
    torch.testing.assert_close(other, pipe(PROMPTS, generator=_gens(seed=7), **kwargs).images, atol=1e-5, rtol=0)


def test_fast_sampler_trained_timesteps_and_guidance_embedding():
    """Custom timesteps (an export's trained ones) and a w-embedded student's one-pass guidance."""
    pipe = _pipe("sd15", w_embedding=True)
    kwargs = {"num_inference_steps": 2, "timesteps": [999, 499], "height": 64, "width": 64, "output_type": "pt"}
    fast = FastSampler(pipe)
    images = {}
    for w in (1.5, 4.0):
        expected = pipe(PROMPTS, generator=_gens(), guidance_scale=w, **kwargs).images
        images[w] = fast(PROMPTS, generator=_gens(), guidance_scale=w, **kwargs).images
        torch.testing.assert_close(images[w], expected, atol=1e-5, rtol=0)
    assert (images[1.5] - images[4.0]).abs().max() > 1e-3


def test_fast_sampler_bad_inputs():
    from diffusers import DDIMScheduler, DiffusionPipeline

    from stepdistill.models.loading import resolve_pretrained

    pipe = _pipe("sd15")
    with pytest.raises(ValueError, match="no doubled-batch CFG"):
        FastSampler(pipe)(PROMPTS, guidance_scale=3.0)
    with pytest.raises(ValueError, match="output_type='pt'"):
        FastSampler(pipe)(PROMPTS, output_type="pil")
    with pytest.raises(ValueError, match="needs the pipeline on a CUDA device"):
        FastSampler(pipe, cuda_graph=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="sampler=lcm"):
        FastSampler(pipe)
    flow = DiffusionPipeline.from_pretrained(resolve_pretrained("tiny:sd3"))
    with pytest.raises(ValueError, match="Stable Diffusion 1.x/2.x and SDXL"):
        FastSampler(flow)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager():
    pipe = _pipe("sdxl").to("cuda")
    kwargs = {"num_inference_steps": 2, "guidance_scale": 0.0, "height": 64, "width": 64, "output_type": "pt"}
    eager = FastSampler(pipe, cuda_graph=False)(PROMPTS, generator=_gens(), **kwargs).images
    graphed = FastSampler(pipe, cuda_graph=True)
    for _ in range(2):  # capture, then replay
        torch.testing.assert_close(graphed(PROMPTS, generator=_gens(), **kwargs).images, eager, atol=1e-4, rtol=0)
