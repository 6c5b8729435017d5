"""What ``p2pz app`` accepts as an upload: one still image within the size caps, read as ``p2pz apply`` reads.

An upload either becomes an RGB image (with notes when its pixels were converted) or raises
:class:`UploadRefused` whose message the page shows; nothing here ever stops the server. The pixels go
through the same check and colour rule as ``p2pz apply`` (:func:`p2pz.data.pairs.inputs.check_image`
with ``convert_modes``): CMYK through Pillow, 16-bit scaled to 8 bits, transparency put on white, so
the app's edit of a file is the command line's. Before anything is decoded, the header's size is held
against the app's megapixel cap (below Pillow's decompression-bomb guard, which stays on as well).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_MEGAPIXELS = 40.0
DEFAULT_MAX_UPLOAD_MB = 25.0


class UploadRefused(Exception):
    """An upload the app does not edit; ``str(err)`` is the line the page shows. ``status`` is HTTP's."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """A usable upload: the RGB image and what was done to its pixels to get there."""

    image: Any  # PIL.Image.Image, RGB
    notes: list[str] = field(default_factory=list)


def read_upload(data: bytes, *, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> Upload:
    """``data`` (an uploaded file's bytes) as an RGB image, or :class:`UploadRefused` saying why not."""
    from PIL import Image, UnidentifiedImageError

    from p2pz.data.pairs.inputs import InputSkipped, check_image

    if not data:
        raise UploadRefused("the file is empty (0 bytes); choose an image file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            header = Image.open(io.BytesIO(data))  # reads the header only
        except UnidentifiedImageError:
            raise UploadRefused(
                "not an image Pillow can read; upload a PNG, JPEG or WebP file", 415
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise UploadRefused(f"image too large to decode safely ({err})", 413) from None
        except Exception as err:  # decoders raise many types for malformed headers
            raise UploadRefused(f"corrupt image ({type(err).__name__}: {err})") from None
        _check_header(header, max_megapixels)
        notes = _conversion_notes(header, data)
        try:
            image = check_image(data, min_size=1, convert_modes=True)  # p2pz apply's reading
        except InputSkipped as why:
            raise UploadRefused(f"{why}; upload a complete PNG, JPEG or WebP file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise UploadRefused(f"image too large to decode safely ({err})", 413) from None
    return Upload(image, notes)


def _check_header(header: Any, max_megapixels: float) -> None:
    width, height = header.size
    megapixels = width * height / 1e6
    if megapixels > max_megapixels:
        raise UploadRefused(
            f"image is {width}x{height} ({megapixels:.1f} MP), above this app's cap of "
            f"{max_megapixels:g} MP; upload a smaller image",
            413,
        )
    frames = getattr(header, "n_frames", 1)
    if getattr(header, "is_animated", False) and frames > 1:
        raise UploadRefused(f"animated image ({frames} frames); upload a single frame as PNG or JPEG", 415)


def _conversion_notes(header: Any, data: bytes) -> list[str]:
    """What ``check_image``'s colour rule will do to these pixels, said to the user."""
    from p2pz.data.pairs.inputs import _png_bit_depth

    mode = header.mode
    if mode == "CMYK":
        return ["CMYK image converted to RGB"]
    if mode.startswith("I") or mode == "F" or _png_bit_depth(data) == 16:
        return [f"16-bit or float image (mode {mode}) scaled to 8 bits"]
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in header.info):
        return ["transparent pixels put on white"]
    return []
