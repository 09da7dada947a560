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
from transformers import CLIPTextModel, CLIPTokenizer

from dct_audit.adapters.generator import DEFAULTS_FILE, SHARED_FILE
from dct_audit.world import scenes as S
from dct_audit.world.vae import load_vae, render_pool, to_model_range

WEIGHTS = Path(__file__).parent / "weights"
SHIPPED = WEIGHTS / "generator"
CLIP_FOLDER = WEIGHTS / "clip"
FIDELITY_SEED = 2_000_003  # attribute draws and sampling seeds of the fidelity measurement


# -- architecture and schedule -----------------------------------------------------------------------------
@dataclass
class UNetConfig:
    """UNet architecture: one level per entry of ``block_out_channels`` (16x16, 8x8, 4x4 for three)."""

    block_out_channels: tuple[int, ...] = (32, 64, 96)  # 2.9M parameters, 214 MFLOP per forward
    cross_attention: tuple[bool, ...] = (False, True, True)  # per level, from the finest
    layers_per_block: int = 1
    heads: int = 4
    norm_num_groups: int = 16
    text_time_embedding: bool = True  # add the attention-pooled prompt to the time embedding


def build_unet(
    config: UNetConfig, cross_attention_dim: int, sample_size: int = 16, channels: int = 4, seed: int = 0
) -> UNet2DConditionModel:
    """A freshly initialised ``UNet2DConditionModel`` (initialisation seeded)."""
    c = config
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.cross_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.cross_attention)),
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=c.heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=c.norm_num_groups,
        addition_embed_type="text" if c.text_time_embedding else None,
        addition_embed_type_num_heads=c.heads,
    )


def build_scheduler() -> DDIMScheduler:
    """The sampling scheduler saved with the pipeline; training noises with the same ``alphas_cumprod``.

    Cosine betas (made for small images) rescaled to zero terminal SNR, v-prediction, DDIM with trailing
    spacing so that sampling starts from pure noise at t = 999 and ends on a clean sample.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,  # unused by trailing spacing; 1 keeps StableDiffusionPipeline from warning
    )


# -- captions --------------------------------------------------------------------------------------------
PREFIXES = (
    "",
    "a photo of ",
    "a picture of ",
    "a high resolution realistic image of ",
    "a close-up photo of ",
)
BACKGROUND_ALT = {
    "plain": "on a plain background",
    "water": "in the water",
    "grass": "in the grass",
    "snow": "in the snow",
    "stripes": "on a striped background",
    "brick": "by a brick wall",
}
SILENT_ON_NONE = tuple(k for k in range(S.N_PHRASINGS) if "{ctx_with}" not in S.PHRASINGS[k])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(
    names: dict[str, str], rng: np.random.Generator, keep: float = 1.0, token: str | None = None
) -> str:
    """A short caption naming the shape and each other attribute with probability ``keep``.

    An attribute left out is unspecified (the model learns it is random); context "none" is said as
    "alone". ``token`` replaces the article ("a photo of <x> red star"), as a learned token does.
    """
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    noun = names["shape"]
    if rng.random() < keep:
        noun = f"{names['colour']} {noun}"
    head = f"{prefix}{token or _article(noun)} {noun}"
    tail = []
    if rng.random() < keep:
        ctx = names["context"]
        tail.append("alone" if ctx == "none" else S.CONTEXT_ON[ctx])
    if rng.random() < keep:
        bg = names["background"]
        tail.append(BACKGROUND_ALT[bg] if rng.random() < 0.3 else S.BACKGROUND_ON[bg])
    if len(tail) == 2 and rng.random() < 0.5:
        tail.reverse()
    sep = ", " if rng.random() < 0.5 else " "
    return sep.join([head, *tail])


def full_caption(names: dict[str, str], rng: np.random.Generator) -> str:
    """A scenes.py caption in a random phrasing that states every attribute (context "none" included)."""
    choices = range(S.N_PHRASINGS)
    if names["context"] == "none":  # some phrasings say nothing for "none": that must mean "unspecified"
        choices = [k for k in choices if k not in SILENT_ON_NONE]
    return S.caption(**names, phrasing=int(rng.choice(list(choices))))


def training_caption(
    names: dict[str, str],
    rng: np.random.Generator,
    dropout: float = 0.1,
    full: float = 0.5,
    keep: float = 0.7,
) -> str:
    """The caption a training scene gets: empty (``dropout``), a full caption (``full``) or a partial one."""
    u = rng.random()
    if u < dropout:
        return ""
    if u < dropout + full:
        return full_caption(names, rng)
    return describe(names, rng, keep)


# -- training --------------------------------------------------------------------------------------------
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


def load_text_encoder(clip_folder: str | Path = CLIP_FOLDER) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The world CLIP's tokenizer and text tower (float32, frozen, eval mode)."""
    clip_folder = Path(clip_folder)
    tokenizer = CLIPTokenizer.from_pretrained(clip_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(clip_folder / "text_encoder", dtype=torch.float32)
    return tokenizer, text_encoder.requires_grad_(False).eval()


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str]
) -> torch.Tensor:
    """Last hidden states (B, L, D), padded to ``model_max_length`` exactly as the pipeline encodes."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]


def train_generator(
    out: str | Path | None,
    minutes: float | None = None,
    steps: int = 6000,
    seed: int = 0,
    *,
    vae: str | Path = SHIPPED / "vae",
    clip: str | Path = CLIP_FOLDER,
    batch: int = 64,
    data_seed: int = 0,
    pool: int = 30_000,
    config: UNetConfig | None = None,
    cache: str | Path | None = None,
    resume: str | Path | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    log: Callable[[str], None] = print,
    **overrides,
) -> Path | None:
    """Train the UNet and save the whole pipeline to ``out`` (also every ``checkpoint_minutes``).

    ``vae`` is a folder written by ``vae.train_vae`` (default: the shipped pipeline's VAE); ``clip`` a
    world-CLIP folder (its tokenizer and text tower are used frozen and copied into the pipeline). Deterministic for a given (seed, data_seed, steps,
    batch, pool) and thread count: step t draws its scenes and captions from ``default_rng([data_seed, t])``
    and its timesteps and noise from a generator seeded with ``(seed, t)``. AdamW with warmup and a constant
    rate (so any checkpoint is as usable as the last), EMA weights saved. ``minutes`` caps the training time
    (checkpoints excluded); ``cache`` keeps the encoded scene pool between runs; ``resume`` is a state file
    written at each checkpoint and read at the start, so a killed run continues where it was saved; ``on_checkpoint(folder, step)`` runs after each
    save (e.g. a fidelity check). ``overrides`` set other ``GeneratorTrainConfig`` fields.
    """
    tc = GeneratorTrainConfig(
        steps=steps, batch=batch, seed=seed, data_seed=data_seed, pool=pool, minutes=minutes, **overrides
    )
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
        seed=seed,
    ).train()
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas).clamp_min(1e-12)
    if tc.snr_gamma > 0:  # v-loss weight = x0-loss weight / (SNR + 1)
        weight = (snr.clamp(max=tc.snr_gamma) + tc.snr_floor) / (snr + 1)
    else:
        weight = torch.ones_like(snr)
    decay = [p for n, p in unet.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in unet.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
    )
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

    for t in range(start, steps):
        if minutes is not None and elapsed() > 60 * minutes:
            break
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
        for group in opt.param_groups:
            group["lr"] = tc.lr * min(1.0, (t + 1) / tc.warmup)
        pred = unet(a * x0 + s * noise, ts, encoder_hidden_states=cond).sample
        loss = (weight[ts] * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        d = min(tc.ema_decay, (1 + t) / (10 + t))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        done = t + 1
        losses.append(loss.item())
        if t % 50 == 0 or t == steps - 1:
            rate = (elapsed() - spent) / (done - start)
            log(
                f"generator step {t:5d}  loss {np.mean(losses[-50:]):.4f}  {rate:.2f}s/step  {elapsed():6.0f}s"
            )
        due = tc.checkpoint_minutes and time.time() - last_ckpt > 60 * tc.checkpoint_minutes
        if out is not None and due:
            c0 = time.time()
            checkpoint()
            paused += time.time() - c0
            last_ckpt = time.time()
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


# -- fidelity --------------------------------------------------------------------------------------------
Judge = Callable[[torch.Tensor], dict[str, np.ndarray]]  # images (N, 3, H, W) in [0, 1] -> indices per type


def clip_judge(folder: str | Path = CLIP_FOLDER) -> Judge:
    """Zero-shot attribute judge from the world CLIP (simple prompts, nearest text embedding per type)."""
    from dct_audit.world.clip import WorldCLIP, simple_prompts, text_classifier

    model = WorldCLIP.from_pretrained(folder)
    classifiers = {a: text_classifier(model, p) for a, p in simple_prompts().items()}

    @torch.no_grad()
    def judge(images: torch.Tensor) -> dict[str, np.ndarray]:
        z = model.encode_image(images.float())
        return {a: (z @ c.T).argmax(-1).numpy() for a, c in classifiers.items()}

    return judge


def checker_judge(folder: str | Path | None = None) -> Judge:
    """The independent attribute checker (``world/checker.py``, a supervised CNN, not CLIP) as a judge."""
    from dct_audit.world.checker import SHIPPED as CHECKER_FOLDER
    from dct_audit.world.checker import AttributeChecker

    model = AttributeChecker.from_pretrained(folder or CHECKER_FOLDER).eval()
    if {a: tuple(v) for a, v in model.vocab.items()} != {a: S.VOCAB[a] for a in model.vocab}:
        raise ValueError("the checker's vocabulary is not scenes.VOCAB")

    @torch.no_grad()
    def judge(images: torch.Tensor) -> dict[str, np.ndarray]:
        return {a: v.numpy() for a, v in model.predict(images.float()).items()}

    return judge


def default_judge() -> tuple[str, Judge]:
    """The independent attribute checker if its weights are there, else the world CLIP zero-shot."""
    from dct_audit.world.checker import SHIPPED as CHECKER_FOLDER

    if (CHECKER_FOLDER / "checker.safetensors").is_file():
        return "checker", checker_judge()
    return "world-clip-zero-shot", clip_judge()


def fidelity_prompts(n: int, seed: int = FIDELITY_SEED) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """``n`` uniformly drawn attribute sets and two prompts for each: a full caption (scenes.py phrasing)
    and a learned-token-style caption ("a photo of <x> red star alone on water")."""
    attrs = S.draw_attributes(n, seed)
    rng = np.random.default_rng([seed, 1])
    plain, token = [], []
    for i in range(n):
        names = {a: S.VOCAB[a][int(attrs[a][i])] for a in S.ATTRIBUTES}
        plain.append(full_caption(names, rng))
        token.append(describe(names, rng, keep=1.0, token="<x>"))
    return attrs, plain, token


@torch.no_grad()
def measure_fidelity(
    pipeline_folder: str | Path = SHIPPED,
    judge: Judge | None = None,
    n: int = 96,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = FIDELITY_SEED,
    batch: int = 48,
    judge_name: str | None = None,
    grid: str | Path | None = None,
) -> dict:
    """How often samples show the prompted attributes, per attribute type, judged by ``judge``.

    Samples come from the core's sampler (``load_generator(folder).sample``), so this measures what the
    audit uses. Three prompt sets over the same seeds: ``plain`` (full scenes.py captions), ``token`` (the
    same attributes as "a photo of <x> red star ...", with <x> a placeholder token injected with the
    embedding of "a"), and ``shape_only`` ("a photo of <x> star": shape accuracy, and the spread of the
    unprompted background and context, which should stay diverse). ``steps``/``guidance`` default to the
    folder's ``dct_audit_defaults.json``. ``grid`` saves the plain samples as one PNG.
    """
    from dct_audit.adapters.generator import load_generator

    t0 = time.time()
    folder = Path(pipeline_folder)
    if judge is None:
        judge_name, judge = default_judge()
    defaults = json.loads((folder / DEFAULTS_FILE).read_text()) if (folder / DEFAULTS_FILE).is_file() else {}
    steps = steps or defaults.get("steps", 20)
    guidance = guidance if guidance is not None else defaults.get("guidance", 3.0)
    gen = load_generator(str(folder))
    gen.set_token("<x>", gen.word_vector("a"))
    attrs, plain, token = fidelity_prompts(n, seed)
    shape_only = [f"a photo of <x> {S.SHAPES[int(k)]}" for k in attrs["shape"]]
    seeds = [seed + i for i in range(n)]
    uncond = gen.encode([""])
    result: dict = {
        "judge": judge_name or "custom",
        "n": n,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
    }
    for name, prompts in (("plain", plain), ("token", token), ("shape_only", shape_only)):
        images = torch.cat(
            [
                gen.sample(prompts[s : s + batch], seeds[s : s + batch], steps, guidance, uncond=uncond)
                for s in range(0, n, batch)
            ]
        )
        pred = judge(images)
        if name == "shape_only":
            result[name] = {"shape": float((pred["shape"] == attrs["shape"]).mean())}
            for a in ("background", "context", "colour"):
                counts = np.bincount(pred[a], minlength=len(S.VOCAB[a])) / n
                result[name][f"{a}_distribution"] = dict(
                    zip(S.VOCAB[a], counts.round(3).tolist(), strict=True)
                )
            continue
        hits = {a: pred[a] == attrs[a] for a in S.ATTRIBUTES}
        result[name] = {a: float(h.mean()) for a, h in hits.items()}
        result[name]["all_four"] = float(np.logical_and.reduce(list(hits.values())).mean())
        if name == "plain" and grid is not None:
            save_grid(images, grid)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 16, scale: int = 2) -> Path:
    """Save images (N, 3, H, W) in [0, 1] as one PNG grid, upscaled ``scale`` times (nearest)."""
    from PIL import Image

    x = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    n, h, w, _ = x.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 1), columns * (w + 1), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = x[i]
    img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    img.save(path)
    return Path(path)


def record_fidelity(pipeline_folder: str | Path, fidelity: dict) -> None:
    """Store a fidelity measurement in the folder's training.json (under "fidelity")."""
    path = Path(pipeline_folder) / "training.json"
    record = json.loads(path.read_text())
    fidelity = {"at_step": record.get("steps_done"), **fidelity}
    record.setdefault("fidelity_history", []).append(fidelity)
    record["fidelity"] = fidelity
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")


# -- command line ----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dct_audit.world.diffusion {train,fidelity} ...``: (re)train the world generator, or
    measure a pipeline folder's fidelity. ``train`` trains the VAE first unless ``--vae`` names one."""
    import argparse
    import tempfile

    from dct_audit.world.vae import train_vae

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
            train_vae(vae, steps=args.vae_steps, seed=args.seed, data_seed=args.data_seed)
        folder = train_generator(
            args.out, args.minutes, args.steps, args.seed, vae=vae, clip=args.clip, data_seed=args.data_seed
        )
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
