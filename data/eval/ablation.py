"""The paper's ablation on the shapes world: word swap, edit directions, directions + guidance.

Every row edits the same seeded scenes with the same teacher (``teacher.Pix2PixZero``, its preset's
regularised DDIM inversion under the scene's caption, classifier-free guidance with the caption as
the negative prompt) and differs only in what is added to the caption's embedding and in the
cross-attention guidance:

- ``word_swap``: the embedding of the caption with the word swapped minus the caption's own
  ("DDIM + word swap": the edit pass denoises with exactly the swapped caption), no guidance;
- ``direction``: pix2pix-zero's edit direction (mean embedding of target sentences minus that of
  source sentences), no guidance;
- ``direction_xa``: the same direction with cross-attention guidance (the method).

Sentence banks for the toy model are the world's own captions (``world_sentence_banks``): every
caption of the toy distribution that has the source word, and the same captions with the target
word. The built-in templates ("a blurry photo of a circle") are mostly words the toy model never
saw, whose embeddings are untrained.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from p2pz.data.eval.world_metrics import WorldEditScore, aggregate, score_world_edit
from p2pz.data.shapes import world
from p2pz.data.shapes.edits import WorldEdit, word_swap_directions, world_direction
from p2pz.data.shapes.world import Scene

if TYPE_CHECKING:
    from p2pz.teacher.directions import EditDirection
    from p2pz.teacher.pipeline import Pix2PixZero

ROWS = ("word_swap", "direction", "direction_xa")


@dataclass
class RowResult:
    """One row's edits of one edit's scenes: scores, images (optional) and seconds spent."""

    edit: str
    row: str
    scores: list[WorldEditScore] = field(default_factory=list)
    edited: list[Image.Image] = field(default_factory=list)
    reconstruction_shift_px: list[float] = field(default_factory=list)
    # IoU of the reference pass's object with the input's: how well the model redraws the input
    # with no edit at all, a ceiling for the edit's IoU on the same shape
    reconstruction_iou: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        recon = reconstruction_summary(self.reconstruction_shift_px, self.reconstruction_iou)
        return {**aggregate(self.scores), **recon, "seconds": round(self.seconds, 1)}


def reconstruction_summary(shifts: Sequence[float | None], ious: Sequence[float | None]) -> dict:
    """A row's redraw figures: the median centre shift (objects not found, NaN or None, left out)
    and the mean IoU with the input (None when there is none, or when a scene lacks it)."""
    found = [s for s in shifts if s is not None and not math.isnan(s)]
    return {
        "reconstruction_shift_px": float(np.median(found)) if found else None,
        "reconstruction_iou": float(np.mean(ious)) if ious and None not in ious else None,
    }


def edit_world_scenes(
    teacher: Pix2PixZero,
    edit: WorldEdit,
    scenes: Sequence[Scene],
    row: str,
    *,
    num_steps: int | None = None,
    xa_guidance: float | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    direction: EditDirection | None = None,
    sentences: str = "world",
    keep_images: bool = False,
    seed: int = 0,
    done: Callable[[int, WorldEditScore, WorldEditScore | None], None] | None = None,
    skip: Sequence[int] = (),
    progress: Any = None,
) -> RowResult:
    """Edit ``scenes`` with the teacher as ``row`` says and score every edit against its scene.

    ``xa_guidance`` applies to ``direction_xa`` only (None: the preset's value for real images);
    the other rows run without guidance. ``done(index, score, reconstruction_score)`` is called
    after each scene (for resumable runs); scenes whose index is in ``skip`` are not edited. The
    reconstruction (the reference pass) is scored as an edit that changes nothing.
    """
    import time

    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; rows are {', '.join(ROWS)}")
    result = RowResult(edit.name, row)
    if row != "word_swap" and direction is None:
        direction = world_direction(teacher, edit, sentences)
    xa = xa_guidance if row == "direction_xa" else 0.0
    todo = [i for i in range(len(scenes)) if i not in set(skip)]
    for start in range(0, len(todo), batch_size):
        index = todo[start : start + batch_size]
        batch = [scenes[i] for i in index]
        tic = time.perf_counter()
        images = [world.render(s) for s in batch]
        dirs = word_swap_directions(teacher, batch, edit) if row == "word_swap" else [direction]
        outs = teacher.edit(
            images,
            dirs,
            captions=[s.caption for s in batch],
            seeds=[seed + i for i in index],
            num_steps=num_steps,
            xa_guidance=xa,
            guidance_scale=guidance_scale,
        )
        for i, scene, image, out in zip(index, batch, images, outs):
            score = score_world_edit(scene, out.edited, edit, input_image=image)
            recon = None  # a preset with reference maps from the inversion gives no reconstruction
            if out.reconstruction is not None:
                same = WorldEdit(edit.source, edit.source, edit.attribute)
                recon = score_world_edit(scene, out.reconstruction, same)
            result.scores.append(score)
            result.reconstruction_shift_px.append(recon.centre_shift_px if recon else None)
            result.reconstruction_iou.append(recon.iou if recon else None)
            if keep_images:
                result.edited.append(out.edited)
            if done is not None:
                done(i, score, recon)
        result.seconds += time.perf_counter() - tic
        if progress is not None:
            progress.update(len(index))
    return result


def across_edits(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``mean/<row>`` (each metric's mean over edits) and ``worst/<row>`` (the edit with the lowest
    IoU among the row's edits, named in ``edit``) for every row run on more than one edit."""
    by_row: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, metrics in results.items():
        edit, row = name.rsplit("/", 1)
        by_row.setdefault(row, []).append((edit, metrics))
    summary: dict[str, dict[str, Any]] = {}
    for row, entries in by_row.items():
        if len(entries) < 2:
            continue
        keys = [
            k for k, v in entries[0][1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        summary[f"mean/{row}"] = {
            k: float(sum(m[k] for _, m in entries if m.get(k) is not None) / len(entries))
            for k in keys
            if all(m.get(k) is not None for _, m in entries)
        }
        worst_edit, worst = min(entries, key=lambda e: (e[1]["iou"], e[1]["success"]))
        summary[f"worst/{row}"] = {**worst, "edit": worst_edit}
    return summary


# ---------------------------------------------------------------------------------------------
# A resumable record of scored edits (one JSON line per scene)


CALIBRATION = "calibration"  # the log's record of an edit's calibrated guidance step
# Preset fields that only change the guidance step (not the unguided rows' edits): guidance terms
# run with guided edits only (teacher/guidance_terms.py)
GUIDANCE_ONLY_FIELDS = (
    "name",
    "guided_branch",
    "guidance_terms",
    "guided_share",
    "guided_stride",
    "fused_prediction",
    "reference_maps",
)
# Preset fields added after logs were written: left out of the key at these values, which are what
# the older logs ran with, so those logs still resume
LATER_FIELDS: dict[str, object] = {
    "negative_caption_weight": 0.0, "guidance_terms": [], "guided_share": 1.0, "fused_prediction": False,
    "reference_maps": "reference_pass", "guided_stride": 1,
}  # fmt: skip


class ScoreLog:
    """Append-only JSONL of per-scene scores under a settings key, so a killed run resumes.

    Rows without guidance depend neither on ``xa_guidance`` nor on how the guidance step is taken
    (its branch, its guidance terms), so their key leaves those out (``settings["preset"]`` is the
    preset's fields): runs that differ only in the guidance share their word-swap and direction
    scores. The guidance step calibrated for an edit is logged too (``add_calibration``), under the
    guided row's key.
    """

    def __init__(self, path: str | os.PathLike | None, settings: dict):
        self.path = Path(path) if path else None
        self.settings = dict(settings)
        self.records: dict[tuple[str, str], dict[int, dict]] = {}
        self.calibrations: dict[str, dict] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("row") == CALIBRATION and rec.get("settings") == self.key("direction_xa"):
                    self.calibrations[rec["edit"]] = rec["calibration"]
                elif rec.get("row") in ROWS and rec.get("settings") == self.key(rec["row"]):
                    self.records.setdefault((rec["edit"], rec["row"]), {})[rec["index"]] = rec

    def key(self, row: str) -> str:
        settings = dict(self.settings)
        if isinstance(settings.get("preset"), dict):
            settings["preset"] = {
                k: v for k, v in settings["preset"].items() if LATER_FIELDS.get(k, object()) != v
            }
        if row != "direction_xa":
            settings.pop("xa_guidance", None)
            if isinstance(settings.get("preset"), dict):  # presets that differ only in the guided branch
                settings["preset"] = {
                    k: v for k, v in settings["preset"].items() if k not in GUIDANCE_ONLY_FIELDS
                }
        return json.dumps(settings, sort_keys=True)

    def done(self, edit: str, row: str, step: float | None = None) -> dict[int, dict]:
        """The logged scenes of one row; with ``step``, only those guided at that step (a calibrated
        step that changed, e.g. with the rule that picks it, is not the one they ran at). Records
        written before steps were logged count as run at any step."""
        records = self.records.get((edit, row), {})
        if step is None:
            return records
        return {i: r for i, r in records.items() if r.get("xa_guidance", step) == step}

    def calibration(self, edit: str) -> dict | None:
        """The logged calibration of ``edit`` (``Calibration.to_dict()``), if any."""
        return self.calibrations.get(edit)

    def add_calibration(self, edit: str, calibration: dict) -> None:
        """Record the calibration of ``edit`` (``Calibration.to_dict()``) under the guided row's key."""
        self.calibrations[edit] = calibration
        self._append(
            {
                "settings": self.key("direction_xa"),
                "edit": edit,
                "row": CALIBRATION,
                "calibration": calibration,
            }
        )

    def add(
        self,
        edit: str,
        row: str,
        index: int,
        score: WorldEditScore,
        recon: WorldEditScore | None,
        step: float | None = None,
    ) -> None:
        """Record one scene's score and its reconstruction's (logs written before the
        reconstruction's IoU was kept read it as None), and the guidance step it ran at."""
        rec = {
            "settings": self.key(row),
            "edit": edit,
            "row": row,
            "index": index,
            "score": score.to_dict(),
            "reconstruction_shift_px": None
            if recon is None or math.isnan(recon.centre_shift_px)
            else recon.centre_shift_px,
            "reconstruction_iou": recon.iou if recon is not None else None,
        }
        if step is not None:
            rec["xa_guidance"] = step
        self.records.setdefault((edit, row), {})[index] = rec
        self._append(rec)

    def _append(self, rec: dict) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()

    @staticmethod
    def to_score(rec: dict) -> WorldEditScore:
        values = {k: (math.nan if v is None else v) for k, v in rec["score"].items()}
        return WorldEditScore(**values)
