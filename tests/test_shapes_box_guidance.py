"""Box guidance (the shapes world's ``box`` presets): the object's box, the map loss outside it, the
box term on x0, through the teacher's guidance-term interface."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from p2pz.data.shapes.box_guidance import LATE_SHARE, BoxGuidance, BoxTerm, ObjectBox
from p2pz.teacher.attention import CrossAttentionMaps
from p2pz.teacher.editing import _xa_gradient, edit_with_guidance, make_scheduler
from p2pz.teacher.guidance_terms import GuidanceContext, GuidanceStep
from p2pz.teacher.pipeline import Pix2PixZero
from p2pz.teacher.presets import get_preset

BACKGROUND = torch.tensor([0.5, -0.2, 0.1, 0.3])


def scene_latent(top: int, left: int, height: int, width: int, size: int = 16) -> torch.Tensor:
    """A ``[1, 4, size, size]`` latent: a plain background (with a faint gradient) and a box-shaped
    object whose channels differ from it."""
    ramp = torch.linspace(0, 0.05, size)
    latent = BACKGROUND[:, None, None] + ramp[None, :, None] + torch.zeros(4, size, size)
    latent[:, top : top + height, left : left + width] += torch.tensor([1.0, -0.8, 0.6, 0.4])[:, None, None]
    return latent[None]


def box_guidance(box, pixel_box=None, decode=None, **spec) -> BoxGuidance:
    """Box guidance at weight 0.2 (the presets'), with ``spec``'s other settings."""
    return BoxGuidance(BoxTerm(**{"weight": 0.2, **spec}), box, pixel_box, decode, 1000)


def step_loss(guidance: BoxGuidance, x, eps, t, sched) -> torch.Tensor:
    """The term's loss at one guidance step of latents ``x`` whose noise prediction is ``eps`` (CFG 3)."""
    context = GuidanceContext(x, None, None, None, 1, 3.0, sched.alphas_cumprod, None)
    return guidance.loss(GuidanceStep(x, eps, t, context))


def test_object_box_finds_the_object_and_the_background_around_it():
    box = ObjectBox.from_latent(torch.cat([scene_latent(3, 5, 5, 7), scene_latent(0, 0, 4, 4)]))
    assert box.rows[0].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert box.cols[0].nonzero().flatten().tolist() == list(range(5, 12))
    assert box.rows[1].nonzero().flatten().tolist() == [0, 1, 2, 3]  # at the border too
    torch.testing.assert_close(box.background.flatten(1), BACKGROUND.expand(2, 4) + 0.025, atol=0.01, rtol=0)
    assert box.mask[0].sum() == 35 and box.mask[1].sum() == 16


def test_a_box_over_the_whole_latent_takes_the_background_from_every_pixel():
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latent[..., 0, :] = latent[..., -1, :] = latent[..., :, 0] = latent[..., :, -1] = 0
    latent[..., 1:-1, 1:-1] = 5.0  # the object fills the inside; its box still leaves the border out
    box = ObjectBox.from_latent(latent, threshold=-1.0)  # everything counts as the object's
    assert box.mask.all()
    torch.testing.assert_close(box.background.flatten(), latent.flatten(2).median(-1).values.flatten())


def test_outside_weights_at_coarser_and_finer_map_sizes():
    box = ObjectBox.from_latent(scene_latent(3, 5, 5, 7))  # rows 3-7, cols 5-11 of 16 x 16
    coarse = box.outside_weights(64).reshape(8, 8)  # a cell is inside when any latent pixel is
    assert coarse[1:4, 2:6].eq(0).all() and coarse.sum() == 64 - 12
    same = box.outside_weights(256).reshape(16, 16)
    assert torch.equal(same, 1 - box.mask[0])
    fine = box.outside_weights(1024).reshape(32, 32)
    assert fine[6, 10] == 0 and fine[5, 10] == 1 and fine[6, 9] == 1
    with pytest.raises(ValueError, match="does not tile"):
        box.outside_weights(50)


def test_map_loss_counts_only_the_pixels_outside_each_samples_box():
    """Rows are [branch, sample, head] batch-major: each row is weighted by its own sample's box."""
    boxes = ObjectBox.from_latent(torch.cat([scene_latent(0, 0, 8, 8), scene_latent(8, 8, 8, 8)]))
    heads, tokens, samples = 3, 5, 2
    reference = torch.rand(2 * samples * heads, 64, tokens, generator=torch.Generator().manual_seed(1))
    inside_first = 0  # map pixel (0, 0) of 8 x 8: in sample 0's box, outside sample 1's

    def loss_with_change(sample: int) -> float:
        probs = reference.clone()
        for branch in range(2):
            start = (branch * samples + sample) * heads
            probs[start : start + heads, inside_first] += 0.1
        maps = CrossAttentionMaps()
        with maps.recording(0):
            maps.observe("layer", reference, heads)
        with maps.guiding(0, num_samples=samples, map_weights=boxes.outside_weights):
            maps.observe("layer", probs, heads)
        return float(maps.loss)

    assert loss_with_change(0) == 0.0  # inside its own box: free to change
    expected = 2 * heads * tokens * 0.1**2 / (2 * heads)  # 2 branches x heads rows, / rows per sample
    assert loss_with_change(1) == pytest.approx(expected, rel=1e-4)


def test_box_term_is_zero_on_the_box_and_pulls_a_moved_object_back():
    box = ObjectBox.from_latent(scene_latent(4, 4, 6, 6))
    assert float(box.loss(scene_latent(4, 4, 6, 6))) < 0.05  # the faint gradient only
    moved = scene_latent(8, 8, 6, 6).requires_grad_(True)
    loss = box.loss(moved)
    assert float(loss.detach()) > 1.0
    (grad,) = torch.autograd.grad(loss, moved)
    with torch.no_grad():
        assert float(box.loss(moved - 0.05 / grad.abs().max() * grad)) < float(loss.detach())


def test_box_term_predicts_x0_as_the_scheduler_does():
    """x0 comes from the CFG-combined noise prediction, as the DDIM step's ``pred_original_sample``."""
    sched = make_scheduler({"num_train_timesteps": 1000, "clip_sample": False}, 10, "cpu")  # as SD's
    t = sched.timesteps[3]
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(1, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    guidance = box_guidance(ObjectBox.from_latent(scene_latent(4, 4, 6, 6)))
    combined = eps[:1] + 3.0 * (eps[1:] - eps[:1])
    x0 = sched.step(combined, t, x).pred_original_sample
    torch.testing.assert_close(step_loss(guidance, x, eps, t, sched), 0.2 * guidance.box.loss(x0))


def test_late_factor_scales_the_box_term_in_the_late_steps_only():
    """``BoxTerm.late_factor``: both box terms weigh more below ``LATE_SHARE`` of the schedule, not before."""
    sched = make_scheduler({"num_train_timesteps": 1000, "clip_sample": False}, 10, "cpu")
    g = torch.Generator().manual_seed(4)
    x, eps = torch.randn(1, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    box = ObjectBox.from_latent(scene_latent(4, 4, 6, 6))
    plain = box_guidance(box)
    late_below = int(LATE_SHARE * 1000)
    late = box_guidance(box, late_factor=12.0)
    early_t, late_t = sched.timesteps[2], sched.timesteps[-2]
    assert int(early_t) >= late_below > int(late_t)

    def loss(guidance, t):
        return step_loss(guidance, x, eps, t, sched)

    torch.testing.assert_close(loss(late, early_t), loss(plain, early_t))
    torch.testing.assert_close(loss(late, late_t), 12.0 * loss(plain, late_t))


def test_pixel_late_terms_scale_the_pixel_term_alone_in_the_late_steps():
    """``BoxTerm.late_terms="pixel"``: late, the pixel term weighs ``late_factor`` times more and the
    latent term as before; early, both as without a late factor."""
    sched = make_scheduler({"num_train_timesteps": 1000, "clip_sample": False}, 10, "cpu")
    g = torch.Generator().manual_seed(6)
    x, eps = torch.randn(1, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    box = ObjectBox.from_latent(scene_latent(4, 4, 6, 6))
    pixel_box = ObjectBox.from_image(scene_latent(5, 3, 7, 8)[:, :3])

    def guidance(**kw):
        return box_guidance(box, pixel_box, lambda z: z[:, :3], pixel_weight=0.05, **kw)

    def loss(guidance, t):
        return step_loss(guidance, x, eps, t, sched)

    plain, latent_only = guidance(), box_guidance(box)
    pixel_late = guidance(late_factor=12.0, late_terms="pixel")
    early_t, late_t = sched.timesteps[2], sched.timesteps[-2]
    torch.testing.assert_close(loss(pixel_late, early_t), loss(plain, early_t))
    latent_term = loss(latent_only, late_t)
    pixel_term = loss(plain, late_t) - latent_term
    assert pixel_term > 0
    torch.testing.assert_close(loss(pixel_late, late_t), latent_term + 12.0 * pixel_term)
    both = loss(guidance(late_factor=12.0), late_t)
    torch.testing.assert_close(both, 12.0 * (latent_term + pixel_term))


# -------------------------------------------------------------------------------------------------
# In the teacher (tiny model)

STEPS = 4


@pytest.fixture(scope="module")
def teachers(tiny_model_dir):
    return {
        p: Pix2PixZero.from_pretrained(tiny_model_dir, preset=p, captioner=False) for p in ("joint", "box")
    }


def _edit_inputs(teacher):
    latents = teacher.encode_images([_picture()], [torch.Generator().manual_seed(0)])
    cond = teacher.encode_text(["a cat"])
    direction = 0.3 * torch.randn(cond.shape, generator=torch.Generator().manual_seed(3))
    return latents, teacher.encode_text([""]), cond, direction


def _picture():
    from PIL import Image

    image = Image.new("RGB", (64, 64), (40, 90, 160))
    image.paste((230, 60, 40), (16, 20, 40, 44))
    return image


def test_object_box_from_an_image_reads_the_box_in_pixels():
    image = torch.from_numpy(np.asarray(_picture(), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    box = ObjectBox.from_image(image)
    assert box.rows[0].nonzero().flatten().tolist() == list(range(20, 44))
    assert box.cols[0].nonzero().flatten().tolist() == list(range(16, 40))
    torch.testing.assert_close(box.background.flatten(), torch.tensor([40, 90, 160]) / 127.5 - 1)


@pytest.mark.parametrize("pixel_weight", [0.0, 0.05])
def test_box_guidance_step_lowers_its_loss(teachers, pixel_weight):
    teacher = teachers["box"]
    latents, uncond, cond, direction = _edit_inputs(teacher)
    sched = make_scheduler(teacher.scheduler_config, 10, "cpu")
    t = sched.timesteps[2]
    x = latents + 0.3 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    context = GuidanceContext(
        latents,
        cond,
        uncond,
        cond + direction,
        1,
        3.0,
        sched.alphas_cumprod,
        teacher.unet,
        teacher.decode_with_grad,
    )
    guidance = BoxTerm(weight=0.2, pixel_weight=pixel_weight).build(context)
    if pixel_weight:  # the pixel term is part of the loss
        eps = torch.randn((2, *x.shape[1:]), generator=torch.Generator().manual_seed(6))
        without = box_guidance(guidance.box)
        assert step_loss(guidance, x, eps, t, sched) > step_loss(without, x, eps, t, sched)
    embeds = torch.cat([uncond, cond + direction])

    def loss_and_grad(at):
        teacher.maps.clear()
        with torch.no_grad(), teacher.maps.recording(0):
            teacher.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond]))
        return _xa_gradient(
            teacher.unet, teacher.maps, at, t, embeds, 0, 1, "all", duplicate=True, terms=[guidance],
            context=context,
        )  # fmt: skip

    grad, before = loss_and_grad(x)
    _, after = loss_and_grad(x - 0.05 / grad.abs().max() * grad)
    assert after < before


def test_box_preset_is_joint_with_box_guidance_and_an_empty_negative_prompt(teachers, tiny_model_dir):
    joint, box = teachers["joint"], teachers["box"]
    joint_empty = Pix2PixZero.from_pretrained(
        tiny_model_dir,
        preset=dataclasses.replace(get_preset("joint"), negative_prompt_real="empty"),
        captioner=False,
    )
    args = dict(captions=["a cat"], seeds=[1], num_steps=STEPS, return_latents=True)
    direction = _edit_inputs(box)[3][0]

    def edited(teacher, xa):
        from p2pz.teacher.directions import EditDirection

        d = EditDirection(tensor=direction, source="cat", target="dog")
        return teacher.edit([_picture()], [d], xa_guidance=xa, **args)[0].edited_latent

    # no guidance: no box either, and only the negative prompt differs from joint's
    assert torch.equal(edited(joint_empty, 0.0), edited(box, 0.0))
    assert not torch.allclose(edited(joint, 0.0), edited(box, 0.0), atol=1e-4)
    assert not torch.allclose(edited(joint_empty, 50.0), edited(box, 50.0), atol=1e-4)
    assert box.settings["preset"]["guidance_terms"][0]["term"] == "box"
    assert joint.settings["preset"]["guidance_terms"] == []


def test_box_pixels_preset_adds_the_pixel_term_to_guided_edits_only(teachers, tiny_model_dir):
    box = teachers["box"]
    pixels = Pix2PixZero.from_pretrained(tiny_model_dir, preset="box_pixels", captioner=False)
    args = dict(captions=["a cat"], seeds=[1], num_steps=STEPS, return_latents=True)
    from p2pz.teacher.directions import EditDirection

    d = EditDirection(tensor=_edit_inputs(box)[3][0], source="cat", target="dog")

    def edited(teacher, xa):
        return teacher.edit([_picture()], [d], xa_guidance=xa, **args)[0].edited_latent

    assert torch.equal(edited(box, 0.0), edited(pixels, 0.0))
    assert not torch.allclose(edited(box, 50.0), edited(pixels, 50.0), atol=1e-4)


def test_box_edges_preset_mixes_the_caption_into_the_negative_prompt(teachers, tiny_model_dir):
    """``box_edges``: box_pixels with a late pixel term and the caption's share of the negative
    prompt, w * E(caption) + (1 - w) * E(""), which changes unguided edits too."""
    edges = get_preset("box_edges")
    [term], [pixels_term] = edges.guidance_terms, get_preset("box_pixels").guidance_terms
    assert edges == dataclasses.replace(
        get_preset("box_pixels"), name="box_edges", negative_caption_weight=edges.negative_caption_weight,
        guidance_terms=(dataclasses.replace(pixels_term, late_factor=term.late_factor, late_terms="pixel"),),
    )  # fmt: skip
    assert term.late_factor > 1 and 0 < edges.negative_caption_weight < 1
    pixels = Pix2PixZero.from_pretrained(tiny_model_dir, preset="box_pixels", captioner=False)
    teacher = Pix2PixZero.from_pretrained(tiny_model_dir, preset="box_edges", captioner=False)
    cond = teacher.encode_text(["a cat", "a dog"])
    w = edges.negative_caption_weight
    expected = w * cond + (1 - w) * teacher.encode_text(["", ""])
    torch.testing.assert_close(teacher._negative_embeddings(cond), expected)
    torch.testing.assert_close(pixels._negative_embeddings(cond), teacher.encode_text(["", ""]))
    from p2pz.teacher.directions import EditDirection

    d = EditDirection(tensor=_edit_inputs(pixels)[3][0], source="cat", target="dog")
    args = dict(captions=["a cat"], seeds=[1], num_steps=STEPS, return_latents=True, xa_guidance=0.0)
    unguided = [t.edit([_picture()], [d], **args)[0].edited_latent for t in (pixels, teacher)]
    assert not torch.allclose(*unguided, atol=1e-4)


def test_box_preset_runs_both_reference_branches_on_real_images(teachers):
    """The empty negative prompt differs from the caption, so the reference pass is not one branch."""
    teacher = teachers["box"]
    from p2pz.teacher.directions import EditDirection

    d = EditDirection(tensor=_edit_inputs(teacher)[3][0], source="cat", target="dog")
    before = teacher.unet_evals.snapshot()["forward"].get("reference", 0)
    teacher.edit([_picture()], [d], captions=["a cat"], seeds=[1], num_steps=STEPS, xa_guidance=5.0)
    assert teacher.unet_evals.snapshot()["forward"]["reference"] - before == 2 * STEPS


def test_synthetic_edits_take_the_box_from_a_first_reference_pass(teachers):
    teacher = teachers["box"]
    latents, uncond, cond, direction = _edit_inputs(teacher)
    x_T = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    before = teacher.unet_evals.snapshot()
    kwargs = dict(guided_branch="joint", terms=[BoxTerm(weight=0.2)])
    edit_with_guidance(
        teacher.unet,
        teacher.maps,
        teacher.scheduler_config,
        x_T,
        uncond,
        cond,
        direction,
        STEPS,
        3.0,
        5.0,
        **kwargs,
    )
    reference = teacher.unet_evals.snapshot()["forward"]["reference"] - before["forward"].get("reference", 0)
    assert reference == 2 * STEPS * 2  # the first pass and the recorded one, both CFG branches
    with pytest.raises(ValueError, match="pixel space needs a decoder"):
        edit_with_guidance(
            teacher.unet, teacher.maps, teacher.scheduler_config, x_T, uncond, cond, direction, 1, 3.0, 5.0,
            guided_branch="joint", terms=[BoxTerm(weight=0.2, pixel_weight=0.05)],
        )  # fmt: skip
    with pytest.raises(ValueError, match="guidance terms need"):
        edit_with_guidance(
            teacher.unet, teacher.maps, teacher.scheduler_config, x_T, uncond, cond, direction, 1, 3.0, 5.0,
            guided_branch="negative", terms=[BoxTerm(weight=0.2)],
        )  # fmt: skip
