"""Custom StyleGAN2-family operators: FIR resampling (`upfirdn2d`), fused bias + activation (`bias_act`)
and convolution with resampling built on them (`conv2d_resample`).

Each op has three implementations with the same results:

* ``ref``  -- readable pure PyTorch, the ground truth, and the only one ONNX export sees;
* ``cpu``  -- C++ kernels (``<op>.cpp``), the fast path for CPU tensors;
* ``cuda`` -- CUDA kernels (``<op>.cu``), the fast path for CUDA tensors.

The compiled kernels are registered as ``torch.ops.p2pz.*`` operators with fake kernels and autograd
formulas, so ``torch.compile`` and ``torch.export`` see them. They are built just in time on first use
and fall back to ``ref`` (with one warning) when the build fails. Choose an implementation per call with
``impl=``, for a block of code with :func:`force_impl`, or set the process' default (which an explicit
``impl=`` overrides) with the environment variable ``P2PZ_OPS_IMPL=ref|cpu|cuda``.

Layout: one file set per op -- ``<op>.py`` (Python API, reference, operator schema and autograd),
``<op>.h`` / ``<op>.cpp`` / ``<op>.cu`` (its kernels) -- plus ``common.h`` (what the kernels of both ops
share) and ``_runtime.py`` (operator definition, implementation choice, just-in-time build).
"""

from p2pz.student.ops import bias_act, conv2d_resample, upfirdn2d
from p2pz.student.ops._runtime import force_impl

__all__ = ["bias_act", "conv2d_resample", "upfirdn2d", "force_impl"]
