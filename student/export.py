"""Per-edit model packages: what users ship after training a student.

``export_package(ckpt, out)`` writes a folder that runs without Lightning or the training code::

    model.safetensors       the EMA generator's weights (no pickle; format 1: generator.safetensors)
    config.json             architecture, resolution, the edit, the teacher's settings, data provenance
    README.md               the model card (p2pz.student.card)
    generator.pt2           a torch.export program, dynamic batch dimension
    generator.onnx          ONNX (opset 18), the custom ops lowered through their reference decomposition

``load_exported(dir, backend)`` runs any of the three. The default backends run no code from the
package: ``eager`` reads ``config.json`` with ``json`` and the weights from safetensors (no pickle),
``onnx`` parses the ONNX graph with onnxruntime. The ``.pt2`` program is different: ``torch.export.load``
unpickles parts of it (and falls back to a full, code-running unpickle when the restricted one fails),
so torch says never to load one from an untrusted source. ``load_exported(..., "pt2")`` therefore
refuses unless the caller passes ``trust_pt2=True`` (``p2pz apply`` / ``p2pz bench --trust-pt2``).

Training checkpoints are read by :func:`p2pz.student.checkpoints.read_checkpoint`, weights-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2pz.student.package import CARD, CONFIG, FORMAT_VERSION, WEIGHTS  # noqa: F401  (the package's names)
from p2pz.utils.atomic import atomic_path
from p2pz.utils.errors import UserError

LOW_PRECISION = (torch.float16, torch.bfloat16)
PT2 = "generator.pt2"
ONNX = "generator.onnx"
MAX_BATCH = 64
ONNX_OPSET = 18


# ------------------------------------------------------------------------------------------------
# Provenance: where the student's training data came from


def data_provenance(shards: str | None) -> dict[str, Any]:
    """The edit, the teacher's settings and a digest of the shard manifests behind ``shards``."""
    if not shards:
        return {}
    from p2pz.data.pairs.reader import list_shards
    from p2pz.data.pairs.sample import first_meta

    try:
        urls = list_shards(shards)
    except UserError:
        return {"shards": shards, "note": "shards not found at export time"}
    meta = first_meta(urls[0])  # the teacher's settings and the edit
    folders = sorted({str(Path(u).parent) for u in urls})
    digest = hashlib.sha256()
    manifests = sorted(p for folder in folders for p in Path(folder).glob("*manifest*.jsonl"))
    for path in manifests:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    if not manifests:  # no manifest: digest the shard names and sizes instead
        for url in urls:
            digest.update(f"{Path(url).name}:{os.path.getsize(url)}".encode())
    return {
        "shards": shards,
        "num_shards": len(urls),
        "num_pairs": _pairs_in_manifests(folders, {Path(u).name for u in urls}),
        "manifest_digest": digest.hexdigest(),
        "manifest_files": [p.name for p in manifests],
        "edit": meta.get("edit"),
        "teacher": meta.get("teacher"),
    }


def _pairs_in_manifests(folders: list[str], shard_names: set[str]) -> int | None:
    """The pairs the generator wrote into the shards named, by its manifests (None without them)."""
    from p2pz.data.pairs.shards import latest_shard_records, read_manifests

    counts: dict[str, int] = {}
    for folder in folders:
        for record in latest_shard_records(read_manifests(folder)).values():
            counts[str(record.get("shard"))] = int(record.get("samples") or 0)
        filtered = Path(folder) / "filter.json"  # `p2pz shards filter`: what it kept per shard
        if filtered.is_file():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                for shard in json.loads(filtered.read_text()).get("shards") or []:
                    counts[str(shard["shard"])] = int(shard["pairs_kept"])
    kept = [counts[name] for name in shard_names if name in counts]
    return sum(kept) if kept else None


# ------------------------------------------------------------------------------------------------
# Export


def _example_input(config: dict[str, Any], batch: int = 2) -> torch.Tensor:
    res = config["resolution"]
    return torch.zeros(batch, config.get("img_channels", 3), res, res).uniform_(-1, 1)


def _example_edit(generator: nn.Module, batch: int = 2) -> torch.Tensor | None:
    """An example conditioning batch for a student of many edits (None for a per-edit student)."""
    edit_dim = getattr(generator, "edit_dim", 0)
    return torch.randn(batch, edit_dim) if edit_dim else None


def _dynamic_batch(conditional: bool = False) -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return {"x": {0: batch}, **({"edit": {0: batch}} if conditional else {})}


def export_program(generator: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the generator with a dynamic batch, on pure-ATen ops; a student of many
    edits takes ``edit=`` (``[N, edit_dim]``) too.

    The reference decomposition of the custom ops keeps the program loadable where the project's
    compiled kernels are not (another machine, C++ serving through AOTInductor).
    """
    from p2pz.student.ops import force_impl

    edit = _example_edit(generator, example.shape[0])
    kwargs = {"edit": edit} if edit is not None else {}
    with force_impl("ref"), torch.no_grad():
        return torch.export.export(
            generator, (example,), kwargs, dynamic_shapes=_dynamic_batch(edit is not None), strict=False
        )


class _UnfusedModconv(nn.Module):
    """The generator with modulation applied to activations instead of per-sample weights.

    The fused path runs one grouped convolution with ``groups = batch``, and ONNX's Conv needs a
    constant group count, so a dynamic batch cannot be fused there. Same results either way.
    """

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor, edit: torch.Tensor | None = None) -> torch.Tensor:
        return self.generator(x, fused_modconv=False, edit=edit)


def export_onnx(generator: nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX with inputs ``x`` (and ``edit`` for a student of many edits) and output ``y``."""
    from p2pz.student.ops import force_impl

    # The exporter's optimiser logs one INFO line per deduplicated initializer (hundreds); keep
    # its warnings only, whatever logging level the caller set.
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    edit = _example_edit(generator, example.shape[0])
    inputs = (example,) if edit is None else (example, edit)
    with force_impl("ref"), torch.no_grad():
        torch.onnx.export(
            _UnfusedModconv(generator).eval(),
            inputs,
            str(path),
            input_names=["x"] if edit is None else ["x", "edit"],
            output_names=["y"],
            dynamic_shapes=_dynamic_batch(edit is not None),
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def held_out_split(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The shards the student trained on and those held out from it, as the run recorded them (its
    datamodule's state; older checkpoints: the split recomputed from the datamodule's settings)."""
    from p2pz.student.datamodule import split_shards

    state = ckpt.get("PairDataModule") or {}
    train, val = state.get("train_shards"), state.get("val_shards")
    if train is None:
        hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
        if not hp.get("shards"):
            return {}
        try:
            train, val = split_shards(hp["shards"], hp.get("val_shards"), hp.get("val_fraction", 0.05))
        except UserError:
            return {"note": "shards not found at export time"}
    return {"train_shards": [str(u) for u in train], "val_shards": [str(u) for u in val or []]}


def export_package(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    formats: tuple[str, ...] = ("pt2", "onnx"),
    extra: dict[str, Any] | None = None,
    finish: Any = None,
) -> Path:
    """Write the per-edit package of a training checkpoint's EMA generator to ``out_dir``.

    The folder is a Hugging Face model folder (``Student.save_pretrained``) with a model card; it
    appears complete or not at all (written beside it, then renamed into place). ``finish(tmp, config)``,
    when given, runs on the written folder before it is renamed (``p2pz export --eval`` scores it there
    and adds the figures to the config and the card).
    """
    from p2pz.student.card import write_card
    from p2pz.student.checkpoints import generator_from_checkpoint, read_checkpoint
    from p2pz.student.package import Student, package_config

    checkpoint = Path(checkpoint)
    unknown = set(formats) - {"pt2", "onnx"}
    if unknown:
        raise UserError(f"unknown export format(s) {sorted(unknown)}; choose from pt2, onnx")
    ckpt = read_checkpoint(checkpoint)  # weights-only: a checkpoint from elsewhere runs no code
    generator = generator_from_checkpoint(ckpt, checkpoint)
    data_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    provenance = data_provenance(data_hp.get("shards"))
    split = held_out_split(ckpt)
    if split:
        provenance["split"] = split
    config = package_config(
        generator.config,
        training={
            "step": int(ckpt.get("global_step", 0)),
            "checkpoint": checkpoint.name,
            "hyper_parameters": {
                k: v
                for k, v in dict(ckpt.get("hyper_parameters") or {}).items()
                if isinstance(v, (int, float, str, bool, type(None), list, tuple))
            },
        },
        data=provenance,
        teacher_model=(provenance.get("teacher") or {}).get("model"),
    )
    config.update(extra or {})  # e.g. the demo's teacher_model
    config.update(trained_edits(ckpt))
    student = Student(**generator.config)
    student.load_state_dict(generator.state_dict())
    student.eval().requires_grad_(False)
    example = _example_input(config["generator"])
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if "pt2" in formats:
            torch.export.save(export_program(generator, example), tmp / PT2)
            config["files"]["pt2"] = PT2
        if "onnx" in formats:
            export_onnx(generator, example, tmp / ONNX)
            config["files"]["onnx"] = ONNX
        write_card(tmp, config)  # before save_pretrained, which writes a bare card only where none is
        student.package_config = config
        student.save_pretrained(tmp)
        if finish is not None:
            finish(tmp, config)
    return Path(out_dir)


def trained_edits(ckpt: dict[str, Any]) -> dict[str, Any]:
    """``{"edits": {name: {source, target, conditioning}}}`` for a student of many edits, else ``{}``."""
    from p2pz.teacher.edits import parse_edit

    edits = (ckpt.get("hyper_parameters") or {}).get("edits") or {}
    if not edits:
        return {}
    described = {}
    for name, vector in edits.items():
        edit = parse_edit(name)
        described[name] = {"source": edit.source, "target": edit.target, "conditioning": list(vector)}
    return {"edits": described}


def add_to_package(folder: str | os.PathLike, **sections: Any) -> dict[str, Any]:
    """Add ``sections`` (e.g. ``eval=...``, ``bench=...``) to a package's ``config.json`` and render its
    card again; each file is replaced atomically. Returns the new config."""
    from p2pz.student.card import render_card
    from p2pz.student.package import read_config as read_package_config

    folder = Path(folder)
    config = {**read_package_config(folder), **sections}
    with atomic_path(folder / CONFIG, suffix=".json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, default=str) + "\n")
    with atomic_path(folder / CARD, suffix=".md") as tmp:
        render_card(config, folder).save(tmp)
    return config


def evaluate_into_package(
    folder: str | os.PathLike, pairs: str | None = None, **options: Any
) -> dict[str, Any]:
    """``p2pz export --eval``: score the package on ``pairs`` (None: its held-out shards), write
    ``grid.png`` (input | teacher | student) and the figures into ``config.json`` and the card."""
    from p2pz.student.card import GRID
    from p2pz.student.evaluation import card_summary, evaluate_package, grid_image

    report = evaluate_package(folder, pairs, **options)
    grid_image(report["grid"]).save(Path(folder) / GRID)
    add_to_package(folder, eval=card_summary(report))
    return report


def bench_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the card shows of a ``p2pz bench`` report: device, p50 per backend and batch, the teacher."""
    return {
        "device": report.get("device"),
        "student": {
            name: {b: {"p50_ms": r.get("p50_ms")} for b, r in rows.items()}
            for name, rows in (report.get("student") or {}).items()
        },
        "teacher_ms": report.get("teacher_ms"),
        "dtype_error": report.get("dtype_error"),
    }


# ------------------------------------------------------------------------------------------------
# Loading


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """A package's ``config.json`` (a folder, or a Hub repo id resolved through the cache), ``json`` only."""
    from p2pz.student.package import read_config as read_package_config
    from p2pz.student.package import resolve_package

    return read_package_config(resolve_package(model_dir))


PT2_UNTRUSTED = (
    "{model_dir}: the pt2 backend unpickles {file}, which can run code from the package; "
    "pass --trust-pt2 only for a package you made or trust, or use the eager or onnx backend"
)


ONNX_CUDA = "CUDAExecutionProvider"


def onnx_cuda_missing() -> str | None:
    """Why the ONNX file cannot run on CUDA here (None when onnxruntime's CUDA provider is installed)."""
    import onnxruntime as ort

    if ONNX_CUDA in ort.get_available_providers():
        return None
    return (
        "onnx not run on cuda: this onnxruntime has no CUDAExecutionProvider "
        "(pip install onnxruntime-gpu, or --device cpu)"
    )


class _OnnxModule(nn.Module):
    """onnxruntime behind a module's call signature: float32 tensors in and out, on ``device``
    (the CPU provider, or the CUDA provider for a cuda device)."""

    def __init__(self, path: Path, threads: int | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        import onnxruntime as ort

        self.device = torch.device(device)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if self.device.type == "cuda":
            providers: list[Any] = [(ONNX_CUDA, {"device_id": self.device.index or 0})]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def forward(self, x: torch.Tensor, edit: torch.Tensor | None = None) -> torch.Tensor:
        feeds = {"x": x.detach().cpu().float().contiguous().numpy()}
        if edit is not None:
            feeds["edit"] = edit.detach().cpu().float().expand(x.shape[0], -1).contiguous().numpy()
        (y,) = self.session.run(None, feeds)
        return torch.from_numpy(y).to(x.device)


def load_exported(
    model_dir: str | os.PathLike,
    backend: str = "eager",
    device: str | torch.device = "cpu",
    *,
    trust_pt2: bool = False,
    dtype: torch.dtype = torch.float32,
    edit: torch.Tensor | None = None,
) -> nn.Module:
    """An exported student as a module ``y = model(x)``; ``x`` in [-1, 1], ``[N, 3, H, W]``.

    ``model_dir``: a package folder or a Hub repo id (:func:`p2pz.student.package.resolve_package`).
    backend: ``eager`` (the :class:`~p2pz.student.package.Student`, strictly loaded from safetensors,
    fastest ops for the device), ``pt2`` (the torch.export program) or ``onnx`` (onnxruntime: the CPU
    provider, or CUDA's on a cuda device when installed). ``pt2`` unpickles the
    program, which can run code: it needs ``trust_pt2=True`` (a package you made or trust). ``dtype``:
    the eager generator's precision (the pt2 program and the ONNX file are float32 only). ``edit``: the
    conditioning vector a student of many edits makes its edit with (bound: the module takes ``x`` only).
    """
    from p2pz.student.package import resolve_package

    model_dir = resolve_package(model_dir)
    config = read_config(model_dir)
    conditional = bool(int((config.get("generator") or {}).get("edit_dim") or 0))
    if conditional != (edit is not None):
        raise UserError(
            f"{model_dir} makes many edits: choose one (--edit)"
            if conditional
            else f"{model_dir} makes one edit: it takes no edit vector"
        )
    model = _load_backend(model_dir, config, backend, device, trust_pt2, dtype)
    return bind_edit(model, edit.to(device)) if conditional else model


def bind_edit(model: nn.Module, edit: torch.Tensor) -> nn.Module:
    """A student of many edits with ``edit`` (its conditioning vector) bound: ``y = bound(x)``."""
    return _WithEdit(model, edit)


class _WithEdit(nn.Module):
    """A student of many edits with one edit bound: ``y = model(x)``."""

    def __init__(self, model: nn.Module, edit: torch.Tensor):
        super().__init__()
        self.model, self.edit = model, edit.float().reshape(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, edit=self.edit.expand(x.shape[0], -1))


def _load_backend(
    model_dir: Path, config: dict[str, Any], backend: str, device: str | torch.device, trust_pt2: bool,
    dtype: torch.dtype,
) -> nn.Module:  # fmt: skip
    from p2pz.student.package import load_student

    files = config.get("files", {})
    if backend == "eager":
        return load_student(model_dir, device=device, dtype=dtype)
    if backend not in ("pt2", "onnx"):
        raise UserError(f"unknown backend {backend!r}; choose eager, pt2 or onnx")
    if dtype != torch.float32:
        raise UserError(f"--dtype {str(dtype).removeprefix('torch.')} runs with the eager backend only")
    if backend not in files:
        raise UserError(f"{model_dir} was exported without {backend}; re-run 'p2pz export' with it")
    if backend == "pt2":
        if not trust_pt2:
            raise UserError(PT2_UNTRUSTED.format(model_dir=model_dir, file=files["pt2"]))
        return program_on_device(torch.export.load(model_dir / files["pt2"]), device)
    if torch.device(device).type == "cuda" and (why := onnx_cuda_missing()):
        raise UserError(why)
    if torch.device(device).type not in ("cpu", "cuda"):
        raise UserError(f"the onnx backend runs on cpu or cuda, not {device}")
    return _OnnxModule(model_dir / files["onnx"], device=device)


def program_on_device(program: torch.export.ExportedProgram, device: str | torch.device) -> nn.Module:
    """The exported program as a module that runs on ``device``.

    The program was traced on the CPU, so its graph holds device constants besides its weights:
    ``aten._assert_tensor_metadata(..., device=cpu)`` checks and the ``device=`` of the tensors it
    creates. ``module().to(device)`` moves only the weights, and the first of those checks fails on a
    GPU; torch.export's ``move_to_device_pass`` rewrites the constants along with the weights.
    """
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, torch.device(device)).module()


# ------------------------------------------------------------------------------------------------
# Applying a package to image files


def apply_to_images(
    model: nn.Module,
    resolution: int,
    images: list[Any],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[Any]:
    """Edit PIL images with an exported student: ``resolution`` x ``resolution`` RGB results.

    Each image is brought to the model's input as the teacher brings its inputs
    (:func:`p2pz.teacher.images.prepare_image`: RGB with transparency on white, the shorter side
    resized to ``resolution``, the centred square cropped), so a non-square photo is cropped, not
    squashed, and the result is the edit of that centred square. The inputs go to ``device`` in
    float32 when ``dtype`` (the model's own, see :func:`load_exported`) is float16 / bfloat16: the
    student casts them for its layers and adds its input back in float32. The results are 8-bit images.
    """
    from p2pz.teacher.images import numpy_to_pil, pil_to_tensor, prepare_image, tensor_to_numpy

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    outputs = []
    for start in range(0, len(images), batch_size):
        x = pil_to_tensor([prepare_image(im, resolution) for im in images[start : start + batch_size]])
        with torch.no_grad():  # float32 in: a float16 / bfloat16 student casts it itself
            y = model(x.to(device=device, dtype=torch.float32 if dtype in LOW_PRECISION else dtype))
        outputs.extend(numpy_to_pil(tensor_to_numpy(y)))
    return outputs


def save_image_atomic(image: Any, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(buffer.getvalue())
