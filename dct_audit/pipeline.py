"""``dct_audit.run``: resolve, load, and for each class invert -> generate -> score, into a run folder.

The per-class job (:func:`audit_class`) reads top to bottom as numbered steps and touches nothing
outside its class folder except the manifest, so classes can resume, retry or run elsewhere.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import rundir
from .adapters.classifier import Classifier, load_classifier, load_notes
from .adapters.generator import Generator
from .adapters.generator_load import load_generator
from .adapters.in_memory import models_in_memory
from .analyse import analyse_run
from .association import SUBJECTS as ASSOCIATION_SUBJECTS
from .check import CONFIRM_MIN_CHANGE
from .errors import DctAuditError
from .explain import explain_class
from .generate import eval_seeds, generate, nograd_batch, plan_jobs, twin
from .invert import invert_class, save_token
from .options import ANALYSIS_OPTIONS, CONFIRM_MODES, RunOptions, parse_shard, shard_classes  # noqa: F401  (re-exported)
from .plan import Plan, plan_run
from .records import (  # noqa: F401
    build_manifest,
    check_resume,
    manifest_options,
    model_fingerprints,
    peak_memory_mb,
    placeholder_for,
    require_downloadable,
    tagger_revision,
)
from .resolve import ResolvedClass
from .score import holdout_accuracy, score_images
from .tag import AttributeBank, Tagger, Vocabulary, load_tagger, load_vocabulary


@dataclass
class RunResult:
    run_dir: Path
    classes: list[dict] = field(default_factory=list)  # class.json of each class, in order
    skipped: list[int] = field(default_factory=list)  # already finished before this call
    findings: list[dict] = field(default_factory=list)  # flagged attributes with their evidence
    report: Path | None = None  # the HTML report's index


@dataclass
class Models:
    """What the per-class job needs; loaded lazily so a finished run loads nothing."""

    generator: Generator | None = None
    classifier: Classifier | None = None
    bank: AttributeBank | None = None
    holdout: Classifier | None = None
    tagger: Tagger | None = None  # given in memory, or loaded by name when the bank is built


def run_with_options(
    opts: RunOptions,
    classifier: Classifier | None = None,
    generator: Generator | None = None,
    tagger: Tagger | None = None,
) -> RunResult:
    """Run an audit as ``opts`` says; ``classifier``, ``generator``, ``tagger``: models already in memory
    (``opts.classifier``, ``opts.generator`` and ``opts.tagger`` are then their records' names)."""
    if opts.ray:  # each class a Ray task, then the analysis here (dct_audit/scale.py)
        from .scale import run_on_ray

        return run_on_ray(opts, classifier, generator, tagger)
    plan = plan_run(opts, classifier, generator, tagger)
    lock = ".lock" if not opts.shard else ".lock-shard-{}-of-{}".format(*parse_shard(opts.shard))
    with rundir.run_lock(plan.root, lock):
        return _run_locked(opts, plan)


def _run_locked(opts: RunOptions, plan: Plan) -> RunResult:
    device, batch, targets, say = plan.device, plan.batch, plan.targets, plan.say
    root, settings, run_dir = plan.root, plan.settings, plan.run_dir
    mine = shard_classes(targets, opts.shard)  # every class, or this shard's share
    states = {c.index: run_dir.verify_class(c.index, c.name) for c in mine}
    todo = [c for c in mine if opts.overwrite or states[c.index][0] != "done"]
    skipped = [c.index for c in mine if c not in todo]
    if skipped:
        say(f"resuming {root}: {len(skipped)} class(es) already finished")
    for c in todo:
        state, detail = states[c.index]
        if state == "damaged" and not opts.overwrite:
            say(f"class {c.name} ({c.index}) is damaged ({detail}): redoing it")

    # 3. Load models (only if there is work left), then create the folder
    vocabulary = load_vocabulary(opts.attributes) if opts.tagger else None
    fingerprints = model_fingerprints(opts)  # local files' hash, hub models' cached revision
    if skipped and not opts.overwrite:
        check_resume(plan.previous, opts, vocabulary, fingerprints, root)
    models = Models(
        classifier=plan.classifier.to(device) if plan.classifier is not None else None,
        generator=plan.generator,
        tagger=plan.tagger,
    )
    if todo:
        require_downloadable(models, opts)  # every model that cannot be had, in one line, in seconds
    if opts.tagger:
        from .tag import check_tagger

        if plan.tagger is None:
            check_tagger(opts.tagger)  # before the classifier and generator load: fail fast and cheaply
    batch_record = None
    if todo:
        load_models(models, opts, device, vocabulary)
        # a hub model downloaded just now is in the cache now: record the revision it loaded
        fingerprints = {**model_fingerprints(opts, local=False), **fingerprints}
        for flag, word in [
            ("--init-word", opts.init_word),
            *(("--restart-words", w) for w in opts.restart_words),
        ]:
            models.generator.word_vector(word, flag)  # a word of several tokens: one line, nothing written
        if batch == "auto":  # one measured update at batch 1 decides (dct_audit/memory.py)
            from .memory import auto_batch

            batch, _, batch_record = auto_batch(
                models.generator, models.classifier, todo[0].index, todo[0].name, opts, say
            )
    if batch == "auto":  # nothing left to invert: the analysis only generates grids
        batch = 4 if device.type == "cuda" else 2
    rundir.create_run_dir(run_dir, opts.overwrite)
    # the manifest lists every class of the run (a shard's too); class records are merged, never replaced
    manifest = build_manifest(
        plan.previous, opts, settings, device, plan.clf_record, models.generator, targets, fingerprints
    )
    if batch_record is not None:
        manifest.batch_auto = batch_record
    if vocabulary is not None:
        manifest.tagging = {
            "tagger": opts.tagger,
            "vocabulary": vocabulary.source,
            "attributes_file": opts.attributes,  # the --attributes given (None: the shipped vocabulary)
            "attributes": len(vocabulary),
            "vocabulary_sha256": vocabulary.fingerprint(),
            **({"tagger_hub_revision": rev} if (rev := tagger_revision(opts.tagger)) else {}),
            "thresholds": vocabulary.presence_thresholds(),
            "thresholds_source": f"vocabulary file ({rundir.PRESENCE_THRESHOLD} where it sets none)",
        }
    if opts.overwrite:
        run_dir.write_manifest(manifest)
    run_dir.update_manifest(manifest)

    # 4. One class at a time
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc="classes", unit="class", disable=opts.quiet or not todo)
    for cls in bar:
        bar.set_postfix_str(cls.name[:30])
        summary = audit_class(run_dir, cls, models, opts, batch, device)
        record = {
            "name": cls.name,
            "folder": run_dir.class_dir(cls.index, cls.name).name,
            "seconds": summary["timings"],
            "memory": summary["memory"],
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        if opts.shard:  # and its images per generator call, which finish then keeps (a speed option)
            record.update(shard=opts.shard, gen_batch=opts.gen_batch)
        run_dir.update_manifest(class_runs={str(cls.index): record})
    bar.close()

    if opts.shard:  # the analysis needs every class: `dct-audit finish` runs it once all shards are done
        results = [rundir.read_class_summary(run_dir.class_dir(c.index, c.name)).to_dict() for c in mine]
        return RunResult(run_dir=root, classes=results, skipped=skipped, findings=[], report=None)

    # 5. Across classes: q-values, flags, counterfactual checks of the flagged attributes
    findings = []
    if vocabulary is not None:
        findings = analyse_run(
            run_dir, targets, vocabulary, lambda: load_models(models, opts, device, vocabulary), opts, batch
        )
        analysis = {
            **{
                k: getattr(opts, k) for k in ANALYSIS_OPTIONS
            },  # what finish reads back (records.manifest_options)
            "confirm_min_change": CONFIRM_MIN_CHANGE,
            "association_subjects": ASSOCIATION_SUBJECTS if opts.association else 0,  # other classes drawn
            "findings": len(findings),
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        run_dir.update_manifest(analysis=analysis)
    results = [rundir.read_class_summary(run_dir.class_dir(c.index, c.name)).to_dict() for c in targets]

    # 6. Open-vocabulary discovery over the finished classes (stored image features; checks generate images)
    if opts.discover and vocabulary is not None:
        from .discover import discover_run

        discover_run(
            root,
            opts.concepts,
            with_template=opts.discover_with,
            alpha=opts.alpha,
            device=opts.device,
            quiet=opts.quiet,
            models=models,
        )
        findings = [f.to_dict() for f in rundir.read_findings(root)]

    # 7. The HTML report (reads the run folder only)
    report = None
    if opts.report:
        from .report import render_report

        report = render_report(root)
    return RunResult(run_dir=root, classes=results, skipped=skipped, findings=findings, report=report)


def finish_run(run_dir: str | Path, classifier=None, generator=None, tagger=None, **overrides) -> RunResult:
    """Analyse and report a run whose classes were audited elsewhere (``--shard K/N`` job arrays): the same
    settings as the run, read from its manifest; ``overrides`` may set the device, ``quiet``, ``report``
    and the analysis options (``options.ANALYSIS_OPTIONS``). Refuses while classes of the run
    are unfinished, naming them. ``classifier``, ``generator``, ``tagger``: the models of a run audited with
    them in memory (each must be recorded as the run's was)."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise DctAuditError(f"finish_run() takes a run folder (a path), not {run_dir!r}")
    root = Path(run_dir)
    manifest = rundir.RunDir(root).read_manifest() if root.is_dir() else None
    if manifest is None or not manifest.settings:
        raise DctAuditError(
            f"'{root}' is not a dct-audit run folder (no manifest.json); give the folder of the run"
        )
    allowed = {"device", "quiet", "report", *ANALYSIS_OPTIONS}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise DctAuditError(f"finish cannot change {', '.join(unknown)}: those are the run's own settings")
    run = rundir.RunDir(root)
    classes = manifest.classes
    states = {c.index: run.verify_class(c.index, c.name) for c in classes}
    missing = [c for c in classes if states[c.index][0] != "done"]
    if missing:

        def named(c) -> str:
            state, detail = states[c.index]
            return (
                f"{c.name} ({c.index}, damaged: {detail})" if state == "damaged" else f"{c.name} ({c.index})"
            )

        names = ", ".join(named(c) for c in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DctAuditError(
            f"{len(missing)} class(es) of '{root}' are not finished: {names}{more}; run their shards again "
            "(or `dct-audit run` with the same settings), then finish"
        )
    kwargs = manifest_options(manifest, overrides)
    given = {"generator": generator, "tagger": tagger}
    gen, tg = models_in_memory(given)  # ``given`` now holds their record names
    for k, name in given.items():
        if name is not None and name != kwargs.get(k):
            raise DctAuditError(f"the {k} given ({name}) is not the run's ({kwargs.get(k)})")
    clf = None
    if classifier is not None:
        from .adapters.in_memory import wrap_classifier

        clf = wrap_classifier(classifier)
        if clf.spec.spec != kwargs.get("classifier"):
            raise DctAuditError(
                f"the classifier given ({clf.spec.spec}) is not the run's ({kwargs.get('classifier')}): "
                "other weights, labels or preprocessing"
            )
    opts = RunOptions(classes=[str(c.index) for c in classes], out=str(root.parent), name=root.name, **kwargs)
    return run_with_options(opts, classifier=clf, generator=gen, tagger=tg)


def load_models(
    models: Models, opts: RunOptions, device: torch.device, vocabulary: Vocabulary | None
) -> Models:
    require_downloadable(models, opts)
    if models.classifier is None:
        models.classifier = load_classifier(opts.classifier, opts.labels, device)
    for note in [] if opts.quiet else load_notes(models.classifier):
        print(f"note: {note}", file=sys.stderr)
    if opts.holdout_classifier and models.holdout is None:
        models.holdout = load_classifier(opts.holdout_classifier, opts.labels, device)
        if models.holdout.labels.names != models.classifier.labels.names:
            raise DctAuditError(
                f"--holdout-classifier {opts.holdout_classifier} has other classes than {opts.classifier}; "
                "a held-out classifier must share the label list"
            )
    if models.generator is None:
        from .adapters.generator_load import resolve_dtype

        models.generator = load_generator(
            opts.generator, device, resolve_dtype(opts.dtype, device), opts.resolution, opts.family
        )
        if opts.grad_checkpointing:
            models.generator.enable_gradient_checkpointing()
    if vocabulary is not None and models.bank is None:
        models.tagger = models.tagger or load_tagger(opts.tagger, device)
        models.bank = AttributeBank.build(models.tagger, vocabulary)
    return models


def audit_class(
    run_dir: rundir.RunDir,
    cls: ResolvedClass,
    models: Models,
    opts: RunOptions,
    batch: int,
    device: torch.device,
) -> dict:
    """Invert, generate, score, tag and explain one class; writes its folder and, last, its marker."""
    from tqdm.auto import tqdm

    generator, classifier = models.generator, models.classifier
    # 1. Start clean: a folder without a marker is a half-finished attempt
    run_dir.clear_class(cls.index, cls.name)
    folder = run_dir.class_dir(cls.index, cls.name)
    folder.mkdir(parents=True)
    placeholder = placeholder_for(cls.index)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()

    # 2. Learn the token
    config = opts.invert_config(batch)
    bar = tqdm(
        total=config.max_updates,
        desc=f"  invert {cls.name[:24]}",
        unit="upd",
        leave=False,
        disable=opts.quiet,
    )

    def on_update(row: dict) -> None:
        if row["update"] >= bar.total:  # another attempt (--attempts)
            bar.total += config.max_updates
        bar.update(1)
        bar.set_postfix(
            loss=f"{row['loss']:.3f}", p=f"{row['target_prob']:.2f}", acc=f"{row['accuracy']:.2f}"
        )

    inv = invert_class(generator, classifier, cls.index, cls.name, placeholder, config, progress=on_update)
    bar.close()
    t_invert = time.perf_counter() - t_start

    # 3. Save the token, its history and the evolution snapshots
    save_token(folder / rundir.TOKEN, placeholder, inv.vector)
    if hasattr(models.generator, "dims"):  # SDXL: also the file the SDXL ecosystem loads (clip_l, clip_g)
        from .adapters.sdxl import save_sdxl_token

        save_sdxl_token(folder / rundir.TOKEN_SDXL, inv.vector, models.generator.dims)
    rundir.write_csv(folder / rundir.HISTORY, pd.DataFrame(inv.history))
    for update, seed, image in inv.snapshots:
        rundir.write_png(folder / rundir.EVOLUTION_DIR / f"update_{update:04d}_s{seed}.png", image)

    # 4. Paired images (token vs baseline, same held-out seeds), scored and tagged as they come
    features: list = []
    seeds = eval_seeds(opts.seed, opts.n_images)
    jobs = plan_jobs(placeholder, cls.name, tuple(opts.contexts), seeds, opts.init_word)
    # An unchanged token embeds exactly like the baseline prompt: draw once, file under both variants
    unchanged = torch.equal(inv.vector.float().cpu(), inv.init_vector.float().cpu())
    to_draw = [j for j in jobs if j.variant == "baseline"] if unchanged else jobs
    rows, token_images = [], []
    gen_bar = tqdm(
        total=len(jobs), desc=f"  images {cls.name[:24]}", unit="img", leave=False, disable=opts.quiet
    )
    for chunk, images in generate(generator, to_draw, nograd_batch(opts, batch), opts.steps, opts.guidance):
        if unchanged:
            chunk = [twin(j, "token") for j in chunk] + chunk
            images = torch.cat([images, images])
        scored = score_images(classifier, images, cls.index)
        if models.holdout is not None:
            for row, h in zip(scored, score_images(models.holdout, images, cls.index), strict=True):
                row.update(holdout_target_prob=h["target_prob"], holdout_correct=h["correct"])
        for job, image, score in zip(chunk, images, scored, strict=True):
            rundir.write_png(folder / job.filename, image)
            rows.append(
                {
                    "class_index": cls.index,
                    "class_name": cls.name,
                    **asdict(job),
                    "file": job.filename,
                    **score,
                }
            )
        if models.bank is not None:
            features.append(models.bank.tagger.image_features(images))  # (b, D)
        token_images += [im for job, im in zip(chunk, images, strict=True) if job.variant == "token"]
        gen_bar.update(len(chunk))
    gen_bar.close()
    scores = pd.DataFrame(rows)
    rundir.write_csv(folder / rundir.SCORES, scores)

    # 5. Tags: every image against the attribute vocabulary (scores; presence is decided in analysis)
    if models.bank is not None:
        embeddings = torch.cat(features)  # (N, D), rows aligned with scores.csv
        rundir.write_npy(folder / rundir.EMBEDDINGS, embeddings.half().numpy())
        tag_scores = pd.DataFrame(models.bank.scores(embeddings), columns=models.bank.vocabulary.names)
        keys = scores[["file", "variant", "context_index", "seed"]].reset_index(drop=True)
        rundir.write_csv(folder / rundir.TAGS, pd.concat([keys, tag_scores], axis=1))

    # 6. Where the classifier looks in a few token images (captum)
    if opts.explain_images > 0:
        explain_class(folder, classifier, torch.stack(token_images[: opts.explain_images]), cls.index)
    t_total = time.perf_counter() - t_start

    # 7. Summary, then the marker: from here on the class is finished
    hist = inv.history
    acc = scores.groupby("variant")["correct"].mean().to_dict()
    prob = scores.groupby("variant")["target_prob"].mean().to_dict()
    summary = rundir.ClassSummary(
        index=cls.index,
        name=cls.name,
        query=cls.query,
        placeholder=placeholder,
        token_file=rundir.TOKEN,
        init_word=opts.init_word,
        updates=len(hist),
        token_unchanged=unchanged,
        stop_reason=inv.stop_reason,
        restarts=inv.restarts,
        attempts=inv.attempts,
        best_val_accuracy=inv.best_val_accuracy,
        best_update=inv.best_update,
        best_loss=inv.best_loss,
        initial={
            "loss": hist[0]["loss"],
            "target_prob": hist[0]["target_prob"],
            "accuracy": hist[0]["accuracy"],
        },
        token_accuracy=acc.get("token"),
        baseline_accuracy=acc.get("baseline"),
        token_target_prob=prob.get("token"),
        baseline_target_prob=prob.get("baseline"),
        **holdout_accuracy(scores),
        n_images=int(len(scores)),
        timings={
            "invert_s": round(t_invert, 3),
            "generate_s": round(t_total - t_invert, 3),
            "total_s": round(t_total, 3),
            "seconds_per_update": round(t_invert / max(1, len(hist)), 4),
        },
        memory=peak_memory_mb(device),
    )
    rundir.write_class_summary(folder, summary)
    run_dir.mark_done(cls.index, cls.name)
    return summary.to_dict()
