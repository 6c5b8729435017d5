"""How well and how fast the student learns its teacher: pairs -> training from scratch -> fidelity.

In one run, for one world edit (default ``circle:square``):

1. **pairs** — the demo's training pairs (``p2pz demo``'s scenes, count and teacher settings) and the
   teacher's edits of ``--held-out`` held-out scenes (seeds the training scenes never use), made with
   ``p2pz generate``'s code, or reused from ``--cache-dir`` when made before with the same settings;
2. **training** — the student from scratch with a recipe (``--config``, the demo's ``configs/cpu.yaml``
   by default, plus ``--set key=value`` overrides of it) for ``--iterations`` iterations, on the
   training pairs (``--filter``: only those the filter rule keeps);
3. **fidelity** — every ``--eval-every`` iterations the EMA student is scored on the held-out scenes
   against the teacher's edits (PSNR, whole image and inside the objects' masks); the final student
   also by the world's oracle. Evaluation time is not counted as training time.

It prints the curve (fidelity vs training seconds) and, as its last line, one JSON object with
``student_psnr_to_teacher_db``, ``student_psnr_to_teacher_object_db``, ``copy_psnr_to_teacher_db``,
``student_success``, ``teacher_success``, ``train_seconds`` and ``iterations`` (plus details).

    python benchmarks/distill.py --edit circle:square --iterations 1500
    python benchmarks/distill.py --edit red:blue --set model.l1_weight=20 --set data.batch_size=16
    python benchmarks/distill.py --filter --keep-if "success and iou >= 0.8"

Times depend on the machine's load: the run records its CPU seconds and ``os.getloadavg()`` too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "distill"


# --------------------------------------------------------------------------------------------------
# 1. Pairs (cached by the settings that make them)


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides the pairs: the cache key (the preset's values, not only its name)."""
    from p2pz.teacher.presets import get_preset

    return {
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "edit": args.edit,
        "pairs": args.pairs,
        "held_out": args.held_out,
        "steps": args.steps,
        "preset": get_preset(args.preset).to_dict(),
        "guidance_scale": args.guidance_scale,
        "xa_guidance": args.xa_guidance,
        "seed": args.seed,
        "version": 1,
    }


def prepare_pairs(args: argparse.Namespace) -> Path:
    """``<cache>/<edit>-<hash>/`` with ``train/`` and ``held-out/`` shards (each made once, then reused).

    With ``--hold-out-last-shards`` only the training split is needed.
    """
    settings = data_settings(args)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(args.cache_dir) / f"{args.edit.replace(':', '-to-')}-{digest}"
    splits = {"train": (args.pairs, args.seed * 1_000_000)}
    if not args.hold_out_last_shards:
        from p2pz.cli.demo import HELD_OUT_SEED

        splits["held-out"] = (args.held_out, HELD_OUT_SEED + args.seed * 1_000_000)
    todo = {k: v for k, v in splits.items() if not (folder / f"{k}.done.json").exists()}
    if not todo:
        print(f"pairs: reusing {folder}", flush=True)
        return folder
    from p2pz.cli.demo import make_scenes, write_inputs
    from p2pz.data.pairs.generate import Settings, load_teacher, run
    from p2pz.data.shapes.edits import parse_world_edit, world_direction

    source = parse_world_edit(args.edit).source
    base = dict(model=args.model, preset=args.preset, device="cpu", dtype="float32")
    teacher = load_teacher(Settings(**base))
    folder.mkdir(parents=True, exist_ok=True)
    direction = world_direction(teacher, parse_world_edit(args.edit)).save(folder / "direction.safetensors")
    for split, (count, first_seed) in todo.items():
        print(
            f"pairs: the teacher edits {count} {split} scenes ({args.edit}, {args.steps} steps)", flush=True
        )
        start = time.perf_counter()
        write_inputs(make_scenes(source, count, first_seed), folder / f"{split}-inputs")
        settings_ = Settings(
            **base,
            out=str(folder / split),
            direction=[str(direction)],
            guidance_scale=args.guidance_scale,
            xa_guidance=args.xa_guidance,
            inputs=str(folder / f"{split}-inputs"),
            samples_per_shard=max(16, count // 8),
            batch_size=8,
            seed=args.seed,
            steps=args.steps,
        )
        run(settings_, teacher=teacher)
        record = {"settings": settings, "teacher_seconds": time.perf_counter() - start}
        (folder / f"{split}.done.json").write_text(json.dumps(record, indent=1))
    return folder


# --------------------------------------------------------------------------------------------------
# Held-out scenes: inputs, the teacher's edits, ground truth, object regions


class HeldOut:
    """The held-out pairs in scene order, with their scenes, tensors and object regions."""

    def __init__(self, urls: list[str], scenes: Any):
        """``urls``: held-out shards; ``scenes(n)``: the first ``n`` scenes their inputs were drawn from."""
        from p2pz.data.eval.fidelity import object_region
        from p2pz.data.pairs import sample as fmt
        from p2pz.teacher.images import pil_to_tensor

        pairs = {}
        for url in urls:
            for raw in fmt.iter_shard(url, read=lambda m: m not in (fmt.RECON, fmt.LATENT)):
                pair = fmt.decode_sample(raw)
                index = int(Path(str(pair.meta["input"]["id"])).stem.removeprefix("scene"))
                pairs[index] = pair
        order = sorted(pairs)
        all_scenes = scenes(max(order) + 1)
        self.scenes = [all_scenes[i] for i in order]
        self.inputs = [pairs[i].source for i in order]
        self.teacher = [pairs[i].edited for i in order]
        self.x = pil_to_tensor(self.inputs)
        self.regions = [object_region(x, t) for x, t in zip(self.inputs, self.teacher)]

    def student_images(self, generator: Any) -> list[Any]:
        """The generator's (eval-mode) edits of the held-out inputs, as 8-bit images."""
        import torch

        from p2pz.teacher.images import numpy_to_pil, tensor_to_numpy

        with torch.no_grad():
            y = torch.cat([generator(chunk) for chunk in self.x.split(32)])
        return numpy_to_pil(tensor_to_numpy(y))

    def fidelity(self, images: list[Any]) -> dict:
        from p2pz.data.eval.fidelity import fidelity

        return fidelity(self.inputs, self.teacher, images, self.regions)


# --------------------------------------------------------------------------------------------------
# 2./3. Training with a learning curve


def curve_callback(held_out: HeldOut, every: int) -> Any:
    """A Lightning callback scoring ``g_ema`` every ``every`` iterations; its time is not training time."""
    import lightning.pytorch as pl

    class Curve(pl.Callback):
        def __init__(self) -> None:
            self.points: list[dict] = []
            self.paused = 0.0
            self.paused_cpu = 0.0

        def on_train_start(self, trainer, module) -> None:
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def train_seconds(self) -> tuple[float, float]:
            wall = time.perf_counter() - self.start - self.paused
            return wall, time.process_time() - self.start_cpu - self.paused_cpu

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step % every and step < trainer.max_steps:
                return
            wall, cpu = self.train_seconds()
            t0, c0 = time.perf_counter(), time.process_time()
            f = held_out.fidelity(held_out.student_images(module.g_ema))
            point = {
                "iteration": step,
                "train_seconds": round(wall, 1),
                "cpu_seconds": round(cpu, 1),
                "psnr_db": round(f["psnr_to_teacher_db"], 2),
                "object_psnr_db": round(f["psnr_to_teacher_object_db"], 2),
            }
            self.points.append(point)
            print(
                f"  it {step:5d}  {wall:6.1f} s (cpu {cpu:6.1f} s)  "
                f"PSNR to teacher {point['psnr_db']:5.2f} dB, in objects {point['object_psnr_db']:5.2f} dB",
                flush=True,
            )
            self.paused += time.perf_counter() - t0
            self.paused_cpu += time.process_time() - c0

    return Curve()


def recipe_args(args: argparse.Namespace, shards: Path, run_dir: Path) -> list[str]:
    """``p2pz train fit`` arguments: the recipe's config, its overrides, this run's data and length."""
    cli = ["--config", args.config]
    shards = "{" + ",".join(shards) + "}" if isinstance(shards, list) else str(shards)
    cli += ["--data.shards", shards, "--data.val_fraction", "0", "--trainer.limit_val_batches", "0"]
    cli += ["--trainer.max_steps", str(args.iterations), "--trainer.default_root_dir", str(run_dir)]
    cli += ["--seed_everything", str(args.seed), "--trainer.enable_progress_bar", "false"]
    cli += ["--checkpoint.every_n_train_steps", str(10**9), "--trainer.logger", "false"]
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item}: expected KEY=VALUE, e.g. model.l1_weight=20")
        cli += [f"--{key}", value]
    return cli


def train_and_score(args: argparse.Namespace, shards: Path, held_out: HeldOut, run_dir: Path) -> dict:
    """Train from scratch with the curve callback; the final student's fidelity and oracle scores."""
    import torch

    from p2pz.cli.train import main as train_cli
    from p2pz.data.eval.world_metrics import score_world_edits

    torch.set_num_threads(args.threads)
    cli = train_cli(recipe_args(args, shards, run_dir), run=False)
    curve = curve_callback(held_out, args.eval_every)
    cli.trainer.callbacks.append(curve)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall, cpu = curve.train_seconds()
    wall -= 0  # the last point's scoring happened before the end: already excluded
    images = held_out.student_images(cli.model.g_ema)
    fid = held_out.fidelity(images)
    student = score_world_edits(held_out.scenes, images, args.edit, input_images=held_out.inputs)
    teacher = score_world_edits(held_out.scenes, held_out.teacher, args.edit, input_images=held_out.inputs)
    save_examples(run_dir / "held-out.png", held_out, images)
    return {
        "student_psnr_to_teacher_db": round(fid["psnr_to_teacher_db"], 3),
        "student_psnr_to_teacher_object_db": round(fid["psnr_to_teacher_object_db"], 3),
        "copy_psnr_to_teacher_db": round(fid["copy_psnr_to_teacher_db"], 3),
        "copy_psnr_to_teacher_object_db": round(fid["copy_psnr_to_teacher_object_db"], 3),
        "student_success": student["success"],
        "teacher_success": teacher["success"],
        "student_iou": round(student["iou"], 4),
        "teacher_iou": round(teacher["iou"], 4),
        "train_seconds": round(curve.points[-1]["train_seconds"] if curve.points else wall, 1),
        "train_cpu_seconds": round(curve.points[-1]["cpu_seconds"] if curve.points else cpu, 1),
        "iterations": int(cli.trainer.global_step),
        "curve": curve.points,
    }


def save_examples(path: Path, held_out: HeldOut, images: list[Any], rows: int = 8) -> None:
    """input | teacher | student | student - teacher for the first held-out scenes."""
    from PIL import Image

    from p2pz.data.eval.fidelity import difference_image

    size = images[0].size[0]
    sheet = Image.new("RGB", (4 * size, rows * size), (255, 255, 255))
    for i in range(min(rows, len(images))):
        tiles = [
            held_out.inputs[i],
            held_out.teacher[i],
            images[i],
            difference_image(images[i], held_out.teacher[i]),
        ]
        for j, tile in enumerate(tiles):
            sheet.paste(tile.convert("RGB"), (j * size, i * size))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(path)


def split_pairs(args: argparse.Namespace, folder: Path) -> tuple[Any, HeldOut, dict | None]:
    """(training shards, held-out pairs, the filter's manifest or None) of this run."""
    from p2pz.cli.demo import HELD_OUT_SEED, make_scenes
    from p2pz.data.pairs.reader import list_shards
    from p2pz.data.shapes.edits import parse_world_edit

    source = parse_world_edit(args.edit).source
    kept = None
    if args.hold_out_last_shards:  # quick experiments: the last training shards stand in for held-out scenes
        urls = list_shards(str(folder / "train"))
        train, test = urls[: -args.hold_out_last_shards], urls[-args.hold_out_last_shards :]
        held_out = HeldOut(test, lambda n: make_scenes(source, n, args.seed * 1_000_000))
        return train, held_out, kept
    shards: Any = str(folder / "train")
    if args.filter:
        shards, kept = filtered_shards(args, folder)
    held_out = HeldOut(
        list_shards(str(folder / "held-out")),
        lambda n: make_scenes(source, n, HELD_OUT_SEED + args.seed * 1_000_000),
    )
    return shards, held_out, kept


def filtered_shards(args: argparse.Namespace, folder: Path) -> tuple[Path, dict]:
    """The training pairs the filter rule keeps (made once per rule), and the filter's manifest."""
    try:
        from p2pz.data.pairs.filtering import filter_shards
    except ImportError as err:
        raise SystemExit(
            f"--filter needs p2pz.data.pairs.filtering, which this checkout lacks ({err})"
        ) from err
    digest = hashlib.sha256(args.keep_if.encode()).hexdigest()[:8]
    out = folder / f"train-kept-{digest}"
    manifest_file = out.with_suffix(".json")
    if manifest_file.exists():
        return out, json.loads(manifest_file.read_text())
    from p2pz.data.eval.pair_scores import WorldPairScorer

    # pairs cached before scoring existed carry no scores: the oracle scores them here
    manifest = filter_shards(folder / "train", out, args.keep_if, scorer=WorldPairScorer())
    manifest_file.write_text(json.dumps(manifest, default=str))
    return out, manifest


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from p2pz.cli.demo import DEFAULT_KEEP_IF
    from p2pz.data.shapes.teacher_settings import add_toy_teacher_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edit", default="circle:square", help="world edit SOURCE:TARGET (default circle:square)")
    p.add_argument("--model", default=str(REPO / "data" / "toy_model"), help="teacher model (default: toy)")
    p.add_argument("--pairs", type=int, default=192, help="training pairs (default 192, the demo's)")
    p.add_argument("--held-out", type=int, default=64, help="held-out scenes (default 64)")
    p.add_argument("--steps", type=int, default=20, help="teacher DDIM steps (default 20, the demo's)")
    add_toy_teacher_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help=f"pairs cache (default {DEFAULT_CACHE})")
    p.add_argument("--prepare-only", action="store_true", help="make (or find) the pairs and stop")
    p.add_argument(
        "--config", default=str(REPO / "configs" / "cpu.yaml"), help="the recipe (default: configs/cpu.yaml)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override of the recipe, as 'p2pz train' flags without the dashes (repeatable), "
        "e.g. model.l1_weight=20 or data.batch_size=16",
    )  # fmt: skip
    p.add_argument("--iterations", type=int, default=None, help="training iterations (default: the config's)")
    p.add_argument(
        "--eval-every", type=int, default=100, help="iterations between curve points (default 100)"
    )
    p.add_argument("--filter", action="store_true", help="train on the pairs --keep-if keeps")
    p.add_argument(
        "--keep-if", default=DEFAULT_KEEP_IF, help=f"filter rule (default {DEFAULT_KEEP_IF!r}, the demo's)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--run-dir", default=None, help="training run folder (default: a temporary one)")
    p.add_argument(
        "--hold-out-last-shards",
        type=int,
        default=0,
        metavar="N",
        help="quick experiments: score on the last N training shards (not trained on) instead of held-out "
        "scenes, so that no held-out teacher edits are needed",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = prepare_pairs(args)
    if args.prepare_only:
        print(json.dumps({"pairs": str(folder)}))
        return 0
    if args.iterations is None:
        import yaml

        args.iterations = int(yaml.safe_load(Path(args.config).read_text())["trainer"]["max_steps"])
    shards, held_out, kept = split_pairs(args, folder)
    load_before = os.getloadavg()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="distill-") as tmp:
        run_dir = Path(args.run_dir or tmp)
        print(f"training {args.iterations} iterations ({args.config} {' '.join(args.set)})", flush=True)
        result = train_and_score(args, shards, held_out, run_dir)
    result.update(
        edit=args.edit,
        held_out=len(held_out.inputs),
        config=args.config,
        overrides=args.set,
        filter=args.keep_if if args.filter else None,
        kept_fraction=(kept or {}).get("kept_fraction") if kept else None,
        load_before=[round(v, 2) for v in load_before],
        load_after=[round(v, 2) for v in os.getloadavg()],
    )
    curve = result.pop("curve")
    print("\ncurve (iteration, train s, PSNR to teacher dB, in objects dB):")
    for p in curve:
        row = (p["iteration"], p["train_seconds"], p["psnr_db"], p["object_psnr_db"])
        print("  {:5d}  {:7.1f}  {:6.2f}  {:6.2f}".format(*row))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
