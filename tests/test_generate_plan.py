"""The generate job's machinery without a teacher: work plan, task split, seeds, crash-safe shard
writing, dataset identity, manifests, input checks and settings (YAML config and flags)."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from p2pz.cli.pairs import generate_parser, parse_generate_args
from p2pz.data.pairs import shards as sh
from p2pz.data.pairs.inputs import FolderInputs, InputSkipped, check_image
from p2pz.data.pairs.settings import Settings
from p2pz.utils.errors import UserError


def _plan(ids=None, sps=3, seed=0):
    ids = ids if ids is not None else [f"img{i:03d}.png" for i in range(10)]
    return sh.plan_shards({"cat-to-dog": ids, "circle-to-square": ids[:4]}, sps, seed)


def test_plan_layout_keys_and_seeds():
    plans = _plan()
    assert [len(p.items) for p in plans] == [3, 3, 3, 1, 3, 1]  # shards never mix edits
    assert [p.edit for p in plans] == ["cat-to-dog"] * 4 + ["circle-to-square"] * 2
    assert [p.index for p in plans] == list(range(6))
    items = [item for p in plans for item in p.items]
    assert len({i.key for i in items}) == len(items)
    assert all("." not in i.key for i in items)
    # Same item, same key and seed, whatever the shard size; another global seed changes the seeds only.
    by_id = {(i.edit, i.input_id): i for i in items}
    for other in _plan(sps=7):
        for item in other.items:
            assert by_id[(item.edit, item.input_id)] == item
    reseeded = {(i.edit, i.input_id): i for p in _plan(seed=1) for i in p.items}
    assert all(reseeded[k].key == v.key and reseeded[k].seed != v.seed for k, v in by_id.items())


def test_task_split_is_a_partition():
    plans = _plan()
    for num_tasks in (1, 2, 3, 4, 7):
        owned = [sh.task_shards(plans, t, num_tasks) for t in range(num_tasks)]
        indices = sorted(p.index for share in owned for p in share)
        assert indices == list(range(len(plans)))
    with pytest.raises(ValueError):
        sh.task_shards(plans, 3, 3)


def test_shared_edits_plan_groups_and_seeds():
    """Edits sharing their inputs: one seed per input (not per pair), shards still per edit, the j-th
    shards of the edits form a group, and a task owns whole groups (round robin over groups)."""
    ids = [f"img{i:03d}.png" for i in range(10)]
    inputs = {"cat-to-dog": ids, "cat-to-lion": ids, "circle-to-square": ids[:4]}
    share = {"cat-to-dog": "inputs", "cat-to-lion": "inputs", "circle-to-square": None}
    plans = sh.plan_shards(inputs, 3, 0, share=share)
    unshared = sh.plan_shards(inputs, 3, 0)
    assert [(p.index, p.edit, p.items) for p in plans][8:] == [(p.index, p.edit, p.items) for p in unshared][
        8:
    ]
    assert [p.edit for p in plans] == ["cat-to-dog"] * 4 + ["cat-to-lion"] * 4 + ["circle-to-square"] * 2
    assert [p.group_id for p in plans] == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert [[p.index for p in g] for g in sh.shard_groups(plans)] == [
        [0, 4],
        [1, 5],
        [2, 6],
        [3, 7],
        [8],
        [9],
    ]
    dog, lion = plans[1], plans[5]
    assert [i.input_id for i in dog.items] == [i.input_id for i in lion.items]
    assert [i.seed for i in dog.items] == [i.seed for i in lion.items]  # the input's seed
    assert [i.seed for i in dog.items] != [i.seed for i in unshared[1].items]
    assert len({i.key for p in plans for i in p.items}) == 24  # keys stay per pair
    for num_tasks in (1, 2, 3, 4):
        owned = [sh.task_shards(plans, t, num_tasks) for t in range(num_tasks)]
        assert sorted(p.index for share_ in owned for p in share_) == list(range(10))
        for share_ in owned:  # a group never straddles two tasks
            groups = {p.group_id for p in share_}
            assert {p.index for p in plans if p.group_id in groups} == {p.index for p in share_}
    # one edit alone (or sharing switched off) is the plan of before: groups are the shards
    alone = sh.plan_shards({"cat-to-dog": ids}, 3, 0, share={"cat-to-dog": "inputs"})
    assert alone == sh.plan_shards({"cat-to-dog": ids}, 3, 0)
    assert all(p.group_id == p.index for p in alone)


def test_yaml_lists_several_edits_and_sharing(tmp_path):
    config = tmp_path / "gen.yaml"
    config.write_text(
        'model: m\nout: o\ninputs: i\nedits:\n  - cat:dog\n  - cat:lion\n  - "cat:cat wearing a hat"\n'
        "share-inversion: false\n"
    )
    s = parse_generate_args(["--config", str(config)], environ={})
    assert s.edit == ["cat:dog", "cat:lion", "cat:cat wearing a hat"] and s.share_inversion is False
    s = parse_generate_args(["--config", str(config), "--share-inversion"], environ={})
    assert s.share_inversion is True
    assert Settings().share_inversion is True  # the default: edits of the same inputs share


def test_tasks_from_slurm_env():
    assert sh.tasks_from_env({}) is None
    assert sh.tasks_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}
    assert sh.tasks_from_env(env) == (2, 4)


def test_atomic_shard_appears_only_when_complete(tmp_path):
    with pytest.raises(RuntimeError), sh.atomic_shard(tmp_path, 5) as shard:
        shard.write({"__key__": "a", "txt": "x"})
        assert shard.tmp.exists() and not shard.final.exists()
        assert sh.finished_shards(tmp_path) == set()
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with sh.atomic_shard(tmp_path, 5) as shard:
        shard.write({"__key__": "a", "txt": "x"})
        shard.write({"__key__": "b", "txt": "y"})
    assert sh.finished_shards(tmp_path) == {5}
    with tarfile.open(tmp_path / "pairs-000005.tar") as tar:
        assert tar.getnames() == ["a.txt", "b.txt"]
    with pytest.raises(ValueError), sh.atomic_shard(tmp_path, 6) as shard:
        shard.write({"__key__": "has.dot", "txt": "x"})


def test_stale_temps_removed_only_for_own_shards(tmp_path):
    for index in (1, 2):
        (tmp_path / f".{sh.shard_name(index)}.999.tmp").write_bytes(b"partial")
    assert sh.remove_stale_temps(tmp_path, [1]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f".{sh.shard_name(2)}.999.tmp"]


def test_dataset_identity_guards_the_folder(tmp_path):
    sh.check_dataset_identity(tmp_path, {"seed": 0, "edits": ("a",)})
    sh.check_dataset_identity(tmp_path, {"seed": 0, "edits": ["a"]})  # same settings: resume is fine
    with pytest.raises(UserError, match="seed"):
        sh.check_dataset_identity(tmp_path, {"seed": 1, "edits": ["a"]})


def test_manifest_survives_a_torn_line(tmp_path):
    manifest = sh.Manifest(tmp_path, 1, 3)
    manifest.append({"event": "shard", "index": 4, "samples": 2})
    with open(manifest.path, "a") as f:
        f.write('{"event": "shard", "ind')  # killed mid-write
    manifest.append({"event": "shard", "index": 4, "samples": 3})
    records = sh.read_manifests(tmp_path)
    assert len(records) == 2
    assert sh.latest_shard_records(records)[4]["samples"] == 3
    assert manifest.path.name == "manifest-00001-of-00003.jsonl"


def _encode(image: Image.Image, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _rgb(size=80):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"hello, not an image", "not an image"),
        (_encode(_rgb())[:300], "corrupt image"),
        (_encode(_rgb(20)), "too small"),
        (_encode(_rgb().convert("CMYK"), "JPEG"), "CMYK"),
        (_encode(Image.fromarray(np.full((80, 80), 40000, np.uint16))), "16-bit"),
        (_encode(_rgb().convert("RGBA")), "transparency"),
    ],
)
def test_bad_images_are_refused_with_a_reason(data, reason):
    with pytest.raises(InputSkipped, match=reason):
        check_image(data, min_size=64, convert_modes=False)


def test_convert_modes_rule():
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:40, :, 3] = 255  # top opaque red, bottom transparent
    out = np.asarray(check_image(_encode(Image.fromarray(rgba)), min_size=64, convert_modes=True))
    assert out.shape == (80, 80, 3)
    assert (out[:40] == [255, 0, 0]).all() and (out[40:] == 255).all()  # alpha over white
    deep = check_image(
        _encode(Image.fromarray(np.full((80, 80), 65535, np.uint16))), min_size=64, convert_modes=True
    )
    assert deep.mode == "RGB" and np.asarray(deep).min() == 255
    cmyk = check_image(_encode(_rgb().convert("CMYK"), "JPEG"), min_size=64, convert_modes=True)
    assert cmyk.mode == "RGB"


def test_folder_listing(tmp_path):
    (tmp_path / "sub").mkdir()
    _rgb().save(tmp_path / "sub" / "b.png")
    _rgb().save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a cat on a couch")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "notes.md").write_text("not an image")
    inputs = FolderInputs(tmp_path, min_size=64, convert_modes=False)
    assert inputs.ids("cat") == ["a.jpg", "notes.md", "sub/b.png"]
    assert inputs.load("a.jpg").caption == "a cat on a couch"
    with pytest.raises(InputSkipped, match="not an image"):
        inputs.load("notes.md")


CONFIG = (
    "model: tiny-model\nedits: [cat:dog, circle:square]\ninputs: photos\nout: pairs\n"
    "samples-per-shard: 10\nbatch_size: 2\nsave_latent: true\n"
)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text(CONFIG)
    return str(path)


def test_settings_config_then_flags(config):
    s = parse_generate_args(["--config", config, "--batch-size", "8", "--no-save-recon"], environ={})
    assert (s.model, s.edit, s.samples_per_shard, s.batch_size) == (
        "tiny-model",
        ["cat:dog", "circle:square"],
        10,
        8,
    )
    assert s.save_latent and not s.save_recon
    assert (s.task_index, s.num_tasks) == (0, 1)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8"}
    s = parse_generate_args(["--config", config], environ=env)
    assert (s.task_index, s.num_tasks) == (5, 8)
    s = parse_generate_args(["--config", config, "--task-index", "1", "--num-tasks", "2"], environ=env)
    assert (s.task_index, s.num_tasks) == (1, 2)


def test_flags_override_the_config_wherever_it_stands(config):
    s = parse_generate_args(["--steps", "5", "--batch-size=3", f"--config={config}"], environ={})
    assert (s.steps, s.batch_size, s.samples_per_shard) == (5, 3, 10)
    # a repeatable flag replaces the config's list on its first use and adds to it afterwards
    s = parse_generate_args(["--config", config, "--edit", "red:blue", "--edit", "a:b"], environ={})
    assert s.edit == ["red:blue", "a:b"]
    s = parse_generate_args(["--config", config, "--direction", "d.safetensors"], environ={})
    assert s.direction == ["d.safetensors"] and s.edit == ["cat:dog", "circle:square"]


def test_settings_from_flags_only_are_the_dataclass():
    argv = ["--model=m", "--out=o", "--inputs=i", "--edit=cat:dog", "--guidance-scale", "3"]
    s = parse_generate_args(argv, environ={})
    expected = Settings(model="m", out="o", inputs="i", edit=["cat:dog"], guidance_scale=3.0)
    assert s == dataclasses.replace(expected, task_index=0, num_tasks=1)
    assert isinstance(s.guidance_scale, float)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: m\nout: o\ninputs: i\nedit: [catdog]\n", "SOURCE:TARGET"),
        ("model: m\nout: o\nedit: [cat:dog]\n", "--inputs"),
        ("model: m\nout: o\ninputs: i\nedit: [cat:dog]\nbatch_size: two\n", "--batch-size .*integer"),
        ("model: m\nout: o\ninputs: i\nedit: [cat:dog]\nwhatever: 1\n", "unknown setting 'whatever'"),
        ("model: m\nout: o\ninputs: i\nedit: [cat:dog]\ntask_index: 3\nnum_tasks: 3\n", "task-index"),
        ("model: m\nout: o\ninputs: i\nedit: [1, 2]\n", "--edit .*list of texts"),
        ("- model\n", "mapping"),
        ("model: [\n", "not valid YAML"),
    ],
)
def test_settings_errors(tmp_path, text, message):
    config = tmp_path / "gen.yaml"
    config.write_text(text)
    with pytest.raises(UserError, match=message) as caught:
        parse_generate_args(["--config", str(config)], environ={})
    assert "\n" not in str(caught.value)  # one line


def test_generate_command_errors_are_one_line(config, capsys):
    from p2pz.cli.main import main

    assert main(["generate", "--config", config, "--steps", "0"]) == 2
    assert capsys.readouterr().err == "error: argument --steps: must be >= 1, got 0\n"
    assert main(["generate", "--config", config, "--whatever", "1"]) == 2
    assert "unrecognized arguments: --whatever" in capsys.readouterr().err
    assert main(["generate", "--config", config + ".missing"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_help_names_every_setting():
    text = generate_parser().format_help()
    for f in dataclasses.fields(Settings):
        assert f"--{f.name.replace('_', '-')}" in text
    assert "--no-save-recon" in text and "--config" in text
    assert "pairs per output shard" in text  # help from the dataclass's docstring


def test_plan_json_roundtrip():
    # dataset.json holds plain JSON: tuples from the plan must not make a resume look different
    plan = _plan()
    assert json.loads(json.dumps([p.index for p in plan])) == list(range(6))


def test_shard_inputs(tmp_path):
    from p2pz.data.pairs.inputs import ShardInputs

    good = _encode(_rgb())
    with sh.atomic_shard(tmp_path, 0) as shard:
        shard.write({"__key__": "a", "jpg": good, "txt": "a cat"})
        shard.write({"__key__": "b", "png": b"broken"})
        shard.write({"__key__": "c", "json": {"no": "image"}})
        shard.write({"__key__": "d", "edit.png": _encode(_rgb(64)), "src.png": good})  # a pairs dataset
    inputs = ShardInputs([str(tmp_path / sh.shard_name(0))], min_size=64, convert_modes=False)
    assert inputs.ids("cat") == [
        "pairs-000000.tar/a",
        "pairs-000000.tar/b",
        "pairs-000000.tar/c",
        "pairs-000000.tar/d",
    ]
    loaded = inputs.load("pairs-000000.tar/a")
    assert loaded.caption == "a cat" and np.array_equal(np.asarray(loaded.image), np.asarray(_rgb()))
    with pytest.raises(InputSkipped, match="not an image"):
        inputs.load("pairs-000000.tar/b")
    with pytest.raises(InputSkipped, match="no image"):
        inputs.load("pairs-000000.tar/c")
    assert inputs.load("pairs-000000.tar/d").image.size == (80, 80)  # src.png, not edit.png


def test_progress_bar_shows_pairs_per_hour_and_unet_evaluations():
    import types

    import torch
    from tqdm import tqdm

    from p2pz.data.pairs.throughput import Throughput
    from p2pz.teacher.evals import UNetEvals, unet_stage

    module = torch.nn.Linear(2, 2)  # any module whose first argument is the batch
    teacher = types.SimpleNamespace(unet_evals=UNetEvals(module))
    bar = tqdm(total=10, file=io.StringIO())
    progress = Throughput(bar, teacher)
    with unet_stage("reference"):
        module(torch.zeros(6, 2))
    x = torch.zeros(4, 2, requires_grad=True)
    with unet_stage("guidance"):
        module(x).sum().backward()
    progress.made(2)
    progress.update(2)
    assert "pairs/h" in bar.postfix and "UNet evals/pair 5 fwd + 2 bwd" in bar.postfix
    assert progress.evals_per_pair()["by_stage"]["guidance"] == {"forward": 2.0, "backward": 2.0}
