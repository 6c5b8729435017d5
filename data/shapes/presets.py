"""The shapes world's teacher presets: ``joint`` with box guidance (``data/shapes/box_guidance.py``).

Registered with the teacher through the ``p2pz.presets`` entry point (``pyproject.toml``), so
``--preset box_edges`` and ``Pix2PixZero.from_pretrained(..., preset="box_edges")`` find them; the
teacher's code names none of them. Box guidance suits the world's plain, gradient and striped
backgrounds, not photographs (the teacher's ``local`` preset asks the model instead).

``box``        ``joint`` with box guidance, and an empty negative prompt;
``box_pixels`` ``box`` with the box term also in pixel space, on the predicted x0 decoded by the VAE;
``box_edges``  ``box_pixels`` with its pixel term 24x stronger in the late steps and half the caption
               in the negative prompt: the toy model's teacher (``teacher_settings.TOY_PRESET``);
``box_edges_fast`` ``box_edges`` at half the UNet work per pair (``teacher.presets.fast_variant``),
               with its own box weights and negative prompt.

Figures: docs/results/box-guidance.md, docs/results/toy-ablation.md, docs/results/cheap-teacher.md.
"""

from __future__ import annotations

import dataclasses

from p2pz.data.shapes.box_guidance import BoxTerm
from p2pz.teacher.presets import JOINT, fast_variant

# Weight 0.2 of the map loss: stronger weights cost shape edits their success or repaint the
# background. The negative prompt is empty, not the caption: classifier-free guidance against the
# *source* caption extrapolates the edit away from the source, which on the toy model draws
# triangles with concave sides (away from "circle") and turns blue -> yellow orange.
BOX = dataclasses.replace(
    JOINT, name="box", guidance_terms=(BoxTerm(weight=0.2),), negative_prompt_real="empty",
    summary="joint that also keeps the edited object in the input object's box (shapes world)",
)  # fmt: skip

# The box term also in pixel space, below the latent's resolution, at weight 0.05 (0.1 and 0.2 cost
# circle -> triangle its success).
BOX_PIXELS = dataclasses.replace(
    BOX, name="box_pixels", guidance_terms=(BoxTerm(weight=0.2, pixel_weight=0.05),),
    summary="box with its box term also on the decoded image (shapes world)",
)  # fmt: skip

# The shape edits' misses with ``box_pixels`` were areas, not places: the inverted latent keeps some
# of the source's mass. With the empty negative prompt the triangles' sides bulge; with the caption
# they come out concave and blue -> yellow turns orange; halfway they come out straighter. The
# latent term's late pull turned yellow objects on white orange, the pixel term's alone does not.
BOX_EDGES = dataclasses.replace(
    BOX_PIXELS, name="box_edges",
    guidance_terms=(BoxTerm(weight=0.2, pixel_weight=0.05, late_factor=24.0, late_terms="pixel"),),
    negative_caption_weight=0.5,
    summary="box_pixels with its pixel term stronger late and half the caption in the negative prompt "
    "(the toy model's)",
)  # fmt: skip

# ``box_edges`` at half its UNet work per pair (``teacher.presets.fast_variant``). Guiding every
# second step (``official_fast``'s stride) lost the late steps' pull on the edges on two shape edits;
# the edit branch's maps alone guide every step at the same count (the loss's negative half and its
# half of the backward dropped). Without that half the map loss is about half ``joint``'s, so the box
# terms keep their share of the loss at half the weights; and the edit branch's guidance bulges the
# triangles' sides less with more of the caption in the negative prompt (0.65). Both together brought
# circle -> triangle above the IoU target (docs/results/cheap-teacher.md).
_EDGES_FAST = fast_variant(BOX_EDGES, guided_stride=1, guided_branch="edit")
BOX_EDGES_FAST = dataclasses.replace(
    _EDGES_FAST,
    guidance_terms=tuple(
        dataclasses.replace(term, weight=term.weight / 2, pixel_weight=term.pixel_weight / 2)
        for term in BOX_EDGES.guidance_terms
    ),
    negative_caption_weight=0.65,
    summary=f"{_EDGES_FAST.summary}; box terms at half weight, 0.65 of the caption in the negative prompt",
)

PRESETS = (BOX, BOX_PIXELS, BOX_EDGES, BOX_EDGES_FAST)  # the entry point's value
