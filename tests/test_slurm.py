"""The project's sbatch scripts, run for real on a one-node SLURM cluster on localhost.

Slow (run by .ci/run, which installs SLURM with .ci/install_slurm.sh); skipped where the SLURM and
munge binaries are absent. On the tiny teacher and the `tiny` student config:

1. slurm/generate.sbatch as an array of 3 tasks: the tasks' shards are disjoint, complete and the
   same as a single-task run's; a re-run of one task skips its finished shards;
2. slurm/train.sbatch trains to the end and leaves last.ckpt at max_steps;
3. slurm/train.sbatch sent SIGUSR1 mid-iteration (between the G and the D step, held there by
   ``RequeueProbe``): the run saves last.ckpt at the end of that iteration and requeues the job, which
   resumes at that iteration with the same G, D, EMA and optimiser states and stops at max_steps;
4. slurm/train.sbatch refuses, in one line, a PYTHON that cannot import p2pz.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from slurm_cluster import SlurmCluster
from state_asserts import assert_same

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GENERATE = REPO / "slurm" / "generate.sbatch"
TRAIN = REPO / "slurm" / "train.sbatch"
GEN_TASKS = 3
EDITS = ["cat:dog", "circle:square"]
NUM_SYNTHETIC = 3  # inputs per edit: 6 pairs in 4 shards of <= 2 (shards hold one edit), 2+1+1 per task
TRAIN_STEPS = 4
REQUEUE_STEPS = 8
PAUSE_AT = 5  # the requeue test signals between G's and D's step of iteration 5 (global_step 5 at D)


def _timed(label: str, started: float) -> None:
    print(f"[slurm timing] {label}: {time.monotonic() - started:.1f} s", file=sys.stderr)


def _sbatch_wait(
    cluster: SlurmCluster, args: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``sbatch --wait`` from the repository root: returns once the job (every array task) ended,
    with the job's exit code (the highest over an array's tasks) as the return code."""
    return subprocess.run(
        ["sbatch", "--wait", *args],
        cwd=REPO,
        env={**cluster.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run_job(
    cluster: SlurmCluster,
    args: list[str],
    logs: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> None:
    """Submit from the repository root and poll until every task ended (faster than ``sbatch
    --wait``, whose polling interval grows to 10 s); each task must have completed with exit 0."""
    job = cluster.sbatch(args, env=env, cwd=REPO)
    cluster.wait(job, timeout=timeout)
    records = cluster.job(job)
    failed = [r for r in records if r["JobState"] != "COMPLETED" or r["ExitCode"] != "0:0"]
    assert not failed, f"{failed}\n{_read_logs(logs, '*.out')}"


def _read_logs(pattern_dir: Path, glob: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(pattern_dir.glob(glob)))


def _shard_contents(folder: Path) -> dict[str, dict[str, bytes]]:
    """{shard name: {member name: bytes}} for the images of every finished shard in a folder."""
    out = {}
    for shard in sorted(folder.glob("pairs-*.tar")):
        with tarfile.open(shard) as tar:
            out[shard.name] = {
                m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")
            }
    return out


def _manifest(folder: Path, task: int, tasks: int) -> list[dict]:
    path = folder / f"manifest-{task:05d}-of-{tasks:05d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def generate_config(tmp_path_factory, tiny_model_dir) -> Path:
    return write_generate_config(tmp_path_factory.mktemp("generate"), tiny_model_dir)


def write_generate_config(folder: Path, tiny_model_dir: Path) -> Path:
    """The tiny `p2pz generate` config of the SLURM tests, written to ``folder/tiny.yaml``."""
    config = {
        "model": str(tiny_model_dir),
        "edit": EDITS,
        "synthetic": True,
        "num_synthetic": NUM_SYNTHETIC,
        "samples_per_shard": 2,
        "batch_size": 2,
        "steps": 2,
        "num_sentences": 4,  # sentences per concept for the edit directions
        "seed": 0,
        "device": "cpu",
        "out": str(folder / "default-out"),
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def generated(slurm_cluster: SlurmCluster, generate_config: Path) -> Path:
    """The array job's output folder (generate.sbatch, 3 tasks)."""
    out = generate_config.parent / "pairs"
    logs = generate_config.parent / "logs"
    logs.mkdir()
    started = time.monotonic()
    _run_job(
        slurm_cluster,
        [f"--array=0-{GEN_TASKS - 1}", f"--output={logs}/%x-%A_%a.out", str(GENERATE), str(generate_config)],
        logs,
        env={"OUT": str(out)},
    )
    _timed(f"generate.sbatch, array of {GEN_TASKS}", started)
    return out


def test_cluster_runs_jobs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The fixture itself: array tasks see their ids, and ``sbatch --wait`` returns a job's exit code."""
    started = time.monotonic()
    job = slurm_cluster.sbatch(
        [
            "--array=0-2",
            f"--output={tmp_path}/%a.out",
            "--wrap",
            "echo $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
        ]
    )
    assert slurm_cluster.wait(job, timeout=60)["JobState"] == "COMPLETED"
    assert sorted((tmp_path / f"{i}.out").read_text().strip() for i in range(3)) == ["0/3", "1/3", "2/3"]
    failed = _sbatch_wait(slurm_cluster, [f"--output={tmp_path}/fail.out", "--wrap", "exit 3"], timeout=60)
    assert failed.returncode == 3
    _timed("fixture self-check (array of 3 + failing job)", started)


def test_generate_array_is_split_of_single_run(
    generated: Path, generate_config: Path, tmp_path: Path
) -> None:
    shards_per_task = {}
    for task in range(GEN_TASKS):
        records = _manifest(generated, task, GEN_TASKS)
        assert records[-1]["event"] == "done", records
        shards_per_task[task] = {r["shard"] for r in records if r["event"] == "shard"}
    # Disjoint and complete: every shard written by exactly one task.
    all_shards = [name for names in shards_per_task.values() for name in names]
    assert len(all_shards) == len(set(all_shards)) == 4
    assert all(shards_per_task.values()), shards_per_task
    contents = _shard_contents(generated)
    assert set(contents) == set(all_shards)
    _assert_equals_a_single_task(contents, generate_config, tmp_path, "single-task p2pz generate")


def _assert_equals_a_single_task(contents: dict, generate_config: Path, tmp_path: Path, label: str) -> None:
    """Every pair once, and the union of the array's tasks (their ``contents``) equals a single-task
    run of the same config."""
    samples = [key for members in contents.values() for key in {name.split(".")[0] for name in members}]
    assert len(samples) == len(set(samples)) == len(EDITS) * NUM_SYNTHETIC, "a pair is missing or duplicated"
    started = time.monotonic()
    single = tmp_path / "single"
    subprocess.run(
        ["p2pz", "generate", "--config", str(generate_config), "--out", str(single), "--no-progress"],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        timeout=300,
    )
    _timed(f"{label} for comparison", started)
    assert _shard_contents(single) == contents


def test_generate_rerun_skips_finished_shards(
    slurm_cluster: SlurmCluster,
    generated: Path,
    generate_config: Path,
    tmp_path: Path,
) -> None:
    """Re-running task 1 alone (NUM_TASKS, --array=1) leaves its finished shards untouched."""
    before = {p.name: p.stat().st_mtime_ns for p in generated.glob("pairs-*.tar")}
    started = time.monotonic()
    _run_job(
        slurm_cluster,
        ["--array=1", f"--output={tmp_path}/%x-%A_%a.out", str(GENERATE), str(generate_config)],
        tmp_path,
        env={"OUT": str(generated), "NUM_TASKS": str(GEN_TASKS)},
    )
    _timed("generate.sbatch re-run of task 1", started)
    assert {p.name: p.stat().st_mtime_ns for p in generated.glob("pairs-*.tar")} == before
    rerun = [r for r in _manifest(generated, 1, GEN_TASKS) if r["event"] == "start"][-1]
    assert rerun["shards_finished_before"] == rerun["shards_owned"] > 0


def _global_step(checkpoint: Path) -> int:
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"])


def test_train_runs_to_last_checkpoint(
    slurm_cluster: SlurmCluster,
    generated: Path,
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    started = time.monotonic()
    _run_job(
        slurm_cluster,
        [f"--output={tmp_path}/%x-%j.out", str(TRAIN), "--trainer.max_steps", str(TRAIN_STEPS)],
        tmp_path,
        env={"CONFIG": "configs/tiny.yaml", "SHARDS": str(generated), "RUN_DIR": str(run_dir)},
    )
    _timed(f"train.sbatch, tiny, {TRAIN_STEPS} steps", started)
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == TRAIN_STEPS
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))


class RequeueProbe(pl.Callback):
    """Loaded by the training job itself (``--trainer.callbacks``, ``PYTHONPATH=tests``).

    Records, per rank, the state every start of the job trains from (``start-<restart>-rank<r>.pt``)
    and the state at the end of iteration ``pause_at`` (``end-of-iteration-rank<r>.pt``); with ``hold``,
    in that iteration it holds the first run between G's and D's step (``paused-rank<r>`` appears) until
    the requeue signal has arrived, so the signal lands mid-iteration for sure.
    """

    def __init__(self, out: str, pause_at: int, hold: bool = True) -> None:
        self.out, self.pause_at, self.hold = Path(out), pause_at, hold

    @staticmethod
    def _state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        return {
            "global_step": trainer.global_step,
            "state_dict": pl_module.state_dict(),
            "optimizer_states": [o.state_dict() for o in trainer.optimizers],
        }

    def on_train_start(self, trainer, pl_module):
        start = f"start-{os.environ.get('SLURM_RESTART_COUNT', '0')}-rank{trainer.global_rank}.pt"
        torch.save(self._state(trainer, pl_module), self.out / start)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        is_d = optimizer.param_groups[0]["params"][0] is next(pl_module.D.parameters())
        if not self.hold or not is_d or trainer.global_step != self.pause_at:
            return
        from p2pz.student.requeue import RequeueOnSignal

        [requeue] = [c for c in trainer.callbacks if isinstance(c, RequeueOnSignal)]
        rank = trainer.global_rank
        (self.out / f"paused-rank{rank}").write_text(str(trainer.global_step))
        deadline = time.monotonic() + 120
        while not requeue.signal_received and time.monotonic() < deadline:
            time.sleep(0.05)
        (self.out / f"signal-received-rank{rank}").write_text(str(requeue.signal_received))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.pause_at:
            end = self.out / f"end-of-iteration-rank{trainer.global_rank}.pt"
            torch.save(self._state(trainer, pl_module), end)


def test_train_requeue_on_sigusr1_resumes(
    slurm_cluster: SlurmCluster,
    generated: Path,
    tmp_path: Path,
) -> None:
    run_dir, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    last = run_dir / "checkpoints" / "last.ckpt"
    callbacks = [
        {"class_path": "test_slurm.RequeueProbe", "init_args": {"out": str(probe), "pause_at": PAUSE_AT}}
    ]
    started = time.monotonic()
    job = slurm_cluster.sbatch(
        [
            f"--output={tmp_path}/train.out",
            str(TRAIN),
            "--trainer.max_steps",
            str(REQUEUE_STEPS),
            "--checkpoint.every_n_train_steps",
            "2",
            "--data.num_workers",
            "1",  # a DataLoader worker, as on a cluster, must survive the signal
            "--trainer.callbacks",
            json.dumps(callbacks),
        ],
        env={
            "CONFIG": "configs/tiny.yaml",
            "SHARDS": str(generated),
            "RUN_DIR": str(run_dir),
            "PYTHONPATH": str(REPO / "tests"),  # the job imports RequeueProbe from here
        },
        cwd=REPO,
    )
    # Signal while the first run is held between G's and D's step of iteration PAUSE_AT.
    deadline = time.monotonic() + 180
    while not (probe / "paused-rank0").exists():
        state = slurm_cluster.job(job)[-1]["JobState"]
        assert state in {"PENDING", "RUNNING"} and time.monotonic() < deadline, (
            f"{state}\n{(tmp_path / 'train.out').read_text()}"
        )
        time.sleep(0.2)
    _timed("requeue test: submit to mid-iteration pause", started)
    slurm_cluster.run(["scancel", "--signal=USR1", job])

    # The run saves last.ckpt after that iteration and runs `scontrol requeue`: the job comes back
    # PENDING, held until a BeginTime ~2 minutes away. Keep the requeue checkpoint, start the job now.
    record = slurm_cluster.wait_state(job, {"PENDING"}, timeout=120)
    assert record["Restarts"] == "1", record
    _timed("requeue test: until requeued", started)
    saved = tmp_path / "requeue.ckpt"
    shutil.copy(last, saved)
    # slurmd refuses a job whose credential was revoked (by the requeue) in the same wall-clock second
    # it is launched again ("Job credential revoked": the times compare at one-second resolution);
    # SLURM's own BeginTime hold avoids that, so skipping it must wait for the second to pass.
    time.sleep(2.0)
    slurm_cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    record = slurm_cluster.wait(job, timeout=240)
    _timed(f"requeue test: whole ({REQUEUE_STEPS} steps, one requeue)", started)

    log = (tmp_path / "train.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (
        f"{record}\n{log}\n{slurm_cluster.logs()}"
    )
    assert (probe / "signal-received-rank0").read_text() == "True", log  # it landed mid-iteration
    # SLURM signals every process of the step, DataLoader workers included: one save, one requeue.
    assert log.count("SIGUSR1 received: saved") == 1 and log.count("requeued SLURM job") == 1, log
    assert f"SIGUSR1 received: saved {last} after iteration {PAUSE_AT}" in log, log
    assert "Handling auto-requeue signal" not in log, log  # Lightning's handler is off
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt")), log

    # The requeue checkpoint is the state at the end of the interrupted iteration ...
    checkpoint = torch.load(saved, map_location="cpu", weights_only=False)
    end = torch.load(probe / "end-of-iteration-rank0.pt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == end["global_step"] == PAUSE_AT
    assert_same(checkpoint["state_dict"], end["state_dict"], "state_dict")  # G, D and g_ema
    assert_same(checkpoint["optimizer_states"], end["optimizer_states"], "optimizer_states")
    # ... and the requeued job (the script's second start) trained on from exactly that state.
    assert "(restart 1)" in log and f"Restored all states from the checkpoint at {last}" in log, log
    resumed = torch.load(probe / "start-1-rank0.pt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == PAUSE_AT
    assert_same(resumed["state_dict"], end["state_dict"], "resumed state_dict")
    assert_same(resumed["optimizer_states"], end["optimizer_states"], "resumed optimizer_states")
    assert _global_step(last) == REQUEUE_STEPS


def test_train_refuses_a_python_without_p2pz(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.sbatch(
        [f"--output={tmp_path}/train.out", str(TRAIN)],
        env={"CONFIG": "configs/tiny.yaml", "PYTHON": "/bin/false"},
        cwd=REPO,
    )
    record = slurm_cluster.wait(job, timeout=60)
    log = (tmp_path / "train.out").read_text()
    assert record["ExitCode"] == "2:0", log
    assert log.strip().splitlines()[-1].startswith("error: /bin/false cannot import p2pz; set PYTHON"), log
