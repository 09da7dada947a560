"""The counterfactual check: does the classifier's confidence depend on an attribute itself?

For each class, the plain class prompt is drawn with the attribute ("a star on water") and with each of its
replacements ("... on grass", "... on snow"), on the same seeds, and the classifier's target probability is
compared pair by pair (``counterfactual_effect``). A dependence must hold against every replacement that
removed the attribute, with the interval of the smallest change at or above ``CONFIRM_MIN_CHANGE``
(``confirmed``); a dependence whose interval still reaches below it is left *open* (``is_open``), anything
else is ruled out. What the check would confirm is then drawn with other classes (``association.py``): a
dependence that does not pull their images toward the class is this class's images only (``class_specific``),
not confirmed. Optionally the change is adjusted for what else the generator drew (``class_response``,
``--adjust``) and the attributes a few seeds leave open are decided on more (``check_class``,
``--confirm-max-seeds``). Scores are cached by prompt and seed in the run folder (``counterfactual_sweep``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import rundir
from .stats import mean_diff_ci, seed_stages

if TYPE_CHECKING:
    from .pipeline import Models, RunOptions
    from .resolve import ResolvedClass
    from .tag import Vocabulary

# A finding is *confirmed* when the counterfactual shows the classifier's confidence depends on the attribute
# by a change that matters: the interval of the smallest change (over every replacement) lies at or above
# this much target probability. Smaller changes are real but do not move decisions (measured: an unbiased
# classifier, 0.96 -> 1.00 on plain backgrounds), and requiring the interval, not the point estimate, to clear
# it keeps the many attributes checked per class from confirming noise (README "Truth benchmark").
CONFIRM_MIN_CHANGE = 0.10
# A replacement is *confounded* when its images show an attribute of another group in at least this much larger
# a share than the images with the attribute (measured on the world: "square in a frame", "on a plate" and
# "alone" were drawn on water in 50-88% of images, "next to a person" never; water was another class's
# planted background, so the classifier's drop looked like a dependence on the person). A confounded
# replacement can refute a dependence but not support it: confirmation needs one unconfounded replacement.
CONFOUND_MIN_SHIFT = 0.5

# A replacement counts only where it removed the attribute: at most this share of its images still shows it
# (a learned token can outweigh the prompt, e.g. a token that learned "red" keeps an "orange" prompt red).
REPLACED_MAX_RATE = 0.5


def confounders(
    with_rates: dict | None,
    replacement_rates: dict | None,
    others: list[str],
    min_shift: float = CONFOUND_MIN_SHIFT,
) -> dict[str, float]:
    """Attributes among ``others`` (those of the other groups) that a replacement's images show in a share
    at least ``min_shift`` larger than the images with the attribute: ``{name: shift}``. Untagged: none."""
    if not with_rates or not replacement_rates:
        return {}
    out = {}
    for name in others:
        shift = float(replacement_rates.get(name) or 0.0) - float(with_rates.get(name) or 0.0)
        if shift >= min_shift:
            out[name] = round(shift, 4)
    return out


def counterfactual_effect(with_probs, replacements: dict[str, dict], with_rate: float | None = None) -> dict:
    """Change of the target probability when the attribute is shown vs replaced, per replacement (paired by
    seed), and its worst case.

    ``replacements`` maps a replacement's name to ``{"prompt": ..., "probs": [...], "attribute_rate": r}``
    (same seeds as ``with_probs``; ``attribute_rate``, when the images were tagged, is the share of the
    replacement's images that still show the attribute). A replacement is *effective* when it removed the
    attribute (rate at most ``REPLACED_MAX_RATE``, or untagged). The classifier *depends* on the attribute
    when the images with it show it (``with_rate``, when tagged, at least 0.5) and every effective
    replacement lowers the target probability (interval above 0): a change that holds against one
    replacement only may come from that replacement (for example grass, when grass is what the classifier
    learned for another class), and at least one of them is not confounded (``confounders``: attributes of
    other groups the replacement brought in, see ``CONFOUND_MIN_SHIFT``). ``diff``, ``ci_low`` and
    ``ci_high`` are those of the effective replacement with the smallest change.
    """
    rows = []
    for name, r in replacements.items():
        adjust = r.get("adjust")  # per seed: what other attributes explain (``class_response``)
        probs = np.asarray(r["probs"], dtype=float) + (0.0 if adjust is None else np.asarray(adjust))
        diff, low, high = mean_diff_ci(with_probs, probs)
        rate = r.get("attribute_rate")
        rows.append(
            {
                "name": name,
                "prompt": r.get("prompt"),
                "prob": float(np.mean(r["probs"])),
                "diff": diff,
                "ci_low": low,
                "ci_high": high,
                "depends": bool(low > 0) if np.isfinite(low) else False,
                "attribute_rate": rate,
                "effective": rate is None or rate <= REPLACED_MAX_RATE,
                "confounders": dict(r.get("confounders") or {}),
                "explained": None if adjust is None else float(np.mean(adjust)),
            }
        )
    effective = [r for r in rows if r["effective"]]
    clean = [r for r in effective if not r["confounders"]]
    worst = min(effective or rows, key=lambda r: r["diff"])
    shown = with_rate is None or with_rate >= 0.5
    return {
        "with_prob": float(np.mean(with_probs)),
        "without_prob": float(np.mean([r["prob"] for r in rows])),
        "diff": worst["diff"],
        "ci_low": worst["ci_low"],
        "ci_high": worst["ci_high"],
        "worst_replacement": worst["name"],
        "n": int(len(with_probs)),
        "depends": bool(clean) and shown and all(r["depends"] for r in effective),
        "with_attribute_rate": with_rate,
        "effective_replacements": len(effective),
        "unconfounded_replacements": len(clean),
        "replacements": rows,
    }


def confirmed(
    counterfactual: dict | None, absence: bool = False, min_change: float = CONFIRM_MIN_CHANGE
) -> bool:
    """Whether a counterfactual check confirms a finding as a bias (see ``CONFIRM_MIN_CHANGE``), and, where
    the association stage ran (``check_associations``), the attribute also pulls other classes' images
    toward the class.

    An absence attribute ("plain background", "alone") is never confirmed as a bias: a token that brings it
    in is removing other contexts, which the report says as such.
    """
    if not counterfactual or absence:
        return False
    association = counterfactual.get("association")
    if association is not None and not association.get("associated"):
        return False
    low = counterfactual.get("ci_low")
    return bool(counterfactual.get("depends")) and low is not None and float(low) >= min_change


def class_specific(counterfactual: dict | None) -> bool:
    """Whether the check found a dependence on the attribute that matters for this class's own images, but
    the attribute does not pull other classes' images toward the class (``check_associations``): a
    dependence on how the generator draws this class with it, not an association learned from data."""
    association = (counterfactual or {}).get("association")
    return association is not None and not association.get("associated")


def is_open(counterfactual: dict | None, absence: bool = False) -> bool:
    """Whether a check leaves a finding *open*: not confirmed, yet every effective replacement lowers the
    classifier's confidence (``depends``) and the smallest change's interval reaches ``CONFIRM_MIN_CHANGE``
    (``undecided``), so the seeds checked can neither confirm nor rule out a dependence that matters.

    Measured on the truth benchmark's runs (``benchmarks/bench_open.py``): the thorough check leaves about 0.27
    attributes per class open on biased classifiers (0.11 on unbiased ones), a fifth of them planted biases,
    mostly weak ones; a relied-on bias it neither confirms nor leaves open was planted 3 times in 106.
    """
    if not counterfactual or absence or confirmed(counterfactual) or class_specific(counterfactual):
        return False
    return bool(counterfactual.get("depends")) and undecided(counterfactual)


def attribute_prompts(attributes, vocabulary: Vocabulary) -> dict[str, str]:
    """Template -> name of every prompt the check of ``attributes`` scores: each one's own and its
    replacements'."""
    prompts: dict[str, str] = {}
    for a in attributes:
        prompts.setdefault(a.with_context, a.name)
        for name, template in vocabulary.replacements(a):
            prompts.setdefault(template, name)
    return prompts


def undecided(cf: dict) -> bool:
    """Whether a check on few seeds leaves an attribute open: it confirms it, or its smallest change's interval
    reaches ``CONFIRM_MIN_CHANGE`` (only an interval wholly below the bar rules the attribute out)."""
    high = cf.get("ci_high")
    return confirmed(cf) or (
        high is not None and bool(np.isfinite(high)) and float(high) >= CONFIRM_MIN_CHANGE
    )


def check_class(
    checked,
    vocabulary: Vocabulary,
    class_name: str,
    sweep_on: Callable[[dict[str, str], list[int]], dict],
    seeds: list[int],
    more_seeds: list[int] | None = None,
    adjust: bool = False,
) -> dict[str, dict]:
    """The counterfactual check of every attribute in ``checked`` for one class: ``{name: attribute_effect}``.

    ``sweep_on(prompts, seeds)`` scores prompts (``counterfactual_sweep``). With ``adjust``, changes are
    adjusted by ``class_response`` fitted on every image scored. With ``more_seeds`` (``--confirm-max-seeds``;
    they start with ``seeds``), the attributes the first ``seeds`` leave open (``undecided``) are checked again
    on four times as many, those still open on four times as many again, up to all of ``more_seeds``
    (``seed_stages``): only their prompts get the new seeds. Measured on the truth benchmark's runs (README
    "Truth benchmark"): 8 then 32 seeds decides like 32 seeds everywhere, on about 70% of the prompts.
    """
    sweep = sweep_on(attribute_prompts(checked, vocabulary), seeds)
    response = class_response(sweep, vocabulary.names) if adjust else None
    cfs = {a.name: attribute_effect(a, vocabulary, sweep, class_name, response) for a in checked}
    open_ = list(checked)
    for n in seed_stages(len(seeds), len(more_seeds or ()))[1:]:
        open_ = [a for a in open_ if undecided(cfs[a.name])]
        if not open_:
            break
        sweep = {**sweep, **sweep_on(attribute_prompts(open_, vocabulary), list(more_seeds[:n]))}
        response = class_response(sweep, vocabulary.names) if adjust else None
        for a in open_:
            cfs[a.name] = attribute_effect(a, vocabulary, sweep, class_name, response)
    return cfs


def class_response(sweep: dict, names: list[str], ridge: float = 1.0) -> dict[str, float] | None:
    """How the classifier's target probability moves with each attribute, over every image of a class's
    check: the coefficients of a least-squares fit (ridge ``ridge``) of the probability on the presence
    (0/1, as tagged) of every attribute. None when the images were not tagged, or too few to fit.

    The check's prompt for one attribute also changes what else the generator draws: "a star on a plate"
    put the star on water in 19 of 32 images, "a star alone" in 7, and a classifier that needs water for
    stars then scores the plated star higher (0.59 vs 0.23) although it does not use the plate at all (0.99
    on water, 0.00-0.04 elsewhere, with or without it). The fit over all prompts of the class (about 600
    images) says how much each attribute moves the probability wherever it appears.
    """
    rows, y = [], []
    index = {n: i for i, n in enumerate(names)}
    for entry in sweep.values():
        shown = entry.get("shown")
        if shown is None or len(shown) != len(entry["probs"]):
            continue
        for present, p in zip(shown, entry["probs"], strict=True):
            row = np.zeros(len(names))
            row[[index[n] for n in present if n in index]] = 1.0
            rows.append(row)
            y.append(float(p))
    if len(y) < 2 * len(names):
        return None
    x, y = np.asarray(rows), np.asarray(y)
    xc, yc = x - x.mean(0), y - y.mean()
    beta = np.linalg.solve(xc.T @ xc + ridge * np.eye(len(names)), xc.T @ yc)
    return {n: float(b) for n, b in zip(names, beta, strict=True)}


def adjustment(with_shown, other_shown, response: dict[str, float], others: list[str]) -> list[float] | None:
    """Per seed, the probability change that attributes among ``others`` explain between the image with the
    attribute and the replacement's image: sum of ``response[b]`` x (shown with - shown in replacement)."""
    if with_shown is None or other_shown is None or len(with_shown) != len(other_shown):
        return None
    out = []
    for a, b in zip(with_shown, other_shown, strict=True):
        a, b = set(a), set(b)
        out.append(sum(response.get(n, 0.0) * ((n in a) - (n in b)) for n in others))
    return out


def attribute_effect(
    attribute, vocabulary: Vocabulary, sweep: dict, class_name: str, response: dict[str, float] | None = None
) -> dict:
    """The counterfactual check of one attribute from the class's scored prompts. With ``response``
    (``class_response``), each replacement's change is adjusted by what the other groups' attributes its
    images and the images with the attribute show explain (``adjustment``)."""
    column = attribute.name

    def rate(entry):
        r = (entry.get("rates") or {}).get(column)
        return None if r is None else float(r)

    with_entry = sweep[attribute.with_context]
    others = [a.name for a in vocabulary.attributes if a.group != attribute.group and not a.absence]
    other_groups = [a.name for a in vocabulary.attributes if a.group != attribute.group]
    replacements = {
        name: {
            "prompt": template.format(class_name),
            "probs": sweep[template]["probs"],
            "attribute_rate": rate(sweep[template]),
            "confounders": confounders(with_entry.get("rates"), sweep[template].get("rates"), others),
            "adjust": None
            if response is None
            else adjustment(with_entry.get("shown"), sweep[template].get("shown"), response, other_groups),
        }
        for name, template in vocabulary.replacements(attribute)
    }
    out = counterfactual_effect(with_entry["probs"], replacements, with_rate=rate(with_entry))
    worst = next(r for r in out["replacements"] if r["name"] == out["worst_replacement"])
    out.update(with_prompt=attribute.with_context.format(class_name), without_prompt=worst["prompt"])
    return out


def counterfactual_sweep(
    ensure_models: Callable[[], Models],
    cache: Path,
    cls: ResolvedClass,
    prompts: dict[str, str],
    seeds: list[int],
    opts: RunOptions,
    batch: int,
) -> dict[str, dict]:
    """Score the plain class prompt in every template of ``prompts`` (template -> name) on ``seeds``.

    Returns ``{template: {"name", "prompt", "seeds", "probs": [per seed], "rates": {attribute: share of
    images tagged with it}, "shown": [per seed, the attributes its image shows]}}`` ("rates" empty and
    "shown" absent without a tagger). The cache (``cache``) keeps every scored image by prompt and seed: a
    resumed or extended check (``--confirm-max-seeds``) generates only the (prompt, seed) pairs it lacks.
    The class's token is not in these prompts: the check asks whether the classifier depends on the
    attribute itself, whatever the token learned.
    """
    # imported here: they need torch, and the report reads this module's verdicts without it
    from .generate import Job, generate, nograd_batch
    from .score import score_images

    old = rundir.read_json(cache) if cache.is_file() else None
    entries: dict[str, dict] = {}
    if isinstance(old, dict) and isinstance(old.get("prompts"), dict):
        for t, e in old["prompts"].items():
            e_seeds = e.get("seeds", old.get("seeds"))  # an older cache names its seeds once, at the top
            if isinstance(e, dict) and isinstance(e_seeds, list) and len(e_seeds) == len(e.get("probs", ())):
                entries[t] = {**e, "seeds": e_seeds}

    def usable(e: dict) -> bool:
        # a tagged entry of an older version lacks the per-image tags: it serves only for its own seeds, and
        # not under --adjust, which fits on them (the same seeds give the same images and probabilities)
        if not e.get("rates") or "shown" in e:
            return True
        return e["seeds"] == list(seeds) and not getattr(opts, "adjust", False)

    todo: dict[str, list[int]] = {}
    for t in prompts:
        have = set(entries[t]["seeds"]) if t in entries and usable(entries[t]) else set()
        if t in entries and not have:
            del entries[t]
        if missing := [s for s in seeds if s not in have]:
            todo[t] = missing
    if todo:
        models = ensure_models()
        bank = models.bank
        jobs = [Job(t, 0, t, s, t.format(cls.name)) for t, missing in todo.items() for s in missing]
        made: dict[str, dict[int, tuple]] = {t: {} for t in todo}  # template -> seed -> (prob, shown)
        thresholds = bank.thresholds(bank.vocabulary.presence_thresholds()) if bank is not None else None
        for chunk, images in generate(
            models.generator, jobs, nograd_batch(opts, batch), opts.steps, opts.guidance
        ):
            shown = (
                bank.scores(bank.tagger.image_features(images)) >= thresholds if bank is not None else None
            )
            for k, (job, score) in enumerate(
                zip(chunk, score_images(models.classifier, images, cls.index), strict=True)
            ):
                present = None
                if shown is not None:
                    present = [n for n, v in zip(bank.vocabulary.names, shown[k], strict=True) if v]
                made[job.variant][job.seed] = (score["target_prob"], present)
        for t, new in made.items():
            e = entries.get(t) or {"seeds": [], "probs": []}
            shown = e.get("shown") or [None] * len(e["seeds"])
            per_seed = dict(zip(e["seeds"], zip(e["probs"], shown, strict=True), strict=True))
            per_seed.update(new)
            order = sorted(per_seed)
            entry = {
                "name": prompts[t],
                "prompt": t.format(cls.name),
                "seeds": order,
                "probs": [per_seed[s][0] for s in order],
                "rates": {},
            }
            if bank is not None:
                # per image (in seed order), the attributes it shows: what ``class_response`` fits on
                entry["shown"] = [per_seed[s][1] for s in order]
                entry["rates"] = _rates(entry["shown"], bank.vocabulary.names)
            entries[t] = entry
        rundir.write_json(cache, {"class": cls.name, "prompts": entries})
    return {t: on_seeds(entries[t], seeds) for t in prompts}


def on_seeds(entry: dict, seeds: list[int]) -> dict:
    """A cached prompt's entry restricted to ``seeds`` (in that order), its tag rates recomputed from them."""
    if entry["seeds"] == list(seeds):
        out = dict(entry)
    else:
        at = {s: i for i, s in enumerate(entry["seeds"])}
        pick = [at[s] for s in seeds]
        out = {**entry, "seeds": list(seeds), "probs": [entry["probs"][i] for i in pick]}
        if entry.get("shown") is not None:
            out["shown"] = [entry["shown"][i] for i in pick]
        if entry.get("rates"):
            out["rates"] = _rates(out["shown"], list(entry["rates"]))
    return out


def _rates(shown: list[list[str]], names: list[str]) -> dict[str, float]:
    """Share of the images that show each attribute."""
    return {n: float(np.mean([n in row for row in shown])) for n in names}
