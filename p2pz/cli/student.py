"""``p2pz export``, ``p2pz apply`` and ``p2pz bench``: shipping and measuring a trained student."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from p2pz.cli.options import add_device, add_dtype, add_edit, add_list, add_progress
from p2pz.cli.skipped import Skipped
from p2pz.utils.errors import UserError
from p2pz.utils.values import non_negative_int, positive_int

BENCH_BACKENDS = ("eager", "compile", "pt2", "onnx")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def register(sub: argparse._SubParsersAction) -> None:
    _register_export(sub)
    _register_apply(sub)
    _register_bench(sub)


def _register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="package a trained student as a self-contained per-edit model",
        description=(
            "Write the EMA generator of a training checkpoint as a per-edit model folder: weights "
            "(safetensors), config.json (architecture, edit, teacher settings, data provenance), a "
            "torch.export program (.pt2, dynamic batch) and an ONNX file. Example:\n"
            "  p2pz export runs/cat-dog/checkpoints/last.ckpt --out models/cat-dog"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a .ckpt written by p2pz train (e.g. RUN/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="folder to write the package to (replaced atomically)")
    add_list(
        p,
        "--formats",
        nargs="*",
        default=["pt2", "onnx"],
        choices=("pt2", "onnx"),
        metavar="FORMAT",
        help="extra formats besides the safetensors weights, e.g. --formats pt2 onnx (default: pt2 onnx; "
        "none after the flag for none)",
    )
    p.add_argument(
        "--eval",
        nargs="?",
        const="held-out",
        default=None,
        metavar="SHARDS",
        help="score the package against its teacher (PSNR, SSIM, LPIPS; the oracle on shapes-world pairs) "
        "on the pairs its training held out (no value) or on SHARDS, and put the figures and a grid "
        "(input | teacher | student) into its card",
    )
    p.add_argument("--eval-limit", type=positive_int, default=64, help="pairs scored by --eval (default: 64)")
    p.add_argument(
        "--lpips-backbone",
        default=None,
        metavar="FILE",
        help="torchvision AlexNet state dict for --eval's LPIPS (default: torchvision's cached copy; "
        "without either, no LPIPS)",
    )
    p.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO",
        help="upload the package to this Hugging Face Hub repo (user/name; created if missing; needs "
        "'hf auth login' or HF_TOKEN)",
    )
    add_device(p, "--eval's student")
    p.set_defaults(func=cmd_export)


def _register_apply(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply",
        help="edit images with an exported student",
        description="Edit image files with an exported student. Each image is read as the teacher reads\n"
        "its inputs: converted to RGB (transparency on white), its shorter side resized to the model's\n"
        "resolution and the centred square cropped, so a non-square photo loses its edges (not squashed);\n"
        "each result is a square PNG at the model's resolution. Example:\n"
        "  p2pz apply models/cat-dog photos/*.jpg --out edited/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        help="an exported package: a folder (p2pz export) or a Hugging Face Hub repo id (user/name; "
        "from the local cache with HF_HUB_OFFLINE=1)",
    )
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument(
        "--out", required=True, help="output folder; each result is <name>.png at the model's resolution"
    )
    p.add_argument(
        "--backend",
        default="eager",
        choices=["eager", "pt2", "onnx"],
        help="how to run the model (default: eager; pt2 needs --trust-pt2)",
    )
    p.add_argument(
        "--trust-pt2",
        action="store_true",
        help="allow --backend pt2: loading the .pt2 program unpickles it, which can run code from the "
        "package, so pass this only for a package you made or trust (eager and onnx run no code from it)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per model call (default: 8)")
    add_edit(
        p,
        help="the edit to make, for a student of many edits (its config.json lists them; required there)",
    )
    p.add_argument(
        "--teacher",
        metavar="MODEL",
        help="zero-shot: an --edit the package does not list gets its conditioning from this teacher's "
        "text encoder (the model id or folder the package's pairs were made with)",
    )
    add_device(p, "the model (onnx on cuda needs onnxruntime-gpu)")
    add_dtype(p, what="the model (eager only; pt2 and onnx are float32)")
    add_progress(p)
    p.set_defaults(func=cmd_apply)


def _register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="latency of an exported student per backend, vs the teacher and the device's matmul peak",
        description=(
            "Measure an exported student: p50/p90/p99 latency and images/s per backend (eager, "
            "torch.compile, .pt2 with --trust-pt2, onnxruntime) and batch size, the teacher's time for one "
            "edit at the same resolution and the ratio, and a roofline figure (achieved FLOP/s over a matmul "
            "peak measured "
            "in the same run). Writes JSON and a PNG chart beside it. Example:\n"
            "  p2pz bench models/cat-dog --out bench.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        help="an exported package: a folder (p2pz export) or a Hugging Face Hub repo id (user/name; "
        "from the local cache with HF_HUB_OFFLINE=1)",
    )
    p.add_argument(
        "--out", default="bench.json", help="JSON report path; the chart is written beside it (.png)"
    )
    add_list(
        p,
        "--batches",
        positive_int,
        default=[1, 4, 16],
        metavar="N",
        help="batch sizes, e.g. --batches 1 4 16 (default: 1 4 16)",
    )
    add_list(
        p,
        "--backends",
        default=None,
        choices=BENCH_BACKENDS,
        metavar="BACKEND",
        help="backends out of eager compile pt2 onnx (default: all of them, pt2 only with --trust-pt2)",
    )
    p.add_argument(
        "--trust-pt2",
        action="store_true",
        help="also run the .pt2 program: loading it unpickles it, which can run code from the package, "
        "so pass this only for a package you made or trust",
    )
    add_device(p, "the student and the teacher (onnx on cuda needs onnxruntime-gpu)")
    add_dtype(
        p,
        what="the eager and compile backends (float16 / bfloat16: their error against float32 is in the "
        "report; pt2 and onnx stay float32)",
    )
    p.add_argument(
        "--iters",
        type=positive_int,
        default=20,
        help="timed calls per backend and batch, at least 20 for the percentiles (default: 20)",
    )
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls first (default: 3)")
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher model for the speed-up figure (default: the one recorded in the package; 'none' "
        "skips the teacher's edit, e.g. a real-size teacher on a CPU)",
    )
    p.add_argument(
        "--teacher-steps", type=positive_int, default=None, help="teacher DDIM steps (default: its preset's)"
    )
    add_progress(p)
    p.set_defaults(func=cmd_bench)


def cmd_export(args: argparse.Namespace) -> int:
    from p2pz.student.export import evaluate_into_package, export_package
    from p2pz.utils.devices import resolve_device

    finish = None
    if args.eval is not None:
        options = {"limit": args.eval_limit, "device": resolve_device(args.device)}
        options["lpips_backbone"] = args.lpips_backbone

        def finish(folder: Path, config: dict) -> None:  # scored before the folder is renamed into place
            report = evaluate_into_package(folder, args.eval, **options)
            if report.get("lpips_note"):
                print(f"note: {report['lpips_note']}")

    out = export_package(args.checkpoint, args.out, formats=tuple(args.formats), finish=finish)
    print(f"exported {args.checkpoint} -> {out}")
    if args.push_to_hub:
        from p2pz.student.card import push_to_hub

        print(f"uploaded {out} -> {push_to_hub(out, args.push_to_hub)}")
    return 0


def _image_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"image or folder {item} does not exist; check the path")
    if not files:
        raise UserError(
            f"no images found in {' '.join(paths)}; give image files ({', '.join(sorted(IMAGE_SUFFIXES))}) "
            "or folders that hold them"
        )
    return files


def read_images(files: list[Path], skipped: Skipped) -> tuple[list[Path], list[Any]]:
    """The files that are usable images and the images, read as ``p2pz generate`` reads a folder
    (:func:`p2pz.data.pairs.inputs.read_image_file`, every mode converted); the others go to ``skipped``."""
    from p2pz.data.pairs.inputs import InputSkipped, read_image_file

    usable, images = [], []
    for path in files:
        try:
            images.append(read_image_file(path, min_size=1, convert_modes=True))
        except InputSkipped as why:
            skipped.add(path, str(why))
            continue
        usable.append(path)
    return usable, images


def cmd_apply(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from p2pz.student.export import apply_to_images, load_exported, read_config, save_image_atomic
    from p2pz.utils.devices import resolve_device, torch_dtype

    device = resolve_device(args.device)
    dtype = torch_dtype(args.dtype)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the edited images")
    skipped = Skipped("images")
    # read everything first: nothing readable stops the job before anything is written, with one line
    files, images = read_images(_image_files(args.images), skipped)
    config = read_config(args.model)
    skipped.check_some_usable(len(files))  # after the package's check: a bad package is its own line
    edit = chosen_edit(args, config)
    model = load_exported(args.model, args.backend, device, trust_pt2=args.trust_pt2, dtype=dtype, edit=edit)
    out.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    starts = range(0, len(images), args.batch_size)
    for start in tqdm(starts, desc="editing", unit="batch", disable=not args.progress):
        chunk = files[start : start + args.batch_size]
        edited = apply_to_images(
            model, config["resolution"], images[start : start + args.batch_size], device=device, dtype=dtype
        )
        for path, image in zip(chunk, edited):
            name = path.stem
            while name in names:  # same stem in two folders: keep both
                name += "_"
            names.add(name)
            save_image_atomic(image, out / f"{name}.png")
    print(f"wrote {len(files)} edited images to {out}{skipped.summary()}")
    skipped.raise_if_any(f"the other {len(files)} are in {out}")
    return 0


def chosen_edit(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """The conditioning vector of ``--edit`` for a student of many edits (None for a per-edit one): one
    the package lists, or, with ``--teacher``, one computed by that teacher's text encoder."""
    from p2pz.student.package import edit_conditioning_of, edits_line, known_edit_vector, package_edits

    if not package_edits(config):
        if args.edit is not None or args.teacher is not None:
            raise UserError(f"{args.model} makes one edit: drop --edit and --teacher")
        return None
    if args.edit is None:
        raise UserError(f"{args.model} makes many edits: choose one with --edit ({edits_line(config)})")
    vector = edit_conditioning_of(config, args.edit)
    if vector is not None:
        return vector
    if args.teacher is None:
        known_edit_vector(config, args.edit, f"{args.model} (give --teacher MODEL to try it zero-shot)")
    return zero_shot_conditioning(args.teacher, args.edit)


def zero_shot_conditioning(teacher_model: str, spec: str) -> Any:
    """An edit's conditioning from a teacher's text encoder, computed as the training edits' were."""
    from p2pz.cli.directions import direction_for
    from p2pz.student.conditioning import edit_conditioning
    from p2pz.teacher.pipeline import Pix2PixZero

    teacher = Pix2PixZero.from_pretrained(teacher_model, device="cpu", captioner=False)  # text only
    return edit_conditioning(direction_for(teacher, spec))


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from p2pz.student.export import read_config

    read_config(args.model)  # not a package: one line, before the ops (and torch's notes) are loaded

    from p2pz.student.bench import run_benchmark, select_backends, write_report
    from p2pz.utils.devices import resolve_device

    batches = args.batches
    if not batches:
        raise UserError("--batches needs at least one batch size, e.g. --batches 1 4 16")
    backends = args.backends
    select_backends(backends, args.trust_pt2)  # refuse an untrusted pt2 before the progress bar starts
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; give the path of the JSON report (e.g. bench.json)")
    # shown after a second: a package that fails to load stops with its one error line only
    bar = tqdm(desc="bench", unit="step", delay=1.0, disable=not args.progress)

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg, refresh=False)
        bar.update(1)

    try:
        report = run_benchmark(
            args.model,
            batches=batches,
            backends=backends,
            trust_pt2=args.trust_pt2,
            device=resolve_device(args.device),
            dtype=args.dtype,
            warmup=args.warmup,
            iters=args.iters,
            teacher_model=args.teacher,
            teacher_steps=args.teacher_steps,
            progress=progress,
        )
    except BaseException:
        bar.leave = False  # the error line follows on its own
        raise
    finally:
        bar.close()
    path, chart = write_report(report, Path(args.out))
    for note in report.get("skipped_backends", {}).values():
        print(f"note: {note}")
    print(json.dumps({k: report[k] for k in ("teacher_ms", "teacher_over_student", "roofline_fraction")}))
    print(f"wrote {path} and {chart}")
    return 0
