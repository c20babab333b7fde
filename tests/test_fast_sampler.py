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


@pytest.mark.parametrize("family, scheduler, steps, guidance", [
    ("sd15", "lcm", 2, 3.0),    # doubled-batch CFG on the re-noising sampler
    ("sd2", "ddim", 3, 2.0),    # DDIM at eta 0 (PCM exports), v-prediction, CFG
    ("sdxl", "ddim", 2, 2.5),   # force_zeros_for_empty_prompt: the negative embeddings are zeros
    ("sdxl", "lcm", 1, 0.0),
])
def test_fast_sampler_cfg_and_ddim(family, scheduler, steps, guidance):
    from diffusers import DDIMScheduler

    pipe = _pipe(family)
    if scheduler == "ddim":  # as sampling.schedulers.deterministic_scheduler exports it
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                   set_alpha_to_one=True, steps_offset=0, clip_sample=False)
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "height": 64, "width": 64,
              "output_type": "pt"}
    expected = pipe(PROMPTS, generator=_gens(), **kwargs).images
    got = FastSampler(pipe)(PROMPTS, generator=_gens(), **kwargs).images
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if guidance > 1:  # guidance is applied: the unguided call gives other images
        unguided = FastSampler(pipe)(PROMPTS, generator=_gens(), **{**kwargs, "guidance_scale": 1.0}).images
        assert (unguided - got).abs().max() > 1e-3


def _flow_pipe(family: str, stochastic: bool, **components):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from stepdistill.models.loading import resolve_pretrained

    pipe = DiffusionPipeline.from_pretrained(resolve_pretrained(f"tiny:{family}"), **components)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                 stochastic_sampling=stochastic)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_flow(pipe, steps: int, guidance: float) -> FastSampler:
    """FastSampler's images equal the pipeline's, its re-noising noise drawn from the same generators."""
    from stepdistill.sampling.schedulers import seeded_steps

    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "height": 32, "width": 32,
              "output_type": "pt"}
    gens = _gens()
    with seeded_steps(pipe, gens):  # the pipeline would draw it from the global RNG
        expected = pipe(PROMPTS, generator=gens, **kwargs).images
    fast = FastSampler(pipe)
    got = fast(PROMPTS, generator=_gens(), **kwargs).images
    assert got.shape == expected.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    return fast


@pytest.mark.parametrize("stochastic, steps, guidance, t5", [(True, 2, 0.0, True), (True, 3, 2.0, True),
                                                             (False, 3, 2.0, True), (False, 2, 2.0, False)])
def test_fast_sampler_reproduces_sd3(stochastic, steps, guidance, t5):
    """SD3 with flow Euler (deterministic: teachers, PCM; stochastic: re-noising flow students), CFG above 1,
    with and without its T5 encoder (without: zeros in its place, as the pipeline does)."""
    _check_flow(_flow_pipe("sd3", stochastic, **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None})),
                steps, guidance)


@pytest.mark.parametrize("stochastic, steps, guidance", [(True, 2, 1.0), (False, 3, 3.5)])
def test_fast_sampler_reproduces_flux(stochastic, steps, guidance):
    """FLUX: packed 2x2-patch tokens, sigmas with a token-count shift, the guidance embedding (no CFG)."""
    fast = _check_flow(_flow_pipe("flux", stochastic), steps, guidance)
    kwargs = {"num_inference_steps": steps, "height": 32, "width": 32, "output_type": "pt"}
    got = fast(PROMPTS, generator=_gens(), guidance_scale=guidance, **kwargs).images
    other = fast(PROMPTS, generator=_gens(), guidance_scale=guidance + 4, **kwargs).images
    assert (other - got).abs().max() > 1e-4  # the embedded guidance is read


def test_fast_sampler_bad_inputs():
    from diffusers import DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler

    from stepdistill.models.loading import resolve_pretrained

    pipe = _pipe("sd15")
    with pytest.raises(ValueError, match="output_type='pt'"):
        FastSampler(pipe)(PROMPTS, output_type="pil")
    with pytest.raises(ValueError, match="needs the pipeline on a CUDA device"):
        FastSampler(pipe, cuda_graph=True)
    from stepdistill.sampling.experts import SwitchedPipeline

    with pytest.raises(ValueError, match="switches experts per step"):
        FastSampler(SwitchedPipeline(pipe, switch=object()))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="LCMScheduler / DDIMScheduler for this pipeline, not EulerDiscreteScheduler"):
        FastSampler(pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True)
    with pytest.raises(ValueError, match="without clip_sample"):
        FastSampler(pipe)
    sd3 = DiffusionPipeline.from_pretrained(resolve_pretrained("tiny:sd3"))
    with pytest.raises(ValueError, match="takes no timesteps"):
        FastSampler(sd3)(PROMPTS, num_inference_steps=2, timesteps=[999, 499])
    sana_like = DiffusionPipeline.from_pretrained(resolve_pretrained("tiny:sd15"))
    sana_like.text_encoder = None  # no text encoder: not a pipeline FastSampler knows
    with pytest.raises(ValueError, match="Stable Diffusion 1.x/2.x, SDXL, SD3 and FLUX"):
        FastSampler(sana_like)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family, guidance", [("sdxl", 0.0), ("sdxl", 2.0), ("sd3", 2.0), ("flux", 3.5)])
def test_cuda_graph_replay_matches_eager(family, guidance):
    pipe = (_flow_pipe(family, stochastic=True) if family in ("sd3", "flux") else _pipe(family)).to("cuda")
    kwargs = {"num_inference_steps": 2, "guidance_scale": guidance, "height": 64, "width": 64, "output_type": "pt"}
    eager = FastSampler(pipe, cuda_graph=False)(PROMPTS, generator=_gens(), **kwargs).images
    graphed = FastSampler(pipe, cuda_graph=True)
    for _ in range(2):  # capture, then replay
        torch.testing.assert_close(graphed(PROMPTS, generator=_gens(), **kwargs).images, eager, atol=1e-4, rtol=0)
