"""The association stage of the counterfactual check: does the attribute pull *other* classes' images toward
the class?

A bias learned from data ("lobsters are photographed on plates") makes the attribute evidence for the class
wherever it appears: the classifier's probability of the class rises when a plate is drawn under a crab too.
The check (``check.py``) draws the class itself with the attribute and with each replacement, and a
dependence that holds there can also come from how the generator draws this class with it. Measured on the
truth benchmark's runs (README "Truth benchmark"): a triangle classifier that needs a frame scored generated
"triangle on a brick wall" images 0.39 against 0.00-0.11 on the other backgrounds, while on rendered scenes the
brick wall moves it by 0.05. So a finding the check would confirm is drawn once more with up to ``SUBJECTS``
other classes of the classifier as subjects ("a circle on a brick wall", "a star on grass", ...), with the
attribute and with each replacement that removed it, on the check's first seeds, and is confirmed only when
the class's probability is higher with the attribute against every one of those replacements (paired by
subject and seed, the interval above 0): ``association`` in the counterfactual, ``check.confirmed``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import rundir
from .stats import mean_diff_ci

if TYPE_CHECKING:
    from .pipeline import Models, RunOptions
    from .resolve import ResolvedClass
    from .tag import Vocabulary

# How many other classes are drawn as subjects: the run's other classes first (in run order, starting after the
# class), then classes of the classifier's label list drawn at random (fixed by the class index).
SUBJECTS = 5


def subjects_for(
    cls: ResolvedClass,
    targets: list[ResolvedClass],
    labels: Callable[[], list[str]],
    cache: Path | None = None,
) -> list[str]:
    """The other classes drawn as subjects of ``cls``'s association check (``SUBJECTS`` of them, fewer only
    when the classifier has fewer other classes). ``labels()`` gives the classifier's class names; it is called
    only when the run has fewer than ``SUBJECTS`` other classes and ``cache`` (``association_sweep``'s) does
    not record the subjects drawn before."""
    recorded = _read_cache(cache)["subjects"].get(str(cls.index))
    if isinstance(recorded, list) and recorded:
        return [str(s) for s in recorded]
    # a subject must be another class by name too: ImageNet has two "crane"s (bird, machine), and "a crane on
    # a plate" drawn as a subject would be this class's own prompt
    seen = {_key(cls.name)}
    pos = next(i for i, t in enumerate(targets) if t.index == cls.index)
    names = []
    for t in targets[pos + 1 :] + targets[:pos]:
        if len(names) < SUBJECTS and _key(t.name) not in seen:
            seen.add(_key(t.name))
            names.append(t.name)
    if len(names) < SUBJECTS:
        all_names = labels()
        taken = {t.index for t in targets}
        pool = [i for i in range(len(all_names)) if i not in taken]
        rng = np.random.default_rng(cls.index)
        for i in rng.permutation(pool):
            if len(names) == SUBJECTS:
                break
            if _key(all_names[int(i)]) not in seen:
                seen.add(_key(all_names[int(i)]))
                names.append(all_names[int(i)])
    return names


def _key(name: str) -> str:
    return " ".join(str(name).lower().split())


def _read_cache(cache: Path | None) -> dict:
    """The association cache's ``subjects`` and ``prompts``, empty where there is none or where it cannot be
    read (what is missing is drawn again)."""
    old = None
    if cache is not None and cache.is_file():
        try:
            old = rundir.read_json(cache)
        except (OSError, ValueError):
            old = None
    old = old if isinstance(old, dict) else {}
    return {k: old[k] if isinstance(old.get(k), dict) else {} for k in ("subjects", "prompts")}


def _effective(counterfactual: dict) -> set[str]:
    """The replacements that removed the attribute in the check (``check.counterfactual_effect``)."""
    return {r["name"] for r in counterfactual.get("replacements") or () if r.get("effective", True)}


def association_prompts(
    attribute, counterfactual: dict, vocabulary: Vocabulary, subjects: list[str]
) -> list[str]:
    """Every prompt an attribute's association check scores: its own and each effective replacement's (those
    that removed it in the check), with each subject."""
    effective = _effective(counterfactual)
    templates = [attribute.with_context] + [
        t for n, t in vocabulary.replacements(attribute) if n in effective
    ]
    return [t.format(s) for t in templates for s in subjects]


def association_sweep(
    ensure_models: Callable[[], Models],
    cache: Path,
    texts: list[str],
    seeds: list[int],
    indices: list[int],
    opts: RunOptions,
    batch: int,
    subjects: dict[int, list[str]] | None = None,
) -> dict[str, dict[int, list[float]]]:
    """The classifier's probability of each class in ``indices`` on every prompt of ``texts`` (no class
    placeholder: subjects are already in them) at ``seeds``: ``{text: {class index: [per seed]}}``.

    Cached at the run level (``cache``, ``rundir.ASSOCIATION``): one image serves every class it is scored for
    (the shipped demo's three background biases share theirs), and a resumed run generates only prompts that
    lack a seed or a class. ``subjects`` (class index -> its subjects) are recorded in it for ``subjects_for``.
    """
    from .generate import Job, generate, nograd_batch

    old = _read_cache(cache)
    entries = dict(old["prompts"])
    keys = [str(i) for i in indices]

    def usable(e) -> bool:  # every seed and every class asked for, each list as long as the seeds
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("seeds"), list)
            or not isinstance(e.get("probs"), dict)
        ):
            return False
        n = len(e["seeds"])
        return set(seeds) <= set(e["seeds"]) and all(
            isinstance(e["probs"].get(k), list) and len(e["probs"][k]) == n for k in keys
        )

    todo = [t for t in dict.fromkeys(texts) if not usable(entries.get(t))]
    recorded = dict(old["subjects"])
    new_subjects = {str(i): list(v) for i, v in (subjects or {}).items() if recorded.get(str(i)) != list(v)}
    if todo:
        models = ensure_models()
        jobs = [Job(t, 0, t, s, t) for t in todo for s in seeds]
        made: dict[str, dict[int, list[float]]] = {t: {} for t in todo}
        for chunk, images in generate(
            models.generator, jobs, nograd_batch(opts, batch), opts.steps, opts.guidance
        ):
            with torch.no_grad():
                probs = models.classifier(images.to(models.classifier.device)).float().softmax(-1)
            for job, p in zip(chunk, probs, strict=True):
                made[job.variant][job.seed] = [float(p[i]) for i in indices]
        for t, by_seed in made.items():
            order = sorted(by_seed)
            entries[t] = {
                "seeds": order,
                "probs": {k: [by_seed[s][j] for s in order] for j, k in enumerate(keys)},
            }
    if todo or new_subjects:
        rundir.write_json(cache, {"subjects": {**recorded, **new_subjects}, "prompts": entries})
    out = {}
    for t in texts:
        e = entries[t]
        at = {s: i for i, s in enumerate(e["seeds"])}
        out[t] = {i: [e["probs"][str(i)][at[s]] for s in seeds] for i in indices}
    return out


def association_effect(
    attribute, counterfactual: dict, vocabulary: Vocabulary, subjects: list[str], sweep: dict, index: int
) -> dict:
    """The association check of one attribute of class ``index`` from ``association_sweep``'s scores: per
    effective replacement, the class's probability with the attribute minus with the replacement, paired by
    subject and seed (``mean_diff_ci``); ``associated`` when every one's interval lies above 0; ``diff``,
    ``ci_low``, ``ci_high`` those of the replacement with the smallest change."""

    def probs(template):
        return np.concatenate([sweep[template.format(s)][index] for s in subjects])

    with_probs = probs(attribute.with_context)
    effective = _effective(counterfactual)
    rows = []
    for name, template in vocabulary.replacements(attribute):
        if name in effective:
            diff, low, high = mean_diff_ci(with_probs, probs(template))
            rows.append(
                {
                    "name": name,
                    "prob": float(np.mean(probs(template))),
                    "diff": diff,
                    "ci_low": low,
                    "ci_high": high,
                }
            )
    worst = min(rows, key=lambda r: r["diff"]) if rows else None
    return {
        "subjects": list(subjects),
        "n": int(len(with_probs)),
        "with_prob": float(np.mean(with_probs)),
        "diff": worst["diff"] if worst else float("nan"),
        "ci_low": worst["ci_low"] if worst else float("nan"),
        "ci_high": worst["ci_high"] if worst else float("nan"),
        "worst_replacement": worst["name"] if worst else None,
        "associated": bool(rows) and all(np.isfinite(r["ci_low"]) and r["ci_low"] > 0 for r in rows),
        "replacements": rows,
    }


def check_associations(
    candidates: dict[int, list],
    cfs: dict[int, dict[str, dict]],
    vocabulary: Vocabulary,
    subjects: dict[int, list[str]],
    sweep_on: Callable[[list[str], list[int]], dict],
) -> None:
    """Add ``association`` (``association_effect``) to the counterfactual of every attribute in
    ``candidates`` (class index -> attributes the check confirms), in ``cfs`` (class index -> {attribute name:
    counterfactual}). ``sweep_on(texts, indices)`` scores prompts for classes (``association_sweep``), once
    for every class: images are shared."""
    # a class with no other class to draw (a one-class classifier) keeps the check's verdict
    candidates = {i: attrs for i, attrs in candidates.items() if subjects.get(i)}
    texts = [
        t
        for i, attrs in candidates.items()
        for a in attrs
        for t in association_prompts(a, cfs[i][a.name], vocabulary, subjects[i])
    ]
    if not texts:
        return
    sweep = sweep_on(texts, sorted(candidates))
    for i, attrs in candidates.items():
        for a in attrs:
            cfs[i][a.name]["association"] = association_effect(
                a, cfs[i][a.name], vocabulary, subjects[i], sweep, i
            )
