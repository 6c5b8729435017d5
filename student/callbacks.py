"""Checkpointing for student runs: one atomic writer, a stable ``<run>/checkpoints/last.ckpt``.

:class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` plugin through which every checkpoint of a
run is written (``last.ckpt``, ``step=*.ckpt``, anything ``trainer.save_checkpoint`` writes): the bytes
go to a temporary file in the checkpoint's own folder (:func:`p2pz.utils.atomic.atomic_path`), are
fsynced and renamed over the final name, so a process killed at any moment leaves either the previous
checkpoint or the new one, never a torn file under a name a resume would pick. Lightning's own writer
stages the bytes in the system temp dir and moves them on commit; with a node-local temp dir and a
shared run folder that move is a copy, which a kill truncates under the final name. ``p2pz train``
installs the plugin; :class:`StepCheckpoint` installs it too when it finds Lightning's default writer.

:class:`StepCheckpoint`: Lightning's default ``ModelCheckpoint`` puts checkpoints under the logger's
``version_N`` folder, which changes on every launch, so ``--ckpt_path last`` would not find the previous
run's file. Here the folder is ``<default_root_dir>/checkpoints`` unless ``dirpath`` is given,
``last.ckpt`` is always that name (no ``last-v1``) and it is also written when training ends and when
a SLURM job is requeued (:mod:`p2pz.student.requeue`).

``--ckpt_path last`` picks the newest of ``last.ckpt`` and any ``hpc_ckpt_*.ckpt`` in
``default_root_dir`` (written by Lightning's own SLURM requeue, before this project replaced it) that is
a complete file: a truncated one is skipped with a warning, and if every candidate is damaged the run
stops with a one-line error instead of silently starting from scratch.

:class:`RecordOpsImpl` logs and records which implementation the student's ops run (``ops_impl``), and
:class:`IterationProgressBar` shows iterations against ``max_steps``.
"""

from __future__ import annotations

import glob
import os
import warnings
import zipfile
from typing import Any, Literal

import fsspec.utils
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from p2pz.utils.atomic import atomic_path
from p2pz.utils.errors import UserError

# Lightning warns that manual-optimisation checkpoints hold the weights *after* the step; with global_step
# counting iterations that is exactly the state "after N iterations" the checkpoint is named for.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# Resuming mid-epoch: the training stream is resampled and reseeded on resume, nothing to restore.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


# --------------------------------------------------------------------------------------------------
# Writing and checking checkpoint files


def checkpoint_file_problem(path: str | os.PathLike) -> str | None:
    """Why the file at ``path`` cannot be a complete ``torch.save`` checkpoint, or None if it can.

    Cheap (reads the zip directory at the end of the file, not the tensors): torch writes a zip archive
    whose directory comes last, so a file cut short anywhere has none. Catches what a kill during a
    non-atomic write or a copy leaves behind; it does not re-check the bytes of every tensor.
    """
    try:
        size = os.path.getsize(path)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if size == 0:
        return "the file is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except zipfile.BadZipFile:
        return f"it is truncated or not a checkpoint ({size} bytes, no complete zip directory at the end)"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not any(e.filename == "data.pkl" or e.filename.endswith("/data.pkl") for e in entries):
        return "it is a zip archive without data.pkl, not a torch checkpoint"
    if any(e.header_offset + e.compress_size > size for e in entries):
        return f"it is truncated ({size} bytes, shorter than its zip directory says)"
    return None


def _is_local(path: str | os.PathLike) -> bool:
    return fsspec.utils.get_protocol(str(path)) == "file"


def refuse_damaged_checkpoint(path: Any) -> None:
    """A :class:`UserError` saying what to do if ``path`` is a local file but not a complete checkpoint."""
    if not path or not _is_local(path) or not os.path.isfile(path):
        return
    problem = checkpoint_file_problem(path)
    if problem:
        raise UserError(
            f"cannot resume from {path}: {problem}. It was probably cut short by a kill while being "
            "written or copied; move it out of the run folder and resume with --ckpt_path last (the "
            "newest complete checkpoint) or --ckpt_path FILE"
        )


def _fsync_directory(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (where the file system lets a directory be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: temporary file beside the target, fsync, rename.

    The file gets the mode ``open()`` gives under the user's umask (not ``mkstemp``'s 0600) and nothing is
    staged in the system temp dir, so a 1.6 GB checkpoint needs no space there. Remote URLs
    (``s3://`` ...) go through Lightning's writer, whose object-store uploads are atomic already.
    Loading refuses a truncated file with a :class:`UserError` that says which and what to do.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = os.fspath(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        _fsync_directory(os.path.dirname(os.path.abspath(path)))

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        refuse_damaged_checkpoint(path)
        return super().load_checkpoint(path, *args, **kwargs)


def use_atomic_checkpoint_io(trainer: pl.Trainer) -> None:
    """Make the trainer write through :class:`AtomicCheckpointIO` if it has Lightning's default writer."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, AtomicCheckpointIO):
        return
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return
    rank_zero_warn(
        f"checkpoints are written by {type(current).__name__}, not AtomicCheckpointIO: a job killed while "
        "saving may leave a torn checkpoint behind"
    )


# --------------------------------------------------------------------------------------------------
# The checkpoint callback


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with step-based defaults for GAN runs (steps = training iterations).

    Saves ``last.ckpt`` every ``every_n_train_steps`` and at the end; ``save_top_k=-1`` also keeps a
    ``step=NNNNNNN.ckpt`` snapshot each time (0, the default, keeps only ``last.ckpt``). Writes through
    :class:`AtomicCheckpointIO`.
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
        use_atomic_checkpoint_io(trainer)
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            self._remove_unfinished_writes()

    def _remove_unfinished_writes(self) -> None:
        """Delete the temporary files of checkpoint writes a kill interrupted (each as big as a checkpoint).

        Only when fitting: a ``validate`` run on the same folder must not touch a save in progress.
        """
        if not self.dirpath or not _is_local(self.dirpath):
            return
        removed = []
        for tmp in glob.glob(os.path.join(glob.escape(self.dirpath), ".*.ckpt.*tmp")):
            try:
                os.remove(tmp)
                removed.append(os.path.basename(tmp))
            except OSError:
                pass
        if removed:
            rank_zero_info(
                f"Removed unfinished checkpoint writes of an earlier run: {', '.join(sorted(removed))}"
            )

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """``--ckpt_path last``'s candidates: ``last.ckpt`` and ``hpc_ckpt_*.ckpt``, complete files only."""
        self._use_run_folder(trainer)
        found = super()._find_last_checkpoints(trainer)
        hpc = glob.glob(os.path.join(glob.escape(str(trainer.default_root_dir)), "hpc_ckpt_*.ckpt"))
        found |= {os.path.normpath(p) for p in hpc}
        complete, damaged = set(), []
        for path in sorted(found):
            problem = checkpoint_file_problem(path) if _is_local(path) and os.path.isfile(path) else None
            if problem:
                damaged.append(f"{path} ({problem})")
            else:
                complete.add(path)
        if damaged and complete:
            rank_zero_warn(f"--ckpt_path last: skipping damaged checkpoint(s): {'; '.join(damaged)}")
        elif damaged:
            raise UserError(
                f"--ckpt_path last: no complete checkpoint to resume from, only damaged ones: "
                f"{'; '.join(damaged)}. Move them out of the run folder to start from scratch, or pass "
                "--ckpt_path FILE"
            )
        return complete

    def save_now(self, trainer: pl.Trainer) -> str:
        """Write ``last.ckpt`` now, whatever ``save_last`` says, with the bookkeeping of a periodic save.

        The SLURM requeue's save (:class:`p2pz.student.requeue.RequeueOnSignal`): the file
        ``--ckpt_path last`` resumes from. The periodic save of this step, when due, is made too (it would
        be skipped afterwards as already done at this step). Returns the path.
        """
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            return self.last_model_path
        candidates = self._monitor_candidates(trainer)
        every = self._every_n_train_steps
        if self.save_top_k != 0 and every > 0 and trainer.global_step % every == 0:
            self._save_topk_checkpoint(trainer, candidates)
        self.last_model_path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
        self._save_checkpoint(trainer, self.last_model_path)
        return self.last_model_path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the final state, unless the last periodic save was at this very step."""
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.save_top_k != 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


# --------------------------------------------------------------------------------------------------
# Progress


class IterationProgressBar(pl.callbacks.ProgressBar):
    """One tqdm bar over the whole run: iterations done of ``max_steps``, their rate, the time left, the
    latest losses and the last validation's L1 (next to copying the input's).

    Lightning's own bars count batches per epoch; here an epoch is an arbitrary slice of an endless pair
    stream (``--data.epoch_length``), and what a user waits for is ``max_steps``. Validation runs under
    the same bar (its postfix says so). Only rank 0 draws; a resumed run starts the bar where it was.
    """

    POSTFIX = {"l1": "l1", "d": "d"}  # progress-bar metrics of the module, in the order shown

    def __init__(self, refresh_seconds: float = 1.0) -> None:
        super().__init__()
        self.refresh_seconds = refresh_seconds
        self._enabled = True
        self._bar: Any = None
        self._val: str | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        from tqdm import tqdm

        tqdm.write(" ".join(map(str, args)), **{k: v for k, v in kwargs.items() if k in ("file", "end")})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        from tqdm import tqdm

        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._bar = tqdm(
            total=total,
            initial=trainer.global_step,
            desc="training",
            unit="it",
            dynamic_ncols=True,
            mininterval=self.refresh_seconds,
            smoothing=0.05,
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._bar is None:
            return
        metrics = trainer.progress_bar_metrics
        shown = {label: f"{float(metrics[key]):.3f}" for key, label in self.POSTFIX.items() if key in metrics}
        if self._val:
            shown["val"] = self._val
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(trainer.global_step - self._bar.n)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None and not trainer.sanity_checking:
            self._bar.set_postfix_str("validating", refresh=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if "val/l1" in metrics and "val/l1_copy" in metrics:
            self._val = f"l1 {float(metrics['val/l1']):.3f} (copy {float(metrics['val/l1_copy']):.3f})"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()  # also after an exception

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RecordOpsImpl(pl.Callback):
    """Which implementation the student's ops run on this trainer's device (``p2pz.student.ops``): the
    compiled kernels or the pure-PyTorch reference. Logged once on rank 0 and recorded with the run as
    ``ops_impl`` in the loggers' hyper-parameters (``lightning_logs/version_N/hparams.yaml``).

    Resolved in ``setup``, before any step: an explicit ``$P2PZ_OPS_IMPL`` whose kernels cannot be built
    stops the run there, on every rank, with one line.
    """

    KEY = "ops_impl"
    MEANING = {
        "ref": "the pure-PyTorch reference",
        "cpu": "the compiled C++ kernels",
        "cuda": "the compiled CUDA kernels",
    }

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from p2pz.student.ops import _runtime

        impl = _runtime.active_impl(trainer.strategy.root_device)
        rank_zero_info(f"student ops: {impl} ({self.MEANING[impl]})")
        for logger in trainer.loggers:
            logger.log_hyperparams({self.KEY: impl})
