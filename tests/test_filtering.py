"""Learning only from the teacher's successes: the keep rule, scoring pairs as they are made, the
world's and the paper's scorers, ``p2pz generate --keep-if`` and ``p2pz shards filter``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval_paper_metrics import tiny_clip_dir, tiny_dino_dir  # noqa: F401  (tiny CLIP and DINO fixtures)

from p2pz.cli.main import main
from p2pz.data.pairs import sample as fmt
from p2pz.data.pairs import shards as sh
from p2pz.data.pairs.filtering import FILTER_FILE, parse_keep_if
from p2pz.data.pairs.generate import Settings, load_teacher, run
from p2pz.utils.errors import UserError

# --------------------------------------------------------------------------------------------------
# The rule language


def test_rule_keeps_pairs_over_every_threshold():
    rule = parse_keep_if("success and iou >= 0.8 AND centre_shift_px < 2")
    assert rule.names == ["success", "iou", "centre_shift_px"]
    assert rule.keeps({"success": True, "iou": 0.8, "centre_shift_px": 1.5})
    assert not rule.keeps({"success": False, "iou": 0.9, "centre_shift_px": 0.0})
    assert not rule.keeps({"success": True, "iou": 0.79, "centre_shift_px": 0.0})
    assert not rule.keeps({"success": True, "iou": 0.9, "centre_shift_px": None})  # not found: not kept
    assert not rule.keeps({"success": True, "iou": 0.9})  # a missing score fails its clause
    assert rule.failed({"success": True, "iou": 0.5, "centre_shift_px": 3}) == [
        "iou >= 0.8",
        "centre_shift_px < 2",
    ]


@pytest.mark.parametrize(
    "text, value, kept",
    [
        ("x == true", 1, True),
        ("x == false", 0, True),
        ("x != 0", 0, False),
        ("x > -1e-3", 0, True),
        ("x <= .5", 0.5, True),
        ("x < 0.5", 0.5, False),
    ],
)
def test_rule_operators_and_numbers(text, value, kept):
    assert parse_keep_if(text).keeps({"x": value}) is kept


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "empty"),
        ("iou >= high", "not a number"),
        ("success or iou > 0.5", "cannot read"),
        ("__import__('os').system('true')", "cannot read"),
        ("iou => 0.5", "cannot read"),
        ("success and", "cannot read"),
        ("not success", "cannot read"),
        ("true", "not a score name"),
    ],
)
def test_rule_errors_are_one_line(text, says):
    with pytest.raises(UserError) as info:
        parse_keep_if(text)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_unknown_score_names_are_named():
    with pytest.raises(UserError, match=r"unknown score 'ioux'.*gives iou, success"):
        parse_keep_if("success and ioux > 0.5").check_names({"success", "iou"}, "the world scorer")


# --------------------------------------------------------------------------------------------------
# The world's scorer: the oracle reads the input, no ground truth needed


def test_world_scorer_tells_a_good_edit_from_a_copy():
    from p2pz.data.eval.pair_scores import WORLD_SCORES, WorldPairScorer
    from p2pz.data.shapes import world
    from p2pz.data.shapes.edits import parse_world_edit

    edit = parse_world_edit("circle:square")
    scenes = edit.scenes(3, seed=1)
    inputs = [world.render(s) for s in scenes]
    ideal = [world.render(edit.apply(s)) for s in scenes]
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    scores = WorldPairScorer()(inputs + inputs + [blank], ideal + inputs + [blank], edit)
    assert all(set(s) == set(WORLD_SCORES) for s in scores)
    good, copies, unreadable = scores[:3], scores[3:6], scores[6]
    assert all(s["success"] and s["iou"] >= 0.9 and s["centre_shift_px"] < 1 for s in good)
    assert not any(s["success"] for s in copies)
    assert (
        unreadable["success"] is False and unreadable["iou"] == 0.0 and unreadable["centre_shift_px"] is None
    )


def test_scorer_choice():
    from p2pz.data.eval.pair_scores import WorldPairScorer, make_pair_scorer
    from p2pz.teacher.edits import Edit

    assert isinstance(make_pair_scorer("auto", edits=[Edit("red", "blue")]), WorldPairScorer)
    assert make_pair_scorer("auto", edits=[Edit("cat", "dog")]) is None
    assert make_pair_scorer("none", edits=[Edit("red", "blue")]) is None
    with pytest.raises(UserError, match="shapes-world edits only; cat-to-dog"):
        make_pair_scorer("world", edits=[Edit("cat", "dog")])


def test_paper_scorer_unavailable_models_are_one_line(tmp_path, monkeypatch):
    from p2pz.data.eval.pair_scores import make_pair_scorer
    from p2pz.teacher.edits import Edit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        make_pair_scorer("paper", edits=[Edit("cat", "dog")], clip_model=str(tmp_path / "no-clip"))
    assert "does not exist" in str(info.value) and "\n" not in str(info.value)


def test_paper_scorer_with_tiny_models(tiny_clip_dir, tiny_dino_dir):  # noqa: F811 (fixtures)
    """CLIP directional score and target probability follow the edit; the structure distance is 0 for
    an unchanged image (tiny random models stand in for the user's CLIP and DINO)."""
    from p2pz.data.eval.pair_scores import PAPER_SCORES, PaperPairScorer
    from p2pz.teacher.edits import Edit

    scorer = PaperPairScorer(tiny_clip_dir, tiny_dino_dir, structure_size=32)
    blue, red = Image.new("RGB", (32, 32), (35, 60, 225)), Image.new("RGB", (32, 32), (220, 30, 30))
    to_red, unchanged = scorer([blue, blue], [red, blue], Edit("blue", "red"))
    assert set(to_red) == set(PAPER_SCORES)
    assert to_red["clip_acc"] is True and to_red["clip_target_prob"] > 0.5
    assert to_red["clip_direction"] > 0.5  # the image moved the way the text did
    assert unchanged["clip_acc"] is False and unchanged["structure_dist"] == pytest.approx(0.0, abs=1e-9)
    assert to_red["structure_dist"] >= 0.0


# --------------------------------------------------------------------------------------------------
# p2pz generate --keep-if on the tiny teacher, with a scorer that measures each edit's brightness


class BrightnessScorer:
    """A real (if simple) measurement of each edit: its mean brightness in [0, 1], and whether it is
    darker than its input."""

    name = "brightness"
    names = ("brightness", "darker")

    def __call__(self, sources, edited, edit):
        out = []
        for a, b in zip(sources, edited):
            mean_a = float(np.asarray(a, dtype=np.float32).mean() / 255)
            mean_b = float(np.asarray(b, dtype=np.float32).mean() / 255)
            out.append({"brightness": mean_b, "darker": mean_b < mean_a})
        return out


INPUTS = 7
PER_SHARD = 3  # 7 inputs -> shards of 3, 3, 1


@pytest.fixture(scope="module")
def inputs_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(5)
    for i in range(INPUTS):
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(base).resize((64, 64), Image.BICUBIC).save(folder / f"in{i}.png")
        (folder / f"in{i}.txt").write_text("a photo of a cat")  # no captioner needed
    return folder


def _settings(model: Path, inputs: Path, out: Path, **overrides) -> Settings:
    values = dict(
        model=str(model),
        edit=["cat:dog"],
        inputs=str(inputs),
        out=str(out),
        samples_per_shard=PER_SHARD,
        batch_size=2,
        steps=2,
        seed=1,
        num_sentences=4,
        device="cpu",
        dtype="float32",
        progress=False,
        save_recon=False,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_teacher(_settings(tiny_model_dir, Path("."), Path(".")))


def _pairs(folder: Path) -> dict[str, dict]:
    """key -> json of every pair in the folder's shards."""
    return {
        raw[fmt.KEY]: fmt.decode_meta(raw[fmt.META])
        for path in sorted(folder.glob(sh.SHARD_GLOB))
        for raw in fmt.iter_shard(path)
    }


@pytest.fixture(scope="module")
def scored(tiny_model_dir, inputs_dir, teacher, tmp_path_factory) -> Path:
    """Every pair, scored (no rule)."""
    out = tmp_path_factory.mktemp("scored")
    done = run(_settings(tiny_model_dir, inputs_dir, out), teacher=teacher, scorer=BrightnessScorer())
    assert done["samples_written"] == INPUTS and done["kept_fraction"] == 1.0 and done["keep_if"] is None
    return out


def _median_threshold(scored: Path) -> float:
    values = sorted(meta["scores"]["brightness"] for meta in _pairs(scored).values())
    return values[len(values) // 2]


def test_scores_go_into_each_pairs_json(scored):
    pairs = _pairs(scored)
    assert len(pairs) == INPUTS
    for meta in pairs.values():
        assert set(meta["scores"]) == {"brightness", "darker"}
        assert 0.0 <= meta["scores"]["brightness"] <= 1.0
    identity = json.loads((scored / sh.DATASET_FILE).read_text())
    assert identity["pair_scores"] == {"scorer": "brightness", "keep_if": None}


def test_keep_if_at_production_keeps_only_pairs_over_the_threshold(
    scored, tiny_model_dir, inputs_dir, teacher, tmp_path
):
    threshold = _median_threshold(scored)
    rule = f"brightness >= {threshold!r}"
    done = run(
        _settings(tiny_model_dir, inputs_dir, tmp_path, keep_if=rule),
        teacher=teacher,
        scorer=BrightnessScorer(),
    )
    everything = _pairs(scored)
    expected = {k for k, m in everything.items() if m["scores"]["brightness"] >= threshold}
    kept = _pairs(tmp_path)
    assert set(kept) == expected and 0 < len(kept) < INPUTS
    assert done["samples_written"] == len(expected) and done["rejected"] == INPUTS - len(expected)
    assert done["kept_fraction"] == pytest.approx(len(expected) / INPUTS, abs=1e-6)
    assert done["skipped"] == 0  # kept out is not skipped
    records = sh.latest_shard_records(sh.read_manifests(tmp_path))
    rejected = [s for r in records.values() for s in r["skipped"]]
    assert all(s["rejected"] and s["scores"]["brightness"] < threshold for s in rejected)
    assert sum(r["rejected"] for r in records.values()) == INPUTS - len(expected)


def test_keep_if_split_over_tasks_and_resumed_equals_one_run(
    scored, tiny_model_dir, inputs_dir, teacher, tmp_path
):
    rule = f"brightness >= {_median_threshold(scored)!r}"
    one, split = tmp_path / "one", tmp_path / "split"
    run(_settings(tiny_model_dir, inputs_dir, one, keep_if=rule), teacher=teacher, scorer=BrightnessScorer())
    for task in range(2):
        s = _settings(tiny_model_dir, inputs_dir, split, keep_if=rule, task_index=task, num_tasks=2)
        run(s, teacher=teacher, scorer=BrightnessScorer())
    drop = {"timings", "task"}
    strip = lambda pairs: {k: {f: v for f, v in m.items() if f not in drop} for k, m in pairs.items()}  # noqa: E731
    assert strip(_pairs(split)) == strip(_pairs(one))
    # a re-run is a no-op; another rule into the same folder is refused
    again = run(
        _settings(tiny_model_dir, inputs_dir, one, keep_if=rule), teacher=teacher, scorer=BrightnessScorer()
    )
    assert again["shards_written"] == 0
    with pytest.raises(UserError, match="pair_scores"):
        run(
            _settings(tiny_model_dir, inputs_dir, one, keep_if="darker"),
            teacher=teacher,
            scorer=BrightnessScorer(),
        )


def test_keep_if_with_an_unknown_score_stops_before_the_teacher(tiny_model_dir, inputs_dir, tmp_path):
    s = _settings(tiny_model_dir, inputs_dir, tmp_path / "out", keep_if="iou >= 0.8")
    with pytest.raises(
        UserError, match="unknown score 'iou'; the brightness scorer gives brightness, darker"
    ):
        run(s, teacher=None, scorer=BrightnessScorer())  # would load the teacher otherwise
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="needs scores"):
        run(s, teacher=None, scorer=None)


def test_generate_cli_keep_if_needs_a_scorer(tiny_model_dir, inputs_dir, tmp_path, capsys):
    base = [
        "generate",
        f"--model={tiny_model_dir}",
        f"--inputs={inputs_dir}",
        "--edit=cat:dog",
        "--no-progress",
    ]
    assert main([*base, f"--out={tmp_path / 'a'}", "--keep-if", "success"]) == 2
    assert "needs scores" in capsys.readouterr().err
    assert main([*base, f"--out={tmp_path / 'b'}", "--score", "world"]) == 2
    assert "shapes-world edits only" in capsys.readouterr().err
    assert main([*base, f"--out={tmp_path / 'c'}", "--keep-if", "success or iou"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")


# --------------------------------------------------------------------------------------------------
# p2pz shards filter


def test_shards_filter_copies_the_kept_pairs_byte_for_byte(scored, tmp_path, capsys):
    threshold = _median_threshold(scored)
    dst = tmp_path / "kept"
    assert main(["shards", "filter", str(scored), str(dst), "--keep-if", f"brightness >= {threshold!r}"]) == 0
    assert "kept" in capsys.readouterr().out
    everything = {raw[fmt.KEY]: raw for p in sorted(scored.glob(sh.SHARD_GLOB)) for raw in fmt.iter_shard(p)}
    kept = {raw[fmt.KEY]: raw for p in sorted(dst.glob(sh.SHARD_GLOB)) for raw in fmt.iter_shard(p)}
    expected = {
        k
        for k, raw in everything.items()
        if fmt.decode_meta(raw[fmt.META])["scores"]["brightness"] >= threshold
    }
    assert set(kept) == expected
    for key, raw in kept.items():
        assert {m: v for m, v in raw.items() if m != fmt.URL} == {
            m: v for m, v in everything[key].items() if m != fmt.URL
        }
    report = json.loads((dst / FILTER_FILE).read_text())
    assert report["pairs_in"] == INPUTS and report["pairs_kept"] == len(expected)
    assert report["kept_fraction"] == pytest.approx(len(expected) / INPUTS, abs=1e-6)
    assert sum(s["pairs_kept"] for s in report["shards"]) == len(expected)
    assert (dst / sh.DATASET_FILE).read_text() == (scored / sh.DATASET_FILE).read_text()
    assert not list(tmp_path.glob(".*"))  # no temporary left beside it


def test_shards_filter_refuses_and_leaves_nothing(scored, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["shards", "filter", str(scored), str(dst), "--keep-if", "iou >= 0.8"]) == 2
    err = capsys.readouterr().err
    assert "unknown score 'iou'" in err and "brightness, darker" in err
    assert not dst.exists() and not list(tmp_path.glob(".*"))
    dst.mkdir()
    assert main(["shards", "filter", str(scored), str(dst), "--keep-if", "darker"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_shards_filter_needs_scored_pairs(tmp_path, capsys):
    src = tmp_path / "src"
    with sh.atomic_shard(src, 0) as shard:
        blank = Image.new("RGB", (8, 8))
        shard.write(fmt.build_sample("k0", blank, blank, {"edit": {"name": "a-to-b"}}))
    assert main(["shards", "filter", str(src), str(tmp_path / "dst"), "--keep-if", "success"]) == 2
    assert "carries no scores" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_filter_scores_pairs_made_before_scoring_with_a_given_scorer(tmp_path):
    """Pairs without scores (made before scoring existed) are scored by the scorer handed in, and their
    copies carry the scores."""
    from p2pz.data.eval.pair_scores import WorldPairScorer
    from p2pz.data.pairs.filtering import filter_shards
    from p2pz.data.shapes import world
    from p2pz.data.shapes.edits import parse_world_edit

    edit = parse_world_edit("circle:square")
    meta = {"edit": {"name": edit.name, "source": "circle", "target": "square"}}
    src = tmp_path / "src"
    with sh.atomic_shard(src, 0) as shard:
        for i, scene in enumerate(edit.scenes(4, seed=2)):
            result = edit.apply(scene) if i % 2 == 0 else scene  # odd pairs: the teacher copied its input
            shard.write(fmt.build_sample(f"k{i}", world.render(scene), world.render(result), meta))
    report = filter_shards(src, tmp_path / "dst", "success", scorer=WorldPairScorer())
    assert (report["pairs_in"], report["pairs_kept"]) == (4, 2)
    kept = {
        raw[fmt.KEY]: fmt.decode_meta(raw[fmt.META])
        for raw in fmt.iter_shard(tmp_path / "dst" / sh.shard_name(0))
    }
    assert set(kept) == {"k0", "k2"} and all(m["scores"]["success"] is True for m in kept.values())
    assert (
        main(
            ["shards", "filter", str(src), str(tmp_path / "cli"), "--keep-if", "success", "--score", "world"]
        )
        == 0
    )
    assert json.loads((tmp_path / "cli" / FILTER_FILE).read_text())["pairs_kept"] == 2
