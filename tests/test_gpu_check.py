"""benchmarks/gpu_check.py: its no-GPU exit, its ops check at toy sizes, and (slow) every check on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402


def test_without_a_gpu_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("no CUDA device found")
    assert json.loads(lines[-1]) == {"cuda_available": False}


def test_ops_check_passes_on_the_cpu_kernels_and_catches_a_wrong_kernel(monkeypatch):
    sizes = gpu_check.Sizes(small=True)
    report = gpu_check.check_ops(torch.device("cpu"), sizes)
    assert report["pass"], report
    assert set(report["max_relative_error"]) == {
        "bias_act_lrelu",
        "bias_act_tanh",
        "upfirdn2d_up2",
        "upfirdn2d_down2",
    }
    # a kernel that is off by 1 % in its forward pass must fail the check
    from p2pz.student.ops import bias_act

    real = torch.ops.p2pz.bias_act

    class OffByOnePercent:
        def __call__(self, *args):
            return real(*args) * 1.01

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(bias_act.torch.ops.p2pz, "bias_act", OffByOnePercent())
    broken = gpu_check.check_ops(torch.device("cpu"), sizes)
    assert not broken["pass"]
    assert broken["max_relative_error"]["bias_act_tanh"]["float32"][0] > 1e-3


@pytest.mark.slow
def test_every_check_runs_at_toy_sizes_on_the_cpu(tmp_path):
    """The whole script, as a user runs it (ops, teacher, 2 training iterations, export, bench)."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    failed = {k: v for k, v in report["checks"].items() if not v["pass"]}
    assert result.returncode == 0 and report["all_passed"], failed
    assert set(report["checks"]) == {"ops", "teacher", "train", "export", "bench"}
    assert report["checks"]["train"]["r1_logged"] and report["checks"]["train"]["checkpoint_step"] == 2
    assert set(report["checks"]["bench"]["p50_ms"]) == {"eager", "pt2", "onnx"}
    assert all(v["seconds"] > 0 for v in report["checks"].values())
