"""The edits of the shapes world: which object an edit changes, its ideal result, its directions.

An edit of the world swaps one attribute of one object: a shape (``circle:square``) or a colour
(``red:blue``). The edited object is the first object of the input scene with the source word.
Its edit directions come from the world's own captions (``world_sentence_banks``): every caption
of the toy distribution that has the source word, and the same captions with the target word. The
built-in templates ("a blurry photo of a circle") are mostly words the toy model never saw, whose
embeddings are untrained.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from p2pz.data.shapes import world
from p2pz.data.shapes.world import Scene
from p2pz.teacher.edits import Edit, parse_edit
from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    from p2pz.teacher.directions import EditDirection
    from p2pz.teacher.pipeline import Pix2PixZero


@dataclass(frozen=True)
class WorldEdit(Edit):
    """Swap ``source`` for ``target`` on the ``attribute`` ("shape" or "colour") of one object.

    Its ``name`` (``circle-to-square``) and ``spec`` (``circle:square``) are every edit's.
    """

    attribute: str = "shape"

    @property
    def other_attribute(self) -> str:
        return "colour" if self.attribute == "shape" else "shape"

    def object_index(self, scene: Scene) -> int:
        """Index of the object the edit applies to: the first one with the source word."""
        for i, obj in enumerate(scene.objects):
            if getattr(obj, self.attribute) == self.source:
                return i
        raise UserError(f"the scene '{scene.caption}' has no {self.source} object to edit into {self.target}")

    def apply(self, scene: Scene) -> Scene:
        """The ideal edit of ``scene``: the same scene with the object's attribute swapped."""
        return scene.replace_object(self.object_index(scene), **{self.attribute: self.target})

    def scenes(self, count: int, seed: int = 0, **sample_kwargs) -> list[Scene]:
        """``count`` seeded scenes of the toy distribution whose (single) object has the source word."""
        key = "shapes" if self.attribute == "shape" else "colours"
        kwargs = {key: (self.source,), **sample_kwargs}
        return [world.sample_scene(np.random.default_rng([seed, i]), **kwargs) for i in range(count)]


def parse_world_edit(spec: str, model: str | os.PathLike | None = None) -> WorldEdit:
    """``circle:square`` (or ``circle-to-square``) -> WorldEdit; one-line UserError otherwise,
    also when ``model`` (a world model's folder) never learned one of its words."""
    edit = parse_edit(spec)
    source, target = edit.source.lower(), edit.target.lower()
    for attribute, words in (("shape", world.SHAPES), ("colour", tuple(world.COLOURS))):
        if source in words and target in words:
            edit = WorldEdit(source, target, attribute)
            if model is not None:
                check_edit_vocabulary(edit, model)
            return edit
    raise UserError(
        f"edit {spec!r} is not a shapes-world edit: give two shapes ({', '.join(world.SHAPES)}) "
        f"or two colours ({', '.join(world.COLOURS)})"
    )


# ---------------------------------------------------------------------------------------------
# What a world model learned: edits with other words are refused before any work is done

VOCABULARY_FILE = "vocabulary.json"


def write_vocabulary(
    model: str | os.PathLike,
    shapes: Sequence[str] = world.TOY_SHAPES,
    colours: Sequence[str] = world.TOY_COLOURS,
    backgrounds: Sequence[str] = world.TOY_BACKGROUNDS,
) -> Path:
    """``model/vocabulary.json``: the shapes, colours and backgrounds a world model was trained on."""
    path = Path(model) / VOCABULARY_FILE
    vocab = {"shapes": list(shapes), "colours": list(colours), "backgrounds": list(backgrounds)}
    path.write_text(json.dumps(vocab, indent=1) + "\n")
    return path


def model_vocabulary(model: str | os.PathLike) -> dict[str, list[str]] | None:
    """The words a world model learned (``vocabulary.json``), or None for a model without that file
    (Stable Diffusion, a hub id): then any word may be edited."""
    path = Path(model) / VOCABULARY_FILE
    if not path.is_file():
        return None
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(vocab, dict) and all(
            isinstance(words, list) and all(isinstance(w, str) for w in words) for words in vocab.values()
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise UserError(f"{path} is not a vocabulary file (a JSON object of word lists); remove or fix it")
    return vocab


def check_edit_vocabulary(edit: Edit, model: str | os.PathLike) -> None:
    """One-line UserError when ``edit`` uses a word that ``model`` never learned (see ``model_vocabulary``).

    A world model knows only its training captions' words: an edit to an unseen word runs, and
    its untrained embedding makes it score 0, so it is refused up front.
    """
    vocab = model_vocabulary(model)
    if vocab is None:
        return
    known = {w.lower() for words in vocab.values() for w in words}
    unknown = [w for phrase in (edit.source, edit.target) for w in phrase.lower().split() if w not in known]
    if unknown:
        learned = "; ".join(f"{kind}: {', '.join(words)}" for kind, words in vocab.items())
        raise UserError(
            f"edit {edit.spec!r}: the model {model} never learned {', '.join(dict.fromkeys(unknown))} "
            f"(its vocabulary: {learned})"
        )


# Colour edits that cover the palette's contrasts: warm <-> cool, light <-> dark, and one cool -> cool.
REPRESENTATIVE_COLOUR_EDITS = (
    "red:blue",  # warm -> cool, both dark (a README edit)
    "blue:yellow",  # cool dark -> warm light
    "yellow:red",  # light -> dark, both warm
    "green:red",  # cool -> warm
    "yellow:green",  # warm light -> cool
    "blue:green",  # cool -> cool
)


def world_edits(model: str | os.PathLike) -> list[WorldEdit]:
    """The edits that cover what a world model learned: every shape edit among its shapes (both
    ways), then the representative colour edits whose colours it knows."""
    vocab = model_vocabulary(model) or {"shapes": list(world.TOY_SHAPES), "colours": list(world.TOY_COLOURS)}
    shapes, colours = vocab.get("shapes", []), set(vocab.get("colours", []))
    edits = [WorldEdit(a, b, "shape") for a, b in itertools.permutations(shapes, 2)]
    for spec in REPRESENTATIVE_COLOUR_EDITS:
        source, target = spec.split(":")
        if {source, target} <= colours:
            edits.append(WorldEdit(source, target, "colour"))
    return edits


def is_world_edit(source: str, target: str) -> bool:
    try:
        parse_world_edit(f"{source}:{target}")
    except UserError:
        return False
    return True


def world_sentence_banks(edit: WorldEdit) -> tuple[list[str], list[str]]:
    """Captions of the toy distribution with the source word, and the same with the target word."""
    source, target = [], []
    for shape, colour, background in itertools.product(
        world.TOY_SHAPES, world.TOY_COLOURS, world.TOY_BACKGROUNDS
    ):
        obj = world.ShapeObject(shape, colour, (32.0, 32.0), 30.0)
        scene = Scene((obj,), world.Background("plain", (background,)))
        if getattr(obj, edit.attribute) != edit.source:
            continue
        source.append(scene.caption)
        target.append(edit.apply(scene).caption)
    return source, target


def world_direction(teacher: Pix2PixZero, edit: WorldEdit, sentences: str = "world") -> EditDirection:
    """The edit direction of ``edit`` for ``teacher``: from world captions, or the teacher's own banks."""
    if sentences != "world":
        return teacher.direction(edit.source, edit.target, sentences=sentences)
    from p2pz.teacher.directions import compute_direction

    source, target = world_sentence_banks(edit)
    return compute_direction(
        teacher.tokenizer,
        teacher.text_encoder,
        source,
        target,
        source=edit.source,
        target=edit.target,
        model=teacher.model,
        metadata={"sentences": "shapes-world captions"},
    )


def word_swap_directions(
    teacher: Pix2PixZero, scenes: Sequence[Scene], edit: WorldEdit
) -> list[EditDirection]:
    """Per scene, embedding(caption with the word swapped) - embedding(caption): a plain word swap."""
    from p2pz.teacher.directions import EditDirection

    before = teacher.encode_text([s.caption for s in scenes]).float().cpu()
    after = teacher.encode_text([edit.apply(s).caption for s in scenes]).float().cpu()
    return [
        EditDirection(a - b, edit.source, edit.target, {"method": "word swap"}) for a, b in zip(after, before)
    ]
