"""``p2pz demo``: the whole job end to end on the built-in default, on a laptop-class CPU.

The same code paths as a cluster run, at toy scale:

1. inputs   — shapes-world scenes with their ground truth (``p2pz.data.shapes``);
2. teacher  — pix2pix-zero with the shipped toy model edits them into WebDataset shards
              (``p2pz.data.pairs.generate``, exactly what ``p2pz generate`` runs), each pair scored by
              the world's oracle; the pairs ``--keep-if`` keeps (the teacher's successes) are copied
              into ``shards-kept/`` (``p2pz shards filter``);
3. student  — ``p2pz train fit`` (LightningCLI) trains the ``lite`` CoModGAN on the kept shards;
4. export   — the per-edit package (``p2pz export``);
5. bench    — latency per backend, teacher / student, roofline (``p2pz bench``);
6. report   — ``report.html``: input | teacher | student on held-out scenes, scored by the world's
              oracle, and the latency chart.

Each stage says how long it took, and the end of the output (and the report) has the split. Messages
from libraries that a user of the demo can do nothing about (deprecations inside Lightning, "No CUDA
runtime is found" on a CPU machine, Lightning's tips) are filtered, each by its own text, as in every
command (:mod:`p2pz.cli.quiet`); everything else, the project's own warnings included, still shows.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import html
import importlib.resources
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pz.cli import check_config_file
from p2pz.cli.options import add_device, add_dtype, add_edit, add_list, add_progress, add_seed, hidden_alias
from p2pz.cli.student import BENCH_BACKENDS
from p2pz.data.models import TOY_MODEL
from p2pz.data.shapes.teacher_settings import (
    AUTO,
    DEMO_PRESET,
    TOY_PRESET,
    add_toy_teacher_arguments,
    toy_xa_guidance,
)
from p2pz.utils.errors import UserError
from p2pz.utils.formatting import format_duration, format_number, format_ratio
from p2pz.utils.values import positive_int

if TYPE_CHECKING:
    from PIL import Image

    from p2pz.teacher.directions import EditDirection
    from p2pz.teacher.pipeline import Pix2PixZero

TRAIN_CONFIG = "cpu.yaml"  # of the configs shipped as p2pz.configs (the repository's configs/)
DEFAULT_EDIT = "circle:square"
DEMO_STEPS = 20  # the teacher's DDIM steps: a demo on two cores (docs/results/demo.md)
HELD_OUT_SEED = 10_000  # test scenes are drawn from seeds the training scenes never use
DEFAULT_KEEP_IF = "success"  # train on the teacher's successes only (the oracle's verdict on each pair)
# The demo's benchmark is shorter than `p2pz bench`'s (all backends, batches 1,4,16, 20 calls): the two
# backends a user ships (the .pt2 program and ONNX) next to eager, without torch.compile's minutes of
# compiling on a CPU.
DEMO_BENCH_BACKENDS = ("eager", "pt2", "onnx")
DEMO_BENCH_BATCHES = (1, 16)
DEMO_BENCH_ITERS = 10


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole job end to end on the built-in default (shapes world, CPU)",
        description=(
            "Teacher -> shards -> student training -> export -> benchmark -> report, on the shapes world "
            "with the toy diffusion model the project ships. Takes about 10 minutes on a 2-core CPU and "
            "leaves DIR/report.html, DIR/model/ (the exported student) and DIR/bench.json. Example:\n"
            "  p2pz demo --out demo_out"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder for everything the demo makes")
    p.add_argument("--model", default=str(TOY_MODEL), help="teacher model (default: the shipped toy model)")
    add_edit(p, default=DEFAULT_EDIT, help=f"the shapes-world edit (default: {DEFAULT_EDIT})")
    p.add_argument(
        "--num-pairs", type=positive_int, default=192, help="teacher pairs to generate (default: 192)"
    )
    hidden_alias(p, "--pairs", "num_pairs", type=positive_int)  # the flag's name before --num-pairs
    p.add_argument(
        "--steps", type=positive_int, default=DEMO_STEPS, help=f"teacher DDIM steps (default: {DEMO_STEPS})"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="teacher batch size (default: 8)")
    add_toy_teacher_arguments(p, toy_xa_guidance(DEMO_PRESET), DEMO_PRESET)  # 20 steps: see DEMO_PRESET
    p.add_argument(
        "--train-steps",
        type=positive_int,
        default=None,
        help="student training iterations (default: the training config's trainer.max_steps)",
    )
    p.add_argument(
        "--train-config",
        default=str(importlib.resources.files("p2pz.configs") / TRAIN_CONFIG),
        help=f"'p2pz train' config (default: the shipped configs/{TRAIN_CONFIG})",
    )
    p.add_argument(
        "--keep-if",
        default=DEFAULT_KEEP_IF,
        metavar="RULE",
        help=f"train only on the pairs whose oracle scores pass RULE (default: {DEFAULT_KEEP_IF!r}, the "
        "teacher's successes; e.g. 'success and iou >= 0.8'; '' trains on every pair). See 'p2pz shards "
        "filter --help' for the scores",
    )
    p.add_argument(
        "--test-scenes", type=positive_int, default=16, help="held-out scenes in the report (default: 16)"
    )
    add_list(
        p,
        "--bench-backends",
        default=list(DEMO_BENCH_BACKENDS),
        choices=BENCH_BACKENDS,
        metavar="BACKEND",
        help=f"backends to benchmark (default: {' '.join(DEMO_BENCH_BACKENDS)}; 'p2pz bench' also times "
        "compile)",
    )
    add_list(
        p,
        "--bench-batches",
        positive_int,
        default=list(DEMO_BENCH_BATCHES),
        metavar="N",
        help=f"batch sizes to benchmark (default: {' '.join(map(str, DEMO_BENCH_BATCHES))})",
    )
    p.add_argument(
        "--bench-iters",
        type=positive_int,
        default=DEMO_BENCH_ITERS,
        help=f"timed calls per backend and batch (default: {DEMO_BENCH_ITERS})",
    )
    add_seed(p, "the scenes, the teacher's edits and the training")
    add_device(p, "the teacher and the student's benchmark (training follows --train-config)")
    add_dtype(p, what="the teacher")
    add_progress(p)
    p.set_defaults(func=cmd_demo)


# ------------------------------------------------------------------------------------------------
# Stages


def make_scenes(edit_source: str, count: int, first_seed: int) -> list[Any]:
    """World scenes whose one object has the edit's source attribute (shape or colour)."""
    from p2pz.data.shapes import world

    if edit_source in world.SHAPES:
        kwargs = {"shapes": (edit_source,)}
    elif edit_source in world.COLOURS:
        kwargs = {"colours": (edit_source,)}
    else:
        raise UserError(
            f"'{edit_source}' is not a shape or colour of the shapes world "
            f"({', '.join(world.SHAPES + tuple(world.COLOURS))})"
        )
    return [world.sample_scene(first_seed + i, **kwargs) for i in range(count)]


def write_inputs(scenes: list[Any], folder: Path) -> None:
    from p2pz.data.shapes import world

    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        world.render(scene).save(folder / f"scene{i:05d}.png")
    truth = [dataclasses.asdict(s) for s in scenes]
    (folder.parent / f"{folder.name}-scenes.json").write_text(json.dumps(truth))


def demo_settings(args: argparse.Namespace, **more: Any) -> Any:
    """``p2pz generate`` settings of the demo's teacher (--device, --dtype, the demo's preset)."""
    from p2pz.data.pairs.generate import Settings

    return Settings(
        model=args.model,
        preset=args.preset,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
        **more,
    )


def save_world_direction(args: argparse.Namespace, out: Path, teacher: Any) -> tuple[Path, Any]:
    """The edit's direction from the world's captions, saved for the generator and kept for the report.

    Computed on every run (a second or so), so a re-run into the same folder with another edit or
    model never picks up a stale file; the same edit gives the same tensor, whose digest is what
    resumed shards check.
    """
    from p2pz.data.shapes.edits import parse_world_edit, world_direction

    direction = world_direction(teacher, parse_world_edit(args.edit))
    return direction.save(out / "direction.safetensors"), direction


def resolve_guidance(args: argparse.Namespace, out: Path, teacher: Any, direction: Any) -> None:
    """``--xa-guidance auto``: the step calibrated for the edit on seeded world scenes (neither the
    demo's inputs nor its held-out scenes), printed and saved as ``calibration.json``."""
    if args.xa_guidance != AUTO:
        return
    from p2pz.data.eval.calibration import calibrate_world_edit
    from p2pz.data.shapes.edits import parse_world_edit

    calibration = calibrate_world_edit(
        teacher,
        parse_world_edit(args.edit),
        toy_xa_guidance(args.preset),
        direction=direction,
        num_steps=args.steps,
        guidance_scale=args.guidance_scale,
    )
    print(calibration.summary(), flush=True)
    (out / "calibration.json").write_text(json.dumps(calibration.to_dict(), indent=1) + "\n")
    args.xa_guidance, args.calibrated = calibration.chosen, True


def generate_pairs(args: argparse.Namespace, out: Path, inputs: Path, direction: Path, teacher: Any) -> dict:
    """The teacher's pairs into ``out``, each scored by the world's oracle (its ``json``'s ``scores``)."""
    from p2pz.data.eval.pair_scores import WorldPairScorer
    from p2pz.data.pairs.generate import run

    settings = demo_settings(
        args,
        out=str(out),
        direction=[str(direction)],
        guidance_scale=args.guidance_scale,
        xa_guidance=args.xa_guidance,
        inputs=str(inputs),
        samples_per_shard=max(4, args.num_pairs // 8),  # 8 shards or more: one is held out
        batch_size=args.batch_size,
        seed=args.seed,
        steps=args.steps,
    )
    return run(settings, teacher=teacher, scorer=WorldPairScorer())


def keep_pairs(args: argparse.Namespace, shards: Path, kept: Path) -> dict[str, Any]:
    """The pairs ``--keep-if`` keeps, copied into ``kept`` (made anew on every run: the rule may differ);
    its ``filter.json`` record. An empty rule keeps every pair where it is."""
    from p2pz.data.pairs.filtering import filter_shards

    shutil.rmtree(kept, ignore_errors=True)  # the demo's own folder, made from `shards` alone
    if not args.keep_if.strip():
        return {"keep_if": None, "pairs_kept": None, "kept_fraction": None, "shards": str(shards)}
    report = filter_shards(shards, kept, args.keep_if)
    if not report["pairs_kept"]:
        raise UserError(
            f"--keep-if {args.keep_if!r} kept none of the {report['pairs_in']} pairs; loosen it (or give '' "
            "to train on every pair)"
        )
    return report | {"shards": str(kept)}


def train_student(args: argparse.Namespace, shards: Path, run_dir: Path) -> Path:
    """``p2pz train fit`` in a subprocess (the installed package's LightningCLI, as a cluster job runs it)."""
    cmd = [
        sys.executable,
        "-m",
        "p2pz.cli.demo",  # `p2pz train fit` with the demo's filter of library noise (see train_main)
        "fit",
        "--config",
        args.train_config,
        "--data.shards",
        str(shards),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.max_steps",
        str(train_steps(args)),
        "--seed_everything",
        str(args.seed),
        "--trainer.enable_model_summary",  # its FLOPs column reads 0 for the project's custom ops
        "false",
    ]
    if not args.progress:
        cmd += ["--trainer.enable_progress_bar", "false"]
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        cmd += ["--ckpt_path", "last"]  # a demo interrupted in training picks up where it was
    result = subprocess.run(cmd)  # in the caller's folder: shards, run_dir and the config may be relative
    if result.returncode != 0:
        raise UserError(f"student training failed (exit {result.returncode}); see the output above")
    return run_dir / "checkpoints" / "last.ckpt"


def edit_held_out(
    args: argparse.Namespace, scenes: list[Any], model_dir: Path, direction: Any, teacher: Any
) -> dict[str, list]:
    """Teacher and student edits of the held-out scenes (the student from its exported package)."""
    from tqdm import tqdm

    from p2pz.data.shapes import world
    from p2pz.student.export import apply_to_images, load_exported, read_config

    inputs = [world.render(s) for s in scenes]
    teacher_out = []
    starts = range(0, len(inputs), args.batch_size)
    desc = "teacher, held-out scenes"
    for start in tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True, disable=not args.progress):
        chunk = inputs[start : start + args.batch_size]
        results = teacher.edit(
            chunk,
            [direction] * len(chunk),
            seeds=list(range(start, start + len(chunk))),
            num_steps=args.steps,
            xa_guidance=args.xa_guidance,
            guidance_scale=args.guidance_scale,
        )
        teacher_out.extend(r.edited for r in results)
    student = load_exported(model_dir, "eager", args.device)
    student_out = apply_to_images(student, read_config(model_dir)["resolution"], inputs, device=args.device)
    # the oracle scores at the world's size; a student trained at another resolution is resized to it
    student_out = [im if im.size == x.size else im.resize(x.size) for im, x in zip(student_out, inputs)]
    return {"input": inputs, "teacher": teacher_out, "student": student_out}


def score(scenes: list[Any], images: list[Any], edit: str) -> dict[str, Any]:
    from p2pz.data.eval.world_metrics import score_world_edits

    return score_world_edits(scenes, images, edit)


def verdict(entry: dict) -> str:
    """One scene's oracle reading as a short line for the report."""
    mark = "edited" if entry.get("success") else "not edited"
    iou, shift = entry.get("iou"), entry.get("centre_shift_px")
    details = [mark]
    if iou is not None:
        details.append(f"IoU {iou:.2f}")
    if shift is not None:
        details.append(f"shift {shift:.1f} px")
    return ", ".join(details)


# ------------------------------------------------------------------------------------------------
# Report


def _png_data_uri(image: Any, scale: int = 2) -> str:
    from PIL import Image

    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _data_uri(buffer.getvalue())


def _data_uri(png: bytes) -> str:
    """PNG bytes inlined, so that the report is one self-contained file."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return format_number(value)
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    "img{image-rendering:pixelated;display:block}.big{font-size:1.4em}"
)
METRICS_NOTE = (
    "success: the oracle reads the target attribute on the edited object; iou: mask IoU of the edited "
    "object with the input's; centre_shift_px: median movement of the object's centre; psnr_outside: "
    "PSNR outside the object's mask."
)


FIDELITY_NOTE = (
    "psnr_to_teacher_db: PSNR of the edit to the teacher's edit of the same scene (whole image); "
    "psnr_to_teacher_object_db: the same inside the objects (the union of the input's and the teacher's "
    "object masks), where a student that half-copies its input leaves a ghost of the source shape. "
    "'copy the input' is the baseline of not editing at all. The difference image shows student − "
    "teacher on grey (4× contrast): grey where they agree."
)


def write_demo_report(
    path: Path,
    *,
    edit: str,
    images: dict[str, list[Image.Image]],
    scores: dict[str, dict[str, Any]],
    per_scene: dict[str, list[str]],
    bench: dict[str, Any],
    timings: dict[str, float],
    facts: dict[str, Any],
    chart: Path,
) -> None:
    """The demo's ``report.html``: a single self-contained HTML file (images inlined).

    The student's fidelity to its teacher (``p2pz.data.eval.fidelity``) is computed here from the
    held-out images, so the report shows it whatever the caller scored.
    """
    from p2pz.utils.atomic import atomic_path

    fid = _fidelity(images)
    title = html.escape(edit.replace(":", " → "))
    page = "\n".join(
        [
            f"<!doctype html><html><head><meta charset='utf-8'><title>p2pz demo: {title}</title>",
            f"<style>{STYLE}</style></head><body>",
            f"<h1>pix2pix-zero → student: <code>{title}</code></h1>",
            f"<p class=big>{_headline(bench)}</p>",
            "<h2>Held-out scenes</h2>",
            _held_out_grid(images, per_scene, fid),
            "<h2>Scores on the shapes world (oracle, and fidelity to the teacher)</h2>",
            _scores_table(scores, fid),
            f"<p>{METRICS_NOTE}</p>",
            f"<p>{html.escape(FIDELITY_NOTE)}</p>" if fid else "",
            f"<h2>Student latency (p50 / p99, {html.escape(bench['device'])})</h2>",
            _latency_table(bench),
            f"<p>{_roofline(bench)}</p>",
            _chart_img(chart),
            "<h2>Run</h2>",
            _run_table(facts, timings),
            "</body></html>",
        ]
    )
    with atomic_path(path, suffix=".html") as tmp:
        tmp.write_text(page)


def _fidelity(images: dict[str, list[Image.Image]]) -> dict[str, Any] | None:
    """The student's and the copy baseline's PSNR to the teacher (None without teacher images)."""
    if not images.get("teacher") or not images.get("student"):
        return None
    from p2pz.data.eval.fidelity import fidelity

    return fidelity(images["input"], images["teacher"], images["student"])


def _held_out_grid(
    images: dict[str, list[Image.Image]], per_scene: dict[str, list[str]], fid: dict[str, Any] | None = None
) -> str:
    """Held-out scenes: input | teacher | student (| student − teacher), then the per-scene verdicts."""
    from p2pz.data.eval.fidelity import difference_image

    judges = [who for who in ("teacher", "student") if per_scene.get(who)]
    grid_rows = []
    for i in range(len(images["input"])):
        row = [f"<img src='{_png_data_uri(images[col][i])}'>" for col in ("input", "teacher", "student")]
        if fid:
            diff = difference_image(images["student"][i], images["teacher"][i])
            figures = fid["per_image"][i]
            row.append(
                f"<img src='{_png_data_uri(diff)}'>{figures['psnr_to_teacher_db']:.1f} dB "
                f"(objects {figures['psnr_to_teacher_object_db']:.1f} dB)"
            )
        row += [html.escape(str(per_scene[who][i])) for who in judges]
        grid_rows.append(row)
    header = ["input", "teacher (pix2pix-zero)", "student"]
    header += ["student − teacher, PSNR to teacher"] if fid else []
    header += [f"{w} (oracle)" for w in judges]
    return _table(header, grid_rows)


def _scores_table(scores: dict[str, dict[str, Any]], fid: dict[str, Any] | None = None) -> str:
    """One row per model (and the copy-the-input baseline), one column per numeric metric of any of them."""
    scores = dict(scores)
    if fid:
        scores["student"] = {
            **scores.get("student", {}),
            "psnr_to_teacher_db": fid["psnr_to_teacher_db"],
            "psnr_to_teacher_object_db": fid["psnr_to_teacher_object_db"],
        }
        scores["copy the input"] = {
            "psnr_to_teacher_db": fid["copy_psnr_to_teacher_db"],
            "psnr_to_teacher_object_db": fid["copy_psnr_to_teacher_object_db"],
        }
    metrics = sorted({k for s in scores.values() for k, v in s.items() if isinstance(v, (int, float))})
    score_rows = [[who] + [_fmt(s.get(m, "")) for m in metrics] for who, s in scores.items()]
    return _table([""] + metrics, score_rows)


def _latency_table(bench: dict[str, Any]) -> str:
    """The student's latency and throughput per backend (rows) and batch size (columns)."""
    batches = sorted({b for r in bench["student"].values() for b in r}, key=int)
    latency_rows = [
        [backend]
        + [
            f"{r[b]['p50_ms']:.2f} / {r[b]['p99_ms']:.2f} ms, {r[b]['images_per_s']:.0f} img/s"
            if b in r
            else ""
            for b in batches
        ]
        for backend, r in bench["student"].items()
    ]
    return _table(["backend"] + [f"batch {b}" for b in batches], latency_rows)


def _headline(bench: dict[str, Any]) -> str:
    """The point of the job in one sentence: how much faster the student edits than its teacher."""
    speedup = bench.get("teacher_over_student")
    student_b1 = [r["1"]["p50_ms"] for r in bench["student"].values() if "1" in r]
    times = f"{format_ratio(speedup)}×" if speedup else "n/a"
    return (
        f"The student edits in one forward pass, <b>{times}</b> faster than "
        f"the teacher it learned from ({_fmt(bench.get('teacher_ms'))} ms vs "
        f"{_fmt(min(student_b1)) if student_b1 else 'n/a'} ms per image on {html.escape(bench['device'])})."
    )


def _roofline(bench: dict[str, Any]) -> str:
    """How close the student gets to the device's measured matmul peak."""
    return (
        f"Roofline: the student reaches {_fmt(bench.get('roofline_fraction'))} of this device's "
        f"measured fp32 matmul peak ({_fmt(bench.get('matmul_peak_flops', 0) / 1e9)} GFLOP/s)."
    )


def _chart_img(chart: Path) -> str:
    """The bench's latency chart inlined, or nothing when the bench wrote none."""
    if not chart.exists():
        return ""
    return f"<img src='{_data_uri(chart.read_bytes())}' style='image-rendering:auto;max-width:100%'>"


def _run_table(facts: dict[str, Any], timings: dict[str, float]) -> str:
    """What ran (settings, versions) and the seconds of each stage."""
    run_rows = [[html.escape(k), _fmt(v)] for k, v in facts.items()]
    run_rows += [[html.escape(k), f"{v:.0f} s"] for k, v in timings.items()]
    return _table(["", ""], run_rows)


# ------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """``p2pz demo``: the six stages into ``--out``, each timed, then where the results are."""
    from p2pz.data.pairs.generate import load_teacher
    from p2pz.student.export import add_to_package, bench_summary, export_package
    from p2pz.utils.devices import resolve_device

    args.device = resolve_device(args.device)
    out = Path(args.out)
    source = _check_demo_inputs(args)  # before anything is written
    demo_started = started = time.perf_counter()
    teacher = load_teacher(demo_settings(args))  # one teacher for the pairs and the report; a bad
    teacher_load_s = time.perf_counter() - started  # model stops the demo before anything is written
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    with _stage(timings, "inputs", f"1/6 inputs: {args.num_pairs} shapes-world scenes"):
        write_inputs(make_scenes(source, args.num_pairs, args.seed * 1_000_000), out / "inputs")

    teacher_title = f"2/6 teacher: pix2pix-zero {args.edit} into shards ({args.steps} steps)"
    with _stage(timings, "teacher (generate)", teacher_title):
        direction_file, direction = save_world_direction(args, out, teacher)
        resolve_guidance(args, out, teacher, direction)
        generate_pairs(args, out / "shards", out / "inputs", direction_file, teacher)
        kept = keep_pairs(args, out / "shards", out / "shards-kept")
        print(_kept_line(args, kept), flush=True)
    timings["teacher (generate)"] += teacher_load_s

    with _stage(timings, "student (train)", f"3/6 student: p2pz train fit, {train_steps(args)} iterations"):
        checkpoint = train_student(args, Path(kept["shards"]), out / "run")

    with _stage(timings, "export", "4/6 export"):
        export_package(
            checkpoint,
            out / "model",
            extra={"teacher_model": str(args.model)},
            finish=lambda folder, config: _evaluate_into_card(args, folder, config),
        )

    with _stage(timings, "bench", "5/6 bench"):
        bench, bench_json, chart = _bench_student(args, out)
        add_to_package(out / "model", bench=bench_summary(bench))  # the card's latency table

    with _stage(timings, "report", f"6/6 report: {args.test_scenes} held-out scenes"):
        images, scores, per_scene = _score_held_out(args, out, source, teacher, direction)
    timings["total"] = time.perf_counter() - demo_started
    write_demo_report(
        out / "report.html",
        edit=args.edit,
        images=images,
        scores=scores,
        per_scene=per_scene,
        bench=bench,
        timings=timings,
        facts=_demo_facts(args, out, kept),
        chart=chart,
    )
    print(f"\n{stage_split(timings)}")
    print(f"\nreport: {out / 'report.html'}\nmodel: {out / 'model'}\nbench: {bench_json}")
    print(f"try it in the browser: p2pz app {out / 'model'} --teacher {args.model}  (needs the [app] extra)")
    return 0


def train_steps(args: argparse.Namespace) -> int:
    """``--train-steps``, or the training config's ``trainer.max_steps`` (one place for the recipe)."""
    if args.train_steps is not None:
        return args.train_steps
    import yaml

    config = yaml.safe_load(Path(args.train_config).read_text()) or {}
    steps = (config.get("trainer") or {}).get("max_steps")
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"{args.train_config} gives no trainer.max_steps: pass --train-steps")
    return steps


def stage_split(timings: dict[str, float]) -> str:
    """The seconds of each stage and the whole, as the demo's last lines say them."""
    total = timings.get("total") or sum(timings.values())
    parts = [f"{k} {v:.0f} s ({v / total:.0%})" for k, v in timings.items() if k != "total" and total > 0]
    return f"time per stage: {', '.join(parts)}; total {format_duration(total)}"


def _kept_line(args: argparse.Namespace, kept: dict[str, Any]) -> str:
    if kept.get("keep_if") is None:
        return "   training on every pair (--keep-if '')"
    return (
        f"   kept {kept['pairs_kept']} of {kept['pairs_in']} pairs ({kept['kept_fraction']:.0%}) "
        f"with --keep-if {kept['keep_if']!r}"
    )


def _check_demo_inputs(args: argparse.Namespace) -> str:
    """The edit's source word, after checking that the teacher model is there and the edit is the world's."""
    from p2pz.data.shapes.edits import parse_world_edit

    model = Path(args.model)
    # a local folder needs its model_index.json; "owner/name" may be a Hub id
    if not (model / "model_index.json").is_file() and not str(args.model).count("/") == 1:
        raise UserError(
            f"teacher model not found at {args.model}; the toy model ships in data/toy_model "
            "(reinstall from the repository) or pass --model"
        )
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; give a folder for everything the demo makes")
    # read now, not at stage 3 after the teacher has run for minutes
    check_config_file(args.train_config, "--train-config")
    train_steps(args)  # the iterations come from it unless --train-steps gives them
    if args.keep_if.strip():
        from p2pz.data.eval.pair_scores import WORLD_SCORES
        from p2pz.data.pairs.filtering import parse_keep_if

        parse_keep_if(args.keep_if).check_names(WORLD_SCORES, "the world's oracle")
    return parse_world_edit(args.edit, args.model).source


@contextlib.contextmanager
def _stage(timings: dict[str, float], key: str, title: str) -> Iterator[None]:
    """Announce a stage, then record its seconds under ``key`` when it ends."""
    print(f"\n== {title}", flush=True)
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start
    print(f"   done in {format_duration(timings[key])}", flush=True)


def _evaluate_into_card(args: argparse.Namespace, folder: Path, config: dict[str, Any]) -> None:
    """``p2pz export --eval``: the student against its teacher on the pairs its training held out,
    into the package's card (PSNR, SSIM, the oracle; a grid)."""
    from p2pz.student.export import evaluate_into_package

    if not ((config.get("data") or {}).get("split") or {}).get("val_shards"):
        print("   note: no held-out shard (too few pairs): the card has no held-out metrics", flush=True)
        return
    report = evaluate_into_package(folder, None, device=args.device)
    teacher = report["to_teacher"]
    print(f"   held-out pairs: {report['n']}, PSNR to the teacher {teacher['psnr']:.1f} dB", flush=True)


def _bench_student(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], Path, Path]:
    """``p2pz bench`` of the exported package and the teacher (for the speed-up): (report, JSON, chart)."""
    from p2pz.student.bench import run_benchmark
    from p2pz.student.bench import write_report as write_bench

    bench = run_benchmark(
        out / "model",
        batches=list(args.bench_batches),
        backends=list(args.bench_backends),
        device=args.device,
        trust_pt2=True,  # the package the demo exported a moment ago, not a file from elsewhere
        iters=args.bench_iters,
        teacher_model=str(args.model),
        teacher_steps=args.steps,
        progress=lambda msg: print(f"   {msg}", flush=True),
    )
    bench_json, chart = write_bench(bench, out / "bench.json")
    return bench, bench_json, chart


def _score_held_out(
    args: argparse.Namespace, out: Path, source: str, teacher: Pix2PixZero, direction: EditDirection
) -> tuple[dict[str, list[Image.Image]], dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Teacher and student edits of held-out scenes, scored by the oracle (also into ``scores.json``).

    Returns the images, the scores without their per-image entries, and those as per-scene verdicts.
    """
    scenes = make_scenes(source, args.test_scenes, HELD_OUT_SEED + args.seed * 1_000_000)
    images = edit_held_out(args, scenes, out / "model", direction, teacher)
    scores = {
        "teacher": score(scenes, images["teacher"], args.edit),
        "student": score(scenes, images["student"], args.edit),
    }
    (out / "scores.json").write_text(json.dumps(scores, indent=2, default=str))
    per_scene = {who: [verdict(e) for e in s.pop("per_image")] for who, s in scores.items()}
    return images, scores, per_scene


def _demo_facts(args: argparse.Namespace, out: Path, kept: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's settings and machine, for the report's last table."""
    kept = kept or {}
    return {
        "teacher model": args.model,
        "edit": args.edit,
        "pairs": args.num_pairs,
        "pairs the student learned from": (
            f"{kept['pairs_kept']} of {kept['pairs_in']} ({kept['kept_fraction']:.0%}), those the oracle's "
            f"scores pass: --keep-if {kept['keep_if']!r}"
            if kept.get("keep_if")
            else "all (no --keep-if)"
        ),
        "teacher steps": args.steps,
        "teacher settings": f"preset {args.preset}, CFG {args.guidance_scale:g}, "
        f"xa guidance {args.xa_guidance:g}{' (calibrated)' if getattr(args, 'calibrated', False) else ''}, "
        "direction from world captions",
        "why this teacher": _why_this_teacher(args.preset),
        "student iterations": train_steps(args),
        "package": str(out / "model"),
        "python": sys.version.split()[0],
        "cpu cores": os.cpu_count(),
    }


def _why_this_teacher(preset: str) -> str:
    """The report's answer to "why not the world's best teacher?" (the figures: docs/results/demo.md)."""
    if preset != DEMO_PRESET:
        return f"{preset}, as asked (--preset)"
    return (
        f"{DEMO_PRESET}, not {TOY_PRESET} (the world's best at 50 steps): at {DEMO_STEPS} steps "
        f"{TOY_PRESET} keeps the object's box better but misses more edits and repaints more of the "
        "background (docs/results/demo.md, 'Why the demo's teacher is joint')"
    )


def train_main(args: list[str]) -> int:
    """The demo's training stage: ``p2pz train`` (``python -m p2pz.cli.train``, the library noise
    filtered as in every command), run as ``python -m p2pz.cli.demo fit ...``."""
    from p2pz.cli.train import script_main

    # the arguments are sys.argv's: LightningCLI reads them there (given again, it warns about both)
    return script_main(None if args == sys.argv[1:] else args, prog="p2pz demo (training)")


if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
