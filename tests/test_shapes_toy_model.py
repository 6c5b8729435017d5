"""The toy model shipped in data/toy_model: loads as a Stable Diffusion folder, runs, draws the world."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pz.data.shapes import oracle, world

MODEL = Path(__file__).resolve().parents[1] / "data" / "toy_model"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_is_a_stable_diffusion_model_within_size():
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    weights = list(MODEL.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    assert sum(w.stat().st_size for w in weights) <= 30 * 2**20
    assert not list(MODEL.rglob("*.bin")) and not list(MODEL.rglob("*.pt"))


def test_components_have_the_planned_architecture(pipe):
    from diffusers import DDIMScheduler

    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.num_train_timesteps, cfg.prediction_type, cfg.set_alpha_to_one) == (1000, "epsilon", False)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.max_position_embeddings == 77
    with torch.no_grad():
        latent = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latent.shape == (1, 4, 16, 16)
    # cross-attention at 16×16 and 8×8
    cross = [i for i, block in enumerate(pipe.unet.down_blocks) if hasattr(block, "attentions")]
    assert cross == [0, 1]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_a_few_ddim_steps_run(pipe):
    out = pipe(
        ["a red circle on a white background", "a blue square on a gray background"],
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (2, 64, 64, 3)
    assert np.isfinite(out).all() and out.std() > 0.01


def test_both_tokenizer_classes_load_the_shipped_tokenizer():
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(MODEL / "tokenizer")
        assert tok.model_max_length == 77
        assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in world.scene_words())


def test_captioner_folder_works_through_its_class():
    folder = MODEL / "captioner"
    config = json.loads((folder / "captioner.json").read_text())
    module, name = config["class"].split(":")
    captioner = getattr(importlib.import_module(module), name).from_pretrained(folder)
    scenes = [world.sample_scene(900 + i) for i in range(8)]
    assert captioner([world.render(s) for s in scenes]) == [s.caption for s in scenes]


@pytest.mark.slow
def test_toy_model_draws_what_captions_say(pipe):
    scenes = [
        world.Scene((world.ShapeObject(s, c, (32.0, 32.0), 30.0),), world.Background("plain", (b,)))
        for s, c, b in [
            ("circle", "red", "white"),
            ("square", "blue", "gray"),
            ("triangle", "green", "white"),
            ("square", "yellow", "white"),
            ("triangle", "red", "gray"),
            ("circle", "blue", "gray"),
        ]
    ]
    images = pipe(
        [s.caption for s in scenes] * 2,
        num_inference_steps=50,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    right = []
    for image, scene in zip(images, scenes * 2):
        reading = oracle.read(image)
        right.append(
            len(reading.objects) == 1
            and reading.objects[0].shape == scene.objects[0].shape
            and reading.objects[0].colour == scene.objects[0].colour
            and reading.background.matches(scene.background)
        )
    assert np.mean(right) >= 0.9, right


@pytest.mark.slow
def test_the_toy_teacher_keeps_a_colour_edit_in_place():
    """red -> blue with the toy model's teacher settings (``TOY_PRESET``, step 5): the colour
    changes and the object stays where it was, on the first 8 scenes of the ablation (which measures
    100 at its calibrated step: docs/results/toy-ablation.md)."""
    from p2pz.data.eval.ablation import edit_world_scenes
    from p2pz.data.eval.world_metrics import aggregate
    from p2pz.data.shapes.edits import parse_world_edit
    from p2pz.data.shapes.teacher_settings import TOY_GUIDANCE_SCALE, TOY_PRESET, TOY_XA_GUIDANCE
    from p2pz.teacher import Pix2PixZero

    teacher = Pix2PixZero.from_pretrained(MODEL, preset=TOY_PRESET, captioner=False)
    edit = parse_world_edit("red-to-blue")
    result = edit_world_scenes(
        teacher,
        edit,
        edit.scenes(8, seed=0),
        "direction_xa",
        num_steps=50,
        xa_guidance=TOY_XA_GUIDANCE,
        guidance_scale=TOY_GUIDANCE_SCALE,
    )
    summary = aggregate(result.scores)
    assert summary["success"] >= 0.75, summary
    assert summary["iou"] >= 0.75 and summary["centre_shift_px"] <= 1.5, summary


def test_box_edges_fast_costs_at_most_half_of_box_edges():
    """#38's count, by the UNet's hooks on one scene: per pair, box_edges runs the inversion's S - 2
    forwards, a two-branch reference pass and, per step, a two-branch guidance forward, its backward
    and a two-branch prediction: 11S - 2 forward-equivalents (a backward counts as two forwards;
    548 at 50 steps). box_edges_fast: the inversion's calls (maps included) and 2 more for the first
    and last steps' maps, then per step a one-branch guidance forward, its backward and the
    negative branch's forward: 5S (250 at 50, 0.46). Pinned: a change that adds a call fails here."""
    from p2pz.data.eval.ablation import edit_world_scenes
    from p2pz.data.shapes.edits import parse_world_edit
    from p2pz.teacher import Pix2PixZero
    from p2pz.teacher.evals import evals_between

    steps = 10  # the counts are linear in the steps

    def counts(preset: str) -> dict[str, dict[str, int]]:
        teacher = Pix2PixZero.from_pretrained(MODEL, preset=preset, captioner=False)
        edit = parse_world_edit("square-to-triangle")
        before = teacher.unet_evals.snapshot()
        edit_world_scenes(teacher, edit, edit.scenes(1, seed=0), "direction_xa", num_steps=steps,
                          xa_guidance=1.0, guidance_scale=3.0)  # fmt: skip
        made = evals_between(before, teacher.unet_evals.snapshot())
        return {kind: made[kind] for kind in ("forward", "backward")}

    full, fast = counts("box_edges"), counts("box_edges_fast")
    assert full == {
        "forward": {
            "inversion": steps - 2,
            "reference": 2 * steps,
            "guidance": 2 * steps,
            "prediction": 2 * steps,
        },
        "backward": {"guidance": 2 * steps},
    }
    assert fast == {
        "forward": {"inversion": steps - 2, "reference": 2, "guidance": steps, "prediction": steps},
        "backward": {"guidance": steps},
    }

    def equivalents(c: dict[str, dict[str, int]]) -> int:
        return sum(c["forward"].values()) + 2 * sum(c["backward"].values())

    assert (equivalents(full), equivalents(fast)) == (11 * steps - 2, 5 * steps)
    assert equivalents(fast) / equivalents(full) <= 0.5
