"""``p2pz eval``: the teacher scored on world scenes end to end, and existing pairs from shards."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from p2pz.cli.main import main
from p2pz.data.shapes import world
from p2pz.data.shapes.edits import parse_world_edit


def test_eval_world_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--world",
            "--model",
            str(tiny_model_dir),
            "--edit",
            "circle:square",
            "--edit",
            "red:blue",
            "--scenes",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["kind"] == "world" and report["settings"]["row"] == "direction_xa"
    assert set(report["metrics"]) == {"circle-to-square", "red-to-blue"}
    for m in report["metrics"].values():
        assert m["n"] == 2 and len(m["per_image"]) == 2
        assert 0.0 <= m["success"] <= 1.0 and 0.0 <= m["iou"] <= 1.0
        assert {"centre_shift_px", "psnr_outside", "reconstruction_shift_px"} <= set(m)
    grid = Image.open(out / "grid.png")
    assert grid.width >= 2 * 2 * 128 and grid.height > 128
    assert "circle-to-square" in capsys.readouterr().out


def test_eval_world_needs_a_world_edit(tiny_model_dir, tmp_path, capsys):
    rc = main(
        ["eval", "--world", "--model", str(tiny_model_dir), "--edit", "cat:dog", "--out", str(tmp_path)]
    )
    assert rc == 2 and "not a shapes-world edit" in capsys.readouterr().err


def _write_world_shard(path, edit, scenes, ideal: bool):
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for i, scene in enumerate(scenes):
            src, out = world.render(scene), world.render(edit.apply(scene) if ideal else scene)
            sample = {
                "__key__": f"k{i:03d}",
                "json": {"caption": scene.caption, "edit": {"source": edit.source, "target": edit.target}},
            }
            for name, image in (("src.png", src), ("edit.png", out)):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                sample[name] = buf.getvalue()
            sink.write(sample)


@pytest.mark.parametrize("ideal", [True, False])
def test_eval_pairs_scores_world_shards_with_world_metrics(tmp_path, ideal):
    edit = parse_world_edit("circle:triangle")
    shards = tmp_path / "pairs"
    shards.mkdir()
    _write_world_shard(shards / "pairs-000000.tar", edit, edit.scenes(3, seed=5), ideal)
    _write_world_shard(shards / "pairs-000001.tar", edit, edit.scenes(5, seed=5)[3:], ideal)
    out = tmp_path / "eval"
    assert main(["eval", "--pairs", str(shards), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]["circle-to-triangle"]
    assert m["metrics"] == "world" and m["n"] == 5
    if ideal:
        assert m["success"] == 1.0 and m["iou"] > 0.9
    else:
        assert m["success"] == 0.0 and m["iou_input"] == 1.0
    assert (out / "grid.png").is_file()


def test_eval_pairs_skips_what_it_cannot_read_and_scores_the_rest(tmp_path, capsys):
    """A corrupt image in one pair and a shard cut short: each named on stderr with why, the other pairs
    scored and written, then one error line and exit 2."""
    import tarfile

    edit = parse_world_edit("circle:triangle")
    scenes = edit.scenes(8, seed=5)
    shards = tmp_path / "pairs"
    shards.mkdir()
    _write_world_shard(shards / "pairs-000000.tar", edit, scenes[:3], True)
    _write_world_shard(tmp_path / "whole.tar", edit, scenes[3:6], True)
    with tarfile.open(tmp_path / "whole.tar") as whole, tarfile.open(shards / "pairs-000001.tar", "w") as tar:
        for info in whole.getmembers():
            data = whole.extractfile(info).read()
            if info.name == "k001.src.png":
                data = data[: len(data) // 2]  # a truncated PNG inside a readable shard
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _write_world_shard(tmp_path / "cut.tar", edit, scenes[6:], True)
    with tarfile.open(tmp_path / "cut.tar") as whole:  # cut inside the second pair's first member
        cut = next(m for m in whole.getmembers() if m.name.startswith("k001")).offset_data + 10
    (shards / "pairs-000002.tar").write_bytes((tmp_path / "cut.tar").read_bytes()[:cut])
    out = tmp_path / "eval"
    assert main(["eval", "--pairs", str(shards), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines[0].startswith(f"skipped {shards / 'pairs-000001.tar'}:k001: corrupt pair"), lines
    assert lines[1].startswith(f"skipped {shards / 'pairs-000002.tar'}: damaged shard"), lines
    assert len(lines) == 3 and lines[2].startswith("error: 2 inputs skipped"), lines
    assert str(out / "metrics.json") in lines[2] and "(2 skipped)" in captured.out
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["circle-to-triangle"]["n"] == report["settings"]["count"] == 3 + 2 + 1
    assert [s["input"] for s in report["skipped"]] == [
        f"{shards / 'pairs-000001.tar'}:k001",
        str(shards / "pairs-000002.tar"),
    ]
    assert (out / "grid.png").is_file()


def test_a_damaged_mask_costs_its_pair_bg_lpips_only(tmp_path):
    """--masks: a mask that cannot be read is named and left out; its pair is still scored."""
    import argparse

    from p2pz.cli.evaluate import _mask_for
    from p2pz.cli.skipped import Skipped

    (tmp_path / "k000.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    Image.new("L", (64, 64), 255).save(tmp_path / "k001.png")
    args, skipped = argparse.Namespace(masks=str(tmp_path)), Skipped("inputs")
    assert _mask_for(args, "k000", skipped) is None
    assert _mask_for(args, "k001", skipped).mode == "L"
    assert [name for name, _ in skipped.inputs] == [str(tmp_path / "k000.png")]


def test_word_swap_direction_turns_the_caption_into_the_swapped_one(tiny_model_dir):
    import torch

    from p2pz.data.shapes.edits import word_swap_directions
    from p2pz.teacher import Pix2PixZero

    teacher = Pix2PixZero.from_pretrained(tiny_model_dir, captioner=False)
    edit = parse_world_edit("red:blue")
    white, gray = world.Background("plain", ("white",)), world.Background("plain", ("gray",))
    scenes = [
        world.Scene((world.ShapeObject("circle", "red", (30.0, 30.0), 20.0),), white),
        world.Scene((world.ShapeObject("square", "red", (20.0, 40.0), 24.0),), gray),
    ]
    [first, second] = word_swap_directions(teacher, scenes, edit)
    swapped = teacher.encode_text([edit.apply(s).caption for s in scenes])
    original = teacher.encode_text([s.caption for s in scenes])
    assert torch.allclose(original[0] + first.tensor, swapped[0], atol=1e-5)
    assert torch.allclose(original[1] + second.tensor, swapped[1], atol=1e-5)
    assert not torch.allclose(first.tensor, second.tensor)  # each scene its own caption


def copying_student_package(root: Path, teacher_model: object) -> Path:
    """An exported lite student that returns its input exactly (a zero residual), trained on
    circle:square pairs of ``teacher_model`` as far as its config.json says."""
    import torch

    from p2pz.student.export import export_package
    from p2pz.student.training import StudentModule

    module = StudentModule(resolution=64, preset="lite", lpips_weight=0.0, generator={"input_residual": True})
    for name, p in module.g_ema.named_parameters():
        if "torgb" in name:
            p.data.zero_()  # the skip-RGB sum is 0: the output is the input
    torch.save(
        {"state_dict": module.state_dict(), "generator_config": dict(module.g_ema.config)}, root / "c.ckpt"
    )
    out = export_package(root / "c.ckpt", root / "model", formats=())
    config = json.loads((out / "config.json").read_text())
    config["data"] = {
        "edit": {"name": "circle-to-square", "source": "circle", "target": "square"},
        "teacher": {"model": str(teacher_model), "preset": "joint", "overrides": {"num_steps": 2}},
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_eval_student_scores_fidelity_to_the_teacher(tiny_model_dir, tmp_path, capsys):
    """A student that copies its input scores exactly the copy baseline's PSNR to the teacher."""
    package = copying_student_package(tmp_path, tiny_model_dir)
    out = tmp_path / "eval"
    assert main(["eval", "--student", str(package), "--scenes", "2", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["kind"] == "student"
    assert (
        report["settings"]["teacher"]["preset"] == "joint" and report["settings"]["teacher"]["num_steps"] == 2
    )
    student = report["metrics"]["circle-to-square (student)"]
    teacher = report["metrics"]["circle-to-square (teacher)"]
    assert student["n"] == teacher["n"] == 2
    assert student["psnr_to_teacher_db"] == pytest.approx(student["copy_psnr_to_teacher_db"], abs=0.05)
    assert student["psnr_to_teacher_object_db"] == pytest.approx(
        student["copy_psnr_to_teacher_object_db"], abs=0.05
    )
    assert student["success"] == 0.0  # a copy never edits
    assert {"psnr_to_teacher_db", "iou"} <= set(student["per_image"][0])
    grid = Image.open(out / "grid.png")
    assert grid.width >= 4 * 128  # input | teacher | student | difference
    assert "psnr_to_teacher_db" in capsys.readouterr().out


def test_eval_student_needs_the_edit_in_the_package(tmp_path, capsys):
    package = copying_student_package(tmp_path, "unused")
    config = json.loads((package / "config.json").read_text())
    config["data"] = {}
    (package / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--student", str(package), "--out", str(tmp_path / "eval")]) == 2
    assert "which edit" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
