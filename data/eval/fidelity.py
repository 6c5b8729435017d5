"""Fidelity of a student to its teacher: how close the student's edits are to the teacher's own.

The student distils a deterministic teacher, so every input has an exact target: the teacher's edit
of it. For each (input, teacher's edit, student's edit) triple of 8-bit RGB images:

- **psnr_to_teacher_db**: PSNR (dB, peak 255) of the student's edit to the teacher's over the whole
  image;
- **psnr_to_teacher_object_db**: the same over the *object region*: the union of the objects' masks
  in the input and in the teacher's edit (the oracle's readings, grown by 1 px for anti-aliased rims).
  That is where the edit happens, and where a student that half-copies its input leaves a ghost of
  the source shape; the background, which is easy, does not dilute it;
- the same two figures for the **copy** baseline (the input itself as the "edit"): a student must
  beat it by a wide margin to have learned anything.

Figures over many images are the means of the per-image dB values (a perfect image counts
``MAX_PSNR``). :func:`difference_image` renders student − teacher for the demo's report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from p2pz.data.eval.world_metrics import MAX_PSNR, RIM_PX, as_array, psnr
from p2pz.data.shapes import oracle

DIFF_GAIN = 4.0  # the difference image's contrast: a 32-level error is a full swing from grey

ImageLike = Image.Image | np.ndarray


def object_region(input_image: ImageLike, teacher_image: ImageLike) -> np.ndarray:
    """Bool mask of the objects in the input and in the teacher's edit (union, grown by ``RIM_PX``).

    Empty only when the oracle finds no object in either image.
    """
    masks = [o.mask for image in (input_image, teacher_image) for o in oracle.read(as_array(image)).objects]
    if not masks:
        return np.zeros(as_array(input_image).shape[:2], dtype=bool)
    return oracle.dilate(np.logical_or.reduce(masks), RIM_PX)


def psnr_db(a: ImageLike, b: ImageLike, where: np.ndarray | None = None) -> float:
    """PSNR in dB (peak 255) of two images, over ``where`` (default: every pixel); NaN if it is empty."""
    a, b = as_array(a), as_array(b)
    return psnr(a, b, np.ones(a.shape[:2], dtype=bool) if where is None else where)


def pair_fidelity(
    input_image: ImageLike,
    teacher_image: ImageLike,
    student_image: ImageLike,
    region: np.ndarray | None = None,
) -> dict[str, float]:
    """The four figures for one scene (``region``: its :func:`object_region`, computed if not given)."""
    region = object_region(input_image, teacher_image) if region is None else region
    return {
        "psnr_to_teacher_db": psnr_db(student_image, teacher_image),
        "psnr_to_teacher_object_db": psnr_db(student_image, teacher_image, region),
        "copy_psnr_to_teacher_db": psnr_db(input_image, teacher_image),
        "copy_psnr_to_teacher_object_db": psnr_db(input_image, teacher_image, region),
    }


def fidelity(
    inputs: Sequence[ImageLike],
    teacher: Sequence[ImageLike],
    student: Sequence[ImageLike],
    regions: Sequence[np.ndarray] | None = None,
) -> dict:
    """Mean figures over many scenes (NaNs left out), plus ``per_image``; see the module docstring.

    ``regions`` (the scenes' :func:`object_region` masks) may be computed once and passed again when
    the same scenes are scored many times (a learning curve).
    """
    if not (len(inputs) == len(teacher) == len(student)):
        raise ValueError(f"{len(inputs)} inputs, {len(teacher)} teacher and {len(student)} student images")
    if regions is None:
        regions = [object_region(x, t) for x, t in zip(inputs, teacher)]
    per_image = [pair_fidelity(x, t, s, r) for x, t, s, r in zip(inputs, teacher, student, regions)]
    means = {}
    for key in per_image[0] if per_image else ():
        values = [p[key] for p in per_image if not math.isnan(p[key])]
        means[key] = float(np.mean(values)) if values else None
    return {"n": len(per_image), **means, "per_image": per_image}


def difference_image(
    student_image: ImageLike, teacher_image: ImageLike, gain: float = DIFF_GAIN
) -> Image.Image:
    """Student − teacher per channel, on grey: grey where they agree, ``gain`` times the difference."""
    diff = as_array(student_image).astype(np.float32) - as_array(teacher_image).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(128.0 + gain * diff), 0, 255).astype(np.uint8))


__all__ = ["MAX_PSNR", "difference_image", "fidelity", "object_region", "pair_fidelity", "psnr_db"]
