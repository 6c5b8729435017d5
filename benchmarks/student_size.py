"""Sizes of the student networks: parameters and MACs per image of both presets, the lite preset's
CPU latency at 256 px, batch 1, and the width sweep behind the lite preset's choice.

The lite preset must edit a 256 px image on a 2-core CPU in real time, taken here as at most
``--budget-ms`` (40 ms, 25 images/s) per image at batch 1 with every core: the sweep times the
generator at several widths (channel_base / channel_max, everything else as in ``lite``) and names the
widest one inside the budget. Latency depends on the machine and its load: run it on an idle one.

MACs are FLOPs / 2 from ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass with the
reference ops on fake tensors (no memory, no compute). They cover every convolution (modulated convs
included, up-convs counted on the input grid as transposed convs), every dense layer and the FIR blur
taps of the reference upfirdn2d.

    python benchmarks/student_size.py [--budget-ms 40] [--no-sweep]   # last line: one JSON object
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from p2pz.student.networks import GENERATOR_PRESETS, Discriminator, Generator
from p2pz.student.ops import force_impl


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


# (channel_base, channel_max) candidates for the lite preset, narrow to wide
LITE_WIDTHS = [(1024, 64), (1536, 96), (2048, 64), (2048, 128), (3072, 128), (4096, 128), (4096, 256)]


def cpu_latency_ms(
    preset: str = "lite", resolution: int = 256, runs: int = 20, impls=("ref", "cpu"), **overrides
) -> dict[str, float]:
    """Median and best wall time of G's eval forward at batch 1, per ops implementation."""
    torch.manual_seed(0)
    G = Generator(resolution, preset=preset, **overrides).eval()
    x = torch.rand(1, 3, resolution, resolution) * 2 - 1
    out = {}
    for impl in impls:
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


def width_sweep(budget_ms: float, rounds: int = 30) -> dict:
    """Params, MACs and latency (C++ ops, all cores) of the lite generator at each candidate width.

    The candidates are timed interleaved (one forward of each per round), so that a change of the
    machine's load during the sweep hits them all alike."""
    rows, models = [], []
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    for base, cmax in LITE_WIDTHS:
        with force_impl("ref"), FakeTensorMode():
            G = Generator(256, preset="lite", channel_base=base, channel_max=cmax).eval()
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                G(torch.zeros(1, 3, 256, 256))
        rows.append(
            {
                "channel_base": base,
                "channel_max": cmax,
                "params": count_params(G),
                "macs": counter.get_total_flops() // 2,
            }
        )
        torch.manual_seed(0)
        models.append(Generator(256, preset="lite", channel_base=base, channel_max=cmax).eval())
    times: list[list[float]] = [[] for _ in models]
    with force_impl("cpu"), torch.inference_mode():
        for G in models:  # warm-up
            G(x), G(x)
        for _ in range(rounds):
            for G, series in zip(models, times):
                t = time.perf_counter()
                G(x)
                series.append((time.perf_counter() - t) * 1e3)
    for row, series in zip(rows, times):
        row["median_ms"] = round(statistics.median(series), 2)
        print(
            f"  lite width {row['channel_base']:5d}/{row['channel_max']:3d}: "
            f"{row['params'] / 1e6:6.2f} M params, {row['macs'] / 1e9:5.2f} GMACs, "
            f"{row['median_ms']:7.1f} ms/image{'  (within budget)' if row['median_ms'] <= budget_ms else ''}"
        )
    inside = [r for r in rows if r["median_ms"] <= budget_ms]
    best = max(inside, key=lambda r: r["macs"]) if inside else None
    return {"budget_ms": budget_ms, "rows": rows, "widest_within_budget": best}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget-ms", type=float, default=40.0, help="real-time budget per 256 px image")
    parser.add_argument("--no-sweep", action="store_true", help="skip the lite width sweep")
    args = parser.parse_args()
    result: dict = {}
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
    if not args.no_sweep:
        print(f"lite width sweep at 256 px, batch 1, {torch.get_num_threads()} threads, C++ ops:")
        sweep = width_sweep(args.budget_ms)
        result["lite_width_sweep"] = sweep
        lite = GENERATOR_PRESETS["lite"]
        best = sweep["widest_within_budget"]
        result["lite_preset_is_widest_within_budget"] = bool(
            best
            and (best["channel_base"], best["channel_max"]) == (lite["channel_base"], lite["channel_max"])
        )
        print(
            f"widest within {args.budget_ms:g} ms: {best}; lite preset: "
            f"{lite['channel_base']}/{lite['channel_max']}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
