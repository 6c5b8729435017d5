"""The float16 guidance loss scale (``teacher/loss_scale.py``): carried across an edit's steps,
lowered on overflow, raised on underflow; driven with gradients rounded through float16 as a
float16 UNet's backward pass rounds them, then in a float16 edit of the tiny teacher."""

from __future__ import annotations

import pytest
import torch
from test_teacher_throughput import STEPS, _counts, _direction, _edit, _teacher

from p2pz.teacher import editing
from p2pz.teacher.loss_scale import GuidanceLossScale

LOSS = torch.tensor(1.0)


def _guidance_step(scaler: GuidanceLossScale, true_grad: float) -> tuple[torch.Tensor, int]:
    """One guidance step with a float16 backward pass: the scaled gradient is rounded to float16
    (inf above 65504, zero below ~6e-8) and unscaled in float32. Returns it and the passes taken."""
    for attempt in range(20):
        scaled = torch.full((4,), true_grad) * scaler.scale
        grad = scaled.half().float() / scaler.scale
        if scaler.accept(grad, LOSS, attempt):
            return grad, attempt + 1
    raise AssertionError("no gradient accepted in 20 passes")


def test_an_overflow_lowers_the_scale_for_the_rest_of_the_edit():
    """A gradient that overflows at 2^12 but not at 2^6: one retry in the first step, none after (the
    scale used to restart at 2^12 every step: two passes a step)."""
    scaler = GuidanceLossScale()
    passes = [_guidance_step(scaler, 100.0)[1] for _ in range(6)]
    assert passes == [2, 1, 1, 1, 1, 1]
    assert scaler.scale == 2.0**6


def test_good_steps_grow_the_scale_back_and_an_overflow_backs_it_off_again():
    scaler = GuidanceLossScale(growth_interval=2)
    passes, scales = [], []
    for _ in range(20):
        grad, taken = _guidance_step(scaler, 100.0)  # overflows above a scale of 655
        assert torch.isfinite(grad).all() and torch.allclose(grad, torch.full((4,), 100.0), rtol=1e-3)
        passes.append(taken)
        scales.append(scaler.scale)
    assert max(scales) <= 2.0**10 and 2.0**7 in scales  # it grew from 2^6 and came back down
    assert sum(passes) < 2 * len(passes)  # retries only when the grown scale overflows


def test_an_underflow_raises_the_scale_and_retries():
    """A gradient below float16's range at 2^12 (zero with a non-zero loss) is retried at a larger
    scale instead of guiding with zero."""
    scaler = GuidanceLossScale()
    grad, taken = _guidance_step(scaler, 1e-12)
    assert taken > 1 and scaler.scale > 2.0**12
    assert grad.abs().min() > 0 and torch.allclose(grad, torch.full((4,), 1e-12), rtol=0.05)


def test_a_zero_loss_with_a_zero_gradient_is_not_an_underflow():
    scaler = GuidanceLossScale()
    assert scaler.accept(torch.zeros(4), torch.tensor(0.0), 0)
    assert scaler.scale == 2.0**12


def test_a_gradient_that_overflows_at_every_scale_warns_once_and_is_used():
    scaler = GuidanceLossScale()
    with pytest.warns(RuntimeWarning, match="not finite at the smallest scale") as warned:
        _, taken = _guidance_step(scaler, float("inf"))
        _guidance_step(scaler, float("inf"))
    assert taken == 3 and scaler.scale == 1.0  # 2^12, 2^6, 1
    assert len(warned) == 1


def test_a_float16_edit_carries_the_scale_across_its_steps(tiny_model_dir, monkeypatch):
    """The tiny teacher in float16 with a loss scale far too large to start with: only the first
    guidance step retries (the guidance forwards are counted); every later step starts from the
    scale that worked."""
    torch.manual_seed(0)
    low = _teacher(tiny_model_dir, dtype=torch.float16)
    made: list[GuidanceLossScale] = []

    def tracked(**kwargs):
        made.append(GuidanceLossScale(initial=2.0**40, **kwargs))
        return made[-1]

    monkeypatch.setattr(editing, "GuidanceLossScale", tracked)
    _, counts = _counts(low, lambda: _edit(low, _direction(low)))
    [scaler] = made  # one per edit
    retries = round(torch.log2(torch.tensor(2.0**40 / scaler.scale)).item() / 6)  # each retry: / 2^6
    assert retries >= 1
    samples_per_pass = 2 * 2  # two images, both CFG branches (the official preset)
    assert counts["forward"]["guidance"] == samples_per_pass * (STEPS + retries)


def test_bfloat16_and_float32_guidance_is_not_scaled(tiny_model_dir, monkeypatch):
    made = []
    monkeypatch.setattr(editing, "GuidanceLossScale", lambda **kw: made.append(kw) or GuidanceLossScale())
    low = _teacher(tiny_model_dir, dtype=torch.bfloat16)
    _edit(low, _direction(low))
    assert made == []
