"""Latency of an exported student per backend, next to the teacher and the device's matmul peak.

Everything is measured in one process on one device so that ratios hold on a noisy machine:

* student latency per backend (eager, torch.compile, the ``.pt2`` program, onnxruntime) and batch
  size, after warm-up: p50 / p90 / p99 in ms and images/s, timed by ``torch.utils.benchmark.Timer``
  (``blocked_autorange``: blocks of calls, accelerator synchronisation, this process's threads);
* the teacher's latency for one edit at the student's resolution, in the precision ``p2pz generate``
  runs it in on that device (float16 on cuda), and teacher / student;
* a roofline-style efficiency: the student's counted FLOPs per second as a fraction of a dense
  matmul's FLOP/s measured here in the convolutions' math mode (TF32 on cuda when cuDNN may use it),
  a figure that compares across machines. upfirdn2d counts the multiply-adds its compiled kernels do
  (the filter taps that land on real samples), not the zero-stuffed reference's.

``ops_impl`` says which implementation of the custom ops each backend runs: the compiled kernels
(``cpu`` / ``cuda``) or the pure-PyTorch reference (``ref``: the ``.pt2`` and ONNX exports).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Measurement, Timer

from p2pz.utils.atomic import atomic_path
from p2pz.utils.errors import UserError
from p2pz.utils.formatting import format_ratio

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


def conv_allows_tf32() -> bool:
    """Whether cuDNN may run float32 convolutions in TF32 (torch's default: yes)."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # torch >= 2.9 refuses the legacy flag once the new API set it
        return torch.backends.cudnn.conv.fp32_precision == "tf32"


@contextlib.contextmanager
def matmul_tf32(enabled: bool) -> Iterator[None]:
    """cuBLAS float32 matmuls in TF32 (``enabled``) or full float32 inside the block, restored after;
    through whichever of torch's two APIs set the current mode (they refuse to be mixed)."""
    matmul = torch.backends.cuda.matmul
    try:
        before, name, value = matmul.allow_tf32, "allow_tf32", enabled
    except RuntimeError:  # the new API is in charge
        before, name, value = matmul.fp32_precision, "fp32_precision", "tf32" if enabled else "ieee"
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def peak_math_mode(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """How the convolutions multiply on ``device`` in ``dtype``: ``tf32`` (cuda, float32, cuDNN allowed
    to), else the dtype itself. The roofline's matmul peak is measured in this mode."""
    if device.type == "cuda" and dtype == torch.float32 and conv_allows_tf32():
        return "tf32"
    return str(dtype).removeprefix("torch.")


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 1.0
) -> float:
    """Dense matmul FLOP/s on ``device`` in ``dtype``, in the convolutions' math mode
    (:func:`peak_math_mode`): the roof of the roofline figure."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    tf32 = matmul_tf32(peak_math_mode(device, dtype) == "tf32") if device.type == "cuda" else None
    with tf32 or contextlib.nullcontext():
        measurement = time_calls(lambda: a @ b, warmup=3, min_calls=10, min_run_time=seconds)
    return 2 * size**3 / min(measurement.times)


def _axis_taps(in_size: int, out_size: int, up: int, down: int, pad0: int, taps: int) -> int:
    """(output sample, filter tap) pairs along one axis whose tap lands on a real input sample: the
    zero-stuffed and padding positions the compiled kernels skip are not counted."""
    count = 0
    for o in range(out_size):
        for k in range(taps):
            v = o * down + k - pad0  # the tap's position in the upsampled, padded signal
            count += v >= 0 and v % up == 0 and v // up < in_size
    return count


def upfirdn2d_flops(
    x_shape: Sequence[int],
    f_shape: Sequence[int],
    upx: int,
    upy: int,
    downx: int,
    downy: int,
    padx0: int,
    padx1: int,
    pady0: int,
    pady1: int,
    *_: Any,
    out_shape: Sequence[int],
) -> int:
    """FLOPs of one ``p2pz::upfirdn2d`` call (a multiply-add counts 2), for PyTorch's FLOP counter
    (which passes the operator's arguments with tensors as their shapes)."""
    n, c, h, w = x_shape
    fh, fw = f_shape
    oh, ow = out_shape[2], out_shape[3]
    return 2 * n * c * _axis_taps(h, oh, upy, downy, pady0, fh) * _axis_taps(w, ow, upx, downx, padx0, fw)


def count_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, str]:
    """FLOPs of one forward pass (a multiply-add counts 2) by PyTorch's counter, with the compiled ops
    (upfirdn2d: :func:`upfirdn2d_flops`; bias_act, elementwise, counts 0 as every elementwise op does),
    and the implementation counted with: ``x``'s device's kernels, else the CPU's (the count is the
    same), else ``ref`` (the zero-stuffed reference, which counts more) when none build."""
    from torch.utils.flop_counter import FlopCounterMode

    from p2pz.student.ops import _runtime, force_impl

    impl = x.device.type
    if not _runtime.load_extension(impl):
        impl = "cpu" if _runtime.load_extension("cpu") else "ref"
        model, x = copy.deepcopy(model).cpu(), x.cpu()
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.p2pz.upfirdn2d: upfirdn2d_flops})
    with force_impl(impl), counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops()), impl


PT2_SKIPPED = (
    "pt2 not run: its program is unpickled, which can run code from the package; "
    "pass --trust-pt2 for a package you made or trust"
)


def select_backends(
    backends: Sequence[str] | None, trust_pt2: bool, packaged: Collection[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The backends to measure, and a one-line note per backend left out.

    ``None`` means all of :data:`BACKENDS` that apply: the ``.pt2`` program only with ``trust_pt2``
    (loading it unpickles the package's program, which can run code), and ``pt2`` / ``onnx`` only
    where the package holds them (``packaged``: the keys of its ``config.json`` ``files``; ``None``
    when not known yet). Naming ``pt2`` without ``trust_pt2`` is an error rather than a silent skip.
    """
    if backends is None:
        chosen, skipped = [], {}
        for name in BACKENDS:
            if name == "pt2" and not trust_pt2:
                skipped[name] = PT2_SKIPPED
            elif name in ("pt2", "onnx") and packaged is not None and name not in packaged:
                skipped[name] = f"{name} not run: the package was exported without it"
            else:
                chosen.append(name)
        return chosen, skipped
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    if "pt2" in backends and not trust_pt2:
        raise UserError(
            "the pt2 backend unpickles the package's program, which can run code; pass --trust-pt2 "
            "only for a package you made or trust, or leave pt2 out of --backends"
        )
    return list(backends), {}


def _student_backends(
    model_dir: Path,
    backends: Sequence[str],
    device: torch.device,
    trust_pt2: bool = False,
    dtype: torch.dtype = torch.float32,
    skipped: dict[str, str] | None = None,
) -> dict[str, nn.Module]:
    """The loaded backends; one that cannot run here (ONNX on cuda without onnxruntime's CUDA
    provider) goes to ``skipped`` with the reason instead."""
    from p2pz.student.export import load_exported, onnx_cuda_missing, read_config
    from p2pz.student.package import first_edit_vector

    edit = first_edit_vector(read_config(model_dir))
    models: dict[str, nn.Module] = {}
    for name in backends:
        if name == "eager":
            models[name] = load_exported(model_dir, "eager", device, dtype=dtype, edit=edit)
        elif name == "compile":
            models[name] = torch.compile(load_exported(model_dir, "eager", device, dtype=dtype, edit=edit))
        elif name == "pt2":
            models[name] = load_exported(model_dir, "pt2", device, trust_pt2=trust_pt2, edit=edit)
        elif name == "onnx":
            why = onnx_cuda_missing() if device.type == "cuda" else None
            if why:
                if skipped is not None:
                    skipped[name] = why
                continue
            models[name] = load_exported(model_dir, "onnx", device, edit=edit)
        else:
            raise UserError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return models


OPS_IMPL_NOTE = (
    "the custom ops (upfirdn2d, bias_act) each backend runs: cpu / cuda are the compiled kernels, ref the "
    "pure-PyTorch reference (zero-stuffed upfirdn2d), which the .pt2 and ONNX exports are made of"
)


def _program_ops_impl(model: nn.Module, device: torch.device) -> str:
    """What a loaded ``.pt2`` program runs: the compiled kernels if its graph calls ``p2pz`` operators."""
    graph = getattr(model, "graph", None)
    calls = [] if graph is None else [str(node.target) for node in graph.nodes if node.op == "call_function"]
    return device.type if any(c.startswith("p2pz.") for c in calls) else "ref"


def ops_impl(models: dict[str, nn.Module], device: torch.device) -> dict[str, str]:
    """Per backend, which implementation of the custom ops it runs (see :data:`OPS_IMPL_NOTE`): eager
    and torch.compile call the operators, whose kernels are the automatic choice for ``device`` (the
    reference where they do not build); ONNX is exported from the reference; ``.pt2`` as its graph says."""
    from p2pz.student.ops._runtime import choose_impl

    native = choose_impl(None, torch.empty(0, device=device))
    labels = {"eager": native, "compile": native, "onnx": "ref"}
    return {
        name: _program_ops_impl(model, device) if name == "pt2" else labels[name]
        for name, model in models.items()
    }


def dtype_error(model_dir: Path, device: torch.device, dtype: torch.dtype, res: int) -> dict[str, Any]:
    """How far the eager student in ``dtype`` is from float32 on the same random inputs: max and mean
    absolute difference in grey levels (0-255) of the 8-bit outputs."""
    from p2pz.student.export import load_exported, read_config
    from p2pz.student.package import first_edit_vector

    edit = first_edit_vector(read_config(model_dir))
    x = torch.rand(4, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    outputs = {}
    for d in (torch.float32, dtype):
        model = load_exported(model_dir, "eager", device, dtype=d, edit=edit)
        with torch.no_grad():
            y = model(x.to(device)).float().cpu()  # float32 in, as p2pz apply feeds it
        outputs[d] = ((y.clamp(-1, 1) + 1) * 127.5).round()
    diff = (outputs[dtype] - outputs[torch.float32]).abs()
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "max_grey_levels": float(diff.max()),
        "mean_grey_levels": float(diff.mean()),
        "images": x.shape[0],
    }


TEACHER_TIMING_SENTENCES = 2  # the timed edit's direction: its values do not change the edit's cost


def teacher_dtype(device: torch.device | str) -> torch.dtype:
    """The precision ``p2pz generate`` runs the teacher in on ``device`` by default (its ``--dtype``
    default through its own rule: float16 on cuda, float32 elsewhere)."""
    from p2pz.data.pairs.settings import Settings
    from p2pz.utils.devices import resolve_dtype, torch_dtype

    return torch_dtype(resolve_dtype(Settings.dtype, str(device)))


def teacher_latency_ms(
    teacher_model: str,
    resolution: int,
    device: torch.device,
    steps: int | None,
    source: str,
    target: str,
    preset: str = "official",
    guidance_scale: float | None = None,
    xa_guidance: float | None = None,
) -> dict[str, Any]:
    """One real-image edit by the teacher (inversion + guided edit), timed after a warm-up edit, in the
    precision ``p2pz generate`` uses on ``device`` (:func:`teacher_dtype`).

    ``preset``, ``steps``, ``guidance_scale`` and ``xa_guidance`` (None: the preset's) are the teacher's
    settings; pass those that made the student's pairs (:func:`pairs_teacher_settings`).
    """
    from PIL import Image

    from p2pz.teacher import Pix2PixZero

    dtype = teacher_dtype(device)
    teacher = Pix2PixZero.from_pretrained(teacher_model, preset=preset, device=device, dtype=dtype)
    # a direction from a couple of sentences: the edit costs the same, the full sentence bank is minutes
    direction = teacher.direction(source, target, num_sentences=TEACHER_TIMING_SENTENCES)
    image = Image.new("RGB", (resolution, resolution), (200, 60, 60))
    given = {"num_steps": steps, "guidance_scale": guidance_scale, "xa_guidance": xa_guidance}
    kwargs = {k: v for k, v in given.items() if v is not None}

    def one_edit() -> None:
        teacher.edit([image], [direction], captions=[f"a {source}"], seeds=0, **kwargs)

    # one untimed edit (Timer's block-size estimate, which settles on one edit per block), one timed
    measurement = time_calls(one_edit)
    return {
        "teacher_ms": measurement.median * 1e3,
        "teacher_dtype": str(dtype).removeprefix("torch."),
        "teacher_model": teacher_model,
        "teacher_preset": preset,
        "teacher_steps": steps or teacher.preset.num_steps,
        "teacher_guidance_scale": teacher.preset.guidance_scale if guidance_scale is None else guidance_scale,
        "teacher_xa_guidance": teacher.preset.xa_guidance(synthetic=False)
        if xa_guidance is None
        else xa_guidance,
    }


def pairs_teacher_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The teacher's settings as they made the package's pairs (its ``config.json``: ``data.teacher``,
    recorded from the shards): ``preset``, ``steps``, ``guidance_scale``, ``xa_guidance``; a setting the
    run did not override is None (the preset's own value). Empty when the package does not say."""
    teacher = (config.get("data") or {}).get("teacher") or {}
    if not teacher.get("preset"):
        return {}
    overrides = teacher.get("overrides") or {}
    return {
        "preset": teacher["preset"],
        "steps": overrides.get("num_steps"),
        "guidance_scale": overrides.get("guidance_scale"),
        "xa_guidance": overrides.get("xa_guidance"),
    }


def run_benchmark(
    model_dir: str | os.PathLike,
    *,
    batches: Sequence[int] = (1, 4, 16),
    backends: Sequence[str] | None = None,
    trust_pt2: bool = False,
    device: str | None = None,
    dtype: str | torch.dtype = "float32",
    warmup: int = 3,
    iters: int = 20,
    min_run_time: float = 0.2,
    teacher_model: str | None = None,
    teacher_steps: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure an exported student (and its teacher); returns the JSON-ready report.

    Per backend and batch size: ``warmup`` untimed calls, then about ``iters`` timed calls and at least
    ``min_run_time`` seconds of them (see :func:`time_single_calls`). ``backends``: ``None`` for all
    that apply; ``pt2`` runs only with ``trust_pt2`` (see :func:`select_backends`), and the report's
    ``skipped_backends`` says why a backend was left out.
    """
    from p2pz.student.export import read_config
    from p2pz.student.package import resolve_package
    from p2pz.utils.devices import resolve_device, torch_dtype

    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be at least 1, got {list(batches)}")
    model_dir = resolve_package(model_dir)
    config = read_config(model_dir)
    dev = torch.device(resolve_device(device))
    dtype = torch_dtype(dtype)  # None / "auto": cuda when present
    res = config["resolution"]
    say = progress or (lambda _msg: None)

    backends, skipped = select_backends(backends, trust_pt2, packaged=config.get("files") or {})
    say("loading backends")
    models = _student_backends(model_dir, backends, dev, trust_pt2=trust_pt2, dtype=dtype, skipped=skipped)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "resolution": res,
        "dtype": str(dtype).removeprefix("torch."),
        "student": {},
        "skipped_backends": skipped,
        "ops_impl": ops_impl(models, dev),
        "ops_impl_note": OPS_IMPL_NOTE,
    }
    timing = {"warmup": warmup, "min_calls": max(iters, MIN_LATENCY_SAMPLES), "min_run_time": min_run_time}
    for name, model in models.items():
        report["student"][name] = {}
        for batch in batches:
            say(f"student {name} batch {batch}")
            x = torch.rand(batch, 3, res, res, device=dev) * 2 - 1  # float32: as p2pz apply feeds it
            with torch.no_grad():  # Timer calls fn in this thread: grad mode applies
                measurement = time_single_calls(lambda m=model, x=x: m(x), **timing)
            report["student"][name][str(batch)] = percentiles(measurement, batch)

    if dtype != torch.float32:
        say(f"{report['dtype']} vs float32")
        report["dtype_error"] = dtype_error(model_dir, dev, dtype, res)
    say("roofline")
    eager = _student_backends(model_dir, ["eager"], dev)["eager"]  # FLOPs counted in float32
    report.update(_roofline(eager, report["student"], str(max(batches)), res, dev, dtype))
    report.update(_teacher_comparison(config, report["student"], teacher_model, teacher_steps, res, dev, say))
    return report


def _roofline(
    eager: nn.Module,
    student: dict[str, Any],
    batch: str,
    res: int,
    dev: torch.device,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """FLOPs per image, the matmul peak, and the fraction of it the fastest backend reaches at ``batch``.

    The peak is measured in the math mode of the fastest backend's convolutions: its dtype on cuda
    (eager and compile run in ``dtype``, pt2 and onnx in float32), TF32 for float32 when cuDNN may use
    it. On the CPU it stays float32: low-precision matmuls are emulated on many CPUs (minutes)."""
    flops, counted_with = count_flops(eager, torch.zeros(1, 3, res, res, device=dev))
    fastest = max(student, key=lambda name: student[name][batch]["images_per_s"])
    best_ips = student[fastest][batch]["images_per_s"]
    peak_dtype = dtype if dev.type == "cuda" and fastest in ("eager", "compile") else torch.float32
    peak = matmul_peak_flops(dev, peak_dtype)
    return {
        "student_flops_per_image": flops,
        "flops_counted_with": counted_with,
        "matmul_peak_flops": peak,
        "matmul_peak_math_mode": peak_math_mode(dev, peak_dtype),
        "roofline_backend": fastest,
        "achieved_flops": flops * best_ips,
        "roofline_fraction": flops * best_ips / peak,
    }


def _teacher_comparison(
    config: dict[str, Any],
    student: dict[str, Any],
    teacher_model: str | None,
    teacher_steps: int | None,
    res: int,
    dev: torch.device,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The teacher's latency for one edit and how many times slower it is than the student at batch 1."""
    teacher_model = teacher_model or config.get("teacher_model")
    if not teacher_model or teacher_model == "none":
        return {
            "teacher_ms": None,
            "teacher_over_student": None,
            "teacher_note": "teacher skipped (--teacher none)"
            if teacher_model
            else "no teacher model given (--teacher) or recorded in the package",
        }
    say("teacher edit")
    edit = (config.get("data") or {}).get("edit") or {}
    source, target = edit.get("source", "cat"), edit.get("target", "dog")
    made = pairs_teacher_settings(config)  # the teacher as it made the pairs, not the paper's preset
    result = teacher_latency_ms(
        teacher_model,
        res,
        dev,
        teacher_steps if teacher_steps is not None else made.get("steps"),
        source,
        target,
        preset=made.get("preset", "official"),
        guidance_scale=made.get("guidance_scale"),
        xa_guidance=made.get("xa_guidance"),
    )
    result["teacher_settings_from"] = "the package's pairs (config.json)" if made else "preset official"
    student_b1 = (
        min(r["1"]["p50_ms"] for r in student.values() if "1" in r)
        if "1" in student.get("eager", {})
        else None
    )
    result["teacher_over_student"] = result["teacher_ms"] / student_b1 if student_b1 else None
    return result


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
        title += f" — {format_ratio(speedup)}× faster than the teacher"
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
