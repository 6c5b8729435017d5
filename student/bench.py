"""Latency of an exported student per backend, next to the teacher and the device's matmul peak.

Everything is measured in one process on one device so that ratios hold on a noisy machine:

* student latency per backend (eager, torch.compile, the ``.pt2`` program, onnxruntime) and batch
  size, after warm-up: p50 / p90 / p99 in ms and images/s, timed by ``torch.utils.benchmark.Timer``
  (``blocked_autorange``: blocks of calls, accelerator synchronisation, this process's threads);
* the teacher's latency for one edit at the student's resolution, and teacher / student;
* a roofline-style efficiency: the student's counted FLOPs per second as a fraction of a dense fp32
  matmul's FLOP/s measured here, a figure that compares across machines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Measurement, Timer

from p2pz.utils.atomic import atomic_path
from p2pz.utils.errors import UserError

BACKENDS = ("eager", "compile", "pt2", "onnx")


MIN_LATENCY_SAMPLES = 20  # single calls a student latency's p90/p99 are taken over, at least


def _timer(fn: Callable[[], Any]) -> Timer:
    """A Timer over ``fn()`` with this process's torch thread count (Timer's default is one thread)."""
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def time_calls(
    fn: Callable[[], Any], *, warmup: int = 0, min_calls: int = 1, min_run_time: float = 0.0
) -> Measurement:
    """Throughput timing: ``Timer.blocked_autorange`` (warm-up, blocks of calls, accelerator sync).

    ``warmup`` untimed calls come first; their mean time sizes the run so that about ``min_calls``
    calls are timed, for at least ``min_run_time`` seconds. Each of ``measurement.times`` is the mean
    of a block of calls, as many per block as keep the timer's own overhead negligible: right for a
    mean or a median, not for tail percentiles (see :func:`time_single_calls`).
    """
    timer = _timer(fn)
    per_call = timer.timeit(warmup).mean if warmup > 0 else 0.0
    return timer.blocked_autorange(min_run_time=max(min_run_time, min_calls * per_call))


def time_single_calls(
    fn: Callable[[], Any], *, warmup: int = 0, min_calls: int = MIN_LATENCY_SAMPLES, min_run_time: float = 0.0
) -> Measurement:
    """Latency timing: ``warmup`` untimed calls, then one ``Timer.timeit(1)`` sample per call.

    At least ``min_calls`` samples and ``min_run_time`` seconds of them, merged into one Measurement
    whose ``times`` are single calls, so p90/p99 show real tails. (Blocked timing would average a
    sub-millisecond call over blocks of thousands, leaving one or two samples.)
    """
    timer = _timer(fn)
    if warmup > 0:
        timer.timeit(warmup)
    samples, spent = [], 0.0
    while len(samples) < min_calls or spent < min_run_time:
        samples.append(timer.timeit(1))
        spent += samples[-1].raw_times[0]
    [measurement] = Measurement.merge(samples)
    return measurement


def percentiles(measurement: Measurement, batch: int) -> dict[str, float]:
    """Per-call latency of a batch: p50 / p90 / p99 in ms, and images/s at the median.

    ``samples`` is the number of timed samples the percentiles are taken over (single calls from
    :func:`time_single_calls`).
    """
    ordered = sorted(t * 1e3 for t in measurement.times)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    p50 = measurement.median * 1e3
    return {
        "p50_ms": p50,
        "p90_ms": pick(0.9),
        "p99_ms": pick(0.99),
        "images_per_s": batch / (p50 / 1e3),
        "samples": len(ordered),
    }


def matmul_peak_flops(device: torch.device, size: int = 1024, seconds: float = 1.0) -> float:
    """Dense fp32 matmul FLOP/s on ``device``: the roof of the roofline figure."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    measurement = time_calls(lambda: a @ b, warmup=3, min_calls=10, min_run_time=seconds)
    return 2 * size**3 / min(measurement.times)


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (a multiply-add counts 2), by PyTorch's own counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from p2pz.student.ops import force_impl

    counter = FlopCounterMode(display=False)
    with force_impl("ref"), counter, torch.no_grad():  # the reference ops are what the counter can see
        model(x)
    return int(counter.get_total_flops())


def _student_backends(model_dir: Path, backends: Sequence[str], device: torch.device) -> dict[str, nn.Module]:
    from p2pz.student.export import load_exported

    models: dict[str, nn.Module] = {}
    for name in backends:
        if name == "eager":
            models[name] = load_exported(model_dir, "eager", device)
        elif name == "compile":
            models[name] = torch.compile(load_exported(model_dir, "eager", device))
        elif name == "pt2":
            models[name] = load_exported(model_dir, "pt2", device)
        elif name == "onnx":
            if device.type != "cpu":
                continue  # the package's ONNX runs through onnxruntime's CPU provider
            models[name] = load_exported(model_dir, "onnx")
        else:
            raise UserError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return models


def teacher_latency_ms(
    teacher_model: str,
    resolution: int,
    device: torch.device,
    steps: int | None,
    source: str,
    target: str,
    preset: str = "official",
) -> dict[str, Any]:
    """One real-image edit by the teacher (inversion + guided edit), timed after a warm-up edit."""
    from PIL import Image

    from p2pz.teacher import Pix2PixZero

    teacher = Pix2PixZero.from_pretrained(teacher_model, preset=preset, device=device)
    direction = teacher.direction(source, target)
    image = Image.new("RGB", (resolution, resolution), (200, 60, 60))
    kwargs = {"num_steps": steps} if steps else {}

    def one_edit() -> None:
        teacher.edit([image], [direction], captions=[f"a {source}"], seeds=0, **kwargs)

    # one untimed edit (Timer's block-size estimate, which settles on one edit per block), one timed
    measurement = time_calls(one_edit)
    return {
        "teacher_ms": measurement.median * 1e3,
        "teacher_model": teacher_model,
        "teacher_steps": steps or teacher.settings.get("num_steps"),
    }


def run_benchmark(
    model_dir: str | os.PathLike,
    *,
    batches: Sequence[int] = (1, 4, 16),
    backends: Sequence[str] = BACKENDS,
    device: str | None = None,
    warmup: int = 3,
    iters: int = 20,
    min_run_time: float = 0.2,
    teacher_model: str | None = None,
    teacher_steps: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure an exported student (and its teacher); returns the JSON-ready report.

    Per backend and batch size: ``warmup`` untimed calls, then about ``iters`` timed calls and at least
    ``min_run_time`` seconds of them (see :func:`time_calls`).
    """
    from p2pz.student.export import read_config

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    res = config["resolution"]
    say = progress or (lambda _msg: None)

    say("loading backends")
    models = _student_backends(model_dir, backends, dev)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "resolution": res,
        "student": {},
    }
    for name, model in models.items():
        report["student"][name] = {}
        for batch in batches:
            say(f"student {name} batch {batch}")
            x = torch.rand(batch, 3, res, res, device=dev) * 2 - 1
            with torch.no_grad():  # Timer calls fn in this thread: grad mode applies
                measurement = time_single_calls(
                    lambda m=model, x=x: m(x),
                    warmup=warmup,
                    min_calls=max(iters, MIN_LATENCY_SAMPLES),
                    min_run_time=min_run_time,
                )
            report["student"][name][str(batch)] = percentiles(measurement, batch)

    say("roofline")
    eager = models.get("eager") or _student_backends(model_dir, ["eager"], dev)["eager"]
    flops = count_flops(eager, torch.zeros(1, 3, res, res, device=dev))
    peak = matmul_peak_flops(dev)
    best_batch = str(max(batches))
    best_ips = max(r[best_batch]["images_per_s"] for r in report["student"].values())
    report.update(
        {
            "student_flops_per_image": flops,
            "matmul_peak_flops": peak,
            "achieved_flops": flops * best_ips,
            "roofline_fraction": flops * best_ips / peak,
        }
    )

    edit = (config.get("data") or {}).get("edit") or {}
    teacher_model = teacher_model or config.get("teacher_model")
    if teacher_model:
        say("teacher edit")
        report.update(
            teacher_latency_ms(
                teacher_model, res, dev, teacher_steps, edit.get("source", "cat"), edit.get("target", "dog")
            )
        )
        student_b1 = (
            min(r["1"]["p50_ms"] for r in report["student"].values() if "1" in r)
            if "1" in report["student"].get("eager", {})
            else None
        )
        report["teacher_over_student"] = report["teacher_ms"] / student_b1 if student_b1 else None
    else:
        report.update(
            {
                "teacher_ms": None,
                "teacher_over_student": None,
                "teacher_note": "no teacher model given (--teacher) or recorded in the package",
            }
        )
    return report


def plot_latency(report: dict[str, Any], path: Path) -> None:
    """Bar chart of p50 latency per backend and batch size (log scale), teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(report["student"])
    batches = sorted({int(b) for r in report["student"].values() for b in r})
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.8 / max(1, len(batches))
    for i, batch in enumerate(batches):
        values = [report["student"][b].get(str(batch), {}).get("p50_ms", 0) / batch for b in backends]
        ax.bar([j + i * width for j in range(len(backends))], values, width, label=f"batch {batch}")
    if report.get("teacher_ms"):
        ax.axhline(
            report["teacher_ms"],
            color="crimson",
            linestyle="--",
            label=f"teacher: {report['teacher_ms'] / 1e3:.1f} s/edit",
        )
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(backends))], backends)
    ax.set_ylabel("ms per image (p50)")
    speedup = report.get("teacher_over_student")
    title = f"student latency, {report['resolution']} px, {report['device']}"
    if speedup:
        title += f" — {speedup:,.0f}× faster than the teacher"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``out`` (JSON) and a PNG chart beside it (same name, ``.png``)."""
    out = Path(out)
    with atomic_path(out, suffix=".json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    chart = out.with_suffix(".png")
    plot_latency(report, chart)
    return out, chart
