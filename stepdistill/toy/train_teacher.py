"""Train a shipped toy teacher from scratch: ``stepdistill toy train-teacher --kind sd|flow``.

``--kind sd`` (toy-sd, a ``StableDiffusionPipeline``):

1. the VAE on procedurally rendered training images (L1 + L2 reconstruction, a small KL term), then
   its ``scaling_factor`` = 1 / std of the latents, measured on 1024 fresh images;
2. a pool of training latents (posterior mean and std of rendered images, ``split="train"``: the
   held-out combinations are never seen);
3. the UNet and the CLIP text encoder jointly, with the DDPM epsilon loss (weighted so that the implied
   x0 error counts clamp(SNR, 1, 5): Min-SNR-5, and as much as in flow matching at high noise),
   captions encoded by the pipeline's own ``encode_prompt``, 10% of them dropped to "" so that
   classifier-free guidance works; AdamW, cosine learning rate, EMA of the trained weights.

``--kind flow`` (toy-flow, a ``StableDiffusion3Pipeline``) reuses the VAE of a trained toy-sd
(``--from-sd``, default: the shipped one; frozen) and trains the SD3 transformer together with its two
small CLIP encoders with projection, with the rectified-flow loss (velocity ``noise - x0``, sigmas
logit-normal then shifted like the scheduler's), prompts encoded by the pipeline's own
``encode_prompt`` with the same 10% caption dropout. The tiny T5 encoder stays at its seeded
initialisation (frozen): the pipeline needs one to reload with a plain ``from_pretrained``.

The pipeline is written with ``save_pretrained(out, safe_serialization=True)`` in shards under 5 MB (default ``out``: the
shipped folder under ``stepdistill/toy/assets/``) with a ``stepdistill_toy.json`` describing the run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stepdistill.toy import teachers
from stepdistill.toy.data import eval_prompts, sample_batch

DEFAULTS = {
    # kind: (denoiser steps, batch size, learning rate)
    "sd": (3000, 32, 1e-3),
    "flow": (1500, 32, 1e-3),
}


# Weight files stay under 5 MB each (diffusers shards larger models; loading is unchanged).
SHARD_SIZE = "4MB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stepdistill toy train-teacher",
        description="Train a toy teacher pipeline (toy-sd or toy-flow) from scratch on the procedural shapes.",
    )
    p.add_argument(
        "--kind", choices=("sd", "flow"), required=True, help="sd: toy-sd (UNet); flow: toy-flow (SD3)"
    )
    p.add_argument(
        "--out", default=None, help="output folder (default: the shipped stepdistill/toy/assets/toy-<kind>)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="denoiser training steps (default: sd 3000, flow 1500)"
    )
    p.add_argument("--vae-steps", type=int, default=1000, help="VAE training steps (sd only)")
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument(
        "--vae-from", default=None, help="sd: reuse the VAE of this toy-sd folder instead of training one"
    )
    p.add_argument("--batch-size", type=int, default=None, help="denoiser batch size (default 32)")
    p.add_argument("--lr", type=float, default=None, help="denoiser peak learning rate (default 1e-3)")
    p.add_argument("--pool", type=int, default=16384, help="number of pre-encoded training latents")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument(
        "--unet-channels", type=int, nargs="+", default=(48, 96), help="sd: UNet block_out_channels"
    )
    p.add_argument(
        "--kl-weight", type=float, default=1e-6, help="sd: VAE KL weight (per-pixel mean reconstruction)"
    )
    p.add_argument("--layers", type=int, default=4, help="flow: number of SD3 transformer blocks")
    p.add_argument(
        "--from-sd",
        default=None,
        help="flow: toy-sd folder whose VAE is reused (default: the shipped toy-sd)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy, shared CPU)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also save the EMA pipeline every N steps to OUT_checkpoints/step-N",
    )
    p.add_argument(
        "--grid", default=None, help="also write a 50-step sample grid PNG of the eval prompts here"
    )
    return p


# ---- helpers ------------------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: int, floor: float = 0.05):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _optimizer(params, lr: float, total: int, warmup: int = 100):
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup))


def _data_seed(seed: int, stream: int, step: int) -> int:
    """Distinct, reproducible seeds for each rendered batch (VAE stream 1, pool 2, scaling 3)."""
    return (seed * 7919 + stream) * 1_000_003 + step


def save_grid(images: torch.Tensor, path: str | Path, ncol: int = 15, upscale: int = 3) -> None:
    """[N, 3, H, W] images in [0, 1] -> a PNG grid (nearest-neighbour upscaled)."""
    import numpy as np
    from PIL import Image

    n, _, h, w = images.shape
    nrow = math.ceil(n / ncol)
    grid = torch.zeros(3, nrow * (h + 1), ncol * (w + 1))
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[:, r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = im
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((grid.shape[2] * upscale, grid.shape[1] * upscale), Image.NEAREST).save(
        path
    )


def generate(
    pipe, prompts: list[str], steps: int = 50, guidance: float = 3.0, seed: int = 0, batch: int = 75
):
    """Images [N, 3, 32, 32] in [0, 1] from a toy pipeline (seeded, in batches)."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), batch):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        result = pipe(
            prompts[i : i + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pt",
        )
        out.append(result.images.float().cpu())
    return torch.cat(out)


def _maybe_checkpoint(args, out: Path, step: int, pipe, ema, params) -> None:
    """With ``--save-every``: the pipeline with the EMA weights, to ``OUT_checkpoints/step-N``."""
    if not args.save_every or (step + 1) % args.save_every or step + 1 == args.steps:
        return
    ema.store(params)
    ema.copy_to(params)
    pipe.save_pretrained(
        str(out.parent / f"{out.name}_checkpoints" / f"step-{step + 1}"), safe_serialization=True
    )
    ema.restore(params)


# ---- VAE ----------------------------------------------------------------------------------------
def train_vae(args, device: torch.device):
    torch.manual_seed(args.seed)
    vae = teachers.build_vae().to(device).train()
    opt, sched = _optimizer(vae.parameters(), 1e-3, args.vae_steps, warmup=50)
    kl_weight = args.kl_weight
    bar = tqdm(range(args.vae_steps), desc="VAE", dynamic_ncols=True)
    for step in bar:
        x, _ = sample_batch(args.vae_batch_size, _data_seed(args.seed, 1, step), split="train")
        x = x.to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = (recon - x).abs().mean() + F.mse_loss(recon, x)
        loss = rec + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(rec=f"{rec.item():.4f}")
    vae.eval().requires_grad_(False)

    # scaling_factor: unit std of the latents the diffusion model sees (posterior samples).
    with torch.no_grad():
        x, _ = sample_batch(min(1024, args.pool), _data_seed(args.seed, 3, 0), split="train")
        posterior = vae.encode(x.to(device)).latent_dist
        z = posterior.sample()
        mse = F.mse_loss(vae.decode(posterior.mode()).sample.clamp(-1, 1), x.to(device)).item()
    scaling = round(1.0 / z.std().item(), 4)
    vae.register_to_config(scaling_factor=scaling)
    stats = {
        "vae_steps": args.vae_steps,
        "scaling_factor": scaling,
        "latent_channel_means": [round(v, 3) for v in z.mean(dim=(0, 2, 3)).tolist()],
        "reconstruction_mse": round(mse, 5),
        "reconstruction_psnr_db": round(10 * math.log10(4.0 / max(mse, 1e-12)), 2),
    }
    print(f"VAE: scaling_factor={scaling}, reconstruction PSNR {stats['reconstruction_psnr_db']} dB")
    return vae, stats


def encode_pool(vae, n: int, seed: int, device: torch.device, chunk: int = 512):
    """``n`` rendered training images -> (posterior mean, posterior std, captions), unscaled."""
    means, stds, captions = [], [], []
    with torch.no_grad():
        for i, start in enumerate(range(0, n, chunk)):
            x, attrs = sample_batch(min(chunk, n - start), _data_seed(seed, 2, i), split="train")
            posterior = vae.encode(x.to(device)).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            captions += [a.caption for a in attrs]
    return torch.cat(means), torch.cat(stds), captions


def _drop_captions(captions: list[str], generator: torch.Generator, p: float = 0.1) -> list[str]:
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


# ---- toy-sd -------------------------------------------------------------------------------------
def train_sd(args, out: Path, device: torch.device) -> dict:
    import tempfile

    from diffusers.training_utils import EMAModel

    t0 = time.time()
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = (
            AutoencoderKL.from_pretrained(str(Path(args.vae_from) / "vae"))
            .to(device)
            .eval()
            .requires_grad_(False)
        )
        vae_stats = {"vae_from": str(args.vae_from), "scaling_factor": vae.config.scaling_factor}
    else:
        vae, vae_stats = train_vae(args, device)
    t_vae = time.time() - t0
    scale = vae.config.scaling_factor
    means, stds, captions = encode_pool(vae, args.pool, args.seed, device)

    torch.manual_seed(args.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = teachers.write_clip_tokenizer(Path(tmp) / "tokenizer")
    text_encoder = teachers.build_clip_text_model(len(tokenizer)).to(device).train()
    unet = teachers.build_unet(tuple(args.unet_channels)).to(device).train()
    unet.to(memory_format=torch.channels_last)  # ~10% faster convolutions on CPU
    pipe = teachers.assemble_sd(vae, text_encoder, tokenizer, unet)
    noise_sched = teachers.training_scheduler()
    alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # Loss weight per timestep, written as the weight of the implied x0 error (eps-MSE * w = x0-MSE * w * snr):
    # clamp(snr, 1, 5). Above SNR 5 this is Min-SNR-5 (Hang et al. 2023). Below SNR 1 the plain eps loss
    # weighs the x0 error by snr ~ 0 — and at high noise is where the layout (which colour, where) is
    # decided; weighing it by 1 there, as flow matching does, is what teaches the UNet to put the shape
    # where the prompt says instead of where the starting noise happens to suggest.
    weights = snr.clamp(min=1.0, max=5.0) / snr

    params = [*unet.parameters(), *text_encoder.parameters()]
    opt, lr_sched = _optimizer(params, args.lr, args.steps)
    ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, power=2 / 3)
    gen = torch.Generator().manual_seed(args.seed + 2)
    bar = tqdm(range(args.steps), desc="UNet + text encoder", dynamic_ncols=True)
    t1 = time.time()
    for step in bar:
        idx = torch.randint(len(captions), (args.batch_size,), generator=gen)
        eps_z = torch.randn(args.batch_size, *means.shape[1:], generator=gen).to(device)
        latents = (means[idx] + stds[idx] * eps_z) * scale
        prompts = _drop_captions([captions[i] for i in idx.tolist()], gen)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch_size,), generator=gen).to(
            device
        )
        noisy = noise_sched.add_noise(latents, noise, t)
        embeds = pipe.encode_prompt(prompts, device, 1, False)[0]
        pred = unet(noisy, t, embeds).sample
        loss = (weights[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema.step(params)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        _maybe_checkpoint(args, out, step, pipe, ema, params)
    t_denoiser = time.time() - t1
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    pipe.save_pretrained(str(out), safe_serialization=True, max_shard_size=SHARD_SIZE)
    return {
        **vae_stats,
        "denoiser_steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "unet_channels": list(args.unet_channels),
        "parameters": {
            "vae": teachers.count_parameters(vae),
            "text_encoder": teachers.count_parameters(text_encoder),
            "unet": teachers.count_parameters(unet),
        },
        "seconds": {"vae": round(t_vae), "denoiser": round(t_denoiser), "total": round(time.time() - t0)},
    }


# ---- toy-flow -----------------------------------------------------------------------------------
def _flow_text_encoders(tmp: Path):
    """The two CLIP encoders with projection (fresh, trained with the transformer) and a tiny T5 (frozen)."""
    encoders, tokenizers = [], []
    for i in range(2):
        tokenizers.append(teachers.write_clip_tokenizer(tmp / f"tokenizer_{i}"))
        encoders.append(teachers.build_clip_text_model(len(tokenizers[-1]), with_projection=True))
    tokenizers.append(teachers.write_t5_tokenizer(tmp / "tokenizer_3"))
    encoders.append(teachers.build_t5_encoder(len(tokenizers[-1])))
    return encoders, tokenizers


def train_flow(args, out: Path, device: torch.device) -> dict:
    import tempfile

    from diffusers import DiffusionPipeline
    from diffusers.training_utils import EMAModel

    t0 = time.time()
    # A shipped teacher's name means its shipped folder; anything else is a pipeline folder.
    source = args.from_sd or "toy-sd"
    sd_path = str(teachers.teacher_path(source)) if source in teachers.TEACHERS else source
    sd_pipe = DiffusionPipeline.from_pretrained(sd_path)
    vae = sd_pipe.vae.to(device).eval().requires_grad_(False)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    means, stds, captions = encode_pool(vae, args.pool, args.seed, device)

    torch.manual_seed(args.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        encoders, tokenizers = _flow_text_encoders(Path(tmp))
    transformer = teachers.build_sd3_transformer(num_layers=args.layers).to(device).train()
    for encoder in encoders[:2]:
        encoder.to(device).train()
    encoders[2].to(device).eval().requires_grad_(False)
    pipe = teachers.assemble_flow(vae, encoders, tokenizers, transformer)

    shift_t = pipe.scheduler.config.shift
    params = [*transformer.parameters(), *encoders[0].parameters(), *encoders[1].parameters()]
    opt, lr_sched = _optimizer(params, args.lr, args.steps)
    ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, power=2 / 3)
    gen = torch.Generator().manual_seed(args.seed + 2)
    bar = tqdm(range(args.steps), desc="SD3 transformer + CLIP encoders", dynamic_ncols=True)
    t1 = time.time()
    for step in bar:
        idx = torch.randint(len(captions), (args.batch_size,), generator=gen)
        eps_z = torch.randn(args.batch_size, *means.shape[1:], generator=gen).to(device)
        x0 = (means[idx] + stds[idx] * eps_z - shift) * scale
        prompts = _drop_captions([captions[i] for i in idx.tolist()], gen)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False
        )
        noise = torch.randn(x0.shape, generator=gen).to(device)
        u = torch.sigmoid(torch.randn(args.batch_size, generator=gen)).to(device)  # logit-normal (SD3)
        sigma = shift_t * u / (1 + (shift_t - 1) * u)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        pred = transformer(
            hidden_states=noisy,
            timestep=sigma * pipe.scheduler.config.num_train_timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
        ).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema.step(params)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        _maybe_checkpoint(args, out, step, pipe, ema, params)
    t_denoiser = time.time() - t1
    ema.copy_to(params)
    for module in (transformer, encoders[0], encoders[1]):
        module.eval().requires_grad_(False)
    pipe.save_pretrained(str(out), safe_serialization=True, max_shard_size=SHARD_SIZE)
    return {
        "from_sd": str(sd_path),
        "denoiser_steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "layers": args.layers,
        "flow_shift": shift_t,
        "parameters": {
            "transformer": teachers.count_parameters(transformer),
            "text_encoders": [teachers.count_parameters(e) for e in encoders],
            "vae": teachers.count_parameters(vae),
        },
        "seconds": {"denoiser": round(t_denoiser), "total": round(time.time() - t0)},
    }


# ---- entry point --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    steps, batch_size, lr = DEFAULTS[args.kind]
    args.steps = steps if args.steps is None else args.steps
    args.batch_size = batch_size if args.batch_size is None else args.batch_size
    args.lr = lr if args.lr is None else args.lr
    for name in ("steps", "vae_steps", "batch_size", "pool", "vae_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = {"sd": "toy-sd", "flow": "toy-flow"}[args.kind]
    out = Path(args.out) if args.out else teachers.ASSETS_DIR / name
    device = torch.device(args.device)

    info = train_sd(args, out, device) if args.kind == "sd" else train_flow(args, out, device)
    info = {"teacher": name, "seed": args.seed, "device": args.device, **info}
    info["size_mb"] = round(teachers.folder_size(out) / 2**20, 2)
    (out / "stepdistill_toy.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {name} to {out} ({info['size_mb']} MB) in {info['seconds']['total']} s")

    if args.grid:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(out)).to(device)
        save_grid(generate(pipe, eval_prompts("all")), args.grid)
        print(f"sample grid (eval prompts, 50 steps, guidance 3) -> {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
