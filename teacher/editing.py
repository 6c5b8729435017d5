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

Guidance terms (``teacher/guidance_terms.py``; none in the paper's method) may weigh the map loss's
cells, add a loss on the step's predicted clean latent, and change the edit's latent after its
DDIM step: ``local`` (``teacher/local_blend.py``) keeps the loss and the result outside DiffEdit's
mask. They run with guided edits only.

Reference maps from the inversion (``maps_from_inversion``; a preset's ``reference_maps``; neither
reference has it): DDIM inversion already runs the UNet under the caption at the edit's timesteps,
on latents at those timesteps' noise levels, so its cross-attention maps can stand for the
reference pass's, which then does not run (S UNet calls less per image). The edit timesteps the
inversion never evaluates (the official inversion's first and last) take their maps from one UNet
call each, at x_T for the first and at the input's clean latent for the last. The reference maps
then have the caption's branch only (both CFG branches compare against it: exact where the
negative prompt is the caption), no reconstruction comes out, and every guided step's maps are
held from the inversion until that step (memory: docs/results/cheap-teacher.md).

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
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from p2pz.teacher.attention import CrossAttentionMaps
from p2pz.teacher.evals import timed_backward, unet_stage
from p2pz.teacher.guidance_terms import (
    GuidanceContext,
    GuidanceStep,
    GuidanceTerm,
    TermSpec,
    combined_loss,
    combined_map_weights,
)
from p2pz.teacher.loss_scale import GuidanceLossScale

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

GUIDED_BRANCHES = ("negative", "edit", "joint")


@dataclass
class EditOutput:
    edited: torch.Tensor  # [B, 4, h, w] latent of the edit
    reconstruction: torch.Tensor | None  # [B, 4, h, w] latent of the reference pass (None: no pass)
    xa_loss: list[float]  # cross-attention loss (before the guidance step) per timestep


def make_scheduler(scheduler_config: dict, num_steps: int, device: torch.device | str) -> DDIMScheduler:
    """The sampling scheduler of both passes: DDIM (eta = 0) from the model's config, as both codes."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler


def guided_steps(num_steps: int, guided_share: float, guided_stride: int, xa_guidance: float) -> list[int]:
    """The steps that take the guidance step: of the first ``ceil(guided_share * num_steps)``, every
    ``guided_stride``-th counted back from the last step (which forms the final edges: on the shapes
    world, guiding it kept an edit that the other half of the steps missed, docs/results/
    cheap-teacher.md); none without guidance."""
    if not 0.0 <= guided_share <= 1.0:
        raise ValueError(f"guided_share must be in [0, 1], got {guided_share}")
    if guided_stride < 1:
        raise ValueError(f"guided_stride must be a positive integer, got {guided_stride}")
    if xa_guidance <= 0:
        return []
    return [i for i in range(math.ceil(guided_share * num_steps)) if (num_steps - 1 - i) % guided_stride == 0]


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
    single_branch_reference: bool = True,
    terms: Sequence[TermSpec] = (),
    clean_latents: torch.Tensor | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    guided_share: float = 1.0,
    fused_prediction: bool = False,
    maps_from_inversion: bool = False,
    guided_stride: int = 1,
) -> EditOutput:
    """Reference and guided edit passes from ``x_T [B, 4, h, w]``.

    ``uncond``/``cond``: negative-prompt and caption embeddings ``[B, 77, D]``; ``direction``:
    per-sample edit directions ``[E * B, 77, D]`` added to ``cond`` in the edit pass, edit-major
    (rows ``[e * B, (e + 1) * B)`` are edit ``e``): E edits of the same inputs share the one
    reference pass and its maps, and their guided passes run as one batch; ``edited`` is then
    ``[E * B, 4, h, w]`` in the same order. ``maps`` must be installed on ``unet``.
    ``guided_branch``: ``"negative"`` (official), ``"edit"`` (paper) or ``"joint"`` (the official
    loss on the shared latent), see the module docstring. ``single_branch_reference``: when both
    CFG branches of the reference pass have the same embeddings (real images, negative prompt =
    caption), run one and use it for both (the same noise and maps, one UNet evaluation less per step).
    ``terms``: guidance terms' specs (``teacher/guidance_terms.py``), built once per call with
    guidance on, from ``clean_latents`` (the inputs' ``[B, 4, h, w]``; without them, a first,
    unrecorded reference pass gives them) and ``decode`` (latents -> images, differentiable).
    ``guided_share``: the share of the steps, from the first, that take the guidance step (the
    rest are plain DDIM steps under c + Δc, and their reference maps are not recorded);
    ``guided_stride``: of those, every ``guided_stride``-th counted back from the last (``guided_steps``).
    ``fused_prediction``: a guided step's DDIM step uses the noise prediction of its guidance
    forward, made at the latent *before* the gradient step, instead of a second UNet call at the
    moved latent (one UNet call per guided step instead of two; the step's eps is then
    eps(x) rather than eps(x - xa_guidance * grad), a first-order difference in the step). With
    ``guided_branch="edit"`` and CFG the guidance forward runs the edit branch only: its eps is the
    edit branch's, and the negative branch's comes from one UNet call at the moved latent (two
    one-branch calls per guided step instead of a one-branch and a two-branch one).
    ``maps_from_inversion``: ``maps`` already holds the guided steps' reference maps, recorded by
    ``invert`` under the caption; no reference pass runs (``reconstruction`` is None), and guided
    steps the inversion did not record get theirs from one UNet call (see the module docstring).

    The latents stay in float32 whatever the UNet's dtype (each UNet call gets a cast copy), so a
    bf16/fp16 UNet rounds its inputs, not the trajectories; see also ``_xa_gradient``.
    """
    if guided_branch not in GUIDED_BRANCHES:
        raise ValueError(f"guided_branch must be one of {GUIDED_BRANCHES}, got {guided_branch!r}")
    batch = x_T.shape[0]
    if direction.shape[0] % batch:
        raise ValueError(f"direction has {direction.shape[0]} rows, not a multiple of the batch {batch}")
    if terms and guided_branch == "negative":
        raise ValueError("guidance terms need the guided branch 'edit' or 'joint' (one latent per sample)")
    copies = direction.shape[0] // batch  # edits sharing this reference pass
    cfg = guidance_scale > 1.0  # as both codes: no negative branch at all for scale <= 1
    guided_set = set(guided_steps(num_steps, guided_share, guided_stride, xa_guidance))
    from_inversion = maps_from_inversion and bool(guided_set)
    if from_inversion and clean_latents is None:
        raise ValueError("reference maps from the inversion need the inputs' clean latents (real images)")
    passes = _Passes.build(uncond, cond, direction, copies, cfg, single_branch_reference)
    ref_sched = make_scheduler(scheduler_config, num_steps, x_T.device)
    edit_sched = make_scheduler(scheduler_config, num_steps, x_T.device)
    context, active = None, []
    if terms and xa_guidance > 0:
        if clean_latents is None:  # synthetic inputs: the reference pass's result is the input
            clean_latents = _reference_pass(unet, scheduler_config, x_T, passes, num_steps, guidance_scale)
        context = GuidanceContext(
            clean_latents, cond, uncond, passes.edit_cond, copies, guidance_scale, edit_sched.alphas_cumprod,
            unet, decode,
        )  # fmt: skip
        active = [spec.build(context) for spec in terms]
        if from_inversion and any(term.uses_reference_latents for term in active):
            raise ValueError("a guidance term here needs the reference pass's latents: keep reference_maps")
    dtype = unet.dtype

    x_ref = x_T.float()
    x_edit = x_ref.repeat(copies, 1, 1, 1)
    losses = []
    loss_scale = GuidanceLossScale() if dtype == torch.float16 else None  # carried across the steps
    if not from_inversion:
        maps.clear()
    for i, t in enumerate(tqdm(ref_sched.timesteps, desc="editing", disable=not progress, leave=False)):
        # Reference step i: records the maps that guide edit step i (or the inversion did).
        guided = i in guided_set
        if from_inversion:
            x_ref = None
            if guided and not any(key[0] == i for key in maps.reference):
                _record_caption_maps(unet, maps, i, t, x_T if i == 0 else clean_latents, cond)
        else:
            with maps.recording(i) if guided else contextlib.nullcontext():
                x_ref = _reference_step(unet, ref_sched, x_ref, t, passes, guidance_scale)
        if guided:
            recorded = 1 if from_inversion else passes.ref_branches
            _widen_reference(maps, i, recorded, 2 if cfg else 1, copies)

        # Edit step i: one gradient step on the latent against the reference maps ...
        fused = [] if fused_prediction and guided else None  # receives the guidance forward's eps
        x_in, loss = _guidance_step(
            unet, maps, x_edit, t, i, passes, xa_guidance if guided else 0.0, guided_branch, cfg, active,
            context, loss_scale, fused,
        )  # fmt: skip
        if loss is not None:
            losses.append(loss)
        # ... then the noise prediction at the moved latent (or the fused one) and a DDIM step.
        if fused and cfg and guided_branch == "edit":  # the guidance forward made the edit branch's only
            eps = torch.cat([_negative_prediction(unet, x_in, t, passes), fused[0]])
        elif fused:
            eps = fused[0]
        else:
            with torch.no_grad(), unet_stage("prediction"):
                eps = unet(x_in.to(dtype), t, encoder_hidden_states=passes.edit_embeds).sample.float()
        x_edit = x_in.chunk(2)[0] if cfg else x_in
        x_edit = edit_sched.step(_guided(eps, guidance_scale, cfg), t, x_edit).prev_sample
        for term in active:  # e.g. the reference's latents outside a mask
            x_edit = term.after_step(x_edit, x_ref, t)
    maps.clear()
    return EditOutput(edited=x_edit, reconstruction=x_ref, xa_loss=losses)


@torch.no_grad()
def _negative_prediction(unet: Any, x_in: torch.Tensor, t, passes: _Passes) -> torch.Tensor:
    """The negative branch's noise prediction at the moved latent (a fused step of ``guided_branch="edit"``,
    whose guidance forward ran the edit branch only)."""
    with unet_stage("prediction"):
        x_neg, embeds = x_in.chunk(2)[0], passes.edit_embeds.chunk(2)[0]
        return unet(x_neg.to(unet.dtype), t, encoder_hidden_states=embeds).sample.float()


@torch.no_grad()
def _record_caption_maps(unet: Any, maps: CrossAttentionMaps, step: int, t, x: torch.Tensor, cond) -> None:
    """Step ``step``'s reference maps from one UNet call at ``x`` under the caption (an edit timestep
    the inversion did not evaluate)."""
    with maps.recording(step), unet_stage("reference"):
        unet(x.to(unet.dtype), t, encoder_hidden_states=cond)


@torch.no_grad()
def _reference_step(
    unet: Any, sched: DDIMScheduler, x: torch.Tensor, t, passes: _Passes, guidance_scale: float
):
    """One DDIM step of the reference pass (with CFG when it runs both branches)."""
    with unet_stage("reference"):
        x_in = x if passes.ref_branches == 1 else torch.cat([x, x])
        eps = unet(x_in.to(unet.dtype), t, encoder_hidden_states=passes.ref_embeds).sample.float()
    if passes.ref_branches == 2:
        eps = _guided(eps, guidance_scale, True)
    return sched.step(eps, t, x).prev_sample


def _reference_pass(
    unet: Any,
    scheduler_config: dict,
    x_T: torch.Tensor,
    passes: _Passes,
    num_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """The reference pass alone, unrecorded: its final latent (the input's, for a synthetic image)."""
    sched = make_scheduler(scheduler_config, num_steps, x_T.device)
    x = x_T.float()
    for t in sched.timesteps:
        x = _reference_step(unet, sched, x, t, passes, guidance_scale)
    return x


@dataclass
class _Passes:
    """The embeddings of both passes. ``ref_branches``: UNet rows per sample of the reference pass
    (1: no CFG, or both branches the same and run once; 2: [negative, caption])."""

    ref_embeds: torch.Tensor
    ref_branches: int
    edit_cond: torch.Tensor  # [E * B, 77, D]: caption + direction
    edit_embeds: torch.Tensor  # [2 * E * B, 77, D] with CFG: [negative, caption + direction]

    @classmethod
    def build(cls, uncond, cond, direction, copies: int, cfg: bool, single_branch: bool) -> _Passes:
        same = single_branch and (uncond is cond or torch.equal(uncond, cond))
        ref_branches = 2 if cfg and not same else 1
        ref_embeds = torch.cat([uncond, cond]) if ref_branches == 2 else cond
        edit_cond = cond.repeat(copies, 1, 1) + direction.to(cond.dtype)
        edit_embeds = torch.cat([uncond.repeat(copies, 1, 1), edit_cond]) if cfg else edit_cond
        return cls(ref_embeds, ref_branches, edit_cond, edit_embeds)


def _widen_reference(maps: CrossAttentionMaps, step: int, recorded: int, branches: int, copies: int) -> None:
    """Lay the maps recorded at ``step`` out as the guided pass's rows: ``branches`` CFG branches of
    ``copies`` edits of the batch (``[branch, edit, sample * heads]``). A single recorded branch
    stands for both (identical inputs give identical maps); every edit compares against the same
    reference."""
    if recorded == branches and copies == 1:
        return
    for key in [k for k in maps.reference if k[0] == step]:
        ref = maps.reference[key]
        rows, *rest = ref.shape
        per_branch = ref.reshape(recorded, 1, rows // recorded, *rest)
        maps.reference[key] = per_branch.expand(branches, copies, -1, *rest).reshape(-1, *rest)


def _guidance_step(
    unet: Any,
    maps: CrossAttentionMaps,
    x_edit: torch.Tensor,
    t: torch.Tensor,
    step: int,
    passes: _Passes,
    xa_guidance: float,
    guided_branch: str,
    cfg: bool,
    terms: Sequence[GuidanceTerm] = (),
    context: GuidanceContext | None = None,
    loss_scale: GuidanceLossScale | None = None,
    eps_out: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float | None]:
    """The guided pass's input at step ``step`` (the CFG pair with CFG) and the loss before the step."""
    pair = (lambda x: torch.cat([x, x])) if cfg else (lambda x: x)
    samples = x_edit.shape[0]
    if xa_guidance <= 0:
        return pair(x_edit), None
    if guided_branch == "negative":  # official: each half of the CFG pair moves by its own gradient
        x_pair = pair(x_edit)
        grad, loss = _xa_gradient(
            unet, maps, x_pair, t, passes.edit_embeds, step, samples, "all", loss_scale=loss_scale,
            eps_out=eps_out,
        )  # fmt: skip
        return x_pair - xa_guidance * grad, loss
    if guided_branch == "edit":  # the paper: the edit branch's maps move the shared latent
        rows = "last_half" if cfg else "all"
        grad, loss = _xa_gradient(
            unet, maps, x_edit, t, passes.edit_cond, step, samples, rows, terms=terms, context=context,
            loss_scale=loss_scale, eps_out=eps_out,
        )  # fmt: skip
        return pair(x_edit - xa_guidance * grad), loss
    # "joint": the official loss over both branches, differentiated w.r.t. the shared latent
    grad, loss = _xa_gradient(
        unet, maps, x_edit, t, passes.edit_embeds, step, samples, "all", duplicate=cfg, terms=terms,
        context=context, loss_scale=loss_scale, eps_out=eps_out,
    )  # fmt: skip
    return pair(x_edit - xa_guidance * grad), loss


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
    terms: Sequence[GuidanceTerm] = (),
    context: GuidanceContext | None = None,
    loss_scale: GuidanceLossScale | None = None,
    eps_out: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """dL/dx and L, the cross-attention loss of ``x`` under ``embeds`` against the maps recorded at
    ``step``. ``duplicate``: feed ``[x, x]`` (one copy per CFG branch), so the gradient is the sum
    of both branches' gradients. ``terms``: guidance terms (their map weights, and their losses on the
    step, built from ``context``). ``eps_out``: receives the forward's noise prediction (float32,
    detached), for a fused DDIM step. ``x`` and the gradient are float32; the loss is summed in float32
    (``CrossAttentionMaps``). A float16 UNet's loss is scaled (``loss_scale``, the edit's: see
    ``teacher/loss_scale.py``; a fresh one without it); other dtypes are not."""
    if unet.dtype == torch.float16 and loss_scale is None:
        loss_scale = GuidanceLossScale()
    elif unet.dtype != torch.float16:
        loss_scale = None
    reference = {k: v for k, v in maps.reference.items() if k[0] == step} if loss_scale is not None else {}
    weights = combined_map_weights(terms)  # the same for every attempt
    for attempt in itertools.count():
        if attempt:  # the guiding pass consumed the maps: put them back for the retry
            maps.reference.update(reference)
        scale = loss_scale.scale if loss_scale is not None else 1.0
        x = x.detach().float().requires_grad_(True)
        guiding = maps.guiding(
            step, num_samples=num_samples, reference_rows=reference_rows, map_weights=weights
        )
        with torch.enable_grad(), guiding, unet_stage("guidance"):
            x_in = (torch.cat([x, x]) if duplicate else x).to(unet.dtype)
            eps = unet(x_in, t, encoder_hidden_states=embeds).sample
            extra = combined_loss(terms, GuidanceStep(x, eps, t, context))
            loss = maps.loss if extra is None else maps.loss + extra
        with timed_backward(unet, x.device):
            (grad,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, x)
        if scale != 1.0:
            grad = grad / scale
        if loss_scale is None or loss_scale.accept(grad, loss, attempt):
            break
    if eps_out is not None:  # the guidance forward's noise prediction, for a fused DDIM step
        eps_out.append(eps.detach().float())
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
