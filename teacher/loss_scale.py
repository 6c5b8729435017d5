"""The float16 guidance loss's scale, carried across the steps of one edit.

A float16 UNet's gradients of the guidance loss underflow (the loss's map differences are ~1e-3,
spread over thousands of entries): the loss is scaled before the backward pass and the gradient
unscaled in float32. torch's ``GradScaler`` scheme, with a retried step in place of a skipped one
(a skipped guidance step would change the edit): a non-finite gradient (overflow) lowers the scale
and retries; an all-zero gradient of a non-zero loss (underflow) raises it and retries; a run of
good steps raises it again. One scale lives for one edit, so an overflow costs one retry, not one
per step. bfloat16 has float32's range: no scaling.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class GuidanceLossScale:
    """The loss scale of one edit's guidance steps (float16 UNets).

    ``scale`` starts at ``initial``. An overflow divides it by ``backoff`` (down to ``min_scale``) and
    retries the step; an underflow multiplies it by ``backoff`` (up to ``max_scale``) and retries,
    unless this step already lowered it (no back and forth: a step takes at most a handful of passes);
    ``growth_interval`` good steps in a row double it. A gradient that stays non-finite at
    ``min_scale``, or zero, is used as it is, with one warning per edit.
    """

    initial: float = 2.0**12
    backoff: float = 2.0**6
    growth_interval: int = 8
    min_scale: float = 1.0
    max_scale: float = 2.0**24

    def __post_init__(self) -> None:
        self.scale = self.initial
        self._good_steps = 0
        self._lowered = False  # in the current step
        self._warned = False

    def accept(self, grad: torch.Tensor, loss: torch.Tensor, attempt: int) -> bool:
        """After backward pass ``attempt`` (0-based) of a step at ``self.scale``, with the gradient
        unscaled: True keeps ``grad``; False retries the step at the new ``self.scale``."""
        if attempt == 0:
            self._lowered = False
        overflow = not bool(torch.isfinite(grad).all())
        underflow = not overflow and bool(loss.detach() != 0) and not bool(grad.any())
        if overflow and self.scale > self.min_scale:
            self.scale = max(self.scale / self.backoff, self.min_scale)
            self._good_steps, self._lowered = 0, True
            return False
        if underflow and self.scale < self.max_scale and not self._lowered:
            self.scale = min(self.scale * self.backoff, self.max_scale)
            self._good_steps = 0
            return False
        if overflow or underflow:
            self._warn_once("is not finite at the smallest scale" if overflow else "underflows to zero")
            return True
        self._good_steps += 1
        if self._good_steps >= self.growth_interval:
            self.scale = min(self.scale * 2, self.max_scale)
            self._good_steps = 0
        return True

    def _warn_once(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"the float16 guidance gradient {what} (loss scale {self.scale:g}); the step used it as it "
                "is: run the teacher in bfloat16 or float32",
                RuntimeWarning,
                stacklevel=3,
            )
