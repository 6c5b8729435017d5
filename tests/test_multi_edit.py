"""One student for many edits: conditioning, training on several edits' shards, the package, ``--edit``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p2pz.cli.main import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
EDITS = {"shapes-to-mirrored": np.fliplr, "shapes-to-negative": lambda a: 255 - a}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_edit_shards(folder: Path, edits: dict, shards_per_edit: int = 2, per_shard: int = 8) -> Path:
    """Shards as ``p2pz generate`` writes them (sample keys ``<edit>_<digest>``, one edit per shard)
    and each edit's direction in ``directions/`` (random mean embeddings, [77, 8])."""
    import webdataset as wds

    from p2pz.data.pairs.shards import direction_file, sample_key, shard_name
    from p2pz.teacher.directions import EditDirection
    from p2pz.teacher.edits import parse_edit

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    index = 0
    for e, (name, edit) in enumerate(edits.items()):
        for _ in range(shards_per_edit):
            with wds.TarWriter(str(folder / shard_name(index))) as sink:
                for i in range(per_shard):
                    src = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                    src[:, :32] = 40  # a structured half, so mirroring is an edit to learn
                    meta = {"edit": {"name": name}}
                    key = sample_key(name, f"img{index}-{i}.png")
                    sink.write(
                        {
                            "__key__": key,
                            "src.png": _png(src),
                            "edit.png": _png(edit(src)),
                            "json": json.dumps(meta),
                        }
                    )
            index += 1
        g = torch.Generator().manual_seed(e)
        src_emb, tgt_emb = torch.randn(77, 8, generator=g), torch.randn(77, 8, generator=g)
        edit_words = parse_edit(name)
        path = direction_file(folder, name)
        path.parent.mkdir(exist_ok=True)
        EditDirection(tgt_emb - src_emb, edit_words.source, edit_words.target, {}, src_emb, tgt_emb).save(
            path
        )
    return folder


@pytest.fixture(scope="module")
def two_edits(tmp_path_factory) -> Path:
    return write_edit_shards(tmp_path_factory.mktemp("two-edits"), EDITS)


@pytest.fixture(scope="module")
def trained(two_edits, tmp_path_factory):
    """A tiny student of both edits (12 iterations, validation at 6 and 12) and its package."""
    from p2pz.cli import train
    from p2pz.student.export import export_package

    run = tmp_path_factory.mktemp("run")
    args = ["--config", TINY, "--data.shards", str(two_edits), "--trainer.default_root_dir", str(run)]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.max_steps", "12"]
    args += ["--trainer.val_check_interval", "6", "--data.val_fraction", "0.5", "--trainer.logger", "false"]
    cli = train.main(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    package = export_package(run / "checkpoints" / "last.ckpt", run / "package", formats=("pt2", "onnx"))
    return cli, package


def test_conditioning_changes_the_output_and_is_required():
    from p2pz.student.networks import Generator

    torch.manual_seed(0)
    g = Generator(64, 3, "lite", channel_base=512, channel_max=16, z_dim=0, dropout=0.0, edit_dim=6).eval()
    vectors = torch.randn(2, 6)
    g.edit_mapping.set_statistics(vectors)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    a, b = g(x, edit=vectors[0]), g(x, edit=vectors[1])
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(g(x, edit=vectors[0].expand(2, -1)), a)
    with pytest.raises(ValueError, match="many edits"):
        g(x)
    with pytest.raises(ValueError, match="one edit"):
        Generator(64, 3, "lite", channel_base=512, channel_max=16)(x, edit=vectors[0])


def test_the_conditioning_is_the_pooled_source_and_target_embeddings(two_edits):
    from p2pz.student.conditioning import conditioning_from_shards, edits_of_shards

    groups = edits_of_shards([str(p) for p in sorted(two_edits.glob("*.tar"))])
    assert list(groups) == list(EDITS) and [len(v) for v in groups.values()] == [2, 2]
    vectors = conditioning_from_shards(str(two_edits))
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(77, 8, generator=g), torch.randn(77, 8, generator=g)
    expected = torch.cat([src.mean(0), tgt.mean(0)])
    torch.testing.assert_close(torch.tensor(vectors["shapes-to-mirrored"]), expected, atol=1e-6, rtol=0)


def test_one_edit_shards_train_todays_per_edit_student(tmp_path):
    from p2pz.student.conditioning import conditioning_from_shards
    from p2pz.student.datamodule import split_shards
    from p2pz.student.networks import Generator

    one = write_edit_shards(tmp_path / "one", {"shapes-to-mirrored": np.fliplr}, shards_per_edit=3)
    assert conditioning_from_shards(str(one)) is None
    train, val = split_shards(str(one), val_fraction=0.05)
    assert [Path(u).name for u in val] == ["pairs-000002.tar"] and len(train) == 2
    # the per-edit generator's weights: the same names, shapes and values (same seed) as before
    torch.manual_seed(0)
    today = Generator(64, 3, "lite", channel_base=512, channel_max=16)
    assert today.edit_mapping is None and not any("edit" in k for k in today.state_dict())


def _fit_weights(shards: Path, run: Path) -> dict:
    from p2pz.cli import train

    args = ["--config", TINY, "--data.shards", str(shards), "--trainer.default_root_dir", str(run)]
    args += [
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.max_steps",
        "3",
        "--trainer.logger",
        "false",
    ]
    cli = train.main(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.hparams.edits is None and cli.datamodule.edit_groups is None
    return {k: v.clone() for k, v in cli.model.g_ema.state_dict().items()}


def test_a_damaged_shard_among_many_edits_stays_in_the_training_split(tmp_path):
    from p2pz.data.pairs.reader import rank_share
    from p2pz.student.datamodule import PairDataModule, split_shards

    many = write_edit_shards(tmp_path / "many", EDITS, shards_per_edit=3)
    before, _ = split_shards(str(many))
    damaged = rank_share(before, 1, 2)[0]
    Path(damaged).write_bytes(b"not a tar archive\n" * 64)
    train, val = split_shards(str(many))
    # the rank whose share it is still finds it there (and stops every rank when all of its share is damaged)
    assert train == before and damaged in rank_share(train, 1, 2) and damaged not in val
    # balanced draws never pick it: training says so
    data = PairDataModule(str(many))
    left_out = r"1 training shard\(s\) cannot be read and are left out: .*" + Path(damaged).name
    with pytest.warns(UserWarning, match=left_out):
        data.setup()
    assert damaged not in {u for group in data.edit_groups for u in group}


def test_one_edit_trains_bit_for_bit_as_shards_without_edit_names(tmp_path):
    """Shards of one edit whose keys name it train exactly as shards whose keys do not (the
    pre-multi-edit data path): the edit-aware reading changes nothing for a per-edit student."""
    import shutil
    import tarfile

    named = write_edit_shards(tmp_path / "named", {"shapes-to-mirrored": np.fliplr}, shards_per_edit=3)
    plain = tmp_path / "plain"
    plain.mkdir()
    for shard in sorted(named.glob("*.tar")):  # the same samples, keys without the edit's name
        with tarfile.open(shard) as src, tarfile.open(plain / shard.name, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                member.name = member.name.replace("shapes-to-mirrored_", "k")
                dst.addfile(member, io.BytesIO(data))
    shutil.copytree(named / "directions", plain / "directions")
    a, b = _fit_weights(named, tmp_path / "a"), _fit_weights(plain, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_balances_edits_and_scores_each_one(trained, two_edits):
    cli, _ = trained
    module, data = cli.model, cli.datamodule
    assert module.edit_names == list(EDITS) and module.G.edit_dim == 16
    assert [[Path(u).name for u in g] for g in data.edit_groups] == [
        ["pairs-000000.tar"],
        ["pairs-000002.tar"],
    ]
    assert [[Path(u).name for u in g] for g in data.val_edit_groups] == [
        ["pairs-000001.tar"],
        ["pairs-000003.tar"],
    ]
    metrics = cli.trainer.callback_metrics
    for name in EDITS:
        assert torch.isfinite(metrics[f"val/psnr_to_teacher/{name}"])
    assert "val/psnr_to_teacher" in metrics


def test_balanced_draws_read_every_edit_as_often(tmp_path):
    from p2pz.data.pairs.reader import _EpochState, _ShardSource

    urls = [f"a{i}" for i in range(9)] + ["b0"]
    source = _ShardSource(urls, True, 0, 0, _EpochState(), groups=[urls[:9], urls[9:]])
    draws = [d["url"] for _, d in zip(range(2000), source)]
    assert 0.45 < sum(u == "b0" for u in draws) / len(draws) < 0.55


def test_a_multi_edit_package_round_trips_through_export_and_from_pretrained(trained):
    from p2pz import Student
    from p2pz.student.export import load_exported

    cli, package = trained
    config = json.loads((package / "config.json").read_text())
    assert list(config["edits"]) == list(EDITS)
    assert config["edits"]["shapes-to-mirrored"]["target"] == "mirrored"
    from huggingface_hub import ModelCard

    card = ModelCard.load(package / "README.md")
    assert card.data.library_name == "p2pz" and "one student for 2 edits" in card.text
    assert 'student.edit_vector("shapes:mirrored")' in card.text and "--edit shapes:mirrored" in card.text
    student = Student.from_pretrained(str(package))
    assert student.edits == list(EDITS)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    for name in EDITS:
        edit = student.edit_vector(name)
        expected = cli.model.g_ema.eval()(x, edit=edit)
        torch.testing.assert_close(student(x, edit=edit), expected)
        for backend in ("onnx", "pt2"):
            model = load_exported(package, backend, trust_pt2=True, edit=edit)
            torch.testing.assert_close(model(x), expected, atol=2e-4, rtol=0)
    a, b = (student(x, edit=student.edit_vector(n)) for n in EDITS)
    assert (a - b).abs().max() > 0


def _one_image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(path)
    return path


def test_apply_picks_an_edit_and_refuses_an_unknown_one_in_one_line(trained, tmp_path, capsys):
    _, package = trained
    image = _one_image(tmp_path)
    out = tmp_path / "out"
    assert main(["apply", str(package), str(image), "--out", str(out), "--edit", "shapes:negative"]) == 0
    assert (out / "in.png").is_file()
    capsys.readouterr()
    for extra in (["--edit", "circle:square"], []):
        rc = main(["apply", str(package), str(image), "--out", str(tmp_path / "o2"), *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "shapes:mirrored, shapes:negative" in err
        assert not (tmp_path / "o2").exists()


def test_the_app_lists_a_multi_edit_package_once_per_edit(trained):
    from p2pz.cli.app_models import load_students

    _, package = trained
    students = load_students([package], "cpu", torch.float32)
    assert [s.edit for s in students.values()] == ["shapes:mirrored", "shapes:negative"]
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    a, b = (s.model(x) for s in students.values())
    assert (a - b).abs().max() > 0


def test_shards_of_many_edits_without_their_directions_stop_training_in_one_line(two_edits, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(two_edits, bare, ignore=shutil.ignore_patterns("directions"))
    args = [
        "train",
        "fit",
        "--config",
        TINY,
        "--data.shards",
        str(bare),
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "direction" in err and "shapes-to-mirrored" in err
