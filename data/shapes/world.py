"""The shapes world: seeded 64×64 scenes of coloured shapes with their ground truth and caption.

A scene is a background (plain, a two-tone gradient or stripes, always in neutral tones) and one
or more objects, each a shape of a saturated colour at a position and size. Keeping backgrounds
neutral and objects saturated is what lets the oracle separate them on any background.

Scenes are drawn at 4× and box-downsampled, which gives smooth (anti-aliased) edges and, for
free, each object's coverage mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (35, 60, 225),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 190),
    "orange": (245, 130, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (140, 140, 140),
    "black": (20, 20, 20),
}
BACKGROUND_KINDS = ("plain", "gradient", "stripes")

# The toy model's training distribution: what the feasibility run showed to work.
TOY_SHAPES = ("circle", "square", "triangle")
TOY_COLOURS = ("red", "green", "blue", "yellow")
TOY_BACKGROUNDS = ("white", "gray")


@dataclass(frozen=True)
class ShapeObject:
    """One object: ``centre`` is (x, y) in pixels, ``size`` the side of its bounding box in pixels."""

    shape: str
    colour: str
    centre: tuple[float, float]
    size: float

    @property
    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape}"

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels."""
        x, y = self.centre
        h = self.size / 2
        return (x - h, y - h, x + h, y + h)


@dataclass(frozen=True)
class Background:
    """``kind`` plain uses ``colours[0]``; gradient runs from ``colours[0]`` to ``colours[1]``
    along ``direction`` (horizontal: left to right, vertical: top to bottom); stripes alternate
    the two colours in bands ``period`` pixels wide, across ``direction``."""

    def matches(self, other: Background, period_tolerance: int = 1) -> bool:
        """Same kind and tones (and direction and, for stripes, about the same period)."""
        if (self.kind, self.colours) != (other.kind, other.colours):
            return False
        if self.kind == "plain":
            return True
        if self.kind == "stripes" and abs(self.period - other.period) > period_tolerance:
            return False
        return self.direction == other.direction

    kind: str = "plain"
    colours: tuple[str, ...] = ("white",)
    direction: str = "horizontal"
    period: int = 8

    @property
    def phrase(self) -> str:
        if self.kind == "plain":
            return f"a {self.colours[0]} background"
        if self.kind == "gradient":
            return f"a {self.colours[0]} to {self.colours[1]} gradient background"
        return f"a {self.colours[0]} and {self.colours[1]} striped background"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: Background = field(default_factory=Background)

    @property
    def caption(self) -> str:
        return caption(self)

    def replace_object(self, index: int, **changes) -> Scene:
        """The same scene with one object's attributes changed (e.g. ``shape="square"``)."""
        objects = list(self.objects)
        objects[index] = dataclasses.replace(objects[index], **changes)
        return dataclasses.replace(self, objects=tuple(objects))


def caption(scene: Scene) -> str:
    """Plain English: "a red circle, a blue square and a green triangle on a white background"."""
    phrases = [o.phrase for o in scene.objects]
    if len(phrases) == 1:
        things = phrases[0]
    else:
        things = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{things} on {scene.background.phrase}"


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_scene(
    rng: np.random.Generator | int,
    *,
    num_objects: int | tuple[int, int] = 1,
    shapes: tuple[str, ...] = TOY_SHAPES,
    colours: tuple[str, ...] = TOY_COLOURS,
    backgrounds: tuple[str, ...] = TOY_BACKGROUNDS,
    background_kinds: tuple[str, ...] = ("plain",),
    size_range: tuple[float, float] | None = None,
    distinct: bool = True,
) -> Scene:
    """Draw a random scene; an ``int`` seed gives the same scene every time.

    ``num_objects`` is a count or an inclusive (min, max) range. Objects never overlap (their
    bounding boxes keep a 3 px gap) so each one stays whole and readable; with ``distinct`` no two
    objects share both shape and colour, so a caption names each one unambiguously.
    The defaults are the toy model's training distribution: one object on white or gray.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if isinstance(num_objects, tuple):
        num_objects = int(rng.integers(num_objects[0], num_objects[1] + 1))
    if size_range is None:
        size_range = (18.0, 40.0) if num_objects == 1 else (14.0, 24.0)
    kind = str(rng.choice(background_kinds))
    if kind == "plain":
        background = Background("plain", (str(rng.choice(backgrounds)),))
    else:
        if len(backgrounds) < 2:
            raise ValueError("gradient and striped backgrounds need at least two background colours")
        pair = rng.choice(len(backgrounds), size=2, replace=False)
        background = Background(
            kind,
            (backgrounds[pair[0]], backgrounds[pair[1]]),
            direction=str(rng.choice(["horizontal", "vertical"])),
        )
        if kind == "stripes":
            background = dataclasses.replace(background, period=int(rng.integers(6, 11)))
    objects: list[ShapeObject] = []
    for _ in range(1000):
        if len(objects) == num_objects:
            break
        size = float(rng.uniform(*size_range))
        margin = size / 2 + 2
        centre = (float(rng.uniform(margin, SIZE - margin)), float(rng.uniform(margin, SIZE - margin)))
        candidate = ShapeObject(str(rng.choice(shapes)), str(rng.choice(colours)), centre, size)
        if distinct and any((o.shape, o.colour) == (candidate.shape, candidate.colour) for o in objects):
            continue
        if any(_boxes_near(candidate.bbox, o.bbox, gap=3.0) for o in objects):
            continue
        objects.append(candidate)
    if len(objects) < num_objects:
        raise ValueError(f"could not place {num_objects} objects of sizes {size_range} without overlap")
    return Scene(tuple(objects), background)


def _boxes_near(a, b, gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


# ---------------------------------------------------------------------------------------------
# Rendering


def shape_polygon(shape: str, bbox: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    """Outline of a polygonal shape filling ``bbox`` (None for the circle, drawn as an ellipse)."""
    x0, y0, x1, y1 = bbox
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":  # upright: apex at the top centre, base along the bottom
        return [(xm, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(xm, y0), (x1, ym), (xm, y1), (x0, ym)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def shape_coverage(shape: str, bbox: tuple[float, float, float, float], size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` filling ``bbox`` (pixel units), shape (size, size)."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    big = tuple(v * s for v in bbox)
    poly = shape_polygon(shape, big)
    if poly is None:
        draw.ellipse(big, fill=255)
    else:
        draw.polygon(poly, fill=255)
    hi = np.asarray(canvas, dtype=np.float32) / 255.0
    return hi.reshape(size, s, size, s).mean(axis=(1, 3))


def render_background(background: Background, size: int = SIZE) -> np.ndarray:
    """float32 (size, size, 3) in [0, 255]."""
    c0 = np.array(BACKGROUNDS[background.colours[0]], dtype=np.float32)
    if background.kind == "plain":
        return np.broadcast_to(c0, (size, size, 3)).copy()
    c1 = np.array(BACKGROUNDS[background.colours[1]], dtype=np.float32)
    coord = (np.arange(size, dtype=np.float32) + 0.5) / size
    if background.kind == "gradient":
        t = coord
    elif background.kind == "stripes":
        t = ((np.arange(size) // background.period) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown background kind {background.kind!r}; known: {', '.join(BACKGROUND_KINDS)}")
    t = t[None, :] if background.direction == "horizontal" else t[:, None]
    t = np.broadcast_to(t, (size, size))[..., None]
    return (1 - t) * c0 + t * c1


def render_with_masks(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image as uint8 (64, 64, 3) and each object's visible coverage (float32 (64, 64) in [0, 1])."""
    image = render_background(scene.background)
    coverages = []
    for obj in scene.objects:
        cov = shape_coverage(obj.shape, obj.bbox)
        colour = np.array(COLOURS[obj.colour], dtype=np.float32)
        image = image * (1 - cov[..., None]) + colour * cov[..., None]
        coverages = [c * (1 - cov) for c in coverages]  # later objects are drawn on top
        coverages.append(cov)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), coverages


def render(scene: Scene) -> Image.Image:
    """The scene as a 64×64 RGB PIL image."""
    return Image.fromarray(render_with_masks(scene)[0])


def object_masks(scene: Scene, threshold: float = 0.5) -> list[np.ndarray]:
    """Boolean (64, 64) mask of each object (pixels it covers at least half of)."""
    return [c >= threshold for c in render_with_masks(scene)[1]]


def mask_centre(mask: np.ndarray) -> tuple[float, float]:
    """Bounding-box centre (x, y) of a boolean mask, in pixels (pixel centres at +0.5)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (float("nan"), float("nan"))
    return ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)


def scene_words() -> list[str]:
    """Every word a caption can contain (the tokenizer gives each one a single token)."""
    words = ["a", "an", "and", "on", "to", "background", "gradient", "striped"]
    return words + list(SHAPES) + list(COLOURS) + list(BACKGROUNDS)
