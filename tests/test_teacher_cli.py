"""``p2pz edit`` on the tiny model: outputs, sidecar, and one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from p2pz.cli.main import main


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rgba_image(tmp_path):
    path = tmp_path / "cat.png"
    rgba = np.random.default_rng(0).integers(0, 255, (70, 90, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)  # odd size, alpha: converted by the documented rule
    return path


def test_edit_writes_edit_reconstruction_and_sidecar(tiny_model_dir, rgba_image, tmp_path):
    out = tmp_path / "out" / "dog.png"
    argv = ["edit", "--model", str(tiny_model_dir), "--image", str(rgba_image), "--source", "cat"]
    argv += ["--target", "dog", "--caption", "a cat", "--steps", "3", "--num-sentences", "10"]
    assert main([*argv, "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert Image.open(out.with_name("dog.recon.png")).size == (64, 64)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["num_steps"] == 3 and sidecar["caption"] == "a cat" and sidecar["seed"] == 0
    assert sidecar["teacher"]["preset"]["name"] == "official" and len(sidecar["fingerprint"]) == 64
    assert sidecar["direction"]["source"] == "cat" and sidecar["direction"]["target"] == "dog"
    assert sorted(p.name for p in out.parent.iterdir()) == ["dog.json", "dog.png", "dog.recon.png"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("text", "not an image"),
        ("truncated", "corrupt|not an image"),
        ("model", "does not exist"),
        ("hub", "not in the local Hugging Face cache"),
        ("suffix", "image suffix"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(case, message, tiny_model_dir, rgba_image, tmp_path, capsys):
    image, model, out = rgba_image, str(tiny_model_dir), tmp_path / "out" / "dog.png"
    if case == "missing":
        image = tmp_path / "nope.png"
    elif case == "text":
        image = tmp_path / "notes.png"
        image.write_text("hello")
    elif case == "truncated":
        image = tmp_path / "cut.png"
        image.write_bytes(rgba_image.read_bytes()[:300])
    elif case == "model":
        model = str(tmp_path / "no-model")
    elif case == "hub":
        model = "nobody-p2pz-test/not-a-model"  # HF_HUB_OFFLINE=1 in the tests
    elif case == "suffix":
        out = tmp_path / "out" / "dog.txt"
    argv = ["edit", "--model", model, "--image", str(image), "--source", "cat", "--target", "dog"]
    code = main([*argv, "--caption", "a cat", "--steps", "2", "--num-sentences", "5", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    import re

    assert re.search(message, err[0]), err[0]
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())
