"""benchmarks/machine.py: the CPU's name and ISA flags that benchmarks/ops.py prints with its figures."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import machine  # noqa: E402

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""

GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid sve sve2 bf16
CPU part\t: 0xd4f
"""


def test_an_avx512_bf16_xeon_is_named_with_its_isa():
    info = machine.cpu_info(XEON)
    assert info["name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["isa"] == [
        "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
        "avx512_bf16", "amx_tile", "amx_bf16",
    ]  # fmt: skip
    line = machine.describe_cpu(info)
    assert line.startswith("Intel(R) Xeon(R) Platinum 8480+ (sse4_2 avx avx2") and "amx_bf16" in line


def test_an_arm_cpu_lists_its_features():
    info = machine.cpu_info(GRAVITON)
    assert info["isa"] == ["asimd", "sve", "sve2", "bf16"] and info["name"]


def test_this_machine():
    info = machine.cpu_info()
    assert info["name"] and isinstance(info["isa"], list) and info["torch_cpu_capability"]
