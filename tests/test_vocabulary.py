"""A world model's vocabulary: edits with words it never learned are refused, in every command.

The toy model learned three shapes and four colours (``data/toy_model/vocabulary.json``); the world
also knows ``diamond``, ``purple`` and ``orange``, whose untrained embeddings make an edit score 0.
Every command that takes a model and an edit refuses such an edit with one line naming the model's
vocabulary, before loading anything and without writing its output.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2pz.cli.main import main
from p2pz.data.models import TOY_MODEL
from p2pz.data.shapes import world
from p2pz.data.shapes.edits import (
    check_edit_vocabulary,
    model_vocabulary,
    parse_world_edit,
    write_vocabulary,
)
from p2pz.teacher.edits import parse_edit
from p2pz.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_toy_model_declares_what_it_learned():
    assert model_vocabulary(TOY_MODEL) == {
        "shapes": list(world.TOY_SHAPES),
        "colours": list(world.TOY_COLOURS),
        "backgrounds": list(world.TOY_BACKGROUNDS),
    }


@pytest.mark.parametrize("spec, unknown", [("circle:diamond", "diamond"), ("purple:red", "purple")])
def test_an_edit_outside_the_vocabulary_is_refused_naming_it(spec, unknown):
    parse_world_edit(spec)  # a world edit ...
    with pytest.raises(UserError) as err:
        parse_world_edit(spec, TOY_MODEL)  # ... the toy model never learned
    message = str(err.value)
    assert "\n" not in message and f"never learned {unknown}" in message
    assert "circle, square, triangle" in message and "red, green, blue, yellow" in message


def test_edits_inside_the_vocabulary_and_models_without_one_pass(tmp_path):
    for spec in ("circle:triangle", "yellow:blue", "square:circle"):
        assert parse_world_edit(spec, TOY_MODEL).spec == spec
    check_edit_vocabulary(parse_edit("cat:dog"), tmp_path)  # no vocabulary.json: Stable Diffusion
    with pytest.raises(UserError, match="never learned cat, dog"):
        check_edit_vocabulary(parse_edit("cat:dog"), TOY_MODEL)


@pytest.mark.parametrize("text", ["", "[1, 2]", '{"shapes": "circle"}', "\xff\xfe"])
def test_a_broken_vocabulary_file_is_one_line(tmp_path, text):
    (tmp_path / "vocabulary.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match="is not a vocabulary file"):
        model_vocabulary(tmp_path)


def test_write_vocabulary_round_trips(tmp_path):
    write_vocabulary(tmp_path, shapes=("circle",), colours=("red", "blue"), backgrounds=("white",))
    with pytest.raises(UserError, match="never learned square"):
        parse_world_edit("circle:square", tmp_path)
    assert parse_world_edit("red:blue", tmp_path).attribute == "colour"


def _refused(capsys, argv: list[str], out: Path) -> None:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "never learned diamond" in lines[0]
    assert not out.exists()


def test_generate_eval_and_demo_refuse_it(tmp_path, capsys):
    model = str(TOY_MODEL)
    _refused(
        capsys,
        [
            "generate",
            "--model",
            model,
            "--edit",
            "circle:diamond",
            "--synthetic",
            "--out",
            str(tmp_path / "g"),
        ],
        tmp_path / "g",
    )
    _refused(
        capsys,
        ["eval", "--world", "--model", model, "--edit", "circle:diamond", "--out", str(tmp_path / "e")],
        tmp_path / "e",
    )
    _refused(capsys, ["demo", "--edit", "circle:diamond", "--out", str(tmp_path / "d")], tmp_path / "d")


def _never_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded before the edit's words were checked")


@pytest.mark.parametrize("command", ["edit", "direction", "generate"])
def test_the_teacher_commands_refuse_it_before_loading_the_model(command, tmp_path, capsys, monkeypatch):
    """``--target hexagon`` on the toy model: one line naming the word and listing the known ones, exit 2."""
    from PIL import Image

    from p2pz.teacher import models, pipeline

    monkeypatch.setattr(pipeline.Pix2PixZero, "from_pretrained", _never_loaded)
    monkeypatch.setattr(models, "load_sd_components", _never_loaded)
    model, out = str(TOY_MODEL), tmp_path / "out"
    if command == "edit":
        Image.new("RGB", (64, 64), "white").save(tmp_path / "scene.png")
        argv = ["edit", "--model", model, "--image", str(tmp_path / "scene.png"), "--caption", "a circle"]
        argv += ["--source", "circle", "--target", "hexagon", "--out", str(out / "edit.png")]
    elif command == "direction":
        argv = ["direction", "--model", model, "--source", "circle", "--target", "hexagon", "--out", str(out)]
    else:
        argv = ["generate", "--model", model, "--edit", "circle:hexagon", "--synthetic", "--out", str(out)]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "never learned hexagon" in lines[0], lines
    assert "circle, square, triangle" in lines[0] and "red, green, blue, yellow" in lines[0]
    assert not out.exists()


def test_words_it_learned_pass_the_check(tmp_path, capsys, monkeypatch):
    """The same command with a known word gets past the check (to the model, stopped here)."""
    from p2pz.teacher import models

    monkeypatch.setattr(models, "load_sd_components", _never_loaded)
    argv = ["direction", "--model", str(TOY_MODEL), "--source", "circle", "--target", "square"]
    with pytest.raises(AssertionError, match="a model was loaded"):
        main([*argv, "--out", str(tmp_path / "out")])


def test_the_ablation_refuses_it(tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "toy_ablation.py"), "--edits", "circle:diamond"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "never learned diamond" in run.stderr


def test_the_ablation_covers_what_the_toy_model_learned():
    from p2pz.data.shapes.edits import world_edits

    edits = world_edits(TOY_MODEL)
    shapes = [e for e in edits if e.attribute == "shape"]
    colours = [e for e in edits if e.attribute == "colour"]
    assert len(shapes) == 6 and {e.source for e in shapes} == set(world.TOY_SHAPES)  # 3 shapes, both ways
    assert len(colours) >= 6 and {e.spec for e in colours} >= {"red:blue", "blue:yellow", "yellow:red"}
    assert len({e.spec for e in edits}) == len(edits)
    for edit in edits:
        check_edit_vocabulary(edit, TOY_MODEL)


def test_the_ablation_reports_the_mean_and_the_worst_edit():
    from p2pz.data.eval.ablation import across_edits

    results = {
        "circle-to-square/direction_xa": {"success": 1.0, "iou": 0.9, "centre_shift_px": 0.5},
        "circle-to-triangle/direction_xa": {"success": 0.5, "iou": 0.5, "centre_shift_px": 3.0},
        "circle-to-square/direction": {"success": 1.0, "iou": 0.6, "centre_shift_px": 2.0},
    }
    summary = across_edits(results)
    assert summary["mean/direction_xa"] == pytest.approx(
        {"success": 0.75, "iou": 0.7, "centre_shift_px": 1.75}
    )
    assert summary["worst/direction_xa"]["edit"] == "circle-to-triangle"
    assert "mean/direction" not in summary  # one edit: nothing to summarise
