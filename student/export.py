"""Per-edit model packages: what users ship after training a student.

``export_package(ckpt, out)`` writes a folder that runs without Lightning or the training code::

    generator.safetensors   the EMA generator's weights (no pickle)
    config.json             architecture, resolution, the edit, the teacher's settings, data provenance
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

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2pz.utils.atomic import atomic_path
from p2pz.utils.errors import UserError

FORMAT_VERSION = 1
WEIGHTS = "generator.safetensors"
CONFIG = "config.json"
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
        "manifest_digest": digest.hexdigest(),
        "manifest_files": [p.name for p in manifests],
        "edit": meta.get("edit"),
        "teacher": meta.get("teacher"),
    }


# ------------------------------------------------------------------------------------------------
# Export


def _example_input(config: dict[str, Any], batch: int = 2) -> torch.Tensor:
    res = config["resolution"]
    return torch.zeros(batch, config.get("img_channels", 3), res, res).uniform_(-1, 1)


def _dynamic_batch() -> dict[str, dict[int, Any]]:
    return {"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}


def export_program(generator: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the generator with a dynamic batch, on pure-ATen ops.

    The reference decomposition of the custom ops keeps the program loadable where the project's
    compiled kernels are not (another machine, C++ serving through AOTInductor).
    """
    from p2pz.student.ops import force_impl

    with force_impl("ref"), torch.no_grad():
        return torch.export.export(generator, (example,), dynamic_shapes=_dynamic_batch(), strict=False)


class _UnfusedModconv(nn.Module):
    """The generator with modulation applied to activations instead of per-sample weights.

    The fused path runs one grouped convolution with ``groups = batch``, and ONNX's Conv needs a
    constant group count, so a dynamic batch cannot be fused there. Same results either way.
    """

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(x, fused_modconv=False)


def export_onnx(generator: nn.Module, example: torch.Tensor, path: Path) -> None:
    from p2pz.student.ops import force_impl

    # The exporter's optimiser logs one INFO line per deduplicated initializer (hundreds); keep
    # its warnings only, whatever logging level the caller set.
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    with force_impl("ref"), torch.no_grad():
        torch.onnx.export(
            _UnfusedModconv(generator).eval(),
            (example,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes=_dynamic_batch(),
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def export_package(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    formats: tuple[str, ...] = ("pt2", "onnx"),
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the per-edit package of a training checkpoint's EMA generator to ``out_dir``.

    The folder appears complete or not at all (written beside it, then renamed into place).
    """
    from safetensors.torch import save_file

    from p2pz.student.checkpoints import generator_from_checkpoint, read_checkpoint

    checkpoint = Path(checkpoint)
    unknown = set(formats) - {"pt2", "onnx"}
    if unknown:
        raise UserError(f"unknown export format(s) {sorted(unknown)}; choose from pt2, onnx")
    ckpt = read_checkpoint(checkpoint)  # weights-only: a checkpoint from elsewhere runs no code
    generator = generator_from_checkpoint(ckpt, checkpoint)
    data_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    provenance = data_provenance(data_hp.get("shards"))
    config = {
        "format_version": FORMAT_VERSION,
        "kind": "p2pz-student",
        "generator": dict(generator.config),
        "resolution": generator.config["resolution"],
        "training": {
            "step": int(ckpt.get("global_step", 0)),
            "checkpoint": checkpoint.name,
            "hyper_parameters": {
                k: v
                for k, v in dict(ckpt.get("hyper_parameters") or {}).items()
                if isinstance(v, (int, float, str, bool, type(None), list, tuple))
            },
        },
        "data": provenance,
        "teacher_model": (provenance.get("teacher") or {}).get("model"),
        "files": {"weights": WEIGHTS},
        **(extra or {}),
    }
    example = _example_input(config["generator"])
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        state = {k: v.detach().contiguous() for k, v in generator.state_dict().items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt", "kind": "p2pz-student"})
        if "pt2" in formats:
            torch.export.save(export_program(generator, example), tmp / PT2)
            config["files"]["pt2"] = PT2
        if "onnx" in formats:
            export_onnx(generator, example, tmp / ONNX)
            config["files"]["onnx"] = ONNX
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return Path(out_dir)


# ------------------------------------------------------------------------------------------------
# Loading


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """A package's ``config.json``, parsed with ``json`` only."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"{model_dir} is not an exported student (no {CONFIG}); make one with 'p2pz export'")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"{path} is not valid JSON ({err}); re-export the package with 'p2pz export'"
        ) from err
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a JSON object; re-export the package with 'p2pz export'")
    return config


PT2_UNTRUSTED = (
    "{model_dir}: the pt2 backend unpickles {file}, which can run code from the package; "
    "pass --trust-pt2 only for a package you made or trust, or use the eager or onnx backend"
)


class _OnnxModule(nn.Module):
    """onnxruntime behind a module's call signature (float32 tensors in and out, on the CPU)."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (y,) = self.session.run(None, {"x": x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(y)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
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


def load_exported(
    model_dir: str | os.PathLike,
    backend: str = "eager",
    device: str | torch.device = "cpu",
    *,
    trust_pt2: bool = False,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """An exported student as a module ``y = model(x)``; ``x`` in [-1, 1], ``[N, 3, H, W]``.

    backend: ``eager`` (the project's Generator with the safetensors weights, fastest ops for the
    device), ``pt2`` (the torch.export program) or ``onnx`` (onnxruntime, CPU). ``pt2`` unpickles the
    program, which can run code: it needs ``trust_pt2=True`` (a package you made or trust). ``dtype``:
    the eager generator's precision (the pt2 program and the ONNX file are float32 only).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    files = config.get("files", {})
    if backend == "eager":
        from p2pz.student.networks import Generator

        generator = Generator(**config["generator"])
        generator.load_state_dict(_read_weights(model_dir / files.get("weights", WEIGHTS)))
        generator = generator.eval().requires_grad_(False).to(device)
        for param in generator.parameters():  # the buffers (resampling filters) stay float32, as the
            param.data = param.data.to(dtype)  # ops take them; they cast them to the input's dtype
        return generator
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
    return _OnnxModule(model_dir / files["onnx"])


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
    ``dtype`` (the model's own, see :func:`load_exported`); the results are 8-bit images whatever it is.
    """
    from p2pz.teacher.images import numpy_to_pil, pil_to_tensor, prepare_image, tensor_to_numpy

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    outputs = []
    for start in range(0, len(images), batch_size):
        x = pil_to_tensor([prepare_image(im, resolution) for im in images[start : start + batch_size]])
        with torch.no_grad():
            y = model(x.to(device=device, dtype=dtype))
        outputs.extend(numpy_to_pil(tensor_to_numpy(y)))
    return outputs


def save_image_atomic(image: Any, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(buffer.getvalue())
