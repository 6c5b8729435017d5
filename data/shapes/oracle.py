"""The oracle: reads each object's shape, colour, mask and position, and the background, back
from an image of the shapes world, by analysis rather than learning.

- Objects are saturated and backgrounds neutral, so a pixel's chroma (max - min channel) is the
  object's chroma times its coverage there: coverage = chroma / chroma of the object's colour.
  This holds on plain, gradient and striped backgrounds alike.
- Each connected blob of pixels with enough chroma is one object; its colour is the palette colour
  nearest its median core pixel; its shape is whichever template, fitted to the blob's bounding
  box, overlaps it best. The oracle is lenient (any blob gets its best template), so
  ``template_iou`` says how well the blob fits: report it next to accuracy.
- The background is read from the remaining pixels: plain, a gradient or stripes, and its tones.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from p2pz.data.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZE,
    Background,
    Scene,
    ShapeObject,
    mask_centre,
    shape_coverage,
)

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)
_PALETTE_CHROMA = _PALETTE.max(axis=1) - _PALETTE.min(axis=1)
_BG_NAMES = list(BACKGROUNDS)
_BG_LEVELS = np.array([np.mean(BACKGROUNDS[n]) for n in _BG_NAMES], dtype=np.float32)

SEED_CHROMA = 60.0  # a pixel this saturated belongs to some object
MIN_AREA = 12  # blobs smaller than this (pixels) are noise, not objects


@dataclass
class ObjectReading:
    shape: str
    colour: str
    mask: np.ndarray  # bool (64, 64): pixels the object covers at least half of
    coverage: np.ndarray  # float32 (64, 64) in [0, 1]
    centre: tuple[float, float]  # bounding-box centre (x, y) in pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
    template_iou: float  # overlap of the mask with the chosen shape's template
    area: int

    def to_object(self) -> ShapeObject:
        x0, y0, x1, y1 = self.bbox
        return ShapeObject(self.shape, self.colour, self.centre, float(max(x1 - x0, y1 - y0)))


@dataclass
class Reading:
    objects: list[ObjectReading]
    background: Background

    def to_scene(self) -> Scene:
        return Scene(tuple(o.to_object() for o in self.objects), self.background)

    @property
    def caption(self) -> str:
        return self.to_scene().caption if self.objects else f"{self.background.phrase}"


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:  # float images in [0, 1]
        image = np.clip(np.rint(image * 255.0), 0, 255)
    return image.astype(np.float32)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, largest first."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    comps = []
    for sy, sx in zip(*np.nonzero(mask)):
        if labels[sy, sx]:
            continue
        n = len(comps) + 1
        labels[sy, sx] = n
        queue, pixels = deque([(sy, sx)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        queue.append((yy, xx))
        comps.append(labels == n)
    return sorted(comps, key=lambda m: -int(m.sum()))


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` grown by ``steps`` pixels (4-neighbourhood), e.g. to take in anti-aliased rims."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def fit_shape(
    mask: np.ndarray, shapes: tuple[str, ...] = SHAPES
) -> tuple[str, float, tuple[int, int, int, int]]:
    """The shape whose template, fitted to the mask's bounding box, overlaps the mask best."""
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    best, best_iou = shapes[0], -1.0
    for shape in shapes:
        template = shape_coverage(shape, bbox, size=mask.shape[0]) >= 0.5
        iou = float((template & mask).sum() / max((template | mask).sum(), 1))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou, bbox


def read_background(pixels: np.ndarray, background_mask: np.ndarray) -> Background:
    """Plain, gradient or stripes, from the neutral pixels outside every object."""
    level = pixels.mean(axis=2)

    def nearest(value: float) -> str:
        return _BG_NAMES[int(np.abs(_BG_LEVELS - value).argmin())]

    if background_mask.sum() < 16:
        return Background("plain", (nearest(float(np.median(level))),))
    weights = background_mask.astype(np.float32)
    profiles = {}
    for direction, axis in (("horizontal", 0), ("vertical", 1)):
        counts = weights.sum(axis=axis)
        prof = (level * weights).sum(axis=axis) / np.maximum(counts, 1)
        profiles[direction] = prof[counts > 0]
    direction = max(profiles, key=lambda d: np.ptp(profiles[d]) if len(profiles[d]) else 0.0)
    prof = profiles[direction]
    spread = float(np.ptp(prof)) if len(prof) else 0.0
    if spread < 40.0:
        return Background("plain", (nearest(float(np.median(level[background_mask]))),))
    lo, hi = float(prof.min()), float(prof.max())
    near_ends = np.mean((prof < lo + 0.15 * (hi - lo)) | (prof > hi - 0.15 * (hi - lo)))
    if near_ends > 0.8:  # two tones in bands
        bands = prof > (lo + hi) / 2
        runs = np.diff(np.flatnonzero(np.diff(bands.astype(np.int8)) != 0))
        period = int(np.median(runs)) if len(runs) else 8
        first = nearest(hi if bands[0] else lo)
        second = nearest(lo if bands[0] else hi)
        return Background("stripes", (first, second), direction, period)
    k = max(2, len(prof) // 8)
    return Background(
        "gradient", (nearest(float(prof[:k].mean())), nearest(float(prof[-k:].mean()))), direction
    )


def read(image: Image.Image | np.ndarray, shapes: tuple[str, ...] = SHAPES) -> Reading:
    """Read every object (largest first) and the background of a shapes-world image."""
    pixels = _to_array(image)
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    objects = []
    for blob in _components(chroma >= SEED_CHROMA):
        if blob.sum() < MIN_AREA:
            continue
        core = blob & (chroma >= np.percentile(chroma[blob], 50))
        median = np.median(pixels[core], axis=0)
        # Compare hues, not brightness: subtract each colour's own minimum channel.
        centred = (median - median.min())[None] - (_PALETTE - _PALETTE.min(axis=1, keepdims=True))
        idx = int(np.square(centred).sum(axis=1).argmin())
        # Coverage in the blob's neighbourhood (anti-aliased edges sit just outside the seed blob).
        region = dilate(blob, 2)
        coverage = np.where(region, np.clip(chroma / _PALETTE_CHROMA[idx], 0.0, 1.0), 0.0).astype(np.float32)
        mask = coverage >= 0.5
        if mask.sum() < MIN_AREA:
            continue
        shape, iou, bbox = fit_shape(mask, shapes)
        objects.append(
            ObjectReading(
                shape=shape,
                colour=_PALETTE_NAMES[idx],
                mask=mask,
                coverage=coverage,
                centre=mask_centre(mask),
                bbox=bbox,
                template_iou=iou,
                area=int(mask.sum()),
            )
        )
    occupied = np.zeros((pixels.shape[0], pixels.shape[1]), dtype=bool)
    for o in objects:
        occupied |= o.mask
    background_mask = ~dilate(occupied | (chroma >= 25.0), 2)
    return Reading(objects, read_background(pixels, background_mask))


def match_objects(reading: Reading, scene: Scene) -> list[ObjectReading | None]:
    """For each object of ``scene``, the read object whose centre is nearest its own (or None)."""
    matches: list[ObjectReading | None] = []
    free = list(reading.objects)
    for obj in scene.objects:
        if not free:
            matches.append(None)
            continue
        dists = [np.hypot(o.centre[0] - obj.centre[0], o.centre[1] - obj.centre[1]) for o in free]
        matches.append(free.pop(int(np.argmin(dists))))
    return matches


@dataclass
class SceneScore:
    shape: bool
    colour: bool
    background: bool
    count: bool
    template_iou: float
    centre_error: float

    @property
    def all_right(self) -> bool:
        return self.shape and self.colour and self.background and self.count


def score(image: Image.Image | np.ndarray, scene: Scene) -> SceneScore:
    """Does the image show ``scene``? Every object's shape and colour, the background, the count."""
    reading = read(image)
    matches = match_objects(reading, scene)
    shape = all(m is not None and m.shape == o.shape for m, o in zip(matches, scene.objects))
    colour = all(m is not None and m.colour == o.colour for m, o in zip(matches, scene.objects))
    found = [m for m in matches if m is not None]
    errors = [
        float(np.hypot(m.centre[0] - o.centre[0], m.centre[1] - o.centre[1]))
        for m, o in zip(matches, scene.objects)
        if m is not None
    ]
    return SceneScore(
        shape=shape,
        colour=colour,
        background=reading.background.matches(scene.background),
        count=len(reading.objects) == len(scene.objects),
        template_iou=float(np.mean([m.template_iou for m in found])) if found else 0.0,
        centre_error=float(np.mean(errors)) if errors else float("nan"),
    )


__all__ = ["SIZE", "ObjectReading", "Reading", "SceneScore", "fit_shape", "match_objects", "read", "score"]
