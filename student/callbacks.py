"""Checkpointing for student runs: a stable ``<run>/checkpoints/last.ckpt``, written atomically.

Lightning's default ``ModelCheckpoint`` puts checkpoints under the logger's ``version_N`` folder, which
changes on every launch, so ``--ckpt_path last`` would not find the previous run's file. Here the
folder is ``<default_root_dir>/checkpoints`` unless ``dirpath`` is given, ``last.ckpt`` is always
that name (no ``last-v1``), it is also written when training ends, and every file is written to a
temporary name and renamed, so a job killed while saving never leaves a torn checkpoint behind.

``--ckpt_path last`` also considers SLURM's ``hpc_ckpt_*.ckpt`` files in ``default_root_dir`` and
picks the newest of all.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

# Lightning warns that manual-optimisation checkpoints hold the weights *after* the step; with global_step
# counting iterations that is exactly the state "after N iterations" the checkpoint is named for.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# Resuming mid-epoch: the training stream is resampled and reseeded on resume, nothing to restore.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with step-based defaults for GAN runs (steps = training iterations).

    Saves ``last.ckpt`` every ``every_n_train_steps`` and at the end; ``save_top_k=-1`` also keeps a
    ``step=NNNNNNN.ckpt`` snapshot each time (0, the default, keeps only ``last.ckpt``).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "step={step:07d}",
        every_n_train_steps: int = 1000,
        save_top_k: int = 0,
        save_last: bool | Literal["link"] = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("enable_version_counter", False)
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            every_n_train_steps=every_n_train_steps,
            save_top_k=save_top_k,
            save_last=save_last,
            **kwargs,
        )

    def _use_run_folder(self, trainer: pl.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._use_run_folder(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        self._use_run_folder(trainer)
        found = super()._find_last_checkpoints(trainer)
        hpc = glob.glob(os.path.join(trainer.default_root_dir, "hpc_ckpt_*.ckpt"))
        found |= {os.path.normpath(p) for p in hpc}
        return found

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # every rank takes part in save_checkpoint (rank 0 writes, then a barrier); rename on rank 0
        tmp = os.path.join(os.path.dirname(filepath), f".{os.path.basename(filepath)}.tmp")
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("StepCheckpoint.rename")
        self._last_checkpoint_saved = filepath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the final state, unless the last periodic save was at this very step."""
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.save_top_k != 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
