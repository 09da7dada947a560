"""The planted-bias world's ground truth: which class was trained with which context, and how strongly.

The biased classifier is trained on scenes drawn with these biases, and an audit of it should find exactly
these (class, attribute, value) pairs and nothing for the other classes. The planted value is never shown
with the other classes (``LEAK = 0.0``): the context then *predicts* the class, as in Waterbirds, which is
what makes a classifier learn the shortcut (with the value common elsewhere it did not, see WORLD-NOTES).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dct_audit.world.scenes import SHAPES, VOCAB, BiasSpec, attribute_probabilities

PLANTABLE = ("background", "colour", "context")
# Values that mean "nothing there": planting them would make an absence the class's evidence.
NOT_PLANTABLE = {"background": "plain", "context": "none"}
# The world vocabulary's attribute name of a value (its attributes.json); every other value is its own name.
ATTRIBUTE_NAME = {("background", "plain"): "plain background", ("context", "none"): "alone"}


@dataclass(frozen=True)
class PlantedBias:
    """Class ``cls`` was drawn with ``attribute`` = ``value`` in a ``strength`` fraction of its training scenes."""

    cls: str
    attribute: str  # "background", "colour" or "context"
    value: str
    strength: float

    @property
    def attribute_name(self) -> str:
        """The name of the world vocabulary's attribute that tags this value ("water", "red", "person")."""
        return ATTRIBUTE_NAME.get((self.attribute, self.value), self.value)

    def spec(self) -> str:
        return f"{self.cls}:{self.attribute}:{self.value}@{self.strength:g}"


@dataclass(frozen=True)
class PlantedSet:
    """A set of planted biases plus how often a planted value leaks to the other classes: one world's truth.

    Written as ``CLASS:ATTRIBUTE:VALUE[@STRENGTH]`` items separated by commas
    (``star:background:water@0.99,cross:colour:red``); a classifier trained on it records it in its
    ``training.json``, which is where an audit's scoring reads the truth from.
    """

    biases: tuple[PlantedBias, ...]
    leak: float = 0.0

    @classmethod
    def parse(cls, spec: str, leak: float = 0.0, default_strength: float = 0.99) -> PlantedSet:
        """Parse a spec; a ``ValueError`` names the bad item and what is allowed."""
        items = [t.strip() for t in spec.split(",") if t.strip()]
        if not items:
            raise ValueError(
                "an empty planted set; write CLASS:ATTRIBUTE:VALUE[@STRENGTH], e.g. star:background:water@0.99"
            )
        biases = []
        for item in items:
            body, _, strength = item.partition("@")
            parts = [p.strip().lower() for p in body.split(":")]
            if len(parts) != 3:
                raise ValueError(f"planted item {item!r} is not CLASS:ATTRIBUTE:VALUE[@STRENGTH]")
            try:
                value = float(strength) if strength else default_strength
            except ValueError:
                raise ValueError(f"planted item {item!r}: strength {strength!r} is not a number") from None
            biases.append(PlantedBias(parts[0], parts[1], parts[2], value))
        return cls(tuple(biases), leak).checked()

    def checked(self) -> PlantedSet:
        seen_cls, seen_val = set(), set()
        for b in self.biases:
            if b.cls not in SHAPES:
                raise ValueError(
                    f"planted class {b.cls!r} is not a world class; choose from {', '.join(SHAPES)}"
                )
            if b.attribute not in PLANTABLE:
                raise ValueError(
                    f"planted attribute {b.attribute!r} for {b.cls}: choose from {', '.join(PLANTABLE)}"
                )
            if b.value not in VOCAB[b.attribute] or NOT_PLANTABLE.get(b.attribute) == b.value:
                allowed = [v for v in VOCAB[b.attribute] if v != NOT_PLANTABLE.get(b.attribute)]
                raise ValueError(
                    f"planted {b.attribute} {b.value!r} for {b.cls}: choose from {', '.join(allowed)}"
                )
            if not 0.0 < b.strength <= 1.0:
                raise ValueError(f"planted strength {b.strength:g} for {b.cls}: must be in (0, 1]")
            if b.cls in seen_cls:
                raise ValueError(f"class {b.cls} is planted twice; plant at most one value per class")
            if (b.attribute, b.value) in seen_val:
                raise ValueError(
                    f"{b.attribute} {b.value!r} is planted on two classes; plant each value once"
                )
            seen_cls.add(b.cls)
            seen_val.add((b.attribute, b.value))
        if not 0.0 <= self.leak < 1.0:
            raise ValueError(f"leak {self.leak:g} must be in [0, 1)")
        return self

    def spec(self) -> str:
        return ",".join(b.spec() for b in self.biases)

    def for_class(self, cls: str) -> PlantedBias | None:
        return next((b for b in self.biases if b.cls == cls), None)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(b.cls for b in self.biases)

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments for ``scenes.sample_scenes`` that draw this world's biased training data."""
        return {"bias": {b.cls: (b.attribute, b.value, b.strength) for b in self.biases}, "leak": self.leak}

    def to_dict(self) -> dict:
        return {"spec": self.spec(), "leak": self.leak, "planted": [asdict(b) for b in self.biases]}

    @classmethod
    def from_dict(cls, d: dict) -> PlantedSet:
        """From ``to_dict`` output (or a training.json's ``planted`` list and ``leak``)."""
        items = d.get("planted") or []
        return cls(tuple(PlantedBias(**b) for b in items), float(d.get("leak") or 0.0)).checked()

    @classmethod
    def read(cls, classifier_folder) -> PlantedSet | None:
        """The truth recorded in a world classifier's ``training.json``; None when it records none."""
        import json
        from pathlib import Path

        path = Path(classifier_folder) / "training.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not readable JSON ({e}); retrain the classifier") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} is not a training record (a JSON object); retrain the classifier")
        if "planted" not in record:
            return None
        try:  # a list of {cls, attribute, value, strength} with known values
            return cls.from_dict(record)
        except (TypeError, AttributeError, ValueError) as e:
            raise ValueError(
                f"{path}: its planted set is not valid ({e}); retrain the classifier with "
                "`python -m dct_audit.world.classifiers --planted SPEC --out DIR`"
            ) from None


def random_planted_set(
    rng, n_min: int = 1, n_max: int = 3, strengths=(0.9, 0.99), attributes=PLANTABLE
) -> PlantedSet:
    """A random planted set: 1-3 distinct classes, each with one visible value of a random attribute type."""
    n = int(rng.integers(n_min, n_max + 1))
    classes = rng.choice(len(SHAPES), size=n, replace=False)
    biases, used = [], set()
    for c in classes:
        while True:
            attr = attributes[int(rng.integers(len(attributes)))]
            values = [v for v in VOCAB[attr] if v != NOT_PLANTABLE.get(attr) and (attr, v) not in used]
            if values:
                break
        value = values[int(rng.integers(len(values)))]
        used.add((attr, value))
        strength = float(strengths[int(rng.integers(len(strengths)))])
        biases.append(PlantedBias(SHAPES[int(c)], attr, value, strength))
    return PlantedSet(tuple(biases)).checked()


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
SHIPPED = PlantedSet(PLANTED, LEAK)  # the demo's world
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


def score_findings(
    findings: list[dict],
    planted: PlantedSet,
    reliance: dict | None = None,
    unplanted_reliance: dict[tuple[str, str], dict] | None = None,
) -> dict:
    """Score an audit's *confirmed* findings against the planted truth.

    A planted bias is found when a confirmed finding names its class and its attribute. Recall is over all
    planted biases and, separately, over those the classifier relies on (``reliance[cls]["relies"]``, see
    ``classifiers.measure_reliance``); precision is the share of confirmed findings that are planted.

    A confirmed finding nobody planted is false by the planted truth, but the classifier may have learned it
    anyway, from the planted contexts of other classes (red, where a red brick wall was planted on the
    circle). ``unplanted_reliance`` (``classifiers.measure_unplanted``: ``{(class, attribute): {"reliance",
    "relies"}}``) records the classifier's measured reliance on each; ``learned_unplanted`` counts those it
    relies on and ``precision_learned`` counts them as true. ``precision`` stays the planted truth's.

    Findings the check left *open* (``check.is_open``) count as neither found nor false; ``open`` lists them
    with whether each was planted, and a planted bias's row says whether it was left open. ``specific`` lists
    the dependences the association stage found to be the class's own images only (``check.class_specific``),
    also with whether each was planted: what the stage removed from the confirmations.
    """
    from ..check import class_specific

    confirmed = [(f["class_name"], f["attribute"]) for f in findings if f.get("confirmed")]
    flagged = {(f["class_name"], f["attribute"]) for f in findings if f.get("flagged", True)}
    undecided = [
        (f["class_name"], f["attribute"]) for f in findings if f.get("open") and not f.get("confirmed")
    ]
    specific = [
        (f["class_name"], f["attribute"]) for f in findings if class_specific(f.get("counterfactual"))
    ]
    # confirmed and brought in by the token: what ``--confirm flagged`` would have found
    by_token = {
        (f["class_name"], f["attribute"]) for f in findings if f.get("confirmed") and f.get("flagged", True)
    }
    rows = []
    for b in planted.biases:
        rel = (reliance or {}).get(b.cls) or {}
        key = (b.cls, b.attribute_name)
        rows.append(
            {
                "planted": b.spec(),
                "cls": b.cls,
                "attribute": b.attribute,
                "value": b.value,
                "strength": b.strength,
                "reliance": rel.get("reliance"),
                "relies": rel.get("relies"),
                "flagged": key in flagged,
                "found": key in confirmed,
                "found_by_token": key in by_token,
                "open": key in undecided,
                "specific": key in specific,
            }
        )
    truth = {(b.cls, b.attribute_name) for b in planted.biases}
    correct = [c for c in confirmed if c in truth]
    relied = [r for r in rows if r["relies"]]
    found = []
    for c, a in confirmed:
        row = {"class_name": c, "attribute": a, "planted": (c, a) in truth}
        measured = (unplanted_reliance or {}).get((c, a))
        if not row["planted"] and measured:
            row.update(reliance=measured["reliance"], relies=measured["relies"])
        found.append(row)
    learned = sum(1 for r in found if r.get("relies"))
    return {
        "planted_spec": planted.spec(),
        "planted": rows,
        "confirmed": found,
        "found": sum(r["found"] for r in rows),
        "n_planted": len(rows),
        "recall": sum(r["found"] for r in rows) / len(rows) if rows else None,
        "n_relied": len(relied),
        "recall_relied": sum(r["found"] for r in relied) / len(relied) if relied else None,
        "recall_relied_token": sum(r["found_by_token"] for r in relied) / len(relied) if relied else None,
        "n_confirmed": len(confirmed),
        "false_confirmations": len(confirmed) - len(correct),
        "precision": len(correct) / len(confirmed) if confirmed else None,
        "learned_unplanted": learned if unplanted_reliance is not None else None,
        "precision_learned": (len(correct) + learned) / len(confirmed)
        if confirmed and unplanted_reliance is not None
        else None,
        "open": [{"class_name": c, "attribute": a, "planted": (c, a) in truth} for c, a in undecided],
        "open_relied": sum(r["open"] for r in relied),
        "specific": [{"class_name": c, "attribute": a, "planted": (c, a) in truth} for c, a in specific],
        "specific_relied": sum(r["specific"] for r in relied),
        "n_confirmed_token": len(by_token),
        "false_confirmations_token": len(by_token - truth),
    }


def format_score(score: dict) -> str:
    """One line: what was planted, what was found, recall and precision."""

    def frac(x):
        return "n/a" if x is None else f"{x:.2f}"

    line = (
        f"truth: {score['found']}/{score['n_planted']} planted biases confirmed (recall {frac(score['recall'])}; "
        f"{score['n_relied']} relied on, recall {frac(score['recall_relied'])}), "
        f"{score['n_confirmed']} confirmed finding(s), {score['false_confirmations']} false "
        f"(precision {frac(score['precision'])})"
    )
    learned = [r for r in score["confirmed"] if r.get("relies")]
    if learned:
        cues = ", ".join(f"{r['class_name']}/{r['attribute']} {r['reliance']:.2f}" for r in learned)
        line += f"; of those, unplanted cues the classifier relies on all the same: {cues}"
    undecided = score.get("open") or []
    if undecided:
        planted = [f"{r['class_name']}/{r['attribute']}" for r in undecided if r["planted"]]
        line += f"; {len(undecided)} left open by the check ({len(planted)} planted{': ' if planted else ''}{', '.join(planted)})"
    specific = score.get("specific") or []
    if specific:
        planted = [f"{r['class_name']}/{r['attribute']}" for r in specific if r["planted"]]
        line += (
            f"; {len(specific)} dependence(s) of a class's own images only, not confirmed ({len(planted)} planted"
            f"{': ' if planted else ''}{', '.join(planted)})"
        )
    return line
