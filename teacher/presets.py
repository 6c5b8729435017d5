"""Presets: every number of the method in one place, with where it comes from.

``official``  the defaults of the authors' repository (pix2pixzero/pix2pix-zero, ``src/inversion.py``,
              ``src/edit_real.py``, ``src/edit_synthetic.py``, ``src/utils/ddim_inv.py``,
              ``src/utils/scheduler.py``), with its latest fix (commit ec33392: roll shifts from
              ``randrange(1, H//2)``) and everything seeded.
``diffusers`` what diffusers' ``StableDiffusionPix2PixZeroPipeline`` (``invert`` + ``__call__``)
              computes, random-number draws included, for one image; used with the docs' real-image
              recipe (negative prompt = caption). For batches we keep every sample independent
              (the pipeline itself edits only row 1 of a batch).
``paper``     ``official`` with the guidance step as the paper describes it: the gradient of the
              edit branch's cross-attention loss moves the latent (see ``guided_branch``).
``joint``     ``official`` with its loss over both CFG branches differentiated with respect to the
              one latent both branches denoise (``guided_branch="joint"``); the shapes world's
              teacher, where it keeps colour edits in place without cancelling them. It also draws
              the VAE posterior's noise once for every image (``vae_posterior="shared"``), so that
              an edit depends on the image only.
``box``       ``joint`` with box guidance (``teacher/box_guidance.py``): the map loss counts only
              outside the input object's box, and a box term on the predicted clean latent keeps the
              edited object in that box, and an empty negative prompt (CFG against the caption
              pushes the edit away from the source). The shapes world's teacher; its box suits
              plain backgrounds.
``box_pixels`` ``box`` with the box term also in pixel space, on the predicted x0 decoded by the VAE
              (finer than the latent's grid; a VAE decode and its backward pass per step).
``box_late``  ``box_pixels`` with both box terms 12x stronger in the last 40% of the timesteps, where
              the object's edges form (experimental: see ``BOX_LATE``).

The table with each preset's sources, and where they depart from the references: docs/teacher.md.
``box_edges`` ``box_pixels`` with the pixel term alone 24x stronger in those steps, and half the
              caption in the negative prompt (see ``BOX_EDGES``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from p2pz.utils.errors import UserError

BLIP_BASE = "Salesforce/blip-image-captioning-base"


@dataclass(frozen=True)
class Preset:
    name: str
    # sampling
    num_steps: int  # DDIM steps of inversion and editing
    guidance_scale: float  # classifier-free guidance of the reference and edit passes
    xa_guidance_real: float  # cross-attention guidance step size, real images
    xa_guidance_synthetic: float  # ... synthetic images (seed + prompt)
    negative_prompt_real: Literal["caption", "empty"]  # negative prompt of real-image edits
    # which maps drive the guidance step (see teacher/editing.py): "negative" = the official code's
    # kept half, whose gradient comes from the negative-prompt branch; "edit" = the paper's text,
    # the maps under c + Δc, stepping the one latent both branches share; "joint" = the official
    # loss over both branches, its gradient stepping that shared latent
    guided_branch: Literal["negative", "edit", "joint"]
    # inversion
    inversion: Literal["official", "diffusers"]  # timesteps and inverse DDIM step (see inversion.py)
    inversion_guidance_scale: float  # CFG during inversion (1 = none)
    lambda_ac: float  # auto-correlation regulariser step size
    lambda_kl: float  # KL regulariser step size
    num_reg_steps: int  # regularisation iterations per inversion step
    num_ac_rolls: int  # auto-correlation gradient steps per iteration
    min_roll: int  # smallest roll shift drawn: 1 (official since ec33392) or 0 (diffusers)
    # encoding: the VAE posterior's noise drawn from each image's seed ("sample", both reference
    # implementations) or one draw shared by every image ("shared": the edit is then a function of
    # the image alone, which a student can learn). SD's VAE has a near-zero posterior variance, so
    # the two agree there; the toy model's wide posterior makes an edit depend on its seed
    vae_posterior: Literal["sample", "shared"]
    # captioning
    captioner: str  # BLIP model used when no captioner folder comes with the weights
    captioner_style: Literal["official", "diffusers"]  # prompt handling, see teacher/captioning.py
    # box guidance (teacher/box_guidance.py): the box term's weight relative to the map loss, 0 = off
    # (neither reference implementation has it)
    box_weight: float = 0.0
    # ... and its weight in pixel space, on x0 decoded by the VAE (0 = off; see box_guidance.py)
    box_pixel_weight: float = 0.0
    # ... multiplied by this in the edit's late steps (timesteps below ``box_guidance.LATE_SHARE`` of
    # the schedule), where an object's edges form (1 = the same weight throughout)
    box_late_factor: float = 1.0
    # ... on both terms ("both") or on the pixel-space term alone ("pixel")
    box_late_terms: Literal["both", "pixel"] = "both"
    # with ``negative_prompt_real="empty"``: the caption's share w of the negative prompt's embedding,
    # w * E(caption) + (1 - w) * E("") (0 = the empty prompt; 1 would be the caption): CFG then
    # pushes the edit partly away from its source
    negative_caption_weight: float = 0.0

    def xa_guidance(self, synthetic: bool) -> float:
        return self.xa_guidance_synthetic if synthetic else self.xa_guidance_real

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OFFICIAL = Preset(
    name="official",
    num_steps=50,  # --num_ddim_steps 50 (inversion.py, edit_real.py, edit_synthetic.py)
    guidance_scale=5.0,  # --negative_guidance_scale 5.0 (edit_real.py, edit_synthetic.py)
    xa_guidance_real=0.1,  # --xa_guidance 0.1 (edit_real.py)
    xa_guidance_synthetic=0.15,  # --xa_guidance 0.15 (edit_synthetic.py)
    negative_prompt_real="caption",  # edit_real.py: negative_prompt=prompt_str
    guided_branch="negative",  # edit_pipeline.py: latents = x_in.detach().chunk(2)[0]
    inversion="official",  # ddim_inv.py: timesteps.flip(0)[1:-1], scheduler.py: step(reverse=True)
    inversion_guidance_scale=1.0,  # inversion.py: pipe(..., guidance_scale=1)
    lambda_ac=20.0,  # ddim_inv.py: lambda_ac=20.0
    lambda_kl=20.0,  # ddim_inv.py: lambda_kl=20.0
    num_reg_steps=5,  # ddim_inv.py: num_reg_steps=5
    num_ac_rolls=5,  # ddim_inv.py: num_ac_rolls=5
    min_roll=1,  # ddim_inv.py after ec33392: randrange(1, H//2)
    vae_posterior="sample",  # ddim_inv.py: vae.encode(x0).latent_dist.sample()
    captioner=BLIP_BASE,  # inversion.py uses LAVIS blip_caption/base_coco; the HF port of BLIP base
    captioner_style="official",  # beam 3, 10-30 tokens, "a picture of " prefix removed
)

DIFFUSERS = Preset(
    name="diffusers",
    num_steps=50,  # invert(num_inference_steps=50), __call__(num_inference_steps=50)
    guidance_scale=7.5,  # __call__(guidance_scale=7.5)
    xa_guidance_real=0.1,  # __call__(cross_attention_guidance_amount=0.1)
    xa_guidance_synthetic=0.1,  # the same argument
    negative_prompt_real="caption",  # the docs' real-image example passes negative_prompt=caption
    guided_branch="negative",  # __call__: latents = latent_model_input.detach().chunk(2)[0]
    inversion="diffusers",  # DDIMInverseScheduler (v0.19+ semantics) over all timesteps
    inversion_guidance_scale=1.0,  # invert(guidance_scale=1)
    lambda_ac=20.0,  # invert(lambda_auto_corr=20.0)
    lambda_kl=20.0,  # invert(lambda_kl=20.0)
    num_reg_steps=5,  # invert(num_reg_steps=5)
    num_ac_rolls=5,  # invert(num_auto_corr_rolls=5)
    min_roll=0,  # auto_corr_loss: torch.randint(H // 2) (a zero shift is possible)
    vae_posterior="sample",  # prepare_image_latents: latent_dist.sample(generator)
    captioner=BLIP_BASE,  # the docs' caption_generator
    captioner_style="diffusers",  # generate_caption: prefix "a photography of" kept, greedy, 128 tokens
)

# The paper's description of the guidance step (§3.2: the edit pass's maps under c + Δc are pulled
# towards the reference's), with every number of `official`. The official code instead keeps the
# negative-prompt half of the guided pair, whose gradient comes from the *unedited* caption's maps
# when the negative prompt is the caption (real images): that pulls the latent back towards the
# reconstruction, attribute included, and fights attribute edits such as colour changes.
# Its loss is the conditional half of the official one, normalised as the official one (by 2 x heads,
# see teacher/attention.py), so the same xa_guidance is the same step scale.
PAPER = dataclasses.replace(OFFICIAL, name="paper", guided_branch="edit")

# The official loss (both branches' maps) with its gradient taken with respect to the shared latent:
# the negative branch's half keeps the structure, the edit branch's half lets an attribute change.
# It draws the VAE posterior's noise once for all images: on the toy model (the world's teacher) a
# noise per seed makes two edits of the same scene disagree, noise no student can learn from the
# image; the posterior's mean instead is not what the model was trained on
# (docs/results/toy-teacher-settings.md).
JOINT = dataclasses.replace(OFFICIAL, name="joint", guided_branch="joint", vae_posterior="shared")

# ``joint`` with box guidance (teacher/box_guidance.py), weight 0.2 of the map loss: stronger weights
# cost shape edits their success or repaint the background. Its negative prompt is empty, not the
# caption: classifier-free guidance against the *source* caption extrapolates the edit away from the
# source, which on the toy model draws triangles with concave sides (away from "circle") and turns
# blue -> yellow orange. Figures: docs/results/box-guidance.md.
BOX = dataclasses.replace(JOINT, name="box", box_weight=0.2, negative_prompt_real="empty")

# ``box`` with its box term also in pixel space, below the latent's resolution, at weight 0.05 (0.1
# and 0.2 cost circle -> triangle its success). The toy model's teacher before ``box_edges``.
# Figures: docs/results/box-guidance.md, docs/results/toy-ablation.md.
BOX_PIXELS = dataclasses.replace(BOX, name="box_pixels", box_pixel_weight=0.05)

# ``box_pixels`` with its box terms 12x stronger over the last 40% of the timesteps (t < 400), where
# an object's edges form. It lifts the triangle edits but costs blue -> yellow its success, so the
# factor would have to be calibrated per edit like the step: experimental, not the toy model's preset
# (docs/results/box-guidance.md, with the other schedules tried).
BOX_LATE = dataclasses.replace(BOX_PIXELS, name="box_late", box_late_factor=12.0)

# ``box_pixels`` with its pixel term alone 24x stronger in the late steps, and a negative prompt
# halfway between the empty prompt and the caption. The shape edits' misses were areas, not places:
# the inverted latent keeps some of the source's mass. With the empty negative prompt the triangles'
# sides bulge; with the caption they come out concave and blue -> yellow turns orange; halfway they
# come out straighter. The latent term's late pull turned yellow objects on white orange, the pixel
# term's alone does not. The toy model's teacher (``TOY_PRESET``): docs/results/box-guidance.md,
# docs/results/toy-ablation.md.
BOX_EDGES = dataclasses.replace(
    BOX_PIXELS, name="box_edges", box_late_factor=24.0, box_late_terms="pixel", negative_caption_weight=0.5
)

PRESETS = {p.name: p for p in (OFFICIAL, DIFFUSERS, PAPER, JOINT, BOX, BOX_PIXELS, BOX_LATE, BOX_EDGES)}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
