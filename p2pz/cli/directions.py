"""The edit direction of an edit given by its words, as the commands compute it for a loaded teacher."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2pz.teacher.directions import EditDirection
    from p2pz.teacher.pipeline import Pix2PixZero


def direction_for(teacher: Pix2PixZero, spec: str) -> EditDirection:
    """A shapes-world edit's direction from the world's captions (how its pairs are made); any other
    edit's from the teacher's sentence banks (templates, seed 0)."""
    from p2pz.data.shapes.edits import is_world_edit, parse_world_edit, world_direction
    from p2pz.teacher.edits import parse_edit

    edit = parse_edit(spec)
    if is_world_edit(edit.source, edit.target):
        return world_direction(teacher, parse_world_edit(spec))
    return teacher.direction(edit.source, edit.target, seed=0)
