"""The ``dct-audit`` command line: parses arguments and calls the Python API, nothing more.

Every user error becomes one line on stderr and exit code 2.

Why it is over 450 lines: nine commands, each a parser and a printer of its results; the run flags themselves
are derived from ``options.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import DctAuditError
from .options import ANALYSIS_OPTIONS, add_run_arguments, options_from_args, positive_int


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
    add_run_arguments(p)  # one flag per RunOptions field: defaults and help live in options.py

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
    add_run_arguments(p, only=("alpha", "min_effect"))
    p.add_argument(
        "--no-cross-score", action="store_true", help="skip scoring each run's images by the other classifier"
    )

    # finish ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "finish",
        help="analyse and report a run whose classes were audited by `run --shard K/N` jobs",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    add_run_arguments(p, only=("device", "quiet"))
    add_run_arguments(p, only=ANALYSIS_OPTIONS, override="as for run (default: the run's)")

    # discover ----------------------------------------------------------------------------------
    p = sub.add_parser(
        "discover",
        help="open-vocabulary discovery on a finished run: concepts of a long list the token brings in",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--concepts", metavar="FILE", help="one concept per line (concept<TAB>definition); default WordNet"
    )
    p.add_argument(
        "--concept-template",
        default="a photo of {}",
        help="the tagger's prompt for a concept (default 'a photo of {}')",
    )
    p.add_argument(
        "--top-k",
        type=positive_int,
        default=10,
        help="concepts per class tested on held-out seeds (default 10)",
    )
    add_run_arguments(p, only=("alpha",), override="false discovery rate (default: the run's)")
    p.add_argument(
        "--discover-with",
        default="{} with {}",
        help="counterfactual prompt: the class, then the concept (default '{} with {}')",
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip the counterfactual check (generates no image)"
    )
    add_run_arguments(p, only=("device", "quiet"))

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
        "--planted SPEC --out DIR`) with the demo's settings and the thorough check, no comparison, and score its "
        "confirmed findings against the planted set in its training.json (writes truth.json)",
    )
    p.add_argument(
        "--thorough",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the counterfactual check adjusted for what else the generator drew, on 8 seeds then 32 for the "
        "attributes the 8 leave open (--confirm-max-seeds 32 --adjust): more planted biases confirmed at the same "
        "precision on the truth benchmark (200/218 vs 168/218 relied-on on twenty-two fresh seeds), about 3x the check's "
        "images; and a class whose token did not reach the stop learned a second time (--attempts 2); "
        "default: on with --classifier, off for the shipped demo (its 180 s budget)",
    )
    add_run_arguments(  # the flags a class page names for a token that did not reach the stop
        p,
        only=("attempts", "objective"),
        override="as for run (default: the demo's, meanprob and one attempt; two with --thorough)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the demo's runs in --out that were made with other settings (an earlier version's, "
        "or with other --thorough, --attempts or --objective)",
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
    p.add_argument("--classifier", action="append", help="repeatable: a classifier and its held-out one")
    p.add_argument("--tagger", help="open_clip ARCH/TAG, e.g. ViT-B-32/laion2b_s34b_b79k")
    return parser


def _cmd_run(args) -> int:
    from .pipeline import run_with_options
    from .rundir import retry_flags, token_not_learned

    options = options_from_args(args)
    result = run_with_options(options)
    for c in result.classes:
        line = (
            f"{c['name']} ({c['index']}): token accuracy {c['token_accuracy']:.2f} vs baseline {c['baseline_accuracy']:.2f}, "
            f"{c['updates']} updates ({c['stop_reason']}), {c['timings']['total_s']:.1f} s"
        )
        if token_not_learned(c):
            retry = retry_flags(c, {"objective": options.objective})
            line += "; the token did not learn the class" + (f" (try {retry})" if retry else "")
        print(line)
    _print_findings(result.findings)
    if result.findings:
        print(_count(result.findings))
    print(f"run folder: {result.run_dir}")
    if args.shard:
        print(f"shard {args.shard} finished; when every shard is done: dct-audit finish {result.run_dir}")
    if result.report:
        print(f"report: {result.report}")
    return 0


def _cmd_finish(args) -> int:
    from .pipeline import finish_run

    overrides = {k: getattr(args, k) for k in ANALYSIS_OPTIONS if getattr(args, k, None) is not None}
    result = finish_run(args.run_dir, device=args.device, quiet=args.quiet, **overrides)
    _print_findings(result.findings)
    print(f"{len(result.classes)} classes analysed, {_count(result.findings)}: {result.run_dir}")
    if result.report:
        print(f"report: {result.report}")
    return 0


def _cmd_discover(args) -> int:
    from .discover import discover_run
    from .report import render_report

    table = discover_run(
        args.run_dir,
        args.concepts,
        concept_template=args.concept_template,
        top_k=args.top_k,
        alpha=args.alpha,
        with_template=args.discover_with,
        check=not args.no_check,
        device=args.device,
        quiet=args.quiet,
    )
    for r in table[table["significant"]].itertuples():
        verdict = "confirmed" if r.confirmed else "not confirmed" if not args.no_check else "not checked"
        print(
            f"  discovered: {r.class_name}: '{r.concept}' (rank {r.rank}; token image closer in {r.wins}/{r.n_pairs} "
            f"held-out pairs, q={r.q_value:.2g}); {verdict}"
        )
    n = int(table["significant"].sum())
    checked = (
        "not checked (--no-check)"
        if args.no_check
        else f"{int(table['confirmed'].sum())} confirmed by the counterfactual check (the findings)"
    )
    print(  # significance alone is weak evidence: a token moves its images (README "Reading a discovered finding")
        f"{len(table)} concept(s) tested, {n} closer to the token's images on held-out seeds (not a finding by "
        f"itself), {checked}: {args.run_dir}/discovered.csv"
    )
    print(f"report: {render_report(args.run_dir)}")
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
        from .adapters import hub
        from .adapters.classifier import describe_classifier
        from .api import run
        from .options import RunOptions
        from .records import not_cached
        from .resolve import resolve_classes

        extra = {
            k: v
            for k, v in {"generator": args.generator, "tagger": args.tagger, "labels": args.labels}.items()
            if v
        }
        # B's name, its classes and both classifiers' weights, before A's audit (hours on real models)
        resolved = [
            [
                (c.index, c.name)
                for c in resolve_classes(args.classes, describe_classifier(n, args.labels)[1])[0]
            ]
            for n in names
        ]
        if resolved[0] != resolved[1]:
            raise DctAuditError(
                f"--classes {args.classes} names other classes in {names[0]} ({resolved[0][:3]}) than in {names[1]} "
                f"({resolved[1][:3]}): compare classifiers that share a label list"
            )
        opts = RunOptions(classifier=names[0], classes=args.classes, **extra)
        models = [
            *(("--classifier", n) for n in names),
            ("--generator", opts.generator),
            ("--tagger", opts.tagger),
        ]
        hub.require_downloadable(not_cached(models))
        runs = [run(n, args.classes, **extra).run_dir for n in names]
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


def _count(findings: list[dict]) -> str:
    """The count line of a run's findings, e.g. "12 finding(s): 3 confirmed, 2 open"."""
    confirmed = sum(bool(f.get("confirmed")) for f in findings)
    undecided = sum(bool(f.get("open")) and not f.get("confirmed") for f in findings)
    return f"{len(findings)} finding(s): {confirmed} confirmed, {undecided} open"


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
        elif (assoc := cf.get("association")) and not assoc.get("associated"):
            verdict = (
                f"not confirmed: the classifier depends on it for these images (smallest change {cf.get('diff', 0):.2f}), "
                f"but drawn with other classes it does not raise this class (smallest change {assoc.get('diff', 0):.2f}, "
                f"interval {assoc.get('ci_low', 0):.2f} to {assoc.get('ci_high', 0):.2f}): how the generator draws this "
                "class with it, not an association learned from data"
            )
        elif f.get("open"):
            verdict = (
                f"open: every replacement lowers the target probability (smallest change {cf.get('diff', 0):.2f}, "
                f"interval {cf.get('ci_low', 0):.2f} to {cf.get('ci_high', 0):.2f} on {cf.get('n', 0)} seeds), "
                "too few to confirm or rule out a change of 0.10; more seeds (--confirm-max-seeds) may decide it"
            )
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
    from .demo import THOROUGH, audit_world_classifier, demo
    from .world.truth import format_score

    given = {k: getattr(args, k) for k in ("attempts", "objective") if getattr(args, k) is not None}
    if args.classifier:
        thorough = args.thorough is not False
        result = audit_world_classifier(
            args.classifier, args.out, quiet=args.quiet, thorough=thorough, overwrite=args.overwrite, **given
        )
        run = result["run"]
        _print_findings(run.findings)
        print(f"{_count(run.findings)}; report: {run.report}")
        if result["truth"] is None:
            print(f"{args.classifier}/training.json records no planted set: nothing to score")
        else:
            print(format_score(result["truth"]) + f"; {Path(run.run_dir) / 'truth.json'}")
        return 0
    settings = {**(THOROUGH if args.thorough else {}), **given}
    result = demo(
        args.out, compare_unbiased=not args.no_compare, quiet=args.quiet, overwrite=args.overwrite, **settings
    )
    biased = result["biased"]
    _print_findings(biased.findings)
    print(f"biased classifier: {_count(biased.findings)}; report: {biased.report}")
    if result.get("truth"):
        print(format_score(result["truth"]))
    if "unbiased" in result:
        print(
            f"unbiased classifier: {_count(result['unbiased'].findings)}; report: {result['unbiased'].report}"
        )
        print(
            f"comparison: {len(result['compare'].flagged)} flagged attribute difference(s); "
            f"report: {result['compare'].out_dir / 'compare_index.html'}"
        )
    print(f"demo finished in {result['seconds']['total']:.0f} s")
    return 0


def _cmd_verify(args) -> int:
    from . import rundir
    from .report.readers import read_enrichment, read_findings

    root = Path(args.run_dir)
    run = rundir.RunDir(root)
    manifest = run.read_manifest()
    if manifest is None:
        raise DctAuditError(f"'{root}' is not a dct-audit run folder (no manifest.json)")
    bad = 0
    for c in manifest.classes:
        state, detail = run.verify_class(c.index, c.name)
        bad += state != "done"
        print(f"{state:10s} {c.index:5d} {c.name}: {detail}")
    analysed = True  # a run with a tagger ends with its analysis files, and they must be readable
    for name in (rundir.ENRICHMENT, rundir.FINDINGS):
        state = "present" if (root / name).is_file() else "missing"
        if state == "present":
            try:
                (read_findings if name == rundir.FINDINGS else read_enrichment)(root)
            except DctAuditError:
                state = "broken"
        analysed &= state == "present"
        print(f"{state:10s} {name}")
    print(
        f"{len(manifest.classes) - bad}/{len(manifest.classes)} classes finished and intact"
        + ("" if not bad else "; run the same `dct-audit run` command to redo the others")
    )
    if manifest.tagging is not None and not analysed and not bad:
        print(f"the analysis is missing or broken: run `dct-audit finish {root}`")
    return 0 if not bad and (analysed or manifest.tagging is None) else 1


def _cmd_report(args) -> int:
    import json

    from .report import render_report

    path = render_report(args.run_dir, args.out, args.self_contained)
    print(f"report: {path}")
    rows = json.loads((path.parent / "report.json").read_text())["classes"]
    for r in (r for r in rows if r["status"] == "broken"):  # listed as broken on the index, said here too
        print(f"class {r['name']} is broken ({r['note']})")
    return 0


def _cmd_download(args) -> int:
    from .download import download

    download(generator=args.generator, classifier=args.classifier, tagger=args.tagger)
    return 0


def disk_error(e: OSError) -> str:
    """One line for a failed read or write: what failed, where, and what to do."""
    import errno

    where = f" '{e.filename}'" if e.filename else ""
    if e.errno == errno.ENOSPC:
        fix = "free some disk space or choose another --out, then run the same command again (finished classes are kept)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "no permission to write there: fix the permissions or choose another folder"
    elif e.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        fix = "a file stands where a folder should be (or the reverse): move it away or choose another folder"
    else:
        fix = "fix it and run the same command again (finished classes are kept)"
    return f"{e.strerror or e}{where}; {fix}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {
        "run": _cmd_run,
        "classes": _cmd_classes,
        "discover": _cmd_discover,
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
    except BrokenPipeError:  # `dct-audit classes ... | head`; before OSError, of which it is a kind
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the disk, not the code: full, read-only, a file where a folder should be
        print(f"dct-audit: error: {disk_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "dct-audit: interrupted; finished classes are kept, run the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
