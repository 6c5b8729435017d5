"""Where the teacher's inputs come from: a folder of images, existing image shards, or prompts.

Each source lists stable input ids (the work plan is built from the listing alone) and loads one id
on demand. An input that cannot be used raises :class:`InputSkipped` with a reason for the manifest;
nothing here ever stops the job.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pz.utils.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
# Files beside images that are metadata, not inputs (``cat1.txt`` is the caption of ``cat1.png``).
SIDECAR_EXTENSIONS = {".txt", ".json", ".caption"}
CAPTION_FIELDS = ("txt", "caption", "text")


class InputSkipped(Exception):
    """An input the job leaves out; ``str(err)`` is the reason written to the manifest."""


@dataclass
class LoadedInput:
    """A usable input: an RGB image (and its caption if the source has one), or a synthetic prompt."""

    image: object | None = None  # PIL.Image.Image in RGB mode
    caption: str | None = None
    prompt: str | None = None


# --------------------------------------------------------------------------------------------------
# The image checks


def check_image(data: bytes, *, min_size: int, convert_modes: bool) -> object:
    """Decode image bytes into an RGB PIL image, or raise InputSkipped saying why not.

    Refused by default: files that are not images or are corrupt/truncated, images whose short side
    is below ``min_size``, and images whose pixels need a judgement call — CMYK, 16-bit or float
    channels, transparency. With ``convert_modes`` those are converted by the teacher's colour rule
    (``p2pz.teacher.images.to_rgb``: alpha composited over white, CMYK through Pillow, 16-bit scaled
    to 8 bits); plain grayscale and palette images are always converted that way.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputSkipped("not an image (no known image format)") from None
    except Exception as err:  # decoders raise many types for malformed headers
        raise InputSkipped(f"corrupt image ({type(err).__name__}: {err})") from None
    try:
        image.load()
    except Exception as err:
        raise InputSkipped(f"corrupt image ({type(err).__name__}: {err})") from None

    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost us the picture
        pass
    width, height = image.size
    if min(width, height) < min_size:
        raise InputSkipped(f"too small ({width}x{height}, shorter side below --min-size {min_size})")

    mode = image.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    high_depth = mode.startswith("I") or mode == "F" or _png_bit_depth(data) == 16
    if mode == "CMYK" and not convert_modes:
        raise InputSkipped("CMYK image (use --convert-modes to convert it to RGB)")
    if high_depth and not convert_modes:
        raise InputSkipped(f"16-bit or float image (mode {mode}; use --convert-modes to scale it to 8 bits)")
    if has_alpha and not convert_modes:
        raise InputSkipped(f"image with transparency (mode {mode}; use --convert-modes to put it on white)")
    from p2pz.teacher.images import to_rgb  # the teacher's documented colour rule, so both stages agree

    return to_rgb(image)


def read_image_file(path: str | os.PathLike, *, min_size: int, convert_modes: bool) -> object:
    """An image file through :func:`check_image`, or InputSkipped saying why not (unreadable included)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InputSkipped(f"unreadable file ({err.strerror})") from None
    return check_image(data, min_size=min_size, convert_modes=convert_modes)


def _png_bit_depth(data: bytes) -> int | None:
    """Bit depth from a PNG header (Pillow reads 16-bit RGB PNGs as 8-bit 'RGB' and hides it)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 25 and data[12:16] == b"IHDR":
        return data[24]
    return None


# --------------------------------------------------------------------------------------------------
# Sources


class FolderInputs:
    """Every non-hidden file under a folder (recursive), ids = paths relative to it.

    Files that are not images are listed too, so that they show up in the manifest as skipped
    instead of vanishing; caption sidecars (``.txt``) are not inputs but captions.
    """

    kind = "folder"

    def __init__(self, root: str | os.PathLike, *, min_size: int, convert_modes: bool):
        self.root = Path(root)
        self.min_size = min_size
        self.convert_modes = convert_modes
        self._ids = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
            and p.suffix.lower() not in SIDECAR_EXTENSIONS
        )

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.root.resolve()), "count": len(self._ids)}

    def ids(self, source_word: str) -> list[str]:
        return self._ids

    def load(self, input_id: str) -> LoadedInput:
        path = self.root / input_id
        image = read_image_file(path, min_size=self.min_size, convert_modes=self.convert_modes)
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else None
        return LoadedInput(image=image, caption=caption or None)


class ShardInputs:
    """Images inside existing WebDataset shards; ids = ``shard-file-name/key``.

    The first member with an image extension is the input; a ``txt``/``caption`` member is its
    caption. Tars are opened for random access and kept open for a few shards (work items of one
    output shard are consecutive in the listing, so this reads each input shard about once).
    """

    kind = "shards"

    def __init__(self, urls: Sequence[str], *, min_size: int, convert_modes: bool):
        self.min_size = min_size
        self.convert_modes = convert_modes
        self.paths = {Path(u).name: Path(u) for u in urls}
        if len(self.paths) != len(urls):
            raise UserError("input shards must have distinct file names")
        self._members: dict[str, dict[str, dict[str, str]]] = {}
        self._ids: list[str] = []
        unreadable: list[tuple[Path, Exception]] = []
        for name, path in sorted(self.paths.items()):
            try:
                groups = _group_members(path)
            except (OSError, tarfile.TarError, EOFError) as err:
                unreadable.append((path, err))
                continue
            self._members[name] = groups
            self._ids.extend(f"{name}/{key}" for key in sorted(groups))
        if unreadable and not self._members:  # nothing to work on: the whole input is bad
            path, err = unreadable[0]
            # tarfile's "r:*" lists what each decompressor said, a line each, the plain tar's last:
            # "- method tar: ReadError('empty file')"
            reason = ([line.strip() for line in str(err).splitlines() if line.strip()] or [""])[-1]
            inner = re.fullmatch(r"- method tar: \w+\('(.*)'\)", reason)
            more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
            raise UserError(
                f"input shard {path} is unreadable ({type(err).__name__}: {inner[1] if inner else reason})"
                f"{more}; give WebDataset .tar shards of images, or a folder of image files"
            )
        for path, err in unreadable:
            # A damaged input shard loses its inputs, not the job (its members cannot be listed).
            import logging

            logging.getLogger(__name__).warning("input shard %s is unreadable (%s); skipped", path, err)
        self._open: OrderedDict[str, tarfile.TarFile] = OrderedDict()

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "shards": sorted(str(p.resolve()) for p in self.paths.values()),
            "count": len(self._ids),
        }

    def ids(self, source_word: str) -> list[str]:
        return self._ids

    def _tar(self, name: str) -> tarfile.TarFile:
        if name not in self._open:
            if len(self._open) >= 4:
                self._open.popitem(last=False)[1].close()
            self._open[name] = tarfile.open(self.paths[name], "r:*")
        self._open.move_to_end(name)
        return self._open[name]

    def load(self, input_id: str) -> LoadedInput:
        name, key = input_id.split("/", 1)
        members = self._members[name][key]
        image_member = _pick_image_member(members)
        if image_member is None:
            raise InputSkipped(f"no image in sample (members: {', '.join(sorted(members))})")
        try:
            tar = self._tar(name)
            data = tar.extractfile(image_member).read()
            caption = None
            for field in CAPTION_FIELDS:
                if field in members:
                    caption = (
                        tar.extractfile(members[field]).read().decode("utf-8", "replace").strip() or None
                    )
                    break
        except (OSError, tarfile.TarError, EOFError) as err:
            raise InputSkipped(f"unreadable shard member ({type(err).__name__}: {err})") from None
        image = check_image(data, min_size=self.min_size, convert_modes=self.convert_modes)
        return LoadedInput(image=image, caption=caption)


def _pick_image_member(members: dict[str, str]) -> str | None:
    """The input image of a sample: a plain ``jpg``/``png``/... member first, then ``src.*`` (so that
    a dataset of pairs can be used as inputs), then any other image member."""
    images = {ext: m for ext, m in members.items() if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS}
    plain = [ext for ext in images if "." not in ext]
    source = [ext for ext in images if ext.startswith("src.")]
    for choice in (plain, source, sorted(images)):
        if choice:
            return images[choice[0]]
    return None


def _group_members(path: Path) -> dict[str, dict[str, str]]:
    """key -> {extension: member name}, grouped the way WebDataset groups them (first dot)."""
    groups: dict[str, dict[str, str]] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base = os.path.basename(member.name)
            if "." not in base or base.startswith("__"):
                continue
            stem, ext = base.split(".", 1)
            key = os.path.join(os.path.dirname(member.name), stem)
            groups.setdefault(key, {})[ext.lower()] = member.name
    return groups


class SyntheticInputs:
    """The paper's synthetic setting: the teacher generates the input from a prompt that contains the
    edit's source word, then edits it. ``num`` inputs per edit, ids ``synthetic-000000``...;
    prompt templates cycle, ``{source}`` in a template is replaced by the source word.
    """

    kind = "synthetic"

    def __init__(self, prompts: Sequence[str], num: int):
        if num < 1:
            raise UserError("--num-synthetic must be at least 1")
        if not prompts:
            raise UserError("synthetic mode needs at least one --prompt")
        self.prompts = list(prompts)
        self.num = num

    def describe(self) -> dict:
        return {"kind": self.kind, "prompts": self.prompts, "count": self.num}

    def prompt_for(self, source_word: str, index: int) -> str:
        prompt = self.prompts[index % len(self.prompts)].replace("{source}", source_word)
        if source_word.lower() not in prompt.lower():
            raise UserError(
                f"synthetic prompt {prompt!r} does not contain the source word {source_word!r}; "
                "write it into the prompt or use the {source} placeholder"
            )
        return prompt

    def ids(self, source_word: str) -> list[str]:
        for i in range(min(self.num, len(self.prompts))):
            self.prompt_for(source_word, i)  # validate every template up front
        return [f"synthetic-{i:06d}" for i in range(self.num)]

    def load_for(self, source_word: str, input_id: str) -> LoadedInput:
        return LoadedInput(prompt=self.prompt_for(source_word, int(input_id.rsplit("-", 1)[1])))
