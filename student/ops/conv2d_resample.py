"""2-D convolution with optional FIR up/downsampling, done the cheap way round.

What it computes (the generic path at the bottom of `conv2d_resample`):

    upfirdn2d(x, f, up=up, padding=padding, gain=up**2)  ->  conv2d(w)  ->  upfirdn2d(f, down=down)

Padding is given once, in upsampled coordinates, and adjusted as `upsample2d` / `downsample2d` do so
that sizes come out as multiples of the input. The fast paths reorder the linear steps (they commute)
so that convolutions run at the lower resolution or as strided / transposed convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from p2pz.student.ops.upfirdn2d import Padding, _filter_size, _parse_padding, upfirdn2d


def _conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int = 1,
    padding: int | list[int] = 0,
    groups: int = 1,
    transpose: bool = False,
    flip_weight: bool = True,
) -> torch.Tensor:
    """conv2d / conv_transpose2d; flip_weight=True correlates (PyTorch's convention), False convolves."""
    if not flip_weight and w.shape[2] * w.shape[3] > 1:
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: Padding = 0,
    groups: int = 1,
    flip_weight: bool = True,
    flip_filter: bool = False,
) -> torch.Tensor:
    """Convolve x [N, C, H, W] with w [O, C/groups, kh, kw], upsampling by `up` before and downsampling
    by `down` after with the FIR filter f (see setup_filter). padding: int, [px, py] or [px0, px1, py0, py1].
    """
    if not (isinstance(up, int) and up >= 1 and isinstance(down, int) and down >= 1):
        raise ValueError(f"up and down must be ints >= 1, got up={up}, down={down}")
    if x.dim() != 4 or w.dim() != 4 or w.shape[1] * groups != x.shape[1]:
        raise ValueError(f"conv2d_resample: x {tuple(x.shape)} and w {tuple(w.shape)} with groups={groups}")
    out_channels, in_per_group, kh, kw = w.shape
    fw, fh = _filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)

    # Padding in upsampled coordinates, widened for the filter's support as upsample2d/downsample2d do.
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    pad = [px0, px1, py0, py1]

    if kw == 1 and kh == 1:
        # A 1x1 convolution commutes with resampling: run it at the lower resolution.
        if down > 1 and up == 1:
            x = upfirdn2d(x, f, down=down, padding=pad, flip_filter=flip_filter)
            return _conv2d(x, w, groups=groups, flip_weight=flip_weight)
        if up > 1 and down == 1:
            x = _conv2d(x, w, groups=groups, flip_weight=flip_weight)
            return upfirdn2d(x, f, up=up, padding=pad, gain=up**2, flip_filter=flip_filter)

    if down > 1 and up == 1:
        # Filter, then a strided convolution (= convolution, then keep every down-th sample).
        x = upfirdn2d(x, f, padding=pad, flip_filter=flip_filter)
        return _conv2d(x, w, stride=down, groups=groups, flip_weight=flip_weight)

    if up > 1:
        # A transposed convolution is zero insertion followed by a convolution: do both at once, then
        # the FIR filter on what remains of the padding.
        if groups == 1:
            w = w.transpose(0, 1)
        else:
            w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
            w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
        px0, px1 = px0 - (kw - 1), px1 - (kw - up)
        py0, py1 = py0 - (kh - 1), py1 - (kh - up)
        pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
        x = _conv2d(
            x, w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True, flip_weight=not flip_weight
        )
        x = upfirdn2d(
            x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up**2, flip_filter=flip_filter
        )
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x

    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        # No resampling, symmetric padding: a plain convolution.
        return _conv2d(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)

    # Generic: upsample and pad, convolve, downsample.
    x = upfirdn2d(x, f if up > 1 else None, up=up, padding=pad, gain=up**2, flip_filter=flip_filter)
    x = _conv2d(x, w, groups=groups, flip_weight=flip_weight)
    if down > 1:
        x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
    return x


__all__ = ["conv2d_resample"]
