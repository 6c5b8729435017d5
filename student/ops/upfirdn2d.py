"""FIR resampling of images: upsample, pad, FIR filter, downsample (StyleGAN2's `upfirdn2d`).

Per channel of x [N, C, H, W], in this order:

1. upsample by inserting ``up - 1`` zeros after every sample;
2. pad with zeros (negative padding crops), in upsampled coordinates;
3. convolve with the FIR filter f (a true convolution unless ``flip_filter``), keeping "valid" outputs;
4. keep every ``down``-th sample; multiply by ``gain``.

Output size per axis: ``(in * up + pad0 + pad1 - taps + down) // down``.

``ref`` below is the readable ground truth. The compiled kernels never materialise the zero-stuffed
image: they visit only the filter taps that land on real samples (polyphase).

In this file: the Python API (`setup_filter`, `upfirdn2d` and its `filter2d` / `upsample2d` /
`downsample2d` helpers), the pure-PyTorch reference, and the operator ``torch.ops.p2pz.upfirdn2d``
(schema, fake kernel, autograd formula). Its kernels: upfirdn2d.cpp (CPU), upfirdn2d.cu (CUDA), and
upfirdn2d.h for what those two share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

from p2pz.student.ops._runtime import choose_impl, define_op

Scaling = int | Sequence[int]
Padding = int | Sequence[int]


def _parse_scaling(s: Scaling) -> tuple[int, int]:
    sx, sy = (s, s) if isinstance(s, int) else tuple(s)
    if sx < 1 or sy < 1:
        raise ValueError(f"up/down factors must be >= 1, got {s}")
    return int(sx), int(sy)


def _parse_padding(p: Padding) -> tuple[int, int, int, int]:
    """int, [px, py] or [px0, px1, py0, py1] -> (px0, px1, py0, py1)."""
    if isinstance(p, int):
        return p, p, p, p
    p = [int(v) for v in p]
    if len(p) == 2:
        return p[0], p[0], p[1], p[1]
    if len(p) == 4:
        return p[0], p[1], p[2], p[3]
    raise ValueError(f"padding must be an int, [px, py] or [px0, px1, py0, py1], got {p}")


def _filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    """(width, height) of a 2-D, separable (1-D) or absent filter."""
    if f is None:
        return 1, 1
    if f.dim() == 2:
        return int(f.shape[1]), int(f.shape[0])
    return int(f.shape[0]), int(f.shape[0])


def setup_filter(
    f,
    device: torch.device | str = "cpu",
    normalize: bool = True,
    flip_filter: bool = False,
    gain: float = 1,
    separable: bool | None = None,
) -> torch.Tensor:
    """A float32 filter ready for upfirdn2d.

    A 1-D list of taps becomes separable (kept 1-D) when it has 8 or more taps, else its outer product
    (so StyleGAN2's [1, 3, 3, 1] is a 4x4 filter). `normalize` makes the taps sum to 1 (unit DC gain);
    `gain` is spread over the filter's dimensions.
    """
    if f is None:
        f = 1
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.dim() > 2 or f.numel() == 0:
        raise ValueError(f"a filter is a non-empty 1-D or 2-D list of taps, got shape {tuple(f.shape)}")
    if f.dim() == 0:
        f = f[None]
    if separable is None:
        separable = f.dim() == 1 and f.numel() >= 8
    if f.dim() == 1 and not separable:
        f = torch.outer(f, f)
    if f.dim() != (1 if separable else 2):
        raise ValueError("a separable filter must be 1-D")
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.dim())))
    f = f * (gain ** (f.dim() / 2))
    return f.to(device=device)


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: Scaling = 1,
    down: Scaling = 1,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: str | None = None,
) -> torch.Tensor:
    """Upsample, pad, FIR-filter and downsample x [N, C, H, W] (see the module docstring).

    f: float32 [fh, fw] (2-D), [taps] (separable: applied along x then y) or None (identity).
    up, down: int or [x, y]. padding: int, [px, py] or [px0, px1, py0, py1]; negative crops.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("upfirdn2d expects x of shape [N, C, H, W]")
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    if f.dim() not in (1, 2) or f.dtype != torch.float32:
        raise ValueError("the filter must be float32 and 1-D (separable) or 2-D; see setup_filter()")
    upx, upy = _parse_scaling(up)
    downx, downy = _parse_scaling(down)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    if choose_impl(impl, x) == "ref":
        return _upfirdn2d_ref(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain)
    return _upfirdn2d_op(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain)


def _upfirdn2d_op(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain):
    """The compiled kernels; a separable filter runs as a horizontal then a vertical pass."""
    f = f.to(x.device)
    op = torch.ops.p2pz.upfirdn2d
    if f.dim() == 2:
        return op(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, float(gain))
    g = math.sqrt(gain)  # f.dim() == 1: half the gain in each pass, as setup_filter spreads it
    x = op(x, f[None, :], upx, 1, downx, 1, padx0, padx1, 0, 0, flip_filter, g)
    return op(x, f[:, None], 1, upy, 1, downy, 0, 0, pady0, pady1, flip_filter, g)


def _upfirdn2d_ref(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain):
    """Pure-PyTorch upfirdn2d: literally the four steps, then the gain."""
    n, c, h, w = x.shape
    # 1. Upsample: a zero after each sample (up - 1 of them), per axis.
    x = x.reshape(n, c, h, 1, w, 1)
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    x = x.reshape(n, c, h * upy, w * upx)
    # 2. Pad with zeros; negative padding crops.
    x = F.pad(x, [max(padx0, 0), max(padx1, 0), max(pady0, 0), max(pady1, 0)])
    x = x[:, :, max(-pady0, 0) : x.shape[2] - max(-pady1, 0), max(-padx0, 0) : x.shape[3] - max(-padx1, 0)]
    # 3. FIR filter, one filter per channel. conv2d correlates, so flip f to convolve.
    f = f.to(device=x.device, dtype=x.dtype) * gain ** (f.dim() / 2)
    if not flip_filter:
        f = f.flip(list(range(f.dim())))
    if f.dim() == 2:
        x = F.conv2d(x, f[None, None].expand(c, 1, *f.shape), groups=c)
    else:  # separable: along x, then along y
        x = F.conv2d(x, f[None, None, None, :].expand(c, 1, 1, -1), groups=c)
        x = F.conv2d(x, f[None, None, :, None].expand(c, 1, -1, 1), groups=c)
    # 4. Downsample: keep every down-th sample.
    return x[:, :, ::downy, ::downx]


def filter2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: str | None = None,
) -> torch.Tensor:
    """FIR-filter x keeping its size (plus `padding`)."""
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _filter_size(f)
    p = [padx0 + fw // 2, padx1 + (fw - 1) // 2, pady0 + fh // 2, pady1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: Scaling = 2,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: str | None = None,
) -> torch.Tensor:
    """Upsample x by `up` (output up times the input, plus `padding`); gain up^2 restores the DC level."""
    upx, upy = _parse_scaling(up)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _filter_size(f)
    p = [
        padx0 + (fw + upx - 1) // 2,
        padx1 + (fw - upx) // 2,
        pady0 + (fh + upy - 1) // 2,
        pady1 + (fh - upy) // 2,
    ]
    return upfirdn2d(
        x, f, up=(upx, upy), padding=p, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl
    )


def downsample2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    down: Scaling = 2,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: str | None = None,
) -> torch.Tensor:
    """Downsample x by `down` (output the input divided by down, plus `padding`)."""
    downx, downy = _parse_scaling(down)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _filter_size(f)
    p = [
        padx0 + (fw - downx + 1) // 2,
        padx1 + (fw - downx) // 2,
        pady0 + (fh - downy + 1) // 2,
        pady1 + (fh - downy) // 2,
    ]
    return upfirdn2d(x, f, down=(downx, downy), padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


# ---------------------------------------------------------------------------------------------------
# The operator p2pz::upfirdn2d. Its gradient is upfirdn2d again (up and down swapped, the filter
# flipped), so gradients of gradients work too (R1 needs them).


def _out_size(in_size: int, up: int, down: int, pad0: int, pad1: int, taps: int) -> int:
    """Output size along one axis (the module docstring's formula; upfirdn2d.h has the same)."""
    return (in_size * up + pad0 + pad1 - taps + down) // down


def _output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Layout of the operator's output; the C++/CUDA kernels apply the same rule (upfirdn2d.h)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _fake(
    x: torch.Tensor,
    f: torch.Tensor,
    upx: int,
    upy: int,
    downx: int,
    downy: int,
    padx0: int,
    padx1: int,
    pady0: int,
    pady1: int,
    flip_filter: bool,
    gain: float,
) -> torch.Tensor:
    """The output's shape and layout, for torch.compile and torch.export."""
    torch._check(x.dim() == 4, lambda: "upfirdn2d: x must be [N, C, H, W]")
    torch._check(f.dim() == 2, lambda: "upfirdn2d: the operator takes a 2-D filter")
    fh, fw = f.shape
    oh = _out_size(x.shape[2], upy, downy, pady0, pady1, fh)
    ow = _out_size(x.shape[3], upx, downx, padx0, padx1, fw)
    out = x.new_empty((x.shape[0], x.shape[1], oh, ow))
    return out.contiguous(memory_format=_output_memory_format(x))


def _setup_context(ctx: FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, f, *args = inputs
    ctx.save_for_backward(f)
    ctx.args = args
    ctx.in_hw = x.shape[2:]
    ctx.out_hw = output.shape[2:]


def _backward(ctx: FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    (f,) = ctx.saved_tensors
    upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain = ctx.args
    (ih, iw), (oh, ow) = ctx.in_hw, ctx.out_hw
    fh, fw = f.shape
    # Transposed op: swap up/down, flip the filter, and pad so that the output is x's size.
    dx = torch.ops.p2pz.upfirdn2d(
        dy, f, downx, downy, upx, upy,
        fw - padx0 - 1, iw * upx - ow * downx + padx0 - upx + 1,
        fh - pady0 - 1, ih * upy - oh * downy + pady0 - upy + 1,
        not flip_filter, gain,
    )  # fmt: skip
    return (dx,) + (None,) * 11  # the filter is a constant: no gradient for it


define_op(
    "upfirdn2d(Tensor x, Tensor f, int upx, int upy, int downx, int downy, "
    "int padx0, int padx1, int pady0, int pady1, bool flip_filter, float gain) -> Tensor",
    _fake,
    _backward,
    _setup_context,
)

__all__ = ["setup_filter", "upfirdn2d", "filter2d", "upsample2d", "downsample2d"]
