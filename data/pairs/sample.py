"""The sample format of a pairs dataset, defined once: member names, building, reading and decoding.

A shard ``pairs-NNNNNN.tar`` holds one WebDataset sample per (input, edit) pair; each member is a
file ``{key}.{member}`` (WebDataset splits the name at the first dot of its base name, which is why
keys never contain one):

======================  ==========================================================  ================
member                  content                                                     written
======================  ==========================================================  ================
``{key}.src.png``       the input as the teacher saw it (RGB PNG)                   always
``{key}.edit.png``      the teacher's edit of it (RGB PNG, same size)               always
``{key}.json``          metadata: caption, edit, seeds, teacher settings, timings   always
``{key}.recon.png``     the teacher's reconstruction (the unedited pass)            ``--save-recon``
``{key}.latent.npy``    the inverted latent x_T, float32 ``.npy``                   ``--save-latent``
``{key}.mask.png``      an object mask, white = object (evaluation sets only)       never by generate
======================  ==========================================================  ================

Reading never runs code from a shard: members are read as bytes with :mod:`tarfile` (streamed,
nothing is extracted to disk), metadata is parsed with :mod:`json`, images are decoded with PIL and
latents with ``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

KEY = "__key__"  # the sample's key, as WebDataset names it
URL = "__url__"  # the shard a read sample came from
SRC = "src.png"
EDIT = "edit.png"
META = "json"
RECON = "recon.png"
LATENT = "latent.npy"
MASK = "mask.png"

REQUIRED = (SRC, EDIT)  # a sample without both images is incomplete (e.g. torn by a crash)
IMAGES = (SRC, EDIT, RECON)  # the images of a pair, in the order a contact sheet shows them


class ShardError(UserError):
    """A shard that cannot be read (missing, not a tar, truncated); ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"cannot read shard {os.fspath(path)} ({reason})")
        self.path = os.fspath(path)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Building a sample (what ``p2pz.data.pairs.shards.AtomicShard.write`` takes)


def build_sample(
    key: str,
    source: Image.Image | bytes,
    edited: Image.Image | bytes,
    meta: Mapping[str, Any],
    *,
    reconstruction: Image.Image | bytes | None = None,
    latent: Any = None,
) -> dict[str, str | bytes]:
    """One pair as a WebDataset sample dict: ``{"__key__": key, "src.png": ..., "edit.png": ..., ...}``.

    Images are PIL images (stored as PNG) or PNG bytes; ``latent`` is a tensor, an array or ``.npy``
    bytes, stored as float32 without pickle; ``meta`` must be JSON-serialisable.
    """
    if not key or "." in key:
        raise ValueError(f"sample key {key!r} is empty or contains a dot")
    sample: dict[str, str | bytes] = {KEY: key, SRC: encode_png(source), EDIT: encode_png(edited)}
    if reconstruction is not None:
        sample[RECON] = encode_png(reconstruction)
    if latent is not None:
        sample[LATENT] = encode_npy(latent)
    sample[META] = encode_meta(meta)
    return sample


def encode_png(image: Image.Image | bytes) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_npy(array: Any) -> bytes:
    """A tensor (any device/dtype), an array or ready ``.npy`` bytes as float32 ``.npy`` bytes."""
    import numpy as np

    if isinstance(array, (bytes, bytearray)):
        return bytes(array)
    if hasattr(array, "detach"):  # a torch tensor, without importing torch here
        array = array.detach().to("cpu").float().numpy()
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def encode_meta(meta: Mapping[str, Any]) -> bytes:
    """The ``json`` member's bytes (the same bytes WebDataset's own json encoder writes)."""
    return json.dumps(meta).encode("utf-8")


# --------------------------------------------------------------------------------------------------
# Reading shards


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/key.src.png`` -> (``dir/key``, ``src.png``), as WebDataset splits it; None for a name
    without an extension."""
    folder, base = os.path.split(name)
    if "." not in base:
        return None
    stem, member = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), member


def iter_shard(path: str | os.PathLike, *, read: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """The samples of one shard in order, as ``{"__key__", "__url__", member: bytes, ...}`` dicts.

    Consecutive members with the same key form a sample (WebDataset's grouping, so this sees what
    the training reader sees). ``read(member)`` chooses which members' bytes are read; the others
    are listed with the value None, so that a sample's members are always all named.

    A shard that cannot be opened raises :class:`ShardError`; a damaged one yields the samples before
    the damage (the torn one included, incomplete), then raises it.
    """
    url = os.fspath(path)
    current: dict | None = None
    try:
        with tarfile.open(url, "r|*") as tar:  # a stream: read once, front to back, nothing extracted
            for info in tar:
                if not info.isreg():
                    continue
                parts = split_member_name(info.name)
                if parts is None:
                    continue
                key, member = parts
                if current is not None and current[KEY] != key:
                    yield current
                    current = None
                if current is None:
                    current = {KEY: key, URL: url}
                wanted = read is None or read(member)
                current[member] = tar.extractfile(info).read() if wanted else None
    except (tarfile.TarError, OSError, EOFError) as err:
        if current is not None:
            yield current
        raise ShardError(url, f"{type(err).__name__}: {err}") from err
    if current is not None:
        yield current


def is_complete(sample: Mapping[str, Any]) -> bool:
    """Whether the sample has both images (read or not)."""
    return all(member in sample for member in REQUIRED)


def first_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a shard's first sample that has any ({} if none): the edit and the teacher's
    settings, the same for every sample of a shard written by ``p2pz generate``."""
    for sample in iter_shard(path, read=lambda member: member == META):
        if sample.get(META) is not None:
            return decode_meta(sample[META])
    return {}


# --------------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, mode: str = "RGB") -> Image.Image:
    """An image member as a fully loaded PIL image in ``mode``."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert(mode)


def decode_meta(data: bytes | None) -> dict[str, Any]:
    """The ``json`` member as a dict ({} if absent); ValueError if it is not a JSON object."""
    if data is None:
        return {}
    meta = json.loads(data)
    if not isinstance(meta, dict):
        raise ValueError(f"sample metadata is a JSON {type(meta).__name__}, not an object")
    return meta


def decode_latent(data: bytes) -> np.ndarray:
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class Pair:
    """A decoded sample: the images as RGB PIL images (the mask as ``L``), the metadata as a dict."""

    key: str
    source: Image.Image
    edited: Image.Image
    meta: dict[str, Any] = field(default_factory=dict)
    reconstruction: Image.Image | None = None
    latent: np.ndarray | None = None
    mask: Image.Image | None = None
    url: str = ""


def decode_sample(sample: Mapping[str, Any]) -> Pair:
    """Decode a read sample (members missing or left unread stay None); ValueError if it is incomplete."""
    missing = [member for member in REQUIRED if sample.get(member) is None]
    if missing:
        raise ValueError(f"sample {sample.get(KEY)!r} lacks {', '.join(missing)}")

    def optional(member: str, decode: Callable[[bytes], Any]) -> Any:
        data = sample.get(member)
        return None if data is None else decode(data)

    return Pair(
        key=sample[KEY],
        source=decode_image(sample[SRC]),
        edited=decode_image(sample[EDIT]),
        meta=decode_meta(sample.get(META)),
        reconstruction=optional(RECON, decode_image),
        latent=optional(LATENT, decode_latent),
        mask=optional(MASK, lambda data: decode_image(data, "L")),
        url=sample.get(URL, ""),
    )
