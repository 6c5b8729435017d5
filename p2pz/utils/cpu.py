"""What the CPU computes natively: emulated bf16 (AVX2 CPUs) is over 10x slower than float32."""


def bf16_is_native() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check, as torch's own bf16 paths use it)."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:  # a build without oneDNN
        return False
