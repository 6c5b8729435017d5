"""The student's discriminator and R1 penalty in reduced precision (fp16 / bf16 autocast, half inputs)."""

from __future__ import annotations

import pytest
import torch

from p2pz.student.losses import r1_penalty


def test_r1_penalty_squares_and_sums_in_fp32_for_half_inputs():
    """A gradient of 300 per pixel: its square (9e4) overflows fp16, the fp32 sum does not."""
    y = torch.zeros(2, 3, 8, 8, dtype=torch.float16, requires_grad=True)
    logits = (y * 300).sum(dim=[1, 2, 3])  # d logits / d y = 300 everywhere
    penalty = r1_penalty(logits, y)
    assert penalty.dtype == torch.float32
    assert float(penalty) == pytest.approx(300.0**2 * 3 * 8 * 8)


def _discriminator_r1(dtype: torch.dtype | None) -> tuple[float, bool]:
    from p2pz.student.networks import Discriminator

    torch.manual_seed(0)
    D = Discriminator(resolution=64, img_channels=3, preset="lite", channel_base=1024, channel_max=32)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        penalty = r1_penalty(D(x, y), y)
    penalty.backward()
    grads = [p.grad for p in D.parameters() if p.grad is not None]
    return float(penalty), all(torch.isfinite(g).all() for g in grads)


def test_r1_penalty_under_bf16_autocast_is_finite_and_close_to_fp32():
    exact, _ = _discriminator_r1(None)
    value, finite = _discriminator_r1(torch.bfloat16)
    assert finite and value == pytest.approx(exact, rel=0.05)


def test_r1_penalty_under_fp16_autocast_is_finite_and_close_to_fp32():
    exact, _ = _discriminator_r1(None)
    value, finite = _discriminator_r1(torch.float16)
    assert finite and value == pytest.approx(exact, rel=0.05)
