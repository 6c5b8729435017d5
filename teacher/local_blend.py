"""``local``: where the edit happens, from the model alone (DiffEdit's mask), and nothing else moves.

The cross-attention loss holds every map cell where the reference has it, inside the edited object
too, which fights shape edits; and nothing in the method keeps the background exactly. DiffEdit
(Couairon et al., 2022, §3.1) reads where an edit acts from the model itself: noise the input's
clean latent to the middle of the schedule and compare the noise predictions under the source and
the target text. Here the target is the edit's own embedding, caption + Δc, so the mask needs no
words and no oracle:

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) n,   t = strength * T,   n ~ N(0, I), ``noise_draws`` draws
    d = mean over draws and channels of |eps(x_t, c + Δc) - eps(x_t, c)|          [h, w] per sample
    m = 1 where min(d, clamp_ratio * mean(d)) / (clamp_ratio * mean(d)) > threshold, else 0

(classifier-free guidance would scale d by the guidance scale and change nothing after the
normalisation, so the mask runs each text once per draw). The numbers are diffusers'
``StableDiffusionDiffEditPipeline.generate_mask`` defaults (10 draws, strength 0.5, clamp at 3x the
mean, threshold 0.5); the mean is each sample's, so a batch gives what single runs give.

With the mask, the guidance step changes in two ways (``LocalBlend``):

* the map loss counts only the cells outside the mask (a map cell coarser than the latent is
  inside when any of its latent pixels is), so the maps inside may change with the edit;
* after every DDIM step the edit keeps the reference pass's latents outside the mask (as
  Prompt-to-Prompt's local blend and DiffEdit's decoding do): the result there is the
  reconstruction.

The mask costs ``noise_draws`` UNet evaluations of ``B + E * B`` rows per call (stage ``mask``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from p2pz.teacher.guidance_terms import GuidanceContext, GuidanceTerm, OutsideWeights

if TYPE_CHECKING:  # imported where used: the presets (and ``p2pz --help``) stay free of torch
    import torch


@dataclass(frozen=True)
class LocalEdit:
    """The ``local`` term's settings (a preset's ``guidance_terms`` entry)."""

    term: ClassVar[str] = "local"
    noise_draws: int = 10  # noised copies of the input averaged into the mask
    strength: float = 0.5  # the timestep they are noised to, as a share of the training schedule
    clamp_ratio: float = 3.0  # differences above this multiple of their mean count as the maximum
    threshold: float = 0.5  # the normalised difference above which a latent pixel is the edit's
    blend: bool = True  # keep the reference pass's latents outside the mask after every step
    seed: int = 0  # the noise draws' (the same for every sample)

    def build(self, context: GuidanceContext) -> LocalBlend:
        mask = diffedit_mask(context, self)
        return LocalBlend(mask, blend=self.blend)


def diffedit_mask(context: GuidanceContext, spec: LocalEdit) -> torch.Tensor:
    """``[E * B, h, w]`` float masks, 1 where edit ``e`` acts on input ``b`` (edit-major rows)."""
    import torch

    from p2pz.teacher.evals import unet_stage

    unet, x0 = context.unet, context.clean_latents.float()
    batch, copies = x0.shape[0], context.copies
    train_steps = len(context.alphas_cumprod)
    t = min(max(int(spec.strength * train_steps), 1), train_steps - 1)
    alpha = context.alphas_cumprod[t].to(x0)
    generator = torch.Generator().manual_seed(spec.seed)
    embeds = torch.cat([context.cond, context.edit_cond])  # rows: B captions, then E * B edits
    difference = torch.zeros(copies * batch, *x0.shape[2:], device=x0.device)
    for _ in range(spec.noise_draws):
        noise = torch.randn((1, *x0.shape[1:]), generator=generator).to(x0).expand_as(x0)
        x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        with torch.no_grad(), unet_stage("mask"):
            x_in = x_t.repeat(1 + copies, 1, 1, 1).to(unet.dtype)
            eps = unet(x_in, t, encoder_hidden_states=embeds.to(unet.dtype)).sample.float()
        eps_caption, eps_edit = eps[:batch], eps[batch:]
        difference += (eps_edit - eps_caption.repeat(copies, 1, 1, 1)).abs().mean(1)
    difference /= spec.noise_draws
    clamp = spec.clamp_ratio * difference.flatten(1).mean(1).clamp_min(1e-12)[:, None, None]
    return (difference.minimum(clamp) / clamp > spec.threshold).float()


class LocalBlend(GuidanceTerm):
    """The map loss outside the mask; the reference pass's latents outside it after every step."""

    def __init__(self, mask: torch.Tensor, blend: bool = True) -> None:
        self.mask = mask  # [S, h, w], 1 inside
        self.blend = blend
        self.uses_reference_latents = blend
        self._outside = OutsideWeights(mask)

    def map_weights(self, map_pixels: int) -> torch.Tensor:
        return self._outside(map_pixels)

    def after_step(self, x_edit: torch.Tensor, x_reference: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.blend:
            return x_edit
        inside = self.mask[:, None].to(x_edit)
        copies = x_edit.shape[0] // x_reference.shape[0]
        return inside * x_edit + (1 - inside) * x_reference.repeat(copies, 1, 1, 1)
