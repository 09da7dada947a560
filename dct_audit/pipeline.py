"""``dct_audit.run``: resolve, load, and for each class invert -> generate -> score, into a run folder.

The per-class job (:func:`audit_class`) reads top to bottom as numbered steps and touches nothing
outside its class folder except the manifest, so classes can resume, retry or run elsewhere.
"""

from __future__ import annotations

import datetime as _dt
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import __version__, rundir
from .adapters.classifier import Classifier, describe_classifier, load_classifier
from .adapters.generator import DEFAULT_GENERATOR, Generator, check_generator_spec, load_generator
from .analyse import ALPHA, CONFIRM_MIN_CHANGE, MIN_EFFECT, analyse_run
from .errors import DctAuditError
from .generate import DEFAULT_CONTEXTS, eval_seeds, generate, plan_jobs, twin
from .invert import PAPER_TEMPLATES, InvertConfig, invert_class, save_token
from .resolve import ResolvedClass, resolve_classes
from .score import score_images
from .tag import DEFAULT_TAGGER, AttributeBank, Vocabulary, load_tagger, load_vocabulary

CONFIRM_MODES = ("all", "flagged")


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N; one line saying how to write it otherwise."""
    try:
        k, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise DctAuditError(f"--shard must look like K/N (e.g. 2/8), not {text!r}") from None
    if not 1 <= k <= n:
        raise DctAuditError(f"--shard {text}: K must be between 1 and N")
    return k, n


def shard_classes(targets: list, shard: str | None) -> list:
    """The K-th of N disjoint subsets of ``targets`` (by label index, round robin); all without a shard."""
    if not shard:
        return list(targets)
    k, n = parse_shard(shard)
    ordered = sorted(targets, key=lambda c: c.index)
    return ordered[k - 1 :: n]


@dataclass
class RunOptions:
    """Everything ``dct-audit run`` accepts; the fields that change results go into ``settings()``."""

    classifier: str
    classes: str | list[str]
    generator: str = DEFAULT_GENERATOR
    labels: str | None = None
    holdout_classifier: str | None = (
        None  # scores the same images: a token that only fools its own model shows
    )
    out: str = "reports"
    name: str | None = None
    device: str = "auto"
    dtype: str = (
        "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA where supported, else fp16; fp32 on CPU)
    )
    resolution: int | None = None  # image size in pixels; None: the generator's own (unet.sample_size)
    family: str | None = None  # generator family (sd-turbo, sd1, sd2); None: read from the pipeline's config
    steps: int | None = None
    guidance: float | None = None
    grad_steps: int = 1
    batch: int | None = None  # None: 4 on CUDA, 2 on CPU
    grad_accum: int = 1
    lr: float = 1e-3
    max_updates: int = 50
    stop_accuracy: float = 0.7
    # with validation seeds, the stop also needs their mean target probability to reach this (0: off)
    stop_prob: float = 0.0
    # Decisions on like-for-like numbers (measured on random planted worlds, README "Truth benchmark"):
    # fresh seeds every update, a fixed validation set decides the kept token, the stop and patience.
    patience: int = 20  # restart / stop when the best validation loss has not improved for this many updates
    fresh_seeds: bool = True  # new inversion seeds at every update (the expected loss over noise)
    val_seeds: int = 8  # fixed validation seeds deciding the kept token, the stop and patience (0: off)
    eval_every: int = 2  # updates between validations
    restart_words: tuple[str, ...] = ("the",)  # on patience, restart from these words in turn
    max_norm: float = 2.0  # token norm at most this x the vocabulary's mean norm (0: no limit)
    init_word: str = "a"
    templates: tuple[str, ...] = PAPER_TEMPLATES
    contexts: tuple[str, ...] = DEFAULT_CONTEXTS
    n_images: int = 16
    seed: int = 0
    snapshot_every: int = 5
    grad_checkpointing: bool = False
    tagger: str | None = DEFAULT_TAGGER  # None: no tagging, no findings
    attributes: str | None = None  # attribute vocabulary file (replaces or extends the shipped one)
    alpha: float = ALPHA  # false discovery rate of flagged findings
    min_effect: float = MIN_EFFECT  # smallest token-minus-baseline rate that is flagged
    explain_images: int = 4  # token images per class with captum attributions
    # Counterfactual check: "all" tests every (non-absence) vocabulary attribute of every class with the plain
    # class prompt, so a bias the token did not bring in is still found; "flagged" only the token's flagged
    # attributes (cheaper: the README's truth benchmark measures what it misses).
    confirm: str = "all"
    confirm_seeds: int = 8  # seeds per counterfactual prompt (paired across prompts)
    # "K/N": audit only the K-th of N disjoint class subsets (job arrays); the analysis waits for `finish`
    shard: str | None = None
    overwrite: bool = False
    quiet: bool = False
    report: bool = True  # render the HTML report at the end

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise DctAuditError(
                f"--device '{self.device}' is not a torch device; use auto, cpu or cuda"
            ) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DctAuditError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        return dev

    def check(self) -> None:
        """Reject bad values before any model loads (one line each, with the fix)."""
        if not 0 < self.alpha < 1:
            raise DctAuditError(f"--alpha must be in (0, 1), not {self.alpha}")
        if not 0 < self.min_effect <= 1:
            raise DctAuditError(f"--min-effect must be in (0, 1], not {self.min_effect}")
        if self.n_images < 1:
            raise DctAuditError(f"--n-images must be at least 1, not {self.n_images}")
        if self.confirm not in CONFIRM_MODES:
            raise DctAuditError(f"--confirm must be one of {', '.join(CONFIRM_MODES)}, not {self.confirm!r}")
        if self.shard is not None:
            parse_shard(self.shard)
            if self.overwrite:
                raise DctAuditError(
                    "--overwrite cannot be combined with --shard (one shard would delete the others' classes); "
                    "clear the run folder first, then start the shards"
                )
        if self.confirm_seeds < 2:
            raise DctAuditError(
                f"--confirm-seeds must be at least 2 (a paired interval needs two), not {self.confirm_seeds}"
            )
        if self.steps is not None and self.steps < 1:
            raise DctAuditError(f"--steps must be at least 1, not {self.steps}")
        if self.grad_steps < 1:
            raise DctAuditError(f"--grad-steps must be at least 1, not {self.grad_steps}")
        if self.patience < 0:
            raise DctAuditError(f"--patience must be 0 (off) or more updates, not {self.patience}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise DctAuditError(f"--lr must be > 0, not {self.lr}")
        if not 0 <= self.max_norm < float("inf"):
            raise DctAuditError(f"--max-norm must be 0 (no limit) or a positive factor, not {self.max_norm}")
        if self.val_seeds < 0:
            raise DctAuditError(f"--val-seeds must be 0 (off) or more, not {self.val_seeds}")
        if self.eval_every < 1:
            raise DctAuditError(f"--eval-every must be at least 1, not {self.eval_every}")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 8):
            raise DctAuditError(
                f"--resolution must be a multiple of 8 and at least 64, not {self.resolution}"
            )
        if self.batch is not None and self.batch < 1:
            raise DctAuditError(f"--batch must be at least 1, not {self.batch}")
        for ctx in self.contexts:
            if ctx.count("{}") != 1:
                raise DctAuditError(
                    f"context {ctx!r} must contain '{{}}' exactly once (where the class goes)"
                )
        try:
            self.invert_config(2).check()
        except ValueError as e:
            raise DctAuditError(str(e)) from None

    def invert_config(self, batch: int) -> InvertConfig:
        return InvertConfig(
            steps=self.steps,
            guidance=self.guidance,
            grad_steps=self.grad_steps,
            batch=batch,
            grad_accum=self.grad_accum,
            lr=self.lr,
            max_updates=self.max_updates,
            stop_accuracy=self.stop_accuracy,
            stop_prob=self.stop_prob,
            patience=self.patience,
            fresh_seeds=self.fresh_seeds,
            val_seeds=self.val_seeds,
            eval_every=self.eval_every,
            restart_words=tuple(self.restart_words),
            max_norm=self.max_norm,
            init_word=self.init_word,
            templates=tuple(self.templates),
            seed=self.seed,
            snapshot_every=self.snapshot_every,
        )

    def settings(self, batch: int) -> dict:
        keys = (
            "classifier",
            "labels",
            "holdout_classifier",
            "generator",
            "dtype",
            "resolution",
            "family",
            "steps",
            "guidance",
            "grad_steps",
            "grad_accum",
            "lr",
            "max_updates",
            "stop_accuracy",
            "stop_prob",
            "patience",
            "fresh_seeds",
            "val_seeds",
            "eval_every",
            "max_norm",
            "init_word",
            "n_images",
            "seed",
            "snapshot_every",
        )
        s = {k: getattr(self, k) for k in keys}
        s.update(batch=batch, templates=list(self.templates), contexts=list(self.contexts))
        s["restart_words"] = list(self.restart_words)
        return s


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


def placeholder_for(index: int) -> str:
    return f"<dct-{index}>"


def _package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "dct-audit": __version__}
    for pkg in (
        "torch",
        "torchvision",
        "diffusers",
        "transformers",
        "timm",
        "open_clip_torch",
        "captum",
        "safetensors",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _peak_memory_mb(device: torch.device) -> dict:
    out = {"process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def default_run_name(classifier: str) -> str:
    return f"{rundir.slugify(classifier.split('/')[-1].split(':')[-1])}-{_dt.date.today().isoformat()}"


def run(classifier: str, classes: str | list[str], **kwargs) -> RunResult:
    """Audit ``classes`` of ``classifier``: a token, paired images and scores per class, in a run folder.

    Keyword arguments are the fields of :class:`RunOptions` (the CLI flags). Finished classes of an
    existing run with the same settings are kept; a half-finished class is redone.
    """
    opts = RunOptions(classifier=classifier, classes=classes, **kwargs)
    return run_with_options(opts)


def _estimated_bytes(opts: RunOptions, n_classes: int) -> int:
    """What a run's images take on disk, roughly: PNGs of about 1.5 bytes per pixel."""
    size = opts.resolution
    if size is None:
        config = Path(opts.generator) / "unet" / "config.json"
        try:
            import json

            size = int(json.loads(config.read_text())["sample_size"]) * 8
        except (OSError, ValueError, KeyError, TypeError):
            size = 512
    per_image = int(size * size * 1.5) + 2048
    images = n_classes * (
        2 * len(opts.contexts) * opts.n_images + opts.max_updates // max(1, opts.snapshot_every) + 1
    )
    return images * per_image + 10 * 2**20


def run_with_options(opts: RunOptions) -> RunResult:
    # 1. Check inputs and resolve names, before any weights load
    opts.check()
    device = opts.resolved_device()
    from .adapters.generator import resolve_dtype

    resolve_dtype(opts.dtype, device)  # a dtype the device cannot run: one line, before anything loads
    batch = opts.batch or (4 if device.type == "cuda" else 2)
    clf_record, labels = describe_classifier(opts.classifier, opts.labels)
    targets, notes = resolve_classes(opts.classes, labels)
    say = (lambda msg: None) if opts.quiet else (lambda msg: print(msg, file=sys.stderr))
    for note in notes:
        say(note)

    # 2. Check the run folder (refuses other settings unless --overwrite); nothing is written yet
    root = Path(opts.out) / (opts.name or default_run_name(opts.classifier))
    settings = opts.settings(batch)
    run_dir, previous = rundir.open_run_dir(root, settings, opts.overwrite)
    check_generator_spec(opts.generator)  # a local folder or hub index that cannot work: before anything
    rundir.check_free_space(root, _estimated_bytes(opts, len(targets)))
    lock = ".lock" if not opts.shard else ".lock-shard-{}-of-{}".format(*parse_shard(opts.shard))
    with rundir.run_lock(root, lock):
        return _run_locked(opts, device, batch, clf_record, targets, say, root, settings, run_dir, previous)


def _run_locked(
    opts, device, batch, clf_record, targets, say, root, settings, run_dir, previous
) -> RunResult:
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
    if opts.tagger:
        from .tag import check_tagger

        check_tagger(opts.tagger)  # before the classifier and generator load: fail fast and cheaply
    models = Models()
    if todo:
        check_generator_spec(opts.generator)
        _load_models(models, opts, device, vocabulary)
    rundir.create_run_dir(run_dir, opts.overwrite)
    # the manifest lists every class of the run (a shard's too); class records are merged, never replaced
    manifest = _manifest(previous or {}, opts, settings, device, clf_record, models.generator, targets)
    if vocabulary is not None:
        manifest["tagging"] = {
            "tagger": opts.tagger,
            "vocabulary": vocabulary.source,
            "attributes_file": opts.attributes,  # the --attributes given (None: the shipped vocabulary)
            "attributes": len(vocabulary),
            "thresholds": vocabulary.presence_thresholds(),
            "thresholds_source": f"vocabulary file ({rundir.PRESENCE_THRESHOLD} where it sets none)",
        }
    if opts.overwrite:
        run_dir.write_manifest(manifest)
    manifest = run_dir.update_manifest(manifest)

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
        if opts.shard:
            record["shard"] = opts.shard
        manifest = run_dir.update_manifest({}, {str(cls.index): record})
    bar.close()

    if opts.shard:  # the analysis needs every class: `dct-audit finish` runs it once all shards are done
        results = [rundir.read_json(run_dir.class_dir(c.index, c.name) / rundir.CLASS_SUMMARY) for c in mine]
        return RunResult(run_dir=root, classes=results, skipped=skipped, findings=[], report=None)

    # 5. Across classes: q-values, flags, counterfactual checks of the flagged attributes
    findings = []
    if vocabulary is not None:
        findings = analyse_run(
            run_dir, targets, vocabulary, lambda: _load_models(models, opts, device, vocabulary), opts, batch
        )
        manifest["analysis"] = {
            "alpha": opts.alpha,
            "min_effect": opts.min_effect,
            "confirm": opts.confirm,
            "confirm_seeds": opts.confirm_seeds,
            "confirm_min_change": CONFIRM_MIN_CHANGE,
            "findings": len(findings),
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        manifest = run_dir.update_manifest({"analysis": manifest["analysis"]})
    results = [rundir.read_json(run_dir.class_dir(c.index, c.name) / rundir.CLASS_SUMMARY) for c in targets]

    # 6. The HTML report (reads the run folder only)
    report = None
    if opts.report:
        from .report import render_report

        report = render_report(root)
    return RunResult(run_dir=root, classes=results, skipped=skipped, findings=findings, report=report)


def finish_run(run_dir: str | Path, **overrides) -> RunResult:
    """Analyse and report a run whose classes were audited elsewhere (``--shard K/N`` job arrays): the same
    settings as the run, read from its manifest; ``overrides`` may set the device, ``quiet``, ``report``
    and the analysis options (alpha, min_effect, confirm, confirm_seeds). Refuses while classes of the run
    are unfinished, naming them."""
    root = Path(run_dir)
    manifest = rundir.RunDir(root).read_manifest() if root.is_dir() else None
    if manifest is None or "settings" not in manifest:
        raise DctAuditError(
            f"'{root}' is not a dct-audit run folder (no manifest.json); give the folder of the run"
        )
    allowed = {"device", "quiet", "report", "alpha", "min_effect", "confirm", "confirm_seeds"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise DctAuditError(f"finish cannot change {', '.join(unknown)}: those are the run's own settings")
    run = rundir.RunDir(root)
    classes = manifest.get("classes") or []
    missing = [c for c in classes if run.verify_class(c["index"], c["name"])[0] != "done"]
    if missing:
        names = ", ".join(f"{c['name']} ({c['index']})" for c in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DctAuditError(
            f"{len(missing)} class(es) of '{root}' are not finished: {names}{more}; run their shards again "
            "(or `dct-audit run` with the same settings), then finish"
        )
    fields = set(RunOptions.__dataclass_fields__)
    settings = {k: v for k, v in manifest["settings"].items() if k in fields}
    for key in ("templates", "contexts", "restart_words"):
        if key in settings:
            settings[key] = tuple(settings[key])
    tagging = manifest.get("tagging") or {}
    analysis = manifest.get("analysis") or {}
    kwargs = {
        "tagger": tagging.get("tagger"),
        "attributes": tagging.get("attributes_file"),
        **{k: analysis[k] for k in ("alpha", "min_effect", "confirm", "confirm_seeds") if k in analysis},
        **settings,
        **overrides,
    }
    opts = RunOptions(
        classes=[str(c["index"]) for c in classes], out=str(root.parent), name=root.name, **kwargs
    )
    return run_with_options(opts)


def _load_models(
    models: Models, opts: RunOptions, device: torch.device, vocabulary: Vocabulary | None
) -> Models:
    if models.classifier is None:
        models.classifier = load_classifier(opts.classifier, opts.labels, device)
        if opts.holdout_classifier:
            models.holdout = load_classifier(opts.holdout_classifier, opts.labels, device)
            if models.holdout.labels.names != models.classifier.labels.names:
                raise DctAuditError(
                    f"--holdout-classifier {opts.holdout_classifier} has other classes than {opts.classifier}; "
                    "a held-out classifier must share the label list"
                )
        from .adapters.generator import resolve_dtype

        models.generator = load_generator(
            opts.generator, device, resolve_dtype(opts.dtype, device), opts.resolution, opts.family
        )
        if opts.grad_checkpointing:
            models.generator.enable_gradient_checkpointing()
    if vocabulary is not None and models.bank is None:
        models.bank = AttributeBank.build(load_tagger(opts.tagger, device), vocabulary)
    return models


def _manifest(
    old: dict, opts: RunOptions, settings: dict, device, clf_record, generator: Generator | None, targets
) -> dict:
    m = dict(old)
    m.setdefault("created", _dt.datetime.now().isoformat(timespec="seconds"))
    m["tool"] = "dct-audit"
    m["settings"] = settings
    m["command"] = sys.argv if sys.argv and "dct-audit" in Path(sys.argv[0]).name else None
    m["device"] = {
        "type": device.type,
        "name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    m["versions"] = _package_versions()
    models = m.setdefault("models", {})
    models["classifier"] = clf_record.to_dict()
    if generator is not None:
        models["generator"] = generator.spec.to_dict()
    known = {c["index"]: c for c in m.get("classes", [])}
    for c in targets:
        known.setdefault(
            c.index,
            {"index": c.index, "name": c.name, "query": c.query, "placeholder": placeholder_for(c.index)},
        )
    m["classes"] = sorted(known.values(), key=lambda c: c["index"])
    m.setdefault("class_runs", {})
    m["eval_seeds"] = eval_seeds(opts.seed, opts.n_images)
    return m


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
        bar.update(1)
        bar.set_postfix(
            loss=f"{row['loss']:.3f}", p=f"{row['target_prob']:.2f}", acc=f"{row['accuracy']:.2f}"
        )

    inv = invert_class(generator, classifier, cls.index, cls.name, placeholder, config, progress=on_update)
    bar.close()
    t_invert = time.perf_counter() - t_start

    # 3. Save the token, its history and the evolution snapshots
    save_token(folder / rundir.TOKEN, placeholder, inv.vector)
    rundir.write_csv(folder / rundir.HISTORY, pd.DataFrame(inv.history))
    for update, seed, image in inv.snapshots:
        rundir.write_png(folder / "evolution" / f"update_{update:04d}_s{seed}.png", image)

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
    for chunk, images in generate(generator, to_draw, max(batch, 4), opts.steps, opts.guidance):
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
        _explain(folder, classifier, torch.stack(token_images[: opts.explain_images]), cls.index)
    t_total = time.perf_counter() - t_start

    # 7. Summary, then the marker: from here on the class is finished
    hist = inv.history
    acc = scores.groupby("variant")["correct"].mean().to_dict()
    prob = scores.groupby("variant")["target_prob"].mean().to_dict()
    summary = {
        "index": cls.index,
        "name": cls.name,
        "query": cls.query,
        "placeholder": placeholder,
        "token_file": rundir.TOKEN,
        "init_word": opts.init_word,
        "updates": len(hist),
        "token_unchanged": unchanged,
        "stop_reason": inv.stop_reason,
        "restarts": inv.restarts,
        "best_val_accuracy": inv.best_val_accuracy,
        "best_update": inv.best_update,
        "best_loss": inv.best_loss,
        "initial": {
            "loss": hist[0]["loss"],
            "target_prob": hist[0]["target_prob"],
            "accuracy": hist[0]["accuracy"],
        },
        "token_accuracy": acc.get("token"),
        "baseline_accuracy": acc.get("baseline"),
        "token_target_prob": prob.get("token"),
        "baseline_target_prob": prob.get("baseline"),
        **_holdout_accuracy(scores),
        "n_images": int(len(scores)),
        "timings": {
            "invert_s": round(t_invert, 3),
            "generate_s": round(t_total - t_invert, 3),
            "total_s": round(t_total, 3),
            "seconds_per_update": round(t_invert / max(1, len(hist)), 4),
        },
        "memory": _peak_memory_mb(device),
    }
    rundir.write_json(folder / rundir.CLASS_SUMMARY, summary)
    run_dir.mark_done(cls.index, cls.name)
    return summary


def _explain(folder: Path, classifier: Classifier, images: torch.Tensor, target: int) -> None:
    from .explain import attributions, overlay

    maps = attributions(classifier, images, target)
    paths = []
    for i, (image, amap) in enumerate(zip(images, maps, strict=True)):
        rel = f"attribution/token_{i}.png"
        rundir.write_png(folder / rel, overlay(image, amap))
        paths.append(rel)
    rundir.write_json(
        folder / rundir.ATTRIBUTION,
        {
            "method": "IntegratedGradients (captum), |attr| summed over channels",
            "overlays": paths,
            "outside_object": None,
            "note": "no object mask for generated images",
        },
    )


def _holdout_accuracy(scores: pd.DataFrame) -> dict:
    if "holdout_correct" not in scores:
        return {}
    acc = scores.groupby("variant")["holdout_correct"].mean().to_dict()
    return {"holdout_token_accuracy": acc.get("token"), "holdout_baseline_accuracy": acc.get("baseline")}
