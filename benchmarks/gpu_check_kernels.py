"""gpu_check.py's part 1 checks of the kernels: versions, ops against float64, opcheck, a non-default
stream, and the CUDA test file. Each takes the run's context (device, sizes, work folder, seconds left)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import cpu_info

REPO = Path(__file__).resolve().parents[1]
# errors relative to the reference's magnitude; fp16 has 11 bits, bf16 8 (x a few roundings)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# ------------------------------------------------------------------------------------------------
# versions


def _command_line(command: list[str], pattern: str = r".+") -> str | None:
    """The last line of ``command``'s output that matches ``pattern``; None when it cannot run."""
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.splitlines() if re.search(pattern, ln)]
    return lines[-1] if lines else None


def check_versions(ctx: Any) -> dict[str, Any]:
    """torch, CUDA, cuDNN, the driver, nvcc and the arch lists (informational: passes when read)."""
    report: dict[str, Any] = {
        "pass": True,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": _command_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "nvcc": _command_line(["nvcc", "--version"], r"release"),
        "torch_arch_list": torch.cuda.get_arch_list() if torch.cuda.is_available() else [],
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "cpu": cpu_info(),
    }
    if ctx.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(ctx.device)
        report["device_capability"] = f"sm_{major}{minor}"
        report["device_name"] = torch.cuda.get_device_name(ctx.device)
    return report


# ------------------------------------------------------------------------------------------------
# ops against the float64 reference


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


def op_cases(sizes: Any, device: torch.device) -> dict[str, tuple[Callable, list[torch.Tensor]]]:
    """name -> (impl -> the op as a function of its inputs, the float32 CPU inputs)."""
    from p2pz.student.ops import bias_act, upfirdn2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(sizes.bias_act_shape, generator=g)
    b = torch.randn(sizes.bias_act_shape[1], generator=g)
    image = torch.randn(sizes.upfirdn_shape, generator=g)
    f = upfirdn2d.setup_filter([1, 3, 3, 1], device=device)  # 4x4 taps

    def act(name: str) -> Callable[[str], Callable]:
        return lambda impl: lambda x, b: bias_act.bias_act(x, b, act=name, clamp=256.0, impl=impl)

    def resample(up: int, down: int, padding: int | list[int] = 1) -> Callable[[str], Callable]:
        return lambda impl: lambda x: upfirdn2d.upfirdn2d(x, f, up=up, down=down, padding=padding, impl=impl)

    return {
        "bias_act_lrelu": (act("lrelu"), [x, b]),
        "bias_act_tanh": (act("tanh"), [x, b]),
        "upfirdn2d_up2": (resample(2, 1), [image]),
        "upfirdn2d_down2": (resample(1, 2), [image]),
        "upfirdn2d_filter_only": (resample(1, 1, [2, 1, 2, 1]), [image]),  # up 1, down 1, 4x4: filter2d
    }


def check_ops(ctx: Any) -> dict[str, Any]:
    """Compiled kernels vs the float64 reference: forward, backward, second order, per dtype."""
    from p2pz.student.ops import _runtime

    device, impl = ctx.device, ctx.device.type
    if not _runtime.load_extension(impl):
        return {"pass": False, "error": f"the {impl} kernels did not build (see the warning above)"}
    errors: dict[str, dict[str, list[float]]] = {}
    passed = True
    for name, (make, inputs) in op_cases(ctx.sizes, device).items():
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
# torch.library.opcheck and a non-default stream


def opcheck_cases(device: torch.device) -> dict[str, tuple[Any, tuple]]:
    """name -> (operator, arguments) for ``torch.library.opcheck`` on ``device``."""
    from p2pz.student.ops import upfirdn2d

    ops = torch.ops.p2pz
    f = upfirdn2d.setup_filter([1, 3, 3, 1], device=device)
    x = torch.randn(2, 3, 6, 5, device=device, requires_grad=True)
    xcl = torch.randn(2, 3, 6, 5, device=device).to(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(3, device=device, requires_grad=True)
    dy = torch.randn(2, 3, 6, 5, device=device, requires_grad=True)
    return {
        "upfirdn2d_up2": (ops.upfirdn2d.default, (x, f, 2, 2, 1, 1, 2, 1, 2, 1, False, 2.0)),
        "upfirdn2d_down2_channels_last": (ops.upfirdn2d.default, (xcl, f, 1, 1, 2, 2, 1, 1, 1, 1, True, 1.0)),
        "upfirdn2d_filter_only": (ops.upfirdn2d.default, (x, f, 1, 1, 1, 1, 2, 1, 2, 1, False, 1.0)),
        "bias_act_lrelu": (ops.bias_act.default, (x, b, 1, "lrelu", 0.2, 1.4, 0.8)),
        "bias_act_swish_channels_last": (ops.bias_act.default, (xcl, None, 1, "swish", 0.0, 1.0, -1.0)),
        "bias_act_grad_tanh": (ops.bias_act_grad.default, (dy, x, b, 1, "tanh", 0.2, 1.4, 0.8, 1)),
    }


def check_opcheck(ctx: Any) -> dict[str, Any]:
    """``torch.library.opcheck`` of every operator on the device's kernels (schema, fake, autograd)."""
    from p2pz.student.ops import _runtime

    if not _runtime.load_extension(ctx.device.type):
        return {"pass": False, "error": f"the {ctx.device.type} kernels did not build"}
    failures = {}
    cases = opcheck_cases(ctx.device)
    for name, (op, args) in cases.items():
        try:
            torch.library.opcheck(op, args)
        except Exception as err:  # noqa: BLE001 -- one failing case is reported, the others still run
            failures[name] = f"{type(err).__name__}: {str(err)[:500]}"
    return {"pass": not failures, "cases": sorted(cases), "failures": failures}


def check_stream(ctx: Any) -> dict[str, Any]:
    """The CUDA kernels on a non-default stream equal their result on the default stream."""
    if ctx.device.type != "cuda":
        return {"pass": None, "skipped": "CUDA streams: only on a cuda device"}
    from p2pz.student.ops import _runtime

    if not _runtime.load_extension("cuda"):
        return {"pass": False, "error": "the cuda kernels did not build"}
    results = {}
    for name, (make, inputs) in op_cases(ctx.sizes, ctx.device).items():
        args = [t.to(ctx.device) for t in inputs]
        want = make("cuda")(*args)
        stream = torch.cuda.Stream(ctx.device)
        stream.wait_stream(torch.cuda.current_stream(ctx.device))
        with torch.cuda.stream(stream):
            got = make("cuda")(*args)
        torch.cuda.current_stream(ctx.device).wait_stream(stream)
        torch.cuda.synchronize(ctx.device)
        results[name] = float((got - want).abs().max())
    return {"pass": all(v == 0.0 for v in results.values()), "max_abs_difference": results}


# ------------------------------------------------------------------------------------------------
# the CUDA test file


def check_ops_tests(ctx: Any) -> dict[str, Any]:
    """``pytest tests/test_ops_cuda.py`` (its GPU tests; skipped where torch sees no GPU)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    command += ["-n", "0", "-m", "not slow", "-rs", str(REPO / "tests" / "test_ops_cuda.py")]
    env = dict(os.environ)
    if ctx.device.type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine: the CPU path, as asked
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=ctx.seconds_left(), cwd=REPO, env=env
    )
    tail = (result.stdout + result.stderr).strip().splitlines()
    summary = next((ln for ln in reversed(tail) if re.search(r"passed|failed|skipped|error", ln)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    report = {"pass": result.returncode == 0, "summary": summary.strip("= "), "counts": counts}
    if ctx.device.type == "cuda" and counts.get("passed", 0) == 0:
        report["pass"] = False  # on a GPU the tests must run, not skip
    if result.returncode != 0:
        report["output_tail"] = "\n".join(tail[-40:])
    return report
