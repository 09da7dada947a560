"""``dct-audit demo``: the whole audit, offline, on the planted-bias world shipped in the package.

The unchanged pipeline runs with the world's models: its text-to-image pipeline (a diffusers
``StableDiffusionPipeline`` folder), the biased timm classifier, and the world CLIP as tagger. The
world's ground truth (``dct_audit.world.truth``) says which findings a correct audit must report.
"""

from __future__ import annotations

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

# Settings for a laptop CPU: the world's images are 32 px and its models small.
DEMO_SETTINGS = dict(
    templates=("a photo of a {}", "a {}", "a picture of a {}"),
    contexts=("a photo of a {}", "a picture of a {}"),
    n_images=16,
    max_updates=15,
    stop_accuracy=0.75,
    lr=0.02,
    batch=4,
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
        "attributes": str(WORLD / "attributes.json"),
    }


def demo(out: str = "reports", compare_unbiased: bool = True, quiet: bool = False, **overrides):
    """Audit every world class with the biased classifier (and the unbiased one, then compare them)."""
    from .pipeline import run
    from .world.scenes import SHAPES

    models = world_models()
    settings = {**DEMO_SETTINGS, **overrides}
    common = dict(
        generator=models["generator"],
        tagger="world",
        attributes=models["attributes"],
        out=out,
        device="cpu",
        quiet=quiet,
        **settings,
    )
    biased = run(models["biased"], ",".join(SHAPES), name="demo-biased", **common)
    result = {"biased": biased}
    if compare_unbiased:
        from .compare import compare

        unbiased = run(models["unbiased"], ",".join(SHAPES), name="demo-unbiased", **common)
        result["unbiased"] = unbiased
        result["compare"] = compare(biased.run_dir, unbiased.run_dir, Path(out) / "demo-compare")
    return result
