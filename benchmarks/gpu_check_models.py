"""gpu_check.py's checks of the models: the teacher (part 1) and the student's training path (part 2).

Each takes the run's context (device, sizes, work folder, seconds left); the users' commands run as
``python -m p2pz ...`` subprocesses, inside the seconds left to the check."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SD14_CONFIG = REPO / "configs" / "sd14-512.yaml"
TEACHER_IMAGE_TOLERANCE = 0.1  # mean |fp32 - low precision| of the edited image, [0, 1] units
# max |compiled - eager| relative to the output's range: float32 on the CPU; TF32 convolutions on cuda
COMPILE_TOLERANCE = {"cpu": 1e-3, "cuda": 2e-2}
DIRECTION_SENTENCES = 8  # sentences per concept of the edit's direction: the bank's size is not checked


def run_p2pz(command: list[str], timeout: float) -> tuple[int, str]:
    """Run ``python -m p2pz ...``; its exit status and the tail of its output."""
    result = subprocess.run(
        [sys.executable, "-m", "p2pz", *command], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    return result.returncode, (result.stdout + result.stderr)[-2000:]


# ------------------------------------------------------------------------------------------------
# The teacher model (random weights) and a picture


def teacher_model(ctx: Any) -> Path:
    """The random teacher in the work folder, made once (renamed into place when complete)."""
    from p2pz.data.models.tiny import make_tiny

    folder = ctx.work / "teacher-model"
    if not folder.is_dir():
        partial = ctx.work / "teacher-model.partial"
        shutil.rmtree(partial, ignore_errors=True)
        if ctx.sizes.architecture == "tiny":
            make_tiny(partial, seed=0)
        else:
            make_tiny(partial, seed=0, architecture=ctx.sizes.architecture)
        partial.rename(folder)
    return folder


def picture(size: int) -> Any:
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    blob = np.exp(-(((xx - 0.45) ** 2 + (yy - 0.55) ** 2) / 0.05))
    rgb = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * blob, 0.8 - 0.5 * yy], axis=-1)
    return Image.fromarray((rgb.clip(0, 1) * 255).astype("uint8"))


def _teacher_edit(ctx: Any, dtype: torch.dtype, batch: int = 1) -> dict[str, Any]:
    """Load the teacher in ``dtype`` and edit ``batch`` pictures; the images, times and peak memory."""
    import numpy as np

    from p2pz.teacher import Pix2PixZero

    device = ctx.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    teacher = Pix2PixZero.from_pretrained(
        teacher_model(ctx), preset="official", device=device, dtype=dtype, captioner=False
    )
    direction = teacher.direction("cat", "dog", num_sentences=DIRECTION_SENTENCES)
    loaded = time.perf_counter()
    results = teacher.edit(
        [picture(teacher.resolution)] * batch,
        [direction] * batch,
        captions=["a cat"] * batch,
        seeds=list(range(batch)),
        num_steps=ctx.sizes.teacher_steps,
        return_latents=True,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = {
        "image": np.asarray(results[0].edited, dtype=np.float64) / 255.0,
        "latent_finite": all(bool(torch.isfinite(r.edited_latent).all()) for r in results),
        "seconds": time.perf_counter() - start,
        "edit_seconds": time.perf_counter() - loaded,
        "resolution": teacher.resolution,
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del teacher
    return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_teacher(ctx: Any) -> dict[str, Any]:
    """The teacher in fp32, fp16 (cuda) and bf16 on the same image: finite, and close to fp32's edit."""
    lows = [torch.float16, torch.bfloat16] if ctx.device.type == "cuda" else [torch.bfloat16]
    runs = {_name(d): _teacher_edit(ctx, d) for d in [torch.float32, *lows]}
    full = runs["float32"]
    report: dict[str, Any] = {
        "resolution": full["resolution"],
        "steps": ctx.sizes.teacher_steps,
        "low_precision": [_name(d) for d in lows],
        "latents_finite": all(r["latent_finite"] for r in runs.values()),
        "tolerance_mean_abs_diff": TEACHER_IMAGE_TOLERANCE,
    }
    close = True
    for name, run in runs.items():
        if name != "float32":
            diff = abs(full["image"] - run["image"])
            report[f"{name}_image_mean_abs_diff"] = float(diff.mean())
            report[f"{name}_image_max_abs_diff"] = float(diff.max())
            close &= float(diff.mean()) <= TEACHER_IMAGE_TOLERANCE
        report[f"{name}_seconds"] = run["seconds"]
        if "peak_memory_bytes" in run:
            report[f"{name}_peak_memory_bytes"] = run["peak_memory_bytes"]
    report["pass"] = report["latents_finite"] and close
    return report


def check_teacher_batch(ctx: Any) -> dict[str, Any]:
    """The teacher as ``p2pz generate`` runs it: its default batch and its dtype on the device."""
    from p2pz.student.bench import teacher_dtype

    dtype = teacher_dtype(ctx.device)
    run = _teacher_edit(ctx, dtype, batch=ctx.sizes.teacher_batch)
    report = {
        "pass": run["latent_finite"],
        "dtype": _name(dtype),
        "batch": ctx.sizes.teacher_batch,
        "steps": ctx.sizes.teacher_steps,
        "resolution": run["resolution"],
        "edit_seconds": run["edit_seconds"],
        "pairs_per_s": ctx.sizes.teacher_batch / run["edit_seconds"],
    }
    if "peak_memory_bytes" in run:
        report["peak_memory_bytes"] = run["peak_memory_bytes"]
    return report


def check_generate(ctx: Any) -> dict[str, Any]:
    """A small ``p2pz generate`` on the device (its default dtype there); pairs/s from its manifest."""
    from p2pz.data.pairs.shards import read_manifests

    model = teacher_model(ctx)
    inputs, out = ctx.work / "generate-inputs", ctx.work / "generate-pairs"
    shutil.rmtree(out, ignore_errors=True)
    inputs.mkdir(parents=True, exist_ok=True)
    resolution = 64 if ctx.sizes.small else 512
    for i in range(ctx.sizes.generate_images):
        picture(resolution).rotate(90 * i).save(inputs / f"img{i}.png")
    code, tail = run_p2pz(
        [
            "generate", "--model", str(model), "--edit", "cat:dog",
            "--inputs", str(inputs), "--out", str(out),
            "--steps", str(ctx.sizes.teacher_steps), "--num-sentences", "8",
            "--batch-size", str(ctx.sizes.teacher_batch), "--device", ctx.device.type, "--no-progress",
        ],
        ctx.seconds_left(),
    )  # fmt: skip
    done = [r for r in read_manifests(out) if r.get("event") == "done"] if out.is_dir() else []
    written = done[-1]["samples_written"] if done else 0
    report: dict[str, Any] = {
        "pass": code == 0 and written == ctx.sizes.generate_images,
        "pairs": written,
        "seconds_in_job": done[-1]["seconds"] if done else None,
        "pairs_per_s": written / done[-1]["seconds"] if done and done[-1]["seconds"] else None,
    }
    if code != 0:
        report["output_tail"] = tail
    return report


# ------------------------------------------------------------------------------------------------
# Part 2: training, resume, torch.compile, export, bench


def write_shards(directory: Path, resolution: int, model: Path, shards: int = 2, per_shard: int = 8) -> Path:
    """Synthetic pair shards in the teacher's sample format (the check is about training, not data)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from p2pz.data.pairs.sample import build_sample
    from p2pz.data.pairs.shards import shard_name

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    meta = {"caption": "a cat", "edit": {"source": "cat", "target": "dog"}, "teacher": {"model": str(model)}}
    for shard in range(shards):
        with wds.TarWriter(str(directory / shard_name(shard))) as sink:
            for index in range(per_shard):
                low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                src = Image.fromarray(low).resize((resolution, resolution), Image.Resampling.BICUBIC)
                flipped = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                sink.write(build_sample(f"s{shard}-{index}", src, flipped, meta))
    return directory


def logged(run: Path) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """The CSV logger's ``train/*`` values per logger version: version -> key -> [(step, value)]."""
    values: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        version = values.setdefault(int(path.parent.name.removeprefix("version_")), {})
        with path.open() as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key.startswith("train/") and value not in ("", None):
                        version.setdefault(key, []).append((int(row.get("step") or -1), float(value)))
    return values


def _train(ctx: Any, max_steps: int, every: int, resume: bool = False) -> tuple[int, str]:
    """``p2pz train fit`` on the sd14-512 config (toy sizes with --small), the CSV logger named."""
    shards = ctx.work / "pairs"
    if not shards.is_dir():
        write_shards(shards, 64 if ctx.sizes.small else 512, teacher_model(ctx))
    run = ctx.work / "run"
    extra = ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")] if resume else []
    return run_p2pz(
        [
            "train", "fit", "--config", str(SD14_CONFIG), "--data.shards", str(shards),
            "--trainer.default_root_dir", str(run),
            "--trainer.accelerator", "gpu" if ctx.device.type == "cuda" else "cpu",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(run), "--trainer.logger.name", "csv",
            "--trainer.devices", "1", "--trainer.max_steps", str(max_steps),
            "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--model.lpips_random_backbone", "true",
            "--data.epoch_length", str(max_steps), "--data.num_workers", "2", "--data.val_fraction", "0",
            "--checkpoint.every_n_train_steps", str(every), *ctx.sizes.train_overrides, *extra,
        ],
        ctx.seconds_left(),
    )  # fmt: skip


def _checkpoint_step(run: Path) -> int | None:
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return None
    return int(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", -1))


def check_train(ctx: Any) -> dict[str, Any]:
    """A few iterations of the 512 px bf16 recipe; the losses the CSV logger wrote must be finite."""
    run, steps = ctx.work / "run", ctx.sizes.train_steps
    shutil.rmtree(run, ignore_errors=True)
    code, tail = _train(ctx, steps, steps)
    losses = logged(run).get(0, {})
    finite = bool(losses) and all(math.isfinite(v) for vs in losses.values() for _, v in vs)
    step = _checkpoint_step(run)
    report = {
        "pass": code == 0 and step == steps and finite,
        "iterations": steps,
        "checkpoint_step": step,
        "losses_finite": finite,
        "r1_logged": "train/d_r1" in losses,
        "last_losses": {k: v[-1][1] for k, v in sorted(losses.items())},
    }
    if code != 0:
        report["output_tail"] = tail
    return report


def check_resume(ctx: Any) -> dict[str, Any]:
    """``--ckpt_path last.ckpt`` on the device: the run goes on from the saved step to a later one."""
    run, start, extra = ctx.work / "run", ctx.sizes.train_steps, ctx.sizes.resume_steps
    code, tail = _train(ctx, start + extra, extra, resume=True)
    versions = logged(run)
    resumed = versions.get(max(versions), {}) if len(versions) > 1 else {}
    steps = [s for vs in resumed.values() for s, _ in vs]
    finite = bool(resumed) and all(math.isfinite(v) for vs in resumed.values() for _, v in vs)
    step = _checkpoint_step(run)
    report = {
        "pass": code == 0 and step == start + extra and finite and bool(steps) and min(steps) >= start - 1,
        "from_step": start,
        "checkpoint_step": step,
        "first_logged_step": min(steps) if steps else None,
        "losses_finite": finite,
    }
    if code != 0:
        report["output_tail"] = tail
    return report


def check_compile(ctx: Any) -> dict[str, Any]:
    """``torch.compile`` of the student generator (the run's size and preset) against eager."""
    from p2pz.student.networks import Generator

    resolution, preset = (64, "lite") if ctx.sizes.small else (512, "comod")
    torch.manual_seed(0)
    generator = Generator(resolution=resolution, preset=preset).to(ctx.device).eval()
    x = torch.rand(2, 3, resolution, resolution, device=ctx.device) * 2 - 1
    with torch.no_grad():
        want = generator(x)
        start = time.perf_counter()
        got = torch.compile(generator)(x)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        first_call = time.perf_counter() - start
    error = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))
    tolerance = COMPILE_TOLERANCE[ctx.device.type]
    return {
        "pass": math.isfinite(error) and error <= tolerance,
        "resolution": resolution,
        "preset": preset,
        "max_relative_error": error,
        "tolerance": tolerance,
        "first_call_seconds": first_call,
    }


def check_export(ctx: Any) -> dict[str, Any]:
    run, package = ctx.work / "run", ctx.work / "package"
    shutil.rmtree(package, ignore_errors=True)
    code, tail = run_p2pz(
        ["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(package)], ctx.seconds_left()
    )
    files = sorted(p.name for p in package.glob("*")) if package.is_dir() else []
    report = {"pass": code == 0 and {"generator.pt2", "generator.onnx"} <= set(files), "files": files}
    if code != 0:
        report["output_tail"] = tail
    return report


def check_bench(ctx: Any) -> dict[str, Any]:
    out = ctx.work / "bench.json"
    code, tail = run_p2pz(
        [
            "bench", str(ctx.work / "package"), "--out", str(out), "--device", ctx.device.type,
            "--batches", ctx.sizes.bench_batches, "--backends", ctx.sizes.bench_backends, "--trust-pt2",
            "--iters", "20", "--warmup", "2", "--teacher-steps", str(ctx.sizes.teacher_steps),
        ],
        ctx.seconds_left(),
    )  # fmt: skip
    if code != 0 or not out.is_file():
        return {"pass": False, "output_tail": tail}
    bench = json.loads(out.read_text())
    p50 = {name: {b: r["p50_ms"] for b, r in rows.items()} for name, rows in bench["student"].items()}
    keys = ("teacher_ms", "teacher_dtype", "ops_impl", "roofline_fraction", "matmul_peak_math_mode", "device")
    return {"pass": set(ctx.sizes.bench_backends.split(",")) <= set(p50), "p50_ms": p50} | {
        k: bench.get(k) for k in keys
    }
