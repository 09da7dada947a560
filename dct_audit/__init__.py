"""dct-audit: what has this image classifier really learned? Discriminative class tokens as an audit."""

__version__ = "0.1.0"

from .errors import DctAuditError  # noqa: E402


def run(classifier: str, classes, **kwargs):
    """Audit classes of a classifier; see :func:`dct_audit.api.run`."""
    from .api import run as _run

    return _run(classifier, classes, **kwargs)


__all__ = ["DctAuditError", "__version__", "run"]
