"""One command to check the real-size GPU path: ops, teacher precision, 512 px bf16 training, export, bench.

    python benchmarks/gpu_check.py                      # on a CUDA machine: the real sizes, < 8 minutes
    python benchmarks/gpu_check.py --device cpu --small # the same checks at toy sizes on the CPU (tests)

**This script has never run on a GPU** (no GPU was lent while it was written); its ``--device cpu
--small`` mode is what the test suite runs. Whoever first runs it on a GPU: remove this sentence
and put the output in the issue.

Checks, in order (each reports ``pass``, its figures and ``seconds``):

1. ``ops``: the compiled kernels of ``bias_act`` and ``upfirdn2d`` (``impl="cuda"``) against the
   pure-PyTorch reference evaluated in float64 on the same (rounded) inputs: forward, first-order
   gradients (x and bias) and second-order gradients (what R1 differentiates), in fp32, fp16 and
   bf16. The figure is the largest error relative to the reference's largest magnitude.
2. ``teacher``: the real-size random SD-1.4 teacher (``make_tiny(..., architecture="sd14")``) edits
   one 512 px image in a few steps in fp32 and in fp16 (bf16 on the CPU); both must be finite and
   their edited images close (mean absolute difference in [0, 1] pixel units); times and peak memory.
3. ``train``: ``p2pz train fit --config configs/sd14-512.yaml`` (``comod``, 512 px, bf16-mixed) for
   20 iterations on synthetic pair shards, LPIPS on a random backbone, lazy R1 at iterations 0 and 16;
   the losses logged must be finite.
4. ``export``: ``p2pz export`` of that run's ``last.ckpt`` (safetensors, ``.pt2``, ONNX).
5. ``bench``: ``p2pz bench`` of the package on the device (eager and ``.pt2``; ONNX runs on the CPU
   and is left to the CPU benchmarks), the teacher's time for the speed-up figure with 3 steps.

The last line is one JSON object: ``{"device": ..., "checks": {name: {"pass": bool, "seconds": s,
...}}, "all_passed": bool, "seconds": total}``. Without a CUDA device (and without ``--device cpu``)
it says so, prints ``{"cuda_available": false}`` and exits 0. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SD14_CONFIG = REPO / "configs" / "sd14-512.yaml"
# errors relative to the reference's magnitude; fp16 has 11 bits, bf16 8 (x a few roundings)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
TEACHER_IMAGE_TOLERANCE = 0.1  # mean |fp32 - low precision| of the edited image, [0, 1] units


class Sizes:
    """What the checks run at: the real sizes on a GPU, toy ones for ``--small``."""

    def __init__(self, small: bool) -> None:
        self.small = small
        self.bias_act_shape = (2, 8, 8, 8) if small else (4, 512, 64, 64)
        self.upfirdn_shape = (2, 4, 8, 8) if small else (4, 256, 128, 128)
        self.architecture = "tiny" if small else "sd14"
        self.teacher_steps = 2 if small else 3
        self.train_steps = 2 if small else 20
        self.train_overrides = (
            ["--model.resolution", "64", "--model.preset", "lite", "--data.batch_size", "2"] if small else []
        )
        self.bench_batches = "1" if small else "1,4"
        self.bench_backends = "eager,pt2,onnx" if small else "eager,pt2"


# ------------------------------------------------------------------------------------------------
# 1. ops


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - want).abs().max() / want.abs().max().clamp_min(1.0))


def _orders(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dy: torch.Tensor
) -> list[torch.Tensor]:
    """Forward; the first-order gradients of ``<y, dy>``; the gradients of their squared norm with respect
    to the inputs and to ``dy`` (the second order R1 takes: it differentiates a gradient again)."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    dy = dy.detach().requires_grad_(True)
    y = fn(*inputs)
    grads = torch.autograd.grad(y, inputs, dy.to(y.dtype), create_graph=True)
    penalty = sum(g.float().square().sum() for g in grads)
    second = torch.autograd.grad(penalty, [*inputs, dy], allow_unused=True)
    second = [torch.zeros_like(t) if s is None else s for t, s in zip([*inputs, dy], second)]
    return [y.detach(), *[g.detach() for g in grads], *second]


def _op_cases(sizes: Sizes, device: torch.device) -> dict[str, tuple[Callable, list[torch.Tensor]]]:
    from p2pz.student.ops import bias_act, upfirdn2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(sizes.bias_act_shape, generator=g)
    b = torch.randn(sizes.bias_act_shape[1], generator=g)
    image = torch.randn(sizes.upfirdn_shape, generator=g)
    f = upfirdn2d.setup_filter([1, 3, 3, 1], device=device)

    def act(name: str) -> Callable[[str], Callable]:
        return lambda impl: lambda x, b: bias_act.bias_act(x, b, act=name, clamp=256.0, impl=impl)

    def resample(up: int, down: int) -> Callable[[str], Callable]:
        return lambda impl: lambda x: upfirdn2d.upfirdn2d(x, f, up=up, down=down, padding=1, impl=impl)

    return {
        "bias_act_lrelu": (act("lrelu"), [x, b]),
        "bias_act_tanh": (act("tanh"), [x, b]),
        "upfirdn2d_up2": (resample(2, 1), [image]),
        "upfirdn2d_down2": (resample(1, 2), [image]),
    }


def check_ops(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Compiled kernels vs the float64 reference: forward, backward, second order, per dtype."""
    from p2pz.student.ops import _runtime

    impl = device.type
    if not _runtime.load_extension(impl):
        return {"pass": False, "error": f"the {impl} kernels did not build (see the warning above)"}
    errors: dict[str, dict[str, list[float]]] = {}
    passed = True
    for name, (make, inputs) in _op_cases(sizes, device).items():
        errors[name] = {}
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            low = [t.to(device, dtype) for t in inputs]
            dy = torch.randn(make("ref")(*low).shape, generator=torch.Generator().manual_seed(1)).to(device)
            got = _orders(make(impl), low, dy.to(dtype))
            want = _orders(make("ref"), [t.double() for t in low], dy.double())
            errs = [_relative_error(a, w) for a, w in zip(got, want)]
            errors[name][str(dtype).removeprefix("torch.")] = errs
            passed &= all(e <= TOLERANCE[dtype] for e in errs)
    return {
        "pass": passed,
        "max_relative_error": errors,
        "layout": "[forward, grad of each input..., second-order grad of each input and of dy]",
        "tolerance": {str(k).removeprefix("torch."): v for k, v in TOLERANCE.items()},
    }


# ------------------------------------------------------------------------------------------------
# 2. teacher precision


def make_model(out: Path, sizes: Sizes) -> Path:
    from p2pz.data.models.tiny import make_tiny

    if sizes.architecture == "tiny":
        return Path(make_tiny(out, seed=0))
    return Path(make_tiny(out, seed=0, architecture=sizes.architecture))


def _picture(size: int) -> Any:
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    blob = np.exp(-(((xx - 0.45) ** 2 + (yy - 0.55) ** 2) / 0.05))
    rgb = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * blob, 0.8 - 0.5 * yy], axis=-1)
    return Image.fromarray((rgb.clip(0, 1) * 255).astype("uint8"))


def _teacher_edit(model_dir: Path, device: torch.device, dtype: torch.dtype, steps: int) -> dict[str, Any]:
    import numpy as np

    from p2pz.teacher import Pix2PixZero

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    teacher = Pix2PixZero.from_pretrained(
        model_dir, preset="official", device=device, dtype=dtype, captioner=False
    )
    direction = teacher.direction("cat", "dog")
    [result] = teacher.edit(
        [_picture(teacher.resolution)],
        [direction],
        captions=["a cat"],
        seeds=0,
        num_steps=steps,
        return_latents=True,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = {
        "image": np.asarray(result.edited, dtype=np.float64) / 255.0,
        "latent_finite": bool(torch.isfinite(result.edited_latent).all()),
        "seconds": time.perf_counter() - start,
        "resolution": teacher.resolution,
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del teacher
    return out


def check_teacher(device: torch.device, sizes: Sizes, model_dir: Path) -> dict[str, Any]:
    """The teacher in fp32 and in fp16 (bf16 on the CPU) on the same image: finite and close."""
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    runs = {
        str(d).removeprefix("torch."): _teacher_edit(model_dir, device, d, sizes.teacher_steps)
        for d in (torch.float32, low)
    }
    full, half = runs["float32"], runs[str(low).removeprefix("torch.")]
    diff = abs(full["image"] - half["image"])
    finite = all(r["latent_finite"] for r in runs.values())
    report = {
        "pass": finite and float(diff.mean()) <= TEACHER_IMAGE_TOLERANCE,
        "resolution": full["resolution"],
        "steps": sizes.teacher_steps,
        "low_precision": str(low).removeprefix("torch."),
        "latents_finite": finite,
        "image_mean_abs_diff": float(diff.mean()),
        "image_max_abs_diff": float(diff.max()),
        "tolerance_mean_abs_diff": TEACHER_IMAGE_TOLERANCE,
    }
    for name, run in runs.items():
        report[f"{name}_seconds"] = run["seconds"]
        if "peak_memory_bytes" in run:
            report[f"{name}_peak_memory_bytes"] = run["peak_memory_bytes"]
    return report


# ------------------------------------------------------------------------------------------------
# 3-5. training, export, bench (the users' commands, in subprocesses)


def write_shards(
    directory: Path, resolution: int, teacher_model: Path, shards: int = 2, per_shard: int = 8
) -> Path:
    """Synthetic pair shards in the teacher's sample format (the check is about training, not data)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from p2pz.data.pairs.sample import build_sample
    from p2pz.data.pairs.shards import shard_name

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    meta = {
        "caption": "a cat",
        "edit": {"source": "cat", "target": "dog"},
        "teacher": {"model": str(teacher_model)},
    }
    for shard in range(shards):
        with wds.TarWriter(str(directory / shard_name(shard))) as sink:
            for index in range(per_shard):
                low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                src = Image.fromarray(low).resize((resolution, resolution), Image.Resampling.BICUBIC)
                sink.write(
                    build_sample(
                        f"s{shard}-{index}", src, src.transpose(Image.Transpose.FLIP_LEFT_RIGHT), meta
                    )
                )
    return directory


def _run(command: list[str], timeout: float) -> tuple[int, str]:
    """Run ``python -m p2pz ...``; its exit status and the tail of its output."""
    result = subprocess.run(
        [sys.executable, "-m", "p2pz", *command], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    return result.returncode, (result.stdout + result.stderr)[-2000:]


def _logged_losses(run: Path) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for path in run.glob("lightning_logs/version_*/metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key.startswith("train/") and value not in ("", None):
                        values.setdefault(key, []).append(float(value))
    return values


def check_train(
    device: torch.device, sizes: Sizes, shards: Path, run: Path, timeout: float
) -> dict[str, Any]:
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    steps = sizes.train_steps
    code, tail = _run(
        [
            "train", "fit", "--config", str(SD14_CONFIG), "--data.shards", str(shards),
            "--trainer.default_root_dir", str(run), "--trainer.accelerator", accelerator,
            "--trainer.devices", "1", "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--model.lpips_random_backbone", "true",
            "--data.epoch_length", str(steps), "--data.num_workers", "2", "--data.val_fraction", "0",
            "--checkpoint.every_n_train_steps", str(steps), *sizes.train_overrides,
        ],
        timeout,
    )  # fmt: skip
    ckpt = run / "checkpoints" / "last.ckpt"
    losses = _logged_losses(run)
    finite = bool(losses) and all(math.isfinite(v) for vs in losses.values() for v in vs)
    step = None
    if ckpt.is_file():
        step = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", -1))
    report = {
        "pass": code == 0 and step == steps and finite,
        "iterations": steps,
        "checkpoint_step": step,
        "losses_finite": finite,
        "r1_logged": "train/d_r1" in losses,
        "last_losses": {k: v[-1] for k, v in sorted(losses.items())},
    }
    if code != 0:
        report["output_tail"] = tail
    return report


def check_export(run: Path, package: Path, timeout: float) -> dict[str, Any]:
    code, tail = _run(["export", str(run / "checkpoints" / "last.ckpt"), "--out", str(package)], timeout)
    files = sorted(p.name for p in package.glob("*")) if package.is_dir() else []
    report = {"pass": code == 0 and {"generator.pt2", "generator.onnx"} <= set(files), "files": files}
    if code != 0:
        report["output_tail"] = tail
    return report


def check_bench(
    device: torch.device, sizes: Sizes, package: Path, out: Path, timeout: float
) -> dict[str, Any]:
    code, tail = _run(
        [
            "bench", str(package), "--out", str(out), "--device", device.type,
            "--batches", sizes.bench_batches, "--backends", sizes.bench_backends, "--trust-pt2",
            "--iters", "20", "--warmup", "2",
            "--teacher-steps", str(sizes.teacher_steps),
        ],
        timeout,
    )  # fmt: skip
    if code != 0 or not out.is_file():
        return {"pass": False, "output_tail": tail}
    bench = json.loads(out.read_text())
    p50 = {
        name: {b: r["p50_ms"] for b, r in per_batch.items()} for name, per_batch in bench["student"].items()
    }
    wanted = set(sizes.bench_backends.split(","))
    return {
        "pass": wanted <= set(p50),
        "p50_ms": p50,
        "teacher_ms": bench.get("teacher_ms"),
        "device": bench.get("device"),
    }


# ------------------------------------------------------------------------------------------------
# Driver


def timed(name: str, results: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> bool:
    """Run one check into ``results[name]`` (an exception is a failed check); True if it passed."""
    start = time.perf_counter()
    try:
        report = fn()
    except Exception as err:  # noqa: BLE001 -- a crash is a failed check, the others still run
        report = {
            "pass": False,
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc()[-2000:],
        }
    report["seconds"] = round(time.perf_counter() - start, 2)
    results[name] = report
    print(f"{name}: {'pass' if report['pass'] else 'FAIL'} ({report['seconds']:.1f} s)", flush=True)
    return bool(report["pass"])


CHECKS = ("ops", "teacher", "train", "export", "bench")


def run_checks(
    device: torch.device, small: bool, work: Path, timeout: float = 300, skip: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Every check not in ``skip`` (skipping ``train`` skips ``export`` and ``bench``, which need its run)."""
    sizes = Sizes(small)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    if "ops" not in skip:
        timed("ops", results, lambda: check_ops(device, sizes))
    model_dir = work / "teacher-model"
    if "teacher" not in skip:
        timed("teacher", results, lambda: check_teacher(device, sizes, make_model(model_dir, sizes)))
    run, package, shards = work / "run", work / "package", work / "pairs"
    resolution = 64 if small else 512

    def train() -> dict[str, Any]:
        if not model_dir.is_dir():
            make_model(model_dir, sizes)  # the shards' teacher, which bench times
        return check_train(device, sizes, write_shards(shards, resolution, model_dir), run, timeout)

    if not {"train", "export", "bench"} & skip:
        if timed("train", results, train) and timed(
            "export", results, lambda: check_export(run, package, timeout)
        ):
            timed("bench", results, lambda: check_bench(device, sizes, package, work / "bench.json", timeout))
        for name in ("export", "bench"):
            results.setdefault(
                name, {"pass": False, "error": "not run: an earlier check failed", "seconds": 0.0}
            )
    for name in CHECKS:
        results.setdefault(name, {"pass": None, "skipped": True, "seconds": 0.0})
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "small": small,
        "checks": results,
        "all_passed": all(r["pass"] for r in results.values() if not r.get("skipped")),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--small", action="store_true", help="toy sizes (the CPU test of this script)")
    parser.add_argument(
        "--work",
        default=None,
        help="folder for the model, shards, run and package (default: a temporary one)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed to each subprocess")
    parser.add_argument(
        "--skip",
        default="",
        help=f"comma-separated checks to leave out, of {','.join(CHECKS)} (train takes export and bench)",
    )
    args = parser.parse_args(argv)
    skip = frozenset(filter(None, args.skip.split(",")))
    if skip - set(CHECKS):
        parser.error(f"unknown checks {sorted(skip - set(CHECKS))}; choose from {', '.join(CHECKS)}")
    if args.device is None and not torch.cuda.is_available():
        print("no CUDA device found: nothing checked (run with --device cpu --small to test this script)")
        print(json.dumps({"cuda_available": False}))
        return 0
    device = torch.device(args.device or "cuda")
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        report = run_checks(device, args.small, Path(args.work), args.timeout, skip)
    else:
        with tempfile.TemporaryDirectory(prefix="p2pz-gpu-check-") as work:
            report = run_checks(device, args.small, Path(work), args.timeout, skip)
    print(json.dumps(report, default=str))
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
