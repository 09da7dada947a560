"""The ``dct-audit`` command line: parses arguments and calls the Python API, nothing more.

Every user error becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from . import __version__
from .errors import DctAuditError


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _prob_or_off(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0: off), not {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that prints one line (no usage block) and exits 2 on a bad argument."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dct-audit", description="Audit what an image classifier has learned, class by class."
    )
    parser.add_argument("--version", action="version", version=f"dct-audit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # run ---------------------------------------------------------------------------------------
    p = sub.add_parser(
        "run", help="learn a discriminative token per class, generate paired images, score them"
    )
    p.add_argument(
        "--classifier", required=True, help="resnet50 | tv:NAME[.WEIGHTS] | hf:ORG/MODEL | file:PATH | FOLDER"
    )
    p.add_argument("--classes", required=True, help="comma-separated indices, names or fragments (_ = space)")
    p.add_argument("--labels", help="labels file, one class per line (needed for file:)")
    p.add_argument(
        "--generator",
        default=None,
        help="diffusers SD pipeline: hub id or folder (default stabilityai/sd-turbo)",
    )
    p.add_argument("--out", default="reports", help="parent folder of the run folder (default reports/)")
    p.add_argument("--name", help="run folder name (default CLASSIFIER-DATE)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="generator precision (default auto: bf16 on CUDA where supported, fp16 on older GPUs, fp32 on CPU)",
    )
    p.add_argument(
        "--resolution", type=_positive_int, help="image size in pixels (default: the generator's own)"
    )
    p.add_argument(
        "--family",
        choices=("sd-turbo", "sd1", "sd2"),
        help="generator family for the default steps/guidance (default: read from the pipeline's config)",
    )
    p.add_argument(
        "--steps", type=_positive_int, help="denoising steps (default per family: SD-Turbo 1, SD 1.x/2.x 30)"
    )
    p.add_argument(
        "--guidance", type=_float, help="guidance scale (default per family: SD-Turbo 0, SD 1.x/2.x 7)"
    )
    p.add_argument(
        "--grad-steps", type=_positive_int, default=1, help="last denoising steps with gradient (default 1)"
    )
    p.add_argument("--batch", type=_positive_int, help="seeds per update (default 4 on GPU, 2 on CPU)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per update (default 1)")
    p.add_argument("--lr", type=_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument(
        "--max-updates", type=_positive_int, default=50, help="most updates per class (default 50)"
    )
    p.add_argument(
        "--stop-accuracy", type=_fraction, default=0.7, help="stop at this batch accuracy (default 0.7)"
    )
    p.add_argument(
        "--stop-prob",
        type=_prob_or_off,
        default=0.0,
        help="with validation seeds, also require their mean target probability to reach this before "
        "stopping (default 0: off; the demo uses 0.9)",
    )
    p.add_argument(
        "--patience",
        type=_nonneg_int,
        default=20,
        help="restart (see --restart-words) or stop a class when its best validation loss has not improved "
        "for this many updates (default 20; 0: off)",
    )
    p.add_argument(
        "--fixed-seeds",
        dest="fresh_seeds",
        action="store_false",
        help="the paper's fixed inversion seeds instead of fresh seeds at every update (default: fresh)",
    )
    p.add_argument("--fresh-seeds", dest="fresh_seeds", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--val-seeds",
        type=_nonneg_int,
        default=8,
        help="fixed validation seeds that decide the kept token, the accuracy stop and patience "
        "(default 8; 0: decide on each update's own batch)",
    )
    p.add_argument(
        "--eval-every", type=_positive_int, default=2, help="updates between validations (default 2)"
    )
    p.add_argument(
        "--restart-words",
        default="the",
        metavar="W1,W2",
        help="when patience runs out, restart from these words in turn, keeping the best token "
        "(default 'the'; '' for none)",
    )
    p.add_argument(
        "--max-norm",
        type=_float,
        default=2.0,
        help="keep the token's norm at most this many times the vocabulary's mean norm (default 2; 0: no limit)",
    )
    p.add_argument("--init-word", default="a", help="one-token word the token starts from (default 'a')")
    p.add_argument(
        "--template",
        action="append",
        dest="templates",
        metavar="TEXT",
        help="inversion prompt with {} for '<tok> class' (repeatable; default: the paper's three)",
    )
    p.add_argument(
        "--context",
        action="append",
        dest="contexts",
        metavar="TEXT",
        help="generation context with {} for the subject (repeatable; default: photo, statue, snow)",
    )
    p.add_argument(
        "--n-images", type=_positive_int, default=16, help="seeds per context and variant (default 16)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="first inversion seed; grids use seed+1000... (default 0)"
    )
    p.add_argument(
        "--snapshot-every", type=_positive_int, default=5, help="evolution snapshot period in updates"
    )
    p.add_argument(
        "--grad-checkpointing", action="store_true", help="trade compute for memory in the UNet/VAE"
    )
    p.add_argument(
        "--tagger",
        help="CLIP for attribute tags: open_clip ARCH/TAG, hf:ORG/MODEL, world[:PATH] or none "
        "(default ViT-B-32/laion2b_s34b_b79k)",
    )
    p.add_argument(
        "--attributes",
        metavar="FILE",
        help='attribute vocabulary JSON (replaces the shipped one; "mode": "extend" adds)',
    )
    p.add_argument(
        "--holdout-classifier", metavar="NAME", help="a second classifier that scores the same images"
    )
    p.add_argument(
        "--alpha", type=_fraction, default=0.05, help="false discovery rate of findings (default 0.05)"
    )
    p.add_argument(
        "--min-effect",
        type=_fraction,
        default=0.25,
        help="smallest token-minus-baseline attribute rate to flag",
    )
    p.add_argument(
        "--confirm",
        choices=("all", "flagged"),
        default="all",
        help="counterfactual check of every vocabulary attribute of each class (all: also finds biases the "
        "token did not bring in) or only of the token's flagged ones (cheaper); default all",
    )
    p.add_argument(
        "--confirm-seeds",
        type=int,
        default=8,
        help="seeds per counterfactual prompt, paired across prompts (default 8)",
    )
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="audit only the K-th of N disjoint class subsets into the run folder (job arrays); "
        "then `dct-audit finish RUN_DIR` analyses all classes",
    )
    p.add_argument(
        "--explain-images",
        type=int,
        default=4,
        help="token images per class with captum attributions (default 4)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run folder made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    # classes -----------------------------------------------------------------------------------
    p = sub.add_parser("classes", help="list a classifier's classes matching a query (loads no weights)")
    p.add_argument("--classifier", required=True)
    p.add_argument("--labels")
    p.add_argument("query", nargs="?", help="name, fragment or index; omit to list all")

    # compare -----------------------------------------------------------------------------------
    p = sub.add_parser("compare", help="compare two classifiers' learned concepts class by class")
    p.add_argument("runs", nargs="*", metavar="RUN", help="two finished run folders (or use --classifiers)")
    p.add_argument("--classifiers", help="A,B: run both (resuming what is finished), then compare")
    p.add_argument("--classes", help="with --classifiers: the classes to audit")
    p.add_argument("--generator", help="with --classifiers: the generator (default stabilityai/sd-turbo)")
    p.add_argument("--tagger", help="with --classifiers: the tagger")
    p.add_argument("--labels", help="with --classifiers: labels file for file: classifiers")
    p.add_argument("--out", help="compare folder (default beside the first run)")
    p.add_argument("--alpha", type=_fraction, default=0.05)
    p.add_argument("--min-effect", type=_fraction, default=0.25)
    p.add_argument(
        "--no-cross-score", action="store_true", help="skip scoring each run's images by the other classifier"
    )

    # finish ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "finish",
        help="analyse and report a run whose classes were audited by `run --shard K/N` jobs",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--alpha", type=_fraction, default=None, help="as for run (default: the run's)")
    p.add_argument("--min-effect", type=_fraction, default=None, help="as for run (default: the run's)")
    p.add_argument(
        "--confirm", choices=("all", "flagged"), default=None, help="as for run (default: the run's)"
    )
    p.add_argument("--confirm-seeds", type=int, default=None, help="as for run (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    # verify ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "verify", help="check a run folder: which classes are finished and intact (loads no model)"
    )
    p.add_argument("run_dir")

    # demo --------------------------------------------------------------------------------------
    p = sub.add_parser("demo", help="the whole audit offline on the bundled planted-bias world")
    p.add_argument("--out", default="reports", help="parent folder of the demo's runs (default reports/)")
    p.add_argument("--no-compare", action="store_true", help="audit the biased classifier only")
    p.add_argument(
        "--classifier",
        default=None,
        metavar="FOLDER",
        help="audit this world classifier folder (e.g. trained by `python -m dct_audit.world.classifiers "
        "--planted SPEC --out DIR`) with the demo's settings, no comparison, and score its confirmed findings "
        "against the planted set in its training.json (writes truth.json)",
    )
    p.add_argument("--quiet", action="store_true")

    # report ------------------------------------------------------------------------------------
    p = sub.add_parser("report", help="render a run folder to HTML again (loads no model)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.add_argument("--self-contained", action="store_true", help="one HTML file with every image embedded")

    # download ----------------------------------------------------------------------------------
    p = sub.add_parser("download", help="prefetch weights into the local caches for offline runs")
    p.add_argument("--generator")
    p.add_argument("--classifier")
    p.add_argument("--tagger", help="open_clip ARCH/TAG, e.g. ViT-B-32/laion2b_s34b_b79k")
    return parser


def _cmd_run(args) -> int:
    from .adapters.generator import DEFAULT_GENERATOR
    from .pipeline import RunOptions, run_with_options
    from .tag import DEFAULT_TAGGER

    kwargs = {
        k: getattr(args, k)
        for k in (
            "labels",
            "out",
            "name",
            "device",
            "dtype",
            "resolution",
            "family",
            "steps",
            "guidance",
            "grad_steps",
            "batch",
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
            "grad_checkpointing",
            "overwrite",
            "quiet",
            "attributes",
            "alpha",
            "min_effect",
            "explain_images",
            "confirm",
            "confirm_seeds",
            "holdout_classifier",
            "shard",
        )
    }
    kwargs["generator"] = args.generator or DEFAULT_GENERATOR
    tagger = args.tagger or DEFAULT_TAGGER
    kwargs["tagger"] = None if tagger.lower() == "none" else tagger
    if args.templates:
        kwargs["templates"] = tuple(args.templates)
    if args.contexts:
        kwargs["contexts"] = tuple(args.contexts)
    kwargs["restart_words"] = tuple(w.strip() for w in args.restart_words.split(",") if w.strip())
    result = run_with_options(RunOptions(classifier=args.classifier, classes=args.classes, **kwargs))
    for c in result.classes:
        print(
            f"{c['name']} ({c['index']}): token accuracy {c['token_accuracy']:.2f} vs baseline {c['baseline_accuracy']:.2f}, "
            f"{c['updates']} updates ({c['stop_reason']}), {c['timings']['total_s']:.1f} s"
        )
    _print_findings(result.findings)
    print(f"run folder: {result.run_dir}")
    if args.shard:
        print(f"shard {args.shard} finished; when every shard is done: dct-audit finish {result.run_dir}")
    if result.report:
        print(f"report: {result.report}")
    return 0


def _cmd_finish(args) -> int:
    from .pipeline import finish_run

    overrides = {
        k: getattr(args, k)
        for k in ("alpha", "min_effect", "confirm", "confirm_seeds")
        if getattr(args, k) is not None
    }
    result = finish_run(args.run_dir, device=args.device, quiet=args.quiet, **overrides)
    _print_findings(result.findings)
    print(f"{len(result.classes)} classes analysed: {result.run_dir}")
    if result.report:
        print(f"report: {result.report}")
    return 0


def _cmd_classes(args) -> int:
    from .adapters.classifier import describe_classifier
    from .resolve import search_classes

    _, labels = describe_classifier(args.classifier, args.labels)
    hits = search_classes(args.query, labels)
    if not hits:
        from .resolve import match_query

        match_query(args.query, labels)  # raises with the closest names
    for i in hits:
        names = labels.synonyms[i]
        extra = f"  ({', '.join(names[1:])})" if len(names) > 1 else ""
        print(f"{i:5d}  {labels.names[i]}{extra}")
    return 0


def _cmd_compare(args) -> int:
    from .compare import compare

    if args.classifiers:
        if args.runs:
            raise DctAuditError("give either two RUN folders or --classifiers A,B with --classes, not both")
        names = [c.strip() for c in args.classifiers.split(",") if c.strip()]
        if len(names) != 2 or not args.classes:
            raise DctAuditError("--classifiers needs exactly two names (A,B) and --classes")
        from . import pipeline

        extra = {
            k: v
            for k, v in {"generator": args.generator, "tagger": args.tagger, "labels": args.labels}.items()
            if v
        }
        runs = [pipeline.run(n, args.classes, **extra).run_dir for n in names]
    elif len(args.runs) == 2:
        runs = args.runs
    else:
        raise DctAuditError(
            "compare needs two run folders (dct-audit compare RUN_A RUN_B) or --classifiers A,B --classes ..."
        )
    result = compare(
        runs[0], runs[1], args.out, args.alpha, args.min_effect, cross_score=not args.no_cross_score
    )
    for f in result.flagged:
        print(
            f"  {f['class_name']}: '{f['attribute']}' in {f['rate_a']:.0%} of A's token images vs {f['rate_b']:.0%} of B's "
            f"(q={f['q_value']:.2g})"
        )
    print(
        f"compared {len(result.classes)} classes, {len(result.flagged)} attribute differences flagged: {result.out_dir}"
    )
    return 0


def _print_findings(findings: list[dict]) -> None:
    for f in findings:
        cf = f.get("counterfactual") or {}
        if f.get("confirmed"):
            verdict = (
                f"confirmed: the classifier depends on it (smallest change {cf.get('diff', 0):.2f}, "
                f"interval from {cf.get('ci_low', 0):.2f})"
            )
        elif f.get("absence"):
            verdict = "an absence: the token removes other contexts, not a bias of this class"
        elif cf:
            verdict = (
                f"not confirmed: replaced by '{cf.get('worst_replacement', 'its opposite')}' the target probability "
                f"changes by {cf.get('diff', 0):.2f}"
            )
        else:
            verdict = "not checked by a counterfactual"
        if f.get("source") == "sweep":
            seen = f"the token did not bring it in ({f['token_rate']:.0%} vs {f['baseline_rate']:.0%} at baseline)"
        else:
            seen = (
                f"in {f['token_rate']:.0%} of token images vs {f['baseline_rate']:.0%} at baseline "
                f"(q={f['q']:.2g})"
            )
        print(f"  finding: {f['class_name']}: '{f['attribute']}' {seen}; {verdict}")


def _cmd_demo(args) -> int:
    from .demo import audit_world_classifier, demo
    from .world.truth import format_score

    if args.classifier:
        result = audit_world_classifier(args.classifier, args.out, quiet=args.quiet)
        run = result["run"]
        _print_findings(run.findings)
        print(f"{len(run.findings)} finding(s); report: {run.report}")
        if result["truth"] is None:
            print(f"{args.classifier}/training.json records no planted set: nothing to score")
        else:
            print(format_score(result["truth"]) + f"; {Path(run.run_dir) / 'truth.json'}")
        return 0
    result = demo(args.out, compare_unbiased=not args.no_compare, quiet=args.quiet)
    biased = result["biased"]
    _print_findings(biased.findings)
    print(f"biased classifier: {len(biased.findings)} finding(s); report: {biased.report}")
    if result.get("truth"):
        print(format_score(result["truth"]))
    if "unbiased" in result:
        print(
            f"unbiased classifier: {len(result['unbiased'].findings)} finding(s); report: {result['unbiased'].report}"
        )
        print(
            f"comparison: {len(result['compare'].flagged)} flagged attribute difference(s); "
            f"report: {result['compare'].out_dir / 'compare_index.html'}"
        )
    print(f"demo finished in {result['seconds']['total']:.0f} s")
    return 0


def _cmd_verify(args) -> int:
    from . import rundir

    root = Path(args.run_dir)
    run = rundir.RunDir(root)
    manifest = run.read_manifest()
    if manifest is None:
        raise DctAuditError(f"'{root}' is not a dct-audit run folder (no manifest.json)")
    classes = manifest.get("classes") or []
    if not isinstance(classes, list) or not all(
        isinstance(c, dict) and "index" in c and "name" in c for c in classes
    ):
        raise DctAuditError(f"{run.manifest_path} lists no valid classes; rerun the audit with --overwrite")
    bad = 0
    for c in classes:
        state, detail = run.verify_class(int(c["index"]), str(c["name"]))
        bad += state != "done"
        print(f"{state:10s} {int(c['index']):5d} {c['name']}: {detail}")
    for name in (rundir.ENRICHMENT, rundir.FINDINGS):
        print(f"{'present' if (root / name).is_file() else 'missing':10s} {name}")
    print(
        f"{len(classes) - bad}/{len(classes)} classes finished and intact"
        + ("" if not bad else "; run the same `dct-audit run` command to redo the others")
    )
    return 0 if not bad else 1


def _cmd_report(args) -> int:
    from .report import render_report

    print(f"report: {render_report(args.run_dir, args.out, args.self_contained)}")
    return 0


def _cmd_download(args) -> int:
    from .download import download

    download(generator=args.generator, classifier=args.classifier, tagger=args.tagger)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {
        "run": _cmd_run,
        "classes": _cmd_classes,
        "report": _cmd_report,
        "compare": _cmd_compare,
        "demo": _cmd_demo,
        "download": _cmd_download,
        "verify": _cmd_verify,
        "finish": _cmd_finish,
    }
    try:
        return handlers[args.command](args)
    except DctAuditError as e:
        print(f"dct-audit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "dct-audit: interrupted; finished classes are kept, run the same command to resume",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # `dct-audit classes ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
