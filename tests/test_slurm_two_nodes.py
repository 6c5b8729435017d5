"""The project's sbatch scripts on a real two-node SLURM cluster on this machine.

Slow (run by .ci/run); skipped where SLURM is not installed or the network namespaces cannot be made
(the skip says what refused). ``two_node_cluster`` (tests/slurm_cluster.py): slurmctld and two slurmd,
``node1`` and ``node2``, each in a network namespace of its own with its own address and hostname,
joined by a bridge that exists only inside those namespaces (.ci/slurm_netns.sh). On the tiny teacher
and the `tiny` student config:

1. slurm/generate.sbatch as an array of two exclusive tasks, one on each node: the same sample set as
   a single task;
2. ``sbatch --nodes=2 --ntasks-per-node=1 slurm/train.sbatch``: DDP (gloo) across the two nodes reaches
   max_steps, the ranks' seeds differ, their weights stay identical, and rank 0 alone writes checkpoints;
3. the same job sent SIGUSR1 between G's and D's step: requeued, it resumes with G, D, EMA and
   optimiser states equal to the uninterrupted run's (2) at that step, and finishes;
4. a rank whose shards are all damaged: every rank stops within a minute, with one ``error:`` line each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from slurm_cluster import FINISHED_STATES, TwoNodeCluster
from state_asserts import assert_same
from test_slurm import (  # the one-node tests' config, probe and helpers
    _assert_equals_a_single_task,
    _manifest,
    _read_logs,
    _run_job,
    _shard_contents,
    _timed,
    write_generate_config,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GENERATE = REPO / "slurm" / "generate.sbatch"
TRAIN = REPO / "slurm" / "train.sbatch"
NODES = ("node1", "node2")
STEPS = 8
PAUSE_AT = 5  # the requeue test signals between G's and D's step of iteration 5
STOP_WITHIN_S = 60  # a rank with damaged shards: every rank has stopped this long after the job started


class RankProbe(pl.Callback):
    """Loaded by the training job (``--trainer.callbacks``, ``PYTHONPATH=tests``). Per rank and start of
    the job: where it runs and what it draws (``rank<r>-restart<n>.json``), its weights at the end
    (``final-rank<r>.pt``) and the path of every checkpoint it writes (``writes-rank<r>.txt``)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.recorded = False

    def on_train_start(self, trainer, pl_module):
        io, rank = trainer.strategy.checkpoint_io, trainer.global_rank
        save, log = io.save_checkpoint, self.out / f"writes-rank{rank}.txt"

        def recorded_save(checkpoint, path, *args, **kwargs):
            with open(log, "a") as f:
                f.write(f"{type(io).__name__} {path}\n")
            return save(checkpoint, path, *args, **kwargs)

        io.save_checkpoint = recorded_save

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.recorded:  # the first batch: the module has seeded this rank (seed_rank) by now
            return
        self.recorded = True
        import torch.distributed as dist

        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "hostname": socket.gethostname(),
            "slurm_node": os.environ.get("SLURMD_NODENAME"),
            "master_addr": os.environ.get("MASTER_ADDR"),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "seed": torch.initial_seed(),
            "keys": list(batch["__key__"]),
        }
        (self.out / f"rank{trainer.global_rank}-restart{restart}.json").write_text(json.dumps(record))

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), self.out / f"final-rank{trainer.global_rank}.pt")


def _train_job(cluster: TwoNodeCluster, generated: Path, folder: Path, hold: bool) -> tuple[str, Path, Path]:
    """Submit train.sbatch on both nodes with both probes; returns (job id, run dir, probe dir)."""
    run_dir, probe = folder / "run", folder / "probe"
    probe.mkdir(parents=True)
    callbacks = [
        {
            "class_path": "test_slurm.RequeueProbe",
            "init_args": {"out": str(probe), "pause_at": PAUSE_AT, "hold": hold},
        },
        {"class_path": "test_slurm_two_nodes.RankProbe", "init_args": {"out": str(probe)}},
    ]
    job = cluster.sbatch(
        [
            "--nodes=2",
            "--ntasks-per-node=1",
            f"--output={folder}/train.out",
            str(TRAIN),
            "--trainer.max_steps",
            str(STEPS),
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
            "PYTHONPATH": str(REPO / "tests"),  # the job imports the probes from here
            # the reference ops: what runs is the cluster's part, and a JIT build of the C++ ops (minutes
            # on 2 cores, behind a lock shared with every other process of the machine) stays out of it
            "P2PZ_OPS_IMPL": "ref",
        },
        cwd=REPO,
    )
    return job, run_dir, probe


def _wait(cluster: TwoNodeCluster, job: str, log: Path, timeout: float) -> dict[str, str]:
    """``cluster.wait``; a job still running after ``timeout`` is cancelled: the test fails with its log."""
    try:
        return cluster.wait(job, timeout=timeout)
    except TimeoutError:
        cluster.run(["scancel", job], check=False)
        pytest.fail(f"job {job} still runs after {timeout:.0f} s:\n{log.read_text() if log.exists() else ''}")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _without_w_avg(state: dict) -> dict:
    """A state dict without ``mapping.w_avg``: each rank's running mean of its own z (rank 0's is saved)."""
    return {k: v for k, v in state.items() if not k.endswith("mapping.w_avg")}


@pytest.fixture(scope="module")
def generate_config(tmp_path_factory, tiny_model_dir) -> Path:
    return write_generate_config(tmp_path_factory.mktemp("generate2"), tiny_model_dir)


@pytest.fixture(scope="module")
def generated(two_node_cluster: TwoNodeCluster, generate_config: Path) -> Path:
    """generate.sbatch as an array of 2 whole-node tasks (one per node); its output folder."""
    out, logs = generate_config.parent / "pairs", generate_config.parent / "logs"
    logs.mkdir()
    started = time.monotonic()
    _run_job(
        two_node_cluster,
        ["--array=0-1", "--exclusive", f"--output={logs}/%x-%A_%a.out", str(GENERATE), str(generate_config)],
        logs,
        env={"OUT": str(out)},
    )
    _timed("two nodes: generate.sbatch, array of 2", started)
    return out


@pytest.fixture(scope="module")
def uninterrupted(two_node_cluster: TwoNodeCluster, generated: Path, tmp_path_factory) -> Path:
    """train.sbatch on both nodes, STEPS iterations without a signal; its folder (train.out, run/, probe/)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    started = time.monotonic()
    job, _, _ = _train_job(two_node_cluster, generated, folder, hold=False)
    record = _wait(two_node_cluster, job, folder / "train.out", timeout=300)
    _timed(f"two nodes: train.sbatch, tiny, {STEPS} steps", started)
    log = (folder / "train.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", f"{record}\n{log}"
    return folder


def test_generate_array_over_both_nodes_is_one_task(
    generated: Path, generate_config: Path, tmp_path: Path
) -> None:
    logs = generate_config.parent / "logs"
    text = _read_logs(logs, "*.out")
    hosts = re.findall(r"^\[\S+\] job \S+ on (\S+) \(restart", text, flags=re.MULTILINE)
    assert sorted(hosts) == list(NODES), text  # one task on each node
    for task in range(2):
        assert _manifest(generated, task, 2)[-1]["event"] == "done"
    contents = _shard_contents(generated)
    _assert_equals_a_single_task(contents, generate_config, tmp_path, "two nodes: single-task p2pz generate")


def test_train_ddp_across_two_nodes_reaches_max_steps(uninterrupted: Path) -> None:
    probe, log = uninterrupted / "probe", (uninterrupted / "train.out").read_text()
    ranks = [json.loads((probe / f"rank{r}-restart0.json").read_text()) for r in (0, 1)]
    # one rank per node, over the namespaces' network: gloo between two hosts, not two local processes
    assert [r["hostname"] for r in ranks] == [r["slurm_node"] for r in ranks] == list(NODES), ranks
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks), ranks
    assert ranks[0]["master_addr"] == ranks[1]["master_addr"] == NODES[0], ranks
    assert ranks[0]["seed"] != ranks[1]["seed"], ranks  # per-rank noise and dropout
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"]), ranks  # and each its own pairs
    final = [_without_w_avg(_load(probe / f"final-rank{r}.pt")) for r in (0, 1)]
    assert_same(final[0], final[1], "final weights of rank 0 vs rank 1")  # DDP kept them in sync
    last = uninterrupted / "run" / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == STEPS
    # one checkpoint writer: rank 0, through the atomic writer, every 2 iterations and at the end
    writes = (probe / "writes-rank0.txt").read_text().splitlines()
    assert writes and all(line == f"AtomicCheckpointIO {last}" for line in writes), writes
    assert not (probe / "writes-rank1.txt").exists(), (probe / "writes-rank1.txt").read_text()
    assert "Traceback" not in log, log


def test_train_requeue_on_sigusr1_across_two_nodes_resumes(
    two_node_cluster: TwoNodeCluster, generated: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    cluster = two_node_cluster
    started = time.monotonic()
    job, run_dir, probe = _train_job(cluster, generated, tmp_path, hold=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    # Signal while both ranks are held between G's and D's step of iteration PAUSE_AT.
    deadline = time.monotonic() + 180
    while not all((probe / f"paused-rank{r}").exists() for r in (0, 1)):
        state = cluster.job(job)[-1]["JobState"]
        assert state in {"PENDING", "RUNNING"} and time.monotonic() < deadline, (
            f"{state}\n{(tmp_path / 'train.out').read_text()}"
        )
        time.sleep(0.2)
    _timed("two nodes, requeue: submit to mid-iteration pause", started)
    cluster.run(["scancel", "--signal=USR1", job])

    record = cluster.wait_state(job, {"PENDING"}, timeout=120)
    assert record["Restarts"] == "1", record
    saved = tmp_path / "requeue.ckpt"
    shutil.copy(last, saved)
    time.sleep(2.0)  # past the second of the revoked credential (see test_slurm's requeue test)
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    record = _wait(cluster, job, tmp_path / "train.out", timeout=300)
    _timed(f"two nodes, requeue: whole ({STEPS} steps, one requeue)", started)

    log = (tmp_path / "train.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (
        f"{record}\n{log}\n{cluster.logs()}"
    )
    assert all((probe / f"signal-received-rank{r}").read_text() == "True" for r in (0, 1)), log
    assert log.count("SIGUSR1 received: saved") == 1 and log.count("requeued SLURM job") == 1, log
    assert f"SIGUSR1 received: saved {last} after iteration {PAUSE_AT}" in log, log
    assert "(restart 1)" in log and f"Restored all states from the checkpoint at {last}" in log, log
    assert not (probe / "writes-rank1.txt").exists()  # the requeue's save too: rank 0 alone

    # The requeue checkpoint is the uninterrupted run's state at that iteration (and this run's) ...
    checkpoint = _load(saved)
    reference = _load(uninterrupted / "probe" / "end-of-iteration-rank0.pt")
    assert checkpoint["global_step"] == reference["global_step"] == PAUSE_AT
    assert_same(checkpoint["state_dict"], reference["state_dict"], "state_dict")  # G, D and g_ema
    assert_same(checkpoint["optimizer_states"], reference["optimizer_states"], "optimizer_states")
    this_run = _load(probe / "end-of-iteration-rank0.pt")
    assert_same(checkpoint["state_dict"], this_run["state_dict"], "state_dict of the signalled run")
    # ... and both ranks of the requeued job trained on from exactly that state, to the end.
    for r in (0, 1):
        resumed = _load(probe / f"start-1-rank{r}.pt")
        assert resumed["global_step"] == PAUSE_AT
        assert_same(resumed["state_dict"], reference["state_dict"], f"rank {r} resumed state_dict")
        assert_same(resumed["optimizer_states"], reference["optimizer_states"], f"rank {r} optimizer_states")
    assert _load(last)["global_step"] == STEPS


def test_a_rank_with_only_damaged_shards_stops_every_rank(
    two_node_cluster: TwoNodeCluster, generated: Path, tmp_path: Path
) -> None:
    from p2pz.data.pairs.reader import rank_share, readable_shards
    from p2pz.data.pairs.shards import DIRECTIONS_DIR
    from p2pz.student.datamodule import split_shards

    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in generated.glob("pairs-*.tar"):
        shutil.copy(shard, shards)
    shutil.copytree(generated / DIRECTIONS_DIR, shards / DIRECTIONS_DIR)  # two edits: one student of both
    train, _ = split_shards(str(shards))  # the data module's split (tiny.yaml: default val_fraction)
    damaged = rank_share(train, 1, 2)
    for url in damaged:
        Path(url).write_bytes(b"not a tar archive\n" * 64)
    readable_shards(str(shards))  # the dataset as a whole passes the check before the trainer exists
    readable_shards(rank_share(train, 0, 2))

    job = two_node_cluster.sbatch(
        [
            "--nodes=2",
            "--ntasks-per-node=1",
            f"--output={tmp_path}/train.out",
            str(TRAIN),
            "--trainer.max_steps",
            "4",
        ],
        env={"CONFIG": "configs/tiny.yaml", "SHARDS": str(shards), "RUN_DIR": str(tmp_path / "run")},
        cwd=REPO,
    )
    started = time.monotonic()
    two_node_cluster.wait_state(job, {"RUNNING", *FINISHED_STATES}, timeout=60)
    running = time.monotonic()
    record = _wait(two_node_cluster, job, tmp_path / "train.out", timeout=2 * STOP_WITHIN_S)
    stopped = time.monotonic() - running
    _timed(f"two nodes, damaged shards: every rank stopped after {stopped:.1f} s", started)
    log = (tmp_path / "train.out").read_text()
    assert stopped <= STOP_WITHIN_S, log
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", f"{record}\n{log}"
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in log, log  # one line per rank
    [own] = [line for line in errors if line.startswith("error: rank 1 of 2: no shard holds a readable")]
    assert damaged[0] in own, own
    [other] = [line for line in errors if line.startswith("error: rank 0 of 2 stops")]
    assert "training shards of rank 1" in other, other
