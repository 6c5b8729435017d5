"""Checkpoints survive kills: atomic writes, resume past a torn file, SLURM requeue at a safe point.

CPU only, tiny students (``configs/tiny.yaml``) on procedural pair shards (``test_training``). The real
SLURM requeue (``scontrol``, a real job) is ``test_slurm.py::test_train_requeue_on_sigusr1_resumes``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from state_asserts import assert_same
from test_training import TINY, fit, load_ckpt, write_pair_shards

from p2pz.student.callbacks import AtomicCheckpointIO, StepCheckpoint, checkpoint_file_problem
from p2pz.student.requeue import RequeueOnSignal
from p2pz.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
NO_VAL = ["--trainer.limit_val_batches", "0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_pair_shards(tmp_path_factory.mktemp("pairs"), shards=4, per_shard=8)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _is_d(pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> bool:
    return optimizer.param_groups[0]["params"][0] is next(pl_module.D.parameters())


class SignalBetweenGAndD(pl.Callback):
    """Sends SIGUSR1 to its own process inside ``training_step``, after G's step and before D's.

    ``on_before_optimizer_step`` runs for D's (uncounted) step too, once G's step has advanced
    ``global_step``: at D's step of iteration ``k`` (0-based) it reads ``k + 1``.
    """

    def __init__(self, at_step: int, rank: int = 0) -> None:
        self.at_step, self.rank = at_step, rank
        self.at_signal: dict[str, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if (
            trainer.global_rank == self.rank
            and _is_d(pl_module, optimizer)
            and trainer.global_step == self.at_step
        ):
            os.kill(os.getpid(), signal.SIGUSR1)
            self.at_signal = {name: _snapshot(getattr(pl_module, name)) for name in ("G", "D", "g_ema")}


def _requeue_callback(trainer: pl.Trainer) -> RequeueOnSignal:
    [callback] = [c for c in trainer.callbacks if isinstance(c, RequeueOnSignal)]
    return callback


# --------------------------------------------------------------------------------------------------
# The writer


def test_atomic_checkpoint_io_writes_beside_the_target_with_the_umask_mode(tmp_path, monkeypatch):
    target = tmp_path / "run" / "hpc_ckpt_1.ckpt"  # the folder does not exist yet
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: replaced.append((src, dst)) or real_replace(src, dst))
    old_umask = os.umask(0o027)
    try:
        AtomicCheckpointIO().save_checkpoint({"w": torch.arange(5.0), "global_step": 7}, target)
    finally:
        os.umask(old_umask)
    [(src, dst)] = replaced
    assert Path(src).parent == Path(dst).parent == target.parent  # staged in the same folder
    assert oct(target.stat().st_mode & 0o777) == oct(0o640)  # open()'s mode under the umask, not 0600
    assert checkpoint_file_problem(target) is None
    assert AtomicCheckpointIO().load_checkpoint(target)["global_step"] == 7

    # a write that fails half-way leaves the previous file and no temporary one
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 8}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert AtomicCheckpointIO().load_checkpoint(target)["global_step"] == 7
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_p2pz_train_writes_through_the_atomic_writer_and_turns_off_lightnings_requeue(monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from p2pz.cli import train

    cli = train.main(["--config", TINY, "--data.shards", "unused"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert len([c for c in cli.trainer.callbacks if isinstance(c, RequeueOnSignal)]) == 1

    # under srun: SLURMEnvironment with Lightning's handler off
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "p2pz-train", "SLURM_JOB_ID": "5"}.items():
        monkeypatch.setenv(key, value)
    plugins = train.checkpoint_plugins(None)
    [environment] = [p for p in plugins if isinstance(p, SLURMEnvironment)]
    assert environment.auto_requeue is False
    mine = SLURMEnvironment(auto_requeue=True)
    assert train.checkpoint_plugins([mine])[0] is mine and mine.auto_requeue is False


# --------------------------------------------------------------------------------------------------
# Requeue at a safe point


def test_sigusr1_between_g_and_d_saves_the_end_of_iteration_state(shards, tmp_path, monkeypatch):
    """The signal lands mid-iteration; the checkpoint is the state after the whole iteration."""
    common = [*NO_VAL, "--checkpoint.every_n_train_steps", "2"]
    clean = fit(shards, tmp_path / "clean", "--trainer.max_steps", "3", *common)  # stops at 3 by itself
    assert clean.trainer.global_step == 3

    from p2pz.cli import train

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    handler_before = signal.getsignal(signal.SIGUSR1)
    cli = train.main(
        [
            "--config",
            TINY,
            "--data.shards",
            str(shards),
            "--trainer.default_root_dir",
            str(tmp_path / "signalled"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.max_steps",
            "8",
            *common,
        ],
        run=False,
    )
    commands: list[list[str]] = []
    _requeue_callback(cli.trainer).run = lambda argv: commands.append(argv) or 0  # instead of scontrol
    sender = SignalBetweenGAndD(at_step=3)  # D's step of the third iteration
    cli.trainer.callbacks.append(sender)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert sender.at_signal, "the signal was never sent"
    assert cli.trainer.global_step == 3  # stopped at the end of that iteration
    assert commands == [["scontrol", "requeue", "4242"]]
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # the handler is put back
    saved = load_ckpt(tmp_path / "signalled" / "checkpoints" / "last.ckpt")
    expected = load_ckpt(tmp_path / "clean" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == expected["global_step"] == 3
    assert_same(saved["state_dict"], expected["state_dict"], "state_dict")  # G, D and g_ema
    assert_same(saved["optimizer_states"], expected["optimizer_states"], "optimizer_states")
    # a save inside the handler would have held D and g_ema as they were when the signal came
    for name in ("D", "g_ema"):
        at_signal = sender.at_signal[name]
        assert any(not torch.equal(v, saved["state_dict"][f"{name}.{k}"]) for k, v in at_signal.items()), name

    # resuming continues from there
    seen = {}

    class Inspect(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["state"] = _snapshot(pl_module)

    resumed = fit(
        shards,
        tmp_path / "signalled",
        "--trainer.max_steps",
        "4",
        *common,
        ckpt_path="last",
        callbacks=[Inspect()],
    )
    assert seen["step"] == 3 and resumed.trainer.global_step == 4
    assert_same(seen["state"], saved["state_dict"], "restored")


def _record_requeue(argv: list[str]) -> int:
    """The requeue command, recorded to a file (runs in a ddp_spawn rank: must be picklable)."""
    with open(os.environ["P2PZ_TEST_REQUEUE_LOG"], "a") as log:
        log.write(json.dumps(argv) + "\n")
    return 0


class RecordStop(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        Path(self.out_dir, f"stopped-{trainer.global_rank}.json").write_text(json.dumps(trainer.global_step))


def test_ranks_agree_on_a_signal_only_one_of_them_got(shards, tmp_path, monkeypatch):
    """DDP: rank 1 alone gets SIGUSR1 mid-iteration; both ranks stop after it, rank 0 requeues once."""
    import yaml

    from p2pz.student.datamodule import PairDataModule
    from p2pz.student.training import StudentModule

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("P2PZ_TEST_REQUEUE_LOG", str(tmp_path / "requeue.jsonl"))
    config = yaml.safe_load(Path(TINY).read_text())
    model = StudentModule(**config["model"])
    data = PairDataModule(shards=str(shards), resolution=64, batch_size=2, epoch_length=8, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn_find_unused_parameters_true",
        max_steps=6,
        default_root_dir=str(tmp_path / "run"),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            StepCheckpoint(every_n_train_steps=100),
            RequeueOnSignal(run=_record_requeue),
            SignalBetweenGAndD(at_step=2, rank=1),
            RecordStop(str(tmp_path)),
        ],
    )
    trainer.fit(model, datamodule=data)
    stopped = [json.loads((tmp_path / f"stopped-{rank}.json").read_text()) for rank in (0, 1)]
    assert stopped == [2, 2]
    assert load_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2
    lines = (tmp_path / "requeue.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [["scontrol", "requeue", "77"]]


def test_a_signal_in_the_last_iteration_finishes_the_run_without_requeue(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    commands: list[list[str]] = []

    class Recorder(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            _requeue_callback(trainer).run = lambda argv: commands.append(argv) or 0

    cli = fit(
        shards,
        tmp_path / "run",
        "--trainer.max_steps",
        "2",
        *NO_VAL,
        callbacks=[Recorder(), SignalBetweenGAndD(2)],
    )
    assert cli.trainer.global_step == 2 and commands == []
    assert load_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2


# --------------------------------------------------------------------------------------------------
# Kills during a write, torn files


KILLED_WRITER = textwrap.dedent(
    """
    import io, os, sys, time
    import torch

    real_save = torch.save

    def stalled_save(obj, f, *args, **kwargs):
        # the checkpoint of step KILL_AT: write half of its bytes, then stall until killed
        if isinstance(obj, dict) and obj.get("global_step") == int(os.environ["KILL_AT"]):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            with open(os.environ["MARKER"], "w") as marker:
                marker.write(os.path.abspath(f.name))
            time.sleep(600)
        return real_save(obj, f, *args, **kwargs)

    torch.save = stalled_save
    from p2pz.cli.train import script_main

    sys.exit(script_main(sys.argv[1:]))
    """
)


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_good_one(shards, tmp_path):
    run, marker, tmpdir = tmp_path / "run", tmp_path / "writing", tmp_path / "system-tmp"
    tmpdir.mkdir()
    common = ["--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "2", *NO_VAL]
    args = ["fit", "--config", TINY, "--data.shards", str(shards), "--trainer.default_root_dir", str(run)]
    args += ["--trainer.enable_progress_bar", "false", *common]
    env = dict(os.environ, KILL_AT="4", MARKER=str(marker), TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() or not marker.read_text():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the step-4 save never started"
            time.sleep(0.1)
        partial = Path(marker.read_text())
        assert partial.exists()
    finally:
        child.kill()  # SIGKILL, in the middle of writing the step-4 checkpoint
        child.wait(timeout=60)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    last = run / "checkpoints" / "last.ckpt"
    assert partial.parent == last.parent and partial.name != last.name  # the torn bytes are beside it
    assert checkpoint_file_problem(partial) is not None
    assert checkpoint_file_problem(last) is None and load_ckpt(last)["global_step"] == 2
    assert not [p.name for p in tmpdir.rglob("*") if p.is_file()]  # nothing staged in the system temp dir

    seen = {}

    class Inspect(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step

    cli = fit(shards, run, *common, ckpt_path="last", callbacks=[Inspect()])
    assert seen["step"] == 2 and cli.trainer.global_step == 6
    assert load_ckpt(last)["global_step"] == 6
    assert not partial.exists()  # the unfinished write was cleaned up
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def test_resume_skips_a_truncated_checkpoint_and_refuses_when_none_is_complete(shards, tmp_path):
    run = tmp_path / "run"
    common = ["--checkpoint.every_n_train_steps", "2", *NO_VAL]
    fit(shards, run, "--trainer.max_steps", "2", *common)
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    # what Lightning's own requeue left when the copy from the node's temp dir was killed: newer, cut short
    torn = run / "hpc_ckpt_1.ckpt"
    torn.write_bytes(data[: len(data) // 2])
    assert "truncated" in checkpoint_file_problem(torn)

    with pytest.raises(UserError, match=r"cannot resume from .*hpc_ckpt_1\.ckpt: it is truncated"):
        fit(shards, run, "--trainer.max_steps", "4", *common, ckpt_path=str(torn))

    seen = {}

    class Inspect(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step

    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint.*hpc_ckpt_1\.ckpt"):
        fit(shards, run, "--trainer.max_steps", "4", *common, ckpt_path="last", callbacks=[Inspect()])
    assert seen["step"] == 2

    last.write_bytes(data[:1000])
    with pytest.raises(UserError, match="no complete checkpoint to resume from"):
        fit(shards, run, "--trainer.max_steps", "6", *common, ckpt_path="last")


def test_a_truncated_checkpoint_is_one_error_line_from_the_command(shards, tmp_path):
    torn = tmp_path / "torn.ckpt"
    buffer = io.BytesIO()
    torch.save({"global_step": 1, "state_dict": {}}, buffer)
    torn.write_bytes(buffer.getvalue()[:-30])
    result = subprocess.run(
        [sys.executable, "-m", "p2pz", "train", "fit", "--config", TINY, "--data.shards", str(shards)]
        + ["--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", str(torn)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: cannot resume from {torn}: it is truncated"), last_line
    assert "Traceback" not in result.stderr


def test_checkpoint_file_problem_names_empty_and_foreign_files(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert checkpoint_file_problem(empty) == "the file is empty"
    assert "cannot be read" in checkpoint_file_problem(tmp_path / "missing.ckpt")
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    assert "without data.pkl" in checkpoint_file_problem(tmp_path / "other.zip")
