"""Classifier adapter: any image classifier as ``images in [0, 1] -> logits``, differentiably.

Specs (what ``--classifier`` accepts):

- a bare name, ``hf-hub:ORG/NAME`` or ``local-dir:PATH`` (or an existing folder): timm
  (``resnet50``, ``vit_base_patch16_224.augreg_in21k_ft_in1k``);
- ``tv:NAME`` or ``tv:NAME.WEIGHTS``: torchvision weights (``tv:resnet50.IMAGENET1K_V2``);
- ``hf:ORG/MODEL`` (or ``hf:PATH``): a transformers image classifier;
- ``file:PATH``: a TorchScript module, with ``--labels FILE`` (one label per line) and optional
  preprocessing in ``PATH.json`` (``input_size``, ``crop_pct``, ``mean``, ``std``, ``interpolation``).

Preprocessing always comes from the model's own config (timm's data config, torchvision's weights
transforms, the transformers image processor) and runs as torch code so gradients reach the image.
ImageNet label names come from ``timm.data.ImageNetInfo``. A classifier from another package loads through
``dct_audit.adapters.registry``; a model in memory through ``adapters/in_memory.py``.

Why it is over 450 lines: four model sources (timm, torchvision, transformers, TorchScript), each with its
labels and its preprocessing read from the model's own config; one source per module would spread the one
``Preprocess`` and ``LabelSet`` they share.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DctAuditError
from . import hub, registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


# ----------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSet:
    """Class names of a classifier: a display name per index plus the synonyms a query may match."""

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    source: str

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_lines(cls, lines: list[str], source: str) -> LabelSet:
        """One label per line; ``a, b, c`` lines give synonyms with ``a`` as the display name."""
        syn = tuple(
            tuple(s.strip() for s in line.split(",") if s.strip()) or (line.strip(),) for line in lines
        )
        return cls(names=tuple(s[0] for s in syn), synonyms=syn, source=source)

    @classmethod
    def imagenet(cls, subset: str = "imagenet-1k") -> LabelSet:
        from timm.data import ImageNetInfo

        info = ImageNetInfo(subset)
        lines = [info.index_to_description(i) for i in range(info.num_classes())]
        return cls.from_lines(lines, source=f"timm.data.ImageNetInfo({subset!r})")


def read_labels_file(path: str | os.PathLike) -> LabelSet:
    p = Path(path)
    if not p.is_file():
        raise DctAuditError(
            f"labels file '{path}' does not exist; pass --labels with one class name per line"
        )
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: drop a BOM
    except UnicodeDecodeError as e:
        raise DctAuditError(
            f"labels file '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); it needs one class name "
            "per line"
        ) from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines name no class
        lines.pop()
    if not lines:
        raise DctAuditError(f"labels file '{path}' is empty; it needs one class name per line")
    blank = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
    if blank:  # skipping it would shift every later class to the wrong index
        raise DctAuditError(
            f"labels file '{path}' has an empty line {blank[0]}; line N is the name of class N-1, so every "
            "line up to the last class needs a name"
        )
    return LabelSet.from_lines(lines, source=f"file:{p}")


# ----------------------------------------------------------------------------------------------------
# Differentiable preprocessing
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """Resize (shorter side, or squash to a square), centre crop, normalise; all as torch ops.

    ``resize`` is the shorter-side length before the crop (``None``: squash straight to ``crop``); with
    ``squash`` both sides become ``resize`` (the aspect ratio is not kept), then the crop is taken (timm's
    ``crop_mode="squash"``, transformers' resize to height x width before a centre crop).
    """

    crop: tuple[int, int]
    resize: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    squash: bool = False

    def identity(self) -> dict:
        """The fields, as recorded (``squash`` only when set, so records of earlier versions still match)."""
        d = asdict(self)
        if not self.squash:
            d.pop("squash")
        return d

    def check(self, where: str) -> Preprocess:
        """One line naming what is wrong (``where``: what the user wrote it in), else ``self``."""

        def numbers(v, n):
            return (
                isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(x, (int, float)) for x in v)
            )

        if not numbers(self.crop, 2) or not all(isinstance(x, int) and x > 0 for x in self.crop):
            raise DctAuditError(
                f"{where} crop must be (height, width), two positive whole numbers, not {self.crop!r}"
            )
        if self.resize is not None and not (isinstance(self.resize, int) and self.resize > 0):
            raise DctAuditError(
                f"{where} resize must be None or a positive whole number, not {self.resize!r}"
            )
        if not numbers(self.mean, 3):
            raise DctAuditError(
                f"{where} mean must be three numbers (one per RGB channel), not {self.mean!r}"
            )
        if not numbers(self.std, 3) or not all(0 < x < float("inf") for x in self.std):
            raise DctAuditError(f"{where} std must be three positive numbers, not {self.std!r}")
        if max(self.mean) > 1 or max(self.std) > 1:  # e.g. (123.675, 116.28, 103.53): silently wrong scores
            raise DctAuditError(
                f"{where} mean {list(self.mean)} and std {list(self.std)} are on the 0-255 pixel scale; the "
                "images dct-audit scores are in [0, 1]: divide both by 255"
            )
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise DctAuditError(
                f"{where} interpolation must be bilinear, bicubic or nearest, not {self.interpolation!r}"
            )
        if not isinstance(self.squash, bool):
            raise DctAuditError(f"{where} squash must be True or False, not {self.squash!r}")
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, H, W) in [0, 1]
        mode = self.interpolation if self.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        aa = mode != "nearest"
        h, w = images.shape[-2:]
        if self.resize is None:
            size = self.crop
        elif self.squash:
            size = (max(self.crop[0], self.resize), max(self.crop[1], self.resize))
        else:
            # as torchvision's Resize(int) (what timm's and torchvision's eval transforms use): the shorter side
            # becomes ``resize``, the longer one int(resize * long / short), truncated
            long = int(self.resize * max(h, w) / min(h, w))
            size = (self.resize, long) if h <= w else (long, self.resize)
            size = (max(self.crop[0], size[0]), max(self.crop[1], size[1]))
        if (h, w) != tuple(size):
            kw = {} if mode == "nearest" else {"align_corners": False, "antialias": aa}
            images = F.interpolate(images, size=size, mode=mode, **kw)
        # as torchvision's CenterCrop: offsets rounded half to even
        top = int(round((images.shape[-2] - self.crop[0]) / 2.0))
        left = int(round((images.shape[-1] - self.crop[1]) / 2.0))
        images = images[..., top : top + self.crop[0], left : left + self.crop[1]]  # (B, 3, h, w)
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    @classmethod
    def from_timm(cls, cfg: dict) -> Preprocess:
        size = tuple(cfg["input_size"][-2:])
        crop_pct = cfg.get("crop_pct") or 1.0
        mode = cfg.get("crop_mode", "center")
        mean, std, interpolation = tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bilinear")
        if mode not in ("center", "squash", "border"):
            raise DctAuditError(f"crop_mode must be center, squash or border, not {mode!r}")
        if mode == "squash":  # both edges to size / crop_pct, then the centre crop
            if crop_pct == 1.0:
                return cls(size, None, mean, std, interpolation)
            if size[0] != size[1]:
                raise DctAuditError(
                    f"timm crop_mode 'squash' with crop_pct {crop_pct} and a non-square input {size} is not "
                    "supported; pass the model in memory with a Preprocess"
                )
            return cls(size, math.floor(size[0] / crop_pct), mean, std, interpolation, squash=True)
        # "center" (and "border", which for the square images the audit makes is the same)
        return cls(size, math.floor(min(size) / crop_pct), mean, std, interpolation)


# ----------------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------------


@dataclass
class ClassifierSpec:
    """A classifier as resolved: which library, which id and weights; recorded in the manifest."""

    spec: str
    kind: str  # timm | torchvision | transformers | torchscript
    model_id: str
    weights: str | None = None
    labels_source: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier(nn.Module):
    """Frozen classifier: ``forward(images)`` takes (B, 3, H, W) in [0, 1] and returns logits (B, C)."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, labels: LabelSet, spec: ClassifierSpec):
        super().__init__()
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.preprocess = preprocess
        self.labels = labels
        self.spec = spec

    @property
    def outputs_probabilities(self) -> bool:
        """The model ends in a softmax (found by :func:`checked_outputs`): its log is taken as the logits."""
        return self.spec.extra.get("outputs") == "probabilities"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (B, C) float32 logits whatever the model's dtype (a half-precision module gets inputs of its dtype)
        out = as_logits(self.model(self.preprocess(images).to(self.dtype)), self.spec.spec).float()
        # softmax(log p) = p: the loss and every probability reported are the model's own, not a softmax of it
        return out.clamp_min(1e-30).log() if self.outputs_probabilities else out

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype (a half-precision module gets half-precision inputs)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        for b in self.model.buffers():
            return b.device
        return torch.device("cpu")


def as_logits(out, name: str = "the classifier") -> torch.Tensor:
    """A model's output as logits (B, C): a tensor; ``.logits`` or ``["logits"]`` (transformers outputs,
    dicts); the first element of a tuple or list (models that also return features)."""
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, dict):
        out = out.get("logits")
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        what = f"a {out.dim()}-d tensor" if isinstance(out, torch.Tensor) else type(out).__name__
        raise DctAuditError(
            f"classifier '{name}' returned {what}, not logits (batch, classes); wrap it so that forward "
            "returns a logits tensor, a tuple starting with one, or a dict with 'logits'"
        )
    return out


def parse_spec(spec: str) -> tuple[str, str]:
    """``(kind, id)`` from a ``--classifier`` string."""
    if not spec or not spec.strip():
        raise DctAuditError(
            "--classifier is empty; give a timm name (resnet50), tv:NAME, hf:ORG/MODEL or file:PATH"
        )
    spec = spec.strip()
    if spec.startswith(IN_MEMORY):
        raise DctAuditError(
            f"classifier '{spec}' was passed in memory (a torch module), so it cannot be loaded from its name; "
            "pass the same model again from Python: dct_audit.run(model, classes, labels=..., preprocess=...)"
        )
    for prefix, kind in (
        ("tv:", "torchvision"),
        ("hf:", "transformers"),
        ("file:", "torchscript"),
        ("timm:", "timm"),
    ):
        if spec.startswith(prefix):
            rest = spec[len(prefix) :]
            if not rest:
                raise DctAuditError(f"--classifier '{spec}' names no model after '{prefix}'")
            return kind, rest
    if os.path.isdir(spec):
        return "timm", f"local-dir:{spec}"
    if os.path.isfile(os.path.expanduser(spec)):
        raise DctAuditError(
            f"classifier '{spec}' is a file, not a model folder or name; a TorchScript file takes the file: "
            f"prefix and a labels file: --classifier file:{spec} --labels LABELS.txt"
        )
    if spec.startswith((".", "/", "~")) or spec.endswith("/"):  # meant as a folder
        raise DctAuditError(
            f"classifier folder '{spec}' does not exist; pass a timm model folder or a model name"
        )
    return "timm", spec


def _timm_pretrained_cfg(model_id: str) -> dict:
    """The timm pretrained config (preprocessing, label info) without creating the model or its weights."""
    import timm
    from timm.models import get_pretrained_cfg

    if model_id.startswith("local-dir:"):
        folder = Path(model_id[len("local-dir:") :])
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise DctAuditError(
                f"classifier folder '{folder}' has no config.json (a timm model folder is expected)"
            )
        try:
            raw = json.loads(cfg_file.read_text())
            assert isinstance(raw, dict)
        except (ValueError, AssertionError):
            raise DctAuditError(
                f"classifier folder '{folder}': config.json is not a valid JSON object; re-save the model "
                "(timm.models.save_for_hf)"
            ) from None
        cfg = dict(raw.get("pretrained_cfg") or {})
        cfg.setdefault("num_classes", raw.get("num_classes"))
        cfg.setdefault("label_names", raw.get("label_names"))
        cfg.setdefault("architecture", raw.get("architecture"))
        return cfg
    if model_id.startswith("hf-hub:"):
        path = hub.hf_file(
            model_id[len("hf-hub:") :], "config.json", what="classifier", flag=f"--classifier {model_id}"
        )
        raw = json.loads(Path(path).read_text())
        cfg = dict(raw.get("pretrained_cfg", {}))
        cfg.setdefault("num_classes", raw.get("num_classes"))
        cfg.setdefault("label_names", raw.get("label_names"))
        return cfg
    if not timm.is_model(model_id):
        import difflib

        close = difflib.get_close_matches(model_id, timm.list_models(pretrained=True), n=3, cutoff=0.6)
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else "; see timm.list_models() or use tv:, hf: or file:"
        )
        raise DctAuditError(f"unknown classifier '{model_id}'{hint}")
    cfg = get_pretrained_cfg(model_id)
    if cfg is None:
        raise DctAuditError(
            f"timm model '{model_id}' has no pretrained weights; name one with a tag (e.g. resnet50.a1_in1k)"
        )
    return cfg.to_dict()


def labels_from_timm_cfg(cfg: dict, model_id: str) -> LabelSet:
    from timm.data import infer_imagenet_subset

    if cfg.get("label_names"):
        descriptions = cfg.get("label_descriptions")
        if isinstance(descriptions, dict):
            lines = [descriptions.get(n, n) for n in cfg["label_names"]]
        else:
            lines = list(cfg["label_names"])
        return LabelSet.from_lines(lines, source=f"{model_id} pretrained_cfg.label_names")
    subset = infer_imagenet_subset(cfg)
    if subset is None:
        raise DctAuditError(
            f"classifier '{model_id}' has {cfg.get('num_classes')} classes and no label names; pass --labels FILE"
        )
    return LabelSet.imagenet(subset)


def _tv_weights(model_id: str):
    """``(model name, weights enum)`` for ``resnet50`` (default weights) or ``resnet50.IMAGENET1K_V2``."""
    import difflib

    from torchvision.models import get_model_weights, list_models

    name, _, tag = model_id.partition(".")
    if name not in list_models():
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"; did you mean {', '.join('tv:' + c for c in close)}?" if close else ""
        raise DctAuditError(f"unknown torchvision classifier 'tv:{name}'{hint}")
    enum = get_model_weights(name)
    if not tag:
        return name, enum.DEFAULT
    if tag not in enum.__members__:
        raise DctAuditError(
            f"torchvision model '{name}' has no weights '{tag}'; choose from {', '.join(enum.__members__)}"
        )
    return name, enum[tag]


def torchvision_checkpoint(model_id: str) -> tuple[Path, str]:
    """Where ``torch.hub`` keeps the weights of ``NAME[.WEIGHTS]`` (``TORCH_HOME``), and the URL it fetches them
    from: what ``get_model`` loads."""
    from urllib.parse import urlsplit

    url = _tv_weights(model_id)[1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(url).path), url


def _labels_from_categories(categories: list[str], source: str) -> LabelSet:
    if len(categories) == 1000:
        return LabelSet.imagenet("imagenet-1k")
    return LabelSet.from_lines(list(categories), source=source)


def describe_classifier(spec: str, labels_file: str | None = None) -> tuple[ClassifierSpec, LabelSet]:
    """Resolve a classifier spec to its record and label set without loading any weights (a registered
    plugin's classifier is loaded, on the CPU: only it knows its labels)."""
    plugin = registry.find("classifier", spec or "")
    if plugin is not None:
        clf = plugin(spec, torch.device("cpu"), labels_file)
        return clf.spec, clf.labels
    kind, model_id = parse_spec(spec)
    if kind == "torchscript":
        path = Path(model_id)
        if not path.is_file():
            raise DctAuditError(f"classifier file '{model_id}' does not exist")
        if not zipfile.is_zipfile(path):  # every TorchScript archive is a zip: a cheap check before any load
            raise DctAuditError(
                f"classifier file '{model_id}' is not a TorchScript archive (not a zip file); save the model with "
                "torch.jit.save(torch.jit.script(model), PATH) or pass a timm/torchvision/hf: name"
            )
        if labels_file is None:
            raise DctAuditError(f"--classifier file:{model_id} needs --labels FILE (one class name per line)")
        labels = read_labels_file(labels_file)
        return ClassifierSpec(spec, kind, str(path.resolve()), labels_source=labels.source), labels
    if labels_file is not None:
        labels = read_labels_file(labels_file)
    else:
        labels = None
    if kind == "timm":
        cfg = _timm_pretrained_cfg(model_id)
        labels = labels or labels_from_timm_cfg(cfg, model_id)
        tag = cfg.get("tag") or cfg.get("hf_hub_id")
        rec = ClassifierSpec(spec, kind, model_id, weights=tag, labels_source=labels.source)
        return rec, labels
    if kind == "torchvision":
        name, weights = _tv_weights(model_id)
        labels = labels or _labels_from_categories(weights.meta["categories"], f"torchvision {weights}")
        return ClassifierSpec(spec, kind, name, weights=str(weights), labels_source=labels.source), labels
    if kind == "transformers":
        config = hub.hf_config(model_id, what="classifier", flag=f"--classifier hf:{model_id}")
        if labels is None:
            id2label = {int(k): v for k, v in (config.id2label or {}).items()}
            lines = [id2label[i] for i in range(len(id2label))]
            labels = _labels_from_categories(lines, source=f"hf:{model_id} config.id2label")
        return ClassifierSpec(spec, kind, model_id, labels_source=labels.source), labels
    raise AssertionError(kind)


def load_classifier(
    spec: str, labels_file: str | None = None, device: str | torch.device = "cpu"
) -> Classifier:
    """Load a classifier with its weights and preprocessing, frozen, on ``device``."""
    plugin = registry.find("classifier", spec or "")
    if plugin is not None:
        clf = plugin(spec, torch.device(device), labels_file)
        return checked_outputs(clf, f"classifier '{spec}'", "its plugin's labels")
    rec, labels = describe_classifier(spec, labels_file)
    kind, model_id = rec.kind, rec.model_id
    if kind == "timm":
        import timm
        from timm.data import resolve_data_config

        with hub.missing_model_guard("classifier", f"--classifier {spec}", source=model_id):
            model = timm.create_model(model_id, pretrained=True)
        cfg = resolve_data_config({}, model=model)
        pre = Preprocess.from_timm(cfg)
    elif kind == "torchvision":
        from torchvision.models import get_model

        _, weights = _tv_weights(parse_spec(spec)[1])
        with hub.missing_model_guard("classifier", f"--classifier {spec}", torch_hub=True):
            model = get_model(model_id, weights=weights)
        t = weights.transforms()
        crop = tuple(t.crop_size) * (2 // len(t.crop_size))
        pre = Preprocess(crop, int(t.resize_size[0]), tuple(t.mean), tuple(t.std), t.interpolation.value)
    elif kind == "transformers":
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        with hub.missing_model_guard("classifier", f"--classifier {spec}", source=model_id):
            # float32 whatever the checkpoint stores: the images we score are float32 (a half-precision
            # checkpoint loaded with transformers' dtype="auto" would fail on them, or score in half)
            model = AutoModelForImageClassification.from_pretrained(
                model_id, dtype=torch.float32, **hub.hf_kwargs(model_id)
            )
            proc = AutoImageProcessor.from_pretrained(model_id, **hub.hf_kwargs(model_id))
        pre = _preprocess_from_hf(proc)
    else:  # torchscript
        try:
            with (
                warnings.catch_warnings()
            ):  # torch 2.10+ calls TorchScript deprecated; it is what file: loads
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*jit.*")
                model = torch.jit.load(model_id, map_location="cpu")
        except (RuntimeError, ValueError, OSError) as e:
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise DctAuditError(
                f"classifier file '{model_id}' is not a TorchScript archive ({first}); save the model with "
                "torch.jit.save(torch.jit.script(model), PATH) or pass a timm/torchvision/hf: name"
            ) from None
        pre = _preprocess_from_sidecar(Path(model_id))
        rec.extra["preprocess"] = asdict(pre)
    return checked_outputs(Classifier(model, pre, labels, rec).to(device), f"classifier '{spec}'", "--labels")


IN_MEMORY = "in-memory:"  # the spec prefix of a classifier given in memory (adapters/in_memory.py)


LOGIT_KINDS = ("timm", "torchvision", "transformers")  # libraries whose classification heads give logits


def checked_outputs(clf: Classifier, what: str, labels_from: str) -> Classifier:
    """``clf``, once a probe forward pass shows as many outputs as it has labels (else one clear line).

    A model of unknown make (a TorchScript file, a module in memory, a plugin's) whose outputs on two random
    images are non-negative rows summing to 1 ends in a softmax: it is marked (``spec.extra["outputs"]``), and
    its log is used as logits. Otherwise a softmax of probabilities would compress every reported probability
    towards 1/C and flatten the loss, silently."""
    head = getattr(clf.model, "num_classes", None)
    cfg = getattr(clf.model, "config", None)
    n_out = head if isinstance(head, int) else getattr(cfg, "num_labels", None) if cfg is not None else None
    if n_out is None or clf.spec.kind not in LOGIT_KINDS:
        with torch.no_grad():
            x = torch.rand(2, 3, *clf.preprocess.crop, generator=torch.Generator().manual_seed(0))
            try:
                out = clf.model(x.to(clf.device, clf.dtype))
            except torch.cuda.OutOfMemoryError:  # two images do not fit beside what is loaded: not its shape
                out = None
            except Exception as e:  # a model that cannot take (batch, 3, H, W) images: say so before any work
                # the cause is the last line (TorchScript puts its interpreter's trace before it)
                first = ([ln for ln in str(e).splitlines() if ln.strip()] or [""])[-1].strip()
                first = first.removeprefix(f"{type(e).__name__}: ")[:300]
                raise DctAuditError(
                    f"{what} fails on 2 RGB images of {x.shape[-2]}x{x.shape[-1]} "
                    f"({type(e).__name__}: {first}); the audit gives it (batch, 3, H, W) images normalised "
                    "by its preprocessing: set input_size, mean and std in its preprocessing "
                    "(PATH.json for a TorchScript file) or wrap it to take them"
                ) from None
        if out is not None:
            out = as_logits(out, clf.spec.spec).float()
            n_out = n_out if n_out is not None else int(out.shape[-1])
            if clf.spec.kind not in LOGIT_KINDS and out.shape[-1] >= 2 and _are_probabilities(out):
                clf.spec.extra["outputs"] = "probabilities"
    if n_out is not None and int(n_out) != len(clf.labels):
        raise DctAuditError(
            f"{what} outputs {n_out} classes but its labels list {len(clf.labels)}; check {labels_from}"
        )
    return clf


def load_notes(clf: Classifier) -> list[str]:
    """What a user should know about how a classifier is read, one line each (printed when a run loads it)."""
    notes = []
    if clf.outputs_probabilities:
        notes.append(
            f"classifier {clf.spec.spec} returns probabilities (its outputs are non-negative and sum to 1), "
            "not logits; their log is used as logits"
        )
    if clf.spec.kind == "torchscript" and not Path(clf.spec.model_id + ".json").is_file():
        pre = clf.preprocess
        notes.append(
            f"no {clf.spec.model_id}.json beside the classifier: ImageNet preprocessing assumed (resize {pre.resize}, "
            f"crop {pre.crop[0]}x{pre.crop[1]}, {pre.interpolation}, ImageNet mean/std); write that file if the "
            "model was trained otherwise"
        )
    return notes


def _are_probabilities(out: torch.Tensor) -> bool:
    sums = out.sum(-1)
    return bool(out.min() >= 0 and torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


def _preprocess_from_hf(proc) -> Preprocess:
    size = getattr(proc, "size", None) or {"height": 224, "width": 224}
    size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
    crop_pct = getattr(proc, "crop_pct", None)
    mode = _PIL_RESAMPLE.get(int(getattr(proc, "resample", 2) or 2), "bilinear")
    mean = tuple(getattr(proc, "image_mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(proc, "image_std", None) or IMAGENET_STD)
    do_crop = bool(getattr(proc, "do_center_crop", False))
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if crop_pct and edge < 384:  # ConvNeXt-style: resize to edge / crop_pct, crop to edge
            return Preprocess((edge, edge), int(edge / crop_pct), mean, std, mode)
        crop = dict(getattr(proc, "crop_size", None) or {"height": edge, "width": edge})
        crop_hw = (int(crop["height"]), int(crop["width"])) if do_crop else (edge, edge)
        return Preprocess(crop_hw, edge, mean, std, mode)
    hw = (int(size["height"]), int(size["width"]))
    if do_crop:
        crop = dict(proc.crop_size)
        # squash to (h, w), then crop (a non-square (h, w): the shorter side, the same for square images)
        return Preprocess(
            (int(crop["height"]), int(crop["width"])), min(hw), mean, std, mode, squash=hw[0] == hw[1]
        )
    return Preprocess(hw, None, mean, std, mode)


def _preprocess_from_sidecar(path: Path) -> Preprocess:
    side = path.with_name(path.name + ".json")
    cfg = {
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bicubic",
        "crop_mode": "center",
    }
    where = f"preprocessing file '{side}':"
    if side.is_file():
        try:
            given = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise DctAuditError(f"preprocessing file '{side}' is not valid JSON ({e})") from None
        if not isinstance(given, dict):
            raise DctAuditError(
                f"{where} expected a JSON object with input_size, crop_pct, mean, std, interpolation"
            )
        cfg.update(given)
    if isinstance(cfg["input_size"], int):
        cfg["input_size"] = (3, cfg["input_size"], cfg["input_size"])
    try:
        pre = Preprocess.from_timm(cfg)
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise DctAuditError(f"{where} cannot be read ({type(e).__name__}: {e})") from None
    return pre.check(where)
