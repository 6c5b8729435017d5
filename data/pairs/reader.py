"""The training reader: (input, edit) pairs from WebDataset shards as batches of tensors.

```python
from p2pz.data.pairs.reader import list_shards, pair_loader, ReaderStats
urls = list_shards("out/pairs")                  # a folder, a glob or a brace pattern
loader = pair_loader(urls, batch_size=8, resolution=256, epoch_length=1000, rank=rank, world_size=world)
for batch in loader:
    batch["src"], batch["edit"]     # float32 [B, 3, H, W] in [-1, 1]; batch["__key__"]: list[str]
```

Distributed training: each rank reads ``urls[rank::world_size]``, computed here in the main process
from the ``rank``/``world_size`` arguments (or ``torch.distributed`` once initialised). WebDataset's own
``split_by_node`` reads RANK/WORLD_SIZE from the environment, which Lightning does not set, and inside
spawned DataLoader workers every rank would then look like rank 0 and read the same data. Within a
rank, shards are spread over DataLoader workers (``split_by_worker`` semantics, by worker id).

Resampled mode (the default, and the one to use for DDP): each worker draws shards with replacement
forever, so every rank yields exactly ``epoch_length`` batches per epoch — **epoch_length counts
batches per rank**, not samples — and no rank runs dry and hangs a collective. The draw order is
seeded by (seed, rank, worker, epoch), so runs are reproducible and the epochs differ.

Corrupt data never stops training: unreadable or truncated shards and undecodable images are skipped
with a warning (WebDataset's ``warn_and_continue``, without its sleep) and counted in
:class:`ReaderStats` (shared with the workers). Only when no shard yields a single complete pair does
the reader stop, with a UserError naming them (:func:`readable_shards` checks that up front).
"""

from __future__ import annotations

import glob
import hashlib
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch.utils.data import IterableDataset as _IterableDataset

from p2pz.data.pairs import sample as fmt
from p2pz.utils.errors import UserError

SHUFFLE_BUFFER = 256
UNREADABLE_DRAWS = 20  # resampled draws per shard without one complete pair: every shard is bad
CROP_JITTER = 1.125  # augment: resize the short side to resolution * this, then crop (pix2pix's 286 -> 256)
# Joint augmentations of (input, edit): "crop" (pix2pix's resize x1.125 + random crop + horizontal
# flip; photos) or "dihedral" (one of the square's 8 flips/rotations, pixel-exact, no resampling;
# worlds without an up or a handedness, like the shapes world); "none".
AUGMENTS = ("none", "crop", "dihedral")


# --------------------------------------------------------------------------------------------------
# Shard lists


def list_shards(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Sorted shard paths from a folder, a glob (``out/pairs-*.tar``), a brace pattern
    (``out/pairs-{000000..000031}.tar``), a single file, or a list of any of these.

    Remote URLs (``pipe:...``, ``http://...``) are expanded but not checked. Raises UserError if
    nothing matches.
    """
    import braceexpand

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: list[str] = []
    for item in specs:
        item = os.fspath(item)
        if item.startswith("pipe:") or "://" in item:
            found.extend(braceexpand.braceexpand(item))
            continue
        for pattern in braceexpand.braceexpand(item):
            path = Path(pattern)
            if path.is_dir():
                found.extend(str(p) for p in path.glob("*.tar") if not p.name.startswith("."))
            elif glob.has_magic(pattern):
                found.extend(p for p in glob.glob(pattern) if not Path(p).name.startswith("."))
            elif path.is_file():
                found.append(str(path))
    urls = sorted(set(found))
    if not urls:
        raise UserError(
            f"no shards found at {spec!r}; give a folder of .tar shards, a glob or a brace pattern"
        )
    return urls


def readable_shards(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """``list_shards(spec)``, once one of them is seen to start with a complete (input, edit) pair.

    Damaged shards are the reader's to skip; but when every local shard is empty, truncated before
    its first pair or not a tar, training would only draw errors. Reads shards until the first
    complete pair (for a healthy dataset: the start of the first shard); remote URLs are not checked.
    """
    urls = list_shards(spec)
    first_error: fmt.ShardError | None = None
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            return urls
        try:
            # the images' bytes are read: a shard cut inside them fails here, not in training
            for sample in fmt.iter_shard(url, read=lambda member: member in fmt.REQUIRED):
                if fmt.is_complete(sample):
                    return urls
        except fmt.ShardError as err:
            first_error = first_error or err
    raise UserError(
        _no_readable_pair(urls, first_error.reason if first_error else "no sample has src.png and edit.png")
    )


def rank_share(urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards rank ``rank`` of ``world_size`` reads: ``urls[rank::world_size]``, or all of them when
    there are fewer shards than ranks (resampled reading; the seeds differ per rank)."""
    urls = list(urls)
    return urls[rank::world_size] if len(urls) >= world_size else urls


def _no_readable_pair(urls: Sequence[str], why: str) -> str:
    """The one line for shards of which none holds a readable pair."""
    where = urls[0] if len(urls) == 1 else f"{urls[0]} and {len(urls) - 1} more"
    return (
        f"no shard holds a readable (src.png, edit.png) pair: {where}{f' ({why})' if why else ''}; "
        "check them with 'p2pz shards inspect DIR' and write them again with 'p2pz generate'"
    )


# --------------------------------------------------------------------------------------------------
# Counters shared with DataLoader workers


class ReaderStats:
    """Counts of what the reader saw, summed over all DataLoader workers.

    ``samples`` decoded pairs, ``batches`` batches assembled, ``errors`` exceptions skipped (unreadable
    or truncated shards, bad images; a truncated shard may count more than once), ``incomplete``
    samples lacking ``src.png`` or ``edit.png`` (typically the torn last sample of a truncated shard).
    The counters live in shared memory, so they work with forked and spawned workers alike.
    """

    FIELDS = ("samples", "batches", "errors", "incomplete")

    def __init__(self):
        ctx = multiprocessing.get_context()
        self._values = {name: ctx.Value("q", 0) for name in self.FIELDS}
        self.last_error = ""  # message of the last error seen in this process

    def add(self, name: str, amount: int = 1) -> None:
        value = self._values[name]
        with value.get_lock():
            value.value += amount

    def __getattr__(self, name: str) -> int:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name].value
        raise AttributeError(name)

    def as_dict(self) -> dict[str, int]:
        return {name: self._values[name].value for name in self.FIELDS}

    def __repr__(self) -> str:
        return "ReaderStats(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


class _CountingHandler:
    """WebDataset's ``warn_and_continue`` that also counts (a class, so it pickles into spawned workers),
    without its half-second sleep per error: resampling draws a damaged shard again and again, and
    the sleeps added up to seconds of stalled training (minutes for a dataset of damaged shards)."""

    def __init__(self, stats: ReaderStats):
        self.stats = stats

    def __call__(self, exn: Exception) -> bool:
        import warnings

        self.stats.add("errors")
        # webdataset appends the stream and the url to the arguments: the first one is the reason
        reason = exn.args[0] if len(exn.args) > 1 and isinstance(exn.args[0], str) else exn
        self.stats.last_error = f"{type(exn).__name__}: {reason}"[:500]
        warnings.warn(repr(exn), stacklevel=2)
        return True


# --------------------------------------------------------------------------------------------------
# Pipeline stages


class _EpochState:
    """The epoch number, set in the main process at the start of each epoch. It lives in shared memory
    (as :class:`ReaderStats`), so persistent DataLoader workers, started once, see each new epoch:
    per-epoch seeds work for in-process, fresh and persistent workers alike."""

    def __init__(self):
        self._epoch = multiprocessing.get_context().Value("q", 0, lock=False)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value


def _stream_seed(seed: int, rank: int, epoch: int, purpose: str) -> int:
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    text = f"{seed}/{rank}/{worker}/{epoch}/{purpose}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class _Readable:
    """Whether this process's pipeline has read one complete pair from any shard: a plain flag that
    the stages of one pipeline share (they run in the same process, a DataLoader worker or the main one)."""

    def __init__(self):
        self.seen = False


class _MarkReadable:
    """Stage after the tar reader: notes the first complete raw sample, passes everything on."""

    def __init__(self, readable: _Readable):
        self.readable = readable

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            if not self.readable.seen and fmt.is_complete(sample):
                self.readable.seen = True
            yield sample


class _Positions:
    """Stage after the tar reader: only the samples at ``positions`` (a ``range``) of the ordered
    stream, which ends after the last of them (how the ranks split the validation pairs)."""

    def __init__(self, positions: range):
        self.positions = positions

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        if not self.positions:
            return
        for index, sample in enumerate(samples):
            if index in self.positions:
                yield sample
            if index >= self.positions[-1]:
                return


class _ShardSource(_IterableDataset):
    """First stage: ``{"url": ...}`` dicts for this rank and worker.

    Resampled: draw shards with replacement forever (seeded per rank/worker/epoch). Otherwise: each
    of the rank's shards once, dealt round robin to the workers. Damaged shards are skipped, but when
    ``UNREADABLE_DRAWS`` draws per shard have given no complete pair at all, every shard is bad and
    resampling would spin forever: that raises a UserError naming them instead.
    """

    def __init__(
        self,
        urls: list[str],
        resampled: bool,
        seed: int,
        rank: int,
        state: _EpochState,
        readable: _Readable | None = None,
        stats: ReaderStats | None = None,
        groups: list[list[str]] | None = None,
    ):
        self.urls, self.resampled, self.seed, self.rank, self.state = urls, resampled, seed, rank, state
        self.readable, self.stats = readable, stats
        self.groups = groups if groups is not None and len(groups) > 1 else None

    def __iter__(self) -> Iterator[dict]:
        import torch.utils.data

        if self.resampled:
            rng = random.Random(_stream_seed(self.seed, self.rank, self.state.epoch, "shards"))
            limit = max(100, UNREADABLE_DRAWS * len(self.urls))
            draws = 0
            while True:
                if draws == limit and self.readable is not None and not self.readable.seen:
                    error = (
                        self.stats.last_error.splitlines()[0] if self.stats and self.stats.last_error else ""
                    )
                    raise UserError(_no_readable_pair(self.urls, f"last error: {error}" if error else ""))
                draws += 1
                # balanced: a group (e.g. an edit) first, then one of its shards
                urls = rng.choice(self.groups) if self.groups is not None else self.urls
                yield {"url": rng.choice(urls)}
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[worker::workers]:
            yield {"url": url}


def augment_mode(augment: bool | str | None) -> str:
    """A config's ``augment`` as one of :data:`AUGMENTS` (``true`` is ``"crop"``, ``false`` ``"none"``)."""
    if augment is None or augment is False:
        return "none"
    if augment is True:
        return "crop"
    if augment not in AUGMENTS:
        raise UserError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)} (or true/false)")
    return augment


def _dihedral_transforms():
    from PIL import Image

    T = Image.Transpose
    return (None, T.FLIP_LEFT_RIGHT, T.FLIP_TOP_BOTTOM, T.ROTATE_90, T.ROTATE_180, T.ROTATE_270,
            T.TRANSPOSE, T.TRANSVERSE)  # fmt: skip


def joint_crop_flip(images: list, resolution: int, augment: bool | str, rng: random.Random) -> list:
    """Resize, crop and flip several aligned images with one set of random parameters.

    The input and its edit must stay pixel-aligned, so the crop window and the flip are drawn once.
    Always: short side to ``resolution`` and centre crop, except that ``"crop"`` resizes the short
    side to ``resolution * CROP_JITTER``, crops at random and flips horizontally with probability
    1/2; ``"dihedral"`` then applies one of the 8 flips/rotations of the square, drawn uniformly.
    """
    from PIL import Image

    mode = augment_mode(augment)
    width, height = images[0].size
    if any(im.size != (width, height) for im in images):
        raise ValueError(f"pair images differ in size: {[im.size for im in images]}")
    short = round(resolution * CROP_JITTER) if mode == "crop" else resolution
    scale = short / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != (width, height):
        images = [im.resize(new_size, Image.BICUBIC) for im in images]
    transpose = None
    if mode == "crop":
        left = rng.randint(0, new_size[0] - resolution)
        top = rng.randint(0, new_size[1] - resolution)
        transpose = Image.Transpose.FLIP_LEFT_RIGHT if rng.random() < 0.5 else None
    else:
        left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
        if mode == "dihedral":
            transpose = rng.choice(_dihedral_transforms())
    box = (left, top, left + resolution, top + resolution)
    images = [im.crop(box) for im in images]
    if transpose is not None:
        images = [im.transpose(transpose) for im in images]
    return images


def _to_tensor(image):
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class _DecodePairs:
    """Stage: raw samples -> {"src", "edit", "__key__", "__url__"} with the joint crop/flip."""

    def __init__(self, resolution, augment, seed, rank, state, stats, handler):
        self.resolution, self.augment, self.seed, self.rank = resolution, augment, seed, rank
        self.state, self.stats, self.handler = state, stats, handler

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(_stream_seed(self.seed, self.rank, self.state.epoch, "augment"))
        for sample in samples:
            if not fmt.is_complete(sample):
                self.stats.add("incomplete")
                continue
            try:
                src, edit = joint_crop_flip(
                    [fmt.decode_image(sample[fmt.SRC]), fmt.decode_image(sample[fmt.EDIT])],
                    self.resolution,
                    self.augment,
                    rng,
                )
            except Exception as exn:
                exn.args = exn.args + (sample.get("__key__"), sample.get("__url__"))
                if self.handler(exn):
                    continue
                break
            self.stats.add("samples")
            yield {
                "src": _to_tensor(src),
                "edit": _to_tensor(edit),
                "__key__": sample[fmt.KEY],
                "__url__": sample.get(fmt.URL, ""),
            }


class _Shuffle:
    """Stage: WebDataset's buffered shuffle, seeded per (seed, rank, worker, epoch)."""

    def __init__(self, bufsize: int, seed: int, rank: int, state: _EpochState):
        self.bufsize, self.seed, self.rank, self.state = bufsize, seed, rank, state

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        import webdataset as wds

        rng = random.Random(_stream_seed(self.seed, self.rank, self.state.epoch, "shuffle"))
        yield from wds.shuffle(self.bufsize, min(self.bufsize, 64), rng=rng)(samples)


class _Collate:
    def __init__(self, stats):
        self.stats = stats

    def __call__(self, samples: list[dict]) -> dict:
        import torch

        self.stats.add("batches")
        return {
            "src": torch.stack([s["src"] for s in samples]),
            "edit": torch.stack([s["edit"] for s in samples]),
            "__key__": [s["__key__"] for s in samples],
            "__url__": [s["__url__"] for s in samples],
        }


# --------------------------------------------------------------------------------------------------
# The loader


class PairLoader:
    """Iterable of pair batches; ``len()`` is ``epoch_length`` when one is set.

    Each ``iter()`` starts a new epoch (new shard draw, shuffle and augmentation seeds).
    """

    def __init__(
        self,
        dataset,
        loader,
        epoch_length: int | None,
        state: _EpochState,
        stats: ReaderStats,
        urls: list[str],
    ):
        self.dataset, self._loader, self.epoch_length = dataset, loader, epoch_length
        self._state, self.stats, self.urls = state, stats, urls
        self._started = False

    @property
    def epoch(self) -> int:
        return self._state.epoch

    def __iter__(self) -> Iterator[dict]:
        import itertools

        if self._started:
            self._state.epoch += 1
        self._started = True
        iterator = iter(self._loader)
        if self.epoch_length is not None:
            iterator = itertools.islice(iterator, self.epoch_length)
        return _one_line_errors(iterator)

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("this PairLoader has no epoch_length, so its length is unknown")
        return self.epoch_length


def _one_line_errors(iterator: Iterator[dict]) -> Iterator[dict]:
    """``iterator``, with a UserError raised in a DataLoader worker back to its one line (torch
    re-raises it in the main process with the worker's traceback in the message)."""
    try:
        yield from iterator
    except UserError as err:
        lines = str(err).strip().splitlines()
        if len(lines) > 1:
            raise UserError(lines[-1].split(": ", 1)[-1]) from None
        raise


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return (
            dist.get_rank() if rank is None else rank,
            dist.get_world_size() if world_size is None else world_size,
        )
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (
            int(os.environ["RANK"]) if rank is None else rank,
            int(os.environ["WORLD_SIZE"]) if world_size is None else world_size,
        )
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


def _ignore_cluster_signals(worker_id: int) -> None:
    """Leave SLURM's requeue signal to the training process.

    SLURM signals every process of a job step, and forked workers inherit Lightning's SIGUSR1
    handler: each would save its own stale copy of the model to the same hpc checkpoint and call
    ``scontrol requeue`` again. Workers ignore SIGUSR1 and die normally on SIGTERM.
    """
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _rank_groups(groups: Sequence[Sequence[str]] | None, rank_urls: Sequence[str]) -> list[list[str]] | None:
    """The groups restricted to this rank's shards (groups it has no shard of are left out)."""
    if groups is None:
        return None
    mine = set(rank_urls)
    kept = [[u for u in group if u in mine] for group in groups]
    return [group for group in kept if group] or None


def pair_loader(
    urls: Sequence[str],
    batch_size: int = 8,
    resolution: int = 256,
    augment: bool | str = True,
    resampled: bool = True,
    epoch_length: int | None = 1000,
    num_workers: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    stats: ReaderStats | None = None,
    positions: range | None = None,
    pin_memory: bool = False,
    groups: Sequence[Sequence[str]] | None = None,
) -> PairLoader:
    """Batches of aligned (input, edit) pairs for training (see the module docstring).

    ``epoch_length`` is in **batches per rank** (``None`` = until the shards run out, only without
    ``resampled``). Batches are always full in resampled mode; otherwise the last one may be short.
    ``rank``/``world_size`` default to ``torch.distributed`` when initialised, else RANK/WORLD_SIZE
    from the environment, else a single process. ``stats`` receives the counters (a new
    :class:`ReaderStats` is made if omitted; it is ``loader.stats``). ``positions``: read only the
    samples at these positions of the ordered stream (not ``resampled``, at most one worker).
    ``pin_memory``: page-locked batches, for CUDA. Workers, if any, persist across epochs.
    ``groups``: a partition of ``urls`` (one list per edit) that resampled reading draws from
    uniformly, then a shard within the group, so that every group is read as often however many
    shards it has.
    """
    import webdataset as wds

    urls = list(urls)
    if not urls:
        raise UserError("pair_loader got an empty shard list")
    if resampled and epoch_length is None:
        raise UserError("resampled reading is endless: give epoch_length (batches per rank)")
    augment = augment_mode(augment)
    rank, world_size = _rank_and_world(rank, world_size)
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in [0, {world_size})")
    if len(urls) >= world_size or resampled:
        rank_urls = rank_share(urls, rank, world_size)
    else:
        raise UserError(
            f"{len(urls)} shards cannot be split over {world_size} ranks; write more, smaller shards"
        )
    if not resampled and num_workers > len(rank_urls):
        num_workers = len(rank_urls)  # a worker without a shard would yield nothing
    if positions is not None and (resampled or num_workers > 1):
        raise UserError("positions select from one ordered stream: not resampled, at most one worker")

    stats = stats if stats is not None else ReaderStats()
    handler = _CountingHandler(stats)
    state = _EpochState()
    readable = _Readable()
    stages = [
        _ShardSource(
            rank_urls, resampled, seed, rank, state, readable, stats, _rank_groups(groups, rank_urls)
        ),
        wds.tarfile_to_samples(handler=handler),
        _MarkReadable(readable),
    ]
    if positions is not None:
        stages.append(_Positions(positions))
    if resampled or augment != "none":
        stages.append(_Shuffle(SHUFFLE_BUFFER, seed, rank, state))
    stages += [
        _DecodePairs(resolution, augment, seed, rank, state, stats, handler),
        wds.batched(batch_size, collation_fn=_Collate(stats), partial=not resampled),
    ]
    dataset = wds.DataPipeline(*stages)
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_ignore_cluster_signals if num_workers else None,
        pin_memory=pin_memory,
        # started once, not once per epoch (the epoch reaches them through shared memory)
        persistent_workers=num_workers > 0,
    )
    return PairLoader(dataset, loader, epoch_length, state, stats, rank_urls)
