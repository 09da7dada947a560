"""Procedural scenes of the planted-bias world: a coloured shape on a textured background, with context.

Each scene is one object (the class: a shape) in one colour, on one background texture, with an optional
context object (a plate under it, a stick-figure person beside it, or a frame around it). Everything is
drawn with numpy and PIL at ``supersample`` times the output size and box-filtered down, so edges are
antialiased. Scene ``i`` of stream ``seed`` depends only on ``(seed, i)`` (its own random generator), so a
stream can be cut into batches in any way and stays the same. Every scene carries its attribute labels,
the object's and the context's masks, and a caption in one of several phrasings.

Why it is over 450 lines: one concern, drawing a scene (shapes, six background textures, three context
objects, colours and captions), whose parts only make sense together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS: tuple[str, ...] = ("plain", "water", "grass", "snow", "stripes", "brick")
CONTEXTS: tuple[str, ...] = ("none", "plate", "person", "frame")
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "background", "context")
VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "background": BACKGROUNDS,
    "context": CONTEXTS,
}

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "green": (35, 175, 45),
    "blue": (35, 70, 225),
    "yellow": (245, 225, 35),
    "purple": (145, 45, 185),
    "orange": (250, 135, 20),
}
OUTLINE_RGB = (35, 35, 35)
PERSON_RGB = (25, 25, 30)
PLATE_RGB, PLATE_RIM_RGB = (246, 246, 246), (140, 140, 150)
FRAME_OUT_RGB, FRAME_IN_RGB = (95, 55, 25), (240, 225, 185)

# Caption pieces. "on" phrases follow a noun ("a red star on water"); "noun" phrases fill "a ... background".
BACKGROUND_ON = {
    "plain": "on a plain background",
    "water": "on water",
    "grass": "on grass",
    "snow": "on snow",
    "stripes": "on stripes",
    "brick": "on a brick wall",
}
BACKGROUND_NOUN = {
    "plain": "plain",
    "water": "water",
    "grass": "grass",
    "snow": "snow",
    "stripes": "striped",
    "brick": "brick",
}
CONTEXT_ON = {"none": "", "plate": "on a plate", "person": "next to a person", "frame": "in a frame"}
CONTEXT_WITH = {"none": "alone", "plate": "with a plate", "person": "with a person", "frame": "with a frame"}
PHRASINGS: tuple[str, ...] = (
    "a {colour} {shape} {bg_on} {ctx_on}",
    "a photo of a {shape}, {colour}, {ctx_with}, {bg_on}",
    "a {colour} {shape} {ctx_on} with a {bg_noun} background",
    "{bg_noun} background, a {shape} in {colour}, {ctx_with}",
    "a picture of a {colour} {shape} {ctx_on}, {bg_on}",
    "a {shape} {ctx_with}. it is {colour}. the background is {bg_noun}",
)
N_PHRASINGS = len(PHRASINGS)

BiasSpec = Mapping[str, tuple[str, str, float]]


def caption(shape: str, colour: str, background: str, context: str, phrasing: int = 0) -> str:
    """The caption of a scene with these attributes in phrasing ``phrasing`` (0 .. N_PHRASINGS - 1)."""
    text = PHRASINGS[phrasing % N_PHRASINGS].format(
        shape=shape,
        colour=colour,
        bg_on=BACKGROUND_ON[background],
        bg_noun=BACKGROUND_NOUN[background],
        ctx_on=CONTEXT_ON[context],
        ctx_with=CONTEXT_WITH[context],
    )
    text = " ".join(text.split()).replace(" ,", ",").rstrip(",")
    for word in ("orange",):  # the only colour that starts with a vowel
        text = text.replace(f"a {word}", f"an {word}")
    return text


@dataclass
class Scenes:
    """A batch of scenes. Attribute arrays hold indices into the vocabulary tuples (``VOCAB[name]``)."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    shape: np.ndarray  # int64 (N,)
    colour: np.ndarray
    background: np.ndarray
    context: np.ndarray
    object_mask: np.ndarray  # bool (N, H, W)
    context_mask: np.ndarray  # bool (N, H, W), empty when context is "none"
    captions: list[str]
    phrasing: np.ndarray  # int64 (N,), the phrasing index of each caption

    def __len__(self) -> int:
        return len(self.images)

    def labels(self, attribute: str) -> np.ndarray:
        """The index array of one attribute type ("shape", "colour", "background", "context")."""
        return getattr(self, attribute)

    def names(self, attribute: str) -> list[str]:
        """The attribute's value names, one per scene."""
        return [VOCAB[attribute][i] for i in self.labels(attribute)]

    def attributes(self, i: int) -> dict[str, str]:
        """All attribute names of scene ``i``."""
        return {a: VOCAB[a][int(self.labels(a)[i])] for a in ATTRIBUTES}


def attribute_probabilities(bias: BiasSpec | None = None, leak: float | None = None) -> dict[str, np.ndarray]:
    """Per attribute type, a (n_shapes, n_values) table: P(value | class) under a planted ``bias``.

    ``bias`` maps a class to ``(attribute, value, strength)``: that class gets that value with probability
    ``strength`` and the other values share the rest. ``leak`` says how often a planted value appears with
    the *other* classes: ``None`` leaves them uniform over all values (the value is then common elsewhere too
    and barely predicts the class), ``0.0`` never shows it with them (the context predicts the class, which is
    what makes a classifier learn the shortcut), a small number makes it rare (that probability per planted
    value).
    """
    bias = dict(bias or {})
    tables = {}
    for attribute in ATTRIBUTES[1:]:
        values = VOCAB[attribute]
        planted = {}  # class index -> (value index, strength)
        for cls, (attr, value, strength) in bias.items():
            if cls not in SHAPES:
                raise ValueError(f"unknown class {cls!r}; classes are {SHAPES}")
            if attr not in ATTRIBUTES[1:] or value not in VOCAB[attr]:
                raise ValueError(f"bad bias {attr!r}={value!r} for {cls!r}; see scenes.VOCAB")
            if not 0.0 <= strength <= 1.0:
                raise ValueError(f"bias strength must be in [0, 1], got {strength}")
            if attr == attribute:
                planted[SHAPES.index(cls)] = (values.index(value), float(strength))
        planted_values = {v for v, _ in planted.values()}
        table = np.zeros((len(SHAPES), len(values)))
        for c in range(len(SHAPES)):
            p = np.zeros(len(values))
            own = planted.get(c)
            if own is not None:
                p[own[0]] = own[1]
            others = [v for v in planted_values if own is None or v != own[0]]
            free = [v for v in range(len(values)) if v not in planted_values]
            if leak is None:  # everything not this class's own planted value shares the rest
                free = [v for v in range(len(values)) if own is None or v != own[0]]
                others = []
            for v in others:
                p[v] = leak
            rest = 1.0 - p.sum()
            if rest < -1e-9 or (rest > 1e-9 and not free):
                raise ValueError(f"bias on {attribute} for {SHAPES[c]!r} does not leave a valid distribution")
            if free:
                p[free] += rest / len(free)
            table[c] = p / p.sum()
        tables[attribute] = table
    return tables


def draw_attributes(
    n: int,
    seed: int = 0,
    *,
    bias: BiasSpec | None = None,
    leak: float | None = None,
    fixed: Mapping[str, str] | None = None,
    start: int = 0,
) -> dict[str, np.ndarray]:
    """Attribute indices of scenes ``start .. start+n-1`` of stream ``seed``: ``{"shape": (n,), ...}``.

    The class (shape) is uniform; colour, background and context follow ``attribute_probabilities(bias,
    leak)`` given the class. ``fixed`` forces attribute values (e.g. ``{"background": "water"}`` for a
    counter-correlated test set) and overrides the bias.
    """
    fixed = dict(fixed or {})
    for attr, value in fixed.items():
        if attr not in VOCAB or value not in VOCAB[attr]:
            raise ValueError(f"bad fixed attribute {attr!r}={value!r}; see scenes.VOCAB")
    u = np.stack([np.random.default_rng([seed, start + k, 0]).random(len(ATTRIBUTES)) for k in range(n)])
    u = u.reshape(n, len(ATTRIBUTES))
    out = {"shape": np.minimum((u[:, 0] * len(SHAPES)).astype(np.int64), len(SHAPES) - 1)}
    if "shape" in fixed:
        out["shape"][:] = SHAPES.index(fixed["shape"])
    for j, (attr, table) in enumerate(attribute_probabilities(bias, leak).items(), start=1):
        if attr in fixed:
            out[attr] = np.full(n, VOCAB[attr].index(fixed[attr]), np.int64)
            continue
        cumulative = np.cumsum(table, axis=1)[out["shape"]]  # (n, n_values)
        idx = (u[:, j : j + 1] * cumulative[:, -1:] >= cumulative).sum(1)
        out[attr] = np.minimum(idx, len(VOCAB[attr]) - 1).astype(np.int64)
    return out


def render_scenes(
    attributes: Mapping[str, Sequence[int] | Sequence[str] | np.ndarray],
    seed: int = 0,
    *,
    start: int = 0,
    size: int = 32,
    supersample: int = 4,
) -> Scenes:
    """Render scenes with the given attributes (index or name arrays, one entry per scene).

    Scene k's size, position, colour shade, phrasing and texture come from stream ``(seed, start + k)``
    and do not depend on its attributes, so the same (seed, index) with another background is the same
    object at the same place on the other background: a counterfactual pair.
    """
    idx = {}
    for a in ATTRIBUTES:
        v = list(attributes[a])
        idx[a] = np.array([VOCAB[a].index(x) if isinstance(x, str) else int(x) for x in v], np.int64)
    n = len(idx["shape"])
    canvas = _Canvas(size, supersample)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((2, n, size, size), bool)
    phrasing = np.empty(n, np.int64)
    captions = []
    for k in range(n):
        names = {a: VOCAB[a][idx[a][k]] for a in ATTRIBUTES}
        geometry = np.random.default_rng([seed, start + k, 1]).random(_N_GEOMETRY + 1)
        texture = np.random.default_rng([seed, start + k, 2])
        images[k], masks[0, k], masks[1, k] = canvas.render(geometry[:-1], texture, **names)
        phrasing[k] = min(int(geometry[-1] * N_PHRASINGS), N_PHRASINGS - 1)
        captions.append(caption(**names, phrasing=int(phrasing[k])))
    return Scenes(images, *(idx[a] for a in ATTRIBUTES), masks[0], masks[1], captions, phrasing)


def sample_scenes(
    n: int,
    seed: int = 0,
    *,
    size: int = 32,
    bias: BiasSpec | None = None,
    leak: float | None = None,
    fixed: Mapping[str, str] | None = None,
    start: int = 0,
    supersample: int = 4,
) -> Scenes:
    """Draw and render scenes ``start .. start+n-1`` of stream ``seed`` (scene i depends only on (seed, i)).

    See ``draw_attributes`` for ``bias``, ``leak`` and ``fixed``, ``render_scenes`` for the rest.
    """
    attrs = draw_attributes(n, seed, bias=bias, leak=leak, fixed=fixed, start=start)
    return render_scenes(attrs, seed, start=start, size=size, supersample=supersample)


def render_scene(
    shape: str,
    colour: str,
    background: str,
    context: str = "none",
    seed: int = 0,
    size: int = 32,
    supersample: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene with the given attributes: (uint8 image HxWx3, object mask, context mask)."""
    attrs = {"shape": [shape], "colour": [colour], "background": [background], "context": [context]}
    sc = render_scenes(attrs, seed, size=size, supersample=supersample)
    return sc.images[0], sc.object_mask[0], sc.context_mask[0]


_N_GEOMETRY = 10  # uniforms per scene for size, position, person layout and colour shade


class _Canvas:
    """Draws scenes at ``size * ss`` pixels and box-filters them down to ``size``."""

    def __init__(self, size: int, ss: int):
        self.size, self.ss, self.big = size, ss, size * ss
        grid = (np.arange(self.big, dtype=np.float32) + 0.5) / ss  # output-pixel units
        self.y, self.x = np.meshgrid(grid, grid, indexing="ij")

    # -- helpers ---------------------------------------------------------------------------------------
    def _mask(self, draw_fn) -> Image.Image:
        img = Image.new("L", (self.big, self.big), 0)
        draw_fn(ImageDraw.Draw(img))
        return img

    def _down_mask(self, mask: Image.Image) -> np.ndarray:
        """Output-resolution mask: the pixels at least half covered."""
        return np.asarray(mask.resize((self.size, self.size), Image.BOX)) >= 128

    def _pts(self, pts) -> list[tuple[float, float]]:
        return [(px * self.ss, py * self.ss) for px, py in pts]

    # -- backgrounds -----------------------------------------------------------------------------------
    def _background(self, rng: np.random.Generator, name: str) -> Image.Image:
        y, x = self.y, self.x
        jitter = rng.integers(-12, 13, 3)

        def two(base, alt, m):
            palette = np.clip(np.array([base, alt]) + jitter, 0, 255).astype(np.uint8)
            return Image.fromarray(palette[m.view(np.uint8)], "RGB")

        if name == "plain":
            rgb = np.clip(np.array((205, 200, 190)) + jitter, 0, 255)
            return Image.new("RGB", (self.big, self.big), tuple(int(c) for c in rgb))
        if name == "water":
            period, wl, amp = rng.uniform(4.0, 5.5), rng.uniform(7, 11), rng.uniform(0.2, 0.35)
            phase = rng.uniform(0, 2 * math.pi, 2)
            v = np.sin(2 * math.pi * (y / period + amp * np.sin(2 * math.pi * x / wl + phase[0])) + phase[1])
            return two((60, 130, 205), (175, 215, 245), v > 0.6)
        if name == "grass":
            cols = np.floor(x).astype(int)
            offset = rng.uniform(0, 6, self.size)[cols]
            length = rng.uniform(3.0, 5.0)
            blade = ((y + offset) % length) < length * 0.55
            blade &= (x - cols) < 0.6
            return two((95, 165, 65), (45, 105, 35), blade)
        if name == "snow":
            speck = rng.random((self.size * 2, self.size * 2)) < 0.12
            speck = np.repeat(np.repeat(speck, self.ss // 2 or 1, 0), self.ss // 2 or 1, 1)
            speck = speck[: self.big, : self.big]
            return two((236, 240, 248), (160, 172, 195), speck)
        if name == "stripes":
            period = rng.uniform(5.0, 7.0)
            sign = rng.choice([-1.0, 1.0])
            stripe = ((x + sign * y + rng.uniform(0, period)) % period) < period / 2
            return two((215, 215, 215), (105, 125, 140), stripe)
        if name == "brick":
            h, w = 4.0, 8.0
            yo, xo = y + rng.uniform(0, h), x + rng.uniform(0, w)
            row = np.floor(yo / h)
            xs = (xo + (row % 2) * w / 2) % w
            mortar = ((yo % h) < 0.8) | (xs < 0.8)
            return two((165, 70, 50), (215, 205, 190), mortar)
        raise ValueError(f"unknown background {name!r}")

    # -- objects ---------------------------------------------------------------------------------------
    def _shape(self, draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, grow: float):
        """Draw ``shape`` filled (value 255), grown outward by ``grow`` output pixels (for the outline)."""
        ss = self.ss
        if shape in ("circle", "ring"):
            R = (r + grow) * ss
            draw.ellipse((cx * ss - R, cy * ss - R, cx * ss + R, cy * ss + R), fill=255)
            if shape == "ring":
                ri = (0.55 * r - grow) * ss
                draw.ellipse((cx * ss - ri, cy * ss - ri, cx * ss + ri, cy * ss + ri), fill=0)
            return
        if shape == "square":
            h = 0.82 * r
            pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
        elif shape == "triangle":
            pts = [(cx + r * math.cos(a), cy + 0.15 * r + r * math.sin(a)) for a in _angles(3, -90)]
        elif shape == "star":
            pts = [
                (cx + rr * math.cos(a), cy + 0.08 * r + rr * math.sin(a))
                for i, a in enumerate(_angles(10, -90))
                for rr in [r if i % 2 == 0 else 0.45 * r]
            ]
        elif shape == "cross":
            a, b = 0.32 * r, r
            pts = [
                (a, b),
                (a, a),
                (b, a),
                (b, -a),
                (a, -a),
                (a, -b),
                (-a, -b),
                (-a, -a),
                (-b, -a),
                (-b, a),
                (-a, a),
                (-a, b),
            ]
            pts = [(cx + px, cy + py) for px, py in pts]
        else:
            raise ValueError(f"unknown shape {shape!r}")
        pts = self._pts(pts)
        draw.polygon(pts, fill=255)
        if grow > 0:
            draw.line(pts + [pts[0]], fill=255, width=max(1, round(2 * grow * ss)), joint="curve")

    # -- the scene -------------------------------------------------------------------------------------
    def render(
        self,
        g: np.ndarray,
        texture: np.random.Generator,
        shape: str,
        colour: str,
        background: str,
        context: str,
    ):
        """Draw one scene. ``g`` holds ``_N_GEOMETRY`` uniforms in [0, 1) that place and size everything,
        ``texture`` is the background's random generator. Returns (image, object mask, context mask)."""
        s, ss = self.size, self.ss
        img = self._background(texture, background)
        r = (0.2 + 0.08 * g[0]) * s
        ctx = None
        layers = []  # (mask, rgb) painted in order
        if context == "person":
            side = -1.0 if g[3] < 0.5 else 1.0  # person on the left (-1) or right (+1)
            pw, ph = 0.28 * s, (0.7 + 0.12 * g[4]) * s
            cx = np.clip(s / 2 - side * (0.12 + 0.08 * g[1]) * s, r + 1, s - r - 1)
            cy = r + 1.5 + (s - 2 * r - 3) * g[2]
            px = np.clip(cx + side * (r + 0.5 * pw + 0.5 + g[5]), pw / 2 + 0.5, s - pw / 2 - 0.5)
            top = 0.5 + (s - ph - 1) * g[6]
            ctx = self._mask(lambda d: self._person(d, px, top, pw, ph))
            layers.append((ctx, PERSON_RGB))
        else:
            pad = {"none": 1.0, "plate": 1.0, "frame": 3.5}.get(context)
            if pad is None:
                raise ValueError(f"unknown context {context!r}")
            low = 1.0 if context == "plate" else 0.0  # room for the plate's rim below the object
            cx = r + pad + (s - 2 * (r + pad)) * g[1]
            cy = r + pad + (s - 2 * (r + pad) - low) * g[2]
            if context == "plate":
                pw, ph, py = 1.45 * r, 0.5 * r, cy + 0.62 * r
                box = [(cx - pw) * ss, (py - ph) * ss, (cx + pw) * ss, (py + ph) * ss]
                ctx = self._mask(lambda d: d.ellipse(box, fill=255))
                inner = self._mask(lambda d: d.ellipse(box, fill=255, outline=0, width=round(0.9 * ss)))
                layers += [(ctx, PLATE_RIM_RGB), (inner, PLATE_RGB)]
            elif context == "frame":
                m = r + 2.2
                box = [(cx - m) * ss, (cy - m) * ss, (cx + m) * ss, (cy + m) * ss]
                ctx = self._mask(lambda d: d.rectangle(box, outline=255, width=round(1.9 * ss)))
                outer = self._mask(lambda d: d.rectangle(box, outline=255, width=round(0.95 * ss)))
                layers += [(ctx, FRAME_IN_RGB), (outer, FRAME_OUT_RGB)]
        grown = self._mask(lambda d: self._shape(d, shape, cx, cy, r, 0.5))
        fill = self._mask(lambda d: self._shape(d, shape, cx, cy, r, 0.0))
        rgb = np.clip(np.array(COLOUR_RGB[colour]) + np.floor(31 * g[7:10]) - 15, 0, 255)
        layers += [(grown, OUTLINE_RGB), (fill, tuple(int(c) for c in rgb))]
        for mask, c in layers:
            img.paste(c, mask=mask)
        image = np.asarray(img.resize((s, s), Image.BOX))
        obj_mask = self._down_mask(fill)
        ctx_mask = (
            self._down_mask(ImageChops.subtract(ctx, grown)) if ctx is not None else np.zeros((s, s), bool)
        )
        return image, obj_mask, ctx_mask

    def _person(self, d: ImageDraw.ImageDraw, px: float, top: float, pw: float, ph: float):
        """A stick figure of width ``pw`` and height ``ph`` centred at x = ``px`` (output pixels)."""
        ss, w = self.ss, max(1, round(1.1 * self.ss))
        head = 0.13 * ph
        hx, hy = px * ss, (top + head) * ss
        d.ellipse((hx - head * ss, hy - head * ss, hx + head * ss, hy + head * ss), fill=255)
        neck, hip, foot = top + 2 * head, top + 0.62 * ph, top + ph
        shoulder = neck + 0.1 * ph
        lines = [
            [(px, neck), (px, hip)],
            [(px - pw / 2, shoulder + 0.18 * ph), (px, shoulder), (px + pw / 2, shoulder + 0.18 * ph)],
            [(px - pw * 0.4, foot), (px, hip), (px + pw * 0.4, foot)],
        ]
        for pts in lines:
            d.line(self._pts(pts), fill=255, width=w, joint="curve")


def _angles(k: int, start_deg: float) -> list[float]:
    return [math.radians(start_deg + 360.0 * i / k) for i in range(k)]
