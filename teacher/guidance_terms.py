"""Guidance terms: what may be added to the cross-attention guidance step, and nothing of the method.

The paper's guidance step (``teacher/editing.py``) moves the edit's latent down the gradient of the
cross-attention loss, the maps under c + Δc against the reference's. A **guidance term** changes
that step, once per denoising step, in up to three ways (Prompt-to-Prompt's ``LocalBlend``, called
from its ``step_callback``, and diffusers' one-file-per-method ``guiders/`` have the same shape):

* ``map_weights(map_pixels)``: which cells of a cross-attention map the loss counts (``[samples,
  map_pixels]``; 1 everywhere when no term says otherwise);
* ``loss(step)``: an extra loss on the step's predicted clean latent x0 (``GuidanceStep``),
  added to the map loss before the gradient is taken;
* ``after_step(x_edit, x_reference, t)``: the edit's latent after its DDIM step, e.g. blended with
  the reference pass's outside a mask.

A preset lists its terms as frozen specs (``TermSpec``: a name and numbers, hashable and
JSON-serialisable); ``TermSpec.build(context)`` makes the term for one edit call, from what the
teacher knows then (``GuidanceContext``). The teacher's presets use none (the paper's method) or
``local`` (``teacher/local_blend.py``); a world may bring its own (the shapes world's,
``p2pz.data.shapes.box_guidance``). Terms run with guided edits only (``xa_guidance > 0``): the
unguided edits stay the paper's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:  # torch is imported where it is used: presets (and ``p2pz --help``) stay free of it
    import torch


@dataclass
class GuidanceContext:
    """What a term may read when it is built, once per edit call (E edits of B inputs).

    ``clean_latents``: the inputs' clean latents ``[B, 4, h, w]`` (real images: their encoding;
    synthetic ones: the reference pass's result); ``cond``/``uncond``: the caption's and the negative
    prompt's embeddings ``[B, 77, D]``; ``edit_cond``: caption + direction ``[E * B, 77, D]``;
    ``unet``: the model (for terms that ask it something, e.g. a mask); ``decode``: latents ->
    images in [-1, 1], differentiable; ``alphas_cumprod``: the schedule's, on the latents' device.
    """

    clean_latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    edit_cond: torch.Tensor
    copies: int  # E: edits sharing these inputs, edit-major in every guided tensor
    guidance_scale: float
    alphas_cumprod: torch.Tensor
    unet: Any
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None


class GuidanceStep:
    """One guidance step's values, as a term's ``loss`` sees them. ``x``: the guided latents
    ``[S, 4, h, w]`` (S = E * B samples, the gradient's variable); ``eps``: the guidance forward's
    noise prediction, ``[2S, ...]`` with both CFG branches ([negative, edit]) or ``[S, ...]``."""

    def __init__(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, context: GuidanceContext) -> None:
        self.x, self.eps, self.t, self.context = x, eps, t, context

    @functools.cached_property
    def x0(self) -> torch.Tensor:
        """The predicted clean latents of the CFG-combined noise prediction (differentiable); of the
        edit branch's alone when the guidance forward ran that branch only (``guided_branch="edit"``)."""
        eps = self.eps.float()
        if eps.shape[0] == 2 * self.x.shape[0]:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + self.context.guidance_scale * (eps_cond - eps_uncond)
        alpha = self.context.alphas_cumprod[int(self.t)].to(self.x)
        return (self.x - (1 - alpha).sqrt() * eps) / alpha.sqrt()


class GuidanceTerm:
    """A term built for one edit call; each method's default leaves the paper's step unchanged."""

    # whether ``after_step`` reads the reference pass's latents (a preset taking its reference maps
    # from the inversion runs no reference pass)
    uses_reference_latents: bool = False

    def map_weights(self, map_pixels: int) -> torch.Tensor | None:
        """``[S, map_pixels]`` weights of a map's cells in the loss, or None (all count)."""
        return None

    def loss(self, step: GuidanceStep) -> torch.Tensor | None:
        """A loss added to the map loss at this step, or None."""
        return None

    def after_step(self, x_edit: torch.Tensor, x_reference: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The edit's latents ``[S, ...]`` after the DDIM step to the timestep below ``t``, given the
        reference pass's ``[B, ...]`` at the same timestep."""
        return x_edit


class TermSpec(Protocol):
    """A preset's entry for a term: a frozen dataclass whose ``build`` makes the term."""

    term: ClassVar[str]  # the term's name in settings and logs

    def build(self, context: GuidanceContext) -> GuidanceTerm: ...


def spec_to_dict(spec: TermSpec) -> dict[str, Any]:
    """A term's settings, JSON-serialisable: its name and fields."""
    return {"term": spec.term, **dataclasses.asdict(spec)}  # type: ignore[call-overload]


def combined_map_weights(terms: Sequence[GuidanceTerm]) -> Callable[[int], torch.Tensor] | None:
    """The product of every term's map weights (``CrossAttentionMaps.guiding``), or None."""

    def weights(map_pixels: int) -> torch.Tensor | None:
        result = None
        for term in terms:
            w = term.map_weights(map_pixels)
            if w is not None:
                result = w if result is None else result * w
        return result

    return weights if terms else None


def combined_loss(terms: Sequence[GuidanceTerm], step: GuidanceStep) -> torch.Tensor | None:
    losses = [loss for term in terms if (loss := term.loss(step)) is not None]
    return sum(losses[1:], losses[0]) if losses else None


class OutsideWeights:
    """Map weights of a mask ``[S, h, w]`` of the latent grid: ``[S, map_pixels]``, 1 outside it and
    0 inside, per map size (cached: every step asks for the same few sizes)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self._by_size: dict[int, torch.Tensor] = {}

    def __call__(self, map_pixels: int) -> torch.Tensor:
        if map_pixels not in self._by_size:
            self._by_size[map_pixels] = 1.0 - mask_on_map(self.mask, map_pixels)
        return self._by_size[map_pixels]


def mask_on_map(mask: torch.Tensor, map_pixels: int) -> torch.Tensor:
    """``[S, map_pixels]``: a mask ``[S, h, w]`` of the latent grid at a map's (square-grid) size.

    A map cell coarser than the latent takes its latent pixels' maximum (it is inside when any of
    them is); a finer one takes its latent pixel's value."""
    import torch.nn.functional as F

    mask = mask[:, None].float()
    h, w = mask.shape[-2:]
    factor = (h * w / map_pixels) ** 0.5
    size = (round(h / factor), round(w / factor))
    if size[0] * size[1] != map_pixels:
        raise ValueError(f"a {map_pixels}-pixel map does not tile the {h}x{w} latent")
    if factor > 1:
        return F.adaptive_max_pool2d(mask, size).flatten(1)
    return F.interpolate(mask, size=size, mode="nearest").flatten(1)
