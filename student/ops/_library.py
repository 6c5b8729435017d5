"""The ``torch.ops.p2pz`` operators: schemas, fake kernels and autograd formulas.

The C++ (csrc/*_cpu.cpp) and CUDA (csrc/*_cuda.cu) extensions register the real kernels for these
schemas with ``TORCH_LIBRARY_IMPL(p2pz, CPU|CUDA, m)`` when they load. Every backward here is a call to
one of these same operators, so gradients of gradients work (R1 needs them):

* ``upfirdn2d``'s gradient is ``upfirdn2d`` with up and down swapped and the filter flipped;
* ``bias_act``'s gradient is ``bias_act_grad(order=1)``; the gradient of ``bias_act_grad(order=k)`` is
  ``bias_act_grad(order=k)`` with respect to dy and ``bias_act_grad(order=k+1)`` with respect to x and b.
"""

from __future__ import annotations

import torch

NAMESPACE = "p2pz"
MAX_ORDER = 2  # the kernels know the activations' first and second derivatives
LINEAR_IN_X = ("linear", "relu", "lrelu")  # second derivative zero almost everywhere

_lib: torch.library.Library | None = None


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Layout of upfirdn2d's output; the C++/CUDA kernels apply the same rule (ops_common.h)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def upfirdn2d_out_size(in_size: int, up: int, down: int, pad0: int, pad1: int, taps: int) -> int:
    return (in_size * up + pad0 + pad1 - taps + down) // down


def _is_dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: memory is a permutation of a contiguous tensor (the kernels' rule)."""
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda t: t[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def elementwise_like(x: torch.Tensor) -> torch.Tensor:
    """bias_act's output allocation: x's strides when x is dense, else contiguous (as in the kernels)."""
    return torch.empty_like(x) if _is_dense(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def define_ops() -> None:
    """Define the operators once per process (idempotent)."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library(NAMESPACE, "DEF")
    lib.define(
        "upfirdn2d(Tensor x, Tensor f, int upx, int upy, int downx, int downy, "
        "int padx0, int padx1, int pady0, int pady1, bool flip_filter, float gain) -> Tensor"
    )
    lib.define(
        "bias_act(Tensor x, Tensor? b, int dim, str act, float alpha, float gain, float clamp) -> Tensor"
    )
    lib.define(
        "bias_act_grad(Tensor dy, Tensor x, Tensor? b, int dim, str act, float alpha, float gain, "
        "float clamp, int order) -> Tensor"
    )
    _lib = lib
    _register_upfirdn2d()
    _register_bias_act()


# ---------------------------------------------------------------------------------------------------
# upfirdn2d


def _register_upfirdn2d() -> None:
    name = f"{NAMESPACE}::upfirdn2d"

    @torch.library.register_fake(name)
    def _(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain):
        torch._check(x.dim() == 4, lambda: "upfirdn2d: x must be [N, C, H, W]")
        torch._check(f.dim() == 2, lambda: "upfirdn2d: the operator takes a 2-D filter")
        fh, fw = f.shape
        oh = upfirdn2d_out_size(x.shape[2], upy, downy, pady0, pady1, fh)
        ow = upfirdn2d_out_size(x.shape[3], upx, downx, padx0, padx1, fw)
        out = x.new_empty((x.shape[0], x.shape[1], oh, ow))
        return out.contiguous(memory_format=output_memory_format(x))

    def setup_context(ctx, inputs, output):
        x, f, *args = inputs
        ctx.save_for_backward(f)
        ctx.args = args
        ctx.in_hw = x.shape[2:]
        ctx.out_hw = output.shape[2:]

    def backward(ctx, dy):
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

    torch.library.register_autograd(name, backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------------
# bias_act


def reduce_to_bias(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum a gradient of x's shape down to the bias' shape [x.shape[dim]]."""
    return g.sum(dim=[d for d in range(g.dim()) if d != dim])


def _register_bias_act() -> None:
    @torch.library.register_fake(f"{NAMESPACE}::bias_act")
    def _(x, b, dim, act, alpha, gain, clamp):
        return elementwise_like(x)

    @torch.library.register_fake(f"{NAMESPACE}::bias_act_grad")
    def _(dy, x, b, dim, act, alpha, gain, clamp, order):
        return elementwise_like(x)

    def setup_forward(ctx, inputs, output):
        x, b, *ctx.args = inputs
        ctx.save_for_backward(x, b)

    def backward_forward(ctx, dy):
        x, b = ctx.saved_tensors
        dx = torch.ops.p2pz.bias_act_grad(dy, x, b, *ctx.args, 1)
        db = reduce_to_bias(dx, ctx.args[0]) if b is not None and ctx.needs_input_grad[1] else None
        return dx, db, None, None, None, None, None

    torch.library.register_autograd(f"{NAMESPACE}::bias_act", backward_forward, setup_context=setup_forward)

    def setup_grad(ctx, inputs, output):
        dy, x, b, *args = inputs
        ctx.args, ctx.order = args[:-1], args[-1]
        ctx.save_for_backward(dy, x, b)

    def backward_grad(ctx, ddx):
        dy, x, b = ctx.saved_tensors
        dim, act = ctx.args[0], ctx.args[1]
        # bias_act_grad(order=k) = dy * f^(k)(x + b): linear in dy, and f^(k+1) for x and b.
        d_dy = (
            torch.ops.p2pz.bias_act_grad(ddx, x, b, *ctx.args, ctx.order) if ctx.needs_input_grad[0] else None
        )
        d_x = d_b = None
        if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and act not in LINEAR_IN_X:
            if ctx.order + 1 > MAX_ORDER:
                raise NotImplementedError(
                    f"bias_act supports gradients up to order {MAX_ORDER}; use impl='ref' for higher orders"
                )
            d_x = torch.ops.p2pz.bias_act_grad(ddx * dy, x, b, *ctx.args, ctx.order + 1)
            d_b = reduce_to_bias(d_x, dim) if b is not None and ctx.needs_input_grad[2] else None
        return d_dy, d_x, d_b, None, None, None, None, None, None

    torch.library.register_autograd(f"{NAMESPACE}::bias_act_grad", backward_grad, setup_context=setup_grad)


define_ops()
