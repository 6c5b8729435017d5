"""Editing with cross-attention guidance (paper §3.2, official ``edit_pipeline.py``).

Two DDIM trajectories start from the same x_T (the inversion of a real image, or seeded noise):

* the **reference** pass denoises with the caption's embedding c (classifier-free guidance with
  the negative prompt) and records the cross-attention maps M_ref of every step; its result is
  the reconstruction;
* the **edit** pass denoises with c + Δc (the edit direction added to the conditional row). At
  every step it first takes one gradient step on the latent so that the cross-attention maps
  under c + Δc stay close to the reference's (which keeps the structure of the input):

      x_in = [x, x]                      (both CFG branches)
      L = sum_layers sum((M(x_in, c + Δc) - M_ref)^2) / (2 * heads)
      x_in <- x_in - xa_guidance * dL/dx_in
      eps = CFG(eps_theta(x_in, [neg, c + Δc]));  x <- DDIM step(eps, first half of x_in)

  Keeping the first (negative-prompt) half of the updated pair is the official code's choice,
  which diffusers copies; both reproduce it here (``guided_branch="negative"``). Its gradient comes
  from the negative branch's maps only, which for real images (negative prompt = caption) are the
  *unedited* caption's. ``guided_branch="edit"`` follows the paper's text instead: the loss is the
  conditional branch's maps under c + Δc against the reference's conditional maps, and its gradient
  moves the one latent that both CFG branches then denoise:

      L = sum_layers sum((M(x, c + Δc) - M_ref,cond)^2) / (2 * heads);   x <- x - xa_guidance * dL/dx

  (divided by 2 * heads as in the official loss, of which it is the conditional half: the same
  xa_guidance then steps by the same scale; with guidance_scale <= 1 there is one branch and heads.)

  ``guided_branch="joint"`` keeps the official loss over both branches but differentiates it with
  respect to the one latent that both branches denoise, x_in = [x, x]:

      x <- x - xa_guidance * (dL/dx_neg + dL/dx_edit)

  The negative branch's half holds the structure (and, for an attribute edit, pulls the attribute
  back); the edit branch's half lets the attribute change where its maps match the reference's.
  On the shapes world this is what keeps a colour edit's structure without cancelling it.

Unlike both reference implementations, the two passes run in lockstep: step i of the reference
pass, whose maps are needed only by step i of the edit pass, runs just before it. Only one step's
maps are alive at any time (the official code keeps all of them, 6.6 GB at 512 px, on the CPU),
and the results are the same as with two sequential passes. The direction is added to every
sample's own conditional row and the loss is a sum of per-sample losses, so a batch gives the
same results as single runs (the reference implementations edit only row 1 of a batch and scale
the guidance by 1 / batch size).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from p2pz.teacher.attention import CrossAttentionMaps

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

GUIDED_BRANCHES = ("negative", "edit", "joint")


@dataclass
class EditOutput:
    edited: torch.Tensor  # [B, 4, h, w] latent of the edit
    reconstruction: torch.Tensor  # [B, 4, h, w] latent of the reference pass
    xa_loss: list[float]  # cross-attention loss (before the guidance step) per timestep


def make_scheduler(scheduler_config: dict, num_steps: int, device: torch.device | str) -> DDIMScheduler:
    """The sampling scheduler of both passes: DDIM (eta = 0) from the model's config, as both codes."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler


def _guided(eps: torch.Tensor, guidance_scale: float, cfg: bool) -> torch.Tensor:
    if not cfg:
        return eps
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def edit_with_guidance(
    unet: Any,
    maps: CrossAttentionMaps,
    scheduler_config: dict,
    x_T: torch.Tensor,
    uncond: torch.Tensor,
    cond: torch.Tensor,
    direction: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    xa_guidance: float,
    progress: bool = False,
    guided_branch: str = "negative",
) -> EditOutput:
    """Reference and guided edit passes from ``x_T [B, 4, h, w]``.

    ``uncond``/``cond``: negative-prompt and caption embeddings ``[B, 77, D]``; ``direction``:
    per-sample edit directions ``[B, 77, D]`` added to ``cond`` in the edit pass. ``maps`` must be
    installed on ``unet``. ``guided_branch``: ``"negative"`` (official), ``"edit"`` (paper) or
    ``"joint"`` (the official loss on the shared latent), see the module docstring.
    """
    if guided_branch not in GUIDED_BRANCHES:
        raise ValueError(f"guided_branch must be one of {GUIDED_BRANCHES}, got {guided_branch!r}")
    batch = x_T.shape[0]
    cfg = guidance_scale > 1.0  # as both codes: no negative branch at all for scale <= 1
    ref_embeds = torch.cat([uncond, cond]) if cfg else cond
    edit_cond = cond + direction.to(cond.dtype)
    edit_embeds = torch.cat([uncond, edit_cond]) if cfg else edit_cond
    ref_sched = make_scheduler(scheduler_config, num_steps, x_T.device)
    edit_sched = make_scheduler(scheduler_config, num_steps, x_T.device)
    pair = (lambda x: torch.cat([x, x])) if cfg else (lambda x: x)

    x_ref, x_edit, losses = x_T, x_T, []
    maps.clear()
    for i, t in enumerate(tqdm(ref_sched.timesteps, desc="editing", disable=not progress, leave=False)):
        # Reference step i: records the maps that guide edit step i.
        record = maps.recording(i) if xa_guidance > 0 else contextlib.nullcontext()
        with torch.no_grad(), record:
            eps = unet(pair(x_ref), t, encoder_hidden_states=ref_embeds).sample
        x_ref = ref_sched.step(_guided(eps, guidance_scale, cfg), t, x_ref).prev_sample

        # Edit step i: one gradient step on the latent against the reference maps ...
        if xa_guidance <= 0:
            x_in, loss = pair(x_edit), None
        elif guided_branch == "negative":  # official: each half of the CFG pair moves by its own gradient
            x_pair = pair(x_edit)
            grad, loss = _xa_gradient(unet, maps, x_pair, t, edit_embeds, i, batch, "all")
            x_in = x_pair - xa_guidance * grad
        elif guided_branch == "edit":  # the paper: the edit branch's maps move the shared latent
            rows = "last_half" if cfg else "all"
            grad, loss = _xa_gradient(unet, maps, x_edit, t, edit_cond, i, batch, rows)
            x_in = pair(x_edit - xa_guidance * grad)
        else:  # "joint": the official loss over both branches, differentiated w.r.t. the shared latent
            grad, loss = _xa_gradient(unet, maps, x_edit, t, edit_embeds, i, batch, "all", duplicate=cfg)
            x_in = pair(x_edit - xa_guidance * grad)
        if loss is not None:
            losses.append(loss)
        # ... then the noise prediction at the moved latent and a DDIM step.
        with torch.no_grad():
            eps = unet(x_in, t, encoder_hidden_states=edit_embeds).sample
        x_edit = x_in.chunk(2)[0] if cfg else x_in
        x_edit = edit_sched.step(_guided(eps, guidance_scale, cfg), t, x_edit).prev_sample
    maps.clear()
    return EditOutput(edited=x_edit, reconstruction=x_ref, xa_loss=losses)


def _xa_gradient(
    unet: Any,
    maps: CrossAttentionMaps,
    x: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    step: int,
    num_samples: int,
    reference_rows: str,
    duplicate: bool = False,
) -> tuple[torch.Tensor, float]:
    """dL/dx and L, the cross-attention loss of ``x`` under ``embeds`` against the maps recorded at
    ``step``. ``duplicate``: feed ``[x, x]`` (one copy per CFG branch), so the gradient is the sum
    of both branches' gradients."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), maps.guiding(step, num_samples=num_samples, reference_rows=reference_rows):
        unet(torch.cat([x, x]) if duplicate else x, t, encoder_hidden_states=embeds)
        loss = maps.loss
    (grad,) = torch.autograd.grad(loss, x)
    return grad, float(loss.detach())


@torch.no_grad()
def cross_attention_loss(
    unet: Any,
    maps: CrossAttentionMaps,
    x: torch.Tensor,
    t: torch.Tensor,
    ref_x: torch.Tensor,
    ref_embeds: torch.Tensor,
    embeds: torch.Tensor,
    num_samples: int,
) -> float:
    """The guidance loss of latent ``x`` under ``embeds`` against the maps of ``ref_x`` under
    ``ref_embeds`` at timestep ``t`` (for checks: guidance must lower it)."""
    maps.clear()
    with maps.recording(-1):
        unet(ref_x, t, encoder_hidden_states=ref_embeds)
    with maps.guiding(-1, num_samples=num_samples):
        unet(x, t, encoder_hidden_states=embeds)
        loss = float(maps.loss)
    maps.clear()
    return loss
