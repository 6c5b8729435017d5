"""The shapes world's offline CLIP tokenizer: every caption word is exactly one token.

Built by ``p2pz.teacher.clip_tokenizer`` (CLIP's byte-level layout plus one merge chain per word) from
the world's words; any other word still tokenises, into byte symbols.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from p2pz.data.shapes.world import scene_words
from p2pz.teacher import clip_tokenizer
from p2pz.teacher.clip_tokenizer import MODEL_MAX_LENGTH, build_vocab

__all__ = ["MODEL_MAX_LENGTH", "build_tokenizer", "build_vocab", "save_tokenizer"]


def build_tokenizer(words: Sequence[str] | None = None):
    """A ``CLIPTokenizer`` for ``words`` (default: the world's caption words)."""
    return clip_tokenizer.build_tokenizer(scene_words() if words is None else words)


def save_tokenizer(folder: str | os.PathLike, words: Sequence[str] | None = None) -> None:
    """Write the tokenizer folder for ``words`` (default: the world's caption words)."""
    clip_tokenizer.save_tokenizer(folder, scene_words() if words is None else words)
