"""How faithfully a generator folder draws what its prompts ask for, judged by the independent checker.

``python -m dct_audit.world.diffusion fidelity [FOLDER]`` runs it; the result goes into the folder's
``training.json`` with ``--record``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dct_audit.adapters.generator_load import DEFAULTS_FILE
from dct_audit.world import scenes as S
from dct_audit.world.captions import describe, full_caption
from dct_audit.world.paths import CHECKER as CHECKER_FOLDER
from dct_audit.world.paths import CLIP as CLIP_FOLDER
from dct_audit.world.paths import GENERATOR as SHIPPED

FIDELITY_SEED = 2_000_003  # attribute draws and sampling seeds of the fidelity measurement


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
    from dct_audit.adapters.generator_load import load_generator

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
