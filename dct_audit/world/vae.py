"""The world generator's VAE: a small ``diffusers.AutoencoderKL`` trained on procedural scenes.

The text-to-image model is a latent diffusion model so that it is a true ``StableDiffusionPipeline`` and so
that its UNet spends its capacity on layout (which shape, where, on which background) rather than on
pixels. Two levels of (16, 32) channels turn a 32x32 RGB scene into a 16x16x4 latent (3x compression): the
backgrounds are random textures (snow speckle, grass blades) that a stronger compression would blur.

Loss: MSE + a light L1 term on image gradients (keeps texture edges sharp) + a small KL term (keeps the
latent smooth and roughly unit-scaled for the diffusion model). ``scaling_factor`` is set to 1 / the
measured std of latent samples, as Stable Diffusion does. Training draws batches from a pool of scenes
rendered once from stream ``data_seed``, flipped left-right at random (a flipped scene is a valid scene).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from dct_audit.world import scenes as S
from dct_audit.world.trainloop import cosine_lr, run_record, train_loop

EVAL_SEED = 1_000_003  # held-out scene stream, as in world/clip.py


@dataclass
class VAEConfig:
    """Architecture. ``len(block_out_channels) - 1`` halvings: (16, 32) maps 32x32 images to 16x16 latents.

    Small on purpose: the decoder runs (with gradients) in every step of the audit's token inversion, and
    (32, 64) costs 4x the compute (480 vs 122 MFLOP per image for encode + decode) on a 2-core CPU.
    """

    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_attention: bool = False  # attention in the 16x16 mid block: no gain measured for textures
    image_size: int = 32


@dataclass
class VAETrainConfig:
    """Training settings (recorded in training.json)."""

    steps: int = 1200
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    kl_weight: float = 1e-4  # times the per-element KL, against the per-pixel MSE on [-1, 1]
    edge_weight: float = 0.5  # L1 of horizontal and vertical pixel differences
    pool: int = 10_000  # scenes rendered once from stream data_seed
    seed: int = 0
    data_seed: int = 0
    minutes: float | None = None
    dtype: str = "float16"  # storage dtype
    extra: dict = field(default_factory=dict)


def build_vae(config: VAEConfig | None = None, seed: int = 0) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` of this architecture (initialisation seeded)."""
    c = config or VAEConfig()
    n = len(c.block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        latent_channels=c.latent_channels,
        norm_num_groups=c.norm_num_groups,
        sample_size=c.image_size,
        mid_block_add_attention=c.mid_attention,
    )


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range diffusers' VAEs work in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def render_pool(n: int, data_seed: int, size: int = 32, chunk: int = 2000) -> np.ndarray:
    """uint8 (n, size, size, 3): scenes 0 .. n-1 of stream ``data_seed`` (uniform attributes)."""
    parts = [
        S.sample_scenes(min(chunk, n - s), data_seed, size=size, start=s).images for s in range(0, n, chunk)
    ]
    return np.concatenate(parts)


def vae_loss(
    vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, edge_weight: float, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction of a sampled latent: MSE + edge L1 + KL (all means per element)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    rec = vae.decode(z).sample
    mse = F.mse_loss(rec, x)
    edge = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    loss = mse + edge_weight * edge + kl_weight * kl
    return loss, {"mse": mse.item(), "edge": edge.item(), "kl": kl.item()}


@torch.no_grad()
def measure_vae(vae: AutoencoderKL, n: int = 500, seed: int = EVAL_SEED, batch: int = 250) -> dict:
    """Held-out reconstruction quality: PSNR (dB, images in [0, 1], from the posterior mean) overall and
    per background, and the mean/std of latent samples (what the diffusion model sees, before scaling)."""
    vae.eval()
    sq_err, per_bg, latents = [], {b: [] for b in S.BACKGROUNDS}, []
    g = torch.Generator().manual_seed(seed)
    for s in range(0, n, batch):
        sc = S.sample_scenes(min(batch, n - s), seed, size=vae.config.sample_size, start=s)
        x = to_model_range(sc.images)
        post = vae.encode(x).latent_dist
        latents.append(post.mean + post.std * torch.randn(post.mean.shape, generator=g))
        rec = vae.decode(post.mean).sample.clamp(-1, 1)
        err = ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3))  # per image, [0, 1] scale
        sq_err.append(err)
        for i, b in enumerate(sc.names("background")):
            per_bg[b].append(err[i].item())
    err = torch.cat(sq_err)
    z = torch.cat(latents)
    return {
        "n": n,
        "seed": seed,
        "psnr_db": round(-10 * math.log10(err.mean().item()), 2),
        "psnr_db_per_background": {b: round(-10 * math.log10(np.mean(v)), 2) for b, v in per_bg.items() if v},
        "latent_std": round(z.std().item(), 4),
        "latent_channel_mean": [round(v, 4) for v in z.mean(dim=(0, 2, 3)).tolist()],
        "latent_channel_std": [round(v, 4) for v in z.std(dim=(0, 2, 3)).tolist()],
    }


def train_vae(
    out: str | Path | None,
    train: VAETrainConfig | None = None,
    config: VAEConfig | None = None,
    *,
    eval_n: int = 500,
    log: Callable[[str], None] = print,
) -> AutoencoderKL:
    """Train the world VAE and save it to ``out`` (an ``AutoencoderKL`` folder plus ``training.json``).

    Deterministic for a given (seed, data_seed, steps, batch, pool) and thread count: step t draws its
    batch indices and flips from ``default_rng([data_seed, t])`` and its latent noise from a generator
    seeded with ``(seed, t)``. AdamW, linear warmup then cosine decay over ``steps``; ``minutes`` caps the
    wall time (the schedule is not shortened).
    """
    tc = train or VAETrainConfig()
    cfg = config or VAEConfig()
    t0 = time.time()
    images = render_pool(tc.pool, tc.data_seed, cfg.image_size)
    log(f"vae: rendered {tc.pool} scenes in {time.time() - t0:.0f}s")
    vae = build_vae(cfg, tc.seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.lr, weight_decay=0.0)
    parts: dict = {}

    def step(t: int) -> torch.Tensor:
        rng = np.random.default_rng([tc.data_seed, t])
        idx = rng.integers(0, len(images), tc.batch)
        x = to_model_range(images[idx])
        flip = torch.from_numpy(rng.random(tc.batch) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + t)
        loss, measured = vae_loss(vae, x, tc.kl_weight, tc.edge_weight, g)
        parts.update(measured)
        return loss

    def line(t: int, loss: float) -> str:
        psnr = -10 * math.log10(max(parts["mse"] / 4, 1e-12))
        return (
            f"vae step {t:5d}  loss {loss:.4f}  mse {parts['mse']:.4f} (~{psnr:.1f} dB)  "
            f"kl {parts['kl']:.3f}  {time.time() - t0:6.0f}s"
        )

    t1 = time.time()
    run = train_loop(
        opt,
        step,
        tc.steps,
        lambda t: cosine_lr(t, tc.steps, tc.lr, tc.warmup),
        clip_grad=vae.parameters(),
        minutes=tc.minutes,
        clock=lambda: time.time() - t0,
        log_every=50,
        log_line=line,
        log=log,
    )
    with torch.no_grad():  # round to the storage dtype first, so the measured model is the stored one
        for p in vae.parameters():
            p.copy_(p.to(getattr(torch, tc.dtype)).float())
    quality = measure_vae(vae, n=eval_n) if eval_n else {}
    if quality:
        vae.register_to_config(scaling_factor=round(1.0 / quality["latent_std"], 5))
    log(f"vae: {run.done} steps in {run.seconds:.0f}s (training {time.time() - t1:.0f}s); held-out {quality}")
    record = {
        "model": asdict(cfg),
        "train": {**asdict(tc), "steps_done": run.done, "final": parts},
        "parameters": sum(p.numel() for p in vae.parameters()),
        **run_record(run.seconds),
        "heldout": quality,
        "scaling_factor": vae.config.scaling_factor,
    }
    vae.eval()
    vae.training_record = record
    if out is not None:
        save_vae(vae, out, tc.dtype)
    return vae


def save_vae(vae: AutoencoderKL, out: str | Path, dtype: str = "float16") -> Path:
    """``save_pretrained`` in ``dtype`` (safetensors) plus ``training.json`` if the model carries a record."""
    out = Path(out)
    import copy

    copy.deepcopy(vae).to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    record = getattr(vae, "training_record", None)
    if record is not None:
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def load_vae(folder: str | Path) -> AutoencoderKL:
    """Load a saved world VAE as float32, in eval mode, with its training record if present."""
    folder = Path(folder)
    vae = AutoencoderKL.from_pretrained(folder, dtype=torch.float32).eval()
    if (folder / "training.json").is_file():
        vae.training_record = json.loads((folder / "training.json").read_text())
    return vae
