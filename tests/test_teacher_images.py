"""Image loading and the conversion rule (RGB, alpha on white, shorter side + centre crop)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from p2pz.teacher.images import load_image, pil_to_tensor, prepare_image, resize_and_crop, to_rgb
from p2pz.utils.errors import UserError


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish, fully transparent except one opaque pixel
    rgba[0, 0, 3] = 255
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[1, 1]) == (255, 255, 255)


def test_grayscale_cmyk_palette_and_16_bit():
    gray = Image.fromarray(np.full((4, 4), 77, np.uint8), "L")
    assert np.asarray(to_rgb(gray)).tolist() == np.full((4, 4, 3), 77).tolist()
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == (255, 0, 0)
    pal = Image.new("P", (4, 4), 3)
    assert to_rgb(pal).mode == "RGB"
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))  # 16-bit white, scaled not clipped
    assert deep.mode.startswith("I")
    assert np.asarray(to_rgb(deep)).min() == 255
    mid = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert abs(int(np.asarray(to_rgb(mid))[0, 0, 0]) - 128) <= 1


def test_resize_and_crop_rule():
    wide = Image.new("RGB", (130, 70), (10, 20, 30))
    out = prepare_image(wide, 64)
    assert out.size == (64, 64) and out.mode == "RGB"
    # Centre crop: a marker column in the middle of a wide image survives, the edges do not.
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, 62:66] = 255
    arr[:, :8] = 128
    cropped = np.asarray(resize_and_crop(Image.fromarray(arr), 64))
    assert cropped[:, 30:34].mean() > 200 and cropped[:, :4].mean() < 10
    with pytest.raises(UserError, match="multiple of 8"):
        resize_and_crop(wide, 60)


def test_pixel_range():
    x = pil_to_tensor([Image.new("RGB", (8, 8), (0, 255, 0))])
    assert x.shape == (1, 3, 8, 8) and x.min() == -1 and x.max() == 1


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="not an image"):
        load_image(tmp_path / "notes.txt")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt|not an image"):
        load_image(tmp_path / "truncated.png")
    with pytest.raises(UserError, match="not a file"):
        load_image(tmp_path)
    assert load_image(good).size == (64, 64)
