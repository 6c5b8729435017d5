"""``benchmarks/teacher.py`` on its tiny model at a size other than its default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher.py"


@pytest.mark.slow
def test_the_teacher_benchmark_edits_both_sides_at_the_size_asked(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "64", "--steps", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["image_size"] == 64 and result["latent_size"] == 16
    assert result["max_pixel_diff_vs_diffusers"] <= 2  # the same edit on both sides


def test_the_teacher_benchmark_refuses_a_size_its_vae_cannot_take(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--size", "72"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode != 0 and run.stderr.strip().count("\n") == 0 and "multiple of 16" in run.stderr
