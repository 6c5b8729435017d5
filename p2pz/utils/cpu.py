"""What the CPU offers: the CPUs this process may use (a SLURM task has its own share), and whether it
computes bf16 natively (emulated bf16 on AVX2 CPUs is over 10x slower than float32)."""

import os


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (what SLURM's task binding or a container gives it),
    and no more than ``$SLURM_CPUS_PER_TASK`` where that is set (a cluster that does not bind tasks)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        cpus = min(cpus, int(per_task))
    return max(cpus, 1)


def bf16_is_native() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check, as torch's own bf16 paths use it)."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:  # a build without oneDNN
        return False
