"""``p2pz eval``: score edits, on the shapes world (against ground truth) or with the paper's metrics.

    p2pz eval --world --model data/toy_model --edit circle:square --scenes 100 --out runs/eval
    p2pz eval --pairs runs/pairs --out runs/eval-pairs
    p2pz eval --student models/circle-to-square --scenes 64 --out runs/eval-student

``--world`` has the teacher edit seeded world scenes and scores every edit with the oracle;
``--pairs`` scores existing (input, edit) pairs from WebDataset shards (``p2pz generate``): pairs of
the shapes world with the world's metrics, other pairs with CLIP-Acc, BG LPIPS and Structure Dist;
``--student`` scores an exported student package on held-out world scenes (seeds its training scenes
never use, as in ``p2pz demo``), with the oracle and against the teacher's own edits of the same
scenes, the teacher run as the package's ``config.json`` says it made the pairs: PSNR to the teacher
over the whole image and inside the objects (the union of the input's and the edit's object masks),
next to the same figures for copying the input.
All write ``metrics.json`` and ``grid.png`` (input | edit, with scores; for ``--student``
input | teacher | student | student - teacher) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from p2pz.cli.options import ExtendList, add_device, add_dtype, add_edit, add_progress, add_seed, plain
from p2pz.cli.skipped import Skipped
from p2pz.data.models import TOY_MODEL
from p2pz.data.shapes.teacher_settings import AUTO, toy_calibration_base, xa_guidance_value
from p2pz.teacher.edits import Edit
from p2pz.teacher.presets import add_preset_argument
from p2pz.utils.errors import UserError
from p2pz.utils.values import non_negative_float, positive_int

log = logging.getLogger(__name__)

GRID_PAIRS = 24  # pairs shown in grid.png
GRID_COLUMNS = 4  # pairs per grid row
TILE = 128  # px per image in the grid


def register(subparsers: argparse._SubParsersAction) -> None:
    """``p2pz eval``: the mode (``--world`` or ``--pairs``), ``--out``, then each mode's options."""
    p = subparsers.add_parser(
        "eval",
        help="score edits: the teacher on shapes-world scenes, or existing pairs with the paper's metrics",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to score (one of --world, --pairs, --student; --student with --pairs)")
    what.add_argument(
        "--world", action="store_true", help="edit seeded shapes-world scenes with the teacher and score them"
    )
    what.add_argument(
        "--pairs",
        metavar="SHARDS_OR_DIR",
        help="score the pairs in these WebDataset shards (folder, glob or brace pattern); with --student: "
        "the pairs to score the student on ('held-out': the shards its training held out)",
    )
    what.add_argument(
        "--student",
        metavar="PACKAGE",
        help="score an exported student package (a folder or a Hub repo id) against its teacher: with "
        "--pairs on those pairs (PSNR, SSIM, LPIPS to the teacher and the input), else on held-out "
        "world scenes",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for metrics.json and grid.png")
    # one titled group per mode, so --help shows which options belong to which
    _add_world_arguments(p.add_argument_group("--world"))
    _add_pairs_arguments(p.add_argument_group("--pairs"))
    p.set_defaults(func=run)


def _add_world_arguments(w: argparse._ArgumentGroup) -> None:
    """Options of ``--world``: the teacher, the edits and scenes, and how the teacher edits them."""
    w.add_argument(
        "--model", default=str(TOY_MODEL), help="teacher model folder or id (default: the shipped toy model)"
    )
    add_edit(
        w,
        many=True,
        help="world edits, e.g. --edit circle:square red:blue (or the flag repeated; default circle:square)",
    )
    w.add_argument(
        "--scenes", type=positive_int, default=None, help="scenes per edit (default 100; --student: 64)"
    )
    w.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="DDIM steps of inversion and editing (default: the preset's, 50)",
    )
    w.add_argument(
        "--xa-guidance",
        type=xa_guidance_value,
        default=None,
        help="cross-attention guidance step, or 'auto' (calibrated per edit on seeded scenes apart from "
        "the scored ones, around the toy model's step for the preset or the preset's own; "
        "default: the preset's)",
    )
    w.add_argument(
        "--guidance-scale",
        type=non_negative_float,
        default=None,
        help="classifier-free guidance of the edit (default: the preset's)",
    )
    w.add_argument(
        "--row",
        choices=("word_swap", "direction", "direction_xa"),
        default="direction_xa",
        help="how to edit: plain word swap, directions without guidance, or directions with "
        "cross-attention guidance (default: direction_xa, the method)",
    )
    w.add_argument(
        "--sentences",
        default="world",
        help="sentence banks for the edit direction: 'world' (the world's captions, default), "
        "'template' or a text file",
    )
    add_preset_argument(w, None, "official; --student: the package's")
    w.add_argument("--batch-size", type=positive_int, default=8, help="scenes per teacher call (default 8)")
    add_seed(w, "the scenes and edits")
    add_device(w, "the teacher (and --student's package)")
    add_dtype(w, what="the teacher")
    add_progress(w)


def _add_pairs_arguments(r: argparse._ArgumentGroup) -> None:
    """Options of ``--pairs``: which metrics, their models, object masks and how many pairs."""
    r.add_argument(
        "--metrics",
        choices=("auto", "world", "paper"),
        default="auto",
        help="auto (default): world metrics for shapes-world pairs, the paper's for the rest",
    )
    r.add_argument(
        "--clip-model", default="openai/clip-vit-base-patch32", help="CLIP for CLIP-Acc (id or folder)"
    )
    r.add_argument(
        "--dino-model", default="facebook/dino-vitb8", help="DINO ViT for Structure Dist (id or folder)"
    )
    r.add_argument(
        "--lpips-backbone",
        default=None,
        metavar="FILE",
        help="torchvision AlexNet state dict for BG LPIPS (default: torchvision's cached copy)",
    )
    r.add_argument(
        "--masks",
        default=None,
        metavar="DIR",
        help="object masks for BG LPIPS, KEY.png per pair (white = object); a mask.png in the "
        "sample is used too. Pairs without a mask get no BG LPIPS",
    )
    r.add_argument(
        "--skip",
        nargs="+",
        action=ExtendList,
        choices=("clip", "lpips", "structure"),
        default=[],
        help="leave out some of the paper's metrics, e.g. --skip lpips structure",
    )
    r.add_argument("--limit", type=positive_int, default=None, help="score at most this many pairs")


def run(args: argparse.Namespace) -> int:
    from p2pz.utils.devices import resolve_device

    args.device = resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    modes = [
        flag
        for flag, on in (("--world", args.world), ("--pairs", args.pairs), ("--student", args.student))
        if on
    ]
    if not modes:
        raise UserError(
            "say what to score: --world, --pairs SHARDS, --student PACKAGE (with or without --pairs)"
        )
    if len(modes) > 1 and modes != ["--pairs", "--student"]:
        raise UserError(f"{' and '.join(modes)} do not go together: give one (--pairs may go with --student)")
    skipped = Skipped("inputs")  # --pairs: the pairs, shards and masks that could not be read
    if args.student and args.pairs:
        report = eval_student_pairs(args)
    elif args.student:
        report = eval_student(args)
    else:
        report = eval_world(args) if args.world else eval_pairs(args, skipped)
    write_outputs(out, report)
    print(summary_table(report["metrics"]))
    print(f"wrote {out / 'metrics.json'} and {out / 'grid.png'}{skipped.summary()}")
    skipped.raise_if_any(f"the others are scored in {out / 'metrics.json'}")
    return 0


# ---------------------------------------------------------------------------------------------
# --world


def _guidance_step(args: argparse.Namespace, teacher: Any, edit: Any) -> tuple[float | None, dict | None]:
    """``--xa-guidance`` as given, or (``auto``) calibrated for ``edit`` and the calibration's record."""
    if args.xa_guidance != AUTO or args.row != "direction_xa":
        return (None if args.xa_guidance == AUTO else args.xa_guidance), None
    from p2pz.data.eval.calibration import calibrate_world_edit
    from p2pz.data.shapes.edits import model_vocabulary

    world_model = model_vocabulary(args.model) is not None
    base = toy_calibration_base(teacher.preset) if world_model else teacher.preset.xa_guidance_real
    calibration = calibrate_world_edit(
        teacher, edit, base, num_steps=args.steps, guidance_scale=args.guidance_scale
    )
    print(calibration.summary(), flush=True)
    return calibration.chosen, calibration.to_dict()


def eval_world(args: argparse.Namespace) -> dict:
    import torch
    from tqdm.auto import tqdm

    from p2pz.data.eval.ablation import edit_world_scenes
    from p2pz.data.shapes import world
    from p2pz.data.shapes.edits import parse_world_edit
    from p2pz.teacher import Pix2PixZero

    edits = [parse_world_edit(e, args.model) for e in (args.edit or ["circle:square"])]
    args.scenes = 100 if args.scenes is None else args.scenes
    args.preset = args.preset or "official"
    torch.manual_seed(args.seed)
    teacher = Pix2PixZero.from_pretrained(
        args.model, preset=args.preset, device=args.device, dtype=args.dtype, captioner=False
    )
    metrics, shown = {}, []
    for edit in edits:
        scenes = edit.scenes(args.scenes, seed=args.seed)
        xa_guidance, calibration = _guidance_step(args, teacher, edit)
        with tqdm(total=len(scenes), desc=f"{edit.name} ({args.row})", disable=not args.progress) as bar:
            result = edit_world_scenes(
                teacher,
                edit,
                scenes,
                args.row,
                num_steps=args.steps,
                xa_guidance=xa_guidance,
                guidance_scale=args.guidance_scale,
                batch_size=args.batch_size,
                sentences=args.sentences,
                keep_images=True,
                seed=args.seed,
                progress=bar,
            )
        metrics[edit.name] = {**result.summary(), "per_image": [s.to_dict() for s in result.scores]}
        if calibration is not None:
            metrics[edit.name]["calibration"] = calibration
        for scene, image, score in zip(scenes, result.edited, result.scores):
            if len(shown) < GRID_PAIRS:
                shown.append((world.render(scene), image, _world_label(score.to_dict())))
    settings = {
        "model": args.model,
        "row": args.row,
        "scenes": args.scenes,
        "seed": args.seed,
        "sentences": args.sentences,
        "teacher": teacher.settings,
        "overrides": {
            "num_steps": args.steps,
            "xa_guidance": args.xa_guidance,
            "guidance_scale": args.guidance_scale,
        },
    }
    return {"kind": "world", "settings": settings, "metrics": metrics, "grid": shown}


def _world_label(score: dict) -> str:
    shift = score.get("centre_shift_px")
    verdict = "ok" if score["success"] else "FAIL"
    return f"{verdict} iou {score['iou']:.2f} d {'-' if shift is None else f'{shift:.1f}'}"


# ---------------------------------------------------------------------------------------------
# --student


def student_teacher_settings(config: dict, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(edit spec, teacher settings) of the pairs a package was trained on, from its ``config.json``.

    ``--model``, ``--preset``, ``--steps``, ``--xa-guidance`` and ``--guidance-scale`` replace the
    package's values when given (e.g. a teacher model that has moved).
    """
    data = config.get("data") or {}
    edit, teacher = data.get("edit") or {}, data.get("teacher") or {}
    if not edit.get("source") or not edit.get("target"):
        raise UserError(
            f"{args.student}/config.json does not say which edit the student learned (data.edit); "
            "export it with 'p2pz export' from a run on 'p2pz generate' pairs"
        )
    overrides = teacher.get("overrides") or {}
    if args.xa_guidance == AUTO:  # the teacher is compared as it made the student's pairs
        raise UserError("--student compares with the teacher's own step: drop --xa-guidance auto")
    given = args.model if args.model != str(TOY_MODEL) else None  # --model's default is the toy model
    settings = {
        "model": given or teacher.get("model") or config.get("teacher_model") or str(TOY_MODEL),
        "preset": args.preset or teacher.get("preset") or "official",
        "num_steps": args.steps if args.steps is not None else overrides.get("num_steps"),
        "xa_guidance": args.xa_guidance if args.xa_guidance is not None else overrides.get("xa_guidance"),
        "guidance_scale": (
            args.guidance_scale if args.guidance_scale is not None else overrides.get("guidance_scale")
        ),
    }
    return f"{edit['source']}:{edit['target']}", settings


def eval_student(args: argparse.Namespace) -> dict:
    """An exported student and its teacher on the same held-out world scenes: oracle and fidelity."""
    from p2pz.cli.demo import HELD_OUT_SEED, make_scenes
    from p2pz.data.eval.fidelity import difference_image, fidelity
    from p2pz.data.eval.world_metrics import score_world_edits
    from p2pz.data.shapes import world
    from p2pz.data.shapes.edits import parse_world_edit
    from p2pz.student.export import apply_to_images, load_exported, read_config
    from p2pz.student.package import known_edit_vector, package_edits

    config = read_config(args.student)
    spec, settings = student_teacher_settings(config, args)
    vector = None
    if package_edits(config):  # a student of many edits: the --edit it is scored on
        spec = args.edit[0] if args.edit else spec
        vector = known_edit_vector(config, spec, args.student)
    edit = parse_world_edit(spec)
    count = 64 if args.scenes is None else args.scenes
    scenes = make_scenes(edit.source, count, HELD_OUT_SEED + args.seed * 1_000_000)
    inputs = [world.render(s) for s in scenes]
    teacher_images = _teacher_edits(args, settings, edit, inputs)
    student = load_exported(args.student, "eager", device=args.device, edit=vector)
    student_images = apply_to_images(student, config["resolution"], inputs, device=args.device)
    student_images = [im if im.size == x.size else im.resize(x.size) for im, x in zip(student_images, inputs)]
    fid = fidelity(inputs, teacher_images, student_images)
    per_fid = fid.pop("per_image")
    student_world = score_world_edits(scenes, student_images, edit)
    shown = [
        (x, t, s, difference_image(s, t), f"{_world_label(e)} {f['psnr_to_teacher_db']:.1f} dB")
        for x, t, s, e, f in zip(inputs, teacher_images, student_images, student_world["per_image"], per_fid)
    ][:GRID_PAIRS]
    for entry, f in zip(student_world["per_image"], per_fid):
        entry.update(f)
    scores = {"teacher": score_world_edits(scenes, teacher_images, edit), "student": {**student_world, **fid}}
    metrics = {f"{edit.name} ({who})": value for who, value in scores.items()}
    run_settings = {
        "student": str(args.student),
        "edit": spec,
        "scenes": count,
        "seed": args.seed,
        "teacher": settings,
    }
    return {"kind": "student", "settings": run_settings, "metrics": metrics, "grid": shown}


def eval_student_pairs(args: argparse.Namespace) -> dict:
    """A student package on teacher pairs of any edit (``--pairs SHARDS`` or ``held-out``): PSNR, SSIM
    (and LPIPS with a backbone) to the teacher and to the input; the oracle too on shapes-world pairs."""
    from p2pz.student.evaluation import evaluate_package

    report = evaluate_package(
        args.student,
        args.pairs,
        limit=args.limit,
        device=args.device,
        batch_size=args.batch_size,
        lpips_backbone=args.lpips_backbone,
    )
    if report.get("lpips_note"):
        print(f"note: {report['lpips_note']}")
    rows = report.pop("grid")[:GRID_PAIRS]
    shown = [(x, t, s, f"{p['psnr_to_teacher']:.1f} dB") for (x, t, s), p in zip(rows, report["per_image"])]
    metrics = {
        f"{name} ({len(report['per_image'])} pairs)": report[name]
        for name in ("to_teacher", "to_input", "copy_to_teacher")
    }
    if "oracle" in report:
        metrics.update({f"oracle ({who})": v for who, v in report["oracle"].items()})
    settings = {k: v for k, v in report.items() if k not in ("per_image",) and k not in metrics}
    return {
        "kind": "student-pairs",
        "settings": settings,
        "metrics": metrics,
        "per_image": report["per_image"],
        "grid": shown,
    }


def _teacher_edits(args: argparse.Namespace, settings: dict, edit: Any, inputs: list) -> list:
    """The teacher's edits of ``inputs``, its direction from the world's captions (as the demo's pairs)."""
    from tqdm.auto import tqdm

    from p2pz.data.shapes.edits import world_direction
    from p2pz.teacher import Pix2PixZero

    # the model's own captioner, as 'p2pz generate' ran it (the toy model's reads the world's scenes)
    teacher = Pix2PixZero.from_pretrained(
        settings["model"], preset=settings["preset"], device=args.device, dtype=args.dtype
    )
    direction = world_direction(teacher, edit)
    out = []
    with tqdm(total=len(inputs), desc=f"teacher {edit.name}", disable=not args.progress) as bar:
        for start in range(0, len(inputs), args.batch_size):
            chunk = inputs[start : start + args.batch_size]
            results = teacher.edit(
                chunk,
                [direction] * len(chunk),
                seeds=list(range(start, start + len(chunk))),
                num_steps=settings["num_steps"],
                xa_guidance=settings["xa_guidance"],
                guidance_scale=settings["guidance_scale"],
            )
            out.extend(r.edited for r in results)
            bar.update(len(chunk))
    return out


# ---------------------------------------------------------------------------------------------
# --pairs


def read_pairs(
    spec: str, limit: int | None = None, damaged: list | None = None, skipped: Skipped | None = None
):
    """(key, input image, edited image, metadata, mask image or None) from WebDataset shards.

    Samples without both images are left out; a damaged shard is read up to the damage (its
    :class:`ShardError` is appended to ``damaged`` when given, else logged); a sample whose images or
    metadata cannot be decoded goes to ``skipped`` (``SHARD:KEY`` and why) when given, else is logged.
    """
    from p2pz.data.pairs import sample as fmt
    from p2pz.data.pairs.reader import list_shards

    count = 0
    for url in list_shards(spec):
        samples = fmt.iter_shard(url, read=lambda member: member not in (fmt.RECON, fmt.LATENT))
        while True:
            try:
                raw = next(samples)
            except StopIteration:
                break
            except fmt.ShardError as err:
                if damaged is None:
                    log.warning("skipping the rest of an unreadable shard: %s", err)
                else:
                    damaged.append(err)
                break
            if not fmt.is_complete(raw):
                continue
            try:
                pair = fmt.decode_sample(raw)
            except Exception as err:  # noqa: BLE001 - image decoders raise many types for damaged bytes
                name, reason = f"{url}:{raw[fmt.KEY]}", f"corrupt pair ({type(err).__name__}: {err})"
                if skipped is None:
                    log.warning("%s: %s; skipped", name, reason)
                else:
                    skipped.add(name, reason)
                continue
            yield Path(pair.key).name, pair.source, pair.edited, pair.meta, pair.mask
            count += 1
            if limit is not None and count >= limit:
                return


def _edit_words(meta: dict) -> tuple[str, str]:
    edit = meta.get("edit") or {}
    source, target = edit.get("source"), edit.get("target")
    if not source or not target:
        raise UserError(
            "a pair's json has no edit.source / edit.target; score pairs written by `p2pz generate`"
        )
    return str(source), str(target)


def eval_pairs(args: argparse.Namespace, skipped: Skipped | None = None) -> dict:
    """Score existing pairs: world scenes with the oracle's metrics, real images with the paper's.

    Pairs that cannot be read go to ``skipped`` (and to the report's ``skipped``), the rest are scored.
    """
    from p2pz.data.eval.world_metrics import aggregate

    skipped = Skipped("inputs") if skipped is None else skipped
    world_scores, paper_pairs, shown, n = _read_and_sort_pairs(args, skipped)
    metrics: dict[str, Any] = {}
    for name, scores in world_scores.items():
        metrics[name] = {"metrics": "world", **aggregate(scores), "per_image": [s.to_dict() for s in scores]}
    if paper_pairs:
        metrics.update(_score_paper_pairs(args, paper_pairs, shown))
    return {
        "kind": "pairs",
        "settings": {"pairs": str(args.pairs), "count": n},
        "metrics": metrics,
        "skipped": [{"input": name, "reason": reason} for name, reason in skipped.inputs],
        "grid": shown,
    }


def _read_and_sort_pairs(args: argparse.Namespace, skipped: Skipped) -> tuple[dict, dict, list, int]:
    """Read every pair; score world scenes now, set real images (with their masks) aside by edit."""
    import numpy as np

    from p2pz.data.eval.world_metrics import scene_from_image, score_world_edit
    from p2pz.data.shapes.edits import is_world_edit, parse_world_edit

    world_scores: dict[str, list] = defaultdict(list)
    paper_pairs: dict[tuple[str, str], list] = defaultdict(list)
    shown: list = []
    n = 0
    damaged: list = []  # ShardErrors: the shards' readable pairs are scored, the rest reported
    for key, src, edited, meta, mask in read_pairs(args.pairs, args.limit, damaged, skipped):
        n += 1
        source, target = _edit_words(meta)
        use_world = args.metrics == "world" or (args.metrics == "auto" and is_world_edit(source, target))
        if use_world:
            edit = parse_world_edit(f"{source}:{target}")
            try:
                scene, masks = scene_from_image(src)
                score = score_world_edit(scene, edited, edit, input_image=src, input_masks=masks)
            except (ValueError, UserError) as err:
                if args.metrics == "world":
                    log.warning("pair %s: %s; skipped", key, err)
                    continue
                use_world = False  # not a world scene after all
            else:
                world_scores[edit.name].append(score)
                if len(shown) < GRID_PAIRS:
                    shown.append((src, edited, _world_label(score.to_dict())))
        if not use_world:
            mask = _mask_for(args, key, skipped) if mask is None else mask
            obj = None if mask is None else np.asarray(mask) >= 128
            paper_pairs[(source, target)].append((key, src, edited, obj))
    _check_some_pairs_read(args, n, damaged, skipped)
    return world_scores, paper_pairs, shown, n


def _mask_for(args: argparse.Namespace, key: str, skipped: Skipped) -> Any:
    """The object mask of pair ``key`` from ``--masks`` (``KEY.png``), or None (a damaged one: None, and
    the mask goes to ``skipped``; the pair is scored without BG LPIPS)."""
    from p2pz.data.pairs.inputs import InputSkipped, read_image_file

    path = Path(args.masks) / f"{key}.png" if args.masks else None
    if path is None or not path.is_file():
        return None
    try:
        return read_image_file(path, min_size=1, convert_modes=True).convert("L")
    except InputSkipped as why:
        skipped.add(path, f"{why}; its pair is scored without BG LPIPS")
        return None


def _check_some_pairs_read(args: argparse.Namespace, n: int, damaged: list, skipped: Skipped) -> None:
    """Stop when no pair could be read (one line); else name what was left out and go on."""
    for err in damaged:  # the pairs before the damage were read: the rest of the shard is left out
        skipped.add(err.path, f"damaged shard, the pairs after the damage not read ({err.reason})")
    if n == 0 and damaged:
        more = f" (and {len(damaged) - 1} more damaged shards)" if len(damaged) > 1 else ""
        raise UserError(
            f"no readable pairs: shard {damaged[0].path} is damaged ({damaged[0].reason}){more}; "
            "check the shards with 'p2pz shards inspect' and write them again with 'p2pz generate'"
        )
    skipped.check_some_usable(n)
    if n == 0:
        raise UserError(
            f"no (src.png, edit.png) pairs found in {args.pairs}; give the shards 'p2pz generate' wrote"
        )


def _score_paper_pairs(args: argparse.Namespace, paper_pairs: dict, shown: list) -> dict[str, Any]:
    """The paper's metrics (CLIP-Acc, background LPIPS, Structure Dist) per edit of real images."""
    from p2pz.data.eval import paper_metrics as pm

    clip = pm.ClipAccuracy(args.clip_model) if "clip" not in args.skip else None
    has_masks = any(p[3] is not None for pairs in paper_pairs.values() for p in pairs)
    with_lpips = "lpips" not in args.skip and has_masks
    lpips = pm.BackgroundLPIPS(backbone=args.lpips_backbone) if with_lpips else None
    structure = pm.StructureDistance(args.dino_model) if "structure" not in args.skip else None
    metrics: dict[str, Any] = {}
    for (source, target), pairs in paper_pairs.items():
        keys, inputs, edits, masks = zip(*pairs)
        report = pm.score_paper_metrics(
            list(inputs),
            list(edits),
            source,
            target,
            list(masks),
            clip=clip,
            lpips=lpips,
            structure=structure,
        )
        per = report.get("structure_dist_per_pair") or [math.nan] * len(keys)
        metrics[Edit(source, target).name] = {"metrics": "paper", **report}
        for src, edited, d in zip(inputs, edits, per):
            if len(shown) < GRID_PAIRS:
                shown.append((src, edited, f"{source}->{target} sd {d:.3f}"))
    return metrics


# ---------------------------------------------------------------------------------------------
# Outputs


def make_grid(pairs: list) -> Any:
    """input | edit tiles (or more images per entry) with a label under each, ``GRID_COLUMNS`` per row."""
    from PIL import Image, ImageDraw

    label_h = 14
    per_entry = max((len(p) - 1 for p in pairs), default=2)
    cols = max(1, min(GRID_COLUMNS if per_entry <= 2 else 2, len(pairs)))
    rows = max(1, math.ceil(len(pairs) / cols))
    cell_w, cell_h = per_entry * TILE + 8, TILE + label_h + 4
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (*images, label) in enumerate(pairs):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        for j, image in enumerate(images):
            tile = image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST)
            grid.paste(tile, (x + j * TILE, y))
        draw.text((x + 2, y + TILE + 1), label, fill=(0, 0, 0))
    return grid


def write_outputs(out: Path, report: dict) -> None:
    from p2pz.utils.atomic import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in report.items() if k != "grid"}
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(body, indent=1, default=str) + "\n")
    with atomic_path(out / "grid.png", suffix=".png") as tmp:
        make_grid(report["grid"]).save(tmp, format="PNG")


def summary_table(metrics: dict) -> str:
    lines = []
    for name, m in metrics.items():
        fields = [
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in m.items()
            if k
            in (
                "n",
                "success",
                "iou",
                "centre_shift_px",
                "psnr_outside",
                "clip_acc",
                "bg_lpips",
                "structure_dist",
                "psnr_to_teacher_db",
                "psnr_to_teacher_object_db",
                "copy_psnr_to_teacher_db",
                "copy_psnr_to_teacher_object_db",
                "psnr",
                "ssim",
                "lpips",
            )
        ]
        lines.append(f"{name}: " + ", ".join(fields))
    return "\n".join(lines)
