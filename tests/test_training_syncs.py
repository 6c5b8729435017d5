"""Host syncs per training iteration: the non-finite checks and the requeue vote share one all-reduce.

On a GPU every ``.item()``, ``bool(tensor)`` or ``.tolist()`` waits for the device's queue to drain;
the training step reads the device once per iteration, at its end. Counted on the CPU with a
``TorchFunctionMode``, which sees every tensor-to-Python conversion made while it is active.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_training import fit, write_pair_shards
from torch.overrides import TorchFunctionMode

# tensor -> Python conversions: on a GPU each one waits for the device
SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


class CountSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class SyncsPerIteration(pl.Callback):
    """Counts conversions, and the strategy's reductions across ranks (on one device they reduce
    nothing, and may convert nothing, but each is an all-reduce under DDP), from the start of each
    training batch to the end of the callbacks' hooks (this callback runs after the run's own,
    ``RequeueOnSignal`` included)."""

    def __init__(self) -> None:
        self.per_iteration: list[list[str]] = []
        self._mode: CountSyncs | None = None

    def setup(self, trainer, pl_module, stage):
        strategy = trainer.strategy
        for name in ("reduce", "reduce_boolean_decision"):
            method = getattr(strategy, name)

            def counted(*args, _method=method, _name=name, **kwargs):
                if self._mode is not None:
                    self._mode.calls.append(f"strategy.{_name}")
                return _method(*args, **kwargs)

            setattr(strategy, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mode = CountSyncs()
        self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mode.__exit__(None, None, None)
        self.per_iteration.append(self._mode.calls)
        self._mode = None


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_pair_shards(tmp_path_factory.mktemp("pairs"), shards=4, per_shard=8)


def test_one_host_sync_per_iteration(shards, tmp_path):
    """Losses, gradients (both optimisers) and the requeue flag: one read of the device and at most one
    reduction per iteration, with R1 (iteration 0) and without (iteration 1; ``r1_interval`` 4)."""
    counter = SyncsPerIteration()
    fit(
        shards,
        tmp_path / "run",
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.logger",
        "false",
        "--model.grid_every_n_steps",
        "0",
        callbacks=[counter],
    )
    assert len(counter.per_iteration) == 2
    for step, calls in enumerate(counter.per_iteration):
        assert len(calls) <= 1, f"iteration {step}: {calls}"


def _read_on_two_ranks(rank: int, init: str, out: str) -> None:
    import json

    from p2pz.student.training import IterationChecks

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        checks = IterationChecks(torch.device("cpu"))
        checks.losses("generator", {"l1": torch.tensor(float("nan") if rank == 1 else 0.5)})
        checks.add("signal", rank == 0)
        here, anywhere = checks.read()
        Path(out, f"rank-{rank}.json").write_text(json.dumps([here, anywhere]))
    finally:
        torch.distributed.destroy_process_group()


def test_iteration_checks_reach_every_rank_in_one_read(tmp_path):
    """Two gloo ranks: rank 1's NaN loss and rank 0's signal are seen by both; each still knows its own."""
    import json

    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_read_on_two_ranks, args=(init, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for rank, (here, anywhere) in enumerate(results):
        assert anywhere == {"loss/generator/l1": True, "signal": True}
        assert here == {"loss/generator/l1": rank == 1, "signal": rank == 0}


def test_the_requeue_votes_by_itself_under_another_module(tmp_path):
    """A module that takes no vote (not ``StudentModule``): ``RequeueOnSignal`` reduces its flag itself."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from p2pz.student.requeue import RequeueOnSignal

    requeue = RequeueOnSignal(run=lambda argv: 0)

    class SignalAtStep1(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                requeue._on_signal(requeue.signum, None)

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=[requeue, SignalAtStep1()],
    )
    trainer.fit(BoringModel())
    assert trainer.global_step == 2
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
