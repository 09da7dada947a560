"""Open-vocabulary discovery: which concepts of a long list the token's images match better than their twins.

No vocabulary decides what is looked for. The default list is WordNet's 21,844 concepts as timm ships them
(``imagenet_synset_to_lemma.txt`` / ``..._definition.txt``); each becomes a prompt for the run's tagger
("a photo of plate, a dish on which food is served": the definition tells the dish from the dental plate).
``--concepts FILE`` takes a user list: one concept per line, optionally ``concept<TAB>definition``.

Per class, the stored image features (``embeddings.npy``, written by the run; no image is generated again)
give each image's cosine similarity to every concept. Each token image and its baseline twin (same
context, same seed) form a pair; the per-pair difference is the statistic. Selection bias is guarded by
splitting the seeds: concepts are ranked on half of them (mean paired difference), near-synonyms are merged
(a shared WordNet lemma, or text embeddings closer than ``DEDUPE_COS``), the top ``top_k`` per class are
tested on the other half (one-sided paired t-test), and Benjamini-Hochberg runs over every class x tested
concept. A significant concept then gets the counterfactual check of vocabulary attributes: the plain class
prompt with the concept (``--discover-with``, default "{} with {}") against the plain prompt and against the
same prompt with neutral concepts (those the token moved least), on the same seeds; it is *confirmed* when
the classifier's confidence depends on it by the same rule (``check.confirmed``).

Text embeddings of a concept list are computed once per tagger and cached beside the Hugging Face cache
(``$HF_HOME/dct-audit/concepts/<tagger>-<list hash>.npy``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import rundir
from .check import CONFIRM_MIN_CHANGE, confirmed, confounders, counterfactual_effect
from .errors import DctAuditError
from .stats import benjamini_hochberg

PROMPT_TEMPLATE = "a photo of {}"  # a concept without a definition; with one: "a photo of {}, {definition}"
WITH_TEMPLATE = "{} with {}"  # the counterfactual prompt: class, concept
TOP_K = 10  # concepts per class tested on the held-out half
DEDUPE_COS = 0.9  # text embeddings closer than this are one concept
N_CONTROLS = 2  # neutral concepts each discovered concept is compared against (besides the plain prompt)
DISCOVERED_COLUMNS = (
    "class_index",
    "class_name",
    "concept",
    "lemma_id",
    "rank",
    "t_discovery",
    "effect",
    "ci_low",
    "ci_high",
    "wins",
    "n_pairs",
    "p_value",
    "q_value",
    "significant",
    "cf_change",
    "cf_ci_low",
    "worst_replacement",
    "confirmed",
)


@dataclass(frozen=True)
class Concept:
    name: str  # the first lemma: what the report shows
    lemma_id: str  # the WordNet synset id, or "line:N" of a user list
    lemmas: tuple[str, ...]  # every lemma (synonyms share a synset)
    definition: str
    prompt: str  # what the tagger's text tower reads


def _prompt(name: str, definition: str, template: str) -> str:
    text = template.format(name)
    return f"{text}, {definition}" if definition else text


def wordnet_concepts(template: str = PROMPT_TEMPLATE) -> list[Concept]:
    """The 21,844 WordNet concepts timm ships, with their definitions."""
    import timm

    folder = Path(timm.__file__).parent / "data" / "_info"
    lemmas = dict(_tab_lines(folder / "imagenet_synset_to_lemma.txt"))
    definitions = dict(_tab_lines(folder / "imagenet_synset_to_definition.txt"))
    out = []
    for sid, names in lemmas.items():
        words = tuple(w.strip() for w in names.split(",") if w.strip())
        definition = definitions.get(sid, "").strip()
        out.append(Concept(words[0], sid, words, definition, _prompt(words[0], definition, template)))
    return out


def _tab_lines(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition("\t")
        if key.strip():
            rows.append((key.strip(), value))
    return rows


def read_concepts(path: str | os.PathLike, template: str = PROMPT_TEMPLATE) -> list[Concept]:
    """A user list: one concept per line, optionally ``concept<TAB>definition``; '#' starts a comment."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DctAuditError(
            f"--concepts {path}: cannot read it ({getattr(e, 'strerror', None) or e})"
        ) from None
    out, seen = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, definition = line.partition("\t")
        name, definition = name.strip(), definition.strip()
        if not name or "{" in name or "}" in name:
            raise DctAuditError(f"--concepts {path}, line {n}: {line.strip()!r} is not a concept name")
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        out.append(Concept(name, f"line:{n}", (name,), definition, _prompt(name, definition, template)))
    if len(out) < 2:
        raise DctAuditError(f"--concepts {path}: needs at least two concepts, one per line")
    return out


def cache_folder() -> Path:
    """Beside the Hugging Face cache: ``$HF_HOME/dct-audit/concepts``."""
    hf = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf) / "dct-audit" / "concepts"


def concept_features(
    tagger, concepts: list[Concept], batch: int = 256, cache: Path | None = None
) -> np.ndarray:
    """(C, D) unit text embeddings of the concepts' prompts, cached by tagger and list."""
    digest = hashlib.sha256("\n".join(c.prompt for c in concepts).encode()).hexdigest()[:16]
    path = (cache or cache_folder()) / f"{rundir.slugify(tagger.spec, 60)}-{digest}.npy"
    if path.is_file():
        feats = np.load(path)
        if feats.shape[0] == len(concepts):
            return feats.astype(np.float32)
    chunks = [
        tagger.text_features([c.prompt for c in concepts[i : i + batch]])
        for i in range(0, len(concepts), batch)
    ]
    feats = np.concatenate([c.numpy() for c in chunks]).astype(np.float32)
    try:
        rundir.write_npy(path, feats.astype(np.float16))
    except OSError:
        pass  # a read-only cache only costs the time to compute them again
    return feats


def paired_differences(
    scores: pd.DataFrame, embeddings: np.ndarray, feats: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(seeds, D)``: per (context, seed) pair the token image's similarity to each concept minus its
    baseline twin's (P, C), and each pair's seed."""
    sims = embeddings.astype(np.float32) @ feats.T  # (N, C)
    rows = scores.reset_index(drop=True)
    where = {
        variant: {
            (int(c), int(s)): i
            for i, c, s in zip(part.index, part["context_index"], part["seed"], strict=True)
        }
        for variant, part in rows.groupby("variant")
    }
    token, base = where.get("token", {}), where.get("baseline", {})
    keys = sorted(set(token) & set(base))
    if not keys:
        return np.zeros(0, dtype=int), np.zeros((0, feats.shape[0]), dtype=np.float32)
    ti = np.array([token[k] for k in keys])
    bi = np.array([base[k] for k in keys])
    return np.array([s for _, s in keys]), sims[ti] - sims[bi]


def discover_class(
    seeds: np.ndarray, d: np.ndarray, concepts: list[Concept], feats: np.ndarray, top_k: int = TOP_K
) -> tuple[list[dict], list[int]]:
    """Rank on the even-position seeds, merge synonyms, test the top ``top_k`` on the odd-position seeds.

    Returns one row per tested concept (without q) and the indices of ``N_CONTROLS`` neutral concepts
    (the smallest ranking statistic in absolute value)."""
    from scipy import stats

    order = np.unique(seeds)
    rank_seeds, test_seeds = set(order[0::2]), set(order[1::2])
    rank_rows = np.array([s in rank_seeds for s in seeds])
    test_rows = np.array([s in test_seeds for s in seeds])
    if rank_rows.sum() < 2 or test_rows.sum() < 2:
        raise DctAuditError(
            "discovery needs at least 4 seeds per class (2 to rank, 2 to test); use --n-images 4 or more"
        )
    # ranked by the mean paired difference (the effect), not its t statistic: on 33 planted biases of the
    # truth benchmark's random worlds the planted value ranked first 5-14 times by effect (three draws of
    # distractors) and 5-9 by t; centering, principal-component removal, a softmax over the list and decoy
    # words were not better (benchmarks/bench_discover.py, README "Open-vocabulary discovery")
    t_rank = d[rank_rows].mean(0)
    kept: list[int] = []
    seen_lemmas: set[str] = set()
    for c in np.argsort(-t_rank, kind="stable"):
        if t_rank[c] <= 0 or len(kept) >= top_k:
            break
        lemmas = {w.lower() for w in concepts[c].lemmas}
        if lemmas & seen_lemmas or (kept and float((feats[kept] @ feats[c]).max()) >= DEDUPE_COS):
            continue
        kept.append(int(c))
        seen_lemmas |= lemmas
    held = d[test_rows]
    rows = []
    for rank, c in enumerate(kept, 1):
        x = held[:, c].astype(np.float64)
        n = len(x)
        mean, sd = float(x.mean()), float(x.std(ddof=1))
        p = (
            float(stats.ttest_1samp(x, 0.0, alternative="greater").pvalue)
            if sd > 0
            else (0.0 if mean > 0 else 1.0)
        )
        half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if sd > 0 else 0.0
        rows.append(
            {
                "concept": concepts[c].name,
                "lemma_id": concepts[c].lemma_id,
                "index": c,
                "rank": rank,
                "t_discovery": float(t_rank[c]),
                "effect": mean,
                "ci_low": mean - half,
                "ci_high": mean + half,
                "wins": int((x > 0).sum()),
                "n_pairs": n,
                "p_value": p,
            }
        )
    controls = [int(c) for c in np.argsort(np.abs(t_rank), kind="stable")[: 10 * N_CONTROLS]]
    return rows, controls


def discover_run(
    run_dir: str | os.PathLike,
    concepts_file: str | None = None,
    concept_template: str = PROMPT_TEMPLATE,
    top_k: int = TOP_K,
    alpha: float | None = None,
    with_template: str = WITH_TEMPLATE,
    check: bool = True,
    device: str = "auto",
    quiet: bool = False,
    models=None,
) -> pd.DataFrame:
    """Discovery on a finished run (``dct-audit discover RUN_DIR``; ``run --discover`` calls it at the end).

    Writes ``discovered.csv`` at the run root (every tested concept) and adds to ``findings.json``
    (``source: "discovered"``, replacing those of an earlier discovery) the confirmed concepts, or without
    ``check`` the significant ones, unconfirmed. ``check``: run the counterfactual check of significant
    concepts (generates images; without it nothing is confirmed).
    """
    from .check import counterfactual_sweep
    from .generate import eval_seeds
    from .options import check_option
    from .pipeline import Models, RunOptions, load_models
    from .records import manifest_options, require_downloadable
    from .resolve import ResolvedClass
    from .tag import AttributeBank, load_tagger, load_vocabulary

    root = Path(run_dir)
    manifest = rundir.RunDir(root).read_manifest() if root.is_dir() else None
    if manifest is None or not manifest.settings:
        raise DctAuditError(
            f"'{root}' is not a dct-audit run folder (no manifest.json); give the folder of the run"
        )
    # every argument checked, and the concepts read, before any model loads
    if with_template.count("{}") != 2:
        raise DctAuditError(f"--discover-with {with_template!r} needs two {{}}: the class, then the concept")
    if concept_template.count("{}") != 1:
        raise DctAuditError(
            f"--concept-template {concept_template!r} needs one {{}} (where the concept goes)"
        )
    if top_k < 1:
        raise DctAuditError(f"--top-k must be at least 1, not {top_k}")
    check_option("alpha", alpha)  # a bad rate is refused, not replaced
    concepts = (
        read_concepts(concepts_file, concept_template)
        if concepts_file
        else wordnet_concepts(concept_template)
    )
    kwargs = manifest_options(manifest, {"quiet": quiet, "report": False, "device": device})
    if not kwargs.get("tagger"):
        raise DctAuditError(
            f"'{root}' was audited with --tagger none: discovery needs the tagger's image features"
        )
    run = rundir.RunDir(root)
    done = [c for c in manifest.classes if run.is_done(c.index, c.name)]
    if not done:
        raise DctAuditError(f"'{root}' has no finished class to discover on")
    left = [c.name for c in manifest.classes if c not in done]
    if left:  # said, not skipped silently
        print(
            f"discovering on {len(done)} of {len(manifest.classes)} classes; not finished or damaged: "
            f"{', '.join(left)} (`dct-audit verify {root}` says which)",
            file=sys.stderr,
        )
    opts = RunOptions(classes=[str(c.index) for c in done], out=str(root.parent), name=root.name, **kwargs)
    alpha = opts.alpha if alpha is None else alpha
    torch_device = opts.resolved_device()
    given = models or Models()
    require_downloadable(given, opts)  # the check's generator and classifier too: one line before any work
    tagger = given.tagger or load_tagger(opts.tagger, torch_device)
    feats = concept_features(tagger, concepts)

    # 1. Rank and test per class, from the stored image features
    tested, controls = [], {}
    for c in done:
        folder = run.class_dir(c.index, c.name)
        if not (folder / rundir.EMBEDDINGS).is_file():
            raise DctAuditError(f"{folder} has no {rundir.EMBEDDINGS}; run the class again with a tagger")
        scores = pd.read_csv(folder / rundir.SCORES)
        emb = np.load(folder / rundir.EMBEDDINGS)
        if emb.shape[1] != feats.shape[1]:
            raise DctAuditError(f"{folder / rundir.EMBEDDINGS} was made by another tagger than {opts.tagger}")
        seeds, d = paired_differences(scores, emb, feats)
        rows, controls[c.index] = discover_class(seeds, d, concepts, feats, top_k)
        tested += [{"class_index": c.index, "class_name": c.name, **r} for r in rows]
    table = pd.DataFrame(tested)
    if table.empty:
        table = pd.DataFrame(columns=[*DISCOVERED_COLUMNS, "index"])
    table["q_value"] = benjamini_hochberg(table["p_value"].to_numpy()) if len(table) else []
    table["significant"] = (table["q_value"] < alpha) & (table["effect"] > 0)
    for col in ("cf_change", "cf_ci_low", "worst_replacement"):
        table[col] = None
    table["confirmed"] = False

    # 2. The counterfactual check of significant concepts (plain class prompt, same seeds as the vocabulary's)
    findings_cf: dict[tuple[int, str], dict] = {}
    if check and table["significant"].any():
        vocabulary = load_vocabulary(opts.attributes)
        models = Models(
            classifier=given.classifier,
            generator=given.generator,
            bank=AttributeBank.build(tagger, vocabulary),
        )
        others = [a.name for a in vocabulary.attributes if not a.absence]
        seeds = eval_seeds(opts.seed, opts.confirm_seeds)
        batch = opts.batch if isinstance(opts.batch, int) else (4 if torch_device.type == "cuda" else 2)
        for c in done:
            rows = table[(table["class_index"] == c.index) & table["significant"]]
            if rows.empty:
                continue
            folder = run.class_dir(c.index, c.name)
            prompts = {"{}": "plain"}
            neutral = [k for k in controls[c.index] if k not in set(rows["index"])][:N_CONTROLS]
            for k in neutral:
                prompts[with_template.format("{}", concepts[k].name)] = concepts[k].name
            for r in rows.itertuples():
                prompts[with_template.format("{}", r.concept)] = r.concept
            sweep = counterfactual_sweep(
                lambda: load_models(models, opts, torch_device, vocabulary),
                root / rundir.COUNTERFACTUAL_DIR / f"{folder.name}.json",
                ResolvedClass(c.index, c.name, c.name),
                prompts,
                seeds,
                opts,
                batch,
            )
            for r in rows.itertuples():
                with_entry = sweep[with_template.format("{}", r.concept)]
                reps = {
                    name: {
                        "prompt": template.format(c.name),
                        "probs": sweep[template]["probs"],
                        "attribute_rate": None,
                        "confounders": confounders(
                            with_entry.get("rates"), sweep[template].get("rates"), others
                        ),
                    }
                    for template, name in prompts.items()
                    if name != r.concept and (name == "plain" or name in {concepts[k].name for k in neutral})
                }
                eff = counterfactual_effect(with_entry["probs"], reps)
                worst = next(x for x in eff["replacements"] if x["name"] == eff["worst_replacement"])
                eff.update(
                    with_prompt=with_template.format(c.name, r.concept), without_prompt=worst["prompt"]
                )
                ok = confirmed(eff)
                table.loc[r.Index, ["cf_change", "cf_ci_low", "worst_replacement", "confirmed"]] = [
                    eff["diff"],
                    eff["ci_low"],
                    eff["worst_replacement"],
                    ok,
                ]
                findings_cf[(c.index, r.concept)] = eff

    # 3. discovered.csv, and the significant concepts in findings.json
    out = table[list(DISCOVERED_COLUMNS)].sort_values(["class_index", "rank"]).reset_index(drop=True)
    rundir.write_csv(root / rundir.DISCOVERED, out)
    findings = [f for f in rundir.read_findings(root) if f.source != "discovered"]
    # Significance alone is weak evidence: a token shifts its images systematically, so the held-out half
    # nearly always agrees with the ranking half on the top concepts (measured on the truth benchmark's worlds:
    # 7-8 significant concepts per class, unbiased controls included; benchmarks/bench_discover.py). When the
    # counterfactual check ran, only confirmed concepts become findings; the rest stay in discovered.csv.
    keep = out["significant"] & (out["confirmed"] if check else True)
    for r in out[keep].itertuples():
        findings.append(
            rundir.Finding(
                class_index=int(r.class_index),
                class_name=r.class_name,
                attribute=r.concept,
                group="discovered",
                source="discovered",
                flagged=True,
                token_rate=None,
                baseline_rate=None,
                effect=r.effect,
                ci=[r.ci_low, r.ci_high],
                p=r.p_value,
                q=r.q_value,
                counterfactual=findings_cf.get((int(r.class_index), r.concept)),
                absence=False,
                confirmed=bool(r.confirmed),
                discovered={
                    "lemma_id": r.lemma_id,
                    "rank": int(r.rank),
                    "t_discovery": r.t_discovery,
                    "wins": int(r.wins),
                    "n_pairs": int(r.n_pairs),
                    "statistic": "cosine similarity to the concept, token image minus its baseline twin",
                },
            )
        )
    rundir.write_findings(root, findings)
    run.update_manifest(
        discovery={
            "concepts": concepts_file or "wordnet (timm imagenet_synset_to_lemma.txt)",
            "n_concepts": len(concepts),
            "concept_template": concept_template,
            "top_k": top_k,
            "alpha": alpha,
            "with_template": with_template,
            "checked": check,
            "findings": "confirmed concepts" if check else "significant concepts, not checked",
            "confirm_min_change": CONFIRM_MIN_CHANGE,
        }
    )
    return out
