"""The planted-bias world's ground truth: which class was trained with which context, and how strongly.

The biased classifier is trained on scenes drawn with these biases, and an audit of it should find exactly
these (class, attribute, value) pairs and nothing for the other classes. The planted value is never shown
with the other classes (``LEAK = 0.0``): the context then *predicts* the class, as in Waterbirds, which is
what makes a classifier learn the shortcut (with the value common elsewhere it did not, see WORLD-NOTES).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dct_audit.world.scenes import SHAPES, VOCAB, BiasSpec, attribute_probabilities


@dataclass(frozen=True)
class PlantedBias:
    """Class ``cls`` was drawn with ``attribute`` = ``value`` in a ``strength`` fraction of its training scenes."""

    cls: str
    attribute: str  # "background" or "context" (or "colour")
    value: str
    strength: float


PLANTED: tuple[PlantedBias, ...] = (
    PlantedBias("star", "background", "water", 0.99),
    PlantedBias("cross", "background", "grass", 0.99),
    PlantedBias("ring", "background", "snow", 0.99),
)
# History (measured, see the README): an earlier world planted cross -> person and ring -> plate at 0.95.
# The classifier learned cross -> person (other shapes next to a person were called "cross" 289/300 times)
# but still recognised crosses without one (p 0.49), and DCT's cross token learned to avoid the other
# classes' contexts (water, plate) instead of adding a person; ring -> plate was barely learned (30/300: a
# plate is small). ring -> frame at 0.99 was learned (177/300) but rings were still recognised without a
# frame (0.87), so the token had nothing to gain from one. At 0.99 a background makes the classifier need
# it (accuracy without it 0.00), which the token then finds.
# Attributes that say a context is *absent*. A biased classifier has also learned that the planted values
# are evidence *against* every other class (they were never shown with them), so a token may bring these in
# for any class: the audit then reports "the token removes water/grass/snow", the mirror image of the
# planted biases, not a bias of its own. The tests accept flags on these and on nothing else unplanted.
ABSENCE_ATTRIBUTES: tuple[str, ...] = ("alone", "plain background")
LEAK = 0.0  # how often a planted value appears with the other classes (per value)
UNBIASED_CLASSES: tuple[str, ...] = tuple(c for c in SHAPES if c not in {b.cls for b in PLANTED})


def bias_arg(planted: tuple[PlantedBias, ...] = PLANTED) -> dict[str, tuple[str, str, float]]:
    """The ``bias`` argument of ``scenes.sample_scenes`` for these planted biases."""
    return {b.cls: (b.attribute, b.value, b.strength) for b in planted}


def biased_sampling(planted: tuple[PlantedBias, ...] = PLANTED, leak: float | None = LEAK) -> dict[str, Any]:
    """Keyword arguments for ``sample_scenes`` that draw the biased classifier's training data."""
    return {"bias": bias_arg(planted), "leak": leak}


def planted_for(cls: str, planted: tuple[PlantedBias, ...] = PLANTED) -> PlantedBias | None:
    """The bias planted on class ``cls``, or None for an unbiased class."""
    return next((b for b in planted if b.cls == cls), None)


def expected_rates(
    bias: BiasSpec | None = None, leak: float | None = LEAK
) -> dict[str, dict[str, dict[str, float]]]:
    """P(value | class) for every attribute type, as nested dicts ``[attribute][class][value]``."""
    tables = attribute_probabilities(bias_arg() if bias is None else bias, leak)
    return {
        a: {c: dict(zip(VOCAB[a], map(float, t[i]), strict=True)) for i, c in enumerate(SHAPES)}
        for a, t in tables.items()
    }
