"""``dct-audit demo``: the whole audit, offline, on the planted-bias world shipped in the package.

The unchanged pipeline runs with the world's models: its text-to-image pipeline (a diffusers
``StableDiffusionPipeline`` folder), the biased timm classifier, and the world CLIP as tagger. The
world's ground truth (``dct_audit.world.truth``) says which findings a correct audit must report.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import DctAuditError

WORLD = Path(__file__).parent / "world"
WEIGHTS = WORLD / "weights"
NEEDED = {
    "generator": WEIGHTS / "generator" / "model_index.json",
    "biased classifier": WEIGHTS / "classifiers" / "biased" / "config.json",
    "unbiased classifier": WEIGHTS / "classifiers" / "unbiased" / "config.json",
    "tagger": WEIGHTS / "clip" / "config.json",
}

# Settings for a laptop CPU: the world's images are 32 px and its models small, so the inversion can afford
# the exact gradient through all 10 denoising steps (grad_steps = steps). With the paper's last-step-only
# gradient the world's tokens did not find the planted backgrounds (measured: README, "The planted-bias
# world"). The generator follows prompts at 10 steps nearly as well as at 20 (fidelity 0.95 vs 0.99).
# Each update draws 8 fresh seeds (with 8 fixed ones the cross token sat on a plateau for 40 updates; with
# fresh ones it found grass). A token is accepted when all 8 images of an update are classified as the
# class (tokens stopped at 7 of 8 drew their context far less often); one stuck for 8 updates stops early.
DEMO_SETTINGS = dict(
    templates=("a photo of a {}", "a {}", "a picture of a {}"),
    contexts=("a photo of a {}", "a picture of a {}"),
    n_images=16,
    steps=10,
    grad_steps=10,
    max_updates=25,
    stop_accuracy=1.0,
    patience=8,
    fresh_seeds=True,
    lr=0.01,
    batch=8,
    explain_images=2,
)


def world_models() -> dict[str, str]:
    """Paths of the shipped world models; a one-line error naming the fix when any is missing."""
    missing = [name for name, path in NEEDED.items() if not path.is_file()]
    if missing:
        raise DctAuditError(
            f"the planted-bias world's {', '.join(missing)} weights are not installed in {WEIGHTS}; "
            "retrain them with `python -m dct_audit.world.train` or reinstall dct-audit"
        )
    return {
        "generator": str(WEIGHTS / "generator"),
        "biased": str(WEIGHTS / "classifiers" / "biased"),
        "unbiased": str(WEIGHTS / "classifiers" / "unbiased"),
        "unbiased_seed1": str(WEIGHTS / "classifiers" / "unbiased_seed1"),
        "attributes": str(WORLD / "attributes.json"),
    }


def demo_run(classifier: str, name: str, out: str = "reports", quiet: bool = False, **overrides):
    """One audit of every world class with a world classifier (a key of ``world_models()`` or a folder)."""
    from .pipeline import run
    from .world.scenes import SHAPES

    models = world_models()
    settings = {**DEMO_SETTINGS, **overrides}
    return run(
        models.get(classifier, classifier),
        ",".join(SHAPES),
        name=name,
        generator=models["generator"],
        tagger="world",
        attributes=models["attributes"],
        out=out,
        device="cpu",
        quiet=quiet,
        **settings,
    )


def demo(out: str = "reports", compare_unbiased: bool = True, quiet: bool = False, **overrides):
    """Audit every world class with the biased classifier (and the unbiased one, then compare them)."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    biased = demo_run("biased", "demo-biased", out, quiet, **overrides)
    seconds["biased run"] = time.perf_counter() - t0
    result = {"biased": biased, "seconds": seconds}
    if compare_unbiased:
        from .compare import compare

        t1 = time.perf_counter()
        unbiased = demo_run("unbiased", "demo-unbiased", out, quiet, **overrides)
        seconds["unbiased run"] = time.perf_counter() - t1
        result["unbiased"] = unbiased
        t2 = time.perf_counter()
        result["compare"] = compare(biased.run_dir, unbiased.run_dir, Path(out) / "demo-compare")
        seconds["compare"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    return result
