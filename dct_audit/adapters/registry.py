"""One registry of adapter plugins: taggers, classifiers and generators from other packages, by spec prefix.

A plugin is ``"module:function"``, imported only when a spec asks for it. ``--tagger PREFIX`` or
``--tagger PREFIX:ARG`` (likewise ``--classifier`` and ``--generator``) then loads through it:

- tagger: ``function(spec, device) -> dct_audit.tag.Tagger``
- classifier: ``function(spec, device, labels_file) -> dct_audit.adapters.classifier.Classifier``
- generator: ``function(spec, device, dtype) -> dct_audit.adapters.generator.Generator``

A plugin checks its own spec when it loads (one ``DctAuditError`` line on bad input). The core registers
nothing of the world but this one entry: the world CLIP as ``--tagger world``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

KINDS = ("tagger", "classifier", "generator")
PLUGINS: dict[str, dict[str, str]] = {
    "tagger": {"world": "dct_audit.world.clip:load_world_tagger"},
    "classifier": {},
    "generator": {},
}


def register(kind: str, prefix: str, target: str) -> None:
    """Make specs ``PREFIX`` and ``PREFIX:ARG`` of ``kind`` load through ``target`` ("module:function")."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if not prefix or ":" in prefix or "/" in prefix:
        raise ValueError(f"a plugin prefix is a plain name (no ':' or '/'), not {prefix!r}")
    module, sep, name = target.partition(":")
    if not (module and sep and name):
        raise ValueError(f"a plugin target is 'module:function', not {target!r}")
    PLUGINS[kind][prefix] = target


def matches(kind: str, spec: str) -> bool:
    """Whether a registered plugin of ``kind`` serves ``spec`` (nothing is imported)."""
    return any(spec == p or spec.startswith(p + ":") for p in PLUGINS[kind])


def find(kind: str, spec: str) -> Callable | None:
    """The loader registered for ``spec`` (imported now), or None."""
    for prefix, target in PLUGINS[kind].items():
        if spec == prefix or spec.startswith(prefix + ":"):
            module, _, name = target.partition(":")
            return getattr(importlib.import_module(module), name)
    return None
