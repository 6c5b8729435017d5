"""Scorers for pairs as the teacher makes them (``p2pz generate --score``; see ``p2pz.data.pairs.filtering``).

- :class:`WorldPairScorer` (``world``): the shapes world's oracle reads the input (its scene and masks,
  no ground truth needed) and scores the edit with :func:`p2pz.data.eval.world_metrics.score_world_edit`:
  ``success`` (target shown, everything else kept), ``target``, ``kept``, ``others_kept``, ``found``,
  ``iou`` (with the ideal edit's mask), ``iou_input``, ``centre_shift_px``, ``psnr_outside``. An input the
  oracle cannot read (no object with the edit's source word) scores as a failure.
- :class:`PaperPairScorer` (``paper``): the paper's metrics of one pair through the user's CLIP and DINO
  models: ``clip_direction``, the directional CLIP similarity (cosine between the image embeddings'
  change, edit − input, and the text embeddings' change, "a photo of a TARGET" − "… SOURCE");
  ``clip_target_prob``, CLIP's zero-shot probability of the target over the source for the edit, and
  ``clip_acc`` (that probability above 0.5: the paper's CLIP-Acc for one pair); ``structure_dist``,
  the DINO self-similarity distance to the input (lower keeps more structure).

:func:`make_pair_scorer` builds one by name; the models load by Hugging Face id or local folder, and
one that is not to be had stops with one line saying so (before the teacher runs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from p2pz.data.pairs.filtering import SCORER_KINDS, Scores
from p2pz.teacher.edits import Edit
from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    from PIL import Image


WORLD_SCORES = (
    "success",
    "target",
    "kept",
    "others_kept",
    "found",
    "iou",
    "iou_input",
    "centre_shift_px",
    "psnr_outside",
)
PAPER_SCORES = ("clip_direction", "clip_target_prob", "clip_acc", "structure_dist")


class WorldPairScorer:
    """The oracle's scores of shapes-world pairs (see the module docstring)."""

    name = "world"
    names = WORLD_SCORES

    def __call__(
        self, sources: Sequence[Image.Image], edited: Sequence[Image.Image], edit: Edit
    ) -> list[Scores]:
        from p2pz.data.shapes.edits import parse_world_edit

        world_edit = parse_world_edit(f"{edit.source}:{edit.target}")
        return [self._one(source, result, world_edit) for source, result in zip(sources, edited)]

    @staticmethod
    def _one(source: Image.Image, edited: Image.Image, edit: Any) -> Scores:
        from p2pz.data.eval.world_metrics import scene_from_image, score_world_edit

        try:
            scene, masks = scene_from_image(source)
            score = score_world_edit(scene, edited, edit, input_image=source, input_masks=masks)
        except (ValueError, UserError):  # the oracle finds no object, or none with the source word
            return {name: False if name in WORLD_SCORES[:5] else None for name in WORLD_SCORES} | {
                "iou": 0.0,
                "iou_input": 0.0,
            }
        return score.to_dict()


class PaperPairScorer:
    """CLIP directional score, CLIP target probability and DINO structure distance of each pair."""

    name = "paper"
    names = PAPER_SCORES

    def __init__(
        self,
        clip_model: str | os.PathLike,
        dino_model: str | os.PathLike,
        device: Any = "cpu",
        structure_size: int | None = None,
    ):
        from p2pz.data.eval.paper_metrics import STRUCTURE_SIZE, ClipAccuracy, StructureDistance

        self.clip = ClipAccuracy(clip_model, device=device)
        self.structure = StructureDistance(dino_model, device=device, size=structure_size or STRUCTURE_SIZE)
        self.device = device

    def __call__(
        self, sources: Sequence[Image.Image], edited: Sequence[Image.Image], edit: Edit
    ) -> list[Scores]:
        if not sources:
            return []
        direction = self._clip_direction(sources, edited, edit)
        probs = self.clip.probabilities(edited, [edit.source, edit.target])[:, 1]
        structure = self.structure(sources, edited)
        return [
            {
                "clip_direction": float(d),
                "clip_target_prob": float(p),
                "clip_acc": bool(p > 0.5),
                "structure_dist": float(s),
            }
            for d, p, s in zip(direction.tolist(), probs.tolist(), structure)
        ]

    def _clip_direction(self, sources: Sequence[Image.Image], edited: Sequence[Image.Image], edit: Edit):
        """cos(image change, text change) per pair (Gal et al.'s directional CLIP similarity)."""
        import torch
        import torch.nn.functional as F

        model, processor = self.clip.model, self.clip.processor
        with torch.no_grad():
            texts = processor(
                text=[self.clip.prompt.format(word=w) for w in (edit.source, edit.target)],
                return_tensors="pt",
                padding=True,
            ).to(self.device)
            text = _features(model.get_text_features(**texts))
            images = processor(images=[*map(_rgb, sources), *map(_rgb, edited)], return_tensors="pt").to(
                self.device
            )
            image = _features(model.get_image_features(**images))
        n = len(sources)
        image_change = F.normalize(image[n:], dim=-1) - F.normalize(image[:n], dim=-1)
        text_change = F.normalize(text[1], dim=-1) - F.normalize(text[0], dim=-1)
        return F.cosine_similarity(image_change, text_change[None], dim=-1).cpu()


def _features(output: Any) -> Any:
    """Projected embeddings from ``get_*_features`` (a tensor, or an output object in newer transformers)."""
    if hasattr(output, "pooler_output") and not hasattr(output, "shape"):
        return output.pooler_output.float()
    return output.float()


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def make_pair_scorer(
    kind: str,
    *,
    edits: Sequence[Edit] = (),
    clip_model: str | os.PathLike | None = None,
    dino_model: str | os.PathLike | None = None,
    device: Any = "cpu",
) -> WorldPairScorer | PaperPairScorer | None:
    """The scorer named ``kind``: ``world``, ``paper``, ``none`` (None), or ``auto`` (``world`` when every
    edit is a shapes-world edit, else none: the paper's models are loaded only when asked for)."""
    from p2pz.data.eval.paper_metrics import DEFAULT_CLIP, DEFAULT_DINO
    from p2pz.data.shapes.edits import is_world_edit

    if kind == "auto":
        kind = "world" if edits and all(is_world_edit(e.source, e.target) for e in edits) else "none"
    if kind == "none":
        return None
    if kind == "world":
        outside = [e.name for e in edits if not is_world_edit(e.source, e.target)]
        if outside:
            raise UserError(f"--score world scores shapes-world edits only; {outside[0]} is not one")
        return WorldPairScorer()
    if kind == "paper":
        from p2pz.utils.devices import resolve_device

        device = resolve_device(device)
        return PaperPairScorer(clip_model or DEFAULT_CLIP, dino_model or DEFAULT_DINO, device=device)
    raise UserError(f"--score {kind!r} is not one of {', '.join(SCORER_KINDS)}")
