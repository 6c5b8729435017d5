"""Reading a student's training checkpoint without running anything the file carries.

A ``.ckpt`` is a pickle (inside torch's zip format, or bare in the legacy format), and unpickling
an arbitrary file runs whatever its ``__reduce__`` entries name. Checkpoints get passed around, so
:func:`read_checkpoint` loads them with ``torch.load(..., weights_only=True)``: torch's restricted
unpickler rebuilds tensors and plain containers (dict, list, tuple, str, numbers, None) and refuses
every other global before calling it. ``p2pz export`` and :func:`p2pz.student.training.load_generator`
both read checkpoints through here.

Anything that is not a student checkpoint (missing, empty, truncated, another archive, a pickle
asking for code, another model's checkpoint) is a one-line :class:`UserError` naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2pz.utils.errors import UserError

HINT = "pass a checkpoint written by `p2pz train` (RUN/checkpoints/last.ckpt)"

# Globals beyond torch's weights-only defaults that a checkpoint of this project needs. Saving a
# real `configs/tiny.yaml` run (Lightning 2.6: state_dict, optimizer_states, loops, callbacks,
# hyper_parameters, datamodule_hyper_parameters, generator_config) and reading it back with
# weights_only=True needs none: every value is a tensor or a plain container. Something a future
# checkpoint adds that is not (e.g. numpy RNG state) goes here, by object, and only for this load.
CHECKPOINT_SAFE_GLOBALS: list[Any] = []

REQUIRED_KEYS = ("generator_config", "state_dict")


def _why_unreadable(path: Path, err: Exception) -> str:
    """One short clause for a torch.load failure (torch's own messages run over many lines)."""
    text = str(err)
    # torch's restricted unpickler refused to import or call something: the file asked for code
    refused = re.search(r"GLOBAL |reduce for |Can only build |Can only create new object", text)
    if isinstance(err, pickle.UnpicklingError) and refused:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"the global {found.group(1)}" if found else "an object that is not plain data"
        return f"it asks to run code when loaded ({what}), which p2pz refuses to do"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        head = b""
    if not head:
        what = "the file is empty"
    elif head.startswith(b"PK"):
        what = "a zip archive torch cannot read as a checkpoint: cut short, or not a checkpoint"
    elif head[257:262] == b"ustar":
        what = "a tar archive, not a checkpoint"
    elif head.startswith(b"\x80"):
        what = "a pickle torch cannot read: cut short, or not a checkpoint"
    else:
        what = "not a torch checkpoint file"
    return f"{what} ({type(err).__name__})"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of a student training checkpoint, loaded on the CPU; runs no code from the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}; {HINT}")
    if not path.is_file():
        raise UserError(f"{path} is not a file; {HINT}")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:  # the file system's error (permissions, I/O), not the file's content
        raise UserError(f"cannot read checkpoint {path}: {err.strerror or err}; {HINT}") from err
    except Exception as err:  # any failure to parse the file is the file's fault, not the program's
        raise UserError(
            f"{path} is not a p2pz student checkpoint: {_why_unreadable(path, err)}; {HINT}"
        ) from err
    if not isinstance(checkpoint, dict):
        raise UserError(
            f"{path} is not a p2pz student checkpoint: it holds a {type(checkpoint).__name__}, "
            f"not a training checkpoint; {HINT}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise UserError(
            f"{path} is not a p2pz student checkpoint (no {' or '.join(missing)}: another model's?); {HINT}"
        )
    return checkpoint


def generator_from_checkpoint(
    checkpoint: dict[str, Any], path: str | os.PathLike, ema: bool = True
) -> nn.Module:
    """The (EMA, by default) generator held by ``read_checkpoint(path)``'s result, eval mode, CPU."""
    from p2pz.student.networks import Generator

    prefix = "g_ema." if ema else "G."
    config, state_dict = checkpoint["generator_config"], checkpoint["state_dict"]
    if not isinstance(config, dict) or not isinstance(state_dict, dict):
        raise UserError(
            f"{path} is not a p2pz student checkpoint (malformed generator_config or state_dict); {HINT}"
        )
    state = {
        k[len(prefix) :]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(prefix)
    }
    if not state:
        raise UserError(
            f"{path} is not a p2pz student checkpoint (no {prefix}* weights in its state_dict); {HINT}"
        )
    try:
        generator = Generator(**config)
        generator.load_state_dict(state)
    except (UserError, TypeError, ValueError, KeyError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{path} is not a p2pz student checkpoint this version can load ({reason}); {HINT}"
        ) from err
    return generator.eval().requires_grad_(False)
