"""Validation pairs split over the ranks, and the training loader's CUDA settings (pinned batches,
persistent workers that still see each new epoch)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from test_training import write_pair_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Four shards of 8 pairs: three for training, the last held out for validation."""
    return write_pair_shards(tmp_path_factory.mktemp("pairs"), shards=4, per_shard=8)


def _trainer(rank: int = 0, world_size: int = 1, device: str = "cpu") -> SimpleNamespace:
    """What the data module reads of its trainer (its reduce: this process's ranks are simulated one at
    a time, so the sum over ranks is this rank's own value)."""
    strategy = SimpleNamespace(root_device=torch.device(device), reduce=lambda tensor, reduce_op: tensor)
    return SimpleNamespace(global_rank=rank, world_size=world_size, global_step=0, strategy=strategy)


def _data(shards: Path, trainer: SimpleNamespace, **kwargs):
    from p2pz.student.datamodule import PairDataModule

    kwargs = {"resolution": 64, "batch_size": 3, "val_samples": 8, "num_workers": 0, **kwargs}
    data = PairDataModule(shards=str(shards), val_fraction=0.25, **kwargs)
    data.trainer = trainer
    data.setup("fit")
    return data


def _torch_loader(loader):
    """The torch DataLoader inside a PairLoader (webdataset's WebLoader wraps one)."""
    return loader._loader.pipeline[0]


def _val_keys(data) -> list[list[str]]:
    return [batch["__key__"] for batch in data.val_dataloader()]


def test_validation_positions_over_two_ranks_are_disjoint_halves_of_the_set():
    from p2pz.student.datamodule import validation_positions

    halves = [set(validation_positions(256, rank, 2)) for rank in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 128
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(256))
    thirds = [set(validation_positions(10, rank, 3)) for rank in range(3)]
    assert sorted(len(t) for t in thirds) == [3, 3, 4] and set().union(*thirds) == set(range(10))
    # fewer pairs than ranks: every rank scores them all (an empty rank would stall the reduction)
    assert [list(validation_positions(2, rank, 4)) for rank in range(4)] == [[0, 1]] * 4


def test_each_rank_scores_its_own_share_of_the_validation_pairs(shards):
    """Two ranks read disjoint pairs that together are the one-process set; rank 0's first batch (the
    held-out grid) is the same at every validation."""
    alone = [key for batch in _val_keys(_data(shards, _trainer())) for key in batch]
    per_rank = [_val_keys(_data(shards, _trainer(rank, 2))) for rank in (0, 1)]
    keys = [[key for batch in batches for key in batch] for batches in per_rank]
    assert len(alone) == 8 and len(keys[0]) == len(keys[1]) == 4
    assert not set(keys[0]) & set(keys[1]) and set(keys[0]) | set(keys[1]) == set(alone)
    assert _val_keys(_data(shards, _trainer(0, 2)))[0] == per_rank[0][0]


@pytest.mark.parametrize("device, pinned", [("cuda", True), ("cpu", False)])
def test_batches_are_pinned_on_cuda_only(shards, device, pinned):
    data = _data(shards, _trainer(device=device))
    assert _torch_loader(data.train_dataloader()).pin_memory is pinned
    assert _torch_loader(data.val_dataloader()).pin_memory is pinned


def test_persistent_workers_still_draw_a_new_stream_each_epoch(shards):
    """Training workers start once (not once per epoch) and still see the epoch number: the two
    epochs' pairs differ, as with workers started afresh."""
    data = _data(shards, _trainer(), num_workers=1, epoch_length=2)
    loader = data.train_dataloader()
    torch_loader = _torch_loader(loader)
    assert torch_loader.persistent_workers and not _torch_loader(data.val_dataloader()).persistent_workers
    epochs = [[key for batch in loader for key in batch["__key__"]] for _ in range(2)]
    assert len(epochs[0]) == len(epochs[1]) == 6
    assert epochs[0] != epochs[1]
    assert torch_loader._iterator is not None  # the same workers served both epochs


class RecordValidation(pl.Callback):
    """Rank 0 writes the reduced ``val/l1`` and its EMA generator after the validation pass."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.scored: list[str] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.scored += batch["__key__"]

    def on_validation_end(self, trainer, pl_module):
        Path(self.out_dir, f"scored-{trainer.global_rank}.json").write_text(json.dumps(self.scored))
        if trainer.is_global_zero and not trainer.sanity_checking:
            value = float(trainer.callback_metrics["val/l1"])
            torch.save({"l1": value, "g_ema": pl_module.g_ema.state_dict()}, Path(self.out_dir, "val.pt"))


def test_two_ddp_ranks_average_the_validation_metric_over_all_pairs(shards, tmp_path):
    """gloo, two CPU ranks, one iteration then validation: each rank scores four of the eight held-out
    pairs, and the logged val/l1 is the mean over all eight, as one process scoring them all finds it."""
    import yaml
    from test_training import TINY

    from p2pz.student.datamodule import PairDataModule
    from p2pz.student.training import StudentModule

    config = yaml.safe_load(Path(TINY).read_text())
    # a fixed init: under a random one, rank 0's half of the errors once had the mean of all eight to
    # 1e-5, and the last check could not tell the two apart
    torch.manual_seed(0)
    model = StudentModule(**{**config["model"], "grid_every_n_steps": 0})
    data = PairDataModule(shards=str(shards), val_fraction=0.25, resolution=64, batch_size=2, val_samples=8)
    data.hparams.num_workers = 0
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn_find_unused_parameters_true",
        max_steps=1,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        default_root_dir=str(tmp_path / "run"),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[RecordValidation(str(tmp_path))],
    )
    trainer.fit(model, datamodule=data)

    scored = [json.loads((tmp_path / f"scored-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(scored[0]) == len(scored[1]) == 4 and not set(scored[0]) & set(scored[1])
    recorded = torch.load(tmp_path / "val.pt")
    model.g_ema.load_state_dict(recorded["g_ema"])
    alone = PairDataModule(shards=str(shards), val_fraction=0.25, resolution=64, batch_size=2, val_samples=8)
    alone.setup("fit")
    errors = []
    with torch.no_grad():
        for batch in alone.val_dataloader():
            errors.append((model.g_ema(batch["src"]) - batch["edit"]).abs().flatten(1).mean(1))
    errors = torch.cat(errors)
    assert errors.numel() == 8
    assert recorded["l1"] == pytest.approx(float(errors.mean()), rel=1e-5)
    assert float(errors[0::2].mean()) != pytest.approx(float(errors.mean()), rel=1e-4)  # not rank 0's half
