"""The teacher's (input, edit) shards as a LightningDataModule: training and validation splits.

Training reads with replacement (``resampled``) from the training shards, each rank from its own
disjoint share of them (``p2pz.data.pairs.reader`` splits by ``trainer.global_rank``), so an "epoch" is simply
``epoch_length`` batches per rank and no rank ever runs dry. Validation reads a fixed, unaugmented,
deterministic set of samples: the first ``val_samples`` pairs of the validation shards (rounded up to
whole batches), dealt to the ranks in turn (:func:`validation_positions`); the module logs the metrics
with ``sync_dist``, which reduces them to the mean over all of them. On CUDA the batches come in
page-locked memory; DataLoader workers persist across epochs.

The validation shards are either given (``val_shards``) or held out from ``shards``: the last
``val_fraction`` of them in sorted order (at least one, and only when there are two or more shards).

Shards of several edits (a student of many edits, ``p2pz.student.conditioning``): training draws an
edit uniformly, then one of its shards; each edit holds out its own last shards, and validation scores
``val_samples`` pairs of each edit.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from p2pz.data.pairs.reader import (
    PairLoader,
    ReaderStats,
    augment_mode,
    list_shards,
    pair_loader,
    rank_share,
    readable_shards,
)
from p2pz.student.conditioning import edits_of_shards
from p2pz.utils.cpu import usable_cpus
from p2pz.utils.errors import UserError


def split_shards(
    shards: str, val_shards: str | None = None, val_fraction: float = 0.05
) -> tuple[list[str], list[str]]:
    """(training shards, held-out validation shards): ``val_shards`` when given, else the last
    ``val_fraction`` of ``shards`` in sorted order (at least one, only when there are two or more);
    shards of several edits: the last ``val_fraction`` of each edit's, so that every edit is scored.
    A shard whose edit cannot be read (damaged at its start) stays a training shard: the checks that
    a rank can read its share see it, as they do with one edit."""
    urls = list_shards(shards)
    if val_shards:
        return urls, list_shards(val_shards)
    if val_fraction <= 0 or len(urls) < 2:
        return urls, []
    groups = edits_of_shards(urls)
    if len(groups) < 2:
        return _hold_out_last(urls, val_fraction)
    train, val = _unread_shards(urls, groups), []
    for group in groups.values():
        group_train, group_val = _hold_out_last(group, val_fraction)
        train += group_train
        val += group_val
    return sorted(train), sorted(val)


def _unread_shards(urls: list[str], edits: dict[str, list[str]]) -> list[str]:
    """The shards of ``urls`` in no edit's group (their edit could not be read: damaged at the start)."""
    grouped = {u for group in edits.values() for u in group}
    return [u for u in urls if u not in grouped]


def _warn_unread_shards(urls: list[str], edits: dict[str, list[str]]) -> None:
    """Balanced draws pick an edit, then one of its shards: a shard whose edit cannot be read is never
    drawn, so say which ones training leaves out."""
    unread = _unread_shards(urls, edits)
    if unread:
        rank_zero_warn(
            f"{len(unread)} training shard(s) cannot be read and are left out: {unread[0]}"
            f"{f' and {len(unread) - 1} more' if len(unread) > 1 else ''}; check them with "
            "'p2pz shards inspect DIR'"
        )


def _hold_out_last(urls: list[str], fraction: float) -> tuple[list[str], list[str]]:
    if len(urls) < 2:
        return urls, []
    held_out = min(len(urls) - 1, max(1, round(len(urls) * fraction)))
    return urls[:-held_out], urls[-held_out:]


def capped_workers(requested: int, cpus: int | None = None) -> int:
    """``requested`` DataLoader workers, at most one per CPU this process has (``usable_cpus``), with a
    warning when that caps them: 6 workers on a SLURM task of 1 CPU would only take turns on it."""
    cpus = usable_cpus() if cpus is None else cpus
    if requested <= cpus:
        return requested
    rank_zero_warn(
        f"data.num_workers is {requested} but this process has {cpus} CPU(s): using {cpus} DataLoader "
        f"workers; give each task more (sbatch --cpus-per-task={requested + 1}: the workers and the "
        "training process)"
    )
    return cpus


def refuse_unreadable_rank_shares(trainer: pl.Trainer, train_urls: list[str]) -> None:
    """Stop every rank, one line each, when any rank's share of the training shards holds no readable pair.

    The whole dataset was checked before the trainer existed, but each rank reads only its share
    (:func:`rank_share`): a rank whose shards are all damaged would raise alone in its reader while the
    others wait for it in the next collective (DDP's timeout: 30 minutes). Each rank checks its share
    here, before training, and one all-reduce tells every rank which ones failed.
    """
    import torch

    rank, world_size = trainer.global_rank, trainer.world_size
    try:
        readable_shards(rank_share(train_urls, rank, world_size))
        error = None
    except UserError as err:
        error = err
    if world_size == 1:  # nobody to tell: no collective, no device tensor
        if error is not None:
            raise UserError(f"rank {rank} of {world_size}: {error}")
        return
    failed = torch.zeros(world_size, device=trainer.strategy.root_device)
    failed[rank] = error is not None
    failed = trainer.strategy.reduce(failed, reduce_op="sum")
    if error is not None:
        raise UserError(f"rank {rank} of {world_size}: {error}")
    bad = [str(r) for r in range(world_size) if failed[r] > 0]
    if bad:
        ranks = f"rank {bad[0]}" if len(bad) == 1 else f"ranks {', '.join(bad)}"
        raise UserError(
            f"rank {rank} of {world_size} stops: no readable (src.png, edit.png) pair in the training shards "
            f"of {ranks} (named in that rank's own error line)"
        )


def validation_positions(samples: int, rank: int, world_size: int) -> range:
    """The positions, among the first ``samples`` validation pairs, that ``rank`` scores: every
    ``world_size``-th from ``rank`` (disjoint, together all of them; rank 0's first batch, the held-out
    grid, is the same pairs at every validation). With fewer pairs than ranks every rank scores all
    of them: a rank without a batch would log no metric and leave the others waiting in the reduction."""
    if samples < world_size:
        return range(samples)
    return range(rank, samples, world_size)


def _on_cuda(trainer: pl.Trainer | None) -> bool:
    return trainer is not None and trainer.strategy.root_device.type == "cuda"


class PairDataModule(pl.LightningDataModule):
    """Shards of ``pairs-%06d.tar`` written by the teacher (sample format: ``p2pz.data.pairs.sample``).

    Args:
        shards: the training shards: a folder, a glob or a brace pattern.
        val_shards: separate validation shards; default: hold out ``val_fraction`` of ``shards``.
        val_fraction: share of the shards held out for validation when ``val_shards`` is not given.
        resolution: image size in pixels (linked to ``model.resolution`` by ``train.py``).
        batch_size: pairs per batch *per device*.
        epoch_length: training batches per rank that make one (Lightning) epoch.
        val_samples: validation pairs scored each time validation runs, split over the ranks.
        augment: joint augmentation of input and edit: ``crop`` (or ``true``: random crop x1.125 and
            horizontal flip), ``dihedral`` (one of the 8 flips/rotations of the square, no
            resampling: for worlds without an up, like the shapes world) or ``none`` (``false``).
        num_workers: DataLoader worker processes per rank for training (at most one per CPU the rank
            has: see :func:`capped_workers`).
        seed: seed of the shard draw, shuffle and augmentation (combined with rank and resume step).
    """

    def __init__(
        self,
        shards: str,
        val_shards: str | None = None,
        val_fraction: float = 0.05,
        resolution: int = 256,
        batch_size: int = 8,
        epoch_length: int = 1000,
        val_samples: int = 64,
        augment: bool | str = True,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1 or epoch_length < 1:
            raise UserError("batch_size and epoch_length must be at least 1")
        augment_mode(augment)  # a typo fails here, not in a DataLoader worker
        self.save_hyperparameters()
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        self.edit_groups: list[list[str]] | None = None
        self.val_edit_groups: list[list[str]] | None = None
        # reader counters (shared memory): made in setup(), i.e. in the process that trains, since
        # ddp_spawn pickles this object into fresh processes
        self.stats: ReaderStats | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.stats is None:
            self.stats = ReaderStats()
        self.train_urls, self.val_urls = split_shards(
            self.hparams.shards, self.hparams.val_shards, self.hparams.val_fraction
        )
        # shards of several edits: each edit is drawn as often, however many shards it has
        edits = edits_of_shards(self.train_urls)
        self.edit_groups = list(edits.values()) if len(edits) > 1 else None
        if self.edit_groups:
            _warn_unread_shards(self.train_urls, edits)
        val_edits = edits_of_shards(self.val_urls) if self.edit_groups else {}
        self.val_edit_groups = list(val_edits.values()) if len(val_edits) > 1 else None
        if not self.val_urls and self.hparams.val_fraction > 0:
            rank_zero_warn("only one shard and no --data.val_shards: training runs without validation")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if len(self.train_urls) < world_size:
            rank_zero_warn(
                f"{len(self.train_urls)} training shards for {world_size} ranks: every rank draws from all "
                "of them, so ranks may see the same pairs; write at least one shard per rank"
            )
        if stage in (None, "fit") and self.trainer is not None:
            refuse_unreadable_rank_shares(self.trainer, self.train_urls)

    def state_dict(self) -> dict[str, Any]:
        """The split, recorded in every checkpoint (``p2pz export`` carries it into the package)."""
        return {"train_shards": list(self.train_urls), "val_shards": list(self.val_urls)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run splits its shards again in ``setup``: nothing to restore."""

    def train_dataloader(self) -> PairLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # a resumed run continues with a fresh stream instead of replaying the first batches
        start_step = trainer.global_step if trainer is not None else 0
        return pair_loader(
            self.train_urls,
            batch_size=self.hparams.batch_size,
            resolution=self.hparams.resolution,
            augment=self.hparams.augment,
            resampled=True,
            epoch_length=self.hparams.epoch_length,
            num_workers=capped_workers(self.hparams.num_workers),
            seed=self.hparams.seed + 1_000_003 * start_step,
            rank=rank,
            world_size=world_size,
            stats=self.stats,
            pin_memory=_on_cuda(trainer),
            groups=self.edit_groups,
        )

    def val_dataloader(self) -> PairLoader | list[PairLoader]:
        """The first ``val_samples`` validation pairs; shards of several edits: that many of each edit's
        (one loader per edit)."""
        if not self.val_urls:
            return []
        if self.val_edit_groups:
            return [self._val_loader(urls) for urls in self.val_edit_groups]
        return self._val_loader(self.val_urls)

    def _val_loader(self, urls: list[str]) -> PairLoader:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batch_size = min(self.hparams.batch_size, self.hparams.val_samples)
        samples = math.ceil(self.hparams.val_samples / batch_size) * batch_size
        positions = validation_positions(samples, rank, world_size)
        return pair_loader(
            urls,
            batch_size=batch_size,
            resolution=self.hparams.resolution,
            augment=False,
            resampled=False,
            epoch_length=math.ceil(len(positions) / batch_size),
            num_workers=0,
            rank=0,  # one ordered stream of the validation shards; this rank's pairs are its positions
            world_size=1,
            positions=positions,
            pin_memory=_on_cuda(trainer),
        )
