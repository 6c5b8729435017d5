"""The pix2pix-zero teacher: captioning, sentences, edit directions, inversion, guided editing.

Each stage of the method sits in its own module, named after the paper:
``captioning`` (BLIP captions), ``sentences`` (sentence banks per concept), ``directions`` (edit
directions in the text-embedding space), ``inversion`` (regularised DDIM inversion), ``attention``
and ``editing`` (cross-attention guidance), ``pipeline`` (``Pix2PixZero``, the whole edit).
``tiny`` builds the random-weight model that tests and demos use.

Names are imported lazily, so ``import teacher`` stays cheap (no torch until needed).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Pix2PixZero": "teacher.pipeline",
    "Captioner": "teacher.captioning",
    "load_captioner": "teacher.captioning",
    "make_sentences": "teacher.sentences",
    "template_sentences": "teacher.sentences",
    "EditDirection": "teacher.directions",
    "embed_sentences": "teacher.directions",
    "compute_direction": "teacher.directions",
    "load_direction": "teacher.directions",
    "load_sd_components": "teacher.models",
    "make_tiny": "teacher.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'teacher' has no attribute {name!r}")
