"""The inversion's regulariser: closed-form gradients, shift draws, official timesteps."""

from __future__ import annotations

import pytest
import torch

from p2pz.data.models.tiny import SD14_SCHEDULER
from p2pz.teacher.inversion import (
    auto_corr_grad,
    auto_corr_loss,
    draw_shifts,
    inversion_timesteps,
    kl_grad,
    kl_loss,
    pyramid_sizes,
)


@pytest.mark.parametrize("size", [(64, 64), (16, 16), (8, 8), (18, 14)])
def test_closed_form_gradients_match_autograd(size):
    eps = torch.randn(4, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shifts = draw_shifts(torch.Generator().manual_seed(0), 4, size[0], 1)
    var = eps.clone().requires_grad_(True)
    auto_corr_loss(var, shifts).backward()
    assert torch.allclose(auto_corr_grad(eps, shifts), var.grad, atol=1e-12)
    var = eps.clone().requires_grad_(True)
    kl_loss(var).backward()
    assert torch.allclose(kl_grad(eps[None])[0], var.grad, atol=1e-12)


def test_shift_ranges():
    assert pyramid_sizes(64) == [64, 32, 16, 8] and pyramid_sizes(8) == [8]
    g = torch.Generator().manual_seed(0)
    official = torch.stack([draw_shifts(g, 4, 64, 1) for _ in range(200)])
    assert official.min() == 1  # randrange(1, H//2): never a zero shift
    assert official[..., 0].max() == 31 and official[..., 3].max() == 3
    diffusers = torch.stack([draw_shifts(g, 4, 64, 0) for _ in range(200)])
    assert diffusers.min() == 0  # torch.randint(H // 2): zero shifts happen


def test_official_inversion_timesteps():
    timesteps, _ = inversion_timesteps(SD14_SCHEDULER, 50, "official")
    assert timesteps.tolist() == list(range(21, 962, 20))  # 48 UNet calls for 50 steps
    timesteps, scheduler = inversion_timesteps(SD14_SCHEDULER, 50, "diffusers")
    assert len(timesteps) == 50 and type(scheduler).__name__ == "DDIMInverseScheduler"
