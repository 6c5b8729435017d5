"""Per-edit packages: export parity across backends, safe loading, p2pz apply and p2pz bench."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz.cli.main import main
from p2pz.student.bench import MIN_LATENCY_SAMPLES
from p2pz.utils.errors import UserError


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A lite student at 64 px with random weights, saved as train.py saves it, then exported."""
    from p2pz.student.export import export_package
    from p2pz.student.training import StudentModule

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    module = StudentModule(resolution=64, preset="lite", lpips_weight=0.0)
    for p in module.g_ema.parameters():  # make the EMA weights differ from G's: export must take g_ema
        p.data.add_(0.01 * torch.randn_like(p))
    checkpoint = {
        "state_dict": module.state_dict(),
        "generator_config": dict(module.g_ema.config),
        "global_step": 7,
        "hyper_parameters": dict(module.hparams),
    }
    torch.save(checkpoint, root / "last.ckpt")
    out = export_package(root / "last.ckpt", root / "model")
    return out, module.g_ema.eval()


def test_backends_agree_with_eager(package):
    from p2pz.student.export import load_exported

    model_dir, g_ema = package
    x = torch.rand(3, 3, 64, 64) * 2 - 1  # batch 3: not the export example's batch, so the dim is dynamic
    with torch.no_grad():
        reference = g_ema(x)
        outputs = {b: load_exported(model_dir, b, trust_pt2=True)(x) for b in ("eager", "pt2", "onnx")}
    for backend, y in outputs.items():
        assert y.shape == reference.shape
        assert (y - reference).abs().max().item() < 1e-4, backend


def test_pt2_moves_to_another_device_with_its_graph_constants(package):
    """The .pt2 program, traced on the CPU, runs on another device (meta here, a GPU in use): its
    device constants (the _assert_tensor_metadata checks, factory calls' device=) move with it."""
    from p2pz.student.export import PT2, load_exported

    model_dir, _ = package
    cpu_graph = torch.export.load(model_dir / PT2).graph
    cpu_devices = {str(n.kwargs["device"]) for n in cpu_graph.nodes if n.kwargs.get("device") is not None}
    assert cpu_devices == {"cpu"}  # what has to move: the traced program names the CPU
    module = load_exported(model_dir, "pt2", device="meta", trust_pt2=True)
    devices = {str(n.kwargs["device"]) for n in module.graph.nodes if n.kwargs.get("device") is not None}
    assert devices == {"meta"}
    assert {p.device.type for p in module.parameters()} == {"meta"}
    y = module(torch.empty(3, 3, 64, 64, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 3, 64, 64)


def test_package_contents(package):
    from safetensors import safe_open

    model_dir, g_ema = package
    config = json.loads((model_dir / "config.json").read_text())
    assert config["generator"] == json.loads(json.dumps(dict(g_ema.config)))
    assert config["training"]["step"] == 7
    assert set(config["files"]) == {"weights", "pt2", "onnx"}
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(g_ema.state_dict())


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_package_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """safetensors writes 0600 whatever the umask; the package must come out as open() would make it."""
    import os
    import stat

    from p2pz.student.export import export_package
    from p2pz.student.training import StudentModule

    module = StudentModule(resolution=64, preset="lite", lpips_weight=0.0)
    checkpoint = {"state_dict": module.state_dict(), "generator_config": dict(module.g_ema.config)}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    old = os.umask(umask)
    try:
        out = export_package(tmp_path / "last.ckpt", tmp_path / "pkg" / "model", formats=())
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    for name in files:
        assert stat.S_IMODE((out / name).stat().st_mode) == file_mode, name


def narrow_checkpoint(path):
    """A lite student at 64 px with a few channels per layer, saved as train.py saves it."""
    from p2pz.student.training import StudentModule

    narrow = {"channel_base": 512, "channel_max": 16}
    module = StudentModule(
        resolution=64, preset="lite", lpips_weight=0.0, generator=narrow, discriminator=narrow
    )
    torch.save({"state_dict": module.state_dict(), "generator_config": dict(module.g_ema.config)}, path)
    return path


# `p2pz export` as a user runs it, with one warning of the project's own on the way: the ONNX optimiser's
# INFO lines ("Skipping constant folding for node ...", "Applied N of general pattern rewrite rules")
# stay out of stderr, the project's warnings stay in.
EXPORT_WITH_A_PROJECT_WARNING = """
import logging, sys, warnings
import p2pz.student.export as export
plain = export.export_onnx
def export_onnx(*args, **kwargs):
    logging.getLogger("p2pz.student.export").warning("a project log warning")
    warnings.warn("a project warning")
    plain(*args, **kwargs)
export.export_onnx = export_onnx
from p2pz.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_export_prints_no_library_noise(tmp_path):
    import subprocess
    import sys

    narrow_checkpoint(tmp_path / "last.ckpt")  # a few seconds of ONNX export
    argv = ["export", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "model"), "--formats", "onnx"]
    run = subprocess.run(
        [sys.executable, "-c", EXPORT_WITH_A_PROJECT_WARNING, *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "model" / "generator.onnx").is_file()
    for noise in ("Skipping constant folding", "general pattern rewrite rules", "No CUDA runtime is found"):
        assert noise not in run.stderr, run.stderr
    assert "a project log warning" in run.stderr and "UserWarning: a project warning" in run.stderr


def test_apply_cli(package, tmp_path):
    model_dir, _ = package
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((80, 100, 3), 200, np.uint8)).save(inputs / "a.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(inputs / "b.jpg")  # grayscale
    assert (
        main(["apply", str(model_dir), str(inputs), "--out", str(tmp_path / "out"), "--backend", "onnx"]) == 0
    )
    a = Image.open(tmp_path / "out" / "a.png")
    assert a.size == (64, 64) and a.mode == "RGB"  # the model's resolution (non-square: centre crop)
    assert (tmp_path / "out" / "b.png").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "fp16"])
def test_apply_runs_in_the_dtype_asked_for(package, tmp_path, dtype):
    """--device cpu --dtype bfloat16 (or the short fp16): the generator and its inputs in that precision,
    8-bit images out, close to float32's (the resampling filters stay float32, as the ops take them)."""
    model_dir, _ = package
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(inputs / f"x{i}.png")
    argv = ["apply", str(model_dir), str(inputs), "--device", "cpu", "--batch-size", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "fp32")]) == 0
    assert main([*argv, "--out", str(tmp_path / "low"), "--dtype", dtype]) == 0
    for i in range(3):
        full = np.asarray(Image.open(tmp_path / "fp32" / f"x{i}.png"), dtype=np.int16)
        low = np.asarray(Image.open(tmp_path / "low" / f"x{i}.png"))
        assert low.dtype == np.uint8 and low.shape == (64, 64, 3)
        assert np.abs(low - full).mean() < 2.0  # the same edit, at a lower precision


def test_apply_low_precision_needs_the_eager_backend(package, tmp_path):
    model_dir, _ = package
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "x.png")
    argv = ["apply", str(model_dir), str(tmp_path / "x.png"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--backend", "onnx", "--dtype", "bfloat16"]) == 2
    assert not (tmp_path / "out").exists()


def test_apply_crops_a_4_by_3_photo_like_the_teacher(package, tmp_path):
    """A 4:3 photo is cropped to its centred square as the teacher crops its inputs, not squashed."""
    from p2pz.teacher.images import pil_to_tensor, prepare_image, tensor_to_numpy

    model_dir, g_ema = package
    rng = np.random.default_rng(0)
    photo = np.zeros((96, 128, 3), np.uint8)  # 4:3; the side bands are what a crop drops
    photo[:, :16], photo[:, 112:] = 255, 255
    photo[:, 16:112] = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    assert main(["apply", str(model_dir), str(tmp_path / "photo.jpg"), "--out", str(tmp_path / "out")]) == 0
    edited = np.asarray(Image.open(tmp_path / "out" / "photo.png"), dtype=np.int16)
    assert edited.shape == (64, 64, 3)

    cropped = prepare_image(Image.open(tmp_path / "photo.jpg"), 64)  # shorter side to 64, centre square
    with torch.no_grad():
        expected = tensor_to_numpy(g_ema(pil_to_tensor([cropped])))[0]
    expected = (expected * 255).round().astype(np.int16)
    assert np.abs(edited - expected).max() <= 1  # the model applied to the centre-cropped photo

    squashed = Image.open(tmp_path / "photo.jpg").resize((64, 64), Image.Resampling.LANCZOS)
    with torch.no_grad():
        wrong = (tensor_to_numpy(g_ema(pil_to_tensor([squashed])))[0] * 255).round().astype(np.int16)
    assert np.abs(edited - wrong).max() > 8  # and not to the squashed one


def test_apply_bad_input_writes_nothing(package, tmp_path):
    model_dir, _ = package
    (tmp_path / "bad.png").write_text("not an image")
    assert main(["apply", str(model_dir), str(tmp_path / "bad.png"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_apply_skips_unreadable_photos_and_edits_the_rest(tmp_path, capsys):
    """A folder with two bad photos among good ones: one line per bad photo naming it and why, every
    good photo edited, then one error line and exit 2 (a script notices); no temporary file is left."""
    from p2pz.student.export import export_package

    model_dir = export_package(narrow_checkpoint(tmp_path / "last.ckpt"), tmp_path / "model", formats=())
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(photos / "a.png")
    Image.fromarray(np.full((70, 90, 3), 30, np.uint8)).save(photos / "d.jpg")
    good = (photos / "d.jpg").read_bytes()
    (photos / "b.jpg").write_bytes(good[: len(good) // 2])  # truncated mid-file
    (photos / "c.png").write_text("not an image")
    out = tmp_path / "out"
    assert main(["apply", str(model_dir), str(photos), "--out", str(out), "--batch-size", "1"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and "editing" not in line]
    assert lines[0].startswith(f"skipped {photos / 'b.jpg'}: corrupt image"), lines
    assert lines[1] == f"skipped {photos / 'c.png'}: not an image (no known image format)", lines
    assert lines[2].startswith("error: 2 images skipped") and str(out) in lines[2], lines
    assert len(lines) == 3 and "Traceback" not in captured.err
    assert "wrote 2 edited images" in captured.out and "(2 skipped)" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "d.png"]
    assert Image.open(out / "d.png").size == (64, 64)


def test_a_batch_size_below_one_is_refused_by_the_library(tmp_path):
    """apply_to_images(batch_size=-1) returned no images at all; run_benchmark timed empty batches."""
    from p2pz.student.bench import run_benchmark
    from p2pz.student.export import apply_to_images

    photo = Image.new("RGB", (64, 64))
    for size in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            apply_to_images(torch.nn.Identity(), 64, [photo], batch_size=size)
        with pytest.raises(ValueError, match="batch sizes must be at least 1"):
            run_benchmark(tmp_path, batches=[1, size])


def test_load_rejects_non_package(tmp_path):
    from p2pz.student.export import load_exported

    with pytest.raises(UserError, match="not an exported student"):
        load_exported(tmp_path)


def test_bench_json_has_every_field(package, tiny_model_dir, tmp_path):
    model_dir, _ = package
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            str(model_dir),
            "--out",
            str(out),
            "--batches",
            "1,2",
            "--backends",
            "eager,pt2,onnx",
            "--trust-pt2",  # the package this test made
            "--iters",
            "2",
            "--warmup",
            "1",
            "--teacher",
            str(tiny_model_dir),
            "--teacher-steps",
            "2",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    for backend in ("eager", "pt2", "onnx"):
        for batch in ("1", "2"):
            row = report["student"][backend][batch]
            assert {"p50_ms", "p90_ms", "p99_ms", "images_per_s", "samples"} <= set(row)
            assert row["p50_ms"] > 0 and row["p50_ms"] <= row["p99_ms"]
            # Even a short run (--iters 2) times enough single calls for tail percentiles to mean anything.
            assert row["samples"] >= MIN_LATENCY_SAMPLES
    assert report["teacher_ms"] > 0
    assert report["teacher_over_student"] > 0
    assert 0 < report["roofline_fraction"] < 10
    assert out.with_suffix(".png").stat().st_size > 1000
