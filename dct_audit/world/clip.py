"""The world CLIP: a small contrastive image-text model trained on procedural scenes and their captions.

It is the planted-bias world's tagger, and its text tower is the world's text-to-image model's text encoder
(as OpenAI's CLIP text tower is Stable Diffusion's), so the text tower is a plain transformers
``CLIPTextModel`` used with Stable Diffusion's BPE tokenizer (``dct_audit.clip_vocab``). The image tower is a
small conv net. A saved model is a folder::

    text_encoder/      CLIPTextModel.save_pretrained (safetensors; fp16 storage, loads as fp32)
    tokenizer/         CLIPTokenizer files (dct_audit.clip_vocab.write_clip_tokenizer)
    clip.safetensors   image tower, both projections, logit scale
    config.json        architecture, training settings, data seed, wall time, zero-shot accuracy

Training (``world/clip_train.py``) draws fresh scenes every step (scene stream ``data_seed``); evaluation
uses another stream (``EVAL_SEED``).
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from dct_audit.clip_vocab import clip_tokenizer, write_clip_tokenizer
from dct_audit.world import scenes as S
from dct_audit.world.paths import CLIP
from dct_audit.world.trainloop import conv_stages

BOS_ID, EOS_ID = 49406, 49407
EVAL_SEED = 1_000_003  # the held-out scene stream (training uses data_seed, 0 by default)
SHIPPED = CLIP


@dataclass
class WorldCLIPConfig:
    """Architecture of the world CLIP."""

    embed_dim: int = 128
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512
    max_length: int = 32  # tokens, <bos> and <eos> included; the longest caption is about 20
    image_size: int = 32
    image_channels: tuple[int, ...] = (32, 64, 128, 256)  # one stage each, stride 2 between stages
    logit_scale_init: float = math.log(1 / 0.07)

    def text_config(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=self.text_hidden,
            intermediate_size=self.text_intermediate,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.max_length,
            projection_dim=self.embed_dim,
            hidden_act="quick_gelu",
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
        )


@functools.lru_cache(maxsize=4)
def _tokenizer(max_length: int):
    """Stable Diffusion's CLIP tokenizer (built once per length: it writes and parses a 49k vocabulary)."""
    return clip_tokenizer(max_length)


class ImageTower(nn.Module):
    """Conv net: one stage per entry of ``channels``, stride 2 between stages, 3x3 convs (one in the first
    stage, at full resolution, where a conv costs most; two in the others), then global average and max
    pooling side by side. The max keeps the small object's features from being averaged away by the
    background that fills most of the image: supervised on all four attributes, the tower with average
    pooling alone was at 0.60 shape accuracy after 120 steps, with both at 0.96."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.net, c_in = conv_stages(channels)
        self.out_dim = 2 * c_in

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net((images - 0.5) / 0.25)
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class WorldCLIP(nn.Module):
    """Image tower + CLIPTextModel, each followed by a linear projection into a shared embedding space."""

    def __init__(self, config: WorldCLIPConfig | None = None, text_encoder: CLIPTextModel | None = None):
        super().__init__()
        self.config = config or WorldCLIPConfig()
        c = self.config
        self.text_encoder = text_encoder or CLIPTextModel(c.text_config())
        self.visual = ImageTower(c.image_channels)
        self.visual_projection = nn.Linear(self.visual.out_dim, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text_hidden, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(c.logit_scale_init))
        self.tokenizer = copy.deepcopy(_tokenizer(c.max_length))  # a private copy: callers may add tokens
        self.info: dict = {}  # training record, filled by the trainer or from config.json

    def tokenize(self, texts: Sequence[str], pad_to_max: bool = True) -> torch.Tensor:
        """Token ids (B, max_length), padded with <eos> as Stable Diffusion's tokenizer pads.

        The text tower is causal and pools at the first <eos>, so padding only to the longest text in the
        batch (``pad_to_max=False``, what training does to save time) gives the same embeddings.
        """
        padding = "max_length" if pad_to_max else "longest"
        out = self.tokenizer(
            list(texts),
            padding=padding,
            max_length=self.config.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return out.input_ids.to(self.logit_scale.device)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeddings (B, embed_dim) of images float (B, 3, H, W) in [0, 1]."""
        z = self.visual_projection(self.visual(images))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(
        self, texts: Sequence[str] | torch.Tensor, normalize: bool = True, pad_to_max: bool = True
    ) -> torch.Tensor:
        """Embeddings (B, embed_dim) of texts (strings, or token ids from ``tokenize``)."""
        ids = self.tokenize(texts, pad_to_max) if not isinstance(texts, torch.Tensor) else texts
        z = self.text_projection(self.text_encoder(input_ids=ids).pooler_output)
        return F.normalize(z, dim=-1) if normalize else z

    # -- saving ----------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, text_dtype: str = "float16") -> Path:
        """Write the model folder (see module docstring). ``text_dtype`` is the text tower's storage dtype:
        with float16 a reloaded text tower equals this one up to fp16 rounding (the trainer rounds its model
        before saving, so there the two are identical)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        te = self.text_encoder
        if text_dtype != "float32":
            te = copy.deepcopy(te).to(getattr(torch, text_dtype))
        te.save_pretrained(folder / "text_encoder", safe_serialization=True)
        te_config = folder / "text_encoder" / "config.json"
        cfg = json.loads(te_config.read_text())
        cfg["dtype"] = "float32"  # stored small, loaded (by from_pretrained's default "auto") as fp32
        te_config.write_text(json.dumps(cfg, indent=2) + "\n")
        write_clip_tokenizer(folder / "tokenizer", model_max_length=self.config.max_length)
        tensors = {
            k: v.detach().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("text_encoder.")
        }
        save_file(tensors, folder / "clip.safetensors")
        record = {"model": asdict(self.config), **self.info}
        (folder / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path = SHIPPED) -> WorldCLIP:
        """Load a folder written by ``save_pretrained`` (the shipped model by default), in eval mode."""
        folder = Path(folder)
        record = json.loads((folder / "config.json").read_text())
        model_cfg = dict(record.pop("model"))
        model_cfg["image_channels"] = tuple(model_cfg["image_channels"])
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
        model = cls(WorldCLIPConfig(**model_cfg), text_encoder=text_encoder)
        missing, unexpected = model.load_state_dict(load_file(folder / "clip.safetensors"), strict=False)
        missing = [k for k in missing if not k.startswith("text_encoder.")]
        if missing or unexpected:
            raise ValueError(
                f"{folder}/clip.safetensors does not match: missing {missing}, unexpected {unexpected}"
            )
        model.info = record
        return model.eval()


# -- data and evaluation ---------------------------------------------------------------------------------
def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def partial_captions(value: str, attribute: str) -> list[str]:
    """Captions that mention one attribute only: "a photo of a star", "a red object", "on water", ..."""
    if attribute == "shape":
        return [f"a photo of a {value}", f"a {value}", f"there is a {value}"]
    if attribute == "colour":
        article = "an" if value[0] in "aeiou" else "a"
        return [f"{article} {value} object", f"something {value}", f"it is {value}"]
    if attribute == "background":
        noun = S.BACKGROUND_NOUN[value]
        return [S.BACKGROUND_ON[value], f"a {noun} background", f"the background is {noun}"]
    if attribute == "context":
        return [S.CONTEXT_ON[value] or "alone", S.CONTEXT_WITH[value], f"an object {S.CONTEXT_WITH[value]}"]
    raise ValueError(f"unknown attribute {attribute!r}")


def simple_prompts(variant: int = 0) -> dict[str, dict[str, list[str]]]:
    """One short prompt per attribute value: "a photo of a star", "a red object", "on water", "next to a
    person", "alone" (``variant`` picks another wording from ``partial_captions``)."""
    return {a: {v: [partial_captions(v, a)[variant]] for v in S.VOCAB[a]} for a in S.ATTRIBUTES}


def ensemble_prompts(n: int = 24, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """Per attribute value, ``n`` full captions with that value and the other attributes and phrasing random.

    Their mean embedding marginalises out the other attributes (CLIP's prompt ensembling).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[str]]] = {}
    for attr, values in S.VOCAB.items():
        out[attr] = {}
        for v in values:
            caps = []
            for k in range(n):
                names = {a: S.VOCAB[a][rng.integers(len(S.VOCAB[a]))] for a in S.ATTRIBUTES}
                names[attr] = v
                caps.append(S.caption(**names, phrasing=k))
            out[attr][v] = caps
    return out


@torch.no_grad()
def text_classifier(model: WorldCLIP, prompts: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """(n_values, embed_dim): the normalised mean prompt embedding of each value, in ``prompts`` order."""
    rows = [F.normalize(model.encode_text(list(p)).mean(0), dim=-1) for p in prompts.values()]
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_accuracy(
    model: WorldCLIP,
    n: int = 1000,
    seed: int = EVAL_SEED,
    prompts: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    batch: int = 500,
) -> dict[str, float]:
    """Zero-shot accuracy per attribute type on ``n`` held-out scenes (stream ``seed``, no bias).

    For each type (shape, colour, background, context) every scene is assigned the value whose prompt
    embedding is nearest its image embedding; ``prompts`` defaults to ``simple_prompts()``.
    """
    was_training = model.training
    model.eval()
    prompts = prompts or simple_prompts()
    classifiers = {a: text_classifier(model, prompts[a]) for a in S.ATTRIBUTES}
    correct = dict.fromkeys(S.ATTRIBUTES, 0)
    for start in range(0, n, batch):
        sc = S.sample_scenes(min(batch, n - start), seed, size=model.config.image_size, start=start)
        z = model.encode_image(images_to_tensor(sc.images))
        for a in S.ATTRIBUTES:
            pred = (z @ classifiers[a].T).argmax(-1).numpy()
            correct[a] += int((pred == sc.labels(a)).sum())
    model.train(was_training)
    return {a: correct[a] / n for a in S.ATTRIBUTES}


# -- training --------------------------------------------------------------------------------------------
def load_world_tagger(spec: str, device):
    """``--tagger world`` (the shipped world CLIP) or ``world:PATH``: registered in ``dct_audit.tag``."""
    import torch

    from ..errors import DctAuditError
    from ..tag import Tagger

    folder = spec[len("world:") :] if spec.startswith("world:") else SHIPPED
    if not (Path(folder) / "config.json").is_file():
        raise DctAuditError(f"world tagger folder '{folder}' has no config.json")
    device = torch.device(device)
    model = WorldCLIP.from_pretrained(folder).to(device).eval()
    return Tagger(
        spec,
        "world",
        model,
        model.encode_image,
        model.encode_text,
        None,
        float(model.logit_scale.detach().exp().clamp(max=100)),
        device,
    )


if __name__ == "__main__":  # ``python -m dct_audit.world.clip``: retrain the world CLIP
    from dct_audit.world.clip_train import main

    main()
