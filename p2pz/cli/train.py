"""Train a CoModGAN student on the teacher's pair shards (a LightningCLI).

    p2pz train fit --config configs/tiny.yaml --data.shards out/pairs --trainer.default_root_dir run
    p2pz train fit --config configs/cpu.yaml --data.shards out/pairs --trainer.default_root_dir run
    p2pz train fit --config configs/cpu.yaml --data.shards out/pairs --trainer.default_root_dir run \\
        --ckpt_path last                          # resume: same step, optimisers and EMA
    p2pz train fit --config configs/tiny.yaml --print_config   # every option, with its value
    p2pz train validate --config configs/cpu.yaml --data.shards out/pairs \\
        --ckpt_path run/checkpoints/last.ckpt      # score a checkpoint

``python train.py ...`` (the repository's script) and ``python -m p2pz.cli.train ...`` are the same
command. The configs ship with the package too: ``importlib.resources.files("p2pz.configs")``.

Steps are training iterations: ``--trainer.max_steps 5000`` means 5000 generator and 5000 discriminator
updates (``global_step`` counts iterations, see ``p2pz.student.training``).

The run folder (``--trainer.default_root_dir``) receives ``checkpoints/last.ckpt`` (every
``--checkpoint.every_n_train_steps`` iterations, at the end and on SLURM's requeue signal),
``grids/step-*.png`` (input | teacher | student; ``grids/val-step-*.png``: the same held-out pairs at every
validation) and ``lightning_logs/version_N/``: TensorBoard's event file (the scalars, ``val/psnr_to_teacher``
among them, and the grids; ``tensorboard --logdir RUN/lightning_logs``, printed at the start),
``metrics.csv`` and ``config.yaml``.
Keep it the same across restarts. Every checkpoint is written atomically in its own folder
(``AtomicCheckpointIO``, installed here as a trainer plugin). On ``SIGUSR1`` (``--signal=SIGUSR1@90``)
the run saves ``last.ckpt`` at the end of the current iteration, requeues its SLURM job and stops
(``p2pz.student.requeue``; Lightning's own requeue handler is turned off); the requeued job resumes with
``--ckpt_path last``.

This module is imported whenever the ``p2pz`` parser is built, so Lightning (seconds to import) is only
imported when the command runs: :func:`student_cli_class` builds the LightningCLI subclass on first use
(``p2pz.cli.train.StudentCLI`` names it too).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import warnings
from typing import TYPE_CHECKING, Any

from p2pz.cli import add_passthrough_command, check_config_files
from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

DESCRIPTION = __doc__.split("\n\n")[0]


@functools.cache
def student_cli_class() -> type[LightningCLI]:
    """The LightningCLI of student training: the module, the data module and a ``checkpoint`` group."""
    from lightning.pytorch.cli import LightningCLI

    from p2pz.student.callbacks import RecordOpsImpl, StepCheckpoint, refuse_damaged_checkpoint
    from p2pz.student.conditioning import conditioning_from_shards
    from p2pz.student.requeue import RequeueOnSignal

    class StudentCLI(LightningCLI):
        def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
            kwargs.setdefault("formatter_class", plain_help_formatter())  # no RST markup in --help
            return super().init_parser(**kwargs)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            # always present, configured as --checkpoint.* (or `checkpoint:` in the YAML)
            parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
            parser.link_arguments("model.resolution", "data.resolution")
            # shards of several edits train one student for all of them, conditioned on each edit
            parser.link_arguments("data.shards", "model.edits", compute_fn=conditioning_from_shards)

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            super().parse_arguments(parser, args)
            # LightningCLI reads an explicit --ckpt_path's hyper-parameters next: refuse a torn file first
            subcommand = self.config.get("subcommand")
            if subcommand:
                refuse_damaged_checkpoint(self.config[subcommand].get("ckpt_path"))
                refuse_unreadable_shards(self.config[subcommand].get("data") or {})
                data = self.config[subcommand].get("data") or {}
                conditioning_from_shards(data.get("shards") if hasattr(data, "get") else None, strict=True)
            refuse_missing_gpus((self.config[subcommand] if subcommand else self.config).get("trainer") or {})

        def instantiate_trainer(self, **kwargs: Any) -> Trainer:
            """The configured trainer, plus the atomic checkpoint writer, the safe-point requeue and the
            record of the ops' implementation."""
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            trainer_config = config.get("trainer") or {}
            kwargs["plugins"] = checkpoint_plugins(kwargs.get("plugins", trainer_config.get("plugins")))
            callbacks = kwargs.get("callbacks", trainer_config.get("callbacks"))
            callbacks = (
                [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
            )
            kwargs["callbacks"] = [
                *callbacks,
                RequeueOnSignal(),
                RecordOpsImpl(),
                *progress_bar(callbacks, trainer_config),
            ]
            logger = kwargs.get("logger", trainer_config.get("logger"))
            if logger is None or logger is True:  # not configured: TensorBoard and metrics.csv
                kwargs["logger"] = default_loggers(trainer_config.get("default_root_dir"))
            trainer = super().instantiate_trainer(**kwargs)
            find_unused_parameters_in_ddp(trainer)
            return trainer

    StudentCLI.__module__, StudentCLI.__qualname__ = __name__, "StudentCLI"
    return StudentCLI


@functools.cache
def plain_help_formatter() -> type:
    """jsonargparse's help formatter with reStructuredText markup as plain text (``x`` -> 'x'): the
    options' help comes from docstrings (the project's and Lightning's)."""
    from jsonargparse import DefaultHelpFormatter

    from p2pz.cli.options import plain

    class PlainHelpFormatter(DefaultHelpFormatter):
        def _expand_help(self, action: argparse.Action) -> str:
            return plain(super()._expand_help(action))

        def _format_text(self, text: str) -> str:
            return super()._format_text(plain(text))

        def start_section(self, heading: str | None) -> None:
            super().start_section(plain(heading) if heading else heading)

    return PlainHelpFormatter


def default_loggers(root: str | None) -> list[Any]:
    """TensorBoard (scalars and the grids) and CSV (``metrics.csv``) in the same
    ``<root>/lightning_logs/version_N`` folder; CSV alone, with a note, where tensorboard is missing.
    Prints the line that opens TensorBoard on the run."""
    import os

    from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_info

    root = root or os.getcwd()
    # the CSV logger warns that the folder TensorBoard just made "exists and is not empty": they share it
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    if not _TENSORBOARD_AVAILABLE:
        rank_zero_info("note: tensorboard is not installed: metrics go to metrics.csv only")
        return [CSVLogger(root)]
    tensorboard = TensorBoardLogger(root, default_hp_metric=False)
    csv = CSVLogger(root, version=tensorboard.version)  # the same version_N folder
    show_tensorboard_line(os.path.join(root, tensorboard.name))
    return [tensorboard, csv]


def show_tensorboard_line(logdir: str) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(f"watch training: tensorboard --logdir {logdir}", flush=True)


def progress_bar(callbacks: list[Any], trainer_config: Any) -> list[Any]:
    """The iterations / max_steps bar (``IterationProgressBar``), unless the config turns progress bars off
    or names its own."""
    from lightning.pytorch.callbacks import ProgressBar

    from p2pz.student.callbacks import IterationProgressBar

    enabled = trainer_config.get("enable_progress_bar") if hasattr(trainer_config, "get") else None
    if enabled is False or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [IterationProgressBar()]


def find_unused_parameters_in_ddp(trainer: Trainer) -> None:
    """Let DDP look for unused parameters unless the strategy says otherwise.

    Each iteration runs two backward passes through the one DDP-wrapped module: G's leaves D's weights
    without gradients and D's leaves G's, which plain DDP refuses. Lightning's automatic choice (``ddp``
    wherever there are several processes: ``sbatch --nodes=2`` with ``configs/tiny.yaml``) and a bare
    ``ddp`` get the flag; a strategy that sets it (``ddp_find_unused_parameters_false``) keeps its choice.
    """
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(trainer.strategy, DDPStrategy):
        # the kwargs DDPStrategy passes to DistributedDataParallel when it wraps the model (in fit)
        trainer.strategy._ddp_kwargs.setdefault("find_unused_parameters", True)


def refuse_unreadable_shards(data: Any) -> None:
    """One line before the Trainer (and its log folder) exists when no shard holds a readable pair."""
    from p2pz.data.pairs.reader import readable_shards

    for key in ("shards", "val_shards"):
        spec = data.get(key) if hasattr(data, "get") else None
        if spec:
            readable_shards(spec)


def refuse_missing_gpus(trainer: Any) -> None:
    """One line, on every rank before any starts training, when the config trains on GPUs and none is
    visible: a SLURM job submitted without ``--gpus-per-node`` (Lightning would stop each rank with a
    traceback)."""
    import os

    accelerator = str(trainer.get("accelerator") if hasattr(trainer, "get") else "")
    if accelerator not in ("gpu", "cuda"):
        return
    from lightning.fabric.accelerators.cuda import num_cuda_devices

    if num_cuda_devices() > 0:
        return
    where = (
        f"SLURM job {os.environ['SLURM_JOB_ID']} has none: submit it with --gpus-per-node equal to "
        "--ntasks-per-node (docs/cluster.md)"
        if os.environ.get("SLURM_JOB_ID")
        else "no CUDA GPU is visible"
    )
    raise UserError(
        f"trainer.accelerator is {accelerator} but {where}; --trainer.accelerator cpu trains on CPUs"
    )


def checkpoint_plugins(plugins: Any) -> list[Any]:
    """The trainer's ``plugins`` plus what makes every checkpoint safe to resume from.

    ``AtomicCheckpointIO`` writes every checkpoint (unless the user configured a ``CheckpointIO`` of their
    own), and under SLURM ``SLURMEnvironment(auto_requeue=False)``: Lightning's requeue handler saves from
    inside the signal handler, mid-iteration; ``RequeueOnSignal`` saves between iterations instead.
    """
    from lightning.pytorch.plugins import CheckpointIO
    from lightning.pytorch.plugins.environments import ClusterEnvironment, SLURMEnvironment

    from p2pz.student.callbacks import AtomicCheckpointIO

    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    environments = [p for p in plugins if isinstance(p, ClusterEnvironment)]
    for environment in environments:
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False
    if not environments and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def __getattr__(name: str) -> Any:
    if name == "StudentCLI":  # built on first use; its class is found by this name (pickling, repr)
        return student_cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(args: list[str] | None = None, run: bool = True, prog: str | None = None) -> LightningCLI:
    """Parse ``args`` (default: ``sys.argv[1:]``) and, with ``run``, run the subcommand (``fit``, ...).

    ``run=False`` parses and instantiates the trainer, model and data module without running anything
    (``cli.trainer.fit(cli.model, datamodule=cli.datamodule)`` then trains).
    """
    from p2pz.student.datamodule import PairDataModule
    from p2pz.student.training import StudentModule

    # a missing or broken --config: one line naming it (LightningCLI prints usage and a traceback)
    check_config_files(sys.argv[1:] if args is None else args)
    parser_kwargs: dict[str, Any] = {"description": DESCRIPTION}
    if prog:
        parser_kwargs["prog"] = prog
    return student_cli_class()(
        StudentModule,
        PairDataModule,
        save_config_kwargs={"overwrite": True},  # a resumed run rewrites its config.yaml
        auto_configure_optimizers=False,  # the module sets up its own two Adam optimisers
        parser_kwargs=parser_kwargs,
        args=args,
        run=run,
    )


def script_main(args: list[str] | None = None, prog: str | None = None) -> int:
    """``python train.py`` / ``python -m p2pz.cli.train``: a UserError is one ``error:`` line, exit 2;
    the library noise is filtered as in every ``p2pz`` command."""
    from p2pz.cli.quiet import library_noise_filtered

    try:
        with library_noise_filtered():
            main(args, prog=prog)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------------
# p2pz train


def register(sub: argparse._SubParsersAction) -> None:
    help_line = "train a student on pair shards (a LightningCLI: fit, validate, ...; 'p2pz train --help')"
    add_passthrough_command(sub, "train", cmd_train, help=help_line, description=DESCRIPTION)


def cmd_train(lightning_args: list[str]) -> int:
    # LightningCLI warns when it is given args while sys.argv holds more than the program's name; here
    # sys.argv is `p2pz train ...` on purpose: DDP's launcher starts the other ranks with it.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
    # `p2pz` configured the root logger, and the `lightning` package logger has a console handler of its
    # own: without this, each of Lightning's messages (and the requeue's) would be printed twice.
    import lightning  # noqa: F401  (adds that handler)

    logging.getLogger("lightning").propagate = False
    main(lightning_args, prog="p2pz train")
    return 0


if __name__ == "__main__":
    sys.exit(script_main(prog="python -m p2pz.cli.train"))
