"""``dct-audit demo``: the whole audit, offline, on the planted-bias world shipped in the package.

The unchanged pipeline runs with the world's models: its text-to-image pipeline (a diffusers
``StableDiffusionPipeline`` folder), the biased timm classifier, and the world CLIP as tagger. The
world's ground truth (``dct_audit.world.truth``) says which findings a correct audit must report.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import DctAuditError, OtherSettings
from .world.paths import ATTRIBUTES_FILE, CLASSIFIERS, GENERATOR, NEEDED, WEIGHTS

# Settings for a laptop CPU: the world's images are 32 px and its models small, so the inversion can afford
# the exact gradient through all 10 denoising steps (grad_steps = steps). With the paper's last-step-only
# gradient the world's tokens did not find the planted backgrounds (measured: README, "The planted-bias
# world"). The generator follows prompts at 10 steps nearly as well as at 20 (fidelity 0.95 vs 0.99).
# Each update draws 8 fresh seeds (the expected loss over noise). Every decision is made on 16 fixed
# validation seeds, scored every 2 updates: the kept token (lowest validation loss), the stop (all 16
# classified as the class) and patience (no better validation loss for 20 updates: restart from "the", then
# stop). Hard classes sit on a plateau for 15-25 updates before their context appears (measured), so a
# shorter patience gives up just before the jump. The token's norm is kept at most 2x the vocabulary's mean
# norm: without it, three classes that rely on their planted context (0.72-0.99) reached validation accuracy
# 0.0 / 0.56 / 0.62 in 60 updates; with it 1.0 / 1.0 / 1.0 in 37-45. Chosen on random planted worlds
# (benchmarks/bench_truth.py), not on the shipped one: deciding on each update's own fresh batch kept
# lucky-batch tokens and stopped on noise (README, "Truth benchmark"). The tokens learn with the "meanprob"
# objective (minus the log of the mean target probability: the images nearest the class lead), chosen on the
# hard classes of random planted worlds (19/28 learned against 13/28 with the paper's cross-entropy); on four fresh
# seeds' truth benchmark it was no worse and no better (21/35 plants brought in by the token either way, with
# two attempts; README "Hard tokens"). On the shipped world (AVX2 machine) it learned the cross token that
# cross-entropy did not (accuracy 0.38 against 0.00, baseline 0.06), in less time (206 s vs 239 s, one run each):
# that, not the fresh seeds, tipped the demo to it; it changes no confirmed finding (they use the plain prompt).
DEMO_SETTINGS = dict(
    templates=("a photo of a {}", "a {}", "a picture of a {}"),
    contexts=("a photo of a {}", "a picture of a {}"),
    n_images=16,
    steps=6,
    grad_steps=6,
    max_updates=60,
    stop_accuracy=1.0,
    stop_prob=0.9,
    patience=20,
    fresh_seeds=True,
    val_seeds=16,
    eval_every=2,
    restart_words=("the",),
    lr=0.01,
    max_norm=2.0,
    batch=8,
    explain_images=2,
    confirm="all",
    confirm_seeds=8,
    gen_batch=32,  # no-gradient images: 256 world images in 5.6 s at batch 32, 7.8 s at 8 (2-core CPU)
    objective="meanprob",
)

# `dct-audit demo --thorough`: the check adjusted for the other attributes the generator drew
# (check.class_response), on 8 seeds, then on 32 for the attributes the 8 leave open (check.check_class).
# Measured (README "Truth benchmark", benchmarks/bench_confirm_seeds.py): 8-then-32 decides exactly as 32
# seeds everywhere on the runs of seeds 53, 59, 61 and the shipped world (28/31, 0 unplanted) with 72% of the
# prompts on 32 seeds; on twenty-two fresh seeds (53-125) it confirmed 200/218 relied-on planted biases, where the
# default check (8 seeds, unadjusted) confirmed 168/218; with the association stage 1 and 0 unplanted. The default of
# `demo --classifier`, not of the shipped demo: about 3x the check's images (229 s for the demo), which its
# 180 s on a 2-core CPU cannot afford.
# A class whose token ends without reaching the stop is learned a second time (``attempts=2``): with the
# "meanprob" objective, on seeds 123 and 125 the tokens of relied-on planted classes confirmed by the check drew
# their plant for 19/22 instead of 14/22 with one attempt of cross-entropy (attempts alone: 17/22), on the fresh
# seeds 127-133 21/35 as cross-entropy's, with the same confirmed findings and none on the controls (README
# "Hard tokens").
THOROUGH = dict(confirm_seeds=8, confirm_max_seeds=32, adjust=True, attempts=2)


def world_models() -> dict[str, str]:
    """Paths of the shipped world models; a one-line error naming the fix when any is missing."""
    missing = [name for name, path in NEEDED.items() if not path.is_file()]
    if missing:
        raise DctAuditError(
            f"the planted-bias world's {', '.join(missing)} weights are not installed in {WEIGHTS}; "
            "retrain them with `python -m dct_audit.world.train` or reinstall dct-audit"
        )
    return {
        "generator": str(GENERATOR),
        "biased": str(CLASSIFIERS / "biased"),
        "unbiased": str(CLASSIFIERS / "unbiased"),
        "unbiased_seed1": str(CLASSIFIERS / "unbiased_seed1"),
        "attributes": str(ATTRIBUTES_FILE),
    }


def demo_run(
    classifier: str,
    name: str,
    out: str = "reports",
    quiet: bool = False,
    classes: str | None = None,
    **overrides,
):
    """One audit of the world classes (default all) with a world classifier (a key of ``world_models()`` or a
    folder). ``overrides``: run options, the generator and tagger included (names or loaded models)."""
    from .api import run
    from .world.scenes import SHAPES

    models = world_models()
    settings = {"generator": models["generator"], "tagger": "world", **DEMO_SETTINGS, **overrides}
    try:
        return run(
            models.get(classifier, classifier),
            classes or ",".join(SHAPES),
            name=name,
            attributes=models["attributes"],
            out=out,
            device="cpu",
            quiet=quiet,
            **settings,
        )
    except OtherSettings as e:  # the demo names its runs itself: another --out, not --name
        raise DctAuditError(
            f"'{e.root}' holds a demo run made with other settings ({e.changes}), e.g. by an earlier version "
            "or with other --thorough, --attempts or --objective; pass --overwrite to replace it, or another --out"
        ) from None


def score_truth(run, classifier_folder) -> dict | None:
    """Score a finished world audit against the truth recorded in its classifier's ``training.json``;
    writes ``truth.json`` beside ``findings.json``. None when the classifier records no truth. Each
    confirmed finding nobody planted gets the classifier's measured reliance on it (``measure_unplanted``)."""
    import json

    from . import rundir
    from .world.truth import PlantedSet, score_findings

    try:
        planted = PlantedSet.read(classifier_folder)
    except ValueError as e:
        raise DctAuditError(str(e)) from None
    if planted is None:
        return None
    record = json.loads((Path(classifier_folder) / "training.json").read_text())
    reliance = record.get("reliance") if isinstance(record.get("reliance"), dict) else None
    score = score_findings(run.findings, planted, reliance, {})
    unplanted = [(r["class_name"], r["attribute"]) for r in score["confirmed"] if not r["planted"]]
    if unplanted:  # is each a cue the classifier learned all the same, or false? (300 procedural scenes each)
        from .adapters.classifier import load_classifier
        from .world.classifiers import measure_unplanted

        measured = measure_unplanted(load_classifier(str(classifier_folder), None, "cpu"), unplanted)
        score = score_findings(run.findings, planted, reliance, measured)
    score["classifier"] = str(classifier_folder)
    rundir.write_json(Path(run.run_dir) / rundir.TRUTH, score)
    return score


def audit_world_classifier(  # noqa: D417
    folder: str,
    out: str = "reports",
    name: str | None = None,
    quiet: bool = False,
    classes: str | None = None,
    thorough: bool = True,
    **overrides,
) -> dict:
    """``dct-audit demo --classifier FOLDER``: audit a world classifier with the demo's settings and score
    its confirmed findings against the planted set in its ``training.json``.

    ``thorough`` (default): the check of ``THOROUGH``, which the shipped demo leaves out only for its time
    budget. On twenty-two fresh truth-benchmark seeds (53-125) it confirmed 200/218 relied-on planted biases, 234
    of its 235 confirmed findings planted (with the association stage), where the shipped demo's check
    confirmed 168/218 and 172/172; an audit of another classifier has no 180 s target, so it gets the better
    check."""
    from .world.truth import PlantedSet

    path = Path(folder)
    missing = [f for f in ("config.json", "training.json") if not (path / f).is_file()]
    if missing:
        raise DctAuditError(
            f"--classifier {folder} is not a world classifier folder (no {missing[0]}); train one with "
            "`python -m dct_audit.world.classifiers --planted SPEC --out DIR`"
        )
    try:
        PlantedSet.read(path)  # a damaged training.json: say so before the audit, not after it
    except ValueError as e:
        raise DctAuditError(str(e)) from None
    from .rundir import read_json_file
    from .world.scenes import SHAPES

    config = read_json_file(path / "config.json", "retrain the classifier")
    labels = config.get("label_names") if isinstance(config, dict) else None
    if labels != list(SHAPES):
        raise DctAuditError(
            f"--classifier {folder}: its classes {labels} are not the world's ({', '.join(SHAPES)}, in this "
            "order); `demo --classifier` audits world classifiers; audit other models with `dct-audit run`"
        )
    t0 = time.perf_counter()
    settings = {**(THOROUGH if thorough else {}), **overrides}
    run = demo_run(str(path), name or f"demo-{path.resolve().name}", out, quiet, classes, **settings)
    score = score_truth(run, path)
    return {"run": run, "truth": score, "seconds": {"total": time.perf_counter() - t0}}


def demo(out: str = "reports", compare_unbiased: bool = True, quiet: bool = False, **overrides):
    """Audit every world class with the biased classifier (and the unbiased one, then compare them).

    The two runs share one loaded generator and tagger: the second reuses the first's images of token-free
    prompts (the baseline grids and counterfactual prompts, the same for both classifiers; ``SampleMemo``)."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if compare_unbiased and "generator" not in overrides and "tagger" not in overrides:
        from .adapters.generator_load import load_generator
        from .tag import load_tagger

        overrides = {
            **overrides,
            "generator": load_generator(world_models()["generator"], "cpu"),
            "tagger": load_tagger("world", "cpu"),
        }
    biased = demo_run("biased", "demo-biased", out, quiet, **overrides)
    seconds["biased run"] = time.perf_counter() - t0
    result = {"biased": biased, "seconds": seconds, "truth": score_truth(biased, world_models()["biased"])}
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
