"""Reading input images and bringing them to what the teacher takes: RGB, a fixed square size.

Rules (one place, so the CLI, the Python API and the data stage agree):

* **Colour**: 8-bit RGB. Grayscale (L, 1, P without alpha) is replicated to three channels;
  palette and RGBA/LA images are **composited on white** (transparent areas become white, as a
  viewer shows them on a white page); CMYK and YCbCr go through Pillow's conversion; 16-bit and
  32-bit grayscale (I;16, I) are scaled from their range to 0..255 (not clipped); float (F) is
  assumed in 0..1 when its maximum is at most 1, else in 0..255.
* **Size**: resize so the *shorter* side equals ``size`` (Lanczos, keeps the aspect ratio), then
  centre-crop a ``size`` x ``size`` square; ``size`` must be a multiple of 8 (the VAE downsamples
  by 8). The default size is the model's resolution (``unet.sample_size * vae_scale_factor``,
  512 for SD 1.x), so all images of a batch share one size. The official scripts squash the
  image to 512x512 instead; cropping keeps the proportions of what is edited.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from p2pz.utils.errors import UserError


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (so a truncated file fails here); UserError when it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"image '{path}' does not exist; check the path")
    if not path.is_file():
        raise UserError(f"image '{path}' is not a file; pass an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # phone photos: apply the stored rotation
    except UnidentifiedImageError:
        raise UserError(f"'{path}' is not an image Pillow can read; pass a PNG, JPEG or WebP file") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"image '{path}' is corrupt or truncated ({err}); export it again") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB by the module's colour rule."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")  # palettes may carry transparency
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (Lanczos), then the centred ``size`` x ``size`` square."""
    if size <= 0 or size % 8:
        raise UserError(f"image size must be a positive multiple of 8, got {size}")
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def prepare_image(img: Image.Image, size: int) -> Image.Image:
    """RGB and ``size`` x ``size`` by the module's rules."""
    if not isinstance(img, Image.Image):
        raise UserError(f"expected a PIL image, got {type(img).__name__}")
    return resize_and_crop(to_rgb(img), size)


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> ``[B, 3, H, W]`` float32 in [-1, 1] (x / 255 * 2 - 1, as diffusers)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2.0 - 1.0


def tensor_to_numpy(images: torch.Tensor) -> np.ndarray:
    """Decoded VAE output ``[B, 3, H, W]`` in [-1, 1] -> ``[B, H, W, 3]`` float32 in [0, 1]."""
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """``[B, H, W, 3]`` in [0, 1] -> 8-bit PIL images (rounded, as diffusers' ``numpy_to_pil``)."""
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
