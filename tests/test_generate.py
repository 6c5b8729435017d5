"""``p2pz generate`` on the tiny teacher: round trip, kill -9 and resume, cluster split, bad inputs.

One uninterrupted single-task run is the reference; the resumed and the split runs must reproduce
its samples exactly (same keys, same image bytes). Steps and image sizes are tiny so the teacher is
fast; the same teacher object is shared by the in-process runs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from p2pz.data.pairs import sample as fmt
from p2pz.data.pairs import shards as sh
from p2pz.data.pairs.generate import Settings, load_teacher, run
from p2pz.data.pairs.reader import ReaderStats, list_shards, pair_loader
from p2pz.utils.errors import UserError

STEPS = 3
GOOD = 4  # usable images; 6 bad files are mixed in
SAMPLES_PER_SHARD = 4  # 10 inputs -> 3 shards


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _smooth(rng, size) -> Image.Image:
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BICUBIC)


# Inputs in listing order, cut into shards of 4: shard 0 = one good image and three bad ones,
# shard 1 = [good, good, cmyk, good] (edited as a batch of 2, then 1: the kill test strikes between
# the two), shard 2 = the last two bad kinds only (a shard with no samples).
LAYOUT = ["good", "corrupt", "notimage", "small", "good", "good", "cmyk", "good", "16bit", "alpha"]
BAD_REASONS = {
    "corrupt": "corrupt",
    "notimage": "not an image",
    "cmyk": "CMYK",
    "16bit": "16-bit",
    "small": "too small",
    "alpha": "transparency",
}


@pytest.fixture(scope="module")
def inputs_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for i, kind in enumerate(LAYOUT):
        name = f"in{i:02d}-{kind}"
        if kind == "good":
            _smooth(rng, (64 + 8 * (i % 2), 64)).save(folder / f"{name}.png")
        elif kind == "corrupt":
            (folder / f"{name}.png").write_bytes(_png(_smooth(rng, (64, 64)))[:200])
        elif kind == "notimage":
            (folder / f"{name}.jpg").write_bytes(b"this is text, not a JPEG")
        elif kind == "cmyk":
            (folder / f"{name}.jpg").write_bytes(_png(_smooth(rng, (64, 64)).convert("CMYK"), "JPEG"))
        elif kind == "16bit":
            Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(folder / f"{name}.png")
        elif kind == "small":
            _smooth(rng, (16, 16)).save(folder / f"{name}.png")
        elif kind == "alpha":
            _smooth(rng, (64, 64)).convert("RGBA").save(folder / f"{name}.png")
    # Caption sidecars (not inputs) save the captioner's time; in04 is left to the captioner.
    for i in (0, 5, 7):
        (folder / f"in{i:02d}-good.txt").write_text("a photo of a cat")
    return folder


def _settings(model: Path, inputs: Path, out: Path, **overrides) -> Settings:
    values = dict(
        model=str(model),
        edit=["cat:dog"],
        inputs=str(inputs),
        out=str(out),
        samples_per_shard=SAMPLES_PER_SHARD,
        batch_size=2,
        steps=STEPS,
        seed=3,
        num_sentences=4,  # sentences per concept for the direction (the default bank is slow on a CPU)
        device="cpu",
        dtype="float32",
        save_latent=True,
        progress=False,
        task_index=0,
        num_tasks=1,
    )
    values.update(overrides)
    return Settings(**values)


def _argv(s: Settings) -> list[str]:
    """The same run as command-line flags."""
    names = ("model", "inputs", "out", "samples_per_shard", "batch_size", "steps", "seed", "num_sentences",
             "device", "dtype")  # fmt: skip
    argv = [f"--{name.replace('_', '-')}={getattr(s, name)}" for name in names]
    return argv + [f"--edit={edit}" for edit in s.edit] + ["--save-latent", "--no-progress"]


def read_dataset(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member: bytes} over all finished shards (json left out: it holds timings)."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob(sh.SHARD_GLOB)):
        for raw in fmt.iter_shard(path, read=lambda member: member != fmt.META):
            assert raw[fmt.KEY] not in samples
            samples[raw[fmt.KEY]] = {
                m: data for m, data in raw.items() if not m.startswith("__") and m != fmt.META
            }
    return samples


def read_metas(folder: Path) -> list[dict]:
    return [
        fmt.decode_meta(raw[fmt.META])
        for path in sorted(folder.glob(sh.SHARD_GLOB))
        for raw in fmt.iter_shard(path, read=lambda member: member == fmt.META)
    ]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_teacher(_settings(tiny_model_dir, Path("."), Path(".")))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, inputs_dir, teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run(_settings(tiny_model_dir, inputs_dir, out), teacher=teacher)
    return out


def test_round_trip(reference, teacher):
    samples = read_dataset(reference)
    assert len(samples) == GOOD
    assert sorted(p.name for p in reference.glob("pairs-*.tar")) == [sh.shard_name(i) for i in range(3)]
    assert not list(reference.glob(".*.tmp"))
    for key, members in samples.items():
        assert "." not in key
        assert set(members) == {"src.png", "edit.png", "recon.png", "latent.npy"}
        src = Image.open(io.BytesIO(members["src.png"]))
        edit = Image.open(io.BytesIO(members["edit.png"]))
        assert src.mode == edit.mode == "RGB" and src.size == edit.size
        latent = np.load(io.BytesIO(members["latent.npy"]))
        assert latent.ndim >= 3 and np.isfinite(latent).all()

    # metadata: caption, edit, seeds, every teacher setting, fingerprint, timings
    meta = fmt.first_meta(reference / sh.shard_name(0))
    assert meta["edit"] == {"name": "cat-to-dog", "source": "cat", "target": "dog"}
    assert meta["teacher"]["fingerprint"] == teacher.fingerprint
    assert meta["teacher"]["settings"] == json.loads(json.dumps(teacher.settings))
    assert meta["teacher"]["overrides"]["num_steps"] == STEPS
    assert isinstance(meta["seed"], int) and meta["global_seed"] == 3
    assert isinstance(meta["caption"], str) and meta["timings"]
    assert meta["input"] == {"kind": "folder", "id": "in00-good.png"}
    assert meta["caption"] == "a photo of a cat"  # from the sidecar file

    # the reader gets the same pairs back
    stats = ReaderStats()
    loader = pair_loader(
        list_shards(reference),
        batch_size=4,
        resolution=32,
        augment=False,
        resampled=False,
        epoch_length=None,
        stats=stats,
    )
    keys = [k for batch in loader for k in batch["__key__"]]
    assert sorted(keys) == sorted(samples) and stats.errors == 0


def test_bad_inputs_skipped_and_reported(reference):
    records = sh.read_manifests(reference)
    skipped = {
        s["input"]: s["reason"] for r in sh.latest_shard_records(records).values() for s in r["skipped"]
    }
    expected = {i: kind for i, kind in enumerate(LAYOUT) if kind != "good"}
    assert len(skipped) == len(expected) == 6
    for i, kind in expected.items():
        (reason,) = [why for name, why in skipped.items() if name.startswith(f"in{i:02d}-")]
        assert BAD_REASONS[kind] in reason
    # the fixture's own run: test_rerun_is_a_no_op may have appended its (empty) run's record since
    done = [r for r in records if r["event"] == "done"][0]
    assert done["samples_written"] == GOOD and done["skipped"] == 6
    assert done["pairs_per_hour"] > 0


def test_rerun_is_a_no_op(reference, tiny_model_dir, inputs_dir, teacher):
    before = {p.name: p.stat().st_mtime_ns for p in reference.glob("pairs-*.tar")}
    done = run(_settings(tiny_model_dir, inputs_dir, reference), teacher=teacher)
    assert done["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in reference.glob("pairs-*.tar")} == before


def test_each_edits_direction_is_kept_and_a_rerun_restores_a_missing_one(
    multi, tiny_model_dir, inputs_dir, teacher
):
    import torch

    from p2pz.data.pairs.shards import direction_file
    from p2pz.student.conditioning import edits_of_shards, load_edit_conditioning
    from p2pz.teacher.directions import EditDirection
    from p2pz.teacher.edits import parse_edit

    names = [parse_edit(e).name for e in EDITS]
    urls = sorted(str(p) for p in multi.glob("pairs-*.tar"))
    assert list(edits_of_shards(urls)) == names  # each shard's edit, read from its first key
    for name in names:
        kept = EditDirection.load(direction_file(multi, name))
        assert kept.source_embedding is not None and kept.target_embedding is not None
        torch.testing.assert_close(kept.tensor, kept.target_embedding - kept.source_embedding)
    vectors = load_edit_conditioning(urls)
    assert list(vectors) == names and vectors[names[0]] != vectors[names[1]]
    lost = direction_file(multi, names[1])
    before = EditDirection.load(lost)
    lost.unlink()
    run(_settings(tiny_model_dir, inputs_dir, multi, edit=EDITS), teacher=teacher)
    torch.testing.assert_close(EditDirection.load(lost).target_embedding, before.target_embedding)


def test_split_over_three_tasks_equals_one_task(reference, tiny_model_dir, inputs_dir, teacher, tmp_path):
    for task in range(3):
        run(_settings(tiny_model_dir, inputs_dir, tmp_path, task_index=task, num_tasks=3), teacher=teacher)
    assert read_dataset(tmp_path) == read_dataset(reference)
    assert len(list(tmp_path.glob("manifest-*-of-00003.jsonl"))) == 3


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed or removed meanwhile
        return 0


@pytest.mark.parametrize("shared", [False, True], ids=["one-edit", "two-edits-shared"])
def test_kill_and_resume_gives_the_same_samples(
    shared, reference, tiny_model_dir, inputs_dir, teacher, tmp_path, request
):
    expected = request.getfixturevalue("multi") if shared else reference
    settings = _settings(tiny_model_dir, inputs_dir, tmp_path, **({"edit": EDITS} if shared else {}))
    log = tmp_path.parent / f"{tmp_path.name}-stderr.txt"  # a file, not a pipe that could fill up
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pz", "generate", *_argv(settings)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    # Kill it mid-shard: shard 0 finished, shard 1 holds its first batch and waits for the teacher.
    # Two shared edits: shards 0 and 3 (the first group) finished, 1 and 4 (the second) under way.
    deadline = time.monotonic() + 240
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.glob(".pairs-000001.tar.*.tmp") if _size(p) > 0]
        if (tmp_path / sh.shard_name(0)).exists() and partial:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed, f"the job ended before it could be killed: {log.read_text()[-2000:]}"
    torn = list(tmp_path.glob(".pairs-000001.tar.*.tmp"))
    assert torn and not (tmp_path / sh.shard_name(1)).exists()  # the torn shard is only a temp file
    if shared:
        assert (tmp_path / sh.shard_name(3)).exists() and not (tmp_path / sh.shard_name(4)).exists()

    done = run(settings, teacher=teacher)
    # shard 0 kept, shard 1 redone, shard 2 done (two edits: and their partners 3, 4, 5)
    assert done["shards_written"] == (4 if shared else 2)
    assert not list(tmp_path.glob(".*.tmp"))
    assert read_dataset(tmp_path) == read_dataset(expected)


# -------------------------------------------------------------------------------------------------
# Several edits of the same inputs: one inversion and reference pass per input, shards per edit

EDITS = ["cat:dog", "cat:lion"]


@pytest.fixture(scope="module")
def multi(tiny_model_dir, inputs_dir, teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi")
    run(_settings(tiny_model_dir, inputs_dir, out, edit=EDITS), teacher=teacher)
    return out


def test_shared_edits_shards_per_edit_settings_and_evaluations(multi, reference, teacher, inputs_dir):
    metas = read_metas(multi)
    assert len(metas) == 2 * GOOD
    edits_of_shard: dict[int, set] = {}
    for m in metas:
        edits_of_shard.setdefault(m["shard"], set()).add(m["edit"]["name"])
    assert all(len(names) == 1 for names in edits_of_shard.values())  # shards stay per edit
    assert sorted(p.name for p in multi.glob("pairs-*.tar")) == [sh.shard_name(i) for i in range(6)]
    by_input: dict[str, dict[str, dict]] = {}
    for m in metas:  # every sample records its full settings, and what it shares
        assert m["teacher"]["settings"] == json.loads(json.dumps(teacher.settings))
        assert m["teacher"]["overrides"]["num_steps"] == STEPS and m["global_seed"] == 3
        assert m["shared_inversion"] == {"edits": ["cat-to-dog", "cat-to-lion"]}
        by_input.setdefault(m["input"]["id"], {})[m["edit"]["name"]] = m
    samples = read_dataset(multi)
    for pair in by_input.values():
        dog, lion = pair["cat-to-dog"], pair["cat-to-lion"]
        assert dog["seed"] == lion["seed"] and dog["caption"] == lion["caption"]
        a, b = samples[dog["key"]], samples[lion["key"]]
        assert a["src.png"] == b["src.png"] and a["recon.png"] == b["recon.png"]  # one reference pass
        assert a["latent.npy"] == b["latent.npy"] and a["edit.png"] != b["edit.png"]

    # Each shard holds its own edit's result: the teacher alone on that input, seed and direction
    # gives the same image (to the rounding of another batch composition).
    m = by_input["in05-good.png"]["cat-to-lion"]
    direction = teacher.direction("cat", "lion", num_sentences=4, seed=3)
    [alone] = teacher.edit(
        [Image.open(inputs_dir / "in05-good.png")], [direction], [m["caption"]], [m["seed"]], num_steps=STEPS
    )
    edited = np.asarray(Image.open(io.BytesIO(samples[m["key"]]["edit.png"])), np.int16)
    assert np.abs(edited - np.asarray(alone.edited, np.int16)).max() <= 2

    # The manifest counts the UNet's work: the two edits share inversion and reference pass.
    records = sh.read_manifests(multi)
    shard_records = sh.latest_shard_records(records)
    assert shard_records[1]["group"] == shard_records[4]["group"] == [1, 4]
    ours = [r for r in records if r["event"] == "done"][0]["unet_evals_per_pair"]
    alone_run = [r for r in sh.read_manifests(reference) if r["event"] == "done"][0]["unet_evals_per_pair"]
    for stage in ("inversion", "reference"):
        assert ours["by_stage"][stage]["forward"] == alone_run["by_stage"][stage]["forward"] / 2
    for stage in ("guidance", "prediction"):
        assert ours["by_stage"][stage] == alone_run["by_stage"][stage]
    assert ours["forward"] < alone_run["forward"] and ours["backward"] == alone_run["backward"] == 2 * STEPS
    assert shard_records[0]["unet_evals_per_pair"]["forward"] > 0


def test_shared_edits_split_over_three_tasks_equals_one_task(
    multi, tiny_model_dir, inputs_dir, teacher, tmp_path
):
    for task in range(3):
        settings = _settings(tiny_model_dir, inputs_dir, tmp_path, edit=EDITS, task_index=task, num_tasks=3)
        run(settings, teacher=teacher)
    assert read_dataset(tmp_path) == read_dataset(multi)
    owned = {
        r["task_index"]: r["shards_written"] for r in sh.read_manifests(tmp_path) if r["event"] == "done"
    }
    assert owned == {0: 2, 1: 2, 2: 2}  # a group (both edits' shards of an input run) per task


def test_shared_edits_resume_a_half_finished_group(multi, tiny_model_dir, inputs_dir, teacher, tmp_path):
    """A kill between the renames of a group's shards: the rerun makes the group again and writes the
    missing shard only, with the bytes of an uninterrupted run."""
    out = tmp_path / "out"
    shutil.copytree(multi, out)
    (out / sh.shard_name(4)).unlink()
    kept = (out / sh.shard_name(1)).stat().st_mtime_ns
    done = run(_settings(tiny_model_dir, inputs_dir, out, edit=EDITS), teacher=teacher)
    assert done["shards_written"] == 1 and (out / sh.shard_name(1)).stat().st_mtime_ns == kept
    assert read_dataset(out) == read_dataset(multi)
    # another sharing setting is another dataset: the folder refuses it
    with pytest.raises(UserError, match="shared_inversion"):
        run(_settings(tiny_model_dir, inputs_dir, out, edit=EDITS, share_inversion=False), teacher=teacher)


def test_synthetic_two_edits_direction_once(tiny_model_dir, teacher, tmp_path):
    calls = []
    original = teacher.direction

    def counting_direction(source, target, **kwargs):
        calls.append((source, target))
        return original(source, target, **kwargs)

    teacher.direction = counting_direction
    try:
        settings = dataclasses.replace(
            _settings(tiny_model_dir, Path("."), tmp_path),
            inputs=None,
            synthetic=True,
            edit=["cat:dog", "circle:square"],
            num_synthetic=2,
            samples_per_shard=1,  # 2 shards per edit: the direction must still be computed once
            save_latent=False,
            save_recon=False,
            prompt=["a small {source}"],
        )
        run(settings, teacher=teacher)
    finally:
        del teacher.direction
    assert calls == [("cat", "dog"), ("circle", "square")]
    samples = read_dataset(tmp_path)
    assert len(samples) == 4 and all(set(m) == {"src.png", "edit.png"} for m in samples.values())
    assert sorted(p.name for p in tmp_path.glob("pairs-*.tar")) == [sh.shard_name(i) for i in range(4)]
    metas = read_metas(tmp_path)
    assert len(metas) == 4
    assert {m["edit"]["name"] for m in metas} == {"cat-to-dog", "circle-to-square"}
    assert all(m["edit"]["source"] in m["input"]["prompt"] for m in metas)


def test_inspect_summary_and_sheet(reference, tmp_path):
    from p2pz.cli.main import main

    sheet = tmp_path / "sheet.png"
    assert main(["shards", "inspect", str(reference), "--sheet", str(sheet), "--grid-pairs", "4"]) == 0
    image = Image.open(sheet)
    assert image.size[0] == 3 * 128 and image.size[1] > 4 * 128  # input | edit | reconstruction, 4 rows
    from p2pz.data.pairs.inspect import summarise

    summary = summarise(reference, sheet_pairs=0)
    assert summary["samples"] == GOOD and summary["shards"] == summary["shards_planned"] == 3
    assert summary["complete"] and summary["edits"] == {"cat-to-dog": GOOD}
    assert summary["skipped_total"] == 6 and summary["damaged_shards"] == []
    assert len(summary["settings"]) == 1
