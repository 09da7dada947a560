"""Class queries to label indices: ``lobster`` -> American lobster (122), spiny lobster (123).

A query is an index, a full name or a fragment; case-, accent- and punctuation-insensitive (``_`` and
``-`` mean a space, apostrophes are dropped). A query that
equals one of a class's names picks the classes with that name; otherwise a fragment matches every
class with a name containing it as whole words (then as any substring). Several matches are all
audited and listed; none is an error that lists the closest names.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass

from .adapters.classifier import LabelSet
from .errors import DctAuditError

MAX_MATCHES = 25


@dataclass(frozen=True)
class ResolvedClass:
    index: int
    name: str
    query: str


def normalise(text: str, apostrophe: str = "") -> str:
    """Case, accents, ``_``/``-`` and apostrophes do not matter: ``jack o lantern`` is jack-o'-lantern,
    ``potters_wheel`` is potter's wheel, ``cafe`` is café."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"['\u2019`]", apostrophe, text.lower())
    return " ".join(re.sub(r"[_\-\u2010-\u2013]", " ", text).split())


def _forms(name: str) -> list[str]:
    """A class name as queries may spell it: "potters wheel", and "potter s wheel" so that the fragment
    ``potter`` is a whole word of it."""
    return list(dict.fromkeys([normalise(name), normalise(name, " ")]))


def split_queries(classes: str | list[str] | tuple[str, ...]) -> list[str]:
    items = classes.split(",") if isinstance(classes, str) else [str(c) for c in classes]
    items = [c.strip() for c in items]
    if not items or any(not c for c in items):
        raise DctAuditError(
            "--classes has an empty item; give names, fragments or indices separated by commas"
        )
    return items


def match_query(query: str, labels: LabelSet, max_matches: int | None = MAX_MATCHES) -> list[int]:
    """Indices matching one query (possibly several), or an error naming the closest classes."""
    q = normalise(query)
    if re.fullmatch(r"[+-]?\d+", query.strip()):  # before normalise, which reads "-1" as "1"
        i = int(query)
        if not 0 <= i < len(labels):
            raise DctAuditError(
                f"class index {i} is out of range; this classifier has classes 0-{len(labels) - 1}"
            )
        return [i]
    names = [[form for s in syn for form in _forms(s)] for syn in labels.synonyms]
    exact = [i for i, syn in enumerate(names) if q in syn]
    if exact:
        return exact
    word = re.compile(rf"(?<![a-z0-9]){re.escape(q)}(?![a-z0-9])")
    hits = [i for i, syn in enumerate(names) if any(word.search(s) for s in syn)]
    if not hits:
        hits = [i for i, syn in enumerate(names) if any(q in s for s in syn)]
    if not hits:
        flat = {s: i for i, syn in enumerate(names) for s in reversed(syn)}
        close = list(
            dict.fromkeys(flat[c] for c in difflib.get_close_matches(q, list(flat), n=8, cutoff=0.6))
        )[:5]
        hint = (
            "; closest: " + ", ".join(f"{labels.names[i]} ({i})" for i in close)
            if close
            else "; list them with `dct-audit classes --classifier NAME QUERY`"
        )
        raise DctAuditError(f"no class matches '{query}'{hint}")
    if max_matches is not None and len(hits) > max_matches:
        shown = ", ".join(f"{labels.names[i]} ({i})" for i in hits[:5])
        raise DctAuditError(
            f"'{query}' matches {len(hits)} classes ({shown}, ...); be more specific or give indices"
        )
    return hits


def resolve_classes(classes: str | list[str], labels: LabelSet) -> tuple[list[ResolvedClass], list[str]]:
    """Resolve every query; returns the classes (deduplicated, in query order) and notes to print."""
    out: list[ResolvedClass] = []
    notes: list[str] = []
    seen: set[int] = set()
    for query in split_queries(classes):
        hits = match_query(query, labels)
        if len(hits) > 1:
            listed = ", ".join(f"{labels.names[i]} ({i})" for i in hits)
            notes.append(f"'{query}' matches {len(hits)} classes: {listed}; auditing all of them")
        if all(i in seen for i in hits):
            named = ", ".join(f"{labels.names[i]} ({i})" for i in hits)
            notes.append(f"'{query}' names {named} again; each class is audited once")
        for i in hits:
            if i not in seen:
                seen.add(i)
                out.append(ResolvedClass(i, labels.names[i], query))
    return out, notes


def search_classes(query: str | None, labels: LabelSet) -> list[int]:
    """Indices for ``dct-audit classes``: everything for no query, otherwise the matches (empty if none)."""
    if not query:
        return list(range(len(labels)))
    try:
        return match_query(query, labels, max_matches=None)
    except DctAuditError:
        return []
