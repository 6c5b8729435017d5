"""The student package as a Hugging Face model: ``Student.from_pretrained`` (folder or a repo id from the
local cache), strict safetensors loading, format 1 packages, the model card, ``--push-to-hub``, and
``p2pz eval --student`` on pairs of any edit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from narrow_student import export_narrow_student
from PIL import Image

from p2pz.cli.main import main
from p2pz.utils.errors import UserError


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A narrow 64 px student with random weights, exported (weights, config, card only)."""
    return export_narrow_student(tmp_path_factory.mktemp("pkg"), formats=())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def hub_cache(package: Path, cache: Path, repo_id: str = "someuser/cat-to-dog") -> Path:
    """``package`` as huggingface_hub caches a downloaded repo: blobs, a snapshot and refs/main."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in package.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return cache


FRESH_PROCESS = """
import sys, numpy as np, torch
from PIL import Image
from p2pz import Student
from p2pz.teacher.images import numpy_to_pil, pil_to_tensor, prepare_image, tensor_to_numpy
x = pil_to_tensor([prepare_image(Image.open(sys.argv[1]), 64)])
for source, out in zip(sys.argv[2::2], sys.argv[3::2]):
    with torch.no_grad():
        y = Student.from_pretrained(source)(x)
    np.save(out, np.asarray(numpy_to_pil(tensor_to_numpy(y))[0]))
"""


def test_from_pretrained_folder_and_cached_repo_id_match_p2pz_apply(package, photos, tmp_path, monkeypatch):
    """In a fresh process: from the folder and, offline, from a repo id in a local Hugging Face cache,
    ``Student.from_pretrained`` gives what ``p2pz apply`` writes (from the folder and from the repo id)."""
    cache = hub_cache(package, tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    photo = photos / "p0.png"
    sources = {"folder": str(package), "repo": "someuser/cat-to-dog"}
    argv = [str(photo)] + [a for name, src in sources.items() for a in (src, str(tmp_path / f"{name}.npy"))]
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, *argv], env=env, check=True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for name, source in sources.items():
        applied = tmp_path / f"applied-{name}"
        assert main(["apply", source, str(photo), "--out", str(applied), "--no-progress"]) == 0
        loaded = np.load(tmp_path / f"{name}.npy")
        np.testing.assert_array_equal(loaded, np.asarray(Image.open(applied / "p0.png")))
    assert np.load(tmp_path / "folder.npy").std() > 0  # a real image, not a constant


def test_a_repo_id_not_in_the_cache_is_one_line_offline(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    rc = main(["apply", "someuser/not-there", str(photos), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "someuser/not-there" in err and "cache" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_loading_is_strict_and_names_the_tensor(package, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from p2pz import Student

    broken = tmp_path / "broken"
    shutil.copytree(package, broken)
    state = load_file(broken / "model.safetensors")
    name = sorted(state)[3]
    if damage == "missing":
        del state[name]
    elif damage == "extra":
        name = "encoder.renamed_weight"
        state[name] = torch.zeros(2)
    else:
        state[name] = torch.zeros(*[s + 1 for s in state[name].shape])
    save_file(state, broken / "model.safetensors")
    with pytest.raises(UserError) as err:
        Student.from_pretrained(broken)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_a_pickle_is_never_read(package, tmp_path):
    """A repo with pytorch_model.bin and no safetensors: the mixin would unpickle it, p2pz refuses."""
    from p2pz import Student

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(package / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="model.safetensors"):
        Student.from_pretrained(folder)


def test_a_format_1_package_still_loads(package, tmp_path):
    from p2pz import Student

    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((package / "config.json").read_text())
    config.update(format_version=1, files={"weights": "generator.safetensors"})
    (old / "config.json").write_text(json.dumps(config))
    shutil.copy(package / "model.safetensors", old / "generator.safetensors")
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(Student.from_pretrained(old)(x), Student.from_pretrained(package)(x))
    config["format_version"] = 3
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="re-export"):
        Student.from_pretrained(old)


def test_save_pretrained_round_trips(package, tmp_path):
    from p2pz import Student

    student = Student.from_pretrained(package)
    student.save_pretrained(tmp_path / "copy")
    again = Student.from_pretrained(tmp_path / "copy")
    assert again.package_config["generator"] == student.package_config["generator"]
    for (k, a), (_, b) in zip(student.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_the_card_parses_and_names_the_teacher_as_base_model(package):
    from huggingface_hub import ModelCard

    from p2pz.student.card import render_card
    from p2pz.student.package import read_config

    card = ModelCard.load(package / "README.md")
    assert card.data.library_name == "p2pz" and card.data.pipeline_tag == "image-to-image"
    assert card.data.license == "mit" and "p2pz" in card.data.tags
    assert "base_model" not in card.data.to_dict()  # no teacher recorded
    config = read_config(package)
    config["data"] = {
        "edit": {"source": "cat", "target": "dog"},
        "teacher": {"model": "CompVis/stable-diffusion-v1-4", "preset": "official"},
        "num_pairs": 12,
    }
    config["eval"] = {"n": 3, "pairs_source": "held-out shards", "to_teacher": {"psnr": 31.5, "ssim": 0.9}}
    card = ModelCard(str(render_card(config, package)))
    assert card.data.base_model == "CompVis/stable-diffusion-v1-4" and "cat-to-dog" in card.data.tags
    assert "cat → dog" in card.text and "| 31.5 |" in card.text


def test_push_to_hub_uploads_the_folder(package, tmp_path, monkeypatch, capsys):
    """``p2pz export --push-to-hub``: the one network call (HfApi.upload_folder) stands in."""
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()))
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        return "https://huggingface.co/someuser/cat-to-dog/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    ckpt = package.parent / "last.ckpt"
    out = tmp_path / "pushed"
    assert (
        main(["export", str(ckpt), "--out", str(out), "--formats", "--push-to-hub", "someuser/cat-to-dog"])
        == 0
    )
    assert calls["repo"] == "someuser/cat-to-dog"
    assert calls["upload"] == ("someuser/cat-to-dog", ["README.md", "config.json", "model.safetensors"])
    assert 'Student.from_pretrained("someuser/cat-to-dog")' in calls["card"]
    assert "uploaded" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# p2pz eval --student on pairs of any edit


@pytest.fixture(scope="module")
def cat_dog_pairs(tiny_model_dir, tmp_path_factory):
    """cat:dog pairs of the tiny random teacher (p2pz make-tiny): a real edit, not the shapes world."""
    from p2pz.data.pairs.generate import Settings, run

    root = tmp_path_factory.mktemp("catdog")
    inputs = root / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(inputs / f"in{i}.png")
        (inputs / f"in{i}.txt").write_text("a photo of a cat")
    settings = Settings(
        model=str(tiny_model_dir),
        edit=["cat:dog"],
        inputs=str(inputs),
        out=str(root / "pairs"),
        samples_per_shard=2,
        batch_size=2,
        steps=2,
        num_sentences=2,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    run(settings)
    return root / "pairs"


def test_eval_student_on_pairs_of_a_real_edit_writes_metrics(package, cat_dog_pairs, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--student", str(package), "--pairs", str(cat_dog_pairs), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "metrics.json").read_text())
    assert report["kind"] == "student-pairs" and report["settings"]["edits"] == ["cat:dog"]
    assert len(report["per_image"]) == 4
    for name in ("to_teacher (4 pairs)", "to_input (4 pairs)", "copy_to_teacher (4 pairs)"):
        assert 0 < report["metrics"][name]["psnr"] <= 100 and -1 <= report["metrics"][name]["ssim"] <= 1
    assert not any(k.startswith("oracle") for k in report["metrics"])  # not shapes-world pairs
    # the figures are the images': the student against itself would be perfect, against the teacher not
    first = report["per_image"][0]
    assert first["psnr_to_teacher"] < 100 and first["psnr_copy_to_teacher"] < 100
    assert (out / "grid.png").is_file()


def test_export_eval_puts_the_figures_and_the_grid_into_the_card(package, cat_dog_pairs, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "model"
    ckpt = package.parent / "last.ckpt"
    assert main(["export", str(ckpt), "--out", str(out), "--formats", "--eval", str(cat_dog_pairs)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["eval"]["n"] == 4 and "psnr" in config["eval"]["to_teacher"]
    card = ModelCard.load(out / "README.md")
    assert "![input | teacher | student](grid.png)" in card.text and (out / "grid.png").is_file()
    assert f"| {config['eval']['to_teacher']['psnr']:.3g} |" in card.text


# --------------------------------------------------------------------------------------------------
# p2pz bench: precision and the ONNX backend on CUDA


def test_bench_in_bfloat16_reports_its_error_against_float32(package, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", str(package), "--out", str(out), "--backends", "eager", "--batches", "1"]
    assert main([*argv, "--iters", "20", "--warmup", "1", "--teacher", "none", "--dtype", "bf16"]) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and report["dtype_error"]["dtype"] == "bfloat16"
    error = report["dtype_error"]
    assert 0 <= error["mean_grey_levels"] <= error["max_grey_levels"] <= 255


def test_onnx_on_cuda_without_its_provider_is_skipped_with_the_reason(package):
    """onnxruntime's CPU wheel has no CUDAExecutionProvider: on a cuda device the backend is listed in
    skipped_backends with the reason, not dropped silently (nothing touches the GPU on that path)."""
    import onnxruntime

    from p2pz.student.bench import _student_backends

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    skipped: dict[str, str] = {}
    models = _student_backends(package, ["onnx"], torch.device("cuda"), skipped=skipped)
    assert models == {} and "CUDAExecutionProvider" in skipped["onnx"]
