"""Bad input at every command: a missing, empty, truncated or wrong-kind file ends in one line.

Each case runs one ``p2pz`` command (in-process; ``train`` in a subprocess) with one bad file and
checks what the user sees: exit status 2, exactly one non-empty line on stderr, starting with
``error:`` and naming the file, no traceback, and nothing written at the command's output (absent
before and after; the output that ``make-tiny`` would replace is left as it was).

The kinds: ``missing`` (no such path), ``empty`` (a 0-byte file, or an empty package folder),
``truncated`` (the first half of a good file) and ``wrong`` (a file of another kind under the
expected name: a PNG as a checkpoint, a safetensors file as an image, a checkpoint as a package).
Every command checks its inputs before loading a model, so each case takes a fraction of a second
(``train``'s subprocesses run side by side); the module takes about 20 s.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from p2pz.cli.main import main

KINDS = ("missing", "empty", "truncated", "wrong")
REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "configs" / "tiny.yaml"
# Truncated: the YAML is cut inside its flow list, the text inside its first "é".
CONFIG_TEXT = "edit: [cat:dog, circle:square]\nsamples_per_shard: 4\nseed: 0\n"
SENTENCES_TEXT = "a café in the morning with a cat\n" * 3


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One good file of each kind, for the cases to break or to pass beside the broken one."""
    import torch

    # torch logs a note when its benchmark utilities are first imported on a machine with CUDA_HOME but
    # no CUDA runtime (a CPU test machine): imported here, the note is not counted as one of bench's lines
    import torch.utils.benchmark  # noqa: F401

    from p2pz.data.pairs import sample as fmt
    from p2pz.student.export import export_package
    from p2pz.student.training import StudentModule
    from p2pz.teacher.directions import EditDirection

    root = tmp_path_factory.mktemp("good")
    files = {}
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    photo.save(files.setdefault("image", root / "photo.png"))
    shards = root / "shards"
    shards.mkdir()
    meta = {"edit": {"source": "circle", "target": "square", "name": "circle-to-square"}}
    with tarfile.open(files.setdefault("shard", shards / "pairs-000000.tar"), "w") as tar:
        for member, data in fmt.build_sample("k0", photo, photo, meta).items():
            if not member.startswith("__"):
                info = tarfile.TarInfo(f"k0.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    torch.manual_seed(0)
    narrow = {"channel_base": 512, "channel_max": 16}
    module = StudentModule(
        resolution=64, preset="lite", lpips_weight=0.0, generator=narrow, discriminator=narrow
    )
    checkpoint = {"state_dict": module.state_dict(), "generator_config": dict(module.g_ema.config)}
    torch.save(checkpoint, files.setdefault("checkpoint", root / "last.ckpt"))
    files["package"] = export_package(root / "last.ckpt", root / "model", formats=())
    EditDirection(torch.randn(77, 32), "cat", "dog").save(
        files.setdefault("direction", root / "cat-to-dog.safetensors")
    )
    files.setdefault("config", root / "settings.yaml").write_text(CONFIG_TEXT)
    files.setdefault("sentences", root / "cats.txt").write_text(SENTENCES_TEXT, encoding="utf-8")
    return files


# What each kind of file is replaced with in the 'wrong' case: a real file of another kind.
WRONG_KIND = {
    "image": "direction",
    "shard": "image",
    "checkpoint": "image",
    "direction": "image",
    "config": "image",
    "sentences": "image",
}


def bad_file(kind: str, what: str, good: dict, where: Path) -> Path:
    """A bad ``what`` file named like the good one, in its own folder under ``where``."""
    source = good[what]
    path = where / "bad" / source.name
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = source.read_bytes()
        cut = len(data) // 2
        if what == "sentences":  # cut inside a two-byte character: not text any more
            cut = data.index("é".encode()) + 1
        elif what == "config":  # cut inside the flow list: not YAML any more
            cut = data.index(b", ") + 2
        path.write_bytes(data[:cut])
    elif kind == "wrong":
        shutil.copyfile(good[WRONG_KIND[what]], path)
    return path


def bad_package(kind: str, good: dict, where: Path) -> Path:
    """A bad exported-model folder: missing, empty, its weights cut in half, or a checkpoint file."""
    path = where / "bad" / "model"
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.mkdir()
    elif kind == "truncated":
        shutil.copytree(good["package"], path)
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "wrong":
        shutil.copyfile(good["checkpoint"], path)  # `p2pz apply last.ckpt ...`
    return path


def bad_shards(kind: str, good: dict, where: Path) -> tuple[Path, Path]:
    """(the folder to pass, the bad path the message names): missing folder, or one bad shard in it."""
    if kind == "missing":
        folder = where / "bad" / "shards"
        return folder, folder
    shard = bad_file(kind, "shard", good, where)
    return shard.parent, shard


@dataclass
class Case:
    argv: list[str]
    named: Path  # the path the error line must contain
    output: Path  # what must be left as it was


def snapshot(path: Path) -> object:
    """The content at ``path``: None, a file's bytes, or a folder's files and their bytes."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in path.rglob("*")}


def case(command: str, what: str, kind: str, good: dict, tiny: Path, tmp: Path) -> Case:
    """The argv of ``command`` with a bad ``what`` of ``kind`` and good everything else."""
    out, model = tmp / "out", str(tiny)
    if what == "package":
        named = given = bad_package(kind, good, tmp)
    elif what == "shards":
        given, named = bad_shards(kind, good, tmp)
    else:
        named = given = bad_file(kind, what, good, tmp)
    image = str(given if what == "image" else good["image"])
    if command == "direction":
        argv = [
            "direction",
            "--model",
            model,
            "--source",
            "cat",
            "--target",
            "dog",
            "--sentences",
            str(given),
        ]
        argv += ["--out", str(out)]
    elif command == "edit":
        argv = [
            "edit",
            "--model",
            model,
            "--image",
            image,
            "--caption",
            "a cat",
            "--out",
            str(out / "dog.png"),
        ]
        argv += ["--direction", str(given)] if what == "direction" else ["--source", "cat", "--target", "dog"]
    elif command == "generate":
        argv = ["generate", "--out", str(out), "--model", model, "--no-progress", "--steps", "2"]
        argv += ["--num-synthetic", "1"]  # were a bad file not refused, the run would still be short
        argv += {
            "config": ["--config", str(given), "--synthetic"],
            "direction": ["--direction", str(given), "--synthetic"],
            "shards": ["--inputs", str(given), "--edit", "cat:dog"],
        }[what]
    elif command == "shards inspect":
        argv = ["shards", "inspect", str(given), "--sheet", str(out / "sheet.png")]
    elif command == "export":
        argv = ["export", str(given), "--out", str(out), "--formats", ""]
    elif command == "apply":
        argv = ["apply", str(given if what == "package" else good["package"]), image, "--out", str(out)]
    elif command == "bench":
        argv = [
            "bench",
            str(given),
            "--out",
            str(out / "bench.json"),
            "--backends",
            "eager",
            "--batches",
            "1",
        ]
        argv += ["--iters", "1", "--warmup", "0"]
    elif command == "eval":
        argv = ["eval", "--pairs", str(given), "--out", str(out)]
    else:
        assert command == "demo"
        argv = ["demo", "--train-config", str(given), "--out", str(out)]
    return Case(argv, named, out)


CASES = [
    ("direction", "sentences"),
    ("edit", "image"),
    ("edit", "direction"),
    ("generate", "config"),
    ("generate", "direction"),
    ("generate", "shards"),
    ("shards inspect", "shards"),
    ("export", "checkpoint"),
    ("apply", "image"),
    ("apply", "package"),
    ("bench", "package"),
    ("eval", "shards"),
    ("demo", "config"),
]


def check_one_line(code: int, err: str, out: str, named: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in err + out, err
    assert len(lines) == 1, f"{len(lines)} stderr lines:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert str(named) in lines[0], f"{named} not named in: {lines[0]}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("command", "what"), CASES, ids=[f"{c}-{w}" for c, w in CASES])
def test_bad_file_is_one_line_and_writes_nothing(command, what, kind, good, tiny_model_dir, tmp_path, capsys):
    c = case(command, what, kind, good, tiny_model_dir, tmp_path)
    before = snapshot(c.output)
    code = main(c.argv)
    captured = capsys.readouterr()
    check_one_line(code, captured.err, captured.out, c.named)
    assert snapshot(c.output) == before, f"{c.output} was written"


@pytest.mark.parametrize("existing", ["file", "folder"])
def test_make_tiny_never_replaces_what_is_not_a_model(existing, tmp_path, capsys):
    """make-tiny replaces OUT: a file, or a folder that holds no model, is the wrong kind of OUT."""
    out = tmp_path / "out"
    if existing == "file":
        out.write_text("my notes")
    else:
        out.mkdir()
        (out / "photo.jpg").write_bytes(b"precious")
    before = snapshot(out)
    code = main(["make-tiny", str(out)])
    captured = capsys.readouterr()
    check_one_line(code, captured.err, captured.out, out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it


# --------------------------------------------------------------------------------------------------
# p2pz train: a LightningCLI, run as a user runs it (a subprocess); all cases start at once


TRAIN_CASES = [(what, kind) for what in ("config", "shards") for kind in KINDS]


@pytest.fixture(scope="module")
def train_runs(good, tmp_path_factory):
    """{(what, kind): (Case, exit code, stdout, stderr)} of ``p2pz train fit`` with one bad file."""
    started = {}
    for what, kind in TRAIN_CASES:
        tmp = tmp_path_factory.mktemp(f"train-{what}-{kind}")
        run_dir = tmp / "out" / "run"
        if what == "config":
            named = bad_file(kind, "config", good, tmp)
            argv = ["--config", str(named), "--data.shards", str(good["shard"].parent)]
        else:
            folder, named = bad_shards(kind, good, tmp)
            argv = ["--config", str(TRAIN_CONFIG), "--data.shards", str(folder)]
        argv += ["--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", "1"]
        command = [sys.executable, "-m", "p2pz", "train", "fit", *argv]
        logs = (tmp / "stdout.txt").open("w"), (tmp / "stderr.txt").open("w")  # files: no pipe to fill
        process = subprocess.Popen(command, stdout=logs[0], stderr=logs[1], text=True)
        started[what, kind] = (Case(command, named, tmp / "out"), process, logs)
    results = {}
    for key, (c, process, logs) in started.items():
        try:
            # A bound against a hang, not a speed check: all of them start torch at once, and on a busy
            # 2-core machine (the default run's other worker, other jobs) the first took over 120 s
            process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for log in logs:
            log.close()
        out, err = (Path(log.name).read_text() for log in logs)
        results[key] = (c, process.returncode, out, err)
    return results


@pytest.mark.parametrize(("what", "kind"), TRAIN_CASES, ids=[f"{w}-{k}" for w, k in TRAIN_CASES])
def test_train_bad_file_is_one_line_and_writes_nothing(what, kind, train_runs):
    c, code, out, err = train_runs[what, kind]
    check_one_line(code, err, out, c.named)
    assert snapshot(c.output) is None, f"{c.output} was written: {snapshot(c.output)}"


def test_readable_shards_names_the_damaged_shard(good, tmp_path):
    """The check a trainer can run before it starts: some readable pair, or one line naming the shard."""
    from p2pz.data.pairs.reader import readable_shards
    from p2pz.utils.errors import UserError

    assert readable_shards(good["shard"].parent) == [str(good["shard"])]
    for kind in ("empty", "truncated", "wrong"):
        folder, named = bad_shards(kind, good, tmp_path / kind)
        with pytest.raises(UserError, match="no shard holds a readable") as caught:
            readable_shards(folder)
        assert str(named) in str(caught.value) and "\n" not in str(caught.value)
