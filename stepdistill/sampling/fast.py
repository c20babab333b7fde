"""A host-sync-free sampler for Stable Diffusion pipelines, captured into one CUDA graph.

``FastSampler(pipe)`` runs what ``pipe(prompts, num_inference_steps=n, guidance_scale=w, output_type="pt")``
runs for a Stable Diffusion 1.x/2.x, SDXL, SD3 or FLUX pipeline — text encoders, n denoiser steps, VAE decode —
as one device program:

* the tokenizers run on the host, once per call (strings cannot live on a GPU); everything after them,
  the text encoders included ("fused text encoding"), is a fixed sequence of kernels over static
  buffers: token ids and the noise of every step in, images in [0, 1] out;
* the scheduler's per-step numbers are read from the pipeline's own scheduler once, when the program is
  built, so no scheduler bookkeeping (``step_index``, ``.item()``, Python-side indexing of device tensors)
  runs per call. Three samplers are replayed, which cover every export of stepdistill and the usual teachers:
  ``LCMScheduler`` (the re-noising sampler of VP students: x0, then fresh noise to the next timestep),
  ``DDIMScheduler`` at eta 0 (PCM and ``transition: ddim`` exports) and ``FlowMatchEulerDiscreteScheduler``
  (SD3, FLUX: deterministic Euler, or ``stochastic_sampling``, the re-noising sampler of flow students);
* classifier-free guidance runs as the pipelines run it, on a doubled batch, when ``guidance_scale > 1``; a
  guidance-embedded UNet (``unet.config.time_cond_proj_dim``: LCM, guidance distillation) takes the scale as
  an input instead, one pass per step, as diffusers does; so does FLUX (``guidance_embeds``), whose pipeline
  runs no CFG without a negative prompt. The negative ("") prompt's embeddings are computed
  once per program: they do not depend on the prompts;
* on CUDA the program is captured into a ``torch.cuda.CUDAGraph`` per (batch size, steps, timesteps, size,
  guidance) and replayed: one launch, no host synchronisation inside. Elsewhere it runs eagerly, the same
  code, which is how it is tested against the pipelines (tests/test_fast_sampler.py: equal images).

Noise is drawn on the host with ``diffusers.utils.torch_utils.randn_tensor`` in the order of the pipeline's
own draws (initial latents, then one per re-noising step), so the same generators give the same images as
the pipeline. (The SD3 and FLUX pipelines themselves draw their re-noising noise from torch's global RNG; here
it comes from ``generator``, as inside ``sampling.schedulers.seeded_steps``, which the evaluation uses.)

``stepdistill bench`` uses it for entries with ``fast=true`` (``configs/bench/sdxl_gpu.yaml``).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULERS = ("LCMScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler")


@dataclass
class FastOutput:
    """What a pipeline call returns, as far as the benchmark and the evaluation read it."""

    images: torch.Tensor


def _kind(pipe) -> str:
    """"sd" (SD 1.x/2.x), "sdxl", "sd3" or "flux"; ValueError for any other pipeline."""
    components = getattr(pipe, "components", {})
    if getattr(pipe, "transformer", None) is not None and getattr(pipe, "tokenizer_2", None) is not None:
        if "text_encoder_3" in components:
            return "sd3"
        if type(pipe).__name__ == "FluxPipeline":
            return "flux"
    if getattr(pipe, "unet", None) is not None:
        if getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "tokenizer_2", None) is not None:
            return "sdxl"
        if getattr(pipe, "text_encoder", None) is not None:
            return "sd"
    raise ValueError(f"FastSampler runs Stable Diffusion 1.x/2.x, SDXL, SD3 and FLUX pipelines; "
                     f"{type(pipe).__name__} is not one: call the pipeline itself (fast=false)")


def _check_scheduler(scheduler, kind: str) -> str:
    """The sampler to replay: "lcm", "ddim", "flow_renoise" or "flow_euler"."""
    name = type(scheduler).__name__
    flow = kind in ("sd3", "flux")
    allowed = ("FlowMatchEulerDiscreteScheduler",) if flow else ("LCMScheduler", "DDIMScheduler")
    if name not in allowed:
        raise ValueError(f"FastSampler replays {' / '.join(allowed)} for this pipeline, not {name}: use "
                         f"sampler={'flow_euler' if flow else 'lcm or sampler=ddim'} or fast=false")
    cfg = scheduler.config
    if name == "DDIMScheduler" and (cfg.get("clip_sample") or cfg.get("thresholding")):
        raise ValueError("FastSampler replays DDIM without clip_sample / thresholding (latent models use neither); "
                         "set them to false in the scheduler config or use fast=false")
    if name == "FlowMatchEulerDiscreteScheduler":
        return "flow_renoise" if cfg.get("stochastic_sampling") else "flow_euler"
    return "lcm" if name == "LCMScheduler" else "ddim"


class FastSampler:
    """The sampler of ``pipe`` (SD 1.x/2.x or SDXL with LCM / DDIM, SD3 with flow Euler) as one replayable program.

    ``cuda_graph``: capture on CUDA (default: when the denoiser lives on a CUDA device). ``__call__`` takes the
    arguments of the pipeline call it replaces and returns ``FastOutput(images)`` (``output_type="pt"``).
    """

    def __init__(self, pipe, cuda_graph: bool | None = None) -> None:
        if getattr(pipe, "switch", None) is not None:  # sampling.experts.SwitchedPipeline (Phased DMD)
            raise ValueError("FastSampler replays one backbone's sampler; this export switches experts per step "
                             "(Phased DMD): call the pipeline itself (fast=false / no --fast)")
        self.kind = _kind(pipe)
        self.sampler = _check_scheduler(pipe.scheduler, self.kind)
        encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
        if any(e is not None and getattr(e.config, "use_attention_mask", False) for e in encoders):
            raise ValueError("this text encoder reads an attention mask (use_attention_mask), which FastSampler does "
                             "not pass: call the pipeline itself (fast=false)")
        vae = pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False) and self.kind == "sdxl":
            raise ValueError("this VAE is decoded in float32 by the pipeline (force_upcast with float16 weights); "
                             "run the fast sampler in bfloat16 or with a float16-safe VAE")
        self.pipe = pipe
        self.denoiser = pipe.transformer if self.kind in ("sd3", "flux") else pipe.unet
        self.device = self.denoiser.device
        self.dtype = self.denoiser.dtype
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the pipeline on a CUDA device")
        self._programs: dict[tuple, _Program] = {}

    @property
    def scheduler(self):
        """The pipeline's scheduler, whose timesteps and coefficients the program replays."""
        return self.pipe.scheduler

    @property
    def w_embedded(self) -> bool:
        """The guidance scale is an input of the denoiser (one pass), not CFG on a doubled batch."""
        if self.kind == "flux":
            return True  # FluxPipeline runs no CFG without a negative prompt; guidance_embeds reads the scale
        return self.kind != "sd3" and self.pipe.unet.config.time_cond_proj_dim is not None

    # ---- the call ------------------------------------------------------------------------------------
    def __call__(self, prompt, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, generator=None, output_type: str = "pt",
                 timesteps=None):
        """As the pipeline's call; ``num_inference_steps`` / ``guidance_scale`` default to the pipeline's own."""
        if num_inference_steps is None or guidance_scale is None:
            params = inspect.signature(type(self.pipe).__call__).parameters
            num_inference_steps = params["num_inference_steps"].default if num_inference_steps is None \
                else num_inference_steps
            guidance_scale = params["guidance_scale"].default if guidance_scale is None else guidance_scale
        if output_type != "pt":
            raise ValueError(f"FastSampler returns image tensors (output_type='pt'), not {output_type!r}")
        if timesteps and self.kind in ("sd3", "flux"):
            raise ValueError(f"the {self.kind.upper()} pipeline takes no timesteps= (its schedule comes from the "
                             "scheduler's sigmas)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        default = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        size = default * self.pipe.vae_scale_factor  # the pipelines' default
        height, width = int(height or size), int(width or size)
        key = (len(prompts), int(num_inference_steps), tuple(timesteps) if timesteps else None, height, width,
               float(guidance_scale))
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = _Program(self, *key)
        ids = self._tokenize(prompts)
        noise = self._noise(program, generator)
        return FastOutput(program.run(ids, noise))

    def _tokenizers(self) -> list:
        pipe = self.pipe
        if self.kind == "sd":
            return [pipe.tokenizer]
        if self.kind in ("sdxl", "flux"):
            return [t for t in (pipe.tokenizer, pipe.tokenizer_2) if t is not None]
        return [pipe.tokenizer, pipe.tokenizer_2] + ([pipe.tokenizer_3] if pipe.text_encoder_3 is not None else [])

    def _tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        ids = []
        for k, tok in enumerate(self._tokenizers()):
            # SD3 / FLUX pad their T5 prompt to max_sequence_length (the pipelines' defaults 256 / 512), CLIP to 77.
            length = {("sd3", 2): 256, ("flux", 1): 512}.get((self.kind, k), tok.model_max_length)
            ids.append(tok(prompts, padding="max_length", max_length=length, truncation=True,
                           return_tensors="pt").input_ids)
        return ids

    def _noise(self, program: _Program, generator) -> list[torch.Tensor]:
        """The pipeline's draws, in its order: the initial latents, then one per re-noising step."""
        from diffusers.utils.torch_utils import randn_tensor

        return [randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
                for shape, dtype in zip(program.draw_shapes, program.draw_dtypes)]


class _Program:
    """One (batch, steps, timesteps, size, guidance) program: constants, static buffers, and on CUDA its graph."""

    def __init__(self, sampler: FastSampler, batch: int, num_steps: int, timesteps, height: int, width: int,
                 guidance: float) -> None:
        self.s, pipe = sampler, sampler.pipe
        dev, dtype = sampler.device, sampler.dtype
        self.latent_shape = (batch, sampler.denoiser.config.in_channels, height // pipe.vae_scale_factor,
                             width // pipe.vae_scale_factor)
        self.size = (height, width)
        self.flux_ids = None
        if sampler.kind == "flux":  # FLUX draws 2x2-patch latents and packs them into tokens (FluxPipeline)
            h, w = 2 * (height // (pipe.vae_scale_factor * 2)), 2 * (width // (pipe.vae_scale_factor * 2))
            self.latent_shape = (batch, sampler.denoiser.config.in_channels // 4, h, w)
            self.packed_shape = (batch, (h // 2) * (w // 2), sampler.denoiser.config.in_channels)
            self.flux_ids = (torch.zeros(512, 3, device=dev, dtype=dtype),  # text ids (512: the T5 length)
                             pipe._prepare_latent_image_ids(batch, h // 2, w // 2, dev, dtype))
        scheduler = copy.deepcopy(pipe.scheduler)  # the pipeline's own timestep rules, without touching it
        self.steps = self._schedule(scheduler, num_steps, timesteps)
        # Draws: initial latents (model dtype), then the re-noising noise of every non-final step (LCM draws it
        # in the model dtype, the flow scheduler in float32; neither needs the final step's draw).
        renoise = {"lcm": dtype, "flow_renoise": torch.float32}.get(sampler.sampler)
        self.draw_dtypes = [dtype] + ([renoise] * (len(self.steps) - 1) if renoise is not None else [])
        step_shape = self.packed_shape if sampler.kind == "flux" else self.latent_shape
        self.draw_shapes = [self.latent_shape] + [step_shape] * (len(self.draw_dtypes) - 1)
        # Guidance as the pipelines apply it: an embedded scale (one pass) or CFG on a doubled batch above 1.
        self.timestep_cond = None
        self.cfg_scale = None
        self.flux_guidance = None
        if sampler.kind == "flux":
            if sampler.denoiser.config.guidance_embeds:
                self.flux_guidance = torch.full([batch], guidance, device=dev, dtype=torch.float32)
        elif sampler.w_embedded:  # a guidance-embedded UNet reads w - 1 (diffusers' convention)
            w = torch.tensor(guidance - 1.0).repeat(batch)
            self.timestep_cond = pipe.get_guidance_scale_embedding(
                w, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(dev, dtype)
        elif guidance > 1:
            self.cfg_scale = float(guidance)
        self.negative = self._negative(batch) if self.cfg_scale is not None else None
        self.add_time_ids = None
        if sampler.kind == "sdxl":
            proj = pipe.text_encoder_2.config.projection_dim
            ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype,
                                         text_encoder_projection_dim=proj)
            self.add_time_ids = ids.to(dev).repeat(batch * (2 if self.cfg_scale else 1), 1)
        vae = pipe.vae
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        self.latents_mean_std = None
        if sampler.kind == "sdxl" and mean is not None and std is not None:  # as the SDXL pipeline decodes
            self.latents_mean_std = (torch.tensor(mean).view(1, -1, 1, 1).to(dev, dtype),
                                     torch.tensor(std).view(1, -1, 1, 1).to(dev, dtype))
        self.graph = None
        self.static_in: tuple | None = None
        self.static_out: torch.Tensor | None = None

    # ---- constants, read once --------------------------------------------------------------------
    def _schedule(self, scheduler, num_steps: int, timesteps) -> list[dict]:
        """Per step: the denoiser's timestep and the numbers of the scheduler's update (python floats)."""
        s = self.s
        dev = s.device
        if s.kind in ("sd3", "flux"):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
                calculate_shift,
                retrieve_timesteps,
            )

            cfg, kwargs = scheduler.config, {}
            if s.kind == "flux":  # as FluxPipeline.__call__: explicit sigmas, a shift from the token count
                if not cfg.get("use_flow_sigmas", False):
                    kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
                kwargs["mu"] = calculate_shift(self.packed_shape[1], cfg.get("base_image_seq_len", 256),
                                               cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                               cfg.get("max_shift", 1.15))
            elif cfg.get("use_dynamic_shifting", None):  # as StableDiffusion3Pipeline.__call__
                patch = s.denoiser.config.patch_size
                seq = (self.latent_shape[2] // patch) * (self.latent_shape[3] // patch)
                kwargs["mu"] = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
            steps, _ = retrieve_timesteps(scheduler, num_steps, "cpu", **kwargs)
            sigmas = [float(x) for x in scheduler.sigmas]
            return [{"t": steps[k].to(dev), "sigma": sigmas[k], "sigma_next": sigmas[k + 1]}
                    for k in range(len(steps))]

        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        steps, _ = retrieve_timesteps(scheduler, None if timesteps else num_steps, "cpu",
                                      list(timesteps) if timesteps else None)
        steps = [int(t) for t in steps]
        ac = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod)
        out = []
        for k, t in enumerate(steps):
            if s.sampler == "lcm":
                nxt = steps[k + 1] if k + 1 < len(steps) else None
                c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
                a_next = None if nxt is None else float(ac[nxt]) if nxt >= 0 else final
                update = {"c_skip": float(c_skip), "c_out": float(c_out),
                          "next": None if a_next is None else (a_next**0.5, (1 - a_next) ** 0.5)}
            else:  # DDIM at eta 0: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
                prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
                a_prev = float(ac[prev]) if prev >= 0 else final
                update = {"next": (a_prev**0.5, (1 - a_prev) ** 0.5)}
            out.append({"t": torch.tensor(t, device=dev), "sqrt_a": float(ac[t].sqrt()),
                        "sqrt_b": float((1 - ac[t]).sqrt()), **update})
        return out

    @torch.no_grad()
    def _negative(self, batch: int):
        """Embeddings of the empty negative prompt, as the pipeline's ``encode_prompt`` makes them (SDXL's
        ``force_zeros_for_empty_prompt``: zeros of their shape)."""
        s = self.s
        embeds, pooled = self._encode([i.to(s.device) for i in s._tokenize([""] * batch)])
        if s.kind == "sdxl" and s.pipe.config.force_zeros_for_empty_prompt:
            return torch.zeros_like(embeds), torch.zeros_like(pooled)
        return embeds, pooled

    # ---- the device program ----------------------------------------------------------------------
    def _encode(self, ids: list[torch.Tensor]):
        """(prompt embeddings, pooled embeddings or None) as the pipeline's ``encode_prompt`` computes them
        (checked against it through equal images in the tests)."""
        pipe, kind = self.s.pipe, self.s.kind
        if kind == "sd":
            return pipe.text_encoder(ids[0])[0].to(self.s.dtype), None
        if kind == "flux":  # CLIP's pooled output, T5's last hidden state
            pooled = pipe.text_encoder(ids[0], output_hidden_states=False).pooler_output.to(pipe.text_encoder.dtype)
            return pipe.text_encoder_2(ids[1], output_hidden_states=False)[0].to(pipe.text_encoder_2.dtype), pooled
        encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
        hidden, pooled = [], []
        for enc, tok_ids in zip(encoders, ids):
            out = enc(tok_ids, output_hidden_states=True)
            if out[0].ndim == 2:
                pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        if kind == "sdxl":  # the first 2-D output (text_encoder_2's projection)
            return torch.cat(hidden, dim=-1).to(self.s.dtype), pooled[0].to(self.s.dtype)
        clip = torch.cat(hidden, dim=-1).to(pipe.text_encoder.dtype)
        batch = ids[0].shape[0]
        if pipe.text_encoder_3 is None:
            t5 = torch.zeros(batch, 256, self.s.denoiser.config.joint_attention_dim, device=clip.device,
                             dtype=pipe.text_encoder.dtype)
        else:
            t5 = pipe.text_encoder_3(ids[2])[0].to(pipe.text_encoder_3.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def _denoise(self, x, step, embeds, pooled):
        """The denoiser's output at ``x``, guided as the pipeline guides it."""
        s = self.s
        if self.cfg_scale is not None:
            neg_embeds, neg_pooled = self.negative
            x_in, embeds = torch.cat([x, x]), torch.cat([neg_embeds, embeds])
            pooled = None if pooled is None else torch.cat([neg_pooled, pooled])
        else:
            x_in = x
        if s.kind == "flux":
            text_ids, image_ids = self.flux_ids
            t = step["t"].expand(x_in.shape[0]).to(x_in.dtype)
            out = s.denoiser(hidden_states=x_in, timestep=t / 1000, guidance=self.flux_guidance,
                             pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                             img_ids=image_ids, return_dict=False)[0]
        elif s.kind == "sd3":
            out = s.denoiser(hidden_states=x_in, timestep=step["t"].expand(x_in.shape[0]), encoder_hidden_states=embeds,
                             pooled_projections=pooled, return_dict=False)[0]
        else:
            added = {"text_embeds": pooled, "time_ids": self.add_time_ids} if s.kind == "sdxl" else None
            out = s.denoiser(x_in, step["t"], encoder_hidden_states=embeds, timestep_cond=self.timestep_cond,
                             added_cond_kwargs=added, return_dict=False)[0]
        if self.cfg_scale is not None:
            uncond, cond = out.chunk(2)
            out = uncond + self.cfg_scale * (cond - uncond)
        return out

    def _update(self, x, out, c, noise):
        """One scheduler step from ``x`` with the denoiser's ``out`` (``noise``: this step's re-noising draw)."""
        sampler = self.s.sampler
        if sampler.startswith("flow"):  # computed in float32, as FlowMatchEulerDiscreteScheduler.step
            sample = x.float()
            if sampler == "flow_euler":
                return (sample + (c["sigma_next"] - c["sigma"]) * out).to(out.dtype)
            x0 = sample - c["sigma"] * out
            return ((1.0 - c["sigma_next"]) * x0 + c["sigma_next"] * noise).to(out.dtype) if noise is not None \
                else ((1.0 - c["sigma_next"]) * x0).to(out.dtype)
        prediction = self.s.pipe.scheduler.config.prediction_type
        if prediction == "epsilon":
            x0 = (x - c["sqrt_b"] * out) / c["sqrt_a"]
        elif prediction == "v_prediction":
            x0 = c["sqrt_a"] * x - c["sqrt_b"] * out
        else:
            x0 = out
        if sampler == "ddim":
            eps = out if prediction == "epsilon" else c["sqrt_a"] * out + c["sqrt_b"] * x \
                if prediction == "v_prediction" else (x - c["sqrt_a"] * x0) / c["sqrt_b"]
            return c["next"][0] * x0 + c["next"][1] * eps
        denoised = c["c_out"] * x0 + c["c_skip"] * x
        return denoised if c["next"] is None else c["next"][0] * denoised + c["next"][1] * noise

    def _program(self, ids: list[torch.Tensor], noise: list[torch.Tensor]) -> torch.Tensor:
        pipe = self.s.pipe
        embeds, pooled = self._encode(ids)
        x = noise[0] * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
        if self.s.kind == "flux":
            x = pipe._pack_latents(x, *self.latent_shape)
        for k, c in enumerate(self.steps):
            out = self._denoise(x, c, embeds, pooled)
            x = self._update(x, out, c, noise[k + 1] if k + 1 < len(noise) else None)
        vae = pipe.vae
        if self.s.kind == "flux":
            x = pipe._unpack_latents(x, *self.size, pipe.vae_scale_factor)
        if self.s.kind in ("sd3", "flux"):
            x = x / vae.config.scaling_factor + vae.config.shift_factor
        elif self.latents_mean_std is not None:
            mean, std = self.latents_mean_std
            x = x * std / vae.config.scaling_factor + mean
        else:
            x = x / vae.config.scaling_factor
        image = vae.decode(x.to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def run(self, ids: list[torch.Tensor], noise: list[torch.Tensor]) -> torch.Tensor:
        dev = self.s.device
        with torch.no_grad():
            if not self.s.cuda_graph:
                return self._program([i.to(dev) for i in ids], noise)
            if self.graph is None:
                self._capture(ids, noise)
            static_ids, static_noise = self.static_in
            for buf, src in zip(static_ids, ids):
                buf.copy_(src, non_blocking=True)
            for buf, src in zip(static_noise, noise):
                buf.copy_(src, non_blocking=True)
            self.graph.replay()
            return self.static_out.clone()

    def _capture(self, ids, noise) -> None:
        dev = self.s.device
        static_ids = [i.to(dev).clone() for i in ids]
        static_noise = [n.to(dev).clone() for n in noise]
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy inits, cuDNN / compile autotuning
            for _ in range(2):
                self._program(static_ids, static_noise)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_out = self._program(static_ids, static_noise)
        self.graph, self.static_in = graph, (static_ids, static_noise)


__all__ = ["SCHEDULERS", "FastOutput", "FastSampler"]
