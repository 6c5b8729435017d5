"""Fused bias + activation + gain + clamp (StyleGAN2's `bias_act`).

    y = clamp(act(x + b) * gain, -clamp, +clamp)

with b broadcast along dimension `dim`. Every step is optional: b=None adds nothing, gain=None uses the
activation's default gain (sqrt(2) for the ReLU family and swish, which keeps the activations' variance
under the equalised learning rate), clamp=None does not clamp.

In this file: the Python API (`bias_act`, `ACTIVATIONS`), the pure-PyTorch reference, and the operators
``torch.ops.p2pz.bias_act`` and ``torch.ops.p2pz.bias_act_grad`` (schemas, fake kernels, autograd
formulas). Their kernels: bias_act.cpp (CPU), bias_act.cu (CUDA), and bias_act.h for what those two share.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

from p2pz.student.ops._runtime import choose_impl, define_op


class Activation(NamedTuple):
    func: object  # reference implementation: (x, alpha) -> y
    def_alpha: float
    def_gain: float


ACTIVATIONS: dict[str, Activation] = {
    "linear": Activation(lambda x, _: x, 0.0, 1.0),
    "relu": Activation(lambda x, _: torch.relu(x), 0.0, math.sqrt(2)),
    "lrelu": Activation(lambda x, alpha: F.leaky_relu(x, alpha), 0.2, math.sqrt(2)),
    "tanh": Activation(lambda x, _: torch.tanh(x), 0.0, 1.0),
    "sigmoid": Activation(lambda x, _: torch.sigmoid(x), 0.0, 1.0),
    "elu": Activation(lambda x, _: F.elu(x), 0.0, 1.0),
    "selu": Activation(lambda x, _: F.selu(x), 0.0, 1.0),
    "softplus": Activation(lambda x, _: F.softplus(x), 0.0, 1.0),
    "swish": Activation(lambda x, _: torch.sigmoid(x) * x, 0.0, math.sqrt(2)),
}


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """y = clamp(act(x + b) * gain, -clamp, clamp); b [x.shape[dim]] is broadcast along `dim`.

    act: one of ACTIVATIONS. alpha: lrelu's negative slope (default 0.2). gain: default per activation.
    clamp: None or >= 0.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    spec = ACTIVATIONS[act]
    alpha = float(spec.def_alpha if alpha is None else alpha)
    gain = float(spec.def_gain if gain is None else gain)
    clamp = float(-1 if clamp is None else clamp)
    if clamp < -1 or -1 < clamp < 0:
        raise ValueError(f"clamp must be None or >= 0, got {clamp}")
    dim = dim % x.dim() if x.dim() else 0
    if b is not None:
        _check_bias(x, b, dim)
    if choose_impl(impl, x) == "ref":
        return _bias_act_ref(x, b, dim, act, alpha, gain, clamp)
    if b is None and act == "linear" and gain == 1 and clamp < 0:
        return x  # the identity: nothing to compute
    if b is not None:
        b = b.to(dtype=x.dtype)
    return torch.ops.p2pz.bias_act(x, b, dim, act, alpha, gain, clamp)


def _check_bias(x: torch.Tensor, b: torch.Tensor, dim: int) -> None:
    """The bias' shape, device and dtype, checked here with an error that says which, instead of deep
    inside a kernel. A floating-point bias of another precision is allowed: it is cast to x's dtype
    (mixed precision keeps fp32 biases under fp16/bf16 activations)."""
    if b.dim() != 1 or b.shape[0] != x.shape[dim]:
        raise ValueError(f"the bias must have shape [{x.shape[dim]}] (x.shape[dim]), got {tuple(b.shape)}")
    if b.device != x.device:
        raise ValueError(f"the bias is on {b.device} but x is on {x.device}; move both to one device")
    if not (b.is_floating_point() and x.is_floating_point()):
        raise ValueError(f"bias_act needs floating-point x and bias, got x {x.dtype} and bias {b.dtype}")


def _bias_act_ref(x, b, dim, act, alpha, gain, clamp):
    """Pure-PyTorch bias_act, one step at a time."""
    if b is not None:
        x = x + b.to(x.dtype).reshape([-1 if d == dim else 1 for d in range(x.dim())])
    x = ACTIVATIONS[act].func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


# ---------------------------------------------------------------------------------------------------
# The operators p2pz::bias_act and p2pz::bias_act_grad. bias_act's gradient is bias_act_grad(order=1);
# the gradient of bias_act_grad(order=k) is bias_act_grad(order=k) with respect to dy and
# bias_act_grad(order=k+1) with respect to x and b, so gradients of gradients work (R1 needs them).

MAX_ORDER = 2  # the kernels know the activations' first and second derivatives
LINEAR_IN_X = ("linear", "relu", "lrelu")  # second derivative zero almost everywhere


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


def _elementwise_like(x: torch.Tensor) -> torch.Tensor:
    """The operators' output allocation: x's strides when x is dense, else contiguous (bias_act.h)."""
    return torch.empty_like(x) if _is_dense(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _reduce_to_bias(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum a gradient of x's shape down to the bias' shape [x.shape[dim]]."""
    others = [d for d in range(g.dim()) if d != dim]
    # sum(dim=[]) would reduce *every* dimension: a 1-D x's gradient already has the bias' shape
    return g.sum(dim=others) if others else g


def _fake(
    x: torch.Tensor, b: torch.Tensor | None, dim: int, act: str, alpha: float, gain: float, clamp: float
) -> torch.Tensor:
    """bias_act's output shape and strides, for torch.compile and torch.export."""
    return _elementwise_like(x)


def _setup(ctx: FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, b, *ctx.args = inputs
    ctx.save_for_backward(x, b)


def _backward(ctx: FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, b = ctx.saved_tensors
    dx = torch.ops.p2pz.bias_act_grad(dy, x, b, *ctx.args, 1)
    db = _reduce_to_bias(dx, ctx.args[0]) if b is not None and ctx.needs_input_grad[1] else None
    return dx, db, None, None, None, None, None


def _grad_fake(
    dy: torch.Tensor,
    x: torch.Tensor,
    b: torch.Tensor | None,
    dim: int,
    act: str,
    alpha: float,
    gain: float,
    clamp: float,
    order: int,
) -> torch.Tensor:
    """bias_act_grad's output shape and strides: those of bias_act's."""
    return _elementwise_like(x)


def _grad_setup(ctx: FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    dy, x, b, *args = inputs
    ctx.args, ctx.order = args[:-1], args[-1]
    ctx.save_for_backward(dy, x, b)


def _grad_backward(ctx: FunctionCtx, ddx: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    dy, x, b = ctx.saved_tensors
    dim, act = ctx.args[0], ctx.args[1]
    # bias_act_grad(order=k) = dy * f^(k)(x + b): linear in dy, and f^(k+1) for x and b.
    d_dy = torch.ops.p2pz.bias_act_grad(ddx, x, b, *ctx.args, ctx.order) if ctx.needs_input_grad[0] else None
    d_x = d_b = None
    if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and act not in LINEAR_IN_X:
        if ctx.order + 1 > MAX_ORDER:
            raise NotImplementedError(
                f"bias_act supports gradients up to order {MAX_ORDER}; use impl='ref' for higher orders"
            )
        d_x = torch.ops.p2pz.bias_act_grad(ddx * dy, x, b, *ctx.args, ctx.order + 1)
        d_b = _reduce_to_bias(d_x, dim) if b is not None and ctx.needs_input_grad[2] else None
    return d_dy, d_x, d_b, None, None, None, None, None, None


define_op(
    "bias_act(Tensor x, Tensor? b, int dim, str act, float alpha, float gain, float clamp) -> Tensor",
    _fake,
    _backward,
    _setup,
)
define_op(
    "bias_act_grad(Tensor dy, Tensor x, Tensor? b, int dim, str act, float alpha, float gain, "
    "float clamp, int order) -> Tensor",
    _grad_fake,
    _grad_backward,
    _grad_setup,
)

__all__ = ["ACTIVATIONS", "bias_act"]
