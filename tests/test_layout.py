"""One installed import name, ``p2pz``, whatever the user's own folders are called."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER_FOLDERS = {"p2pz": REPO / "p2pz", "p2pz.teacher": REPO / "teacher", "p2pz.data": REPO / "data"}
LAYER_FOLDERS["p2pz.student"] = REPO / "student"
# Bottom to top; a module imports only from its own package or the layers below (ARCHITECTURE.md).
LAYERS = [
    ("p2pz.utils",),
    ("p2pz.teacher",),
    ("p2pz.data.shapes",),
    ("p2pz.data.models", "p2pz.data.pairs"),
    ("p2pz.data.eval",),
    ("p2pz.student",),
    ("p2pz.cli",),
]
USERS_DATA_PACKAGE = "raise ImportError('the user\\'s own data package was imported')\n"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _copy_sources(dest: Path) -> Path:
    """The tracked files of the checkout (a wheel build writes build/ and egg-info beside them)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    for name in files.stdout.splitlines():
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _copy_sources(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    result = _run([*build, "-w", str(out), "."], cwd=src)
    assert result.returncode == 0, result.stderr[-3000:]
    [whl] = out.glob("*.whl")
    return whl


def _users_project(tmp_path: Path) -> Path:
    """A folder as many ML repositories have: its own ``data`` package (that must never be ours)."""
    (tmp_path / "data").mkdir(parents=True)
    (tmp_path / "data" / "__init__.py").write_text(USERS_DATA_PACKAGE)
    (tmp_path / "teacher.py").write_text(USERS_DATA_PACKAGE)
    return tmp_path


def test_wheel_installs_one_top_level_package_with_its_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"p2pz"}
    for needed in (
        "p2pz/teacher/pipeline.py",
        "p2pz/data/pairs/generate.py",
        "p2pz/data/toy_model/unet/diffusion_pytorch_model.safetensors",
        "p2pz/student/networks.py",
        "p2pz/cli/main.py",
    ):
        assert needed in names
    assert any(re.match(r"p2pz/student/ops/.*\.(cpp|h)$", n) for n in names), "the ops' C++ sources ship"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "p2pz = p2pz.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_every_package_folder_is_listed_in_pyproject():
    """A subpackage missing from ``packages`` would be left out of the wheel without an error."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in LAYER_FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)) if rel else name)
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_commands_work_from_a_folder_with_its_own_data_package(tmp_path):
    project = _users_project(tmp_path)
    imports = "import p2pz.student.export, p2pz.data.pairs.reader, p2pz.teacher.pipeline; print('ok')"
    result = _run([sys.executable, "-c", imports], cwd=project)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]

    help_text = _run([sys.executable, "-m", "p2pz", "--help"], cwd=project)
    assert help_text.returncode == 0, help_text.stderr[-2000:]
    commands = re.findall(r"^    ([a-z][a-z-]+) ", help_text.stdout, flags=re.M)
    expected = {"make-tiny", "direction", "edit", "generate", "shards", "train", "export", "apply", "bench"}
    assert expected | {"eval", "demo"} <= set(commands), commands
    for command in commands:
        result = _run([sys.executable, "-m", "p2pz", command, "--help"], cwd=project)
        assert result.returncode == 0 and "usage" in result.stdout.lower(), (command, result.stderr[-2000:])

    made = _run([sys.executable, "-m", "p2pz", "make-tiny", str(tmp_path / "tiny")], cwd=project)
    assert made.returncode == 0, made.stderr[-2000:]
    assert (tmp_path / "tiny" / "model_index.json").is_file()


@pytest.mark.parametrize("layer", ["teacher", "student", "data"])
def test_a_layer_is_not_importable_under_its_folder_name(layer):
    """From the checkout's root ``import teacher`` would find the folder: it refuses, naming p2pz."""
    result = _run([sys.executable, "-c", f"import {layer}"], cwd=REPO)
    assert result.returncode != 0
    assert f"import it as 'p2pz.{layer}'" in result.stderr


@pytest.mark.slow
def test_non_editable_install_into_a_fresh_venv(wheel, tmp_path):
    """``pip install`` of the wheel (not editable) serves every command from a user's folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-2000:]
    _borrow_site_packages(python)  # after pip, which then never sees (or touches) the borrowed packages
    project = _users_project(tmp_path / "project")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    where = _run([str(python), "-c", "import p2pz.teacher as t; print(t.__file__)"], cwd=project, env=env)
    assert where.returncode == 0 and str(venv) in where.stdout, where.stderr[-2000:]
    for command in (["--help"], ["train", "fit", "--help"], ["demo", "--help"], ["generate", "--help"]):
        result = _run(["p2pz", *command], cwd=project, env=env)
        assert result.returncode == 0, (command, result.stderr[-2000:])


def _borrow_site_packages(python: Path) -> None:
    """Let the venv of `python` import torch & co. from the site-packages of the interpreter running
    the tests, be it a venv or the system's (``--system-site-packages`` would borrow the *base*
    interpreter's, which lacks them when the tests run from a venv). They go in through a .pth file,
    so they come after the venv's own site-packages, where the wheel's p2pz is, and the .pth files
    inside them (an editable install's import hook among them) are not run."""
    site_dirs = ("site-packages", "dist-packages")
    borrowed = [p for p in sys.path if Path(p).name in site_dirs and Path(p).is_dir()]
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    found = subprocess.run([str(python), "-c", query], capture_output=True, text=True, check=True)
    own = Path(found.stdout.strip())
    (own / "_borrowed_site_packages.pth").write_text("".join(f"{p}\n" for p in borrowed))


def _layer(module: str) -> tuple[int, str] | None:
    for index, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return index, package
    return None


def _modules():
    for root, folder in LAYER_FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            yield ".".join((root, *parts)).removesuffix(".__init__"), path


def test_no_module_reaches_back_up():
    """Every import, lazy ones inside functions included, goes down the layers or stays in its package."""
    upward = []
    for module, path in _modules():
        mine = _layer(module)
        if mine is None:
            continue  # p2pz/__init__.py and __main__.py
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported = [node.module]
            elif isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            else:
                continue
            for name in imported:
                theirs = _layer(name)
                if theirs and (theirs[0] > mine[0] or (theirs[0] == mine[0] and theirs[1] != mine[1])):
                    upward.append(f"{module} imports {name}")
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)
