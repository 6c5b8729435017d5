"""Comparing training states exactly (checkpoints, optimiser states), shared by the checkpoint tests."""

from __future__ import annotations

from typing import Any

import torch


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Exactly equal nested contents (dicts, lists, tensors, plain values); ``where`` names the spot."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where
