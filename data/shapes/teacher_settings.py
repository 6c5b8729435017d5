"""The teacher's settings for the toy model, where they differ from the presets' SD-1.4 values.

Same teacher code, same presets: these are the values to pass as ``preset``, ``xa_guidance`` and
``guidance_scale`` when the teacher is the toy model, and the commands' defaults on it.

- The guidance loss sums squared map differences over layers, heads, tokens and map sizes, so the
  scale of its gradient is the model's: the official step 0.1 (tuned on SD-1.4) moves nothing here.
- ``TOY_PRESET``, ``box_edges``: box guidance keeps the edited object in the input object's box,
  which the world's ideal edit keeps and cross-attention guidance alone does not
  (``p2pz.data.shapes.presets``).
- ``TOY_XA_GUIDANCE``, 5: box guidance's step, and the base that ``--xa-guidance auto`` calibrates
  around; ``JOINT_XA_GUIDANCE``, 15: that of the presets without box guidance (``joint``, ``local``);
  ``EDIT_BRANCH_XA_GUIDANCE``, 2.5: box guidance's by the edit branch's maps alone on every step
  (``box_edges_fast``), whose calibration chose the smaller steps (``toy_calibration_base``).
- ``TOY_GUIDANCE_SCALE``, 3: a stronger CFG regenerates colour edits from scratch.

What each value does, in docs/shapes-world.md ("Its teacher settings"); the sweeps that chose them,
in docs/results/toy-teacher-settings.md, docs/results/box-guidance.md and
docs/results/toy-ablation.md.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from p2pz.utils.values import non_negative_float

if TYPE_CHECKING:
    from p2pz.teacher.presets import Preset

TOY_PRESET = "box_edges"
TOY_XA_GUIDANCE = 5.0
TOY_GUIDANCE_SCALE = 3.0
JOINT_XA_GUIDANCE = 15.0  # the step of ``joint`` (no box guidance)
# box guidance by the edit branch alone, on every step (box_edges_fast): its calibration picks smaller
# steps than box_edges' (around 2.5 and around 2 compared: docs/results/cheap-teacher.md)
EDIT_BRANCH_XA_GUIDANCE = 2.5
# The demo's teacher (20 DDIM steps, circle -> square) is ``joint`` at 15: box guidance's step was
# found at 50 steps, and at 20 it moved the objects more and kept less of the background, and the
# demo's student came out further from its teacher (docs/results/demo.md).
DEMO_PRESET = "joint"
AUTO = "auto"  # --xa-guidance auto: calibrate the step per edit (p2pz.data.eval.calibration)


def xa_guidance_value(text: str) -> float | str:
    """``--xa-guidance``'s value: a step (a finite number >= 0; 0 turns the guidance off), or ``auto``."""
    if str(text).strip().lower() == AUTO:
        return AUTO
    try:
        return non_negative_float(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err} (or 'auto')") from None


def toy_xa_guidance(preset: str) -> float:
    """The toy model's guidance step for ``preset``: box guidance's (``toy_calibration_base``), or 15
    without it."""
    from p2pz.teacher.presets import get_preset

    return toy_calibration_base(preset) if _has_box_guidance(get_preset(preset)) else JOINT_XA_GUIDANCE


def toy_calibration_base(preset: Preset | str) -> float:
    """The step ``--xa-guidance auto`` calibrates around on the toy model: 5, or 2.5 for a box
    preset whose guidance forward runs the edit branch only, on every step (``box_edges_fast``)."""
    from p2pz.teacher.presets import get_preset

    preset = get_preset(preset) if isinstance(preset, str) else preset
    by_the_edit_branch = preset.guided_branch == "edit" and preset.guided_stride == 1
    return EDIT_BRANCH_XA_GUIDANCE if by_the_edit_branch and _has_box_guidance(preset) else TOY_XA_GUIDANCE


def _has_box_guidance(preset: Preset) -> bool:
    from p2pz.data.shapes.box_guidance import BoxTerm

    return any(isinstance(term, BoxTerm) for term in preset.guidance_terms)


def add_toy_teacher_arguments(
    parser: argparse.ArgumentParser, xa_default: float | str = TOY_XA_GUIDANCE, preset: str = TOY_PRESET
) -> None:
    """``--preset``, ``--xa-guidance`` (a step or ``auto``) and ``--guidance-scale``, defaulting to
    the toy model's values (``xa_default``: the step's default, e.g. ``auto``; ``preset``: the
    preset's default)."""
    from p2pz.teacher.presets import add_preset_argument

    toy = "the toy model's" if preset == TOY_PRESET else f"the toy model's: {TOY_PRESET}"
    add_preset_argument(parser, preset, f"{preset}, {toy}" if preset == TOY_PRESET else f"{preset}; {toy}")
    parser.add_argument(
        "--xa-guidance",
        type=xa_guidance_value,
        default=xa_default,
        help=f"cross-attention guidance step, or 'auto': calibrated per edit on seeded scenes at "
        f"steps around {toy_xa_guidance(preset):g}, see 'p2pz calibrate --help' (default: {xa_default}; "
        "the presets' 0.1 is tuned for SD-1.4; see data/shapes/teacher_settings.py)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=non_negative_float,
        default=TOY_GUIDANCE_SCALE,
        help=f"classifier-free guidance (default: {TOY_GUIDANCE_SCALE:g}, the toy model's)",
    )
