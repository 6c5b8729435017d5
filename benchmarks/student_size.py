"""Sizes of the student networks: parameters and MACs per image of both presets, and the lite preset's
CPU latency at 256 px, batch 1 (informative: it depends on the machine and its load).

MACs are FLOPs / 2 from ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass with the
reference ops on fake tensors (no memory, no compute). They cover every convolution (modulated convs
included, up-convs counted on the input grid as transposed convs), every dense layer and the FIR blur
taps of the reference upfirdn2d.

    python benchmarks/student_size.py        # last line: one JSON object
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from student.networks import Discriminator, Generator
from student.ops import force_impl


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def size_of(preset: str, resolution: int) -> dict[str, int]:
    """Parameters of G and D and the generator's MACs per image, without allocating real weights."""
    with force_impl("ref"), FakeTensorMode():
        G = Generator(resolution, preset=preset).eval()
        D = Discriminator(resolution, preset=preset)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            G(torch.zeros(1, 3, resolution, resolution))
    return {
        "params": count_params(G),
        "macs": counter.get_total_flops() // 2,
        "D_params": count_params(D),
    }


def cpu_latency_ms(preset: str = "lite", resolution: int = 256, runs: int = 20) -> dict[str, float]:
    """Median and best wall time of G's eval forward at batch 1, per ops implementation."""
    torch.manual_seed(0)
    G = Generator(resolution, preset=preset).eval()
    x = torch.rand(1, 3, resolution, resolution) * 2 - 1
    out = {}
    for impl in ("ref", "cpu"):
        with force_impl(impl), torch.inference_mode():
            for _ in range(3):
                G(x)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                G(x)
                times.append((time.perf_counter() - t) * 1e3)
        out[f"{impl}_median_ms"] = round(statistics.median(times), 2)
        out[f"{impl}_min_ms"] = round(min(times), 2)
    return out


def main() -> None:
    result: dict[str, float | int] = {}
    for preset, res in (("comod", 512), ("comod", 256), ("lite", 256)):
        s = size_of(preset, res)
        result[f"{preset}_{res}_params"] = s["params"]
        result[f"{preset}_{res}_macs"] = s["macs"]
        result[f"{preset}_{res}_D_params"] = s["D_params"]
        print(
            f"{preset:5s} {res:4d} px: G {s['params'] / 1e6:7.2f} M params, "
            f"{s['macs'] / 1e9:7.2f} GMACs/image; "
            f"D {s['D_params'] / 1e6:6.2f} M params"
        )
    lat = cpu_latency_ms()
    print(f"lite 256 px CPU forward, batch 1, {torch.get_num_threads()} threads: {lat}")
    result.update({f"lite_256_cpu_{k}": v for k, v in lat.items()})
    result["cpu_threads"] = torch.get_num_threads()
    result["macs_counter"] = "FlopCounterMode/2, reference ops"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
