"""The student as a Hugging Face model: ``Student.from_pretrained(folder_or_repo_id)``.

A package (``p2pz export``) is a Hugging Face model folder::

    config.json          format 2: the generator's architecture, the edit, the teacher's settings,
                         data provenance, the held-out split and, with ``--eval``, its metrics
    model.safetensors    the EMA generator's weights (no pickle)
    README.md            the model card (YAML front matter: license, library_name, pipeline_tag, ...)
    generator.pt2        optional: a torch.export program (runs only with --trust-pt2)
    generator.onnx       optional: ONNX

:class:`Student` is the generator with ``huggingface_hub.PyTorchModelHubMixin``: ``from_pretrained``
takes a folder or a Hub repo id (from the local cache with ``HF_HUB_OFFLINE=1``) and
``save_pretrained`` writes the folder. Loading is stricter than the mixin's own: safetensors only (the
mixin would fall back to unpickling ``pytorch_model.bin``) and every tensor must match by name and shape
(the mixin loads with ``strict=False``, which would leave a renamed tensor silently random).

:func:`load_package` is the one call every command (and the app) uses: folder or repo id -> the loaded
student and its ``config.json``. Format 1 packages (``generator.safetensors``) still load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin

from p2pz.student.networks import Generator
from p2pz.utils.errors import UserError

FORMAT_VERSION = 2
FORMATS_READ = (1, 2)
KIND = "p2pz-student"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"  # the Hub's name: its file viewer counts the parameters
CARD = "README.md"
REEXPORT = "re-export it with this version: 'p2pz export RUN/checkpoints/last.ckpt --out FOLDER'"


class Student(
    Generator,
    PyTorchModelHubMixin,
    library_name="p2pz",
    pipeline_tag="image-to-image",
    license="mit",
    tags=["p2pz", "pix2pix-zero", "image-to-image", "distillation"],
):
    """A distilled pix2pix-zero edit: ``y = student(x)``, ``x`` and ``y`` ``[N, 3, H, W]`` in [-1, 1]; a
    student of many edits: ``y = student(x, edit=student.edit_vector("circle:square"))``.

    ``Student.from_pretrained(folder_or_repo_id)`` loads an exported package (eval mode, no grad);
    ``student.package_config`` is its ``config.json``. ``save_pretrained(folder)`` writes the weights
    and ``config.json`` (and a minimal card when the folder has none).
    """

    package_config: dict[str, Any]

    @property
    def edits(self) -> list[str]:
        """The edits a student of many edits makes (``[]`` for a per-edit student)."""
        return list(package_edits(getattr(self, "package_config", None) or {}))

    def edit_vector(self, edit: str) -> torch.Tensor:
        """The conditioning vector of one of :attr:`edits`, for ``student(x, edit=...)``."""
        return known_edit_vector(getattr(self, "package_config", None) or {}, edit)

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, Path(save_directory) / WEIGHTS, metadata={"format": "pt", "kind": KIND})
        config = dict(getattr(self, "package_config", None) or package_config(self.config))
        config["format_version"] = FORMAT_VERSION
        config["files"] = {**(config.get("files") or {}), "weights": WEIGHTS}
        (Path(save_directory) / CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str = "cpu",
        dtype: torch.dtype = torch.float32,
        **_config_keys: Any,  # the mixin passes config.json's keys too: the config is read below
    ) -> Student:
        folder = resolve_package(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        return load_student(folder, device=map_location, dtype=dtype)


def package_config(generator_config: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A format-2 ``config.json`` for a generator of ``generator_config`` (plus ``more`` keys)."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "generator": dict(generator_config),
        "resolution": generator_config["resolution"],
        "files": {"weights": WEIGHTS},
        **more,
    }


# ------------------------------------------------------------------------------------------------
# Folder or repo id -> a local folder


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def resolve_package(name: str | os.PathLike, **download: Any) -> Path:
    """The local folder of a package: ``name`` itself when it is a folder, else the snapshot of the Hub
    repo ``name`` (``user/model``) through ``huggingface_hub`` (its cache; offline with
    ``HF_HUB_OFFLINE=1``). Only the files a package needs are fetched, never a pickle."""
    path = Path(name)
    if path.is_dir():
        return path
    text = str(name)
    if path.exists():
        raise UserError(f"{text} is a file; give the package's folder or a Hub repo id (user/model)")
    if not _looks_like_repo_id(text):
        raise UserError(
            f"{text} is neither a folder nor a Hub repo id (user/model); make a package with 'p2pz export'"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    patterns = [CONFIG, CARD, "*.safetensors", "*.onnx", "*.pt2", "*.png", "*.json"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, **download))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise UserError(
            f"{text} is not a local folder and not in the Hugging Face cache"
            f"{' (HF_HUB_OFFLINE=1)' if os.environ.get('HF_HUB_OFFLINE') else ''}: {err.__class__.__name__}; "
            "give a folder, or download it with network access first"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot fetch the Hub repo {text}: {reason}") from None


# ------------------------------------------------------------------------------------------------
# Reading a package, strictly


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """A package's ``config.json``, parsed with ``json`` only; one line when it is missing or not one."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(f"{folder} is not an exported student (no {CONFIG}); make one with 'p2pz export'")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); {REEXPORT}") from err
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a JSON object; {REEXPORT}")
    version = config.get("format_version")
    if config.get("kind") not in (None, KIND) or version not in FORMATS_READ:
        raise UserError(
            f"{path} is not a p2pz student package this version reads (kind {config.get('kind')!r}, "
            f"format_version {version!r}; reads {', '.join(map(str, FORMATS_READ))}); {REEXPORT}"
        )
    if not isinstance(config.get("generator"), dict):
        raise UserError(f"{path} has no generator architecture ('generator'); {REEXPORT}")
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A package's safetensors weights; a missing or damaged file is one line that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError) as err:
        raise UserError(
            f"cannot read the student's weights {path} ({type(err).__name__}: {err}); "
            "copy the package again or export it again with 'p2pz export'"
        ) from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``module.load_state_dict(state)``, every tensor matched by name and shape: a missing, extra or
    mis-shaped tensor is one line naming it (not a half-random network)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(
            f"missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if extra:
        problems.append(
            f"unexpected tensor {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    if shapes:
        k = shapes[0]
        problems.append(
            f"tensor {k} has shape {list(state[k].shape)}, the architecture needs {list(expected[k].shape)}"
        )
    if problems:
        raise UserError(f"{source} does not match its config.json: {'; '.join(problems)}; {REEXPORT}")
    module.load_state_dict(state, strict=True)


def load_student(
    folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Student:
    """The :class:`Student` of a local package folder, strictly loaded, eval mode, on ``device``.

    ``dtype`` is the parameters' precision; the buffers (resampling filters) stay float32, as the ops
    take them (they cast them to the input's dtype).
    """
    folder = Path(folder)
    config = read_config(folder)
    weights = folder / ((config.get("files") or {}).get("weights") or WEIGHTS)
    if weights.suffix != ".safetensors":
        raise UserError(f"{weights} is not a safetensors file: p2pz reads weights from safetensors only")
    try:
        student = Student(**config["generator"])
    except (UserError, TypeError, ValueError, KeyError) as err:
        raise UserError(
            f"{folder / CONFIG}: its generator architecture is not one this version builds ({err}); "
            f"{REEXPORT}"
        ) from None
    load_state_strict(student, read_weights(weights), weights)
    student = student.eval().requires_grad_(False).to(device)
    for param in student.parameters():
        param.data = param.data.to(dtype)
    student.package_config = config
    student._hub_mixin_config = config
    return student


def package_edits(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The edits of a student of many edits (name -> source, target, conditioning); ``{}`` for a
    per-edit student."""
    edits = config.get("edits")
    return dict(edits) if isinstance(edits, dict) else {}


def edit_conditioning_of(config: dict[str, Any], spec: str) -> torch.Tensor | None:
    """The conditioning vector of the edit ``spec`` (``circle:square`` or ``circle-to-square``) that a
    package of many edits was trained on; None when the package does not list it."""
    from p2pz.teacher.edits import parse_edit

    entry = package_edits(config).get(parse_edit(spec).name)
    if entry is None:
        return None
    return torch.tensor(entry["conditioning"], dtype=torch.float32)


def known_edit_vector(config: dict[str, Any], spec: str, package: str = "this student") -> torch.Tensor:
    """:func:`edit_conditioning_of`, or one line listing the edits the package makes."""
    vector = edit_conditioning_of(config, spec)
    if vector is None:
        raise UserError(f"{package} does not make the edit {spec}; it makes {edits_line(config)}")
    return vector


def edits_line(config: dict[str, Any]) -> str:
    """``circle:square, red:blue``: the edits of a package, as ``--edit`` takes them."""
    return ", ".join(f"{e['source']}:{e['target']}" for e in package_edits(config).values()) or "one edit"


def first_edit_vector(config: dict[str, Any]) -> torch.Tensor | None:
    """What ``p2pz bench`` times a student of many edits with: its first edit (all cost the same)."""
    edits = package_edits(config)
    return edit_conditioning_of(config, next(iter(edits))) if edits else None


@dataclass
class LoadedPackage:
    """What :func:`load_package` returns: the student, its folder, ``config.json`` and card text."""

    student: Student
    folder: Path
    config: dict[str, Any]
    card: str | None

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])


def load_package(
    name: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedPackage:
    """Folder or Hub repo id -> the loaded student, its config and its model card (None without one)."""
    folder = resolve_package(name)
    student = load_student(folder, device=device, dtype=dtype)
    card_path = folder / CARD
    card = card_path.read_text(encoding="utf-8", errors="replace") if card_path.is_file() else None
    return LoadedPackage(student=student, folder=folder, config=student.package_config, card=card)
