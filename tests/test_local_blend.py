"""The ``local`` preset: DiffEdit's mask from the model alone, the map loss and the result outside it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from p2pz.teacher.editing import edit_with_guidance, make_scheduler
from p2pz.teacher.guidance_terms import GuidanceContext, mask_on_map
from p2pz.teacher.local_blend import LocalBlend, LocalEdit, diffedit_mask
from p2pz.teacher.pipeline import Pix2PixZero
from p2pz.teacher.presets import JOINT, LOCAL, get_preset

STEPS = 4


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return Pix2PixZero.from_pretrained(tiny_model_dir, preset="local", captioner=False)


def photo(size: int = 64) -> Image.Image:
    """A real photograph (matplotlib's sample of Grace Hopper), not a drawn scene."""
    import matplotlib.cbook

    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).resize(
        (size, size)
    )


def _inputs(teacher, count: int = 2):
    images = [photo(), photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)][:count]
    latents = teacher.encode_images(images, [torch.Generator().manual_seed(i) for i in range(count)])
    cond = teacher.encode_text(["a woman in uniform", "a portrait"][:count])
    direction = 0.5 * torch.randn(cond.shape[1:], generator=torch.Generator().manual_seed(3))
    return latents, cond, direction


def _context(teacher, latents, cond, directions, copies: int = 1) -> GuidanceContext:
    sched = make_scheduler(teacher.scheduler_config, STEPS, "cpu")
    edit_cond = cond.repeat(copies, 1, 1) + directions
    return GuidanceContext(latents, cond, cond, edit_cond, copies, 3.0, sched.alphas_cumprod, teacher.unet)


def test_local_preset_is_joint_with_the_mask_term():
    assert get_preset("local") == dataclasses.replace(JOINT, name="local", guidance_terms=(LocalEdit(),))
    assert LOCAL.to_dict()["guidance_terms"] == [
        {"term": "local", "noise_draws": 10, "strength": 0.5, "clamp_ratio": 3.0, "threshold": 0.5,
         "blend": True, "seed": 0}
    ]  # fmt: skip


def test_mask_is_binary_per_sample_and_a_batch_gives_single_runs_masks(local):
    latents, cond, direction = _inputs(local)
    spec = LocalEdit(noise_draws=2)
    both = diffedit_mask(_context(local, latents, cond, direction), spec)
    assert both.shape == (2, *latents.shape[2:])
    assert set(both.unique().tolist()) <= {0.0, 1.0} and 0 < both.mean() < 1
    for i in range(2):
        single = diffedit_mask(_context(local, latents[i : i + 1], cond[i : i + 1], direction), spec)
        torch.testing.assert_close(single[0], both[i], atol=0, rtol=0)


def test_no_direction_gives_an_empty_mask_and_two_edits_their_own_masks(local):
    latents, cond, direction = _inputs(local, 1)
    spec = LocalEdit(noise_draws=2)
    assert diffedit_mask(_context(local, latents, cond, torch.zeros_like(direction)), spec).sum() == 0
    two = torch.cat([direction[None], -2.0 * direction[None]])  # edit-major: edit 0, then edit 1
    masks = diffedit_mask(_context(local, latents, cond, two, copies=2), spec)
    assert masks.shape[0] == 2
    torch.testing.assert_close(masks[0], diffedit_mask(_context(local, latents, cond, direction), spec)[0])


def test_blend_keeps_the_reference_outside_the_mask_and_maps_count_outside_only():
    mask = torch.zeros(2, 8, 8)
    mask[0, 2:5, 3:6] = 1
    term = LocalBlend(mask)
    edit, reference = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)  # two edits of one input
    blended = term.after_step(edit, reference, torch.tensor(10))
    assert torch.equal(blended[0, :, 2:5, 3:6], edit[0, :, 2:5, 3:6])
    assert torch.equal(blended[0, :, 0], reference[0, :, 0]) and torch.equal(blended[1], reference[0])
    assert torch.equal(term.map_weights(16), 1 - mask_on_map(mask, 16))
    assert term.map_weights(16)[1].eq(1).all() and term.map_weights(16)[0].eq(0).sum() == 4  # 2x2 cells
    assert torch.equal(LocalBlend(mask, blend=False).after_step(edit, reference, torch.tensor(10)), edit)


def test_local_edit_keeps_the_reconstruction_outside_its_mask_on_a_photo(local):
    latents, cond, direction = _inputs(local, 1)
    x_T = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    spec = LocalEdit(noise_draws=2)
    before = local.unet_evals.snapshot()
    out = edit_with_guidance(
        local.unet, local.maps, local.scheduler_config, x_T, cond, cond, direction[None], STEPS, 3.0, 5.0,
        guided_branch="joint", terms=[spec], clean_latents=latents,
    )  # fmt: skip
    evals = local.unet_evals.snapshot()["forward"]
    assert evals["mask"] - before["forward"].get("mask", 0) == 2 * 2  # draws x (caption + edit)
    mask = diffedit_mask(_context(local, latents, cond, direction), spec)[:, None]
    assert 0 < mask.mean() < 1
    outside = (1 - mask).expand_as(out.edited).bool()
    assert torch.equal(out.edited[outside], out.reconstruction[outside])
    assert not torch.allclose(out.edited[~outside], out.reconstruction[~outside], atol=1e-3)


def test_local_preset_leaves_unguided_edits_as_joint_and_changes_guided_ones(local, tiny_model_dir):
    from p2pz.teacher.directions import EditDirection

    joint = Pix2PixZero.from_pretrained(tiny_model_dir, preset="joint", captioner=False)
    d = EditDirection(tensor=_inputs(local, 1)[2], source="woman", target="man")
    args = dict(captions=["a woman in uniform"], seeds=[1], num_steps=STEPS, return_latents=True)

    def edited(teacher, xa):
        return teacher.edit([photo()], [d], xa_guidance=xa, **args)[0]

    assert torch.equal(edited(joint, 0.0).edited_latent, edited(local, 0.0).edited_latent)
    result = edited(local, 5.0)
    assert not torch.allclose(edited(joint, 5.0).edited_latent, result.edited_latent, atol=1e-4)
    assert result.unet_evals["by_stage"]["mask"]["forward"] == 2 * LocalEdit().noise_draws
    assert result.finite and result.edited.size == (64, 64)
