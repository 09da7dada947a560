"""The attribute checker: a small supervised CNN that reads a scene's shape, colour, background and context.

It is the world's honest judge: the generator's fidelity and the tagger's accuracy are measured with it, so
it is trained independently of both (not CLIP, no captions), on procedural scenes with their true labels,
one classification head per attribute type. Generated images are not pixel-perfect, so training augments
with blur, noise, small shifts and slight brightness/contrast changes (``augment``). A saved checker is a
folder::

    checker.safetensors   weights
    config.json           architecture, vocabulary, training settings, data seed, wall time, accuracy

Training draws fresh scenes every step (scenes ``step * batch ..`` of stream ``data_seed``); evaluation uses
the held-out stream ``EVAL_SEED``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dct_audit.world import scenes as S
from dct_audit.world.paths import CHECKER
from dct_audit.world.trainloop import conv_stages, cosine, prefetched, progress, run_record, train_loop

EVAL_SEED = 2_000_003  # held-out scene stream of the checker and the world classifiers
SHIPPED = CHECKER


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    blur: float = 1.0,
    noise: float = 0.05,
    shift: int = 2,
    jitter: float = 0.08,
) -> torch.Tensor:
    """Randomly degrade images (B, 3, H, W) in [0, 1] the way generated samples are imperfect.

    Per image: a shift of up to ``shift`` pixels (edges replicated); with probability 1/2 a Gaussian blur of
    sigma up to ``blur``; with probability 1/2 Gaussian noise of std up to ``noise``; brightness and contrast
    scaled by up to ``1 +- jitter``. All randomness comes from ``generator`` (deterministic training).
    """
    b, _, h, w = images.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    if shift:
        offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator).tolist()
        padded = F.pad(images, (shift,) * 4, mode="replicate")
        images = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])
    if blur > 0:
        sigma = rand(b) * blur * (rand(b) < 0.5)  # (B,), 0 = no blur
        taps = torch.arange(-2, 3, dtype=images.dtype)
        kernel = torch.exp(-(taps**2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # (B, 5)
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (B*3, 5)
        x = F.pad(images.reshape(1, b * 3, h, w), (2, 2, 2, 2), mode="replicate")
        x = F.conv2d(x, kernel[:, None, None, :], groups=b * 3)
        images = F.conv2d(x, kernel[:, None, :, None], groups=b * 3).reshape(b, 3, h, w)
    if noise > 0:
        std = rand(b, 1, 1, 1) * noise * (rand(b, 1, 1, 1) < 0.5)
        images = images + std * torch.randn(images.shape, generator=generator)
    if jitter > 0:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1 + jitter * (2 * rand(b, 1, 1, 1) - 1)
        brightness = 1 + jitter * (2 * rand(b, 1, 1, 1) - 1)
        images = ((images - mean) * contrast + mean) * brightness
    return images.clamp(0, 1)


@dataclass
class CheckerConfig:
    """Architecture: one conv stage per entry of ``channels``, stride 2 between stages, then one linear head
    per attribute type (sizes from ``vocab``)."""

    channels: tuple[int, ...] = (32, 64, 128, 128)
    image_size: int = 32
    vocab: dict[str, tuple[str, ...]] | None = None  # None: scenes.VOCAB

    def __post_init__(self):
        self.channels = tuple(self.channels)
        self.vocab = {a: tuple(v) for a, v in (self.vocab or S.VOCAB).items()}


@dataclass
class CheckerTrainConfig:
    """Training settings (recorded in config.json)."""

    steps: int = 500
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0  # torch initialisation and augmentation seed
    data_seed: int = 0  # scene stream of the training data


class AttributeChecker(nn.Module):
    """Conv trunk + one head per attribute type. ``forward`` gives logits, ``predict`` value indices."""

    def __init__(self, config: CheckerConfig | None = None):
        super().__init__()
        self.config = config or CheckerConfig()
        self.trunk, c_in = conv_stages(self.config.channels)
        self.heads = nn.ModuleDict({a: nn.Linear(c_in, len(v)) for a, v in self.config.vocab.items()})
        self.info: dict = {}  # training record, filled by the trainer or from config.json

    @property
    def vocab(self) -> dict[str, tuple[str, ...]]:
        """Attribute type -> value names; predictions index these."""
        return self.config.vocab

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute type for images float (B, 3, H, W) in [0, 1] (resized to ``image_size``)."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        z = self.trunk((images - 0.5) / 0.25).mean(dim=(2, 3))
        return {a: head(z) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 512) -> dict[str, torch.Tensor]:
        """Predicted value index per attribute type: ``{"shape": LongTensor (B,), ...}`` (eval mode)."""
        was_training = self.training
        self.eval()
        parts = [self(images[i : i + batch]) for i in range(0, len(images), batch)]
        self.train(was_training)
        return {a: torch.cat([p[a] for p in parts]).argmax(-1) for a in self.vocab}

    def predict_names(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Predicted value names, one dict per image."""
        pred = self.predict(images)
        return [{a: self.vocab[a][int(pred[a][i])] for a in self.vocab} for i in range(len(images))]

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``checker.safetensors`` and ``config.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous() for k, v in self.state_dict().items()}, folder / "checker.safetensors"
        )
        record = {"architecture": "AttributeChecker", "model": asdict(self.config), **self.info}
        (folder / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path = SHIPPED) -> AttributeChecker:
        """Load a folder written by ``save_pretrained`` (the shipped checker by default), in eval mode."""
        folder = Path(folder)
        record = json.loads((folder / "config.json").read_text())
        model = cls(CheckerConfig(**record.pop("model")))
        model.load_state_dict(load_file(folder / "checker.safetensors"))
        record.pop("architecture", None)
        model.info = record
        return model.eval()


@torch.no_grad()
def checker_accuracy(
    checker: AttributeChecker, n: int = 2000, seed: int = EVAL_SEED, augmented: bool = False, batch: int = 500
) -> dict[str, float]:
    """Per-head accuracy on ``n`` held-out uniform scenes of stream ``seed`` (optionally augmented)."""
    correct = dict.fromkeys(checker.vocab, 0)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        sc = S.sample_scenes(min(batch, n - start), seed, size=checker.config.image_size, start=start)
        images = images_to_tensor(sc.images)
        pred = checker.predict(augment(images, gen) if augmented else images)
        for a in checker.vocab:
            correct[a] += int((pred[a].numpy() == sc.labels(a)).sum())
    return {a: correct[a] / n for a in checker.vocab}


def train_checker(
    out_dir: str | Path | None = SHIPPED,
    train: CheckerTrainConfig | None = None,
    config: CheckerConfig | None = None,
    eval_n: int = 2000,
    log: Callable[[str], None] = print,
) -> AttributeChecker:
    """Train an attribute checker on fresh uniform scenes (AdamW, cosine schedule, augmented) and save it.

    Deterministic given ``train.seed``, ``train.data_seed`` and ``train.steps``; records the settings,
    wall time and held-out per-head accuracy (clean and augmented, ``eval_n`` scenes) in config.json.
    """
    tc = train or CheckerTrainConfig()
    torch.manual_seed(tc.seed)
    model = AttributeChecker(config).train().to(memory_format=torch.channels_last)  # ~25% faster on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    size = model.config.image_size
    batches = prefetched(
        lambda t: S.sample_scenes(tc.batch, tc.data_seed, size=size, start=t * tc.batch), tc.steps
    )

    def step(t: int) -> torch.Tensor:
        sc = next(batches)
        images = augment(images_to_tensor(sc.images), gen).contiguous(memory_format=torch.channels_last)
        logits = model(images)
        return sum(F.cross_entropy(logits[a], torch.from_numpy(sc.labels(a))) for a in model.vocab)

    run = train_loop(opt, step, tc.steps, cosine(tc), log_line=progress("checker"), log=log)
    loss_val, wall = run.final_loss, run.seconds
    model = model.to(memory_format=torch.contiguous_format).eval()
    accuracy = {}
    if eval_n:
        accuracy = {
            "n": eval_n,
            "seed": EVAL_SEED,
            "clean": checker_accuracy(model, eval_n),
            "augmented": checker_accuracy(model, eval_n, augmented=True),
        }
    model.info = {
        "train": {**asdict(tc), "final_loss": loss_val},
        **run_record(wall),
        "accuracy": accuracy,
    }
    log(f"checker trained {tc.steps} steps in {wall:.0f}s; accuracy {accuracy}")
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dct_audit.world.checker [--out DIR] [--steps N]``: train (and by default ship) the checker."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(SHIPPED))
    defaults = CheckerTrainConfig()
    for name in ("steps", "batch", "seed", "data_seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see classifiers.main)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tc = CheckerTrainConfig(
        steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, data_seed=args.data_seed
    )
    train_checker(args.out, tc)


if __name__ == "__main__":
    main()
