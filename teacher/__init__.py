"""The pix2pix-zero teacher: captioning, sentences, edit directions, inversion, guided editing.

Each stage of the method sits in its own module, named after the paper:
``captioning`` (BLIP captions), ``sentences`` (sentence banks per concept), ``directions`` (edit
directions in the text-embedding space), ``inversion`` (regularised DDIM inversion), ``attention``
and ``editing`` (cross-attention guidance), ``pipeline`` (``Pix2PixZero``, the whole edit).

Names are imported lazily, so ``import p2pz.teacher`` stays cheap (no torch until needed).
"""

from __future__ import annotations

import importlib

from p2pz.utils import require_namespace

require_namespace(__name__, "p2pz.teacher")

_EXPORTS = {
    "Pix2PixZero": "p2pz.teacher.pipeline",
    "Captioner": "p2pz.teacher.captioning",
    "load_captioner": "p2pz.teacher.captioning",
    "make_sentences": "p2pz.teacher.sentences",
    "template_sentences": "p2pz.teacher.sentences",
    "EditDirection": "p2pz.teacher.directions",
    "embed_sentences": "p2pz.teacher.directions",
    "compute_direction": "p2pz.teacher.directions",
    "load_direction": "p2pz.teacher.directions",
    "load_sd_components": "p2pz.teacher.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'p2pz.teacher' has no attribute {name!r}")
