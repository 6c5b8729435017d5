"""How close a student's edits are to its teacher's, on any pairs: PSNR, SSIM and LPIPS.

For (input, teacher's edit, student's edit) triples of the same size, three comparisons:

- ``to_teacher``: the student's edit against the teacher's (the distillation's target);
- ``to_input``: the student's edit against the input (how much it changed);
- ``copy_to_teacher``: the input against the teacher's edit (the copy-the-input baseline a student must
  beat).

PSNR (dB, 8-bit images on [0, 1], a perfect image counts ``MAX_PSNR``) and SSIM come from torchmetrics,
per image, then averaged; LPIPS (lower is closer) only when a network is given (the [paper] extra and
its backbone's ImageNet weights). Unlike :mod:`p2pz.data.eval.fidelity`, nothing here needs the shapes
world's oracle: it scores the pairs of any edit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pz.data.eval.world_metrics import MAX_PSNR
from p2pz.utils.errors import UserError

COMPARISONS = {
    "to_teacher": ("student", "teacher"),
    "to_input": ("student", "input"),
    "copy_to_teacher": ("input", "teacher"),
}


def as_unit_batch(images: Sequence[Any]) -> torch.Tensor:
    """PIL images or uint8 arrays (same size) -> ``[N, 3, H, W]`` float32 in [0, 1]."""
    arrays = [
        np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB, capped at ``MAX_PSNR``) and SSIM of ``[N, 3, H, W]`` batches in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = torch.nan_to_num(psnr, posinf=MAX_PSNR).clamp(max=MAX_PSNR)
    ssim = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
    return psnr, ssim


def optional_lpips(
    net: str = "alex", backbone: str | os.PathLike | None = None, device: Any = "cpu"
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, str | None]:
    """(LPIPS distance of ``[N, 3, H, W]`` batches in [0, 1], None) when a backbone is at hand:
    ``backbone`` or torchvision's cached copy; else (None, why not). A ``backbone`` that is given but
    unusable is an error, not a note."""
    from p2pz.data.eval.paper_metrics import load_lpips, lpips_backbone_file

    if backbone is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / lpips_backbone_file(net)
        if not cached.is_file():
            return None, f"no LPIPS: no {cached.name} in {cached.parent} (give --lpips-backbone FILE)"
        backbone = cached
    try:
        model = (
            load_lpips(net, backbone, flag="--lpips-backbone FILE").to(device).eval().requires_grad_(False)
        )
    except UserError as err:
        if "pip install" in str(err):  # the [paper] extra is not installed: a note, the rest is scored
            return None, f"no LPIPS: {err}"
        raise

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(a.to(device) * 2 - 1, b.to(device) * 2 - 1).flatten().cpu()

    return distance, None


def score_edits(
    inputs: Sequence[Any],
    teacher: Sequence[Any],
    student: Sequence[Any],
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Mean PSNR / SSIM (/ LPIPS) of each comparison (see the module docstring), plus ``per_image``."""
    if not (len(inputs) == len(teacher) == len(student)) or not inputs:
        raise ValueError(f"{len(inputs)} inputs, {len(teacher)} teacher and {len(student)} student images")
    images = {"input": inputs, "teacher": teacher, "student": student}
    per_image: list[dict[str, float]] = [{} for _ in inputs]
    for start in range(0, len(inputs), batch_size):
        batch = {who: as_unit_batch(ims[start : start + batch_size]) for who, ims in images.items()}
        for name, (a, b) in COMPARISONS.items():
            figures = dict(zip(("psnr", "ssim"), psnr_ssim(batch[a], batch[b])))
            if lpips is not None:
                figures["lpips"] = lpips(batch[a], batch[b])
            for key, values in figures.items():
                for i, value in enumerate(values.tolist()):
                    per_image[start + i][f"{key}_{name}"] = float(value)
    report: dict[str, Any] = {"n": len(inputs)}
    for name in COMPARISONS:
        keys = ("psnr", "ssim", "lpips") if lpips is not None else ("psnr", "ssim")
        report[name] = {k: float(np.mean([p[f"{k}_{name}"] for p in per_image])) for k in keys}
    report["per_image"] = per_image
    return report
