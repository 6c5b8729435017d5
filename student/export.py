"""Per-edit model packages: what users ship after training a student.

``export_package(ckpt, out)`` writes a folder that runs without Lightning or the training code::

    generator.safetensors   the EMA generator's weights (no pickle)
    config.json             architecture, resolution, the edit, the teacher's settings, data provenance
    generator.pt2           a torch.export program, dynamic batch dimension
    generator.onnx          ONNX (opset 18), the custom ops lowered through their reference decomposition

``load_exported(dir, backend)`` runs any of the three. Nothing in a package is unpickled: weights come
from safetensors and the ``.pt2`` program is loaded by ``torch.export.load``, which reads tensors with
``weights_only`` semantics.
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

    from p2pz.student.training import load_generator

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"checkpoint not found: {checkpoint} (give a .ckpt written by train.py)")
    unknown = set(formats) - {"pt2", "onnx"}
    if unknown:
        raise UserError(f"unknown export format(s) {sorted(unknown)}; choose from pt2, onnx")
    generator = load_generator(checkpoint)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
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
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"{model_dir} is not an exported student (no {CONFIG}); make one with 'p2pz export'")
    return json.loads(path.read_text())


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


def load_exported(
    model_dir: str | os.PathLike, backend: str = "eager", device: str | torch.device = "cpu"
) -> nn.Module:
    """An exported student as a module ``y = model(x)``; ``x`` in [-1, 1], ``[N, 3, H, W]``.

    backend: ``eager`` (the project's Generator with the safetensors weights, fastest ops for the
    device), ``pt2`` (the torch.export program) or ``onnx`` (onnxruntime, CPU).
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    files = config.get("files", {})
    if backend == "eager":
        from p2pz.student.networks import Generator

        generator = Generator(**config["generator"])
        generator.load_state_dict(load_file(model_dir / files.get("weights", WEIGHTS)))
        return generator.eval().requires_grad_(False).to(device)
    if backend not in ("pt2", "onnx"):
        raise UserError(f"unknown backend {backend!r}; choose eager, pt2 or onnx")
    if backend not in files:
        raise UserError(f"{model_dir} was exported without {backend}; re-run 'p2pz export' with it")
    if backend == "pt2":
        program = torch.export.load(model_dir / files["pt2"])
        return program.module().to(device)
    return _OnnxModule(model_dir / files["onnx"])


# ------------------------------------------------------------------------------------------------
# Applying a package to image files


def apply_to_images(model: nn.Module, resolution: int, images: list[Any], batch_size: int = 8) -> list[Any]:
    """Edit PIL images with an exported student; each result has its input's original size."""
    import numpy as np
    from PIL import Image

    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        x = (
            torch.stack(
                [
                    torch.from_numpy(
                        np.asarray(im.convert("RGB").resize((resolution, resolution), Image.LANCZOS)).copy()
                    ).permute(2, 0, 1)
                    for im in chunk
                ]
            )
            .float()
            .div(127.5)
            .sub(1.0)
        )
        with torch.no_grad():
            y = model(x).float().clamp(-1, 1)
        for im, out in zip(chunk, y):
            arr = ((out.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype("uint8")
            outputs.append(Image.fromarray(arr).resize(im.size, Image.LANCZOS))
    return outputs


def save_image_atomic(image: Any, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(buffer.getvalue())
