"""DDIM inversion with pix2pix-zero's noise regularisation (paper §3.2, official ``ddim_inv.py``).

Inversion runs DDIM backwards, from the clean image latent to a noise map x_T, conditioned on the
caption without classifier-free guidance. A plain inversion leaves x_T correlated and off-Gaussian,
which editing does not tolerate; pix2pix-zero therefore pushes the predicted noise eps_t of every
step towards white Gaussian noise before taking the inverse step:

    repeat num_reg_steps (5):
        repeat num_ac_rolls (5):  eps -= lambda_ac / num_ac_rolls * d L_ac / d eps
        eps -= lambda_kl * d L_kl / d eps

* ``L_ac`` (auto-correlation): per channel, over the pyramid eta_0 = eps, eta_{k+1} = avgpool2(eta_k)
  down to 8x8, the sum of mean(eta * roll(eta, d, H))^2 + mean(eta * roll(eta, d, W))^2, one random
  shift d per level and channel (shared by both directions). d is drawn from 1..H/2-1
  (``randrange(1, H//2)``, official since commit ec33392) or 0..H/2-1 (diffusers: a zero shift
  shrinks the noise instead of decorrelating it).
* ``L_kl``: var + mean^2 - 1 - log(var + 1e-7), mean and (unbiased) variance over the sample.

The lambdas are gradient step sizes; gradients are taken with respect to the noise only (never
through the UNet). Both gradients have closed forms, used here instead of autograd: the losses are
dozens of tiny tensors, where autograd's bookkeeping costs more than the arithmetic
(``auto_corr_loss``/``kl_loss`` stay for checks and metrics; tests compare the two).

Every sample of a batch is regularised on its own (its own KL statistics and its own random
shifts from its own generator), so a batch gives the same inversions as single runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from p2pz.teacher.evals import unet_stage
from p2pz.teacher.presets import Preset

if TYPE_CHECKING:
    from p2pz.teacher.attention import CrossAttentionMaps

KL_EPS = 1e-7  # ddim_inv.py: torch.log(_var + 1e-7)
PYRAMID_MIN = 8  # ddim_inv.py: stop once the map is 8 px high


# ---------------------------------------------------------------------------------------------
# The regulariser


def pyramid_sizes(height: int) -> list[int]:
    """Heights of the auto-correlation pyramid: e.g. 64 -> [64, 32, 16, 8]."""
    sizes = [height]
    while sizes[-1] > PYRAMID_MIN:
        sizes.append(sizes[-1] // 2)
    return sizes


def draw_shifts(generator: torch.Generator, channels: int, height: int, min_roll: int) -> torch.Tensor:
    """Roll shifts ``[channels, levels]`` drawn in the reference implementations' order.

    One draw per (channel, level), channel-major, from ``[min_roll, H_level // 2)`` with
    ``torch.randint(..., generator=generator)``: diffusers' exact calls, so the ``diffusers``
    preset consumes its generator as the pipeline does.
    """
    sizes = pyramid_sizes(height)
    shifts = torch.empty(channels, len(sizes), dtype=torch.long)
    for c in range(channels):
        for level, size in enumerate(sizes):
            if min_roll == 0:
                shifts[c, level] = torch.randint(size // 2, (1,), generator=generator).item()
            else:
                shifts[c, level] = torch.randint(min_roll, size // 2, (1,), generator=generator).item()
    return shifts


def _roll_per_row(x: torch.Tensor, shifts: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.roll(x[i], shifts[i], dim)`` for every i of the first axis, in one gather."""
    n = x.shape[dim]
    index = (torch.arange(n, device=x.device)[None, :] - shifts[:, None].to(x.device)) % n  # [R, n]
    shape = [x.shape[0], 1, 1]
    shape[dim] = n
    return x.gather(dim, index.view(shape).expand_as(x))


def auto_corr_loss(eps: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """L_ac of one sample ``eps [C, H, W]`` with ``shifts [C, levels]`` (differentiable)."""
    eta = eps
    loss = eps.new_zeros(())
    for level in range(shifts.shape[1]):
        d = shifts[:, level]
        loss = loss + (eta * _roll_per_row(eta, d, 1)).mean((1, 2)).pow(2).sum()
        loss = loss + (eta * _roll_per_row(eta, d, 2)).mean((1, 2)).pow(2).sum()
        if level + 1 < shifts.shape[1]:
            eta = F.avg_pool2d(eta[:, None], 2)[:, 0]
    return loss


def auto_corr_grad(eps: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """d L_ac / d eps in closed form, for rows ``eps [R, H, W]`` (R = samples x channels)."""
    etas = [eps]
    for _ in range(shifts.shape[1] - 1):
        etas.append(F.avg_pool2d(etas[-1][:, None], 2)[:, 0])
    grad = None
    for level in reversed(range(shifts.shape[1])):
        eta, d = etas[level], shifts[:, level]
        n = eta.shape[1] * eta.shape[2]
        g = torch.zeros_like(eta)
        for dim in (1, 2):
            fwd, back = _roll_per_row(eta, d, dim), _roll_per_row(eta, -d, dim)
            m = (eta * fwd).mean((1, 2))  # d/d eta of m^2 = 2 m (roll(+d) + roll(-d)) / n
            g = g + (2 * m / n)[:, None, None] * (fwd + back)
        if grad is not None:  # back through avg_pool2d(2): spread each cell's gradient over 2x2 / 4
            up = grad.repeat_interleave(2, 1).repeat_interleave(2, 2) / 4
            g[:, : up.shape[1], : up.shape[2]] += up  # odd sizes: the pooled-away edge gets nothing
        grad = g
    return grad


def kl_loss(eps: torch.Tensor) -> torch.Tensor:
    """L_kl of one sample (any shape): var + mean^2 - 1 - log(var + 1e-7)."""
    mean, var = eps.mean(), eps.var()
    return var + mean**2 - 1 - torch.log(var + KL_EPS)


def kl_grad(eps: torch.Tensor) -> torch.Tensor:
    """d L_kl / d eps in closed form, per sample of ``eps [B, ...]``."""
    flat = eps.flatten(1)
    n = flat.shape[1]
    mean = flat.mean(1, keepdim=True)
    var = flat.var(1, keepdim=True)
    grad = 2 * (flat - mean) / (n - 1) * (1 - 1 / (var + KL_EPS)) + 2 * mean / n
    return grad.view_as(eps)


def regularize_noise(
    eps: torch.Tensor, generators: Sequence[torch.Generator], preset: Preset
) -> torch.Tensor:
    """Push each sample's predicted noise ``eps [B, C, H, W]`` towards white Gaussian noise."""
    b, c, h, w = eps.shape
    for _ in range(preset.num_reg_steps):
        if preset.lambda_ac > 0:
            for _ in range(preset.num_ac_rolls):
                shifts = torch.cat([draw_shifts(g, c, h, preset.min_roll) for g in generators])
                grad = auto_corr_grad(eps.reshape(b * c, h, w), shifts).view_as(eps)
                eps = eps - preset.lambda_ac * grad / preset.num_ac_rolls
        if preset.lambda_kl > 0:
            eps = eps - preset.lambda_kl * kl_grad(eps)
    return eps


# ---------------------------------------------------------------------------------------------
# The inversion loop


def inversion_timesteps(scheduler_config: dict, num_steps: int, kind: str) -> tuple[torch.Tensor, Any]:
    """UNet timesteps of the inversion and the object that takes the inverse step.

    ``official``: the DDIM timesteps reversed without their ends, t = 21, 41, ..., 961 for 50
    steps (``timesteps.flip(0)[1:-1]``: 48 UNet calls), stepped by ``official_inverse_step``.
    ``diffusers``: all of ``DDIMInverseScheduler``'s timesteps (v0.19+ semantics), stepped by it.
    """
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    if kind == "official":
        scheduler = DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(num_steps)
        return scheduler.timesteps.flip(0)[1:-1], scheduler
    if kind == "diffusers":
        scheduler = DDIMInverseScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(num_steps)
        return scheduler.timesteps, scheduler
    raise ValueError(f"unknown inversion kind {kind!r}")


def official_inverse_step(
    eps: torch.Tensor, t: int, x: torch.Tensor, alphas_cumprod: torch.Tensor, step_ratio: int
) -> torch.Tensor:
    """The official repository's inverse DDIM step (``scheduler.py``, ``step(reverse=True)``).

    It treats the input as sitting at alpha_bar[t - 1] and lands at alpha_bar[t + ratio - 1]:
    deliberate off-by-one approximations of the authors, kept for faithfulness.
    """
    a_t = alphas_cumprod[t - 1]
    a_next = alphas_cumprod[t + step_ratio - 1]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def predict_noise(
    unet: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """eps_theta(x, t) in float32, with classifier-free guidance when ``guidance_scale > 1`` (the UNet
    gets ``x`` in its own dtype)."""
    x = x.to(unet.dtype)
    with unet_stage("inversion"):
        if guidance_scale > 1:
            eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
            eps_u, eps_c = eps.chunk(2)
            return eps_u + guidance_scale * (eps_c - eps_u)
        return unet(x, t, encoder_hidden_states=cond).sample.float()


@torch.no_grad()
def invert(
    unet: Any,
    scheduler_config: dict,
    latents: torch.Tensor,
    cond: torch.Tensor,
    preset: Preset,
    generators: Sequence[torch.Generator],
    num_steps: int | None = None,
    uncond: torch.Tensor | None = None,
    progress: bool = False,
    maps: CrossAttentionMaps | None = None,
    record: Mapping[int, int] | None = None,
) -> torch.Tensor:
    """Regularised DDIM inversion of image latents ``[B, 4, h, w]`` under caption embeddings ``cond``.

    ``generators``: one per sample, drawing that sample's roll shifts. Returns x_T ``[B, 4, h, w]``
    in float32: the latent, the regulariser (whose gradient steps are small against the noise) and
    the inverse steps stay in float32 whatever the UNet's dtype; only the UNet's input is cast.
    ``record``: UNet timestep -> edit step whose reference maps the call at that timestep records
    into ``maps`` (a preset's ``reference_maps="inversion"``, see ``teacher/editing.py``); it needs
    an inversion without CFG, whose maps are the caption's alone.
    """
    record = record or {}
    if record and (maps is None or preset.inversion_guidance_scale > 1):
        raise ValueError("recording reference maps needs the maps and an inversion without CFG")
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError("pix2pix-zero inversion is implemented for epsilon-prediction models (SD 1.x)")
    num_steps = num_steps or preset.num_steps
    timesteps, scheduler = inversion_timesteps(scheduler_config, num_steps, preset.inversion)
    alphas_cumprod = scheduler.alphas_cumprod.to(latents.device)
    step_ratio = scheduler.config.num_train_timesteps // num_steps
    x = latents.float()
    for t in tqdm(timesteps, desc="inversion", disable=not progress, leave=False):
        step = record.get(int(t))
        with maps.recording(step) if step is not None else contextlib.nullcontext():
            eps = predict_noise(unet, x, t, cond, uncond, preset.inversion_guidance_scale)
        eps = regularize_noise(eps, generators, preset)  # float32 (predict_noise), for any UNet dtype
        if preset.inversion == "official":
            x = official_inverse_step(eps, int(t), x, alphas_cumprod, step_ratio)
        else:
            x = scheduler.step(eps, t, x).prev_sample
    return x
