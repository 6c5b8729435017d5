"""Box guidance: keep an edited object in the input object's box (the shapes world's guidance term).

The cross-attention loss (``teacher/attention.py``) holds every map pixel where the reference
has it. Inside the object that also holds the *source* shape, so a shape edit either never happens
(strong steps) or happens around the old shape's centroid (weak steps). Box guidance, a guidance
term (``teacher/guidance_terms.py``) of the world's presets (``data/shapes/presets.py``), changes
the loss in two ways:

1. **the map loss counts only outside the object's box**, so the maps inside may change with the
   edit; a map cell coarser than the latent counts as inside when any of its latent pixels is;
2. **a box term on the edit's predicted clean latent** x0 (from the CFG-combined noise prediction):
   the row and column maxima of x0's distance from the input's background, normalised by their
   maximum, should be 1 on the box's rows and columns and 0 elsewhere:

       s = sum_c |x0 - bg| / max(...);   L_box = sum_rows (max_w s - r)^2 + sum_cols (max_h s - c)^2

   which pulls the new object out to the box's extent and keeps colour edits in place.

The box and background come from the input's clean latent (``ObjectBox.from_latent``): the
channels' L1 distance from the border's median, above half its maximum. That suits the shapes
world's plain, gradient and striped backgrounds, not photographs.

A latent pixel spans several image pixels (4 on the toy model, 8 on SD), so the latent box cannot
see an object that overshoots its box by less than that. With ``BoxTerm.pixel_weight > 0`` the
same term also runs in pixel space: on x0 decoded by the VAE, against the box read the same way from
the decoded input (``ObjectBox.from_image``). It costs a VAE decode and its backward pass per step.

With ``BoxTerm.late_factor > 1`` the terms weigh that much more in the late steps (``LATE_SHARE``),
where the object's edges form; with ``BoxTerm.late_terms = "pixel"`` only the pixel term does (the
latent term's late pull turned yellow objects on white orange: ``presets.BOX_EDGES``).

The method in prose: docs/teacher.md; every weight and factor's measurements on the toy model:
docs/results/box-guidance.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from p2pz.teacher.guidance_terms import GuidanceContext, GuidanceStep, GuidanceTerm, OutsideWeights

if TYPE_CHECKING:  # imported where used: the presets (and ``p2pz --help``) stay free of torch
    import torch

# the late steps, where ``BoxTerm.late_factor`` applies: timesteps below this share of the
# training schedule (the last 40% of the trajectory, t < 400 on SD's 1000), where edges form
LATE_SHARE = 0.4
LateTerms = Literal["both", "pixel"]  # which box terms the late factor multiplies
BOX_THRESHOLD = 0.5  # a latent pixel is the object's where its distance exceeds this share of the maximum


@dataclass
class ObjectBox:
    """The object's bounding box on the latent grid, per sample, and the background around it."""

    rows: torch.Tensor  # [B, h] float, 1 on the rows the box spans
    cols: torch.Tensor  # [B, w] float, 1 on its columns
    background: torch.Tensor  # [B, C, 1, 1] each channel's median outside the box
    # outside_weights, made on first use (it caches each map size)
    _outside: OutsideWeights | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_latent(cls, latent: torch.Tensor, threshold: float = BOX_THRESHOLD) -> ObjectBox:
        """The box of the object in clean latents ``[B, C, h, w]`` (see the module docstring)."""
        import torch

        latent = latent.detach().float()
        border = torch.cat(
            [latent[..., 0, :], latent[..., -1, :], latent[..., :, 0], latent[..., :, -1]], dim=-1
        )
        distance = (latent - border.median(-1).values[..., None, None]).abs().sum(1)  # [B, h, w]
        distance = distance / distance.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        rows = (distance.amax(2) > threshold).float()
        cols = (distance.amax(1) > threshold).float()
        inside = rows[:, :, None] * cols[:, None, :]
        background = torch.stack([_outside_median(x, box) for x, box in zip(latent, inside)])
        return cls(rows, cols, background[..., None, None])

    @classmethod
    def from_image(cls, image: torch.Tensor, threshold: float = BOX_THRESHOLD) -> ObjectBox:
        """The same reading on images ``[B, 3, H, W]``: the box at pixel resolution."""
        return cls.from_latent(image, threshold)

    @property
    def mask(self) -> torch.Tensor:
        """``[B, h, w]``: 1 inside the box."""
        return self.rows[:, :, None] * self.cols[:, None, :]

    def repeat(self, copies: int) -> ObjectBox:
        """The box of every sample for ``copies`` edits of the batch (edit-major, as the guided pass)."""
        return ObjectBox(
            self.rows.repeat(copies, 1), self.cols.repeat(copies, 1), self.background.repeat(copies, 1, 1, 1)
        )

    def outside_weights(self, map_pixels: int) -> torch.Tensor:
        """``[B, map_pixels]``: 1 on the cells of a cross-attention map outside the box, 0 inside.

        Maps coarser than the latent count a cell as inside when any of its latent pixels is."""
        if self._outside is None:
            self._outside = OutsideWeights(self.mask)
        return self._outside(map_pixels)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """``L_box`` of predicted clean latents ``x0 [B, C, h, w]``, summed over samples."""
        distance = (x0 - self.background.to(x0)).abs().sum(1)
        distance = distance / distance.flatten(1).amax(1).detach().clamp_min(1e-6)[:, None, None]
        rows, cols = self.rows.to(x0), self.cols.to(x0)
        return (distance.amax(2) - rows).pow(2).sum() + (distance.amax(1) - cols).pow(2).sum()


def _outside_median(latent: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Each channel's median over the pixels outside the box (over all pixels if it covers them)."""
    outside = inside == 0
    pixels = latent[:, outside] if outside.any() else latent.flatten(1)
    return pixels.median(-1).values


@dataclass(frozen=True)
class BoxTerm:
    """Box guidance's settings, a preset's ``guidance_terms`` entry: the box term's weight relative to
    the map loss; its weight in pixel space (0: off); the factor on the late steps' weights
    (``LATE_SHARE``), on both terms (``"both"``) or the pixel term alone (``"pixel"``)."""

    term: ClassVar[str] = "box"
    weight: float = 0.2
    pixel_weight: float = 0.0
    late_factor: float = 1.0
    late_terms: LateTerms = "both"

    def build(self, context: GuidanceContext) -> BoxGuidance:
        """The inputs' boxes, read from their clean latents (and, with a pixel weight, decoded)."""
        import torch

        boxes = ObjectBox.from_latent(context.clean_latents).repeat(context.copies)
        pixel_box = None
        if self.pixel_weight > 0:
            if context.decode is None:
                raise ValueError("box guidance in pixel space needs a decoder (latents -> images)")
            with torch.no_grad():
                pixel_box = ObjectBox.from_image(context.decode(context.clean_latents).float())
            pixel_box = pixel_box.repeat(context.copies)
        return BoxGuidance(self, boxes, pixel_box, context.decode, len(context.alphas_cumprod))


class BoxGuidance(GuidanceTerm):
    """Box guidance for one edit call: the map loss outside each sample's box, plus the box term on
    the step's predicted x0 (and, with ``pixel_box``, on x0 decoded by ``decode``)."""

    def __init__(
        self,
        spec: BoxTerm,
        box: ObjectBox,
        pixel_box: ObjectBox | None = None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        train_steps: int = 1000,
    ) -> None:
        self.spec, self.box, self.pixel_box, self.decode = spec, box, pixel_box, decode
        self.train_steps = train_steps  # the schedule's training timesteps, for ``LATE_SHARE``

    def map_weights(self, map_pixels: int) -> torch.Tensor:
        return self.box.outside_weights(map_pixels)

    def loss(self, step: GuidanceStep) -> torch.Tensor:
        """The weighted box term of the step's predicted clean latents."""
        spec, x0 = self.spec, step.x0
        late = int(step.t) < LATE_SHARE * self.train_steps
        factor = spec.late_factor if late else 1.0
        loss = (factor if spec.late_terms == "both" else 1.0) * spec.weight * self.box.loss(x0)
        if self.pixel_box is not None:  # set only with a pixel weight (BoxTerm.build)
            loss = loss + factor * spec.pixel_weight * self.pixel_box.loss(self.decode(x0).float())
        return loss
