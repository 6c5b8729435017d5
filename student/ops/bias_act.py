"""Fused bias + activation + gain + clamp (StyleGAN2's `bias_act`).

    y = clamp(act(x + b) * gain, -clamp, +clamp)

with b broadcast along dimension `dim`. Every step is optional: b=None adds nothing, gain=None uses the
activation's default gain (sqrt(2) for the ReLU family and swish, which keeps the activations' variance
under the equalised learning rate), clamp=None does not clamp.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from p2pz.student.ops import _library
from p2pz.student.ops._runtime import choose_impl


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
    if b is not None and (b.dim() != 1 or b.shape[0] != x.shape[dim]):
        raise ValueError(f"the bias must have shape [{x.shape[dim]}] (x.shape[dim]), got {tuple(b.shape)}")
    if choose_impl(impl, x) == "ref":
        return _bias_act_ref(x, b, dim, act, alpha, gain, clamp)
    if b is None and act == "linear" and gain == 1 and clamp < 0:
        return x  # the identity: nothing to compute
    if b is not None:
        b = b.to(dtype=x.dtype)
    return torch.ops.p2pz.bias_act(x, b, dim, act, alpha, gain, clamp)


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


__all__ = ["ACTIVATIONS", "bias_act"]
_ = _library  # the operators are defined on import
