"""What machine a benchmark ran on: the CPU's name and the instruction sets its kernels can use."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

# The flags that decide how fast the C++ kernels and torch's own CPU code can be (x86 and Arm names).
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16",
)  # fmt: skip


def cpu_info(cpuinfo: str | None = None) -> dict[str, object]:
    """The CPU's name, which of :data:`ISA_FLAGS` it has, and the ISA torch's own kernels dispatch to.

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None; elsewhere only the platform's name)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "name": fields.get("model name") or platform.processor() or platform.machine(),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def describe_cpu(info: dict[str, object]) -> str:
    """One line: ``AMD EPYC (avx avx2 fma; torch: AVX2)``."""
    flags = " ".join(info["isa"]) or "no listed ISA flags"
    return f"{info['name']} ({flags}; torch: {info['torch_cpu_capability']})"
