"""The toy attribute classifier: colour, kind and position of the shape in a 32×32 toy image.

It is the toy domain's stand-in for both Inception and CLIP: its penultimate features are the FID/KID
feature space (``stepdistill.eval.spaces.ToySpace``) and its predictions give the prompt-alignment
score (are colour, kind and position the ones the prompt asked for?).

Trained by ``stepdistill toy train-classifier`` (``main`` here) on procedural images of *every*
combination — the held-out combinations are held out from the generative teachers only, the judge
must know them — with augmentations (noise, blur, colour and brightness jitter, one-pixel shifts) so
that slightly imperfect generated shapes are still classified by their attributes. The weights are
shipped in ``stepdistill/toy/assets/classifier`` (``model.safetensors`` + ``config.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from stepdistill.toy.data import COLORS, KINDS, POSITIONS, RESOLUTION, sample_batch

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "classifier"
TRAIN_COMMAND = "stepdistill toy train-classifier"

# The attribute heads, in the order of ``Attributes.labels`` and of ``ToyClassifier.forward``.
HEADS = ("color", "kind", "position")
NUM_CLASSES = {"color": len(COLORS), "kind": len(KINDS), "position": len(POSITIONS)}


class ToyClassifier(nn.Module):
    """Small CNN: [N, 3, 32, 32] images in [-1, 1] → logits for colour, kind and position.

    Three strided convolutions (32 → 16 → 8 → 4 pixels; 5×5 on the input, then 3×3) keep the spatial
    layout up to a 4×4 grid, which a linear layer turns into ``feature_dim`` features; position is read
    from where the shape is, so there is no global pooling. No normalisation layers: the network is
    shallow enough to train without them, it is ~3× faster on a CPU than with GroupNorm, and train and
    eval mode compute the same function (features never depend on what else is in the batch).
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, resolution: int = RESOLUTION):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "resolution": resolution}
        self.resolution = resolution
        self.feature_dim = feature_dim
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 5, stride=2, padding=2),  # 16×16
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # 8×8
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),  # 4×4
            nn.SiLU(),
        )
        grid = resolution // 8
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * grid * grid, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in NUM_CLASSES.items()})
        # Metric-feature normalisation, fixed once after training (``calibrate_features``) and saved
        # with the weights: ``metric_features = (features - feature_mean) / feature_scale``.
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(()))

    def _check(self, images: torch.Tensor) -> None:
        expected = (3, self.resolution, self.resolution)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"ToyClassifier expects images of shape [N, {', '.join(map(str, expected))}] in [-1, 1], "
                f"got {tuple(images.shape)}"
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, feature_dim] of images [N, 3, 32, 32] in [-1, 1]."""
        self._check(images)
        return self.neck(self.trunk(images.float()))

    def metric_features(self, images: torch.Tensor) -> torch.Tensor:
        """``features`` centred on clean procedural images and scaled to unit mean variance a feature.

        The FID/KID/diversity space (``stepdistill.eval.spaces.ToySpace``). FID is shift-invariant
        and only rescaled by this; KID's polynomial kernel needs features of order one (the raw ones
        reach ~50, which made its float32 estimate cancel catastrophically).
        """
        return (self.features(images) - self.feature_mean) / self.feature_scale

    @torch.no_grad()
    def calibrate_features(self, n: int = 5000, seed: int = 30_000) -> None:
        """Set ``feature_mean``/``feature_scale`` from ``n`` clean procedural images of every combination."""
        images, _ = sample_batch(n, seed=seed, split="all")
        feats = torch.cat([self.features(chunk) for chunk in images.split(500)])
        self.feature_mean.copy_(feats.mean(dim=0))
        self.feature_scale.copy_(feats.var(dim=0).mean().sqrt())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(colour_logits, kind_logits, position_logits) of images [N, 3, 32, 32] in [-1, 1]."""
        feats = self.features(images)
        return tuple(self.heads[name](feats) for name in HEADS)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted class indices [N, 3] (colour, kind, position), computed in chunks."""
        out = []
        for chunk in images.split(batch_size):
            out.append(torch.stack([logits.argmax(-1) for logits in self(chunk)], dim=1))
        return torch.cat(out) if out else torch.zeros(0, 3, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------
# Augmentation: the artefacts of generated images, at a strength that leaves the attributes readable.


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur (5-tap kernel, standard deviation ``sigma`` pixels), edges replicated."""
    taps = torch.arange(-2, 3, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(taps**2) / (2 * max(sigma, 1e-3) ** 2))
    kernel = (kernel / kernel.sum()).repeat(images.shape[1], 1)  # [C, 5]: one depthwise filter a channel
    c = images.shape[1]
    x = F.conv2d(F.pad(images, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=c)


def augment(images: torch.Tensor, generator: torch.Generator, p: float = 0.8) -> torch.Tensor:
    """Randomly corrupt a fraction ``p`` of a batch of [-1, 1] images; the rest stay clean.

    Slight blur (σ ≤ 0.9 px, on half of them), colour jitter (per-channel gain ±10 %, offset ±0.06),
    brightness (±0.1), a one-pixel shift, and gaussian noise (σ ≤ 0.12); result clamped to [-1, 1].
    """
    n = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    out = images.clone()
    chosen = torch.rand(n, generator=generator) < p
    x = out[chosen]
    m = x.shape[0]
    if m == 0:
        return out
    blur = torch.rand(m, generator=generator) < 0.5
    if blur.any():  # one blur strength a batch (cheaper than one a image, as varied over training)
        x[blur] = _gaussian_blur(x[blur], uniform(0.3, 0.9, 1).item())
    x = x * uniform(0.9, 1.1, m, 3, 1, 1) + uniform(-0.06, 0.06, m, 3, 1, 1)  # colour jitter
    x = x + uniform(-0.1, 0.1, m, 1, 1, 1)  # brightness
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()  # one shift for the whole batch
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    x = x + torch.randn(x.shape, generator=generator) * uniform(0.0, 0.12, m, 1, 1, 1)
    out[chosen] = x.clamp(-1.0, 1.0)
    return out


# ----------------------------------------------------------------------------------------------------
# Training, saving, loading.


def _labels(attrs) -> torch.Tensor:
    return torch.tensor([a.labels for a in attrs], dtype=torch.long)  # [N, 3]


@torch.no_grad()
def accuracies(
    model: ToyClassifier, n: int = 2000, seed: int = 10_000, split: str = "all"
) -> dict[str, float]:
    """Accuracy per attribute and for all three at once, on ``n`` fresh clean procedural images."""
    images, attrs = sample_batch(n, seed=seed, split=split)
    correct = model.eval().predict(images) == _labels(attrs)
    result = {name: correct[:, i].float().mean().item() for i, name in enumerate(HEADS)}
    result["all_three"] = correct.all(dim=1).float().mean().item()
    return result


def train_classifier(
    out_dir: str | Path = ASSETS_DIR,
    steps: int = 1200,
    batch_size: int = 128,
    seed: int = 0,
    lr: float = 2e-3,
    width: int = 32,
    feature_dim: int = 128,
    threads: int | None = 1,
) -> Path:
    """Train the classifier on every attribute combination and save it to ``out_dir``.

    Each step draws a fresh procedural batch (``sample_batch(split="all")``, seeds ``seed*10**6 + step``)
    and augments it; AdamW with a one-cycle schedule. Writes ``model.safetensors`` and ``config.json``
    (architecture, training settings, accuracies on 2000 fresh clean images and on augmented ones).

    ``threads``: torch intra-op threads while training (restored afterwards; None keeps the current
    setting). One is the default: the network is too small to gain from more, and on a busy 2-core
    machine two spinning threads made each step ~10× slower.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(Path(out_dir), steps, batch_size, seed, lr, width, feature_dim)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    out_dir: Path, steps: int, batch_size: int, seed: int, lr: float, width: int, feature_dim: int
) -> Path:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ToyClassifier(width=width, feature_dim=feature_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)

    start = time.time()
    model.train()
    bar = tqdm(range(steps), desc="toy classifier", unit="step")
    for step in bar:
        images, attrs = sample_batch(batch_size, seed=seed * 10**6 + step, split="all")
        images = augment(images, generator)
        labels = _labels(attrs)
        logits = model(images)
        loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = time.time() - start

    model.eval()
    model.calibrate_features()
    clean = accuracies(model, seed=10_000 + seed)
    # Robustness check: the same kind of fresh batch, augmented.
    images, attrs = sample_batch(2000, seed=20_000 + seed, split="all")
    with torch.no_grad():
        correct = model.predict(augment(images, torch.Generator().manual_seed(seed), p=1.0)) == _labels(attrs)
    augmented = {name: correct[:, i].float().mean().item() for i, name in enumerate(HEADS)}
    augmented["all_three"] = correct.all(dim=1).float().mean().item()

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    config = {
        "architecture": "ToyClassifier",
        **model.config,
        "heads": {name: NUM_CLASSES[name] for name in HEADS},
        "classes": {"color": list(COLORS), "kind": list(KINDS), "position": list(POSITIONS)},
        "training": {
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "lr": lr,
            "split": "all",
            "seconds": round(train_seconds, 1),
            "final_loss": round(loss.item(), 5),
        },
        "accuracy_clean": {k: round(v, 5) for k, v in clean.items()},
        "accuracy_augmented": {k: round(v, 5) for k, v in augmented.items()},
        "accuracy_note": "2000 fresh procedural images of all combinations (seed 10000+seed clean, 20000+seed augmented)",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"saved {out_dir} in {train_seconds:.0f}s; clean accuracy {clean}; augmented {augmented}")
    return out_dir


def load_classifier(device: str | torch.device = "cpu", path: str | Path | None = None) -> ToyClassifier:
    """The shipped classifier (or the one saved in ``path``), in eval mode with gradients off."""
    folder = Path(path) if path is not None else ASSETS_DIR
    weights, config_file = folder / "model.safetensors", folder / "config.json"
    if not (weights.is_file() and config_file.is_file()):
        raise FileNotFoundError(
            f"no toy classifier in {folder} (expected model.safetensors and config.json); "
            f"make it with `{TRAIN_COMMAND}" + (f" --out {folder}`" if path is not None else "`")
        )
    config = json.loads(config_file.read_text())
    model = ToyClassifier(config["width"], config["feature_dim"], config.get("resolution", RESOLUTION))
    model.load_state_dict(load_file(str(weights)))
    model.requires_grad_(False)
    return model.eval().to(device)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog=TRAIN_COMMAND, description="Train the toy attribute classifier (FID features, alignment)."
    )
    parser.add_argument("--out", default=str(ASSETS_DIR), help="output folder (default: the shipped assets)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while training")
    args = parser.parse_args(argv)
    return train_classifier(
        args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads
    )


if __name__ == "__main__":
    main()
