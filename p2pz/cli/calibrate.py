"""``p2pz calibrate``: choose an edit's cross-attention guidance step on a few inputs.

    p2pz calibrate --model data/toy_model --edit square:circle            # seeded world scenes
    p2pz calibrate --model CompVis/stable-diffusion-v1-4 --edit cat:dog --inputs photos/ --score paper

The teacher edits ``--count`` inputs at a ladder of guidance steps around the base step, the pair
scorer scores each edit, and the step that keeps most structure while the edit happens is chosen
(``p2pz.data.eval.calibration`` says how, with the sweep that motivates it). The table and the
choice are printed, and written as JSON with ``--out``; ``--xa-guidance auto`` in ``eval --world``,
``demo`` and the ablation runs the same calibration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pz.cli.options import add_device, add_dtype, add_edit, add_progress, add_seed, plain
from p2pz.data.eval.calibration import CALIBRATION_SCENES, LADDER_TEXT
from p2pz.data.shapes.teacher_settings import TOY_PRESET
from p2pz.teacher.presets import add_preset_argument
from p2pz.utils.errors import UserError
from p2pz.utils.values import non_negative_float, positive_float, positive_int

if TYPE_CHECKING:
    from PIL import Image

    from p2pz.data.eval.calibration import Calibration
    from p2pz.teacher.pipeline import Pix2PixZero


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose an edit's cross-attention guidance step on a few inputs",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="the teacher: a diffusers folder or hub id")
    add_edit(p, required=True, help="the edit, e.g. square:circle or cat:dog")
    p.add_argument(
        "--inputs",
        default=None,
        help="folder of input images (default for a shapes-world edit: seeded world scenes)",
    )
    p.add_argument(
        "--count", type=positive_int, default=None,
        help=f"inputs to edit per step (default {CALIBRATION_SCENES})",
    )  # fmt: skip
    p.add_argument(
        "--base", type=positive_float, default=None, help="base step (default: the teacher's usual step)"
    )
    p.add_argument(
        "--candidates",
        type=non_negative_float,
        nargs="+",
        default=None,
        help=f"steps to try (default: base x {LADDER_TEXT})",
    )
    add_preset_argument(p, None, f"{TOY_PRESET} for a world model, else official")
    p.add_argument(
        "--guidance-scale",
        type=non_negative_float,
        default=None,
        help="classifier-free guidance (default: the toy model's for a world model, else the preset's)",
    )
    p.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (default: the preset's)")
    p.add_argument("--score", default="auto", choices=("auto", "world", "paper"), help="pair scorer")
    p.add_argument("--clip-model", default=None, help="CLIP for --score paper")
    p.add_argument("--dino-model", default=None, help="DINO for --score paper")
    add_seed(p, "the edits of --inputs images (world scenes use the calibration's own seeds)")
    add_device(p)
    add_dtype(p, what="the teacher")
    add_progress(p)
    p.add_argument("--out", default=None, help="write the calibration as JSON here")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from p2pz.teacher.edits import parse_edit
    from p2pz.utils.devices import resolve_device

    edit = parse_edit(args.edit)
    args.device = resolve_device(args.device)
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; give a .json file")
    calibration = run_calibration(args, edit)
    print(calibration.summary())
    if args.out:
        from p2pz.utils.atomic import atomic_path

        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(json.dumps(calibration.to_dict(), indent=1) + "\n")
    return 0


def run_calibration(args: argparse.Namespace, edit: Any) -> Calibration:
    """Load what ``args`` names (teacher, inputs, scorer, direction) and calibrate ``edit``."""
    from tqdm.auto import tqdm

    from p2pz.data.eval.calibration import CALIBRATION_SEED, calibrate_guidance, candidate_steps
    from p2pz.data.eval.pair_scores import make_pair_scorer
    from p2pz.data.shapes.edits import check_edit_vocabulary, is_world_edit, model_vocabulary

    check_edit_vocabulary(edit, args.model)
    world_model = model_vocabulary(args.model) is not None
    world = is_world_edit(edit.source, edit.target)
    if args.inputs is None and not world:
        raise UserError(f"{edit.spec} is not a shapes-world edit: give --inputs DIR with images to edit")
    scorer = make_pair_scorer(
        "world" if args.score == "auto" and world else args.score,
        edits=[edit],
        clip_model=args.clip_model,
        dino_model=args.dino_model,
        device=args.device,
    )
    if scorer is None:
        raise UserError("calibration needs pair scores: use --score world or --score paper")
    paths = _input_paths(args)
    teacher, base, scale = _teacher(args, world_model)
    images, captions = _inputs(args, edit, paths)
    direction = _direction(teacher, edit, world)
    steps = args.candidates or candidate_steps(base)
    desc = f"calibrating {edit.spec} ({len(images)} inputs)"
    with tqdm(total=len(steps), desc=desc, disable=not args.progress) as bar:
        return calibrate_guidance(
            teacher,
            edit,
            direction,
            images,
            scorer,
            base,
            captions=captions,
            candidates=steps,
            num_steps=args.steps,
            guidance_scale=scale,
            seed=CALIBRATION_SEED if args.inputs is None else args.seed,
            progress=bar,
        )


def _teacher(args: argparse.Namespace, world_model: bool) -> tuple[Pix2PixZero, float, float | None]:
    """The teacher, the base step and CFG: the toy model's settings for a world model, else the preset's."""
    from p2pz.data.shapes import teacher_settings as toy
    from p2pz.teacher import Pix2PixZero
    from p2pz.teacher.presets import get_preset

    preset = args.preset or (toy.TOY_PRESET if world_model else "official")
    teacher = Pix2PixZero.from_pretrained(args.model, preset=preset, device=args.device, dtype=args.dtype)
    toy_base = toy.toy_calibration_base(preset) if world_model else None
    base = args.base or toy_base or get_preset(preset).xa_guidance_real
    scale = args.guidance_scale or (toy.TOY_GUIDANCE_SCALE if world_model else None)
    return teacher, base, scale


def _input_paths(args: argparse.Namespace) -> list[Path]:
    """The first ``--count`` images of ``--inputs`` by name (none without ``--inputs``), checked before
    any model loads."""
    if args.inputs is None:
        return []
    from p2pz.data.eval.calibration import CALIBRATION_SCENES

    folder = Path(args.inputs)
    if not folder.is_dir():
        raise UserError(f"--inputs {folder} is not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not paths:
        raise UserError(f"--inputs {folder} holds no .png/.jpg/.jpeg/.webp image")
    return paths[: args.count or CALIBRATION_SCENES]


def _inputs(
    args: argparse.Namespace, edit: Any, paths: list[Path]
) -> tuple[list[Image.Image], list[str] | None]:
    """The images of ``paths``, or (no ``--inputs``) seeded world scenes with their captions."""
    from p2pz.data.eval.calibration import CALIBRATION_SCENES, world_calibration_scenes

    if args.inputs is None:
        from p2pz.data.shapes import world
        from p2pz.data.shapes.edits import parse_world_edit

        scenes = world_calibration_scenes(parse_world_edit(edit.spec), args.count or CALIBRATION_SCENES)
        return [world.render(s) for s in scenes], [s.caption for s in scenes]
    from p2pz.teacher.images import load_image

    return [load_image(p) for p in paths], None


def _direction(teacher: Pix2PixZero, edit: Any, world: bool) -> Any:
    if world:
        from p2pz.data.shapes.edits import parse_world_edit, world_direction

        return world_direction(teacher, parse_world_edit(edit.spec))
    return teacher.direction(edit.source, edit.target)
