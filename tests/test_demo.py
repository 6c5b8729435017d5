"""The main job end to end at toy scale: shards, training, export, bench and a report that holds up."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from p2pz.cli.main import main
from p2pz.data.shapes.teacher_settings import DEMO_PRESET, TOY_GUIDANCE_SCALE, toy_xa_guidance


@pytest.mark.slow
def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--num-pairs",
            "16",
            "--steps",
            "4",
            "--train-steps",
            "10",
            "--test-scenes",
            "4",
            "--bench-backends",
            "eager",
            "pt2",
            "onnx",
            "--bench-batches",
            "1",
            "4",
            "--bench-iters",
            "3",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.glob("shards/pairs-*.tar"))
    assert (out / "direction.safetensors").is_file()  # from the world's captions, shared by both uses
    assert (out / "model" / "config.json").is_file() and (out / "model" / "generator.onnx").is_file()

    # the package is a Hugging Face model folder whose card holds the held-out metrics, the grid and
    # the latency table
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.library_name == "p2pz" and card.data.pipeline_tag == "image-to-image"
    held_out = json.loads((out / "model" / "config.json").read_text())["eval"]
    assert held_out["n"] > 0 and held_out["pairs"] == "held-out" and "oracle" in held_out
    assert f"| {held_out['to_teacher']['psnr']:.3g} |" in card.text
    assert "![input | teacher | student](grid.png)" in card.text
    Image.open(out / "model" / "grid.png").verify()
    assert "| eager |" in card.text and "| onnx |" in card.text  # the latency table

    bench = json.loads((out / "bench.json").read_text())
    assert bench["teacher_ms"] > 0 and bench["teacher_over_student"] > 1  # one pass beats ~100 UNet calls
    assert set(bench["student"]) == {"eager", "pt2", "onnx"}

    scores = json.loads((out / "scores.json").read_text())
    for who in ("teacher", "student"):
        assert scores[who]["n"] == 4 and 0.0 <= scores[who]["success"] <= 1.0

    page = (out / "report.html").read_text()
    assert "teacher_over_student" not in page  # numbers are rendered, not raw keys
    assert f"{bench['teacher_over_student']:.3g}" in page
    # the toy model's teacher settings, stated
    assert (
        f"preset {DEMO_PRESET}, CFG {TOY_GUIDANCE_SCALE:g}, xa guidance {toy_xa_guidance(DEMO_PRESET):g}"
        in page
    )
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) >= 3 * 4 + 1  # the 4-scene grid (input | teacher | student) and the chart
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()


def test_demo_rejects_an_edit_outside_the_world_before_writing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--edit", "cat:dog"]) == 2
    assert "not a shapes-world edit" in capsys.readouterr().err
    assert not out.exists()


def test_demo_rejects_an_unknown_preset_before_writing(tmp_path, capsys):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out), "--preset", "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    assert not out.exists()


def test_demo_trains_through_the_package_with_the_shipped_config(tmp_path, monkeypatch):
    """The training stage runs the installed package's CLI (not a repository file) with configs/cpu.yaml
    as shipped in p2pz.configs, in the caller's folder (relative paths stay valid)."""
    import subprocess
    import sys
    from importlib.resources import files

    from p2pz.cli import demo
    from p2pz.cli.main import build_parser

    args = build_parser().parse_args(["demo", "--out", str(tmp_path)])
    shipped = files("p2pz.configs") / "cpu.yaml"
    assert args.train_config == str(shipped) and shipped.is_file()

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    checkpoint = demo.train_student(args, tmp_path / "shards", tmp_path / "run")
    [(cmd, kwargs)] = calls
    assert cmd[:4] == [sys.executable, "-m", "p2pz.cli.demo", "fit"]  # p2pz train, library noise filtered
    assert cmd[cmd.index("--config") + 1] == str(shipped) and "cwd" not in kwargs
    assert checkpoint == tmp_path / "run" / "checkpoints" / "last.ckpt"
