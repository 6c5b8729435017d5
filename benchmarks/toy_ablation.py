"""The paper's ablation on the shapes world: does cross-attention guidance keep the structure?

For every edit of the world the toy model learned -- each shape edit among its three shapes, both
ways, and six colour edits mixing warm/cool and light/dark (``p2pz.data.shapes.edits.world_edits``)
-- the teacher edits the same seeded scenes three ways (``p2pz.data.eval.ablation``):

    word_swap      DDIM inversion, then the caption with the word swapped (no direction, no guidance)
    direction      pix2pix-zero edit directions, no cross-attention guidance
    direction_xa   directions with cross-attention guidance (the method)

and the oracle scores every edit against the scene's ground truth (``p2pz.data.eval.world_metrics``):
success (target word read, everything else kept), mask IoU with the ideal edit, median
bounding-box centre shift. Targets on the trained toy model, on every edit: with guidance,
success >= 80%, IoU >= 0.8, median shift <= 1.5 px, and IoU above both unguided rows.

    python benchmarks/toy_ablation.py                         # the world: 12 edits, 50 steps
    python benchmarks/toy_ablation.py --edits circle:square red:blue --scenes 24 --steps 20
    python benchmarks/toy_ablation.py --log runs/ablation.jsonl   # resumable

Scenes: 100 for the two headline edits (circle:square, red:blue), 20 for each other edit;
``--scenes N`` gives every edit N. The default run edits 400 scenes three ways (about 1,200
edits, a guided one costing about three plain ones) plus 576 guided calibration edits (12 edits x
4 steps x 12 scenes). On this project's 2-core machine it takes about 190 minutes of one core
(3-5 s per plain and 7-9 s per guided edit with ``box_edges``). Its edits split over processes
that share nothing but the log's format: the figures in docs/results/toy-ablation.md come from the
shape edits and the colour edits run side by side (``--edits ... --threads 1 --log A.jsonl``, 75 min),
their logs concatenated, and this default command resuming from them (seconds; it reruns a guided
row only where the calibration rule now picks another step than the logged scenes ran at, and
calibrates again where the logged sweep ran on another number of scenes).
``--scenes``/``--edits``/``--steps`` shrink it. ``--log FILE`` records every scored scene and
calibration, so that a killed run resumes where it stopped. Edits with words the model never
learned (``diamond``, ``purple``, ``orange`` for the toy model) are refused in one line.

The output: one line per row as it ends, then a table of every row, the mean over edits and the
worst edit of each row (``recon px``/``recon iou``: the reference pass, the model redrawing the
input with no edit, scored against the input: a ceiling for edits into that shape), and last one
JSON object mapping ``<edit>/<row>`` (and ``mean/<row>``,
``worst/<row>``) to ``{"success", "iou", "centre_shift_px"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pz.data.models import TOY_MODEL
from p2pz.data.shapes.teacher_settings import AUTO, add_toy_teacher_arguments, toy_calibration_base

README_EDITS = ("circle:square", "red:blue")  # the headline edits (docs/results/toy-ablation.md): more scenes
README_SCENES, OTHER_SCENES = 100, 20

if TYPE_CHECKING:
    from p2pz.data.eval.ablation import ScoreLog
    from p2pz.data.shapes.edits import WorldEdit
    from p2pz.data.shapes.world import Scene
    from p2pz.teacher.directions import EditDirection
    from p2pz.teacher.pipeline import Pix2PixZero


def main(argv: list[str] | None = None) -> int:
    """Run every row of every edit, one line per row as it ends, then the table and the JSON line."""
    parser = _parser()
    args = parser.parse_args(argv)

    import torch

    from p2pz.data.eval.ablation import ROWS, ScoreLog
    from p2pz.data.shapes.edits import world_direction
    from p2pz.utils.errors import UserError

    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; rows are {', '.join(ROWS)}")
    try:
        edits, teacher = _load_edits_and_teacher(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log = ScoreLog(args.log, _log_settings(args, teacher))
    print(
        f"toy ablation: {args.model}, {len(edits)} edits, {_scenes_text(args)}, {args.steps} steps, "
        f"preset {args.preset}, CFG {args.guidance_scale:g}, xa_guidance {args.xa_guidance} "
        f"(direction_xa), {torch.get_num_threads()} threads",
        flush=True,
    )

    results: dict[str, dict] = {}
    for edit in edits:
        scenes = edit.scenes(_scene_count(args, edit), seed=args.seed)
        direction = world_direction(teacher, edit, args.sentences)  # one direction for the edit's rows
        step = _guidance_step(args, teacher, log, edit, direction)
        for row in args.rows:
            results[f"{edit.name}/{row}"] = _run_row(args, teacher, log, edit, scenes, direction, row, step)
    _print_results(results)
    return 0


def _guidance_step(
    args: argparse.Namespace, teacher: Pix2PixZero, log: ScoreLog, edit: WorldEdit, direction: EditDirection
) -> float:
    """``--xa-guidance``, or with ``auto`` the step calibrated for this edit on its own seeded scenes
    (never the evaluated ones), printed with the sweep it was chosen from; logged, so that a resumed
    run does not calibrate again."""
    if args.xa_guidance != AUTO or "direction_xa" not in args.rows:
        return toy_calibration_base(args.preset) if args.xa_guidance == AUTO else args.xa_guidance
    from p2pz.data.eval.calibration import (
        CALIBRATION_SCENES,
        SCORE_NAMES,
        Calibration,
        calibrate_world_edit,
        pick_step,
    )

    logged = log.calibration(edit.name)
    if logged is not None and logged.get("inputs") != CALIBRATION_SCENES:
        logged = None  # a sweep on another number of scenes (before it was 12): calibrate again
    if logged is not None:  # the sweep is the log's, the choice the rule's as it is now
        calibration = Calibration(**logged)
        calibration.chosen = pick_step(calibration.rows, higher_is_better=SCORE_NAMES["world"][2])
    else:
        calibration = calibrate_world_edit(
            teacher,
            edit,
            toy_calibration_base(args.preset),
            direction=direction,
            num_steps=args.steps,
            guidance_scale=args.guidance_scale,
        )
        log.add_calibration(edit.name, calibration.to_dict())
    print(calibration.summary(), flush=True)
    return calibration.chosen


def _parser() -> argparse.ArgumentParser:
    """The command line (the module docstring is its description)."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/toy_ablation.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=str(TOY_MODEL), help="toy model folder (default: the shipped one)")
    parser.add_argument(
        "--edits",
        nargs="+",
        default=None,
        help="world edits (default: every shape edit and six colour edits of the model's vocabulary)",
    )
    parser.add_argument(
        "--rows", nargs="+", default=["word_swap", "direction", "direction_xa"], help="rows to run"
    )
    parser.add_argument(
        "--scenes",
        type=int,
        default=None,
        help=f"scenes per edit (default: {README_SCENES} for {' and '.join(README_EDITS)}, "
        f"{OTHER_SCENES} for the others)",
    )
    parser.add_argument(
        "--steps", type=int, default=50, help="DDIM steps of inversion and editing (default 50)"
    )
    add_toy_teacher_arguments(parser, xa_default=AUTO)  # --preset, --xa-guidance, --guidance-scale
    parser.add_argument(
        "--sentences", default="world", help="sentence banks of the directions (default: world captions)"
    )
    parser.add_argument("--batch-size", type=int, default=10, help="scenes per teacher call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--log", default=None, metavar="FILE", help="JSONL of scored scenes: resume a killed run"
    )
    return parser


def _load_edits_and_teacher(args: argparse.Namespace) -> tuple[list[WorldEdit], Pix2PixZero]:
    """The parsed ``--edits`` and the teacher; ``UserError`` for a missing model or a bad edit."""
    from p2pz.data.shapes.edits import parse_world_edit, world_edits
    from p2pz.teacher import Pix2PixZero
    from p2pz.utils.errors import UserError

    if not Path(args.model).is_dir():
        raise UserError(
            f"no model folder {args.model} (train it with `python -m p2pz.data.models.train_toy`)"
        )
    if args.edits is None:
        edits = world_edits(args.model)
    else:
        edits = [parse_world_edit(e, args.model) for e in args.edits]
    teacher = Pix2PixZero.from_pretrained(args.model, preset=args.preset, device=args.device, captioner=False)
    return edits, teacher


def _scene_count(args: argparse.Namespace, edit: WorldEdit) -> int:
    """``--scenes``, or the default: more scenes for the README's edits."""
    if args.scenes is not None:
        return args.scenes
    return README_SCENES if edit.spec in README_EDITS else OTHER_SCENES


def _scenes_text(args: argparse.Namespace) -> str:
    if args.scenes is not None:
        return f"{args.scenes} scenes per edit"
    return f"{README_SCENES} scenes for {' and '.join(README_EDITS)}, {OTHER_SCENES} for the others"


def _log_settings(args: argparse.Namespace, teacher: Pix2PixZero) -> dict[str, Any]:
    """What the scores depend on: a ``--log`` record counts only for a run with the same settings."""
    return {
        "fingerprint": teacher.fingerprint,
        "preset": teacher.preset.to_dict(),
        "steps": args.steps,
        "xa_guidance": args.xa_guidance,
        "guidance_scale": args.guidance_scale,
        "sentences": args.sentences,
        "seed": args.seed,
    }


def _run_row(
    args: argparse.Namespace,
    teacher: Pix2PixZero,
    log: ScoreLog,
    edit: WorldEdit,
    scenes: list[Scene],
    direction: EditDirection,
    row: str,
    xa_guidance: float,
) -> dict[str, Any]:
    """Edit and score the scenes ``log`` lacks for one row, then summarise all of the row's scenes."""
    from tqdm.auto import tqdm

    from p2pz.data.eval.ablation import edit_world_scenes

    step = xa_guidance if row == "direction_xa" else None  # the guided rows' records carry it
    done = log.done(edit.name, row, step)
    pending = [i for i in range(len(scenes)) if i not in done]
    tic = time.perf_counter()
    with tqdm(
        total=len(scenes),
        initial=len(scenes) - len(pending),
        desc=f"{edit.name}/{row}",
        file=sys.stderr,
    ) as bar:
        edit_world_scenes(
            teacher,
            edit,
            scenes,
            row,
            num_steps=args.steps,
            xa_guidance=xa_guidance,
            guidance_scale=args.guidance_scale,
            batch_size=args.batch_size,
            direction=direction,
            seed=args.seed,
            skip=sorted(done),
            done=lambda i, s, r: log.add(edit.name, row, i, s, r, step),  # logged as it goes: resumable
            progress=bar,
        )
    seconds = time.perf_counter() - tic
    summary = _summarise([log.done(edit.name, row, step)[i] for i in range(len(scenes))])
    summary["seconds_this_run"] = round(seconds, 1)
    if row == "direction_xa":
        summary["xa_guidance"] = xa_guidance
    print(f"{edit.name}/{row}: {_fmt(summary)} ({seconds:.0f} s)", flush=True)
    return summary


def _summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The world metrics of a row's logged scenes, plus the median reconstruction shift and the mean
    reconstruction IoU (None when a scene's record predates it)."""
    from p2pz.data.eval.ablation import ScoreLog, reconstruction_summary
    from p2pz.data.eval.world_metrics import aggregate

    shifts = [r["reconstruction_shift_px"] for r in records]
    ious = [r.get("reconstruction_iou") for r in records]
    return {**aggregate([ScoreLog.to_score(r) for r in records]), **reconstruction_summary(shifts, ious)}


def _print_results(results: dict[str, dict[str, Any]]) -> None:
    """The table of every row, the mean and worst edit per row, then the last line: the headline
    metrics as one JSON object."""
    from p2pz.data.eval.ablation import across_edits

    results = {**results, **across_edits(results)}
    print()
    header = ("success", "iou", "iou_in", "shift px", "psnr out", "recon px", "recon iou")
    print(f"{'edit/row':40s} " + " ".join(f"{h:>8s}" for h in header))
    for name, m in results.items():
        values = (m["success"], m["iou"], m["iou_input"], m["centre_shift_px"], m["psnr_outside"])
        values += (m.get("reconstruction_shift_px"), m.get("reconstruction_iou"))
        label = f"{name} ({m['edit']})" if "edit" in m else name
        print(f"{label:40s} " + " ".join(f"{_num(v):>8s}" for v in values))
    print(
        json.dumps(
            {
                k: {key: v[key] for key in ("success", "iou", "centre_shift_px", "edit") if key in v}
                for k, v in results.items()
            }
        )
    )


def _num(value: float | None) -> str:
    """A table cell: three decimals, or "-" for a missing value."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _fmt(m: dict[str, Any]) -> str:
    """A row's summary as the one progress line printed when the row ends."""
    return (
        f"success {m['success']:.2f}, iou {m['iou']:.3f}, shift {_num(m['centre_shift_px'])} px, "
        f"psnr outside {_num(m['psnr_outside'])} dB"
    )


if __name__ == "__main__":
    raise SystemExit(main())
