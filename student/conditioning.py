"""One student for many edits: each edit's conditioning vector, and which edit each training pair is.

The conditioning of an edit is the teacher's own edit direction, as the text encoder made it: the
mean embedding of the source sentences and that of the target sentences, each averaged over the 77
token positions, side by side (``[source ; target]``, ``2 * D`` values; their difference is the
pooled direction ``Δc``). Keeping both, not only ``Δc``, tells the student what the result should be
(the target) apart from what it replaces, which is what lets it combine words it met in different
edits (``triangle:circle`` and ``circle:square`` -> ``triangle:square``).

The data says which edits it holds: every sample key starts with its edit's name
(``p2pz.data.pairs.shards.key_edit``), a shard holds one edit, and ``p2pz generate`` keeps each
edit's direction in ``<dataset>/directions/<edit>.safetensors``.
"""

from __future__ import annotations

import functools
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    import torch

    from p2pz.teacher.directions import EditDirection


def edit_conditioning(direction: EditDirection) -> torch.Tensor:
    """``[source ; target]`` mean embeddings, pooled over tokens: a float32 ``[2 * D]`` vector."""
    import torch

    if direction.source_embedding is None or direction.target_embedding is None:
        raise UserError(
            f"the direction of {direction.source}:{direction.target} has no source and target embeddings "
            "(an official .pt direction): compute it again with p2pz, e.g. 'p2pz generate' keeps them"
        )
    pooled = [
        e.float().reshape(-1, e.shape[-1]).mean(dim=0)
        for e in (direction.source_embedding, direction.target_embedding)
    ]
    return torch.cat(pooled)


def shard_edit(url: str) -> str | None:
    """The edit of a shard: its first sample key's edit name (one header read, nothing extracted);
    None for a shard that cannot be read (the reader skips it too). Read once per shard version: the
    command line, the split and the data module all ask."""
    try:
        stat = os.stat(url)
    except OSError:
        return None
    return _first_key_edit(url, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=65536)
def _first_key_edit(url: str, mtime_ns: int, size: int) -> str | None:
    from p2pz.data.pairs.shards import key_edit

    try:
        with tarfile.open(url, "r") as tar:
            member = tar.next()
    except (OSError, tarfile.TarError):
        return None
    return key_edit(Path(member.name).name.split(".", 1)[0]) if member is not None else None


def edits_of_shards(urls: Sequence[str]) -> dict[str, list[str]]:
    """Edit name -> its readable shards, in the order the edits first appear."""
    groups: dict[str, list[str]] = {}
    for url in urls:
        edit = shard_edit(url)
        if edit is not None:
            groups.setdefault(edit, []).append(url)
    return groups


def load_edit_conditioning(urls: Sequence[str]) -> dict[str, list[float]]:
    """Edit name -> conditioning vector, for every edit of the shards ``urls``, from each dataset's
    ``directions/<edit>.safetensors`` (the folder of the edit's shards)."""
    from p2pz.data.pairs.shards import direction_file
    from p2pz.teacher.directions import EditDirection

    vectors = {}
    for edit, shards in edits_of_shards(urls).items():
        path = direction_file(Path(shards[0]).parent, edit)
        if not path.is_file():
            raise UserError(
                f"the shards of {edit} have no direction file {path}: a student of many edits reads "
                "each edit's direction there ('p2pz generate' writes it; run it again on that folder)"
            )
        vectors[edit] = [round(float(v), 7) for v in edit_conditioning(EditDirection.load(path))]
    return vectors


def conditioning_from_shards(
    shards: str | os.PathLike | Sequence[str] | None, strict: bool = False
) -> dict[str, list[float]] | None:
    """The ``model.edits`` of a training run: None for shards of one edit (a per-edit student, as
    before), else every edit's conditioning vector. Not ``strict`` (the command line's link, which
    would wrap an error in its usage text), shards that cannot be listed and edits without a
    direction give None: ``p2pz train`` then names the problem in one line (``strict=True``)."""
    from p2pz.data.pairs.reader import list_shards

    if not shards:
        return None
    try:
        urls = list_shards(shards)
        if len(edits_of_shards(urls)) < 2:
            return None
        return load_edit_conditioning(urls)
    except UserError:
        if strict:
            raise
        return None
