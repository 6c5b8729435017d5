"""Files from elsewhere run no code: checkpoints are read weights-only, a package's ``.pt2`` only on trust.

Every hostile file here carries a pickle ``__reduce__`` payload that would create a marker file if
unpickled; the tests check the command refuses it in one line (exit 2) and that the marker never
appears.
"""

from __future__ import annotations

import builtins
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz.cli.main import main
from p2pz.utils.errors import UserError

HINT = "pass a checkpoint written by `p2pz train`"


class Payload:
    """Unpickling this creates ``marker`` (an open() call, so no shell is involved)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _student_checkpoint() -> dict:
    """A lite 64 px student's checkpoint with the keys train.py writes."""
    from p2pz.student.training import StudentModule

    torch.manual_seed(0)
    module = StudentModule(resolution=64, preset="lite", lpips_weight=0.0)
    return {
        "state_dict": module.state_dict(),
        "generator_config": dict(module.g_ema.config),
        "global_step": 1,
        "hyper_parameters": dict(module.hparams),
    }


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "last.ckpt"
    torch.save(_student_checkpoint(), path)
    return path


def _one_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


# --------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
def test_a_checkpoint_with_a_payload_is_refused_and_the_payload_never_runs(tmp_path, capsys, legacy):
    marker = tmp_path / "payload-ran"
    hostile = _student_checkpoint()
    hostile["hyper_parameters"] = {"note": Payload(marker)}  # a real checkpoint, plus one payload
    path = tmp_path / "last.ckpt"
    torch.save(hostile, path, _use_new_zipfile_serialization=not legacy)

    from p2pz.student.training import load_generator

    with pytest.raises(UserError, match="asks to run code"):
        load_generator(path)
    assert main(["export", str(path), "--out", str(tmp_path / "model"), "--formats", ""]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "asks to run code" in line and HINT in line
    assert not marker.exists()
    assert not (tmp_path / "model").exists()

    # The payload is live: an ordinary unpickle runs it (what export did before).
    torch.load(path, weights_only=False)
    assert marker.exists()


def _write_bad_file(kind: str, folder: Path, good: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "missing":
        pass
    elif kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
    elif kind == "tar":
        with tarfile.open(path, "w") as archive:
            info = tarfile.TarInfo("readme.txt")
            info.size = 5
            archive.addfile(info, io.BytesIO(b"hello"))
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "other-model":  # a Lightning checkpoint of something else: no generator_config
        torch.save({"state_dict": {"net.weight": torch.zeros(2, 2)}, "global_step": 5, "epoch": 0}, path)
    elif kind == "no-ema-weights":
        checkpoint = torch.load(good, weights_only=True)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("G.")}
        torch.save(checkpoint, path)
    elif kind == "unknown-generator-option":
        checkpoint = torch.load(good, weights_only=True)
        checkpoint["generator_config"]["no_such_option"] = 1
        torch.save(checkpoint, path)
    else:
        raise AssertionError(kind)
    return path


BAD_KINDS = {
    "missing": "checkpoint not found",
    "folder": "is not a file",
    "empty": "the file is empty",
    "truncated": "cut short, or not a checkpoint",
    "text": "not a torch checkpoint file",
    "zip": "a zip archive",
    "tar": "a tar archive",
    "list": "holds a list",
    "other-model": "no generator_config",
    "no-ema-weights": "no g_ema.* weights",
    "unknown-generator-option": "no_such_option",
}


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_a_file_that_is_not_a_student_checkpoint_is_one_line(kind, good_checkpoint, tmp_path, capsys):
    path = _write_bad_file(kind, tmp_path, good_checkpoint)
    assert main(["export", str(path), "--out", str(tmp_path / "model"), "--formats", ""]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and BAD_KINDS[kind] in line and HINT in line
    assert not (tmp_path / "model").exists()

    from p2pz.student.training import load_generator

    with pytest.raises(UserError, match=HINT):
        load_generator(path)


def test_a_good_checkpoint_still_exports(good_checkpoint, tmp_path):
    assert main(["export", str(good_checkpoint), "--out", str(tmp_path / "model"), "--formats", ""]) == 0
    assert (tmp_path / "model" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# Packages: the .pt2 program runs only on trust


def _hostile_pt2(path: Path, marker: Path) -> None:
    """A real ``torch.export`` archive whose pickled example inputs carry a payload."""
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    clean = io.BytesIO()
    torch.export.save(program, clean)
    payload = io.BytesIO()
    torch.save(((Payload(marker),), {}), payload)
    replaced = 0
    with zipfile.ZipFile(clean) as source, zipfile.ZipFile(path, "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("sample_inputs/model.pt"):
                data, replaced = payload.getvalue(), replaced + 1
            out.writestr(info, data)
    assert replaced == 1, "torch.export's archive layout changed; update this test's payload"


@pytest.fixture
def hostile_package(good_checkpoint, tmp_path) -> tuple[Path, Path]:
    """A package whose safetensors and config are fine and whose generator.pt2 carries a payload."""
    from p2pz.student.export import export_package

    marker = tmp_path / "payload-ran"
    package = export_package(good_checkpoint, tmp_path / "model", formats=())
    _hostile_pt2(package / "generator.pt2", marker)
    config = json.loads((package / "config.json").read_text())
    config["files"]["pt2"] = "generator.pt2"
    (package / "config.json").write_text(json.dumps(config))
    return package, marker


def test_torch_export_load_runs_a_pt2_payload(tmp_path):
    """Why --trust-pt2 exists: torch.export.load falls back to a full unpickle."""
    marker = tmp_path / "payload-ran"
    _hostile_pt2(tmp_path / "hostile.pt2", marker)
    try:
        torch.export.load(tmp_path / "hostile.pt2")
    except Exception:  # noqa: BLE001 - the payload returns a file object where tensors belong
        pass
    if not marker.exists():
        pytest.skip(
            "this torch no longer runs code from a .pt2's pickles; --trust-pt2 is then belt and braces"
        )


def test_apply_runs_a_foreign_package_without_its_pt2(hostile_package, tmp_path, capsys):
    package, marker = hostile_package
    image = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(image)

    assert main(["apply", str(package), str(image), "--out", str(tmp_path / "eager")]) == 0
    assert (tmp_path / "eager" / "in.png").is_file()

    assert main(["apply", str(package), str(image), "--out", str(tmp_path / "pt2"), "--backend", "pt2"]) == 2
    line = _one_error_line(capsys)
    assert str(package) in line and "--trust-pt2" in line
    assert not (tmp_path / "pt2").exists()
    assert not marker.exists()


def test_load_exported_pt2_needs_trust(hostile_package):
    from p2pz.student.export import load_exported

    package, marker = hostile_package
    with pytest.raises(UserError, match="trust-pt2"):
        load_exported(package, "pt2")
    assert not marker.exists()


def test_bench_asked_for_pt2_without_trust_is_an_error(hostile_package, tmp_path, capsys):
    package, marker = hostile_package
    out = tmp_path / "bench.json"
    assert main(["bench", str(package), "--backends", "eager,pt2", "--out", str(out)]) == 2
    assert "--trust-pt2" in _one_error_line(capsys)
    assert not out.exists() and not marker.exists()


def test_bench_by_default_skips_pt2_with_a_note(hostile_package, tmp_path, capsys, monkeypatch):
    import p2pz.student.bench as bench

    package, marker = hostile_package
    monkeypatch.setattr(bench, "BACKENDS", ("eager", "pt2", "onnx"))  # no torch.compile: keep it quick
    out = tmp_path / "bench.json"
    argv = ["bench", str(package), "--batches", "1", "--iters", "1", "--warmup", "0", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert list(report["student"]) == ["eager"]
    assert "--trust-pt2" in report["skipped_backends"]["pt2"]
    assert "without it" in report["skipped_backends"]["onnx"]  # the package has no ONNX file
    assert "note: pt2 not run" in capsys.readouterr().out
    assert not marker.exists()


def test_trust_pt2_is_in_the_help(capsys):
    for command in ("apply", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--trust-pt2" in capsys.readouterr().out
