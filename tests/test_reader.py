"""The sample format and the training reader on hand-made shards (no teacher needed): the sample
module's round trip, decoding, joint augmentation, rank/worker splits, resampled epochs, seeded
shuffling, and corrupt shards skipped with a count."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz.data.pairs import sample as fmt
from p2pz.data.pairs.reader import ReaderStats, joint_crop_flip, list_shards, pair_loader
from p2pz.data.pairs.shards import atomic_shard, shard_name
from p2pz.utils.errors import UserError


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pairs(folder, num_shards: int, per_shard: int, size=(40, 32), seed=0) -> list[str]:
    """Shards whose edit is the colour negative of the input, so alignment can be checked exactly."""
    rng = np.random.default_rng(seed)
    keys = []
    for index in range(num_shards):
        with atomic_shard(folder, index) as shard:
            for j in range(per_shard):
                # smooth images, so resampling does not amplify noise
                base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
                src = np.asarray(Image.fromarray(base).resize(size, Image.BILINEAR))
                key = f"s{index:03d}_{j:03d}"
                shard.write(fmt.build_sample(key, _png(src), _png(255 - src), {"key": key}))
                keys.append(key)
    return keys


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    keys = write_pairs(folder, num_shards=4, per_shard=5)
    return folder, keys


def test_sample_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    edit = Image.fromarray(255 - np.asarray(src))
    latent = rng.standard_normal((4, 3, 4)).astype(np.float64)
    meta = {"edit": {"name": "cat-to-dog", "source": "cat", "target": "dog"}, "seed": 7}
    with atomic_shard(tmp_path, 0) as shard:
        shard.write(fmt.build_sample("a", src, edit, meta, reconstruction=src, latent=latent))
        shard.write(fmt.build_sample("b", _png(np.asarray(src)), _png(np.asarray(edit)), {"seed": 8}))
    path = tmp_path / shard_name(0)

    samples = list(fmt.iter_shard(path))
    assert [s[fmt.KEY] for s in samples] == ["a", "b"]
    assert set(samples[0]) - {fmt.KEY, fmt.URL} == {fmt.SRC, fmt.EDIT, fmt.META, fmt.RECON, fmt.LATENT}
    assert set(samples[1]) - {fmt.KEY, fmt.URL} == {fmt.SRC, fmt.EDIT, fmt.META}
    pair = fmt.decode_sample(samples[0])
    assert pair.key == "a" and pair.url == str(path) and pair.meta == meta and pair.mask is None
    assert np.array_equal(np.asarray(pair.source), np.asarray(src))
    assert np.array_equal(np.asarray(pair.edited), np.asarray(edit))
    assert np.array_equal(np.asarray(pair.reconstruction), np.asarray(src))
    assert pair.latent.dtype == np.float32 and np.allclose(pair.latent, latent, atol=1e-6)
    assert fmt.first_meta(path) == meta

    # members left unread are listed (None): complete, but not decodable; one image alone is incomplete
    (listed,) = [s for s in fmt.iter_shard(path, read=lambda m: m == fmt.META) if s[fmt.KEY] == "b"]
    assert (
        listed[fmt.SRC] is None
        and fmt.is_complete(listed)
        and fmt.decode_meta(listed[fmt.META]) == {"seed": 8}
    )
    with pytest.raises(ValueError, match="lacks src.png"):
        fmt.decode_sample(listed)
    assert not fmt.is_complete({fmt.KEY: "c", fmt.SRC: b""})
    with pytest.raises(ValueError):
        fmt.build_sample("has.dot", src, edit, {})


def test_damaged_shard_yields_what_precedes_the_damage(tmp_path):
    write_pairs(tmp_path, num_shards=1, per_shard=4, size=(64, 64))
    path = tmp_path / shard_name(0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    seen = []
    with pytest.raises(fmt.ShardError, match="cannot read shard") as caught:
        for raw in fmt.iter_shard(path):
            seen.append(raw)
    assert 1 <= len(seen) < 4 and not fmt.is_complete(seen[-1])
    assert caught.value.reason and isinstance(caught.value, UserError)
    with pytest.raises(fmt.ShardError):
        fmt.first_meta(tmp_path / "missing.tar")


def test_list_shards_forms(dataset, tmp_path):
    folder, _ = dataset
    expected = [str(folder / shard_name(i)) for i in range(4)]
    assert list_shards(folder) == expected
    assert list_shards(str(folder / "pairs-*.tar")) == expected
    assert list_shards(str(folder / "pairs-{000001..000002}.tar")) == expected[1:3]
    assert list_shards([expected[3], expected[0]]) == [expected[0], expected[3]]
    (tmp_path / ".pairs-000000.tar.123.tmp").write_bytes(b"x")
    with pytest.raises(UserError):
        list_shards(tmp_path)


def test_one_pass_decodes_every_pair_once(dataset):
    folder, keys = dataset
    stats = ReaderStats()
    loader = pair_loader(
        list_shards(folder),
        batch_size=3,
        resolution=24,
        augment=False,
        resampled=False,
        epoch_length=None,
        stats=stats,
    )
    seen = []
    for batch in loader:
        assert batch["src"].dtype == torch.float32 and batch["src"].shape[1:] == (3, 24, 24)
        assert batch["src"].shape == batch["edit"].shape
        assert batch["src"].min() >= -1 and batch["src"].max() <= 1
        assert torch.allclose(batch["edit"], -batch["src"], atol=2.5 / 127.5)
        seen += batch["__key__"]
    assert sorted(seen) == sorted(keys)
    assert stats.samples == len(keys) and stats.errors == 0 and stats.batches == 7  # 20 = 6*3 + 2


def test_augmentation_is_joint_and_varies(dataset):
    folder, _ = dataset
    loader = pair_loader(
        list_shards(folder),
        batch_size=4,
        resolution=24,
        augment=True,
        resampled=True,
        epoch_length=5,
        seed=1,
        rank=0,
        world_size=1,
    )
    by_key: dict[str, list[torch.Tensor]] = {}
    for _ in range(3):  # three epochs
        for batch in loader:
            assert torch.allclose(batch["edit"], -batch["src"], atol=2.5 / 127.5)  # same crop/flip on both
            for key, src in zip(batch["__key__"], batch["src"]):
                by_key.setdefault(key, []).append(src)
    repeats = [views for views in by_key.values() if len(views) > 1]
    assert repeats, "resampling over 3 epochs of 20 samples should repeat some"
    assert any(not torch.equal(views[0], views[1]) for views in repeats), "augmentation never varied"


def test_joint_crop_flip_flips_both():
    left_dark = np.zeros((8, 8, 3), np.uint8)
    left_dark[:, 4:] = 255
    a, b = Image.fromarray(left_dark), Image.fromarray(255 - left_dark)
    outcomes = set()
    import random

    rng = random.Random(0)
    for _ in range(20):
        ca, cb = joint_crop_flip([a, b], 8, True, rng)
        xa, xb = np.asarray(ca).astype(int), np.asarray(cb).astype(int)
        assert np.abs(xa + xb - 255).max() <= 2
        outcomes.add(xa[:, 0].mean() > 127)
    assert outcomes == {True, False}


def test_dihedral_augmentation_is_exact_joint_and_covers_the_eight_symmetries():
    import random

    rng_image = np.random.default_rng(0)
    pixels = rng_image.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a, b = Image.fromarray(pixels), Image.fromarray(255 - pixels)
    originals = np.asarray(a).astype(int)
    symmetries = {np.rot90(m, k).tobytes() for m in (originals, originals[:, ::-1]) for k in range(4)}
    seen = set()
    rng = random.Random(0)
    for _ in range(80):
        ca, cb = joint_crop_flip([a, b], 8, "dihedral", rng)
        xa, xb = np.asarray(ca).astype(int), np.asarray(cb).astype(int)
        assert np.array_equal(xa + xb, np.full_like(xa, 255))  # the same transform on both, no resampling
        assert xa.tobytes() in symmetries
        seen.add(xa.tobytes())
    assert seen == symmetries


def test_augment_names():
    from p2pz.data.pairs.reader import augment_mode

    assert [augment_mode(v) for v in (True, False, None, "dihedral")] == ["crop", "none", "none", "dihedral"]
    with pytest.raises(UserError, match="unknown augment"):
        augment_mode("rotate")


def test_ranks_get_disjoint_shards(dataset):
    folder, keys = dataset
    urls = list_shards(folder)
    per_rank = []
    for rank in range(2):
        loader = pair_loader(
            urls,
            batch_size=5,
            resolution=16,
            augment=False,
            resampled=False,
            epoch_length=None,
            rank=rank,
            world_size=2,
        )
        per_rank.append({k for batch in loader for k in batch["__key__"]})
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(keys)


def test_workers_split_shards_and_share_stats(dataset):
    folder, keys = dataset
    stats = ReaderStats()
    loader = pair_loader(
        list_shards(folder),
        batch_size=5,
        resolution=16,
        augment=False,
        resampled=False,
        epoch_length=None,
        num_workers=2,
        stats=stats,
    )
    seen = [k for batch in loader for k in batch["__key__"]]
    assert sorted(seen) == sorted(keys)
    assert stats.samples == len(keys)  # counted inside the worker processes


def test_resampled_epoch_length_and_reproducibility(dataset):
    folder, _ = dataset
    urls = list_shards(folder)

    def keys_of(seed, rank):
        loader = pair_loader(
            urls,
            batch_size=3,
            resolution=16,
            resampled=True,
            epoch_length=4,
            seed=seed,
            rank=rank,
            world_size=2,
        )
        assert len(loader) == 4
        batches = list(loader)
        assert len(batches) == 4 and all(len(b["__key__"]) == 3 for b in batches)
        return [k for b in batches for k in b["__key__"]]

    assert keys_of(0, 0) == keys_of(0, 0)
    assert keys_of(0, 0) != keys_of(0, 1)


def test_seeded_shuffle_is_a_reproducible_permutation():
    from p2pz.data.pairs.reader import _EpochState, _Shuffle

    state = _EpochState()

    def order(seed, rank=0, epoch=0):
        state.epoch = epoch
        return list(_Shuffle(16, seed, rank, state)(iter(range(100))))

    assert sorted(order(0)) == list(range(100)) and order(0) != list(range(100))
    assert order(0) == order(0)
    assert order(0) != order(1) and order(0) != order(0, rank=1) and order(0) != order(0, epoch=1)


def test_truncated_shard_is_skipped_and_counted(tmp_path):
    keys = write_pairs(tmp_path, num_shards=3, per_shard=4, size=(64, 64))
    damaged = tmp_path / shard_name(1)
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # a crash mid-write, as with a non-atomic writer
    stats = ReaderStats()
    with pytest.warns(UserWarning):
        loader = pair_loader(
            list_shards(tmp_path),
            batch_size=2,
            resolution=16,
            augment=False,
            resampled=False,
            epoch_length=None,
            stats=stats,
        )
        seen = {k for batch in loader for k in batch["__key__"]}
    good = {k for k in keys if not k.startswith("s001_")}
    assert good <= seen  # the intact shards are read completely
    assert len(seen - good) < 4  # at most the samples before the cut
    assert stats.errors >= 1


def test_bad_arguments():
    with pytest.raises(UserError):
        pair_loader(["a.tar"], resampled=True, epoch_length=None)
    with pytest.raises(UserError):
        pair_loader(["a.tar"], resampled=False, epoch_length=None, rank=0, world_size=2)
