"""World scoring: edits of shapes-world scenes scored against ground truth with the oracle."""

import dataclasses
import math

import numpy as np
import pytest

from p2pz.data.eval import world_metrics as wm
from p2pz.data.eval.ablation import ScoreLog
from p2pz.data.shapes import edits as we
from p2pz.data.shapes import world
from p2pz.data.shapes.edits import world_sentence_banks
from p2pz.data.shapes.world import Background, Scene, ShapeObject
from p2pz.utils.errors import UserError

CIRCLE = Scene((ShapeObject("circle", "red", (30.0, 34.0), 26.0),), Background("plain", ("white",)))
TWO = Scene(
    (
        ShapeObject("circle", "blue", (18.0, 18.0), 20.0),
        ShapeObject("square", "green", (45.0, 45.0), 16.0),
    ),
    Background("plain", ("gray",)),
)


def test_parse_world_edit():
    assert we.parse_world_edit("circle:square") == we.WorldEdit("circle", "square", "shape")
    assert we.parse_world_edit("red-to-blue") == we.WorldEdit("red", "blue", "colour")
    assert we.parse_world_edit("circle-to-triangle").name == "circle-to-triangle"
    for bad in ("cat:dog", "circle:red", "circle", "red:red"):
        with pytest.raises(UserError):
            we.parse_world_edit(bad)


def test_unchanged_image_fails_a_shape_edit_but_keeps_structure():
    score = wm.score_world_edit(CIRCLE, world.render(CIRCLE), "circle:square")
    assert not score.success and not score.target and score.kept and score.others_kept
    assert score.iou_input == 1.0 and score.centre_shift_px == 0.0
    assert score.psnr_outside == wm.MAX_PSNR
    assert score.iou < 0.85  # a circle is not the expected square


def test_ideal_edit_succeeds_with_full_overlap():
    edit = we.parse_world_edit("circle:square")
    score = wm.score_world_edit(CIRCLE, world.render(edit.apply(CIRCLE)), edit)
    assert score.success and score.iou == 1.0 and score.centre_shift_px < 0.75
    assert 0.7 < score.iou_input < 0.85  # a square around a circle: about pi / 4


def test_colour_edit_that_also_changes_the_shape_is_not_kept():
    edit = we.parse_world_edit("red:blue")
    assert wm.score_world_edit(CIRCLE, world.render(edit.apply(CIRCLE)), edit).success
    wrong = CIRCLE.replace_object(0, colour="blue", shape="triangle")
    score = wm.score_world_edit(CIRCLE, world.render(wrong), edit)
    assert score.target and not score.kept and not score.success


def test_moved_object_shows_shift_lower_iou_and_background_change():
    edit = we.parse_world_edit("circle:square")
    moved = dataclasses.replace(edit.apply(CIRCLE).objects[0], centre=(34.0, 37.0))
    score = wm.score_world_edit(CIRCLE, world.render(Scene((moved,), CIRCLE.background)), edit)
    assert score.success  # right shape and colour ...
    assert score.centre_shift_px == pytest.approx(5.0, abs=1.0)  # ... but moved by (4, 3)
    assert score.iou < 0.8 and score.psnr_outside < 30


def test_editing_the_wrong_object_breaks_others_kept():
    edit = we.parse_world_edit("circle:square")
    assert wm.score_world_edit(TWO, world.render(edit.apply(TWO)), edit).success
    wrong = TWO.replace_object(1, colour="yellow")  # the circle untouched, the other object recoloured
    score = wm.score_world_edit(TWO, world.render(edit.apply(wrong)), edit)
    assert score.target and not score.others_kept and not score.success


def test_missing_object_counts_as_infinite_shift_in_the_median():
    blank = np.full((64, 64, 3), 245, dtype=np.uint8)
    edit = we.parse_world_edit("circle:square")
    lost = wm.score_world_edit(CIRCLE, blank, edit)
    assert not lost.found and lost.iou == 0.0 and math.isnan(lost.centre_shift_px)
    good = wm.score_world_edit(CIRCLE, world.render(edit.apply(CIRCLE)), edit)
    agg = wm.aggregate([lost, lost, good])
    assert agg["success"] == pytest.approx(1 / 3) and agg["found"] == pytest.approx(1 / 3)
    assert agg["centre_shift_px"] is None  # median of (inf, inf, ~0)
    assert wm.aggregate([lost, good, good])["centre_shift_px"] < 1.0


def test_score_world_edits_on_many_scenes_and_from_readings():
    edit = we.parse_world_edit("red:green")
    scenes = edit.scenes(6, seed=3)
    assert all(s.objects[0].colour == "red" for s in scenes)
    ideal = [world.render(edit.apply(s)) for s in scenes]
    report = wm.score_world_edits(scenes, ideal, edit)
    assert report["success"] == 1.0 and report["iou"] > 0.97 and len(report["per_image"]) == 6
    unchanged = wm.score_world_edits(scenes, [world.render(s) for s in scenes], edit)
    assert unchanged["success"] == 0.0 and unchanged["iou_input"] == 1.0
    # Without ground truth: the scene and masks as the oracle reads the input.
    scene, masks = wm.scene_from_image(world.render(scenes[0]))
    score = wm.score_world_edit(scene, ideal[0], edit, input_image=world.render(scenes[0]), input_masks=masks)
    assert score.success and score.iou > 0.9


def test_sentence_banks_differ_by_the_edited_word_only():
    source, target = world_sentence_banks(we.parse_world_edit("circle:square"))
    assert len(source) == len(world.TOY_COLOURS) * len(world.TOY_BACKGROUNDS)
    for s, t in zip(source, target):
        assert "circle" in s and s.replace("circle", "square") == t


# A reconstruction as the ablation scores it: an edit that changes nothing, a 2 px shifted circle
RECONSTRUCTION = wm.score_world_edit(
    CIRCLE,
    world.render(Scene((ShapeObject("circle", "red", (32.0, 34.0), 26.0),), CIRCLE.background)),
    we.WorldEdit("circle", "circle", "shape"),
)


def test_a_reconstruction_is_scored_against_its_input():
    assert RECONSTRUCTION.success and RECONSTRUCTION.centre_shift_px == pytest.approx(2.0, abs=0.6)
    assert 0.7 < RECONSTRUCTION.iou < 0.95


def test_score_log_resumes_only_matching_settings(tmp_path):
    path = tmp_path / "log.jsonl"
    edit = we.parse_world_edit("circle:square")
    score = wm.score_world_edit(CIRCLE, world.render(CIRCLE), edit)
    log = ScoreLog(path, {"steps": 2})
    log.add("circle-to-square", "direction", 3, score, RECONSTRUCTION)
    with open(path, "a") as f:
        f.write('{"settings": "cut in the mid')  # a line cut by kill -9
    again = ScoreLog(path, {"steps": 2}).done("circle-to-square", "direction")
    assert list(again) == [3] and ScoreLog.to_score(again[3]) == score
    assert again[3]["reconstruction_iou"] == RECONSTRUCTION.iou
    assert again[3]["reconstruction_shift_px"] == RECONSTRUCTION.centre_shift_px
    assert ScoreLog(path, {"steps": 50}).done("circle-to-square", "direction") == {}


def test_score_log_shares_unguided_rows_across_guidance_steps(tmp_path):
    path = tmp_path / "log.jsonl"
    score = wm.score_world_edit(CIRCLE, world.render(CIRCLE), "circle:square")
    log = ScoreLog(path, {"steps": 2, "xa_guidance": 10.0})
    log.add("circle-to-square", "word_swap", 0, score, RECONSTRUCTION)
    log.add("circle-to-square", "direction_xa", 0, score, RECONSTRUCTION)
    other = ScoreLog(path, {"steps": 2, "xa_guidance": 20.0})
    assert list(other.done("circle-to-square", "word_swap")) == [0]
    assert other.done("circle-to-square", "direction_xa") == {}


def test_score_log_keeps_guided_scenes_to_the_step_they_ran_at(tmp_path):
    """With ``auto`` the key holds no step: a changed calibration must not reuse the old step's scenes."""
    path = tmp_path / "log.jsonl"
    score = wm.score_world_edit(CIRCLE, world.render(CIRCLE), "circle:square")
    log = ScoreLog(path, {"steps": 2, "xa_guidance": "auto"})
    log.add("circle-to-square", "direction_xa", 0, score, RECONSTRUCTION, 15.0)
    log.add("circle-to-square", "direction_xa", 1, score, RECONSTRUCTION)  # as older logs: no step
    again = ScoreLog(path, {"steps": 2, "xa_guidance": "auto"})
    assert list(again.done("circle-to-square", "direction_xa", 15.0)) == [0, 1]
    assert list(again.done("circle-to-square", "direction_xa", 10.0)) == [1]
    assert list(again.done("circle-to-square", "direction_xa")) == [0, 1]


def test_score_log_shares_unguided_rows_across_guided_branches_only(tmp_path):
    from p2pz.data.shapes.presets import BOX
    from p2pz.teacher.presets import DIFFUSERS, JOINT, OFFICIAL, PAPER

    path = tmp_path / "log.jsonl"
    score = wm.score_world_edit(CIRCLE, world.render(CIRCLE), "circle:square")
    log = ScoreLog(path, {"preset": OFFICIAL.to_dict(), "xa_guidance": 20.0})
    log.add("circle-to-square", "direction", 0, score, RECONSTRUCTION)
    log.add("circle-to-square", "direction_xa", 0, score, RECONSTRUCTION)
    paper = ScoreLog(path, {"preset": PAPER.to_dict(), "xa_guidance": 20.0})
    assert list(paper.done("circle-to-square", "direction")) == [0]  # no guidance: the branch is unused
    assert paper.done("circle-to-square", "direction_xa") == {}
    joint = ScoreLog(path, {"preset": JOINT.to_dict(), "xa_guidance": 20.0})  # another VAE noise
    assert joint.done("circle-to-square", "direction") == {}
    other = ScoreLog(path, {"preset": DIFFUSERS.to_dict(), "xa_guidance": 20.0})  # another inversion
    assert other.done("circle-to-square", "direction") == {}
    joint.add("circle-to-square", "direction", 1, score, RECONSTRUCTION)
    joint.add("circle-to-square", "direction_xa", 1, score, RECONSTRUCTION)
    box = ScoreLog(path, {"preset": BOX.to_dict(), "xa_guidance": 20.0})  # another negative prompt
    assert box.done("circle-to-square", "direction") == {}
    joint_empty = dataclasses.replace(JOINT, negative_prompt_real="empty")
    ScoreLog(path, {"preset": joint_empty.to_dict(), "xa_guidance": 20.0}).add(
        "circle-to-square", "direction", 2, score, RECONSTRUCTION
    )
    box = ScoreLog(path, {"preset": BOX.to_dict(), "xa_guidance": 20.0})  # box guidance: guided rows only
    assert list(box.done("circle-to-square", "direction")) == [2]
    assert box.done("circle-to-square", "direction_xa") == {}


def test_score_log_guidance_terms_change_guided_rows_only_and_old_logs_resume(tmp_path):
    """A preset's guidance terms run with guided edits only, so runs that differ in them share their
    unguided rows; logs written before the ``guidance_terms`` field resume under presets without any."""
    import json

    from p2pz.data.shapes.presets import BOX, BOX_PIXELS
    from p2pz.teacher.presets import JOINT, LOCAL

    path = tmp_path / "log.jsonl"
    score = wm.score_world_edit(CIRCLE, world.render(CIRCLE), "circle:square")
    old_preset = {k: v for k, v in JOINT.to_dict().items() if k != "guidance_terms"}  # before the field
    old = ScoreLog(path, {"preset": old_preset, "xa_guidance": 5.0})
    old.add("circle-to-square", "direction", 0, score, RECONSTRUCTION)
    old.add("circle-to-square", "direction_xa", 0, score, RECONSTRUCTION)
    assert '"guidance_terms"' not in path.read_text()
    joint = ScoreLog(path, {"preset": JOINT.to_dict(), "xa_guidance": 5.0})
    assert list(joint.done("circle-to-square", "direction_xa")) == [0]  # the old log still resumes
    local = ScoreLog(path, {"preset": LOCAL.to_dict(), "xa_guidance": 5.0})
    assert list(local.done("circle-to-square", "direction")) == [0]  # no guidance: no terms
    assert local.done("circle-to-square", "direction_xa") == {}
    local.add("circle-to-square", "direction_xa", 1, score, RECONSTRUCTION)
    assert json.loads(path.read_text().splitlines()[-1])["settings"] == local.key("direction_xa")
    assert '"term": "local"' in local.key("direction_xa")
    box = ScoreLog(path, {"preset": BOX.to_dict(), "xa_guidance": 5.0})
    box.add("circle-to-square", "direction", 2, score, RECONSTRUCTION)
    pixels = ScoreLog(path, {"preset": BOX_PIXELS.to_dict(), "xa_guidance": 5.0})
    assert list(pixels.done("circle-to-square", "direction")) == [2]  # another term: guided rows only
    assert box.key("direction_xa") != pixels.key("direction_xa")


def test_score_log_keeps_calibrations_for_the_guided_rows_settings(tmp_path):
    path = tmp_path / "log.jsonl"
    calibration = {"edit": "circle:square", "chosen": 5.0, "rows": [{"xa_guidance": 5.0, "success": 1.0}]}
    ScoreLog(path, {"steps": 2, "xa_guidance": "auto"}).add_calibration("circle-to-square", calibration)
    assert ScoreLog(path, {"steps": 2, "xa_guidance": "auto"}).calibration("circle-to-square") == calibration
    assert ScoreLog(path, {"steps": 3, "xa_guidance": "auto"}).calibration("circle-to-square") is None
    assert ScoreLog(path, {"steps": 2, "xa_guidance": "auto"}).done("circle-to-square", "direction_xa") == {}


def test_reconstruction_figures_have_one_definition_for_live_and_logged_rows():
    from p2pz.data.eval.ablation import reconstruction_summary

    # a row as it runs (NaN: object not found) and as its log reads back (None), even count: true median
    live = reconstruction_summary([1.0, float("nan"), 3.0], [0.9, 0.8])
    logged = reconstruction_summary([1.0, None, 3.0], [0.9, 0.8])
    assert live == logged == {"reconstruction_shift_px": 2.0, "reconstruction_iou": pytest.approx(0.85)}
    assert reconstruction_summary([], [0.9, None])["reconstruction_iou"] is None  # a log older than the IoU


def test_score_log_reruns_unguided_rows_for_box_edges_negative_prompt(tmp_path):
    """The caption's share of the negative prompt changes every row, not only the guided one."""
    from p2pz.data.shapes.presets import BOX_EDGES, BOX_PIXELS

    path = tmp_path / "log.jsonl"
    score = wm.score_world_edit(CIRCLE, world.render(CIRCLE), "circle:square")
    pixels = ScoreLog(path, {"preset": BOX_PIXELS.to_dict(), "xa_guidance": 2.0})
    pixels.add("circle-to-square", "direction", 0, score, RECONSTRUCTION)
    edges = ScoreLog(path, {"preset": BOX_EDGES.to_dict(), "xa_guidance": 2.0})
    assert edges.done("circle-to-square", "direction") == {}  # another negative prompt
