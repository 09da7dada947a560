"""The world's text-to-image model: a latent diffusion ``StableDiffusionPipeline`` trained on scenes.

The UNet works in the 16x16x4 latent space of the world VAE (``world/vae.py``) and is conditioned on the
last hidden state of the frozen world-CLIP text tower (``world/clip.py``), as Stable Diffusion is on
OpenAI's CLIP. Choices, each from a measured failure of the pixel-space prototype (see WORLD-NOTES):

- v-prediction, zero-terminal-SNR betas and DDIM with ``trailing`` spacing (Lin et al. 2023): with a
  schedule whose last step keeps signal, large uniform regions (the background) follow the initial noise
  instead of the prompt;
- a min-SNR loss weight with a floor (Hang et al. 2023): the v-loss of the noisiest steps (predict the
  prompt's mean image) is large and noisy and drowned out the middle steps where shapes are decided;
- cross-attention at 8x8 and 4x4 (where layout is decided) and the attention-pooled prompt added to the
  time embedding (diffusers' ``addition_embed_type="text"``), so every ResNet block sees the prompt;
- captions in several phrasings, with attributes left out at random (an unmentioned attribute is then
  random, as the audit's "a photo of <tok> star" baseline needs) and dropped whole for classifier-free
  guidance; EMA weights are what is saved.

The generator's code, by concern: ``world/unet.py`` (architecture, schedule, text tower), ``world/captions.py``
(training captions), this module (the encoded scene pool, training, saving, the command line) and
``world/fidelity.py`` (how faithfully samples follow prompts).

The saved folder is an ordinary diffusers pipeline folder (safetensors, fp16 storage) plus
``training.json`` (settings, data seed, wall time, fidelity) and ``dct_audit_defaults.json`` (the
sampling steps and guidance it was measured with).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from dct_audit.adapters.generator_load import DEFAULTS_FILE, SHARED_FILE
from dct_audit.world import scenes as S
from dct_audit.world.captions import training_caption
from dct_audit.world.fidelity import (
    checker_judge,
    clip_judge,
    default_judge,
    measure_fidelity,
    record_fidelity,
)
from dct_audit.world.paths import CLIP as CLIP_FOLDER
from dct_audit.world.paths import GENERATOR
from dct_audit.world.trainloop import constant_lr, decay_groups, train_loop
from dct_audit.world.unet import UNetConfig, build_scheduler, build_unet, encode_prompts, load_text_encoder
from dct_audit.world.vae import load_vae, render_pool, to_model_range

SHIPPED = GENERATOR


@dataclass
class GeneratorTrainConfig:
    """Training settings (recorded in training.json)."""

    steps: int = 6000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.998  # averages ~500 steps: a CPU run is only a few thousand
    caption_dropout: float = 0.1  # whole caption -> "" (the unconditional branch of CFG)
    full_captions: float = 0.5  # of the rest, scenes.py captions; the others are partial
    attribute_keep: float = 0.7  # in partial captions, each of colour/context/background is named w.p.
    snr_gamma: float = 5.0  # x0-space loss weight min(SNR, gamma) + snr_floor (0 gamma: plain v-loss)
    snr_floor: float = 0.2
    pool: int = 30_000  # scenes rendered and encoded once from stream data_seed
    seed: int = 0
    data_seed: int = 0
    minutes: float | None = None
    checkpoint_minutes: float | None = 15.0
    sample_steps: int = 20  # the defaults recorded for users of the folder
    sample_guidance: float = 3.0
    dtype: str = "float16"  # storage dtype of the UNet and VAE


class LatentPool:
    """Scenes of stream ``data_seed`` encoded once by the VAE: posterior mean and std, and attributes."""

    def __init__(self, vae: AutoencoderKL, n: int, data_seed: int, cache: str | Path | None = None):
        key = f"pool_{n}_{data_seed}_{_vae_fingerprint(vae)}.pt"
        path = Path(cache) / key if cache else None
        if path is not None and path.is_file():
            blob = torch.load(path, weights_only=True)  # a cache of plain tensors (ours)
        else:
            images = render_pool(n, data_seed, vae.config.sample_size)
            attrs = S.draw_attributes(n, data_seed)
            means, stds = [], []
            with torch.no_grad():
                for s in range(0, n, 500):
                    post = vae.encode(to_model_range(images[s : s + 500])).latent_dist
                    means.append(post.mean.half())
                    stds.append(post.std.half())
            blob = {"mean": torch.cat(means), "std": torch.cat(stds)}
            blob.update({a: torch.from_numpy(attrs[a]) for a in S.ATTRIBUTES})
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(blob, path)
        self.mean, self.std = blob["mean"], blob["std"]
        self.attrs = {a: blob[a].numpy() for a in S.ATTRIBUTES}

    def __len__(self) -> int:
        return len(self.mean)

    def names(self, i: int) -> dict[str, str]:
        return {a: S.VOCAB[a][int(self.attrs[a][i])] for a in S.ATTRIBUTES}


def _vae_fingerprint(vae: AutoencoderKL) -> str:
    with torch.no_grad():
        s = sum(float(p.double().abs().sum()) for p in vae.parameters())
    return f"{s:.6e}".replace(".", "").replace("+", "")


def train_generator(
    out: str | Path | None,
    train: GeneratorTrainConfig | None = None,
    config: UNetConfig | None = None,
    *,
    vae: str | Path = SHIPPED / "vae",
    clip: str | Path = CLIP_FOLDER,
    cache: str | Path | None = None,
    resume: str | Path | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> Path | None:
    """Train the UNet and save the whole pipeline to ``out`` (also every ``checkpoint_minutes``).

    ``vae`` is a folder written by ``vae.train_vae`` (default: the shipped pipeline's VAE); ``clip`` a
    world-CLIP folder (its tokenizer and text tower are used frozen and referenced by the pipeline).
    Deterministic for a given (seed, data_seed, steps, batch, pool) and thread count: step t draws its
    scenes and captions from ``default_rng([data_seed, t])`` and its timesteps and noise from a generator
    seeded with ``(seed, t)``. AdamW with warmup and a constant rate (so any checkpoint is as usable as the
    last), EMA weights saved. ``minutes`` caps the training time (checkpoints excluded); ``cache`` keeps the
    encoded scene pool between runs; ``resume`` is a state file written at each checkpoint and read at the
    start, so a killed run continues where it was saved; ``on_checkpoint(folder, step)`` runs after each
    save (e.g. a fidelity check).
    """
    tc = train or GeneratorTrainConfig()
    cfg = config or UNetConfig()
    t0 = time.time()
    vae_model = load_vae(vae)
    tokenizer, text_encoder = load_text_encoder(clip)
    data = LatentPool(vae_model, tc.pool, tc.data_seed, cache)
    log(f"generator: pool of {len(data)} encoded scenes ready in {time.time() - t0:.0f}s")
    unet = build_unet(
        cfg,
        text_encoder.config.hidden_size,
        sample_size=vae_model.config.sample_size // 2 ** (len(vae_model.config.block_out_channels) - 1),
        channels=vae_model.config.latent_channels,
        seed=tc.seed,
    ).train()
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas).clamp_min(1e-12)
    if tc.snr_gamma > 0:  # v-loss weight = x0-loss weight / (SNR + 1)
        weight = (snr.clamp(max=tc.snr_gamma) + tc.snr_floor) / (snr + 1)
    else:
        weight = torch.ones_like(snr)
    opt = torch.optim.AdamW(decay_groups(unet.named_parameters(), tc.weight_decay), lr=tc.lr)
    scale = vae_model.config.scaling_factor
    record = {
        "model": asdict(cfg),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "train": asdict(tc),
        "vae": getattr(vae_model, "training_record", None),
        "clip": str(clip),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    log(f"generator: UNet {record['unet_parameters'] / 1e6:.2f}M parameters")
    start, spent, losses = 0, 0.0, []
    state_path = Path(resume) if resume else None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=True)  # tensors, numbers and lists only
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start, spent, losses = state["step"], state["seconds"], state["losses"]
        log(f"generator: resumed at step {start} ({spent:.0f}s of training already done)")
    record["setup_seconds"] = round(time.time() - t0, 1)
    t1, paused, last_ckpt, done = time.time(), 0.0, time.time(), start

    def elapsed() -> float:  # training seconds over all runs, checkpoints and evaluations excluded
        return spent + time.time() - t1 - paused

    def checkpoint() -> None:
        record.update(
            steps_done=done, wall_time_s=round(elapsed(), 1), final_loss=float(np.mean(losses[-50:]))
        )
        save_pipeline(out, ema, vae_model, clip, scheduler, record, tc)
        if state_path is not None:
            state = {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}
            torch.save({**state, "step": done, "seconds": elapsed(), "losses": losses[-200:]}, state_path)
        log(f"generator: step {done} saved to {out}")
        if on_checkpoint is not None:
            on_checkpoint(Path(out), done)

    def step(t: int) -> torch.Tensor:
        rng = np.random.default_rng([tc.data_seed, t, 11])
        idx = rng.integers(0, len(data), tc.batch)
        prompts = [
            training_caption(data.names(i), rng, tc.caption_dropout, tc.full_captions, tc.attribute_keep)
            for i in idx
        ]
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + t)
        mean, std = data.mean[idx].float(), data.std[idx].float()
        x0 = (mean + std * torch.randn(mean.shape, generator=g)) * scale
        noise = torch.randn(x0.shape, generator=g)
        ts = torch.randint(0, len(alphas), (tc.batch,), generator=g)
        a = alphas[ts].sqrt()[:, None, None, None]
        s = (1 - alphas[ts]).sqrt()[:, None, None, None]
        target = a * noise - s * x0
        cond = encode_prompts(tokenizer, text_encoder, prompts)
        pred = unet(a * x0 + s * noise, ts, encoder_hidden_states=cond).sample
        return (weight[ts] * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()

    def after(t: int, loss: float) -> None:
        nonlocal done, paused, last_ckpt
        d = min(tc.ema_decay, (1 + t) / (10 + t))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        done = t + 1
        losses.append(loss)
        due = tc.checkpoint_minutes and time.time() - last_ckpt > 60 * tc.checkpoint_minutes
        if out is not None and due:
            c0 = time.time()
            checkpoint()
            paused += time.time() - c0
            last_ckpt = time.time()

    def line(t: int, loss: float) -> str:
        rate = (elapsed() - spent) / (done - start)
        return f"generator step {t:5d}  loss {np.mean(losses[-50:]):.4f}  {rate:.2f}s/step  {elapsed():6.0f}s"

    train_loop(
        opt,
        step,
        tc.steps,
        lambda t: constant_lr(t, tc.lr, tc.warmup),
        start=start,
        clip_grad=unet.parameters(),
        minutes=tc.minutes,
        clock=elapsed,
        after=after,
        log_every=50,
        log_line=line,
        log=log,
    )
    log(f"generator: {done} steps, {elapsed():.0f}s of training")
    if out is None:
        return None
    checkpoint()
    return Path(out)


def save_pipeline(
    out: str | Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    clip: str | Path,
    scheduler: DDIMScheduler,
    record: dict,
    tc: GeneratorTrainConfig,
) -> Path:
    """Write the pipeline folder atomically (a sibling temp folder, then renamed over ``out``).

    UNet and VAE are stored in ``tc.dtype``; the text encoder and tokenizer are not copied: the folder's
    ``dct_audit_shared.json`` points at the world CLIP's own ``text_encoder``/``tokenizer`` folders (relative
    paths), which the core's generator loader passes to diffusers as components.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = getattr(torch, tc.dtype)
    tokenizer, text_encoder = load_text_encoder(clip)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to(dtype),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).to(dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    shared = {}
    for part in ("text_encoder", "tokenizer"):  # the world CLIP's own files, referenced, not copied
        shutil.rmtree(tmp / part)
        shared[part] = os.path.relpath(Path(clip).resolve() / part, out.resolve())
    (tmp / SHARED_FILE).write_text(json.dumps(shared, indent=2) + "\n")
    if getattr(vae, "training_record", None) is not None:
        (tmp / "vae" / "training.json").write_text(json.dumps(vae.training_record, indent=2) + "\n")
    (tmp / "dct_audit_family.txt").write_text("sd1\n")
    defaults = {"steps": tc.sample_steps, "guidance": tc.sample_guidance}
    (tmp / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
    old = None
    if out.exists():  # keep the fidelity measured at earlier checkpoints
        prev = out / "training.json"
        if prev.is_file():
            record["fidelity_history"] = json.loads(prev.read_text()).get("fidelity_history", [])
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    record["sampling_defaults"] = defaults
    (tmp / "training.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)
    return out


# -- command line ----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dct_audit.world.diffusion {train,fidelity} ...``: (re)train the world generator, or
    measure a pipeline folder's fidelity. ``train`` trains the VAE first unless ``--vae`` names one."""
    import argparse
    import tempfile

    from dct_audit.world.vae import VAETrainConfig, train_vae

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the VAE (unless --vae) and the UNet, save the pipeline")
    tr.add_argument("--out", default=str(SHIPPED))
    tr.add_argument("--vae", default=None, help="an existing VAE folder (skips VAE training)")
    tr.add_argument("--vae-steps", type=int, default=1200)
    tr.add_argument(
        "--steps", type=int, default=100_000, help="UNet steps (the --minutes cap usually ends it)"
    )
    tr.add_argument("--minutes", type=float, default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--data-seed", type=int, default=0)
    tr.add_argument("--clip", default=str(CLIP_FOLDER))
    tr.add_argument("--fidelity", type=int, default=96, help="prompts for the final fidelity check (0: skip)")
    fi = sub.add_parser("fidelity", help="measure a pipeline folder's prompt fidelity")
    fi.add_argument("folder", nargs="?", default=str(SHIPPED))
    fi.add_argument("--n", type=int, default=96)
    fi.add_argument("--steps", type=int, default=None)
    fi.add_argument("--guidance", type=float, default=None)
    fi.add_argument("--judge", choices=("auto", "checker", "clip"), default="auto")
    fi.add_argument("--record", action="store_true", help="store the result in the folder's training.json")
    for p in (tr, fi):
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        vae = args.vae
        if vae is None:
            vae = Path(tempfile.mkdtemp(prefix="world_vae_"))
            train_vae(vae, VAETrainConfig(steps=args.vae_steps, seed=args.seed, data_seed=args.data_seed))
        tc = GeneratorTrainConfig(
            steps=args.steps, seed=args.seed, data_seed=args.data_seed, minutes=args.minutes
        )
        folder = train_generator(args.out, tc, vae=vae, clip=args.clip)
        if args.fidelity and folder is not None:
            name, judge = default_judge()
            result = measure_fidelity(folder, judge, n=args.fidelity, judge_name=name)
            record_fidelity(folder, result)
            print(json.dumps(result, indent=2))
        return
    if args.judge == "auto":
        name, judge = default_judge()
    else:
        name, judge = args.judge, checker_judge() if args.judge == "checker" else clip_judge()
    result = measure_fidelity(
        args.folder, judge, n=args.n, steps=args.steps, guidance=args.guidance, judge_name=name
    )
    if args.record:
        record_fidelity(args.folder, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
