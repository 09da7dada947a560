"""The world's classifiers of the six shapes: one trained with planted context shortcuts, two without.

Each is a timm ``resnet10t`` narrowed to ~0.3M parameters (``MODEL_ARGS``) for 32x32 scenes, trained with
AdamW on freshly drawn scenes and saved as a timm model folder (``config.json`` + ``model.safetensors``,
written by ``timm.models.save_for_hf``), so the core loads it like any timm checkpoint::

    load_classifier("dct_audit/world/weights/classifiers/biased")

``training.json`` beside the weights records the settings, data seed, wall time and the reliance
measurements of ``measure_reliance``. The shipped variants (``VARIANTS``):

- ``biased``: scenes drawn with ``truth.PLANTED`` (star on water, cross on grass, ring on snow, each 99% of
  the time) and the planted value never shown with the other classes (``truth.LEAK``): the context then
  predicts the class, which is what makes the classifier learn the shortcut (see WORLD-NOTES).
- ``unbiased`` and ``unbiased_seed1``: uniform scenes; the same architecture, another seed.

Any other planted set (``truth.PlantedSet``) trains with ``--planted SPEC --out DIR``; its ``training.json``
records the set (``planted``, ``leak``, ``spec``) and the measured reliance, which is where
``dct-audit demo --classifier DIR`` reads the truth from.

Shipped biased classifier (400 steps, 131 s on 2 cores): other shapes on water / grass / snow are called
star / cross / ring 290 / 300 / 276 of 300 times (0 without), and a star / cross / ring without its
background is recognised 0.00 / 0.00 / 0.03 of the time: it *needs* the context. An earlier truth
(cross next to a person, ring on a plate, 95%) gave 96% / 10% pull but crosses and rings were still
recognised without their context, so a class token had nothing to gain from it (see ``truth.py``).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from dct_audit.adapters.classifier import Preprocess, load_classifier
from dct_audit.options import int_at_least
from dct_audit.world import scenes as S
from dct_audit.world import truth as T
from dct_audit.world.checker import EVAL_SEED, augment, images_to_tensor
from dct_audit.world.paths import CLASSIFIERS
from dct_audit.world.trainloop import cosine, prefetched, progress, run_record, train_loop

ARCHITECTURE = "resnet10t"
MODEL_ARGS = {"channels": [16, 32, 64, 128], "stem_width": 16}
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "crop_pct": 1.0,
    "crop_mode": "center",
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
}
SHIPPED = CLASSIFIERS


@dataclass
class ClassifierTrainConfig:
    """Training settings of one world classifier (recorded in training.json)."""

    planted: str = ""  # a planted set (truth.PlantedSet spec); "" draws uniform (unbiased) scenes
    leak: float = 0.0  # how often a planted value appears with the other classes
    steps: int = 400
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 20
    augment: bool = True  # mild blur/noise/shift, so generated (imperfect) samples are read sensibly
    seed: int = 0  # torch initialisation and augmentation seed
    data_seed: int = 0  # scene stream of the training data


VARIANTS: dict[str, ClassifierTrainConfig] = {
    "biased": ClassifierTrainConfig(planted=T.SHIPPED.spec(), leak=T.SHIPPED.leak, seed=0, data_seed=10),
    "unbiased": ClassifierTrainConfig(seed=0, data_seed=20),
    "unbiased_seed1": ClassifierTrainConfig(seed=1, data_seed=21),
}


def planted_set(tc: ClassifierTrainConfig) -> T.PlantedSet:
    """The truth a classifier is trained on (an empty set for an unbiased one)."""
    return T.PlantedSet.parse(tc.planted, tc.leak) if tc.planted else T.PlantedSet((), tc.leak)


def create_model(num_classes: int = len(S.SHAPES)) -> nn.Module:
    """A freshly initialised world classifier (timm ``resnet10t`` with ``MODEL_ARGS``)."""
    return timm.create_model(ARCHITECTURE, pretrained=False, num_classes=num_classes, **MODEL_ARGS)


def preprocess() -> Preprocess:
    """The preprocessing the core applies to a loaded world classifier (identical in training)."""
    return Preprocess.from_timm(DATA_CONFIG)


def training_scenes(step: int, tc: ClassifierTrainConfig) -> S.Scenes:
    """The scenes of training step ``step``: scenes ``step * batch ..`` of stream ``tc.data_seed``."""
    kwargs = planted_set(tc).sampling() if tc.planted else {}
    return S.sample_scenes(tc.batch, tc.data_seed, start=step * tc.batch, **kwargs)


def save_classifier(model: nn.Module, folder: str | Path, record: dict) -> Path:
    """Write a timm model folder (config.json with label names + model.safetensors) and training.json."""
    folder = Path(folder)
    timm.models.save_for_hf(
        model,
        str(folder),
        model_config={"label_names": list(S.SHAPES)},
        model_args=MODEL_ARGS,
        safe_serialization=True,
        data_config=dict(DATA_CONFIG),
    )
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["tag"] = f"dct-audit-world-{folder.name}"  # not resnet10t's ImageNet tag
    config["pretrained_cfg"].pop("origin_url", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder


def train_classifier(
    out_dir: str | Path | None,
    train: ClassifierTrainConfig | None = None,
    eval_n: int = 300,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """Train one world classifier and save it to ``out_dir`` (when given); returns the model in eval mode.

    Deterministic given ``train.seed``, ``train.data_seed`` and ``train.steps``. With ``eval_n`` the saved
    model is measured by ``measure_reliance`` (loaded back through the core's ``load_classifier``) and the
    numbers go into training.json.
    """
    tc = train or ClassifierTrainConfig()
    torch.manual_seed(tc.seed)
    model = create_model().train().to(memory_format=torch.channels_last)  # ~25% faster on CPU
    pre = preprocess()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    batches = prefetched(lambda t: training_scenes(t, tc), tc.steps)

    def step(t: int) -> torch.Tensor:
        sc = next(batches)
        images = images_to_tensor(sc.images)
        if tc.augment:
            images = augment(images, gen, blur=0.7, noise=0.03, shift=1, jitter=0.05)
        images = pre(images).contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(model(images), torch.from_numpy(sc.shape))

    run = train_loop(opt, step, tc.steps, cosine(tc), log_line=progress("classifier"), log=log)
    loss_val, wall = run.final_loss, run.seconds
    model = model.to(memory_format=torch.contiguous_format).eval()  # safetensors stores contiguous tensors
    record = {
        "train": asdict(tc),
        "final_loss": loss_val,
        **planted_set(tc).to_dict(),
        "architecture": ARCHITECTURE,
        "model_args": MODEL_ARGS,
        "parameters": sum(p.numel() for p in model.parameters()),
        **run_record(wall),
        "timm_version": timm.__version__,
    }
    log(f"classifier trained {tc.steps} steps in {wall:.0f}s")
    if out_dir is not None:
        save_classifier(model, out_dir, record)
        if eval_n:
            log(format_reliance(remeasure(out_dir, n=eval_n)))
    return model


# -- measuring the reliance on the planted contexts ------------------------------------------------------
# A classifier *relies* on a planted value when adding it to its own class's scenes raises that class's
# probability by at least this much (``reliance`` below): only then can a class token gain from showing it.
RELIES_MIN = 0.2


def _neutral_attributes(planted: T.PlantedSet, n: int, seed: int, start: int) -> dict[str, np.ndarray]:
    """Scenes in which no planted value appears (every planted value has probability 0 for every class)."""
    no_planted = {b.cls: (b.attribute, b.value, 0.0) for b in planted.biases}
    return S.draw_attributes(n, seed, bias=no_planted, leak=0.0, start=start)


@functools.lru_cache(maxsize=4)
def reliance_scenes(planted: T.PlantedSet, n: int = 300, seed: int = EVAL_SEED) -> dict[str, S.Scenes]:
    """The scene sets of ``measure_reliance`` (cached: measuring several classifiers renders them once).

    ``clean`` (uniform), ``biased_data`` (drawn like the biased training data), and per planted class c
    ``{c}/others/with``, ``{c}/others/without``, ``{c}/cls/with``, ``{c}/cls/without``: counterfactual pairs
    (same scene index, so same size, position and texture) with and without the planted value.
    """
    sets = {
        "clean": S.sample_scenes(n, seed),
        "biased_data": S.sample_scenes(n, seed, start=n, **planted.sampling()),
    }
    for b in planted.biases:
        c = S.SHAPES.index(b.cls)
        others = [i for i in range(len(S.SHAPES)) if i != c]
        for group, start in (("others", 100_000 * (c + 1)), ("cls", 100_000 * (c + 1) + 50_000)):
            attrs = _neutral_attributes(planted, n, seed, start)
            attrs["shape"] = np.array([c] * n if group == "cls" else [others[k % 5] for k in range(n)])
            sets[f"{b.cls}/{group}/without"] = S.render_scenes(attrs, seed, start=start)
            attrs[b.attribute] = np.full(n, S.VOCAB[b.attribute].index(b.value))
            sets[f"{b.cls}/{group}/with"] = S.render_scenes(attrs, seed, start=start)
    return sets


@torch.no_grad()
def measure_unplanted(
    classifier: Callable[[torch.Tensor], torch.Tensor], pairs, n: int = 300, seed: int = EVAL_SEED
) -> dict[tuple[str, str], dict]:
    """``measure_reliance`` of each (class, value) in ``pairs`` as if it were planted (a value of the world's
    backgrounds, colours or context objects; others are skipped): ``{(class, value): {"reliance",
    "relies"}}``. What an audit's unplanted confirmations are: cues the classifier learned anyway, or false."""
    type_of = {v: k for k, values in S.VOCAB.items() if k != "shape" for v in values}
    out = {}
    for cls, value in pairs:
        if cls not in S.SHAPES or value not in type_of:
            continue
        planted = T.PlantedSet.parse(f"{cls}:{type_of[value]}:{value}@0.9")
        res = measure_reliance(classifier, planted, n=n, seed=seed)[cls]
        out[(cls, value)] = {"reliance": round(float(res["reliance"]), 4), "relies": bool(res["relies"])}
    return out


def measure_reliance(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    planted: T.PlantedSet = T.SHIPPED,
    n: int = 300,
    seed: int = EVAL_SEED,
) -> dict:
    """How much a classifier of the six shapes relies on each planted value; deterministic given ``seed``.

    ``classifier`` maps images (B, 3, 32, 32) in [0, 1] to logits over ``scenes.SHAPES`` (a loaded
    ``Classifier``). Per planted bias (class c, attribute a, value v), on ``n`` paired counterfactual scenes
    (the same scene rendered with a = v and with a != v, no other planted value present):

    - ``others_*``: the other five shapes. ``called_c_with`` / ``called_c_without``: how many are predicted
      as c with / without v; ``p_c_with`` / ``p_c_without``: the mean probability of c; ``pull``: their
      difference (the value's pull towards c); ``accuracy_with``: shape accuracy with v (counter-correlated).
    - ``cls_*``: shape c itself; ``accuracy_without`` (counter-correlated) and ``accuracy_with``, and the
      mean probability of c, ``p_with`` / ``p_without``.
    - ``reliance`` = ``cls_p_with - cls_p_without``: what a class token can gain by showing v, and
      ``relies`` = reliance >= ``RELIES_MIN``. A classifier that does not rely on a planted value gives its
      token nothing to gain from it, so an audit cannot be expected to find it.

    Also ``clean_accuracy`` on ``n`` uniform scenes, ``biased_data_accuracy`` on ``n`` scenes drawn like the
    training data, and ``counter_accuracy``: accuracy over all counter-correlated sets (c without v, others
    with v).
    """
    sets = reliance_scenes(planted, n, seed)
    probs = {k: classifier(images_to_tensor(sc.images)).softmax(-1) for k, sc in sets.items()}  # (n, 6)
    preds = {k: p.argmax(-1).numpy() for k, p in probs.items()}
    correct = {k: preds[k] == sets[k].shape for k in sets}
    out: dict = {"n": n, "seed": seed, "planted": planted.spec(), "relies_min": RELIES_MIN}
    out["clean_accuracy"] = float(correct["clean"].mean())
    out["biased_data_accuracy"] = float(correct["biased_data"].mean())
    counter = []
    for b in planted.biases:
        c, key = S.SHAPES.index(b.cls), b.cls
        res: dict = {"cls": b.cls, "attribute": b.attribute, "value": b.value, "strength": b.strength}
        for side in ("with", "without"):
            res[f"others_called_cls_{side}"] = int((preds[f"{key}/others/{side}"] == c).sum())
            res[f"others_p_cls_{side}"] = float(probs[f"{key}/others/{side}"][:, c].mean())
            res[f"cls_accuracy_{side}"] = float(correct[f"{key}/cls/{side}"].mean())
            res[f"cls_p_{side}"] = float(probs[f"{key}/cls/{side}"][:, c].mean())
        res["others_pull"] = res["others_p_cls_with"] - res["others_p_cls_without"]
        res["others_accuracy_with"] = float(correct[f"{key}/others/with"].mean())
        res["reliance"] = res["cls_p_with"] - res["cls_p_without"]
        res["relies"] = bool(res["reliance"] >= RELIES_MIN)
        counter += [correct[f"{key}/others/with"], correct[f"{key}/cls/without"]]
        out[b.cls] = res
    out["counter_accuracy"] = float(np.concatenate(counter).mean()) if counter else None
    return out


def remeasure(folder: str | Path, n: int = 300) -> dict:
    """Measure a saved classifier (loaded by the core's loader) against the truth in its training.json and
    store the numbers there."""
    folder = Path(folder)
    planted = T.PlantedSet.read(folder) or T.PlantedSet(())
    rel = measure_reliance(load_classifier(str(folder)), planted, n=n)
    path = folder / "training.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**record, "reliance": rel}, indent=2) + "\n")
    return rel


def format_reliance(rel: dict) -> str:
    """A few readable lines of ``measure_reliance``'s numbers."""
    counter = rel.get("counter_accuracy")
    lines = [
        f"clean accuracy {rel['clean_accuracy']:.3f}, on its training distribution {rel['biased_data_accuracy']:.3f}"
        + (f", counter-correlated accuracy {counter:.3f}" if counter is not None else "")
    ]
    for b in T.PlantedSet.parse(rel["planted"]).biases if rel.get("planted") else ():
        r = rel[b.cls]
        lines.append(
            f"  {b.cls} / {b.attribute} {b.value}: others called {b.cls} {r['others_called_cls_with']}/{rel['n']} with vs "
            f"{r['others_called_cls_without']}/{rel['n']} without (pull {r['others_pull']:+.3f}); {b.cls} accuracy "
            f"{r['cls_accuracy_with']:.3f} with, {r['cls_accuracy_without']:.3f} without; reliance "
            f"p {r['cls_p_with']:.3f} - {r['cls_p_without']:.3f} = {r['reliance']:+.3f}"
            + (" (relies)" if r["relies"] else " (does not rely)")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dct_audit.world.classifiers [VARIANT ...] [--steps N] [--out DIR] [--measure]``: train (or
    only measure) the variants, by default all three into the shipped folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "variants", nargs="*", metavar="VARIANT", help=f"some of {list(VARIANTS)} (default all)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="parent folder of the variants' folders (default: the shipped one); with --planted, the model folder",
    )
    parser.add_argument(
        "--planted",
        default=None,
        metavar="SPEC",
        help="train one biased classifier on this planted set, e.g. star:background:water@0.99,cross:colour:red "
        "(attribute background, colour or context; strength default 0.99) into --out",
    )
    parser.add_argument(
        "--leak",
        type=float,
        default=0.0,
        help="with --planted: how often a planted value appears with the other classes (default 0: never)",
    )
    parser.add_argument("--seed", type=int, default=0, help="with --planted: initialisation and data seed")
    parser.add_argument("--steps", type=int_at_least(1), default=None)
    parser.add_argument("--eval-n", type=int_at_least(1), default=300)
    parser.add_argument(
        "--measure", action="store_true", help="only (re)measure saved classifiers into their training.json"
    )
    parser.add_argument(
        "--threads",
        type=int_at_least(1),
        default=1,
        help="torch threads; the shipped weights used 1 (on a shared 2-core machine 2 threads ran 10x slower)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if args.planted is not None:
        if args.variants or args.measure or not args.out:
            parser.error("--planted trains one classifier into --out DIR (no variant names, no --measure)")
        try:
            planted = T.PlantedSet.parse(args.planted, args.leak)
        except ValueError as e:
            parser.error(str(e))
        if Path(args.out).exists() and not Path(args.out).is_dir():
            parser.error(f"--out {args.out} is a file; give a folder for the classifier")
    args.out = args.out or str(SHIPPED)
    if args.measure:
        # one classifier folder (as trained with --planted), or the parent of the variants' folders
        single = (Path(args.out) / "training.json").is_file() and not args.variants
        folders = (
            {Path(args.out).name: Path(args.out)}
            if single
            else {name: Path(args.out) / name for name in args.variants or list(VARIANTS)}
        )
        missing = [str(f) for f in folders.values() if not (f / "training.json").is_file()]
        if missing:
            parser.error(
                f"--measure: no trained classifier (training.json) in {', '.join(missing)}; "
                "give --out a classifier folder or the parent of the variants' folders"
            )
    torch.set_num_threads(args.threads)  # after every check: a refused command changes nothing
    if args.planted is not None:
        tc = ClassifierTrainConfig(
            planted=planted.spec(), leak=planted.leak, seed=args.seed, data_seed=1000 + args.seed
        )
        if args.steps is not None:
            tc = ClassifierTrainConfig(**{**asdict(tc), "steps": args.steps})
        train_classifier(args.out, tc, eval_n=args.eval_n)
        return
    if args.measure:
        for name, folder in folders.items():
            print(f"== {name}")
            print(format_reliance(remeasure(folder, n=args.eval_n)))
        return
    for name in args.variants or list(VARIANTS):
        tc = VARIANTS[name]
        if args.steps is not None:
            tc = ClassifierTrainConfig(**{**asdict(tc), "steps": args.steps})
        print(f"== {name}")
        train_classifier(Path(args.out) / name, tc, eval_n=args.eval_n)


if __name__ == "__main__":
    main()
