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
              one latent both branches denoise (``guided_branch="joint"``). It also draws the VAE
              posterior's noise once for every image (``vae_posterior="shared"``), so that an edit
              depends on the image only.
``local``     ``joint`` with DiffEdit's mask (``teacher/local_blend.py``): the structure loss counts
              outside the mask, and the edit keeps the reference pass's latents there.
``official_fast``, ``joint_fast`` ``official``, ``joint`` at half the UNet work per pair
              (``fast_variant``): guidance on every second step, one UNet call per guided step,
              reference maps from the inversion.

A world may register presets of its own (the ``p2pz.presets`` entry point: the shapes world's
presets, ``p2pz.data.shapes.presets``); ``available_presets`` lists them all. The table with each
preset's sources, and where they depart from the references: docs/teacher.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from p2pz.teacher.guidance_terms import TermSpec, spec_to_dict
from p2pz.teacher.local_blend import LocalEdit
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
    # the cost of the guided pass (teacher/editing.py; neither reference has them): the share of the
    # steps, from the first, that take the guidance step (1 = all, as the paper) ...
    guided_share: float = 1.0
    # ... of which every ``guided_stride``-th, counted back from the last step (1 = each)
    guided_stride: int = 1
    # ... and whether a guided step's DDIM step reuses its guidance forward's noise prediction (made
    # at the latent before the gradient step) instead of a second UNet call at the moved latent
    fused_prediction: bool = False
    # ... and where the reference maps come from, for real images: a reference pass beside the edit
    # pass ("reference_pass", as both references), or the inversion, which already runs the UNet
    # under the caption at the edit's timesteps ("inversion": no reference pass, and no
    # reconstruction; see teacher/editing.py)
    reference_maps: Literal["reference_pass", "inversion"] = "reference_pass"
    # guidance terms (teacher/guidance_terms.py): what changes the guidance step beyond the paper's
    # map loss, e.g. ``local_blend.LocalEdit``; none in the reference presets
    guidance_terms: tuple[TermSpec, ...] = ()
    # with ``negative_prompt_real="empty"``: the caption's share w of the negative prompt's embedding,
    # w * E(caption) + (1 - w) * E("") (0 = the empty prompt; 1 would be the caption): CFG then
    # pushes the edit partly away from its source
    negative_caption_weight: float = 0.0
    # one line for --help and docs/teacher.md (not a setting: left out of ``to_dict``)
    summary: str = dataclasses.field(default="", compare=False, repr=False)

    def xa_guidance(self, synthetic: bool) -> float:
        return self.xa_guidance_synthetic if synthetic else self.xa_guidance_real

    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-serialisable (each guidance term as its name and fields)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "summary"}
        values["guidance_terms"] = [spec_to_dict(spec) for spec in self.guidance_terms]
        return values


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
    summary="the authors' defaults",
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
    summary="what diffusers' pipeline does",
)

# The paper's description of the guidance step (§3.2: the edit pass's maps under c + Δc are pulled
# towards the reference's), with every number of `official`. The official code instead keeps the
# negative-prompt half of the guided pair, whose gradient comes from the *unedited* caption's maps
# when the negative prompt is the caption (real images): that pulls the latent back towards the
# reconstruction, attribute included, and fights attribute edits such as colour changes.
# Its loss is the conditional half of the official one, normalised as the official one (by 2 x heads,
# see teacher/attention.py), so the same xa_guidance is the same step scale.
PAPER = dataclasses.replace(
    OFFICIAL, name="paper", guided_branch="edit",
    summary="official with the guidance step as the paper describes it",
)  # fmt: skip

# The official loss (both branches' maps) with its gradient taken with respect to the shared latent:
# the negative branch's half keeps the structure, the edit branch's half lets an attribute change.
# It draws the VAE posterior's noise once for all images: on the toy model (the world's teacher) a
# noise per seed makes two edits of the same scene disagree, noise no student can learn from the
# image; the posterior's mean instead is not what the model was trained on
# (docs/results/toy-teacher-settings.md).
JOINT = dataclasses.replace(
    OFFICIAL, name="joint", guided_branch="joint", vae_posterior="shared",
    summary="official with its loss stepping the latent both CFG branches share",
)  # fmt: skip

# ``joint`` with a localisation the model itself gives: DiffEdit's mask of where the noise
# predictions under the caption and under caption + Δc differ (``teacher/local_blend.py``). The
# structure loss counts outside the mask only, so the maps inside may change with the edit, and
# after every step the edit keeps the reference pass's latents outside it. No oracle, no
# assumption on the background. Figures: docs/results/local.md.
LOCAL = dataclasses.replace(
    JOINT, name="local", guidance_terms=(LocalEdit(),),
    summary="joint with DiffEdit's mask: the edit happens inside it, the input is kept outside",
)  # fmt: skip


def fast_variant(
    preset: Preset, guided_share: float = 1.0, guided_stride: int = 2, guided_branch: str | None = None
) -> Preset:
    """``preset`` at about half its UNet work per pair (#38; docs/results/cheap-teacher.md): guidance
    on every ``guided_stride``-th of the first ``guided_share`` of the steps, a fused prediction (the
    DDIM step reuses the guidance forward's noise prediction), and the reference maps from the
    inversion (no reference pass, so no reconstruction). ``guided_branch="edit"`` (the guidance
    forward and its backward over the edit branch only) halves a guided step's work instead of the
    stride: with stride 1 every step is guided at the same count. Named ``<preset>_fast``."""
    which = f"the first {guided_share:g} of the steps" if guided_share < 1 else "every step"
    if guided_stride > 1:
        nth = {2: "second", 3: "third"}.get(guided_stride, f"{guided_stride}th")
        which = f"every {nth} of {which.replace('every step', 'the steps')}"
    branch = guided_branch or preset.guided_branch
    by = ", by the edit branch's maps only" if branch == "edit" and preset.guided_branch != "edit" else ""
    return dataclasses.replace(
        preset, name=f"{preset.name}_fast", guided_share=guided_share, guided_stride=guided_stride,
        guided_branch=branch, fused_prediction=True, reference_maps="inversion",
        summary=f"{preset.name} at half the UNet work: guidance on {which}{by}, its noise prediction "
        "reused, reference maps from the inversion",
    )  # fmt: skip


# ``official`` at half its forward-equivalents per pair (the counts: docs/results/cheap-teacher.md).
# Its quality on photographs is not measured here (no weights offline); on the shapes world: same page.
OFFICIAL_FAST = fast_variant(OFFICIAL)
JOINT_FAST = fast_variant(JOINT)  # the demo's teacher's (docs/results/cheap-teacher.md)

PRESETS: dict[str, Preset] = {
    p.name: p for p in (OFFICIAL, DIFFUSERS, PAPER, JOINT, LOCAL, OFFICIAL_FAST, JOINT_FAST)
}
PLUGIN_GROUP = "p2pz.presets"  # entry points naming a sequence of a world's presets
_plugins_loaded = False


def register_presets(presets: Sequence[Preset]) -> None:
    """Make a world's presets known by name (``get_preset``, ``--preset``)."""
    for preset in presets:
        known = PRESETS.get(preset.name)
        if known is not None and known != preset:
            raise ValueError(f"preset {preset.name!r} is already defined differently")
        PRESETS[preset.name] = preset


def available_presets() -> dict[str, Preset]:
    """The teacher's presets and every installed world's (the ``p2pz.presets`` entry points)."""
    _load_plugins()
    return dict(PRESETS)


def describe_presets() -> str:
    """``name: summary`` of every preset, for ``--preset``'s help (one definition: ``Preset.summary``)."""
    return "; ".join(f"{p.name}: {p.summary}" for p in available_presets().values())


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import distributions

    # every distribution's entries, not the first of each name's (what ``entry_points()`` reads): a
    # stale ``*.egg-info`` left in a source tree on ``sys.path`` must not hide the installed ones
    entries = {}
    for dist in distributions():
        entries.update({(e.name, e.value): e for e in dist.entry_points.select(group=PLUGIN_GROUP)})
    for entry in entries.values():
        register_presets(entry.load())


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        _load_plugins()
    try:
        return PRESETS[preset]
    except KeyError:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None


def add_preset_argument(parser: argparse.ArgumentParser, default: str | None, default_text: str) -> None:
    """``--preset``, the one definition every command uses: its choices are every available preset,
    its help their summaries (``describe_presets``); ``default_text`` says what the default is."""
    presets = available_presets()
    parser.add_argument(
        "--preset",
        default=default,
        choices=list(presets),  # rejected before anything is written
        metavar="PRESET",
        help=f"the teacher's settings (default: {default_text}): {describe_presets()}".replace("%", "%%"),
    )
