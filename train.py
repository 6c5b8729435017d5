"""Train a CoModGAN student on the teacher's pair shards: ``python train.py`` is ``p2pz train``.

    python train.py fit --config configs/tiny.yaml --data.shards out/pairs --trainer.default_root_dir run
    python train.py fit --config configs/cpu.yaml --data.shards out/pairs --trainer.default_root_dir run \\
        --ckpt_path last                          # resume: same step, optimisers and EMA
    python train.py fit --config configs/tiny.yaml --print_config   # every option, with its value

The LightningCLI lives in the package, ``p2pz.cli.train`` (its docstring describes the run folder,
steps and SLURM requeueing); this script is kept for cluster jobs and muscle memory.
"""

from __future__ import annotations

import sys

from p2pz.cli.train import main, script_main, student_cli_class

__all__ = ["main", "script_main", "student_cli_class"]

if __name__ == "__main__":
    sys.exit(script_main())
