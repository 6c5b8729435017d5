"""Scoring edits of shapes-world scenes against their ground truth, with the oracle.

An edit of the world swaps one attribute of one object: a shape (``circle:square``) or a colour
(``red:blue``). The edited object is the first object of the input scene with the source word.
For one (input scene, edited image) pair:

- **success**: the oracle reads the target word on the edited object (``target``), the object's
  other attribute is kept (``kept``: a circle -> square edit must not change its colour), and
  everything else is kept (``others_kept``: the other objects' shapes and colours, the number of
  objects and the background);
- **iou**: mask IoU of the edited object with the *expected* mask, that of the ideal edit (the
  input object redrawn with the target attribute at the same position and size). For a colour
  edit that is the input's mask; for a shape edit the target shape in the input's bounding box
  (a perfect circle -> square edit has IoU pi/4 with the input circle, so comparing with the input
  mask would cap a perfect edit at 0.785). ``iou_input``, the IoU with the input's mask itself, is
  reported next to it. All masks are the oracle's readings (of the input, of the ideal edit's
  render and of the edited image), so the oracle's own rim thresholding cancels out;
- **centre_shift_px**: how far the bounding-box centre of the object moved from the input's;
- **psnr_outside**: PSNR (dB, 8-bit scale) between input and edited image over the pixels outside
  the input's and the expected object masks (grown by 1 px for anti-aliased rims): other objects
  and the background must stay unchanged.

``aggregate`` gives the success rate, the mean IoU, the median centre shift (an object the oracle
cannot find counts as an infinite shift) and the mean PSNR outside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from p2pz.data.shapes import oracle, world
from p2pz.data.shapes.edits import WorldEdit, parse_world_edit
from p2pz.data.shapes.world import Scene

MAX_PSNR = 100.0  # dB reported for identical pixels (keeps the JSON finite)
RIM_PX = 1  # masks are grown by this much before taking "outside" pixels


# ---------------------------------------------------------------------------------------------
# One pair


@dataclass
class WorldEditScore:
    success: bool
    target: bool  # the edited object shows the target word
    kept: bool  # ... and keeps its other attribute
    others_kept: bool  # the other objects, the object count and the background are kept
    found: bool  # the oracle found an object near the edited one
    iou: float  # mask IoU with the expected (edited-in-place) mask
    iou_input: float  # mask IoU with the input's mask
    centre_shift_px: float  # NaN when not found
    psnr_outside: float  # dB

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A 64×64 RGB uint8 array (other sizes are box-resized, as the world's captioner does)."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr[..., :3])
    image = image.convert("RGB")
    if image.size != (world.SIZE, world.SIZE):
        image = image.resize((world.SIZE, world.SIZE), Image.Resampling.BOX)
    return np.asarray(image)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR in dB (peak 255) of two uint8 images over the pixels of ``where``."""
    if not where.any():
        return float("nan")
    diff = a[where].astype(np.float64) - b[where].astype(np.float64)
    mse = float(np.mean(diff**2))
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10.0 * math.log10(255.0**2 / mse))


def score_world_edit(
    scene: Scene,
    edited_image: Image.Image | np.ndarray,
    edit: WorldEdit | str,
    input_image: Image.Image | np.ndarray | None = None,
    input_masks: Sequence[np.ndarray] | None = None,
) -> WorldEditScore:
    """Score one edit of ``scene`` (see the module docstring).

    ``input_image`` defaults to the scene's render; ``input_masks`` (one bool mask per object) to
    the render's masks. Pairs whose scene is only known from the oracle's reading of the input pass
    the reading's scene and masks.
    """
    edit = parse_world_edit(edit) if isinstance(edit, str) else edit
    index = edit.object_index(scene)
    obj = scene.objects[index]
    target_scene = edit.apply(scene)
    source = as_array(world.render(scene) if input_image is None else input_image)
    edited = as_array(edited_image)
    if input_masks is None:
        # Ground truth known: measure input and ideal edit with the same instrument as the edit
        # (the oracle), so that its thresholding of anti-aliased rims cancels out.
        input_mask = _read_mask(source, scene, index)
        expected = _read_mask(as_array(world.render(target_scene)), target_scene, index)
    else:
        input_mask = np.asarray(input_masks[index], dtype=bool)
        if edit.attribute == "colour":
            expected = input_mask
        else:
            ys, xs = np.nonzero(input_mask)
            bbox = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            expected = world.shape_coverage(edit.target, bbox) >= 0.5

    reading = oracle.read(edited)
    matches = oracle.match_objects(reading, target_scene)
    found = matches[index]
    target = found is not None and getattr(found, edit.attribute) == edit.target
    kept = found is not None and getattr(found, edit.other_attribute) == getattr(obj, edit.other_attribute)
    others_kept = (
        len(reading.objects) == len(scene.objects)
        and all(
            m is not None and (m.shape, m.colour) == (o.shape, o.colour)
            for i, (m, o) in enumerate(zip(matches, scene.objects))
            if i != index
        )
        and reading.background.matches(scene.background)
    )
    if found is not None:
        (ex, ey), (ix, iy) = world.mask_centre(found.mask), world.mask_centre(input_mask)
        shift = float(math.hypot(ex - ix, ey - iy))
        iou, iou_input = mask_iou(found.mask, expected), mask_iou(found.mask, input_mask)
    else:
        shift, iou, iou_input = float("nan"), 0.0, 0.0
    outside = ~oracle.dilate(input_mask | expected, RIM_PX)
    return WorldEditScore(
        success=bool(target and kept and others_kept),
        target=bool(target),
        kept=bool(kept),
        others_kept=bool(others_kept),
        found=found is not None,
        iou=iou,
        iou_input=iou_input,
        centre_shift_px=shift,
        psnr_outside=psnr(source, edited, outside),
    )


def _read_mask(image: np.ndarray, scene: Scene, index: int) -> np.ndarray:
    """The oracle's mask of object ``index`` of ``scene`` in its image (the render's mask if it misses)."""
    found = oracle.match_objects(oracle.read(image), scene)[index]
    return found.mask if found is not None else world.object_masks(scene)[index]


def scene_from_image(image: Image.Image | np.ndarray) -> tuple[Scene, list[np.ndarray]]:
    """The scene and object masks the oracle reads from an input image (for pairs without ground truth)."""
    reading = oracle.read(as_array(image))
    if not reading.objects:
        raise ValueError("the oracle finds no object in the input image")
    return reading.to_scene(), [o.mask for o in reading.objects]


# ---------------------------------------------------------------------------------------------
# Many pairs


def aggregate(scores: Sequence[WorldEditScore]) -> dict:
    """Success rate, mean IoU, median centre shift (missing objects: +inf), mean PSNR outside."""
    n = len(scores)
    if n == 0:
        return {"n": 0}

    def rate(name: str) -> float:
        return float(np.mean([getattr(s, name) for s in scores]))

    shifts = [s.centre_shift_px if s.found else math.inf for s in scores]
    median_shift = float(np.median(shifts))
    psnrs = [s.psnr_outside for s in scores if not math.isnan(s.psnr_outside)]
    return {
        "n": n,
        "success": rate("success"),
        "target": rate("target"),
        "kept": rate("kept"),
        "others_kept": rate("others_kept"),
        "found": rate("found"),
        "iou": rate("iou"),
        "iou_input": rate("iou_input"),
        "centre_shift_px": median_shift if math.isfinite(median_shift) else None,
        "psnr_outside": float(np.mean(psnrs)) if psnrs else None,
    }


def score_world_edits(
    input_scenes: Sequence[Scene],
    edited_images: Sequence[Image.Image | np.ndarray],
    edit: WorldEdit | str,
    input_images: Sequence[Image.Image | np.ndarray] | None = None,
) -> dict:
    """Score many edits of world scenes (a teacher's or a student's); ``aggregate`` plus ``per_image``.

    ``input_images`` default to the scenes' renders (what the editor was given).
    """
    if len(input_scenes) != len(edited_images):
        raise ValueError(f"{len(input_scenes)} scenes but {len(edited_images)} edited images")
    edit = parse_world_edit(edit) if isinstance(edit, str) else edit
    inputs = input_images if input_images is not None else [None] * len(input_scenes)
    scores = [
        score_world_edit(scene, image, edit, input_image=inp)
        for scene, image, inp in zip(input_scenes, edited_images, inputs)
    ]
    return {"edit": edit.name, **aggregate(scores), "per_image": [s.to_dict() for s in scores]}
