"""The CUDA kernels: the sources compile wherever nvcc is present; they equal the reference wherever a
GPU is present (skipped otherwise)."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_ops import random_upfirdn_config, run_upfirdn

from p2pz.student.ops import _runtime, bias_act, upfirdn2d


def nvcc_command(source, output) -> list[str]:
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths("cuda") + [sysconfig.get_paths()["include"]]
    includes.append(str(_runtime.SOURCE_DIR))  # the ops' own headers
    return (
        ["nvcc", "-c", str(source), "-o", str(output), "-std=c++20", "-Xcompiler", "-fPIC", "-arch=sm_80"]
        + [f"-I{p}" for p in includes]
        + cpp_extension.COMMON_NVCC_FLAGS
        + _runtime.CUDA_CFLAGS
        + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile(tmp_path):
    """Compile-only (about a minute per source on 2 cores): catches errors before they reach a GPU box."""

    def compile_one(name):
        cmd = nvcc_command(_runtime.SOURCE_DIR / name, tmp_path / (name + ".o"))
        return name, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(compile_one, _runtime.sources("cuda")))
    for name, proc in results:
        assert proc.returncode == 0, f"{name} failed to compile:\n{proc.stderr[-4000:]}"
        assert (tmp_path / (name + ".o")).stat().st_size > 0


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def cuda_extension():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _runtime.load_extension("cuda"):
        pytest.fail("the CUDA extension did not build; see the warning above")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upfirdn2d_cuda_equals_reference(cuda_extension, dtype):
    rng = random.Random(5)
    for i in range(150):
        cfg = random_upfirdn_config(rng)
        _, ref = run_upfirdn(cfg, dtype, "ref", seed=i)
        g = torch.Generator().manual_seed(i)
        x = torch.randn(2, 3, *cfg["hw"], generator=g, dtype=torch.float64).to(dtype).cuda()
        if cfg["channels_last"]:
            x = x.to(memory_format=torch.channels_last)
        f = torch.randn(cfg["f_shape"], generator=g).cuda()
        args = (cfg["up"], cfg["down"], cfg["padding"], cfg["flip_filter"], cfg["gain"])
        out = upfirdn2d.upfirdn2d(x, f, *args, impl="cuda")
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol, msg=lambda m, cfg=cfg: f"{cfg}: {m}")


@pytest.mark.cuda
@needs_gpu
def test_upfirdn2d_cuda_large_tiles_and_gradients(cuda_extension):
    f = upfirdn2d.setup_filter([1, 3, 3, 1], device="cuda")
    x = torch.randn(2, 8, 67, 45, device="cuda", dtype=torch.float64, requires_grad=True)
    for fn in (upfirdn2d.upsample2d, upfirdn2d.downsample2d, upfirdn2d.filter2d):
        ref, out = fn(x, f, impl="ref"), fn(x, f, impl="cuda")
        torch.testing.assert_close(out, ref)
        dy = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(out, x, dy)[0], torch.autograd.grad(ref, x, dy)[0])
    xs = torch.randn(1, 2, 5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: upfirdn2d.upsample2d(t, f, impl="cuda"), (xs,))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("act", sorted(bias_act.ACTIVATIONS))
def test_bias_act_cuda_equals_reference(cuda_extension, act):
    for shape, dim, cl in [((2, 5, 4, 3), 1, False), ((2, 5, 4, 3), 1, True), ((6, 7), 1, False)]:
        x = torch.randn(shape, dtype=torch.float64, device="cuda") * 3
        if cl:
            x = x.to(memory_format=torch.channels_last)
        b = torch.randn(shape[dim], dtype=torch.float64, device="cuda")
        for clamp in (None, 0.7):
            xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            ref = bias_act.bias_act(xr, b, dim, act, clamp=clamp, impl="ref")
            out = bias_act.bias_act(xc, b, dim, act, clamp=clamp, impl="cuda")
            torch.testing.assert_close(out, ref)
            dy = torch.randn_like(ref)
            torch.testing.assert_close(
                torch.autograd.grad(out, xc, dy)[0], torch.autograd.grad(ref, xr, dy)[0]
            )
    xs = torch.randn(2, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    bs = torch.randn(3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, c: bias_act.bias_act(a, c, act=act, impl="cuda"), (xs, bs))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow or not slow"]))
