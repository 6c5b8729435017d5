"""``p2pz edit``: edit one image with pix2pix-zero and write the edit, the reconstruction and settings.

Outputs for ``--out OUT.png``: ``OUT.png`` (the edit), ``OUT.recon.png`` (the reconstruction: the
reference pass from the inverted noise with the unedited caption) and ``OUT.json`` (every setting
used, the caption, the direction's provenance, the model fingerprint and timings). Each file is
written atomically; inputs are checked before any model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pz.cli.options import add_device, add_dtype, add_edit, add_progress, add_seed, add_source_target
from p2pz.data.eval.calibration import LADDER_TEXT
from p2pz.data.shapes.teacher_settings import AUTO, xa_guidance_value
from p2pz.utils.values import int_at_least, non_negative_float, positive_int

if TYPE_CHECKING:
    from p2pz.teacher.directions import EditDirection
    from p2pz.teacher.pipeline import EditResult, Pix2PixZero

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """``OUT.png`` -> (``OUT.png``, ``OUT.recon.png``, ``OUT.json``)."""
    out = Path(out)
    return out, out.with_name(f"{out.stem}.recon{out.suffix}"), out.with_suffix(".json")


def _edit(args: argparse.Namespace) -> int:
    """``p2pz edit``: check the inputs, edit the image, then write the edit, reconstruction and settings."""
    from p2pz.teacher.images import load_image

    out, recon_path, sidecar = output_paths(args.out)
    _check_arguments(args, out)
    image = load_image(args.image)  # fails early on missing / corrupt / non-image files
    direction = _load_direction_file(args)  # before the model, so a bad file fails fast too
    teacher = _load_teacher(args)
    if direction is None:
        direction = teacher.direction(
            args.source, args.target, num_sentences=args.num_sentences, seed=args.seed
        )
    calibration = _calibrate_if_asked(args, teacher, image, direction)
    [result] = teacher.edit(
        [image],
        [direction],
        captions=[args.caption] if args.caption else None,
        seeds=args.seed,
        num_steps=args.steps,
        xa_guidance=args.xa_guidance,
        guidance_scale=args.guidance_scale,
    )
    settings = _edit_settings(args, teacher, direction, result, out, recon_path)
    if calibration is not None:
        settings["xa_guidance_calibration"] = calibration
    _write_outputs(result, settings, out, recon_path, sidecar)
    print(out)
    if not result.finite:
        print("warning: the edit has NaN/inf values (try --dtype float32)")
        return 1
    return 0


def _calibrate_if_asked(
    args: argparse.Namespace, teacher: Pix2PixZero, image: Any, direction: EditDirection
) -> dict[str, Any] | None:
    """``--xa-guidance auto``: set ``args.xa_guidance`` to the step calibrated on this image and
    return the calibration's record (None for a given step)."""
    if args.xa_guidance != AUTO:
        return None
    from p2pz.data.eval.calibration import calibrate_guidance
    from p2pz.data.eval.pair_scores import make_pair_scorer
    from p2pz.data.shapes import teacher_settings as toy
    from p2pz.data.shapes.edits import is_world_edit, model_vocabulary
    from p2pz.teacher.edits import Edit

    edit = Edit(direction.source, direction.target)
    scorer = make_pair_scorer("world" if is_world_edit(edit.source, edit.target) else "paper", edits=[edit])
    base = (
        toy.toy_calibration_base(teacher.preset)
        if model_vocabulary(args.model) is not None
        else teacher.preset.xa_guidance_real
    )
    calibration = calibrate_guidance(
        teacher,
        edit,
        direction,
        [image],
        scorer,
        base,
        captions=[args.caption] if args.caption else None,
        num_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    print(calibration.summary())
    args.xa_guidance = calibration.chosen
    return calibration.to_dict()


def _check_arguments(args: argparse.Namespace, out: Path) -> None:
    """Argument errors that argparse cannot see, raised before anything is loaded."""
    from p2pz.cli.options import source_target
    from p2pz.utils.errors import UserError

    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(
            f"--out must end in an image suffix ({', '.join(sorted(IMAGE_SUFFIXES))}), got '{out}'"
        )
    if args.direction is None:
        args.source, args.target = source_target(args)
        # a world model's unlearned word: one line listing the words it knows
        from p2pz.data.shapes.edits import check_edit_vocabulary
        from p2pz.teacher.edits import Edit

        check_edit_vocabulary(Edit(args.source, args.target), args.model)


def _load_direction_file(args: argparse.Namespace) -> EditDirection | None:
    """The ``--direction`` file(s), or None when the direction is computed from --source / --target."""
    if args.direction is None:
        return None
    from p2pz.teacher.directions import EditDirection

    return EditDirection.load(args.direction)


def _load_teacher(args: argparse.Namespace) -> Pix2PixZero:
    """The teacher, with progress bars unless --no-progress; no captioner when the caption is given."""
    from p2pz.teacher.pipeline import Pix2PixZero
    from p2pz.utils.devices import resolve_device

    teacher = Pix2PixZero.from_pretrained(
        args.model,
        preset=args.preset,
        device=resolve_device(args.device),
        dtype=args.dtype,
        captioner=False if args.caption else None,
    )
    teacher.progress = args.progress
    return teacher


def _edit_settings(
    args: argparse.Namespace,
    teacher: Pix2PixZero,
    direction: EditDirection,
    result: EditResult,
    out: Path,
    recon_path: Path,
) -> dict[str, Any]:
    """The sidecar's record: every setting used (preset values where no flag was given) and versions."""
    preset = teacher.preset
    return {
        "command": "p2pz edit",
        "image": str(args.image),
        "caption": result.caption,
        "caption_given": bool(args.caption),
        "seed": result.seed,
        "num_steps": args.steps or preset.num_steps,
        "xa_guidance": preset.xa_guidance_real if args.xa_guidance is None else args.xa_guidance,
        "guidance_scale": preset.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        "direction": {
            "source": direction.source,
            "target": direction.target,
            "file": str(args.direction) if args.direction else None,
            "norm": direction.norm,
            "metadata": dict(direction.metadata),
        },
        "teacher": teacher.settings,
        "fingerprint": teacher.fingerprint,
        "finite": result.finite,
        "timings": result.timings,
        "outputs": {"edit": out.name, "reconstruction": recon_path.name},
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide the numbers."""
    import platform

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
    }


def _write_outputs(
    result: EditResult, settings: dict[str, Any], out: Path, recon_path: Path, sidecar: Path
) -> None:
    """The reconstruction, the JSON sidecar, then the edit, each written atomically."""
    import json

    from p2pz.utils.atomic import atomic_path

    fmt = _pil_format(out)
    if result.reconstruction is not None:  # None: the preset runs no reference pass
        with atomic_path(recon_path, suffix=out.suffix) as tmp:
            result.reconstruction.save(tmp, format=fmt)
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, default=str) + "\n", "utf-8")
    with atomic_path(out, suffix=out.suffix) as tmp:  # the edit last: its presence means all is there
        result.edited.save(tmp, format=fmt)


def _pil_format(path: Path) -> str:
    """Pillow's format name for the file's suffix (temporary files have another suffix)."""
    from PIL import Image

    Image.init()
    return Image.EXTENSION[path.suffix.lower()]


def register(subparsers) -> None:
    from p2pz.teacher.presets import OFFICIAL, add_preset_argument

    p = subparsers.add_parser(
        "edit",
        help="edit an image with pix2pix-zero (e.g. cat -> dog)",
        description=(
            "Edit one image with pix2pix-zero: caption it with BLIP (or use --caption), invert it with\n"
            "regularised DDIM inversion, then denoise with the edit direction added to the caption while\n"
            "cross-attention guidance keeps the layout of the input.\n\n"
            "Writes OUT (the edit), OUT's name + .recon (the reconstruction without the edit) and a JSON\n"
            "sidecar (OUT with .json) with every setting used. The image is converted to RGB (transparency\n"
            "on white), its shorter side resized to the model's resolution and centre-cropped square.\n\n"
            "examples:\n"
            "  p2pz make-tiny models/tiny\n"
            "  p2pz edit --model models/tiny --image cat.png --edit cat:dog --out dog.png\n"
            "  p2pz edit --model CompVis/stable-diffusion-v1-4 --image cat.png --edit cat:dog \\\n"
            "      --device cuda --dtype float16 --out dog.png\n"
            "  p2pz edit --model models/tiny --image cat.png --direction directions/cat-dog.safetensors \\\n"
            "      --caption 'a cat on a sofa' --out dog.png"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, metavar="PATH_OR_ID", help="Stable Diffusion 1.x folder or Hub id"
    )
    p.add_argument("--image", required=True, metavar="IMG", help="image to edit (PNG, JPEG, WebP, ...)")
    add_edit(p, help="the edit, e.g. cat:dog (or --source cat --target dog; not needed with --direction)")
    add_source_target(p)
    p.add_argument("--out", required=True, metavar="OUT.png", help="where to write the edited image")
    p.add_argument("--caption", help="caption of the image (default: BLIP caption)")
    p.add_argument(
        "--direction",
        metavar="FILE",
        nargs="+",
        help="edit direction file from 'p2pz direction' (.safetensors), an official .pt, or two concept .pt",
    )
    add_preset_argument(p, OFFICIAL.name, "official")
    p.add_argument(
        "--steps", type=int_at_least(2), help=f"DDIM steps (default: the preset's, {OFFICIAL.num_steps})"
    )
    p.add_argument(
        "--xa-guidance",
        type=xa_guidance_value,
        help="cross-attention guidance step, higher keeps more layout "
        f"(default {OFFICIAL.xa_guidance_real}), or 'auto': the step that keeps most structure while the "
        f"edit happens on this image, among the base step x {LADDER_TEXT} (scored by the world's "
        "oracle, or CLIP + DINO; see p2pz calibrate)",
    )
    p.add_argument(
        "--guidance-scale",
        type=non_negative_float,
        help=f"classifier-free guidance scale (default: the preset's, {OFFICIAL.guidance_scale})",
    )
    add_seed(p, "the VAE sample, inversion and sentences")
    p.add_argument(
        "--num-sentences",
        type=positive_int,
        default=None,
        help="sentences per concept for the direction (default: 1000)",
    )
    add_device(p)
    add_dtype(p)
    add_progress(p)
    p.set_defaults(func=_edit)
