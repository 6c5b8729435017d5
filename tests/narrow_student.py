"""A narrow 64 px student with random weights, exported as a package: the package tests' subject."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

NARROW = {"channel_base": 512, "channel_max": 16}  # a few channels: exports and benches in seconds


def export_narrow_student(root: Path, formats: Sequence[str] = ()) -> Path:
    """Export a seeded, untrained narrow ``lite`` student under ``root`` with these extra formats."""
    from p2pz.student.export import export_package
    from p2pz.student.training import StudentModule

    torch.manual_seed(0)
    module = StudentModule(resolution=64, preset="lite", lpips_weight=0.0, generator=NARROW)
    checkpoint = {"state_dict": module.state_dict(), "generator_config": dict(module.g_ema.config)}
    torch.save(checkpoint, root / "last.ckpt")
    return export_package(root / "last.ckpt", root / "model", formats=tuple(formats))
