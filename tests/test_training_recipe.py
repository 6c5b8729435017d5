"""The CPU recipe's options of the student's training: squared error, edit-focused weights, cosine decay."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from p2pz.student.training import StudentModule
from p2pz.utils.errors import UserError


def pair():
    """An input and a teacher's edit that differs from it in a 8x8 patch only."""
    x = torch.zeros(1, 3, 64, 64)
    target = x.clone()
    target[:, :, 20:28, 20:28] = 1.0
    return x, target


def test_change_weight_focuses_the_loss_on_the_edited_pixels():
    x, target = pair()
    inside, outside = target.clone(), target.clone()
    inside[:, :, 22:24, 22:24] += 0.5  # an error where the teacher edited
    outside[:, :, 50:52, 50:52] += 0.5  # the same error in the untouched background
    plain = StudentModule(resolution=64, lpips_weight=0.0, l2_weight=1.0)
    focused = StudentModule(resolution=64, lpips_weight=0.0, l2_weight=1.0, change_weight=4.0)
    for name in ("l1", "l2"):
        assert plain._reconstruction_terms(inside, target, x)[name] == pytest.approx(
            plain._reconstruction_terms(outside, target, x)[name].item()
        )
        ratio = (
            focused._reconstruction_terms(inside, target, x)[name]
            / focused._reconstruction_terms(outside, target, x)[name]
        )
        assert ratio.item() == pytest.approx(5.0)
    assert "l2" not in StudentModule(resolution=64, lpips_weight=0.0)._reconstruction_terms(inside, target, x)


def test_the_gradient_term_sees_a_blurred_edge_that_l1_barely_does():
    x, target = pair()
    blurred = torch.nn.functional.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False)
    offset = target + 0.1 * (blurred - target).abs().mean()  # the same L1 error, spread evenly
    module = StudentModule(resolution=64, lpips_weight=0.0, gradient_weight=1.0)
    sharp, soft = (
        module._reconstruction_terms(offset, target, x),
        module._reconstruction_terms(blurred, target, x),
    )
    assert sharp["gradient"].item() == pytest.approx(0.0, abs=1e-6)  # a constant error has no edges
    assert soft["gradient"] > 0.01
    assert "gradient" not in StudentModule(resolution=64, lpips_weight=0.0)._reconstruction_terms(
        blurred, target, x
    )


def test_cosine_decay_of_both_learning_rates():
    module = StudentModule(resolution=64, lpips_weight=0.0, lr_g=0.01, lr_d=0.002, lr_decay="cosine")
    module._trainer = SimpleNamespace(max_steps=100)
    opt_g, opt_d = module.configure_optimizers()
    lrs = []
    for step in (0, 50, 100):
        module._set_learning_rates(opt_g, opt_d, step)
        lrs.append((opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]))
    assert lrs[0] == pytest.approx((0.01, 0.002))
    assert lrs[1] == pytest.approx((0.01 * 0.525, 0.002 * 0.525))  # halfway: (1 + final ratio 0.05) / 2
    assert lrs[2] == pytest.approx((0.01 * 0.05, 0.002 * 0.05))
    constant = StudentModule(resolution=64, lpips_weight=0.0, lr_g=0.01)
    constant._trainer = SimpleNamespace(max_steps=100)
    opt_g, opt_d = constant.configure_optimizers()
    constant._set_learning_rates(opt_g, opt_d, 90)
    assert opt_g.param_groups[0]["lr"] == 0.01


def test_unknown_lr_decay_is_one_line():
    with pytest.raises(UserError, match="lr_decay"):
        StudentModule(resolution=64, lpips_weight=0.0, lr_decay="linear")
