"""Does the student learn? The `lite` student at 64 px on the CPU, trained through `p2pz train` with
configs/cpu.yaml, on pairs whose target is a known, non-trivial transform of procedurally drawn shapes
(mirror left-right + colour channels rotated), must end with validation L1 and LPIPS to the targets
well below those of copying the input.

LPIPS here runs on a random alexnet backbone (no ImageNet weights offline): a fixed random feature
distance, reported next to L1, not a perceptual score. The curve is printed (run with ``-s``) and
written to ``<run>/learning_curve.json``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
from test_training import REPO, write_pair_shards

CPU = str(REPO / "configs" / "cpu.yaml")
STEPS = 600


def read_curve(run: Path) -> list[dict]:
    """Validation rows of metrics.csv: step and the val/* columns."""
    rows = []
    with next(run.glob("lightning_logs/version_*/metrics.csv")).open() as handle:
        for row in csv.DictReader(handle):
            if row.get("val/l1"):
                rows.append(
                    {
                        "step": int(row["step"]),
                        **{k: float(v) for k, v in row.items() if k.startswith("val/") and v},
                    }
                )
    return rows


@pytest.mark.slow
def test_lite_student_learns_mirror_and_colour_swap(tmp_path):
    from p2pz.cli import train

    shards = write_pair_shards(tmp_path / "pairs", shards=8, per_shard=64, size=64, seed=3)
    run = tmp_path / "run"
    args = [
        "--config",
        CPU,
        "--data.shards",
        str(shards),
        "--data.val_fraction",
        "0.125",
        "--data.augment",
        "false",  # crops do not commute with the mirror
        "--data.val_samples",
        "64",
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.val_check_interval",
        "100",
        "--model.lpips_random_backbone",
        "true",
        "--trainer.default_root_dir",
        str(run),
        "--trainer.enable_progress_bar",
        "false",
    ]
    start = time.monotonic()
    cli = train.main(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.monotonic() - start

    curve = read_curve(run)
    (run / "learning_curve.json").write_text(json.dumps({"seconds": seconds, "curve": curve}, indent=1))
    print(f"\n{STEPS} iterations in {seconds:.0f} s")
    for row in curve:
        print(
            "step {step:4d}  L1 {val/l1:.4f} (copy {val/l1_copy:.4f})  "
            "LPIPS {val/lpips:.4f} (copy {val/lpips_copy:.4f})".format(**row)
        )

    assert cli.trainer.global_step == STEPS and len(curve) == STEPS // 100
    final = curve[-1]
    assert final["val/l1"] < 0.6 * final["val/l1_copy"]
    assert final["val/lpips"] < 0.6 * final["val/lpips_copy"]
    assert final["val/l1"] < curve[0]["val/l1"] and math.isfinite(final["val/lpips"])
