"""The custom ops: C++ CPU kernels against the pure-PyTorch reference, gradients of every order the
training needs, the torch.library registration, the implementation switch, and diffusers' upfirdn2d.

The C++ extension is built once (about a minute) into the shared cache and reused by later runs.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from p2pz.student.ops import _runtime, bias_act, conv2d_resample, force_impl, upfirdn2d
from p2pz.student.ops.upfirdn2d import downsample2d, filter2d, setup_filter, upsample2d
from p2pz.utils.errors import UserError


@pytest.fixture(scope="module", autouse=True)
def cpu_extension():
    if not _runtime.load_extension("cpu"):
        pytest.fail("the C++ CPU extension did not build; see the warning above")


def random_upfirdn_config(rng: random.Random) -> dict:
    """A random upfirdn2d call whose output is not empty."""
    while True:
        sep = rng.random() < 0.3
        fh, fw = rng.randint(1, 12), rng.randint(1, 12)
        cfg = dict(
            up=(rng.choice([1, 2, 4]), rng.choice([1, 2, 4])),
            down=(rng.choice([1, 2, 4]), rng.choice([1, 2, 4])),
            f_shape=(fw,) if sep else (fh, fw),
            hw=(rng.randint(1, 11), rng.randint(1, 11)),
            padding=[rng.randint(-4, 6) for _ in range(4)],
            flip_filter=rng.random() < 0.5,
            gain=rng.choice([1.0, 2.5]),
            channels_last=rng.random() < 0.4,
        )
        fh_, fw_ = (fw, fw) if sep else (fh, fw)
        (upx, upy), (downx, downy), (px0, px1, py0, py1) = cfg["up"], cfg["down"], cfg["padding"]
        oh = (cfg["hw"][0] * upy + py0 + py1 - fh_ + downy) // downy
        ow = (cfg["hw"][1] * upx + px0 + px1 - fw_ + downx) // downx
        if oh >= 1 and ow >= 1:
            return cfg


def run_upfirdn(cfg: dict, dtype: torch.dtype, impl: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *cfg["hw"], generator=g, dtype=torch.float64).to(dtype)
    if cfg["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    f = torch.randn(cfg["f_shape"], generator=g)
    y = upfirdn2d.upfirdn2d(
        x, f, cfg["up"], cfg["down"], cfg["padding"], cfg["flip_filter"], cfg["gain"], impl=impl
    )
    return x, y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upfirdn2d_cpu_equals_reference(dtype):
    rng = random.Random(1234)
    for i in range(150):
        cfg = random_upfirdn_config(rng)
        x, ref = run_upfirdn(cfg, dtype, "ref", seed=i)
        _, out = run_upfirdn(cfg, dtype, "cpu", seed=i)
        assert out.shape == ref.shape, cfg
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=lambda m, cfg=cfg: f"{cfg}: {m}")
        if cfg["channels_last"] and not x.is_contiguous():
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "shape",
    [
        (3, 13, 8, 8),  # 39 NCHW planes a few pixels wide: the kernel's blocks of 16 planes, the last partial
        (1, 20, 5, 128),  # the widest such planes
        (2, 3, 6, 130),  # wider rows: one row at a time
        (1, 2, 5, 131),  # odd widths: the last column of a 2x phase split or interleave
        (2, 40, 7, 9),  # channels-last: one row at a time, over the channels
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_upfirdn2d_cpu_equals_reference_on_both_paths_of_the_kernel(shape, dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if shape[1] == 40:
        x = x.to(memory_format=torch.channels_last)
    f = setup_filter([1, 3, 3, 1])
    for up, down, padding in [
        (2, 1, [2, 1, 2, 1]),
        (2, 1, [2, 2, 1, 1]),
        (1, 2, [1, 1, 1, 1]),
        (1, 1, [1, 2, 0, 3]),
    ]:
        exact = upfirdn2d.upfirdn2d(x, f, up, down, padding, impl="ref")
        out = upfirdn2d.upfirdn2d(x.to(dtype), f, up, down, padding, impl="cpu")
        tol = 1e-10 if dtype == torch.float64 else 0.02 * (exact.abs().max().item() + 1)
        torch.testing.assert_close(out.double(), exact, atol=tol, rtol=0 if dtype == torch.float64 else 0.02)


def test_upfirdn2d_bfloat16_within_tolerance():
    rng = random.Random(99)
    for i in range(30):
        cfg = random_upfirdn_config(rng)
        _, exact = run_upfirdn(cfg, torch.float64, "ref", seed=i)
        _, out = run_upfirdn(cfg, torch.bfloat16, "cpu", seed=i)
        assert out.dtype == torch.bfloat16
        scale = exact.abs().max().item() + 1
        torch.testing.assert_close(out.double(), exact, atol=0.03 * scale, rtol=0.03)


def test_resampling_helpers_cpu_equal_reference_and_sizes():
    x = torch.randn(2, 4, 9, 7)
    for taps in ([1], [1, 1], [1, 3, 3, 1], [1, 2, 3, 4, 4, 3, 2, 1], list(range(1, 13))):
        f = setup_filter(taps)
        for fn, size in ((upsample2d, (18, 14)), (downsample2d, (4, 3)), (filter2d, (9, 7))):
            ref, out = fn(x, f, impl="ref"), fn(x, f, impl="cpu")
            if fn is not downsample2d or len(taps) > 1:
                assert ref.shape[2:] == size, (fn.__name__, taps)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # A DC image keeps its level away from the borders (setup_filter normalises, upsample2d adds up^2).
    ones = torch.ones(1, 1, 16, 16)
    f = setup_filter([1, 3, 3, 1])
    for y in (
        upsample2d(ones, f, impl="cpu"),
        downsample2d(ones, f, impl="cpu"),
        filter2d(ones, f, impl="cpu"),
    ):
        inner = y[:, :, 2:-2, 2:-2]
        torch.testing.assert_close(inner, torch.ones_like(inner))


def test_setup_filter():
    f = setup_filter([1, 3, 3, 1])
    assert f.shape == (4, 4) and f.dtype == torch.float32
    torch.testing.assert_close(f.sum(), torch.tensor(1.0))
    assert setup_filter(list(range(1, 9))).shape == (8,)  # 8 taps or more stay separable
    assert setup_filter([1, 2, 1], separable=True).shape == (3,)
    torch.testing.assert_close(setup_filter([1, 3, 3, 1], gain=4).sum(), torch.tensor(4.0))
    with pytest.raises(ValueError):
        setup_filter([[[1.0]]])


def test_reference_agrees_with_diffusers_upfirdn2d_native():
    from diffusers.models.upsampling import upfirdn2d_native

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 9, generator=g)
    for up, down, pad, k in [(1, 1, (1, 2), 4), (2, 1, (2, 1), 4), (1, 2, (1, 1), 4), (2, 2, (3, 2), 6),
                             (4, 1, (0, -1), 3), (1, 4, (-1, 2), 5)]:  # fmt: skip
        kernel = torch.randn(k, k, generator=g)
        theirs = upfirdn2d_native(x, kernel, up=up, down=down, pad=pad)
        ours = upfirdn2d.upfirdn2d(x, kernel, up=up, down=down, padding=[pad[0], pad[1]] * 2, impl="ref")
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# bias_act

LAYOUTS = [  # (shape, dim, channels_last)
    ((2, 5, 4, 3), 1, False),
    ((2, 5, 4, 3), 1, True),
    ((6, 7), 1, False),
    ((6, 7), 0, False),
    ((3, 4, 5), 2, False),
]


@pytest.mark.parametrize("act", sorted(bias_act.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bias_act_cpu_equals_reference(act, dtype):
    g = torch.Generator().manual_seed(0)
    for shape, dim, cl in LAYOUTS:
        for clamp, use_bias, gain in [
            (None, True, None),
            (0.7, True, None),
            (2.0, False, 0.5),
            (0.0, True, 3.0),
        ]:
            x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            b = torch.randn(shape[dim], generator=g, dtype=torch.float64).to(dtype) if use_bias else None
            args = dict(b=b, dim=dim, act=act, clamp=clamp, gain=gain)
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            ref = bias_act.bias_act(xr, impl="ref", **args)
            out = bias_act.bias_act(xc, impl="cpu", **args)
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
            assert out.stride() == x.stride()
            dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            (gr,) = torch.autograd.grad(ref, xr, dy)
            (gc,) = torch.autograd.grad(out, xc, dy)
            torch.testing.assert_close(gc, gr, atol=tol * 10, rtol=tol * 10)


def test_bias_act_bfloat16_within_tolerance():
    x = torch.randn(2, 8, 5, 5)
    b = torch.randn(8)
    for act in bias_act.ACTIVATIONS:
        exact = bias_act.bias_act(x.double(), b.double(), act=act, clamp=1.5, impl="ref")
        out = bias_act.bias_act(x.bfloat16(), b.bfloat16(), act=act, clamp=1.5, impl="cpu")
        torch.testing.assert_close(out.double(), exact, atol=0.03, rtol=0.02)


def test_bias_act_defaults_and_validation():
    x = torch.randn(3, 4)
    torch.testing.assert_close(bias_act.bias_act(x, act="lrelu", impl="cpu"),
                               torch.nn.functional.leaky_relu(x, 0.2) * math.sqrt(2))  # fmt: skip
    assert bias_act.bias_act(x, impl="cpu") is x  # the identity costs nothing
    with pytest.raises(ValueError):
        bias_act.bias_act(x, act="gelu")
    with pytest.raises(ValueError):
        bias_act.bias_act(x, torch.randn(3))


# ---------------------------------------------------------------------------------------------------
# Gradients: first and second order through the operators (R1 and path length need the second).


@pytest.mark.parametrize(
    "up,down,padding,f",
    [(1, 1, [1, 2, 2, 1], [1, 3, 3, 1]), (2, 1, [2, 1, 2, 1], [1, 3, 3, 1]), (1, 2, [1, 1, 0, 1], [1, 2, 1]),
     ((2, 1), (1, 2), [-1, 2, 3, 0], [[1.0, 2.0], [0.5, -1.0], [3.0, 1.0]])],
)  # fmt: skip
def test_upfirdn2d_gradcheck_and_gradgradcheck(up, down, padding, f):
    f = setup_filter(f) if not isinstance(f[0], list) else torch.tensor(f)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda x: upfirdn2d.upfirdn2d(x, f, up=up, down=down, padding=padding, gain=1.5, impl="cpu")
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("act", sorted(bias_act.ACTIVATIONS))
def test_bias_act_gradcheck_and_gradgradcheck(act):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    for clamp in (None, 1.5):
        fn = lambda x, b, clamp=clamp: bias_act.bias_act(x, b, act=act, clamp=clamp, impl="cpu")
        assert torch.autograd.gradcheck(fn, (x, b))
        assert torch.autograd.gradgradcheck(fn, (x, b))


@pytest.mark.parametrize("act", ["linear", "lrelu", "tanh"])
def test_bias_act_bias_gradient_on_1d_input(act):
    """On 1-D x (dim 0), b's gradient is x's, element by element: nothing to sum over."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    dy = torch.randn(7, generator=g, dtype=torch.float64)
    spec = bias_act.ACTIVATIONS[act]
    formula = lambda x, b: spec.func(x + b, spec.def_alpha) * spec.def_gain  # the reference formula
    expected = torch.autograd.grad(formula(x, b), (x, b), dy)
    got = torch.autograd.grad(bias_act.bias_act(x, b, dim=0, act=act, impl="cpu"), (x, b), dy)
    assert got[1].shape == b.shape
    torch.testing.assert_close(got, expected)
    fn = lambda x, b: bias_act.bias_act(x, b, dim=0, act=act, impl="cpu")
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


def test_bias_act_refuses_a_bias_on_another_device_or_of_another_kind():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        bias_act.bias_act(x, torch.zeros(3, device="meta"), impl="cpu")
    with pytest.raises(ValueError, match="floating-point"):
        bias_act.bias_act(x, torch.zeros(3, dtype=torch.int64), impl="ref")
    # a bias of another float precision is cast (mixed precision keeps fp32 biases)
    y = bias_act.bias_act(x.bfloat16(), torch.ones(3), impl="cpu")
    assert y.dtype == torch.bfloat16


def test_r1_style_double_backward_matches_reference():
    """grad of (grad of D(x) w.r.t. x)^2 w.r.t. the weights, through bias_act and upfirdn2d."""
    f = setup_filter([1, 3, 3, 1])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    results = []
    for impl in ("ref", "cpu"):
        xi, wi, bi = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        h = torch.nn.functional.conv2d(upfirdn2d.upfirdn2d(xi, f, padding=[2, 1, 2, 1], impl=impl), wi)
        logits = bias_act.bias_act(h, bi, act="swish", clamp=3.0, impl=impl)
        logits = downsample2d(logits, f, impl=impl).sum()
        (gx,) = torch.autograd.grad(logits, xi, create_graph=True)
        penalty = gx.square().sum()
        results.append(torch.autograd.grad(penalty, [wi, bi]))
    for a, c in zip(*results):
        torch.testing.assert_close(c, a, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------
# conv2d_resample: the fast paths compute the generic composition.


def generic_conv2d_resample(x, w, f, up, down, padding, flip_weight=True):
    px0, px1, py0, py1 = upfirdn2d._parse_padding(padding)
    fw, fh = upfirdn2d._filter_size(f)
    if up > 1:
        px0, px1, py0, py1 = (
            px0 + (fw + up - 1) // 2,
            px1 + (fw - up) // 2,
            py0 + (fh + up - 1) // 2,
            py1 + (fh - up) // 2,
        )
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    x = upfirdn2d.upfirdn2d(
        x, f if up > 1 else None, up=up, padding=[px0, px1, py0, py1], gain=up**2, impl="ref"
    )
    x = torch.nn.functional.conv2d(x, w if flip_weight else w.flip([2, 3]))
    return upfirdn2d.upfirdn2d(x, f, down=down, impl="ref") if down > 1 else x


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("padding", [0, 1, [1, 0, 2, 1]])
def test_conv2d_resample_fast_paths(k, up, down, padding):
    g = torch.Generator().manual_seed(k * 10 + up + down)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, k, k, generator=g, dtype=torch.float64)
    f = setup_filter([1, 3, 3, 1])
    for flip_weight in (True, False):
        expected = generic_conv2d_resample(x, w, f, up, down, padding, flip_weight)
        for impl in ("ref", "cpu"):
            with force_impl(impl):
                out = conv2d_resample.conv2d_resample(
                    x, w, f, up=up, down=down, padding=padding, flip_weight=flip_weight
                )
            torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)


def test_conv2d_resample_groups():
    x = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    f = setup_filter([1, 3, 3, 1])
    for up, down in ((2, 1), (1, 2)):
        out = conv2d_resample.conv2d_resample(x, w, f, up=up, down=down, padding=1, groups=2)
        halves = [
            generic_conv2d_resample(x[:, 3 * i : 3 * i + 3], w[2 * i : 2 * i + 2], f, up, down, 1)
            for i in (0, 1)
        ]
        torch.testing.assert_close(out, torch.cat(halves, 1), atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Registration and the implementation switch


def test_opcheck():
    f = setup_filter([1, 3, 3, 1])
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.p2pz.upfirdn2d.default, (x, f, 2, 2, 1, 1, 2, 1, 2, 1, False, 2.0))
    xcl = torch.randn(2, 3, 6, 5).to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.p2pz.upfirdn2d.default, (xcl, f, 1, 1, 2, 2, 1, 1, 1, 1, True, 1.0))
    b = torch.randn(3, requires_grad=True)
    for act in ("lrelu", "tanh"):
        torch.library.opcheck(torch.ops.p2pz.bias_act.default, (x, b, 1, act, 0.2, 1.4, 0.8))
        dy = torch.randn(2, 3, 6, 5, requires_grad=True)
        torch.library.opcheck(torch.ops.p2pz.bias_act_grad.default, (dy, x, b, 1, act, 0.2, 1.4, 0.8, 1))
    torch.library.opcheck(torch.ops.p2pz.bias_act.default, (xcl, None, 1, "swish", 0.0, 1.0, -1.0))


def test_export_sees_the_operators_and_force_impl_ref_removes_them():
    f = setup_filter([1, 3, 3, 1])

    class Block(torch.nn.Module):
        def forward(self, x):
            return bias_act.bias_act(upsample2d(x, f), torch.ones(3), act="lrelu")

    x = torch.randn(1, 3, 8, 8)
    graph = str(torch.export.export(Block(), (x,)).graph)
    assert "p2pz.upfirdn2d" in graph and "p2pz.bias_act" in graph
    with force_impl("ref"):
        graph = str(torch.export.export(Block(), (x,)).graph)
        ref_out = Block()(x)
    assert "p2pz" not in graph
    torch.testing.assert_close(Block()(x), ref_out, atol=1e-5, rtol=1e-5)


def test_impl_selection(monkeypatch):
    x = torch.randn(1, 2, 4, 4)
    assert _runtime.choose_impl(None, x) == "cpu"
    assert _runtime.choose_impl("ref", x) == "ref"
    with force_impl("ref"):
        assert _runtime.choose_impl("cpu", x) == "ref"
    with pytest.raises(ValueError, match="cannot run on cpu"):
        _runtime.choose_impl("cuda", x)
    monkeypatch.setenv(_runtime.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="unknown ops implementation"):
        _runtime.choose_impl(None, x)


def test_environment_sets_the_default_and_an_explicit_impl_wins(monkeypatch):
    """$P2PZ_OPS_IMPL is the process' default: an explicit impl= overrides it, and a default of one
    device kind leaves tensors on other devices to the automatic choice (no error on a GPU run)."""
    x = torch.randn(1, 2, 4, 4)
    monkeypatch.setenv(_runtime.ENV_VAR, "ref")
    assert _runtime.choose_impl(None, x) == "ref"
    assert _runtime.choose_impl("cpu", x) == "cpu"  # explicit wins
    monkeypatch.setenv(_runtime.ENV_VAR, "cpu")
    assert _runtime.choose_impl(None, x) == "cpu"
    assert _runtime.choose_impl("ref", x) == "ref"
    monkeypatch.setenv(_runtime.ENV_VAR, "cuda")  # a CUDA default on CPU tensors: automatic, no error
    assert _runtime.choose_impl(None, x) == "cpu"
    assert _runtime.choose_impl("ref", x) == "ref"
    with force_impl("ref"):
        assert _runtime.choose_impl("cpu", x) == "ref"  # force_impl still beats everything
    y = torch.randn(1, 2, 4, 4, device="meta")  # another device kind: the CPU default does not apply
    monkeypatch.setenv(_runtime.ENV_VAR, "cpu")
    assert _runtime.choose_impl(None, y) == "ref"


def fresh_runtime(monkeypatch, root) -> None:
    """The ops' runtime as a new process has it (nothing loaded, tried or announced), building in `root`."""
    monkeypatch.setattr(_runtime, "_state", {})
    monkeypatch.setattr(_runtime, "_errors", {})
    monkeypatch.setattr(_runtime, "_warned", set())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.delenv(_runtime.ENV_VAR, raising=False)


def ops_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "p2pz ops" in str(w.message)]


def test_failed_build_warns_once_with_the_compiler_error_and_falls_back(monkeypatch, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in _runtime.sources("cpu") + _runtime.HEADERS:
        (src / name).write_text("#error p2pz-test-broken-source\n")
    monkeypatch.setattr(_runtime, "SOURCE_DIR", src)
    fresh_runtime(monkeypatch, tmp_path / "ext")
    x = torch.randn(1, 1, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _runtime.choose_impl(None, x) == "ref"
        assert _runtime.choose_impl(None, x) == "ref"  # not retried, not announced again
        y = upfirdn2d.upfirdn2d(x, setup_filter([1, 1]), up=2)
        with pytest.raises(_runtime.OpsUnavailableError, match="p2pz-test-broken-source"):
            _runtime.choose_impl("cpu", x)
    assert y.shape == (1, 1, 7, 7)
    messages = ops_warnings(caught)
    assert len(messages) == 1, messages
    assert "p2pz-test-broken-source" in messages[0]


def test_an_explicit_request_that_cannot_build_is_an_error_and_only_automatic_falls_back(
    monkeypatch, tmp_path
):
    """A compiler that fails (CXX, which cpp_extension's build runs): impl='cpu' and $P2PZ_OPS_IMPL=cpu
    stop with one line naming the request and the cause; the automatic choice runs the reference, warning
    once; and no build directory is left to pass for a complete one."""
    fresh_runtime(monkeypatch, tmp_path / "ext")
    monkeypatch.setenv("CXX", "/bin/false")
    x = torch.randn(1, 1, 4, 4)
    f = setup_filter([1, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(_runtime.OpsUnavailableError) as raised:
            upfirdn2d.upfirdn2d(x, f, up=2, impl="cpu")
        monkeypatch.setenv(_runtime.ENV_VAR, "cpu")
        with pytest.raises(_runtime.OpsUnavailableError, match=f"{_runtime.ENV_VAR}=cpu asks for the CPU"):
            bias_act.bias_act(x)
        assert not ops_warnings(caught)  # an error, not a warning as well
        monkeypatch.delenv(_runtime.ENV_VAR)
        assert _runtime.active_impl("cpu") == "ref"
        y = upfirdn2d.upfirdn2d(x, f, up=2)
    message = str(raised.value)
    assert "\n" not in message and "impl='cpu' asks for the CPU kernels" in message
    assert message.split("(", 1)[1].strip(")")  # the cause, from the failed build
    assert isinstance(raised.value, UserError)  # the CLI prints it as one error: line
    torch.testing.assert_close(y, upfirdn2d.upfirdn2d(x, f, up=2, impl="ref"))
    assert len(ops_warnings(caught)) == 1, ops_warnings(caught)
    assert [p.name for p in (tmp_path / "ext").iterdir() if not p.name.endswith(".lock")] == []


def test_a_prebuilt_read_only_build_loads_without_writing_anything(tmp_path):
    """A build directory that is there (prebuilt into a read-only image, say) is loaded as it is: no
    lock, no rebuild. Checked by listing every file before and after, since root writes through chmod;
    the broken compiler would make any rebuild fail."""
    built = _runtime.build_dir("cpu")  # the module's fixture built it
    root = tmp_path / "ext"
    shutil.copytree(built, root / built.name)

    def listing() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}

    paths = [root, *root.rglob("*")]
    for path in paths:
        path.chmod(path.stat().st_mode & ~0o222)
    before = listing()
    try:
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root), "CXX": "/bin/false"}
        env.pop(_runtime.ENV_VAR, None)
        code = "from p2pz.student.ops import _runtime; print(_runtime.active_impl('cpu'))"
        command = [sys.executable, "-c", code]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert listing() == before
    finally:
        for path in paths:
            path.chmod(path.stat().st_mode | 0o200)
    assert run.returncode == 0 and run.stdout.split()[-1:] == ["cpu"], run.stdout + run.stderr
    assert "p2pz ops" not in run.stderr


def test_cuda_digest_follows_the_gpu_target_and_nvcc_not_the_cpu(monkeypatch):
    """The CUDA build is named by what nvcc compiles for (TORCH_CUDA_ARCH_LIST; unset: the visible GPUs,
    none here) and the nvcc version; GPU nodes with different CPUs share one build."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    digests = {_runtime.source_digest("cuda")}
    for arch_list in ("8.0;9.0", "9.0", "9.0+PTX"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
        digests.add(_runtime.source_digest("cuda"))
    assert len(digests) == 4
    cuda, cpu = _runtime.source_digest("cuda"), _runtime.source_digest("cpu")
    monkeypatch.setattr(_runtime, "_cpu_identity", lambda: "another CPU")
    assert _runtime.source_digest("cuda") == cuda and _runtime.source_digest("cpu") != cpu
    monkeypatch.setattr(_runtime, "_nvcc_version", lambda: "Cuda compilation tools, release 99.9")
    assert _runtime.source_digest("cuda") != cuda


def test_source_digest_follows_the_sources(monkeypatch, tmp_path):
    before = _runtime.source_digest("cpu")
    for name in _runtime.sources("cpu") + _runtime.HEADERS:
        (tmp_path / name).write_bytes((_runtime.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(_runtime, "SOURCE_DIR", tmp_path)
    assert _runtime.source_digest("cpu") == before
    for header in _runtime.HEADERS:  # the shared header and each op's own one
        (tmp_path / header).write_text(f"// {header} changed\n")
        assert _runtime.source_digest("cpu") != before
        (tmp_path / header).write_bytes((_runtime.SOURCE_DIR / header).read_bytes())


def test_each_op_has_its_own_file_set():
    """One file set per op beside its Python module; the extensions are built from exactly these."""
    for op in _runtime.OPS:
        for suffix in (".py", ".h", ".cpp", ".cu"):
            assert (_runtime.SOURCE_DIR / (op + suffix)).is_file(), op + suffix
    assert _runtime.sources("cpu") == [op + ".cpp" for op in _runtime.OPS]
    assert _runtime.sources("cuda") == [op + ".cu" for op in _runtime.OPS]
    assert (_runtime.SOURCE_DIR / "common.h").is_file()


@pytest.mark.slow
def test_torch_compile_through_the_ops():
    f = setup_filter([1, 3, 3, 1])

    def block(x, b):
        return bias_act.bias_act(upsample2d(x, f), b, act="lrelu", clamp=4.0)

    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, b)
    torch.testing.assert_close(out, block(x, b))
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gx_ref,) = torch.autograd.grad(block(x, b).sum(), x)
    torch.testing.assert_close(gx, gx_ref)
