"""Train a CoModGAN student on the teacher's pair shards (a LightningCLI).

    python train.py fit --config configs/tiny.yaml --data.shards out/pairs --trainer.default_root_dir run
    python train.py fit --config configs/cpu.yaml --data.shards out/pairs --trainer.default_root_dir run
    python train.py fit --config configs/cpu.yaml --data.shards out/pairs --trainer.default_root_dir run \\
        --ckpt_path last                          # resume: same step, optimisers and EMA
    python train.py fit --config configs/tiny.yaml --print_config   # every option, with its value

Steps are training iterations: ``--trainer.max_steps 5000`` means 5000 generator and 5000 discriminator
updates (``global_step`` counts iterations, see ``student/training.py``).

The run folder (``--trainer.default_root_dir``) receives ``checkpoints/last.ckpt`` (every
``--checkpoint.every_n_train_steps`` iterations and at the end), ``grids/step-*.png`` (input | teacher |
student), ``lightning_logs/version_N/{metrics.csv,config.yaml}`` and, under SLURM, ``hpc_ckpt_*.ckpt``.
Keep it the same across restarts. Under ``srun`` Lightning detects SLURM and requeues the job on
``--signal=SIGUSR1@90``; the requeued job resumes from the ``hpc_ckpt`` on its own.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI
from p2pz.student.callbacks import StepCheckpoint
from p2pz.student.datamodule import PairDataModule
from p2pz.student.training import StudentModule

from p2pz.utils.errors import UserError


class StudentCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # always present, configured as --checkpoint.* (or `checkpoint:` in the YAML)
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.link_arguments("model.resolution", "data.resolution")


def main(args: list[str] | None = None, run: bool = True) -> StudentCLI:
    return StudentCLI(
        StudentModule,
        PairDataModule,
        save_config_kwargs={"overwrite": True},  # a resumed run rewrites its config.yaml
        auto_configure_optimizers=False,  # the module sets up its own two Adam optimisers
        parser_kwargs={"description": __doc__.split("\n\n")[0]},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
