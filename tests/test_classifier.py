"""Classifier loaders from local folders (timm, transformers, TorchScript) and differentiable preprocessing."""

import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dct_audit.adapters.classifier import Preprocess, load_classifier
from dct_audit.errors import DctAuditError


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("timm_model")
    torch.manual_seed(0)
    model = timm.create_model(
        "resnet10t",
        num_classes=3,
        pretrained_cfg_overlay={
            "input_size": (3, 48, 48),
            "crop_pct": 0.75,
            "interpolation": "bicubic",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
            "label_names": ["star", "ring", "cross"],
        },
    )
    save_for_hf(model, folder, model_config={"label_names": ["star", "ring", "cross"]})
    return folder


def test_timm_folder_loads_with_its_own_preprocessing(timm_folder):
    clf = load_classifier(str(timm_folder))
    assert clf.spec.kind == "timm" and clf.labels.names == ("star", "ring", "cross")
    assert clf.preprocess == Preprocess((48, 48), 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")
    x = torch.rand(2, 3, 80, 80, requires_grad=True)
    clf(x).sum().backward()
    assert x.grad.abs().sum() > 0  # gradients reach the image
    assert all(not p.requires_grad for p in clf.model.parameters())


def test_preprocess_matches_timm_eval_transform():
    """Our torch preprocessing equals timm's PIL eval transform up to resampling differences."""
    from timm.data import create_transform

    cfg = {
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_mode": "center",
    }
    rng = np.random.default_rng(0)
    small = rng.random((8, 8, 3))  # a smooth image: resampling kernels then agree closely
    img = Image.fromarray((np.kron(small, np.ones((40, 40, 1))) * 255).astype(np.uint8))  # 320 x 320
    ref = create_transform(**cfg)(img)
    ours = Preprocess.from_timm(cfg)(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255)[0]
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().mean() < 0.02


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_preprocess_equals_torchvision_resize_and_crop_on_non_square_images(interpolation):
    """On tensors our preprocessing is torchvision's eval transform exactly (timm's and torchvision's models
    use it): the longer side truncated as Resize(int) does, the crop offset rounded as CenterCrop does. A
    one-pixel shift here (round instead of truncate) changed a real ImageNet model's probabilities by 0.04."""
    import torchvision.transforms.v2 as T

    mode = getattr(T.InterpolationMode, interpolation.upper())
    cfg = {
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": interpolation,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_mode": "center",
    }
    ours = Preprocess.from_timm(cfg)
    assert ours.resize == 256
    ref = T.Compose(
        [
            T.Resize(256, interpolation=mode, antialias=True),
            T.CenterCrop(224),
            T.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    g = torch.Generator().manual_seed(0)
    for h, w in [(300, 451), (427, 640), (451, 300), (256, 256), (225, 999), (512, 512)]:
        x = torch.rand(2, 3, h, w, generator=g)
        assert torch.allclose(ours(x), ref(x), atol=1e-5), (h, w)


def test_timm_squash_mode_with_a_crop_pct_is_resize_both_sides_then_crop():
    """timm's crop_mode "squash" with crop_pct < 1 (dm_nfnet_f0 and 10 other pretrained models) was refused;
    it is both edges to size / crop_pct, then the centre crop: exactly torchvision's Resize((s, s)) +
    CenterCrop, on non-square images too."""
    import torchvision.transforms.v2 as T
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg("dm_nfnet_f0").to_dict()
    assert cfg["crop_mode"] == "squash" and cfg["crop_pct"] < 1
    ours = Preprocess.from_timm(cfg)
    size = cfg["input_size"][-1]
    scale = math.floor(size / cfg["crop_pct"])
    assert ours.squash and ours.resize == scale and ours.crop == (size, size)
    mode = getattr(T.InterpolationMode, cfg["interpolation"].upper())
    ref = T.Compose(
        [
            T.Resize((scale, scale), interpolation=mode, antialias=True),
            T.CenterCrop(size),
            T.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    g = torch.Generator().manual_seed(0)
    for h, w in [(300, 451), (256, 256), (512, 300)]:
        x = torch.rand(1, 3, h, w, generator=g)
        assert torch.allclose(ours(x), ref(x), atol=1e-5), (h, w)
    assert "squash" not in Preprocess((8, 8), 9).identity()  # records of earlier versions keep matching
    with pytest.raises(DctAuditError, match="crop_mode must be center, squash or border"):
        Preprocess.from_timm({**cfg, "crop_mode": "centre"})


def test_transformers_folder(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label={0: "lobster", 1: "plate"},
        label2id={"lobster": 0, "plate": 1},
    )
    ViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(tmp_path)
    clf = load_classifier(f"hf:{tmp_path}")
    assert (
        clf.labels.names == ("lobster", "plate")
        and clf.preprocess.crop == (32, 32)
        and clf.preprocess.resize is None
    )
    assert clf(torch.rand(2, 3, 64, 64)).shape == (2, 2)


def test_torchscript_label_count_mismatch(tiny_classifier, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("only one\n")
    with pytest.raises(DctAuditError, match="outputs 4 classes but its labels list 1"):
        load_classifier(f"file:{tiny_classifier[0]}", str(labels))


def test_torchscript_sidecar_preprocessing(tiny_classifier):
    clf = load_classifier(f"file:{tiny_classifier[0]}", tiny_classifier[1])
    side = json.loads(open(tiny_classifier[0] + ".json").read())
    assert (
        clf.preprocess.crop == tuple(side["input_size"][1:])
        and clf.spec.extra["preprocess"]["interpolation"] == "bilinear"
    )
