"""Tagging: which context attributes (plate, water, athlete ...) each generated image shows, by CLIP.

An image usually shows several attributes at once, so presence is not an argmax over the vocabulary.
Each attribute is a yes/no question: its prompts against a shared set of neutral prompts ("a photo",
"an image" ...), a softmax at the tagger's own temperature, and a threshold on the attribute's share.
The threshold is 0.5 unless the vocabulary file or a calibration on labelled images (the planted-bias
world, where every image's true attributes are known) sets one per attribute.

Taggers (``--tagger``): ``ARCH/TAG`` open_clip (default ``ViT-B-32/laion2b_s34b_b79k``),
``hf:ORG/MODEL`` transformers CLIP, ``world`` or ``world:PATH`` the planted-bias world's CLIP.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import hub, registry
from .adapters.classifier import Preprocess
from .errors import DctAuditError
from .options import DEFAULT_TAGGER  # noqa: F401  (the defaults live with the options)
from .rundir import PRESENCE_THRESHOLD

# ----------------------------------------------------------------------------------------------------
# The attribute vocabulary
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribute:
    name: str
    group: str
    prompts: tuple[str, ...]
    with_context: str  # counterfactual: "{} on a plate"
    without_context: str  # counterfactual: "{} on a bare table, no plate" (the first of ``without_contexts``)
    threshold: float | None = None
    sources: tuple[str, ...] = ()
    exclusive: str | None = None  # attributes sharing this name exclude each other (one per image)
    absence: bool = False  # says that something is *absent* ("plain background", "alone")
    without_contexts: tuple[str, ...] = ()  # every replacement prompt of the file's "without" (str or list)


@dataclass(frozen=True)
class Vocabulary:
    attributes: tuple[Attribute, ...]
    neutral: tuple[str, ...]
    source: str

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def __len__(self) -> int:
        return len(self.attributes)

    def fingerprint(self) -> str:
        """SHA-256 of what tags and checks depend on (every attribute's prompts and threshold, the neutral
        prompts), not of where the file was: a resume must tag with the same vocabulary."""
        import hashlib
        from dataclasses import asdict

        data = [[asdict(a) for a in self.attributes], list(self.neutral)]
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()

    def presence_thresholds(self) -> dict[str, float]:
        """Each attribute's presence threshold: the file's, else ``rundir.PRESENCE_THRESHOLD``."""
        return {
            a.name: (a.threshold if a.threshold is not None else PRESENCE_THRESHOLD) for a in self.attributes
        }

    def replacements(self, attribute: Attribute) -> list[tuple[str, str]]:
        """``(name, prompt template)`` of every replacement a counterfactual check compares against.

        An attribute of an ``exclusive`` set is replaced by every other member of the set (water by plain,
        grass, snow ...: the classifier must depend on water itself, not on the absence of one alternative
        it has learned for another class); any other attribute by each of its ``without`` prompts.
        """
        out: dict[str, str] = {}
        if attribute.exclusive:
            for other in self.attributes:
                if other.exclusive == attribute.exclusive and other.name != attribute.name:
                    out.setdefault(other.with_context, other.name)
        if not out:
            for k, prompt in enumerate(attribute.without_contexts or (attribute.without_context,)):
                out.setdefault(prompt, f"without {attribute.name}" + (f" ({k + 1})" if k else ""))
        return [(name, prompt) for prompt, name in out.items()]


def _parse_vocabulary(data, source: str) -> tuple[list[Attribute], list[str] | None, str]:
    if not isinstance(data, dict) or not isinstance(data.get("attributes"), list):
        raise DctAuditError(f"attribute file {source}: expected an object with an 'attributes' list")
    attrs = []
    for i, a in enumerate(data["attributes"]):
        where = f"attribute file {source}, attribute #{i + 1}"
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not a["name"].strip():
            raise DctAuditError(f"{where}: needs a non-empty 'name'")
        prompts = a.get("prompts") or [f"a photo of {a['name']}"]
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise DctAuditError(f"{where} ('{a['name']}'): 'prompts' must be a list of non-empty strings")
        with_c = a.get("with", "{} with " + a["name"])
        without_c = a.get("without", "{} without " + a["name"])
        withouts = without_c if isinstance(without_c, list) and without_c else [without_c]
        for key, text in [("with", with_c)] + [("without", w) for w in withouts]:
            if not isinstance(text, str) or text.count("{}") != 1:
                raise DctAuditError(
                    f"{where} ('{a['name']}'): '{key}' must be a prompt (or, for 'without', a list of prompts) "
                    "containing '{}' exactly once"
                )
        if not isinstance(a.get("absence", False), bool):
            raise DctAuditError(f"{where} ('{a['name']}'): 'absence' must be true or false")
        thr = a.get("threshold")
        if thr is not None and not (isinstance(thr, (int, float)) and 0 < thr < 1):
            raise DctAuditError(f"{where} ('{a['name']}'): 'threshold' must be a number in (0, 1)")
        exclusive = a.get("exclusive")
        if exclusive is not None and not isinstance(exclusive, str):
            raise DctAuditError(
                f"{where} ('{a['name']}'): 'exclusive' must be a string naming a set of attributes"
            )
        attrs.append(
            Attribute(
                a["name"].strip(),
                str(a.get("group", "other")),
                tuple(prompts),
                with_c,
                withouts[0],
                None if thr is None else float(thr),
                tuple(a.get("sources", ())),
                exclusive,
                bool(a.get("absence", False)),
                tuple(withouts),
            )
        )
    neutral = data.get("neutral")
    if neutral is not None and (
        not isinstance(neutral, list) or not all(isinstance(n, str) for n in neutral) or not neutral
    ):
        raise DctAuditError(f"attribute file {source}: 'neutral' must be a non-empty list of strings")
    mode = data.get("mode", "replace")
    if mode not in ("replace", "extend"):
        raise DctAuditError(f"attribute file {source}: 'mode' must be 'replace' or 'extend', not {mode!r}")
    return attrs, neutral, mode


def load_vocabulary(path: str | os.PathLike | None = None, extend: bool | None = None) -> Vocabulary:
    """The shipped vocabulary, or ``path`` (JSON) replacing it, or extending it (``"mode": "extend"``)."""
    shipped = json.loads(
        resources.files("dct_audit").joinpath("data/attributes.json").read_text(encoding="utf-8")
    )
    base, base_neutral, _ = _parse_vocabulary(shipped, "shipped")
    if path is None:
        return Vocabulary(tuple(base), tuple(base_neutral), "shipped: dct_audit/data/attributes.json")
    p = Path(path)
    if not p.is_file():
        raise DctAuditError(f"attribute file '{path}' does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DctAuditError(f"attribute file '{path}' is not valid JSON ({e})") from None
    attrs, neutral, mode = _parse_vocabulary(data, str(path))
    if extend is True or (extend is None and mode == "extend"):
        names = {a.name for a in attrs}
        attrs = [a for a in base if a.name not in names] + attrs
        neutral = neutral or base_neutral
        source = f"shipped + {p}"
    else:
        source = str(p)
    dup = {a.name for a in attrs if [b.name for b in attrs].count(a.name) > 1}
    if dup:
        raise DctAuditError(f"attribute file '{path}' names an attribute twice: {', '.join(sorted(dup))}")
    return Vocabulary(tuple(attrs), tuple(neutral or base_neutral), source)


# ----------------------------------------------------------------------------------------------------
# Tagger adapters: image and text features in one space
# ----------------------------------------------------------------------------------------------------


@dataclass
class Tagger:
    """A CLIP-like model: ``image_features`` and ``text_features`` (L2-normalised) and its temperature."""

    spec: str
    kind: str
    model: torch.nn.Module
    encode_image_fn: object
    encode_text_fn: object
    preprocess: Preprocess | None
    logit_scale: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """(B, D) features of images (B, 3, H, W) in [0, 1]."""
        out = []
        for i in range(0, len(images), batch):
            x = images[i : i + batch].to(self.device).float()
            if self.preprocess is not None:
                x = self.preprocess(x)
            out.append(F.normalize(self.encode_image_fn(x).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.encode_text_fn(list(texts)).float(), dim=-1).cpu()

    def record(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "logit_scale": self.logit_scale}


def check_tagger(spec: str) -> None:
    """Check cheaply, before any model loads or any file is written, that the tagger can be had: a known
    architecture, and its weights cached or downloadable now. Raises one line naming the fix."""
    if registry.matches("tagger", spec):
        return  # a plugin checks its own spec when it loads
    if spec.startswith("hf:"):
        hub.hf_config(spec[3:], what="tagger", flag=f"--tagger {spec}")
        return
    import open_clip

    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        raise DctAuditError(
            f"unknown tagger architecture '{arch}'; e.g. {DEFAULT_TAGGER}, hf:openai/clip-vit-base-patch32 or world"
        )
    if not tag:
        return
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = ", ".join(t for a, t in open_clip.list_pretrained() if a == arch) or "none"
        raise DctAuditError(f"tagger '{arch}' has no pretrained tag '{tag}'; known tags: {tags}")
    from .records import not_cached

    hub.require_downloadable(not_cached({"--tagger": spec}))  # its weights, cached or to be had


def load_tagger(spec: str = DEFAULT_TAGGER, device: str | torch.device = "cpu") -> Tagger:
    device = torch.device(device)
    plugin = registry.find("tagger", spec)  # another package's tagger (the world's): adapters/registry.py
    if plugin is not None:
        return plugin(spec, device)
    if spec.startswith("hf:"):
        from transformers import AutoProcessor, CLIPModel

        model_id = spec[3:]
        with hub.missing_model_guard("tagger", f"--tagger {spec}", source=model_id):
            model = CLIPModel.from_pretrained(model_id, **hub.hf_kwargs(model_id)).to(device).eval()
            proc = AutoProcessor.from_pretrained(model_id, **hub.hf_kwargs(model_id))
        ip = proc.image_processor
        edge = int(ip.size.get("shortest_edge", 224))
        crop = (int(ip.crop_size["height"]), int(ip.crop_size["width"]))
        pre = Preprocess(crop, edge, tuple(ip.image_mean), tuple(ip.image_std), "bicubic")

        def features(out):  # transformers 5 returns an output object whose pooler_output is projected
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def enc_text(texts):
            tok = proc.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
            return features(model.get_text_features(**tok))

        return Tagger(
            spec,
            "transformers",
            model,
            lambda x: features(model.get_image_features(pixel_values=x)),
            enc_text,
            pre,
            float(model.logit_scale.detach().exp()),
            device,
        )
    import open_clip

    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        raise DctAuditError(
            f"unknown tagger architecture '{arch}'; e.g. {DEFAULT_TAGGER}, hf:openai/clip-vit-base-patch32 or world"
        )
    check_tagger(spec)
    with hub.missing_model_guard("tagger", f"--tagger {spec}"):
        try:
            model = open_clip.create_model(arch, pretrained=tag or None, device=device).eval()
        except RuntimeError as e:  # open_clip wraps the hub's "not cached, no network" in a RuntimeError
            if "download" not in str(e).lower():
                raise
            raise OSError(str(e)) from None
    tokenizer = open_clip.get_tokenizer(arch)
    cfg = model.visual.preprocess_cfg
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    pre = Preprocess(
        size, min(size), tuple(cfg.get("mean")), tuple(cfg.get("std")), cfg.get("interpolation", "bicubic")
    )
    return Tagger(
        spec,
        "open_clip",
        model,
        model.encode_image,
        lambda t: model.encode_text(tokenizer(t).to(device)),
        pre,
        float(model.logit_scale.detach().exp()),
        device,
    )


# ----------------------------------------------------------------------------------------------------
# Presence decisions
# ----------------------------------------------------------------------------------------------------


@dataclass
class AttributeBank:
    """Text features of every attribute (prompt mean) and of the neutral prompts, computed once."""

    vocabulary: Vocabulary
    attr_features: torch.Tensor  # (A, D)
    neutral_features: torch.Tensor  # (N, D)
    logit_scale: float
    tagger: Tagger | None = None

    @classmethod
    def build(cls, tagger: Tagger, vocabulary: Vocabulary) -> AttributeBank:
        feats = [
            F.normalize(tagger.text_features(list(a.prompts)).mean(0), dim=-1) for a in vocabulary.attributes
        ]
        neutral = tagger.text_features(list(vocabulary.neutral))
        return cls(vocabulary, torch.stack(feats), neutral, tagger.logit_scale, tagger)

    def scores(self, image_features: torch.Tensor) -> np.ndarray:
        """(B, A) presence score of each attribute, in (0, 1).

        An attribute is a yes/no question: a two-way softmax of its prompts against the pooled neutral
        prompts. Attributes marked ``exclusive`` with the same name (the world's backgrounds: one per
        image) instead share one softmax, so the score is the share among the alternatives.
        """
        s = self.logit_scale
        attr = s * image_features @ self.attr_features.T  # (B, A)
        neutral = torch.logsumexp(
            s * image_features @ self.neutral_features.T, dim=-1, keepdim=True
        )  # (B, 1)
        out = torch.sigmoid(attr - neutral)
        sets: dict[str, list[int]] = {}
        for j, a in enumerate(self.vocabulary.attributes):
            if a.exclusive:
                sets.setdefault(a.exclusive, []).append(j)
        for cols in sets.values():
            out[:, cols] = attr[:, cols].softmax(-1)
        return out.numpy()

    def thresholds(self, calibrated: dict[str, float] | None = None) -> np.ndarray:
        calibrated = calibrated or {}
        return np.array(
            [
                calibrated.get(a.name, a.threshold if a.threshold is not None else PRESENCE_THRESHOLD)
                for a in self.vocabulary.attributes
            ]
        )
