"""A host-sync-free few-step sampler for exported UNet students, captured into one CUDA graph.

``FastSampler(pipe)`` runs what ``pipe(prompts, num_inference_steps=n, output_type="pt")`` runs for a
Stable Diffusion 1.x/2.x or SDXL pipeline with an ``LCMScheduler`` (the re-noising scheduler every VP
export of stepdistill carries) — text encoders, n UNet steps, VAE decode — as one device program:

* the tokenizers run on the host, once per call (strings cannot live on a GPU); everything after them,
  the text encoders included ("fused text encoding"), is a fixed sequence of kernels over static
  buffers: token ids and the noise of every step in, images in [0, 1] out;
* the scheduler's per-step numbers (its timesteps, ``alphas_cumprod`` at each of them and the boundary
  scalings ``c_skip`` / ``c_out``) are read from the pipeline's own scheduler once, when the program is
  built, so no scheduler bookkeeping (``step_index``, ``.item()``, Python-side indexing of device tensors)
  runs per call;
* on CUDA the program is captured into a ``torch.cuda.CUDAGraph`` per (batch size, steps, timesteps,
  size) and replayed: one launch, no host synchronisation inside. Elsewhere it runs eagerly, the same
  code, which is how it is tested against the pipeline (tests/test_fast_sampler.py: equal images).

Noise is drawn on the host with ``diffusers.utils.torch_utils.randn_tensor`` in the pipeline's order
(initial latents, then one draw per non-final step), so the same generators give the same images as the
pipeline. Classifier-free guidance with a doubled batch is not run here: a guidance-embedded student
(``unet.config.time_cond_proj_dim``, LCM / guidance distillation) takes its scale as an input, as
diffusers' pipelines do; other students run at ``guidance_scale <= 1``.

``stepdistill bench`` uses it for entries with ``fast=true`` (``configs/bench/sdxl_gpu.yaml``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

FAMILIES = ("sd15", "sd2", "sdxl")


@dataclass
class FastOutput:
    """What a pipeline call returns, as far as the benchmark and the evaluation read it."""

    images: torch.Tensor


def _is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "tokenizer_2", None) is not None


class FastSampler:
    """The few-step sampler of ``pipe`` (SD 1.x/2.x or SDXL, ``LCMScheduler``) as one replayable program.

    ``cuda_graph``: capture on CUDA (default: when the UNet lives on a CUDA device). ``__call__`` takes the
    arguments of the pipeline call it replaces and returns ``FastOutput(images)`` (``output_type="pt"``).
    """

    def __init__(self, pipe, cuda_graph: bool | None = None) -> None:
        from diffusers import LCMScheduler

        if getattr(pipe, "unet", None) is None or (getattr(pipe, "text_encoder", None) is None and not _is_sdxl(pipe)):
            raise ValueError(f"FastSampler runs Stable Diffusion 1.x/2.x and SDXL pipelines (a UNet and CLIP text "
                             f"encoders); {type(pipe).__name__} is not one: call the pipeline itself (fast=false)")
        if not isinstance(pipe.scheduler, LCMScheduler):
            raise ValueError(f"FastSampler replays the re-noising sampler of exported students (LCMScheduler); this "
                             f"pipeline has a {type(pipe.scheduler).__name__}: use sampler=lcm or fast=false")
        enc = getattr(pipe, "text_encoder", None)
        if enc is not None and getattr(enc.config, "use_attention_mask", False):
            raise ValueError("this text encoder reads an attention mask (use_attention_mask), which FastSampler does "
                             "not pass: call the pipeline itself (fast=false)")
        vae = pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            raise ValueError("this VAE is decoded in float32 by the pipeline (force_upcast with float16 weights); "
                             "run the fast sampler in bfloat16 or with a float16-safe VAE")
        self.pipe = pipe
        self.sdxl = _is_sdxl(pipe)
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the pipeline on a CUDA device")
        self._programs: dict[tuple, _Program] = {}

    @property
    def scheduler(self):
        """The pipeline's scheduler, whose timesteps and coefficients the program replays."""
        return self.pipe.scheduler

    # ---- the call ------------------------------------------------------------------------------------
    def __call__(self, prompt, num_inference_steps: int = 1, guidance_scale: float = 0.0, height: int | None = None,
                 width: int | None = None, generator=None, output_type: str = "pt", timesteps=None):
        if output_type != "pt":
            raise ValueError(f"FastSampler returns image tensors (output_type='pt'), not {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor  # the pipelines' default
        height, width = int(height or size), int(width or size)
        w_embedded = self.pipe.unet.config.time_cond_proj_dim is not None
        if guidance_scale > 1 and not w_embedded:
            raise ValueError(f"guidance_scale={guidance_scale}: FastSampler runs no doubled-batch CFG; use a "
                             "guidance-embedded student (time_cond_proj_dim) or guidance_scale <= 1, or fast=false")
        key = (len(prompts), int(num_inference_steps), tuple(timesteps) if timesteps else None, height, width,
               float(guidance_scale) if w_embedded else None)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = _Program(self, *key)
        ids = self._tokenize(prompts)
        noise = self._noise(program, generator)
        return FastOutput(program.run(ids, noise))

    def _tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        tokenizers = [self.pipe.tokenizer, self.pipe.tokenizer_2] if self.sdxl else [self.pipe.tokenizer]
        return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in tokenizers if tok is not None]

    def _noise(self, program: _Program, generator) -> list[torch.Tensor]:
        """The pipeline's draws, in its order: the initial latents, then one per non-final step."""
        from diffusers.utils.torch_utils import randn_tensor

        return [randn_tensor(program.latent_shape, generator=generator, device=self.device, dtype=self.dtype)
                for _ in range(program.num_steps)]


class _Program:
    """One (batch, steps, timesteps, size, guidance) program: constants, static buffers, and on CUDA its graph."""

    def __init__(self, sampler: FastSampler, batch: int, num_steps: int, timesteps, height: int, width: int,
                 guidance) -> None:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        self.s, pipe = sampler, sampler.pipe
        dev, dtype = sampler.device, sampler.dtype
        scheduler = copy.deepcopy(pipe.scheduler)  # the pipeline's own timestep rules, without touching it
        steps, _ = retrieve_timesteps(scheduler, None if timesteps else num_steps, "cpu",
                                      list(timesteps) if timesteps else None)
        steps = [int(t) for t in steps]
        self.num_steps = len(steps)
        ac = scheduler.alphas_cumprod.double()
        self.consts = []
        for k, t in enumerate(steps):
            c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
            nxt = steps[k + 1] if k + 1 < len(steps) else None
            a_next = None if nxt is None else float(ac[nxt]) if nxt >= 0 else float(scheduler.final_alpha_cumprod)
            self.consts.append({
                "t": torch.tensor(t, device=dev),
                "sqrt_a": float(ac[t].sqrt()), "sqrt_b": float((1 - ac[t]).sqrt()),
                "c_skip": float(c_skip), "c_out": float(c_out),
                "next": None if a_next is None else (a_next**0.5, (1 - a_next) ** 0.5),
            })
        self.prediction_type = scheduler.config.prediction_type
        unet = pipe.unet
        self.latent_shape = (batch, unet.config.in_channels, height // pipe.vae_scale_factor,
                             width // pipe.vae_scale_factor)
        self.timestep_cond = None
        if guidance is not None:  # a guidance-embedded UNet reads w - 1 (diffusers' convention)
            w = torch.tensor(guidance - 1.0).repeat(batch)
            self.timestep_cond = pipe.get_guidance_scale_embedding(
                w, embedding_dim=unet.config.time_cond_proj_dim).to(dev, dtype)
        vae = pipe.vae
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        self.latents_mean_std = None
        if sampler.sdxl and mean is not None and std is not None:  # as the SDXL pipeline decodes
            self.latents_mean_std = (torch.tensor(mean).view(1, -1, 1, 1).to(dev, dtype),
                                     torch.tensor(std).view(1, -1, 1, 1).to(dev, dtype))
        self.add_time_ids = None
        if sampler.sdxl:
            proj = pipe.text_encoder_2.config.projection_dim
            ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype,
                                         text_encoder_projection_dim=proj)
            self.add_time_ids = ids.to(dev).repeat(batch, 1)
        self.graph = None
        self.static_in: tuple | None = None
        self.static_out: torch.Tensor | None = None

    # ---- the device program ----------------------------------------------------------------------
    def _encode(self, ids: list[torch.Tensor]):
        """Prompt embeddings as the pipeline's ``encode_prompt`` computes them (checked against it in the tests)."""
        pipe, dtype = self.s.pipe, self.s.dtype
        if not self.s.sdxl:
            enc = pipe.text_encoder
            return enc(ids[0])[0].to(dtype), None
        hidden, pooled = [], None
        encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
        for enc, tok_ids in zip(encoders, ids):
            out = enc(tok_ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype)

    def _program(self, ids: list[torch.Tensor], noise: list[torch.Tensor]) -> torch.Tensor:
        pipe = self.s.pipe
        embeds, pooled = self._encode(ids)
        added = {"text_embeds": pooled, "time_ids": self.add_time_ids} if self.s.sdxl else None
        x = noise[0] * pipe.scheduler.init_noise_sigma
        for k, c in enumerate(self.consts):
            out = pipe.unet(x, c["t"], encoder_hidden_states=embeds, timestep_cond=self.timestep_cond,
                            added_cond_kwargs=added, return_dict=False)[0]
            if self.prediction_type == "epsilon":
                x0 = (x - c["sqrt_b"] * out) / c["sqrt_a"]
            elif self.prediction_type == "v_prediction":
                x0 = c["sqrt_a"] * x - c["sqrt_b"] * out
            else:
                x0 = out
            denoised = c["c_out"] * x0 + c["c_skip"] * x
            x = denoised if c["next"] is None else c["next"][0] * denoised + c["next"][1] * noise[k + 1]
        vae = pipe.vae
        if self.latents_mean_std is not None:
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


__all__ = ["FAMILIES", "FastOutput", "FastSampler"]
