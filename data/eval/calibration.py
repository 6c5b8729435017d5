"""Calibrating the cross-attention guidance step of one edit (``--xa-guidance auto``, ``p2pz calibrate``).

The step that keeps an input's structure while its edit happens depends on the edit, not only on
the model. On the toy model (50 steps, ``joint`` preset, CFG 3, 6 scenes per cell; success / IoU with
the ideal edit):

    step            0 (none)     5            15           30
    circle:square   1.00 / 0.71  1.00 / 0.84  0.83 / 0.82  0.83 / 0.82
    square:circle   1.00 / 0.65  1.00 / 0.70  1.00 / 0.71  1.00 / 0.72
    circle:triangle 0.83 / 0.33  0.83 / 0.50  0.67 / 0.49  0.33 / 0.50
    square:triangle 1.00 / 0.37  0.83 / 0.46  0.50 / 0.45  0.00 / 0.45

A step that holds a square's corners in place (30) is what a circle -> square edit needs least and a
square -> circle edit most; too strong a step holds the source shape and the edit never happens.
So the step is chosen per edit, on a few inputs, by the same scores that filter pairs
(``p2pz.data.eval.pair_scores``): the teacher edits the inputs at a ladder of steps around the base
step, and among the steps whose edit success is within ``SUCCESS_MARGIN`` of the best step's, the
one that keeps most structure wins (world: highest IoU with the ideal edit; real images: lowest DINO
structure distance, success = CLIP-Acc). Structure scores within 1% of the best
(``STRUCTURE_TIE``) tie, and ties go to the smaller step. The ladder (``LADDER``:
0.4, 1, 2, 3 x the base) reaches below the base because some edits need a weak step: with the
toy model's ``box`` preset, blue -> yellow turns yellow on 4 of 6 calibration scenes at step 2, on
2 of 6 at step 5. When even the chosen step
makes the edit on fewer than ``LOW_SUCCESS`` of the inputs, the summary ends with a one-line warning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

    from p2pz.data.pairs.filtering import PairScorer
    from p2pz.data.shapes.edits import WorldEdit
    from p2pz.data.shapes.world import Scene
    from p2pz.teacher.directions import EditDirection
    from p2pz.teacher.edits import Edit
    from p2pz.teacher.pipeline import Pix2PixZero

LADDER = (0.4, 1.0, 2.0, 3.0)  # candidate steps, as multiples of the base step
LADDER_TEXT = ", ".join(f"{f:g}" for f in LADDER)  # for --help
SUCCESS_MARGIN = 0.1  # a step may give up this much success rate for better structure
# Structure scores within this share of the best count as a tie, which the smaller step wins: a few
# inputs cannot tell them apart, and a stronger step risks holding the source (toy model, red -> blue:
# docs/shapes-world.md, "Calibrating the guidance step")
STRUCTURE_TIE = 0.01
# Below this success rate at the chosen step, calibration warns that many pairs will be failures
# (the ablation's target for a usable teacher; circle -> triangle on the toy model stays under it)
LOW_SUCCESS = 0.8
# scorer name -> (success score, structure score, higher structure is better)
SCORE_NAMES = {"world": ("success", "iou", True), "paper": ("clip_acc", "structure_dist", False)}


@dataclass
class Calibration:
    """The chosen step and what every candidate scored (one row per step, in ladder order)."""

    edit: str
    chosen: float
    base: float
    inputs: int
    success_score: str
    structure_score: str
    rows: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """The sweep's table and the chosen step (and the warning, if any), as every command prints them."""
        text = f"{self.table()}\nchosen xa_guidance for {self.edit}: {self.chosen:g}"
        warning = self.warning()
        return f"{text}\n{warning}" if warning else text

    def warning(self) -> str | None:
        """One line when even the chosen step makes the edit on fewer than ``LOW_SUCCESS`` of the inputs."""
        success = next(r["success"] for r in self.rows if r["xa_guidance"] == self.chosen)
        if success >= LOW_SUCCESS:
            return None
        best = max(r["success"] for r in self.rows)
        return (
            f"warning: at the chosen step the edit succeeded on {success:.0%} of the {self.inputs} inputs "
            f"(the best step: {best:.0%}): expect failed pairs, and keep only the good ones "
            "with 'p2pz shards filter SRC DST --keep-if success'"
        )

    def table(self) -> str:
        """The sweep as a plain-text table, the chosen step marked."""
        lines = [f"{'xa_guidance':>12s} {self.success_score:>10s} {self.structure_score:>14s}"]
        for row in self.rows:
            mark = "  <- chosen" if row["xa_guidance"] == self.chosen else ""
            lines.append(
                f"{row['xa_guidance']:>12.4g} {row['success']:>10.3f} {row['structure']:>14.3f}{mark}"
            )
        return "\n".join(lines)


def candidate_steps(base: float, ladder: Sequence[float] = LADDER) -> list[float]:
    """The steps to try: ``base`` times each ladder factor (rounded to 4 significant digits)."""
    if not base > 0:
        raise UserError(f"the base guidance step must be positive to calibrate around, got {base:g}")
    return sorted({float(f"{base * f:.4g}") for f in ladder})


def pick_step(
    rows: Sequence[dict[str, float]],
    higher_is_better: bool,
    margin: float = SUCCESS_MARGIN,
    tie: float = STRUCTURE_TIE,
) -> float:
    """Among the rows whose success is within ``margin`` of the best, the smallest step whose
    structure is within the share ``tie`` of the best structure among them."""
    best_success = max(r["success"] for r in rows)
    eligible = [r for r in rows if r["success"] >= best_success - margin - 1e-9]
    if higher_is_better:
        bound = max(r["structure"] for r in eligible) * (1 - tie)
        tied = [r for r in eligible if r["structure"] >= bound - 1e-12]
    else:
        bound = min(r["structure"] for r in eligible) * (1 + tie)
        tied = [r for r in eligible if r["structure"] <= bound + 1e-12]
    return min(r["xa_guidance"] for r in tied)


def calibrate_guidance(
    teacher: Pix2PixZero,
    edit: Edit,
    direction: EditDirection,
    images: Sequence[Image.Image],
    scorer: PairScorer,
    base: float,
    *,
    captions: Sequence[str] | None = None,
    candidates: Sequence[float] | None = None,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    progress: Any = None,
) -> Calibration:
    """Edit ``images`` at every candidate step (default: ``candidate_steps(base)``), score each pair
    with ``scorer`` and pick the step (see the module docstring). ``progress``: a tqdm bar, advanced
    by one per step tried."""
    if not images:
        raise UserError("calibration needs at least one input image")
    if scorer.name not in SCORE_NAMES:
        raise UserError(f"cannot calibrate with the {scorer.name!r} scorer; use world or paper")
    success_name, structure_name, higher = SCORE_NAMES[scorer.name]
    steps = list(candidates) if candidates else candidate_steps(base)
    rows = []
    for step in steps:
        outs = teacher.edit(
            list(images),
            [direction],
            captions=list(captions) if captions is not None else None,
            seeds=[seed + i for i in range(len(images))],
            num_steps=num_steps,
            xa_guidance=step,
            guidance_scale=guidance_scale,
        )
        scores = scorer(list(images), [o.edited for o in outs], edit)
        rows.append({"xa_guidance": step, **_summary(scores, success_name, structure_name)})
        if progress is not None:
            progress.update(1)
    return Calibration(
        edit=edit.spec,
        chosen=pick_step(rows, higher),
        base=base,
        inputs=len(images),
        success_score=success_name,
        structure_score=structure_name,
        rows=rows,
    )


def _summary(scores: Sequence[dict[str, Any]], success: str, structure: str) -> dict[str, float]:
    """Success rate and mean structure score of one step's pairs (unscorable structure: skipped)."""
    values = [float(s[structure]) for s in scores if s.get(structure) is not None]
    values = [v for v in values if not math.isnan(v)]
    return {
        "success": sum(bool(s.get(success)) for s in scores) / len(scores),
        "structure": sum(values) / len(values) if values else math.nan,
    }


# ---------------------------------------------------------------------------------------------
# The shapes world: seeded calibration scenes, scored by the oracle

CALIBRATION_SEED = 10_000  # calibration scenes start here: never the evaluations' scenes (seed 0, ...)
# Scenes per step: on 6, one scene moved a success rate past the margin, and calibration chose steps
# whose success the evaluated scenes did not bear out (blue -> yellow with box_edges_fast); on 12 it
# chose the better ones (docs/results/cheap-teacher.md)
CALIBRATION_SCENES = 12


def world_calibration_scenes(edit: WorldEdit, count: int = CALIBRATION_SCENES) -> list[Scene]:
    """Seeded scenes with the edit's source word, apart from every evaluation's scenes."""
    return edit.scenes(count, seed=CALIBRATION_SEED)


def calibrate_world_edit(
    teacher: Pix2PixZero,
    edit: WorldEdit,
    base: float,
    *,
    count: int = CALIBRATION_SCENES,
    direction: EditDirection | None = None,
    candidates: Sequence[float] | None = None,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> Calibration:
    """``calibrate_guidance`` on ``count`` calibration scenes of the world, scored by the oracle, under
    a progress bar over the steps tried (on stderr; ``progress=False``: none)."""
    import sys

    from tqdm.auto import tqdm

    from p2pz.data.eval.pair_scores import WorldPairScorer
    from p2pz.data.shapes import world
    from p2pz.data.shapes.edits import world_direction

    scenes = world_calibration_scenes(edit, count)
    steps = list(candidates) if candidates else candidate_steps(base)
    desc = f"calibrating {edit.spec} ({count} scenes)"
    with tqdm(total=len(steps), desc=desc, file=sys.stderr, disable=not progress) as bar:
        return calibrate_guidance(
            teacher,
            edit,
            direction if direction is not None else world_direction(teacher, edit),
            [world.render(s) for s in scenes],
            WorldPairScorer(),
            base,
            captions=[s.caption for s in scenes],
            candidates=steps,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            seed=CALIBRATION_SEED,
            progress=bar,
        )
