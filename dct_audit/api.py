"""The Python API's entry point for an audit: ``dct_audit.run``, its arguments checked as the command line
checks its flags, and models given in memory taken out of them (the audit itself: ``pipeline``)."""

from __future__ import annotations

import os

from .adapters.in_memory import models_in_memory
from .errors import DctAuditError
from .options import RunOptions
from .pipeline import RunResult, run_with_options


def run(classifier, classes: str | list[str], *, preprocess=None, **kwargs) -> RunResult:
    """Audit ``classes`` of ``classifier``: a token, paired images and scores per class, in a run folder.

    ``classifier`` is a name (as ``--classifier``) or a model in memory: a torch ``nn.Module`` (a timm
    model carries its preprocessing and, for ImageNet weights, its labels; any other module needs
    ``labels=`` (a list of names or a file) and ``preprocess=`` (a ``Preprocess``)), or a ``Classifier``.
    ``generator=`` and ``tagger=`` also take models in memory: a loaded diffusers pipeline (or a
    ``Generator``) and a ``Tagger`` (``dct_audit.adapters.in_memory``). Other keyword arguments are the
    fields of :class:`RunOptions` (the CLI flags). Finished classes of an existing run with the same
    settings are kept (an in-memory model is the same when its weights, labels and preprocessing hash the
    same); a half-finished class is redone.
    """
    # a notebook's pathlib.Path is the same setting as its string (and the manifest stays JSON)
    classifier = os.fspath(classifier) if isinstance(classifier, os.PathLike) else classifier
    kwargs = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in kwargs.items()}
    check_api_arguments(classes, kwargs)
    generator, tagger = models_in_memory(kwargs)
    if isinstance(classifier, str):
        if preprocess is not None:
            raise DctAuditError("preprocess= is for a classifier given in memory; a named one brings its own")
        opts = RunOptions(classifier=classifier, classes=classes, **kwargs)
        return run_with_options(opts, generator=generator, tagger=tagger)
    from .adapters.in_memory import wrap_classifier

    clf = wrap_classifier(classifier, kwargs.pop("labels", None), preprocess)
    opts = RunOptions(classifier=clf.spec.spec, classes=classes, **kwargs)
    return run_with_options(opts, classifier=clf, generator=generator, tagger=tagger)


def check_api_arguments(classes, kwargs: dict) -> None:
    """The Python API's arguments, checked as the command line's parser checks its flags: one line each."""
    import difflib
    from dataclasses import MISSING, fields

    known = {f.name: f for f in fields(RunOptions)}
    for key, value in kwargs.items():
        if key == "labels":
            continue  # the classifier's labels: checked where the classifier is wrapped or loaded
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            raise DctAuditError(
                f"run() got an unknown argument {key}=" + (f"; did you mean {close[0]}=?" if close else "")
            )
        f = known[key]
        default = f.default if f.default is not MISSING else None
        if f.default_factory is not MISSING:
            default = f.default_factory()
        if value is None or default is None or key in ("generator", "tagger"):
            continue
        kinds = {
            bool: (bool,),
            int: (int,),
            float: (int, float),
            str: (str, os.PathLike),
            tuple: (list, tuple),
        }
        want = kinds.get(type(default))
        if want and (not isinstance(value, want) or (type(default) is not bool and isinstance(value, bool))):
            raise DctAuditError(f"run() argument {key}= must be {type(default).__name__}, not {value!r}")
    if not isinstance(classes, (str, list, tuple)) or not all(isinstance(c, (str, int)) for c in classes):
        raise DctAuditError(
            f"classes= must be a string ('lobster,2') or a list of names and indices, not {classes!r}"
        )
