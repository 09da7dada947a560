"""Captions of the generator's training scenes: full scenes.py captions and partial ones, in several phrasings.

An attribute left out of a caption is unspecified, so the generator learns to draw it at random: what the
audit's plain "a photo of <tok> star" baseline needs.
"""

from __future__ import annotations

import numpy as np

from dct_audit.world import scenes as S

PREFIXES = (
    "",
    "a photo of ",
    "a picture of ",
    "a high resolution realistic image of ",
    "a close-up photo of ",
)
BACKGROUND_ALT = {
    "plain": "on a plain background",
    "water": "in the water",
    "grass": "in the grass",
    "snow": "in the snow",
    "stripes": "on a striped background",
    "brick": "by a brick wall",
}
SILENT_ON_NONE = tuple(k for k in range(S.N_PHRASINGS) if "{ctx_with}" not in S.PHRASINGS[k])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(
    names: dict[str, str], rng: np.random.Generator, keep: float = 1.0, token: str | None = None
) -> str:
    """A short caption naming the shape and each other attribute with probability ``keep``.

    An attribute left out is unspecified (the model learns it is random); context "none" is said as
    "alone". ``token`` replaces the article ("a photo of <x> red star"), as a learned token does.
    """
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    noun = names["shape"]
    if rng.random() < keep:
        noun = f"{names['colour']} {noun}"
    head = f"{prefix}{token or _article(noun)} {noun}"
    tail = []
    if rng.random() < keep:
        ctx = names["context"]
        tail.append("alone" if ctx == "none" else S.CONTEXT_ON[ctx])
    if rng.random() < keep:
        bg = names["background"]
        tail.append(BACKGROUND_ALT[bg] if rng.random() < 0.3 else S.BACKGROUND_ON[bg])
    if len(tail) == 2 and rng.random() < 0.5:
        tail.reverse()
    sep = ", " if rng.random() < 0.5 else " "
    return sep.join([head, *tail])


def full_caption(names: dict[str, str], rng: np.random.Generator) -> str:
    """A scenes.py caption in a random phrasing that states every attribute (context "none" included)."""
    choices = range(S.N_PHRASINGS)
    if names["context"] == "none":  # some phrasings say nothing for "none": that must mean "unspecified"
        choices = [k for k in choices if k not in SILENT_ON_NONE]
    return S.caption(**names, phrasing=int(rng.choice(list(choices))))


def training_caption(
    names: dict[str, str],
    rng: np.random.Generator,
    dropout: float = 0.1,
    full: float = 0.5,
    keep: float = 0.7,
) -> str:
    """The caption a training scene gets: empty (``dropout``), a full caption (``full``) or a partial one."""
    u = rng.random()
    if u < dropout:
        return ""
    if u < dropout + full:
        return full_caption(names, rng)
    return describe(names, rng, keep)
