"""One student for many edits, against per-edit students and on edits it never trained on.

On the shapes world's 12 ablation edits (``p2pz.data.shapes.edits.world_edits`` of the toy model),
in one run:

1. **pairs** — per edit, ``--pairs`` training pairs and ``--scenes`` held-out scenes edited by the
   teacher (the demo's settings), made with ``benchmarks/distill.py``'s code and cached by settings;
2. **per-edit students** — the current recipe (``--config``, its iterations) on ``--per-edit`` edits'
   pairs (a subset: each costs a full training run), scored on their held-out scenes;
3. **one student** — the same recipe conditioned on the edit, trained on the pairs of the 10 edits left
   after ``--held-out`` (default ``triangle:square green:red``) with ``--multi-factor`` (3) times a
   per-edit student's iterations in all; scored per seen edit on its held-out scenes (PSNR to the
   teacher, oracle success), then **zero-shot** on the held-out edits' scenes with their conditioning
   computed from their directions (the teacher's text encoder, as for the seen ones);
4. **latency** — batch-1 eval-mode latency of the conditional generator over a per-edit one of the same
   widths (``torch.utils.benchmark``, same process, same threads).

Prints one JSON line with ``multi_psnr_seen_mean_db``, ``multi_psnr_seen_worst_db``,
``per_edit_psnr_mean_db``, ``multi_success_min_margin``, ``zero_shot_success``, ``zero_shot_psnr_db``,
``latency_ratio_vs_per_edit`` and the per-edit details.

CPU budget (2 cores): the teacher's pairs, made once, cost about 12 x (pairs + scenes) / 1,400 hours
(the defaults: ~45 min); each per-edit student about 4 min and the one student about 12 min (7,500
iterations); scoring and latency about 2 min.

    python benchmarks/multi_edit.py
    python benchmarks/multi_edit.py --held-out circle:triangle blue:yellow --per-edit circle:square
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill  # noqa: E402  (the per-edit benchmark's pairs, held-out scenes and recipe)

REPO = Path(__file__).resolve().parents[1]
GOALS = {
    "mean within of per-edit (dB)": 1.0,
    "multi_psnr_seen_worst_db": 28.0,
    "multi_success_min_margin": -0.05,
    "zero_shot_success": 0.8,
    "zero_shot_psnr_db": 25.0,
    "latency_ratio_vs_per_edit": 1.1,
}


def edit_args(args: argparse.Namespace, spec: str) -> argparse.Namespace:
    """``benchmarks/distill.py``'s settings for one edit's pairs and its recipe."""
    argv = ["--edit", spec, "--pairs", str(args.pairs), "--held-out", str(args.scenes)]
    argv += ["--cache-dir", args.cache_dir, "--config", args.config, "--threads", str(args.threads)]
    argv += ["--seed", str(args.seed), "--model", args.model]
    for item in args.set:
        argv += ["--set", item]
    return distill.parse_args(argv)


def prepare(args: argparse.Namespace, edits: list[str]) -> dict[str, Path]:
    """Each edit's pairs folder (``train/``, ``held-out/``, ``direction.safetensors``), made once."""
    folders = {}
    for i, spec in enumerate(edits):
        print(f"[{i + 1}/{len(edits)}] {spec}", flush=True)
        folders[spec] = distill.prepare_pairs(edit_args(args, spec))
    return folders


def held_out_scenes(args: argparse.Namespace, spec: str, folder: Path) -> distill.HeldOut:
    from p2pz.cli.demo import HELD_OUT_SEED, make_scenes
    from p2pz.data.pairs.reader import list_shards
    from p2pz.data.shapes.edits import parse_world_edit

    source = parse_world_edit(spec).source
    return distill.HeldOut(
        list_shards(str(folder / "held-out")),
        lambda n: make_scenes(source, n, HELD_OUT_SEED + args.seed * 1_000_000),
    )


def score(spec: str, held_out: distill.HeldOut, images: list[Any]) -> dict[str, float]:
    """PSNR to the teacher (whole image, objects), the copy baseline and both oracle successes."""
    from p2pz.data.eval.world_metrics import score_world_edits

    fid = held_out.fidelity(images)
    student = score_world_edits(held_out.scenes, images, spec, input_images=held_out.inputs)
    teacher = score_world_edits(held_out.scenes, held_out.teacher, spec, input_images=held_out.inputs)
    return {
        "psnr_db": round(fid["psnr_to_teacher_db"], 3),
        "object_psnr_db": round(fid["psnr_to_teacher_object_db"], 3),
        "copy_psnr_db": round(fid["copy_psnr_to_teacher_db"], 3),
        "student_success": student["success"],
        "teacher_success": teacher["success"],
    }


# --------------------------------------------------------------------------------------------------
# Training


def train(args: argparse.Namespace, shards: Any, iterations: int, run_dir: Path) -> tuple[Any, float]:
    """The recipe from scratch on ``shards`` (one edit's, or several: then conditioned on the edit);
    returns the trained module and its training seconds."""
    import torch

    from p2pz.cli.train import main as train_cli

    torch.set_num_threads(args.threads)
    recipe = edit_args(args, "circle:square")
    recipe.iterations = iterations
    cli = train_cli(distill.recipe_args(recipe, shards, run_dir), run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model, time.perf_counter() - start


def bound(generator: Any, vector: Any) -> Any:
    """The conditional generator with one edit: ``y = f(x)``."""
    return lambda x: generator(x, edit=vector.expand(x.shape[0], -1))


def conditioning(folder: Path) -> Any:
    """An edit's conditioning from its direction file (the teacher's text encoder made it)."""
    from p2pz.student.conditioning import edit_conditioning
    from p2pz.teacher.directions import EditDirection

    return edit_conditioning(EditDirection.load(folder / "direction.safetensors"))


def latency_ratio(multi: Any, threads: int) -> dict[str, float]:
    """Batch-1 eval latency, conditional over per-edit (the same widths, without the edit mapping)."""
    import torch
    import torch.utils.benchmark as tb

    from p2pz.student.networks import Generator

    config = {k: v for k, v in multi.config.items() if k != "edit_dim"}
    single = Generator(**config).eval()
    x = torch.rand(1, 3, multi.resolution, multi.resolution) * 2 - 1
    edit = torch.zeros(1, multi.edit_dim)
    times = {}
    with torch.no_grad():
        for name, stmt, env in (
            ("per_edit", "g(x)", {"g": single, "x": x}),
            ("multi", "g(x, edit=e)", {"g": multi, "x": x, "e": edit}),
        ):
            timer = tb.Timer(stmt=stmt, globals=env, num_threads=threads)
            times[name] = timer.blocked_autorange(min_run_time=3.0).median * 1000
    return {
        "per_edit_ms": round(times["per_edit"], 3),
        "multi_ms": round(times["multi"], 3),
        "latency_ratio_vs_per_edit": round(times["multi"] / times["per_edit"], 3),
    }


# --------------------------------------------------------------------------------------------------
# The run


def per_edit_students(args: argparse.Namespace, folders: dict[str, Path], iterations: int) -> dict:
    results = {}
    for spec in args.per_edit:
        print(f"per-edit student: {spec} ({iterations} iterations)", flush=True)
        held_out = held_out_scenes(args, spec, folders[spec])
        with tempfile.TemporaryDirectory(prefix="multi-edit-") as tmp:
            module, seconds = train(args, str(folders[spec] / "train"), iterations, Path(tmp))
        results[spec] = {
            **score(spec, held_out, held_out.student_images(module.g_ema)),
            "seconds": round(seconds),
        }
        print(f"  {json.dumps(results[spec])}", flush=True)
    return results


def multi_edit_student(args: argparse.Namespace, folders: dict[str, Path], seen: list[str], iterations: int):
    """Train one student on the seen edits; score it on each seen edit and zero-shot on the others."""
    print(f"one student: {len(seen)} edits, {iterations} iterations", flush=True)
    shards = [str(folders[spec] / "train") for spec in seen]
    with tempfile.TemporaryDirectory(prefix="multi-edit-") as tmp:
        module, seconds = train(args, shards, iterations, Path(tmp))
    g = module.g_ema.eval()
    results = {"seen": {}, "zero_shot": {}, "seconds": round(seconds)}
    for spec, folder in folders.items():
        held_out = held_out_scenes(args, spec, folder)
        kind = "seen" if spec in seen else "zero_shot"
        vector = conditioning(folder)
        results[kind][spec] = score(spec, held_out, held_out.student_images(bound(g, vector)))
        print(f"  {kind} {spec}: {json.dumps(results[kind][spec])}", flush=True)
    results["latency"] = latency_ratio(g, args.threads)
    return results


def summary(per_edit: dict, multi: dict) -> dict[str, Any]:
    import statistics

    seen, zero = multi["seen"], multi["zero_shot"]
    return {
        "multi_psnr_seen_mean_db": round(statistics.mean(r["psnr_db"] for r in seen.values()), 3),
        "multi_psnr_seen_worst_db": round(min(r["psnr_db"] for r in seen.values()), 3),
        "per_edit_psnr_mean_db": round(statistics.mean(r["psnr_db"] for r in per_edit.values()), 3)
        if per_edit
        else None,
        "multi_psnr_on_per_edit_subset_db": round(
            statistics.mean(seen[s]["psnr_db"] for s in per_edit if s in seen), 3
        )
        if any(s in seen for s in per_edit)
        else None,
        "multi_success_min_margin": round(
            min(r["student_success"] - r["teacher_success"] for r in seen.values()), 3
        ),
        "zero_shot_success": round(statistics.mean(r["student_success"] for r in zero.values()), 3),
        "zero_shot_psnr_db": round(statistics.mean(r["psnr_db"] for r in zero.values()), 3),
        "latency_ratio_vs_per_edit": multi["latency"]["latency_ratio_vs_per_edit"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--held-out", nargs=2, default=["triangle:square", "green:red"], metavar="EDIT",
        help="the two edits the one student never trains on (default: triangle:square green:red)",
    )  # fmt: skip
    p.add_argument(
        "--per-edit", nargs="+", default=["circle:square", "red:blue"], metavar="EDIT",
        help="seen edits that also get a per-edit student, the baseline (default: circle:square red:blue)",
    )  # fmt: skip
    p.add_argument("--pairs", type=int, default=64, help="training pairs per edit (default 64)")
    p.add_argument("--scenes", type=int, default=24, help="held-out scenes per edit (default 24)")
    p.add_argument("--multi-factor", type=float, default=3.0, help="the one student's iterations, in "
                   "per-edit students' (default 3)")  # fmt: skip
    p.add_argument(
        "--iterations", type=int, default=None, help="a per-edit student's (default: the config's)"
    )
    p.add_argument(
        "--config", default=str(REPO / "configs" / "cpu.yaml"), help="the recipe (default cpu.yaml)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)"
    )
    p.add_argument("--model", default=str(REPO / "data" / "toy_model"), help="the teacher (default: toy)")
    p.add_argument("--cache-dir", default=str(distill.DEFAULT_CACHE), help="pairs cache (distill.py's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--prepare-only", action="store_true", help="make (or find) the pairs and stop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import yaml

    from p2pz.data.shapes.edits import parse_world_edit, world_edits

    args = parse_args(argv)
    edits = [e.spec for e in world_edits(args.model)]
    for spec in [*args.held_out, *args.per_edit]:
        if parse_world_edit(spec).spec not in edits:
            raise SystemExit(f"{spec} is not one of the 12 edits: {', '.join(edits)}")
    seen = [e for e in edits if e not in args.held_out]
    folders = prepare(args, edits)
    if args.prepare_only:
        return 0
    iterations = args.iterations or int(yaml.safe_load(Path(args.config).read_text())["trainer"]["max_steps"])
    load_before = os.getloadavg()
    per_edit = per_edit_students(args, folders, iterations)
    multi = multi_edit_student(args, folders, seen, round(args.multi_factor * iterations))
    result = summary(per_edit, multi)
    result.update(
        per_edit=per_edit,
        multi=multi,
        held_out=args.held_out,
        pairs_per_edit=args.pairs,
        scenes_per_edit=args.scenes,
        iterations_per_edit=iterations,
        goals=GOALS,
        load_before=[round(v, 2) for v in load_before],
        load_after=[round(v, 2) for v in os.getloadavg()],
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
