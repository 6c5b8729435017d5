"""Speed of the C++ CPU kernels relative to the pure-PyTorch reference, on a 256 px generator's shapes.

    python benchmarks/ops.py [--batch 2] [--repeats 7] [--threads N]

For each op and shape, reference and C++ runs are interleaved (the machine is shared and noisy) and the
median of each is kept. A ratio is total reference time over total C++ time across the generator's
shapes, for the forward pass and for forward + backward. The first line names the CPU and the ISA
flags the kernels can use (avx2, avx512f, avx512_bf16, amx...); the last line is one JSON object:
{"bias_act_speedup": {"forward": r, "forward_backward": r}, "upfirdn2d_speedup": {...}, "cpu": {"name":
..., "isa": [...], "torch_cpu_capability": ...}, ...}.

upfirdn2d is measured as 2x upsampling with StyleGAN2's 4-tap [1, 3, 3, 1] filter (upsample2d);
bias_act as the generator's lrelu with bias and clamp (conv_clamp=256).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from machine import cpu_info, describe_cpu

from p2pz.student.ops import _runtime, bias_act, upfirdn2d

# Feature maps of a 256 px StyleGAN2-family generator (channel_base 16384, channel_max 512).
RESOLUTIONS = {8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64}


def time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(make_ref, make_cpu, repeats: int) -> tuple[float, float]:
    """Median seconds of the reference and of the C++ version, interleaved run by run."""
    make_ref(), make_cpu()  # warm-up
    ref, cpu = [], []
    for _ in range(repeats):
        ref.append(time_once(make_ref))
        cpu.append(time_once(make_cpu))
    return statistics.median(ref), statistics.median(cpu)


def bias_act_cases(batch: int):
    for res, ch in RESOLUTIONS.items():
        yield f"bias_act lrelu [{batch},{ch},{res},{res}]", (batch, ch, res, res)
    yield f"bias_act lrelu [{batch},512] (mapping)", (batch, 512)


def upfirdn_cases(batch: int):
    for res, ch in RESOLUTIONS.items():
        yield f"upsample2d 4-tap [{batch},{ch},{res // 2},{res // 2}]", (batch, ch, res // 2, res // 2)


def run_bias_act(shape, impl: str, backward: bool):
    x = torch.randn(shape, requires_grad=backward)
    b = torch.randn(shape[1], requires_grad=backward)
    dy = torch.randn(shape)

    def fn():
        y = bias_act.bias_act(x, b, act="lrelu", clamp=256.0, impl=impl)
        if backward:
            torch.autograd.grad(y, [x, b], dy)

    return fn


def run_upsample(shape, impl: str, backward: bool):
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    x = torch.randn(shape, requires_grad=backward)
    dy = torch.randn(shape[0], shape[1], shape[2] * 2, shape[3] * 2)

    def fn():
        y = upfirdn2d.upsample2d(x, f, impl=impl)
        if backward:
            torch.autograd.grad(y, x, dy)

    return fn


def measure(name: str, cases, runner, repeats: int) -> dict:
    result = {}
    for mode, backward in (("forward", False), ("forward_backward", True)):
        total_ref = total_cpu = 0.0
        for label, shape in cases:
            ref, cpu = compare(runner(shape, "ref", backward), runner(shape, "cpu", backward), repeats)
            total_ref, total_cpu = total_ref + ref, total_cpu + cpu
            timings = f"ref {ref * 1e3:8.2f} ms  C++ {cpu * 1e3:8.2f} ms"
            print(f"  {mode:16s} {label:44s} {timings}  {ref / cpu:6.2f}x")
        result[mode] = round(total_ref / total_cpu, 2)
        totals = f"total ref {total_ref * 1e3:.1f} ms, C++ {total_cpu * 1e3:.1f} ms"
        print(f"{name} {mode}: {result[mode]:.2f}x ({totals})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timings per shape (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _runtime.load_extension("cpu"):
        raise SystemExit("the C++ CPU kernels did not build; nothing to compare")
    torch.manual_seed(0)
    cpu = cpu_info()
    print(f"cpu: {describe_cpu(cpu)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    summary = {
        "bias_act_speedup": measure("bias_act", list(bias_act_cases(args.batch)), run_bias_act, args.repeats),
        "upfirdn2d_speedup": measure(
            "upfirdn2d", list(upfirdn_cases(args.batch)), run_upsample, args.repeats
        ),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "cpu": cpu,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
