"""Fidelity to the teacher (p2pz.data.eval.fidelity): PSNR over the image and inside the objects."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from p2pz.data.eval.fidelity import MAX_PSNR, difference_image, fidelity, object_region, psnr_db
from p2pz.data.shapes import world


def scene_pair(seed: int = 3):
    """A circle scene's render and the render of its ideal circle -> square edit."""
    from p2pz.data.shapes.edits import parse_world_edit

    edit = parse_world_edit("circle:square")
    scene = edit.scenes(1, seed=seed)[0]
    return world.render(scene), world.render(edit.apply(scene)), scene


def test_psnr_of_a_known_error():
    a = np.full((64, 64, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[:32] += 10  # MSE 50 over the image, 100 over the top half
    assert psnr_db(a, a) == MAX_PSNR
    assert psnr_db(a, b) == pytest.approx(10 * math.log10(255**2 / 50))
    top = np.zeros((64, 64), dtype=bool)
    top[:32] = True
    assert psnr_db(a, b, top) == pytest.approx(10 * math.log10(255**2 / 100))
    assert math.isnan(psnr_db(a, b, np.zeros((64, 64), dtype=bool)))


def test_object_region_covers_both_objects_and_little_else():
    source, edited, scene = scene_pair()
    region = object_region(source, edited)
    truth = world.object_masks(scene)[0]
    assert region[truth].all()  # the input's object
    square = np.asarray(edited.convert("L")) != np.asarray(source.convert("L"))
    assert region[square].mean() > 0.95  # the edit's changed pixels
    assert region.mean() < 0.6  # not the whole image


def test_ghost_counts_more_inside_the_objects_than_over_the_image():
    """A student that leaves half of the input in its square scores worse in the objects than overall."""
    source, teacher, _ = scene_pair()
    src = np.asarray(source).astype(np.float32)
    tgt = np.asarray(teacher).astype(np.float32)
    ghost = Image.fromarray(np.rint(0.5 * src + 0.5 * tgt).astype(np.uint8))
    result = fidelity([source], [teacher], [ghost])
    assert result["n"] == 1
    assert result["psnr_to_teacher_object_db"] < result["psnr_to_teacher_db"]
    # halving the error is +6 dB over the copy baseline, wherever it is measured
    assert result["psnr_to_teacher_db"] == pytest.approx(result["copy_psnr_to_teacher_db"] + 6.02, abs=0.3)
    assert result["psnr_to_teacher_object_db"] == pytest.approx(
        result["copy_psnr_to_teacher_object_db"] + 6.02, abs=0.3
    )
    perfect = fidelity([source], [teacher], [teacher])
    assert perfect["psnr_to_teacher_db"] == MAX_PSNR


def test_difference_image_is_grey_where_student_and_teacher_agree():
    source, teacher, _ = scene_pair()
    same = np.asarray(difference_image(teacher, teacher))
    assert (same == 128).all()
    diff = np.asarray(difference_image(source, teacher)).astype(int)
    changed = np.asarray(source).astype(int) != np.asarray(teacher).astype(int)
    assert (diff[changed] != 128).mean() > 0.9 and (diff[~changed] == 128).all()


def test_fidelity_rejects_lists_of_different_lengths():
    source, teacher, _ = scene_pair()
    with pytest.raises(ValueError):
        fidelity([source], [teacher], [])


def test_demo_report_shows_fidelity_and_the_difference_images():
    """The demo's held-out table gets a student - teacher column, its scores table the PSNR rows."""
    from p2pz.cli.demo import _fidelity, _held_out_grid, _scores_table

    source, teacher, _ = scene_pair()
    images = {"input": [source, source], "teacher": [teacher, teacher], "student": [source, teacher]}
    fid = _fidelity(images)
    assert fid["per_image"][1]["psnr_to_teacher_db"] == MAX_PSNR
    grid = _held_out_grid(images, {"student": ["not edited", "edited"]}, fid)
    assert grid.count("<img") == 8 and "student − teacher" in grid
    assert grid.index("student</th>") < grid.index("student − teacher")  # after the three pictures
    table = _scores_table({"student": {"success": 0.5}}, fid)
    assert "copy the input" in table and "psnr_to_teacher_object_db" in table
    assert _fidelity({"input": [source], "teacher": [], "student": []}) is None
