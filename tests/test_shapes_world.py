"""The shapes world: renderer, captions, oracle, tokenizer and captioner (no trained model needed)."""

import math

import numpy as np
import pytest

from p2pz.data.shapes import oracle, world
from p2pz.data.shapes.world import Background, Scene, ShapeObject

BROAD = dict(
    shapes=world.SHAPES,
    colours=tuple(world.COLOURS),
    backgrounds=tuple(world.BACKGROUNDS),
    background_kinds=world.BACKGROUND_KINDS,
)


def test_same_seed_same_scene_and_image():
    a, b = world.sample_scene(123, **BROAD), world.sample_scene(123, **BROAD)
    assert a == b
    assert np.array_equal(np.asarray(world.render(a)), np.asarray(world.render(b)))
    others = {world.sample_scene(s, **BROAD) for s in range(124, 134)}
    assert a not in others and len(others) == 10


def test_render_is_64x64_rgb_with_smooth_edges():
    scene = Scene((ShapeObject("circle", "red", (32.0, 32.0), 30.0),), Background("plain", ("white",)))
    image = np.asarray(world.render(scene))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[32, 32]) == world.COLOURS["red"]
    assert tuple(image[0, 0]) == world.BACKGROUNDS["white"]
    # anti-aliasing: the rim has pixels between the object's and the background's colours
    greens = np.unique(image[..., 1])
    assert len(greens) > 5


def test_masks_match_shape_areas():
    scene = Scene(
        (
            ShapeObject("circle", "blue", (18.0, 18.0), 20.0),
            ShapeObject("square", "green", (44.0, 44.0), 16.0),
        ),
        Background("plain", ("gray",)),
    )
    circle, square = world.object_masks(scene)
    assert abs(circle.sum() - np.pi * 10**2) < 12
    assert abs(square.sum() - 16**2) < 12
    assert not (circle & square).any()
    assert world.mask_centre(circle) == pytest.approx((18.0, 18.0), abs=0.6)


def test_captions_in_plain_english():
    red_circle = ShapeObject("circle", "red", (20.0, 20.0), 20.0)
    blue_square = ShapeObject("square", "blue", (45.0, 45.0), 14.0)
    orange_triangle = ShapeObject("triangle", "orange", (45.0, 15.0), 14.0)
    white = Background("plain", ("white",))
    assert Scene((red_circle,), white).caption == "a red circle on a white background"
    assert (
        Scene((red_circle, blue_square), white).caption
        == "a red circle and a blue square on a white background"
    )
    three = Scene((red_circle, blue_square, orange_triangle), Background("gradient", ("white", "gray")))
    assert three.caption == (
        "a red circle, a blue square and an orange triangle on a white to gray gradient background"
    )
    stripes = Scene((red_circle,), Background("stripes", ("black", "white")))
    assert stripes.caption == "a red circle on a black and white striped background"
    assert Scene((red_circle,), white).replace_object(0, shape="square").caption.startswith("a red square")


def test_scenes_follow_the_requested_distribution():
    scenes = [world.sample_scene(s) for s in range(200)]
    assert all(len(s.objects) == 1 and s.background.kind == "plain" for s in scenes)
    assert {s.objects[0].shape for s in scenes} == set(world.TOY_SHAPES)
    assert {s.objects[0].colour for s in scenes} == set(world.TOY_COLOURS)
    assert {s.background.colours[0] for s in scenes} == set(world.TOY_BACKGROUNDS)
    multi = [world.sample_scene(s, num_objects=(2, 3), **BROAD) for s in range(50)]
    assert {len(s.objects) for s in multi} == {2, 3}
    for s in multi:  # objects stay apart, so each is whole and readable
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1 :]:
                assert not world._boxes_near(a.bbox, b.bbox, gap=2.9)


@pytest.mark.parametrize(
    "name, count, kwargs",
    [
        ("toy distribution", 300, {}),
        ("all shapes, colours and backgrounds", 150, BROAD),
        ("two or three objects", 150, dict(num_objects=(2, 3), **BROAD)),
    ],
)
def test_oracle_reads_clean_renders(name, count, kwargs):
    scores = [
        oracle.score(world.render(s), s)
        for s in (world.sample_scene(10_000 + i, **kwargs) for i in range(count))
    ]
    accuracy = np.mean([s.all_right for s in scores])
    assert accuracy >= 0.99, f"{name}: oracle accuracy {accuracy:.3f}"
    assert np.mean([s.template_iou for s in scores]) > 0.9
    assert np.median([s.centre_error for s in scores]) < 0.75


def test_oracle_sees_changes():
    scene = world.sample_scene(7, shapes=("circle",), colours=("red",))
    for changed in (scene.replace_object(0, shape="square"), scene.replace_object(0, colour="blue")):
        s = oracle.score(world.render(changed), scene)
        assert not s.all_right
        assert oracle.score(world.render(changed), changed).all_right
    blank = np.full((64, 64, 3), 140, dtype=np.uint8)
    reading = oracle.read(blank)
    assert reading.objects == [] and reading.background == Background("plain", ("gray",))


def test_oracle_object_masks_match_ground_truth():
    for seed in range(20):
        scene = world.sample_scene(seed, num_objects=2, **BROAD)
        reading = oracle.read(world.render(scene))
        for truth, read in zip(world.object_masks(scene), oracle.match_objects(reading, scene)):
            iou = (truth & read.mask).sum() / (truth | read.mask).sum()
            assert iou > 0.9


def test_tokenizer_gives_each_world_word_one_token(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

    from p2pz.data.shapes.tokenizer import save_tokenizer

    save_tokenizer(tmp_path)
    caption = "an orange circle, a red square and a blue diamond on a white to gray gradient background"
    for cls in (CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer):
        tok = cls.from_pretrained(tmp_path)
        assert tok.model_max_length == 77
        for word in world.scene_words():
            assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
        ids = tok(caption, padding="max_length", max_length=tok.model_max_length).input_ids
        assert len(ids) == 77
        assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",").strip() == caption
    # vocab.json + merges.txt alone are enough
    (tmp_path / "tokenizer.json").unlink()
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in world.scene_words())


def test_captioner_captions_renders(tmp_path):
    from p2pz.data.shapes.captioner import ShapesCaptioner, write_captioner_folder

    write_captioner_folder(tmp_path)
    captioner = ShapesCaptioner.from_pretrained(tmp_path)
    scenes = [world.sample_scene(500 + i) for i in range(20)]
    assert captioner([world.render(s) for s in scenes]) == [s.caption for s in scenes]
    # larger images are read at the world's size
    big = world.render(scenes[0]).resize((256, 256))
    assert captioner([big]) == [scenes[0].caption]


def test_toy_model_training_is_reproducible(tmp_path):
    """``train_toy`` with fixed step counts (its ``reproduce`` command) writes the same weights twice.

    Every random draw comes from the seed and the step number (scenes, noise, timesteps), so a
    short run on a small dataset must repeat bit for bit; a time-budgeted run plans its steps from
    the machine's speed and is not meant to.
    """
    import hashlib

    from p2pz.data.models import train_toy

    def train(name: str) -> dict[str, str]:
        out = tmp_path / name
        args = [
            "--out",
            str(out),
            "--seed",
            "3",
            "--vae-steps",
            "2",
            "--decoder-steps",
            "2",
            "--unet-steps",
            "3",
        ]
        args += ["--scenes", "32", "--batch", "4", "--threads", "1", "--minutes", "30"]
        assert train_toy.main(args) == 0
        files = sorted(out.glob("*/*.safetensors"))
        assert {f.parent.name for f in files} >= {"unet", "vae", "text_encoder"}
        return {f"{f.parent.name}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    first, second = train("a"), train("b")
    assert first == second


def test_decoder_finetuning_keeps_the_latent_space(tmp_path):
    """``--finetune-decoder`` changes the decoder alone: the encoder (whose latents the UNet learned)
    and every other component stay bit for bit, and ``train_log.json`` records the stage."""
    import json

    import torch
    from safetensors.torch import load_file

    from p2pz.data.models import train_toy

    out = tmp_path / "toy"
    common = ["--out", str(out), "--seed", "3", "--threads", "1", "--scenes", "32", "--batch", "4"]
    assert train_toy.main([*common, "--vae-steps", "2", "--decoder-steps", "0", "--unet-steps", "1"]) == 0
    before = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    unet_before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert train_toy.main([*common, "--finetune-decoder", "--decoder-steps", "3"]) == 0

    after = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_before
    record = json.loads((out / "train_log.json").read_text())
    assert record["decoder"]["steps"] == 3
    assert "--vae-steps 2 --decoder-steps 3 --unet-steps 1" in record["reproduce"]
    precision = train_toy.resolve_precision("auto")  # what the UNet stage ran in: recorded, reproduced
    assert record["unet"]["precision"] == precision
    assert record["reproduce"].endswith(f"--precision {precision}")
    assert json.loads((out / "vae" / "config.json").read_text()).get("_name_or_path") is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_unet_stage_runs_in_the_precision_asked_for(precision):
    """``--precision``: the UNet's layers compute in bf16 under autocast and in float32 without it
    (``auto`` picks float32 on CPUs that only emulate bf16, where it is ~13x slower)."""
    import argparse

    import torch

    from p2pz.data.models import train_toy
    from p2pz.data.shapes.tokenizer import build_tokenizer

    args = argparse.Namespace(seed=0, lr=1e-4, precision=precision)
    nets = train_toy._UNetTraining.create(args, build_tokenizer())
    seen: set[torch.dtype] = set()
    nets.unet.conv_in.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    noisy, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    ids = torch.zeros(2, 77, dtype=torch.long)
    loss = nets.step(noisy, noise, torch.tensor([10, 500]), ids, weight=torch.ones(1000))
    assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert math.isfinite(loss)


def test_decoder_finetuning_needs_a_model_folder(tmp_path, capsys):
    from p2pz.data.models import train_toy

    with pytest.raises(SystemExit) as exit_info:
        train_toy.main(["--out", str(tmp_path / "none"), "--finetune-decoder"])
    assert exit_info.value.code == 2
    assert "has no vae/" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_decoder_finetuning_refuses_another_vae(tmp_path, tiny_model_dir, capsys):
    """A model folder whose VAE is not the toy model's: one line, and the folder left as it was."""
    import hashlib
    import shutil

    from p2pz.data.models import train_toy

    out = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, out)

    def digest() -> dict[str, str]:
        return {
            str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.rglob("*")) if f.is_file()
        }

    before = digest()
    with pytest.raises(SystemExit) as exit_info:
        train_toy.main(["--out", str(out), "--finetune-decoder", "--decoder-steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not hold the toy model's VAE" in err[-1]
    assert digest() == before
    assert not (tmp_path / ".tiny.train_state").exists()
