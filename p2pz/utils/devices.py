"""Where and in which precision a command runs: the one rule for ``--device`` and ``--dtype``.

``--device auto`` (every command's default) is cuda when torch sees a GPU, else cpu. ``--dtype`` takes
``float32``, ``float16``, ``bfloat16`` and the short names ``fp32``, ``fp16``, ``bf16``, always
normalised to the long name (``auto`` where a command decides by the device, as ``p2pz generate``).
"""

from __future__ import annotations

import argparse
from typing import Any

AUTO = "auto"
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "float": "float32",
    "half": "float16",
}


def resolve_device(device: Any = None) -> str:
    """``device`` as torch names it: ``auto``, ``None`` or ``""`` -> ``cuda`` when present, else ``cpu``."""
    text = "" if device is None else str(device).strip().lower()
    if text in ("", AUTO):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return text


def dtype_name(value: Any, allow_auto: bool = False) -> str:
    """``fp16`` / ``float16`` / ``torch.float16`` -> ``float16`` (``auto`` only with ``allow_auto``);
    ``argparse.ArgumentTypeError`` naming the choices otherwise."""
    text = str(value).strip().lower().removeprefix("torch.")
    text = DTYPE_ALIASES.get(text, text)
    if text in DTYPES or (allow_auto and text == AUTO):
        return text
    choices = ((AUTO,) if allow_auto else ()) + DTYPES
    raise argparse.ArgumentTypeError(
        f"must be one of {', '.join(choices)} (or fp32, fp16, bf16), got {value!r}"
    )


def resolve_dtype(dtype: Any, device: str) -> str:
    """``dtype``'s long name; ``auto`` (or None) -> float16 on cuda, float32 elsewhere."""
    if dtype is None or str(dtype).strip().lower() == AUTO:
        return "float16" if str(device).startswith("cuda") else "float32"
    return dtype_name(dtype)


def torch_dtype(dtype: Any):
    """The torch dtype of a name (``float16``, ``bf16`` ...)."""
    import torch

    return getattr(torch, dtype_name(dtype))
