"""``p2pz bench``'s figures compare like with like: the teacher in ``p2pz generate``'s precision, the
matmul peak in the convolutions' math mode, the fused ops' real FLOPs, and what each backend runs."""

from __future__ import annotations

import json

import pytest
import torch
from narrow_student import export_narrow_student
from torch import nn

from p2pz.student import bench
from p2pz.student.ops import upfirdn2d

# --------------------------------------------------------------------------------------------------
# The teacher's precision


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_teacher_dtype_is_the_one_generate_picks(device):
    from p2pz.data.pairs.generate import _pick_device
    from p2pz.data.pairs.settings import Settings

    assert bench.teacher_dtype(device) == _pick_device(Settings(device=device))[1]
    assert bench.teacher_dtype(device) == (torch.float16 if device.startswith("cuda") else torch.float32)


def test_teacher_is_loaded_in_that_dtype_on_cuda(monkeypatch):
    """No GPU here: the load is stopped right after the teacher's precision is chosen."""
    from p2pz.teacher import Pix2PixZero

    class Loaded(Exception):
        pass

    def from_pretrained(*args, **kwargs):
        raise Loaded(kwargs.get("dtype"))

    monkeypatch.setattr(Pix2PixZero, "from_pretrained", from_pretrained)
    for device, dtype in (("cuda", torch.float16), ("cpu", torch.float32)):
        with pytest.raises(Loaded) as loaded:
            bench.teacher_latency_ms("model", 64, torch.device(device), 2, "cat", "dog")
        assert loaded.value.args[0] == dtype


# --------------------------------------------------------------------------------------------------
# The roof: the convolutions' math mode


@pytest.fixture
def restore_tf32():
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul  # the legacy API


@pytest.mark.parametrize("conv_tf32", [True, False])
def test_the_cuda_peak_is_timed_in_the_convolutions_math_mode(conv_tf32, monkeypatch, restore_tf32):
    """The matmul runs in TF32 exactly when cuDNN may run float32 convolutions in TF32; the CPU's peak
    and the matmul mode outside the timing are left alone. (No GPU: tensors and timer stand in.)"""
    torch.backends.cudnn.allow_tf32 = conv_tf32
    torch.backends.cuda.matmul.allow_tf32 = not conv_tf32
    seen = []

    class Timing:
        times = [1.0]

    def time_calls(fn, **_kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return Timing()

    monkeypatch.setattr(bench, "time_calls", time_calls)
    monkeypatch.setattr(torch, "randn", lambda *_a, **_k: torch.zeros(1))
    bench.matmul_peak_flops(torch.device("cuda"))
    assert seen == [conv_tf32] and torch.backends.cuda.matmul.allow_tf32 is (not conv_tf32)
    assert bench.peak_math_mode(torch.device("cuda")) == ("tf32" if conv_tf32 else "float32")
    bench.matmul_peak_flops(torch.device("cpu"))
    assert seen[-1] is (not conv_tf32)
    assert bench.peak_math_mode(torch.device("cpu")) == "float32"
    assert bench.peak_math_mode(torch.device("cuda"), torch.bfloat16) == "bfloat16"


def test_the_math_mode_follows_torchs_newer_precision_api(restore_tf32):
    """torch >= 2.9 refuses to mix its legacy TF32 flags with ``fp32_precision``: either one is read."""
    if not hasattr(torch.backends.cudnn, "conv") or not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 flags")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert not bench.conv_allows_tf32()
    with bench.matmul_tf32(True):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert bench.conv_allows_tf32()


# --------------------------------------------------------------------------------------------------
# FLOPs: what the fused kernels multiply


class Resample(nn.Module):
    def __init__(self, kind: str, conv: nn.Conv2d | None = None):
        super().__init__()
        self.kind, self.conv = kind, conv
        self.register_buffer("f", upfirdn2d.setup_filter([1, 3, 3, 1]))  # 4x4 taps

    def forward(self, x):
        if self.conv is not None:
            x = self.conv(x)
        if self.kind == "up":
            return upfirdn2d.upsample2d(x, self.f)
        return upfirdn2d.downsample2d(x, self.f)


def test_flops_of_fir_resampling_are_the_taps_on_real_samples():
    """Hand count, per axis (4 taps): upsampling 4 -> 8 samples, the taps that land on real samples of
    outputs 0..7 are 1, 2, 2, 2, 2, 2, 2, 1 = 14; downsampling 8 -> 4: 3, 4, 4, 3 = 14. So 14 x 14
    multiply-adds per channel, where the zero-stuffed reference counts 8 x 8 outputs x 16 taps."""
    flops, impl = bench.count_flops(Resample("up"), torch.randn(2, 3, 4, 4))
    assert impl == "cpu" and flops == 2 * (2 * 3) * 14 * 14
    flops, _ = bench.count_flops(Resample("down"), torch.randn(2, 3, 8, 8))
    assert flops == 2 * (2 * 3) * 14 * 14
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    flops, _ = bench.count_flops(Resample("up", conv), torch.randn(1, 3, 4, 4))
    assert flops == 2 * (5 * 3 * 9 * 4 * 4) + 2 * 5 * 14 * 14


# --------------------------------------------------------------------------------------------------
# bench.json: the labels


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A narrow 64 px student with random weights, exported with its .pt2 program."""
    return export_narrow_student(tmp_path_factory.mktemp("pkg"), formats=("pt2",))


def test_bench_json_says_what_each_backend_runs(package, tmp_path):
    from p2pz.cli.main import main

    out = tmp_path / "bench.json"
    argv = ["bench", str(package), "--out", str(out), "--backends", "eager,pt2", "--trust-pt2"]
    assert main([*argv, "--batches", "1", "--iters", "1", "--warmup", "0", "--teacher", "none"]) == 0
    report = json.loads(out.read_text())
    assert report["ops_impl"] == {"eager": "cpu", "pt2": "ref"}  # .pt2 is exported from the reference
    assert "reference" in report["ops_impl_note"]
    assert report["flops_counted_with"] == "cpu" and report["matmul_peak_math_mode"] == "float32"
    assert report["roofline_backend"] in ("eager", "pt2")
    fastest = report["student"][report["roofline_backend"]]["1"]["images_per_s"]
    assert report["roofline_fraction"] == pytest.approx(
        report["student_flops_per_image"] * fastest / report["matmul_peak_flops"]
    )


def test_a_pt2_program_is_labelled_by_the_operators_in_its_graph():
    """A program exported with the compiled ops calls them (``cpu``); one exported from the reference,
    as ``p2pz export`` makes it, does not (``ref``)."""
    from p2pz.student.ops import force_impl

    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        fused = torch.export.export(Resample("up"), (x,), strict=False).module()
        with force_impl("ref"):
            reference = torch.export.export(Resample("up"), (x,), strict=False).module()
    assert bench._program_ops_impl(fused, torch.device("cpu")) == "cpu"
    assert bench._program_ops_impl(reference, torch.device("cpu")) == "ref"
