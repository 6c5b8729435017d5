"""SLURM requeue at a safe point: the signal only sets a flag; the save happens between iterations.

SLURM sends ``SIGUSR1`` (``#SBATCH --signal=SIGUSR1@90``) to every task of the job step shortly before
the time limit. Lightning's ``SLURMEnvironment`` saves a checkpoint from inside the signal handler, at
whatever point the signal lands: in an iteration of ``StudentModule`` (G step, D step, lazy R1, EMA)
that can be a checkpoint with G updated but D and EMA not, and under NCCL one rank can enter the save's
barrier while another is in the step's all-reduce (Lightning issue #21406). :class:`RequeueOnSignal`
replaces it (``p2pz train`` turns Lightning's off with ``SLURMEnvironment(auto_requeue=False)``):

1. the handler sets a flag and returns;
2. at the end of every training iteration the ranks combine their flags with one all-reduce: if any
   rank got the signal, all of them act, at the same iteration. ``StudentModule`` folds the flag into
   its own end-of-iteration checks (one all-reduce and one host sync an iteration, not one more for
   this) and hands the result over (:meth:`RequeueOnSignal.agree`); under another module
   ``on_train_batch_end`` reduces it itself (``strategy.reduce_boolean_decision``);
3. the state after that iteration is saved as ``last.ckpt`` through the checkpoint callback
   (:meth:`StepCheckpoint.save_now`, atomic: :class:`AtomicCheckpointIO`), which is what
   ``--ckpt_path last`` resumes from;
4. every rank stops training (no validation pass on the way out) and, once ``fit`` has wound down
   (loggers flushed), rank 0 runs ``scontrol requeue $SLURM_JOB_ID``
   (``$SLURM_ARRAY_JOB_ID_$SLURM_ARRAY_TASK_ID`` in an array), which ends the job and queues it again.
   The requeued job runs ``slurm/train.sbatch`` again, which resumes with ``--ckpt_path last``.

Outside SLURM the same signal saves and stops (nothing is requeued); a signal in the final iteration
just lets the run finish.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


def run_command(argv: list[str]) -> int:
    """Run ``argv`` (the requeue command), echoing its output to the job's log; returns the exit code."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"requeue: {' '.join(argv)} could not run: {err}")
        return 127
    output = (result.stdout + result.stderr).strip()
    if output:
        rank_zero_info(output)
    return result.returncode


def slurm_job_id(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The id ``scontrol requeue`` takes for this job (``ARRAYJOB_TASK`` in an array), None outside SLURM."""
    array_job = environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{array_job}_{environ['SLURM_ARRAY_TASK_ID']}"
    else:
        job = environ.get("SLURM_JOB_ID")
    if job and re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        return job
    return None


class RequeueOnSignal(pl.Callback):
    """On ``signum`` (SIGUSR1): at the end of the current iteration save ``last.ckpt``, requeue, stop.

    Args:
        signum: the signal SLURM sends before the time limit (``--signal=SIGUSR1@90``).
        run: runs the requeue command (``["scontrol", "requeue", JOB]``) and returns its exit code;
            tests pass a recorder here (the real command is what ``run_command`` does).
    """

    def __init__(
        self,
        signum: int = signal.SIGUSR1,
        run: Callable[[list[str]], int] = run_command,
    ) -> None:
        self.signum = signal.Signals(signum)
        self.run = run
        self._received = False
        self._requeue_pending = False
        self._agreed: bool | None = None  # this iteration's vote of all ranks, when the module took it
        self._previous: Any = None
        self._installed = False

    @property
    def signal_received(self) -> bool:
        """Whether the signal arrived on this rank and has not been acted on yet."""
        return self._received

    # --- the handler: a flag, nothing else (it runs at an arbitrary point of the main thread) ----------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received = True

    def agree(self, any_rank: bool) -> None:
        """Whether any rank had the signal at the end of this iteration, as the training module's own
        all-reduce found (:meth:`p2pz.student.training.StudentModule._act_on_checks`); acted on in
        ``on_train_batch_end``, which then reduces nothing itself."""
        self._agreed = any_rank

    def _install(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(self.signum, self._on_signal)
        self._installed = True

    def _uninstall(self) -> None:
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
        self._installed = False

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks; a handler is per process
        state = self.__dict__.copy()
        state.update(_previous=None, _installed=False, _received=False, _requeue_pending=False, _agreed=None)
        return state

    # --- hooks -----------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before Lightning registers its handlers: one that finds ours in place leaves SIGUSR1 alone
        if stage == "fit":
            self._received = self._requeue_pending = False
            self._agreed = None
            self._install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._uninstall()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # every rank, every iteration, the same collective: all see the signal if any got it
        agreed, self._agreed = self._agreed, None
        if agreed is None:  # the module took no vote: this callback's own all-reduce
            agreed = trainer.strategy.reduce_boolean_decision(self._received, all=False)
        if not agreed:
            return
        self._received = False
        name, step = self.signum.name, trainer.global_step
        if 0 <= trainer.max_steps <= step:
            rank_zero_info(f"{name} received in the last iteration ({step}): finishing the run, no requeue")
            return
        path = self._save(trainer)
        rank_zero_info(f"{name} received: saved {path} after iteration {step}; stopping")
        self._requeue_pending = True
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # no validation pass on the way out: the job's time is nearly up

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Requeue once training has stopped and the loggers are flushed (requeueing kills the job)."""
        if not self._requeue_pending:
            return
        self._requeue_pending = False
        job = slurm_job_id()
        if job is None:
            rank_zero_info("not a SLURM job: nothing to requeue; resume with --ckpt_path last")
            return
        if not trainer.is_global_zero:
            return
        code = self.run(["scontrol", "requeue", job])
        if code == 0:
            rank_zero_info(f"requeued SLURM job {job}; it resumes from the checkpoint above")
        else:
            rank_zero_warn(f"`scontrol requeue {job}` failed (exit {code}): resubmit the job to resume")

    def _save(self, trainer: pl.Trainer) -> str:
        """``last.ckpt`` through the run's :class:`StepCheckpoint` (one writer, the path resume looks at)."""
        from p2pz.student.callbacks import StepCheckpoint, use_atomic_checkpoint_io

        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, StepCheckpoint):
                return callback.save_now(trainer)
        use_atomic_checkpoint_io(trainer)
        path = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
        trainer.save_checkpoint(path)
        return path
